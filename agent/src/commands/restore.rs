//! `morgana-agent restore`: a snapshot, or a path inside it, into a directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use morgana_core::Id;
use morgana_core::wire::SnapshotInfo;

use crate::client::Client;
use crate::restore::{self, BlobSource, OnBlob, Request, RestoreError, Stats};
use crate::state::State;

pub async fn run(
    state_dir: Option<PathBuf>,
    snapshot: &str,
    to: &Path,
    path: Option<&Path>,
    overwrite: bool,
) -> anyhow::Result<()> {
    let subpath = match path {
        Some(p) => restore::parse_subpath(p)?,
        None => Vec::new(),
    };
    // Refuse a non-empty target before talking to the appliance; create a missing one only
    // once the snapshot is known to exist.
    let exists = check_target(to, overwrite)?;
    let state = State::open(state_dir)?;
    let client = Client::for_device(&state)?;
    let snapshots = client.snapshots().await?;
    let snap = pick(&snapshots, snapshot)?.clone();
    if !exists {
        std::fs::create_dir_all(to)
            .with_context(|| format!("cannot create the restore target {}", to.display()))?;
    }
    let req = Request::new(snap.id.clone(), snap.root, subpath, to.to_path_buf());
    let started = Instant::now();
    let handle = tokio::runtime::Handle::current();
    // The engine is blocking (file system work on its own threads); it reaches the network
    // through this runtime. A restore is the device's own data: it never goes through a
    // branch reflector, whose cache would keep it on another machine.
    let result = tokio::task::spawn_blocking(move || {
        let source = ClientSource {
            client: Arc::new(client),
            handle,
            reflectors: None,
        };
        restore::restore(&source, &req)
    })
    .await
    .context("the restore thread panicked")?;
    let stats = match result {
        Ok(stats) => stats,
        Err(e) => {
            if !exists {
                // Only succeeds if nothing was written: a target we made and left empty goes.
                let _ = std::fs::remove_dir(to);
            }
            return Err(e).with_context(|| {
                format!(
                    "restoring snapshot {} into {} failed",
                    snap.id,
                    to.display()
                )
            });
        }
    };
    print_summary(&snap, path, to, &stats, started.elapsed().as_secs_f64());
    Ok(())
}

/// Whether `to` exists; an error if it is not a directory, or not empty without
/// `--overwrite`.
fn check_target(to: &Path, overwrite: bool) -> anyhow::Result<bool> {
    let meta = match std::fs::metadata(to) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("cannot look at {}", to.display())),
    };
    if !meta.is_dir() {
        bail!(
            "the restore target {} exists and is not a directory",
            to.display()
        );
    }
    let mut entries = std::fs::read_dir(to)
        .with_context(|| format!("cannot list the restore target {}", to.display()))?;
    if !overwrite && entries.next().is_some() {
        bail!(
            "the restore target {} is not empty; pass --overwrite to replace what is there",
            to.display()
        );
    }
    Ok(true)
}

fn pick<'a>(snapshots: &'a [SnapshotInfo], wanted: &str) -> anyhow::Result<&'a SnapshotInfo> {
    if wanted == "latest" {
        return snapshots
            .last()
            .context("this device has no snapshots yet: run `morgana-agent sync` first");
    }
    snapshots.iter().find(|s| s.id == wanted).with_context(|| {
        format!(
            "this device has no snapshot {wanted:?}; run `morgana-agent snapshots` to see the ids \
             (or pass --snapshot latest)"
        )
    })
}

/// The appliance as a blob source: one `fetch_blobs` call per request, driven on the
/// caller's runtime from the restore's own threads; branch reflectors first when any were
/// found for this download (`distribution::discover`).
pub(crate) struct ClientSource {
    pub client: Arc<Client>,
    pub handle: tokio::runtime::Handle,
    pub reflectors: Option<Arc<crate::distribution::Reflected>>,
}

impl BlobSource for ClientSource {
    fn fetch(&self, ids: &[Id], each: &mut OnBlob<'_>) -> Result<(), RestoreError> {
        match &self.reflectors {
            Some(r) => r.fetch(&self.handle, ids, each, &|ids, each| {
                self.fetch_direct(ids, each)
            }),
            None => self.fetch_direct(ids, each),
        }
    }
}

impl ClientSource {
    /// Straight from the appliance.
    fn fetch_direct(&self, ids: &[Id], each: &mut OnBlob<'_>) -> Result<(), RestoreError> {
        self.handle.block_on(async {
            let mut stream = self
                .client
                .fetch_blobs(ids)
                .await
                .map_err(|e| RestoreError::Fetch(Box::new(e)))?;
            while let Some((frame, stored)) = stream
                .next()
                .await
                .map_err(|e| RestoreError::Fetch(Box::new(e)))?
            {
                each(frame, &stored)?;
            }
            Ok(())
        })
    }
}

pub(crate) fn print_summary(
    snap: &SnapshotInfo,
    path: Option<&Path>,
    to: &Path,
    s: &Stats,
    secs: f64,
) {
    let what = match path {
        Some(p) => format!("{} of snapshot {}", p.display(), snap.id),
        None => format!("snapshot {}", snap.id),
    };
    let mut parts = vec![
        format!("{} files", s.files),
        format!("{} directories", s.dirs),
    ];
    if s.symlinks > 0 {
        parts.push(format!("{} symlinks", s.symlinks));
    }
    if s.hardlinks > 0 {
        parts.push(format!("{} hard links", s.hardlinks));
    }
    if s.specials > 0 {
        parts.push(format!("{} special files", s.specials));
    }
    println!(
        "restored {what} into {}: {}, {} in {secs:.2} s ({}/s; {} fetched in {} chunks)",
        to.display(),
        parts.join(", "),
        human(s.bytes),
        human((s.bytes as f64 / secs.max(1e-3)) as u64),
        human(s.fetched_bytes),
        s.fetched_chunks,
    );
    if s.warnings > 0 {
        println!(
            "{} warnings (see above): some attributes or special files were not restored",
            s.warnings
        );
    }
}

pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            device_id: "d".into(),
            root: Id::of(id.as_bytes()),
            created: "2026-01-01T00:00:00Z".into(),
            reason: "manual".into(),
            stats: Default::default(),
            pinned: None,
        }
    }

    #[test]
    fn picks_latest_and_by_id() {
        let list = [snap("a"), snap("b")];
        assert_eq!(pick(&list, "latest").unwrap().id, "b");
        assert_eq!(pick(&list, "a").unwrap().id, "a");
        let err = pick(&list, "zz").unwrap_err().to_string();
        assert!(err.contains("morgana-agent snapshots"), "{err}");
        assert!(pick(&[], "latest").is_err());
    }

    #[test]
    fn target_must_be_empty_without_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(!check_target(&tmp.path().join("new"), false).unwrap());
        assert!(check_target(tmp.path(), false).unwrap());
        std::fs::write(tmp.path().join("x"), b"").unwrap();
        let err = check_target(tmp.path(), false).unwrap_err().to_string();
        assert!(err.contains("--overwrite"), "{err}");
        assert!(check_target(tmp.path(), true).unwrap());
        assert!(check_target(&tmp.path().join("x"), true).is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(5), "5 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
    }
}
