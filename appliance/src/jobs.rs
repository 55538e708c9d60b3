//! Jobs for agents: queuing one (CLI, web UI, API) and describing them to people. The
//! agent side of the protocol is in `api::control`; storage is the catalog's.

use morgana_core::control::{JobKind, JobState, RestoreJob, RestoreScope};
use morgana_core::policy::{Area, Standing};
use morgana_core::tree::{Content, Kind};
use tracing::warn;

use crate::catalog::{Catalog, CatalogError, JobRecord, Result};
use crate::events::{NewEvent, Severity};
use crate::store::{TreeLoadError, Visit, load_tree, walk_tree};

/// Entries a restore's totals count at most; a bigger restore shows progress without them.
const MAX_COUNTED: u64 = 5_000_000;

/// Stores a queued job for `device_id` and records who queued it. A running `serve` finds
/// it within a second (its sweeper wakes the device's waiting poll); `api::control::queue`
/// also wakes the poll at once when the job is queued inside the serving process.
pub async fn queue(
    catalog: &dyn Catalog,
    device_id: &str,
    kind: JobKind,
    created_by: &str,
) -> Result<JobRecord> {
    let mut job = JobRecord::queued(device_id, kind, created_by, crate::clock::now_ms());
    if let JobKind::Restore(r) = &job.kind {
        match restore_totals(catalog, device_id, r).await {
            Ok(Some((files, bytes))) => {
                job.progress.files_total = files;
                job.progress.bytes_total = bytes;
            }
            Ok(None) => {}
            // The agent reports the real trouble (a missing tree, say) when it runs the job.
            Err(e) => warn!(job = %job.id, "cannot count the restore's files: {e}"),
        }
    }
    catalog.queue_job(&job).await?;
    crate::events::record(
        catalog,
        NewEvent::system(
            "job.queued",
            Severity::Info,
            format!("job {} queued: {}", job.id, describe(&job.kind)),
        )
        .for_device(device_id)
        .by(created_by),
    )
    .await;
    Ok(job)
}

/// Waits until job `id` has finished (`Some`, succeeded or failed) or `timeout` passed
/// (`None`), looking at the catalog every `poll`: the CLI's way to follow a job a running
/// `serve` hands out.
pub async fn wait_finished(
    catalog: &dyn Catalog,
    id: &str,
    timeout: std::time::Duration,
    poll: std::time::Duration,
) -> Result<Option<JobRecord>> {
    let started = std::time::Instant::now();
    loop {
        if let Some(job) = catalog.job(id).await?
            && is_finished(job.state)
        {
            return Ok(Some(job));
        }
        if started.elapsed() >= timeout {
            return Ok(None);
        }
        tokio::time::sleep(poll).await;
    }
}

/// One line for a person: `sync`, `restore of /home/a from snapshot S to /srv/x`, …
pub fn describe(kind: &JobKind) -> String {
    match kind {
        JobKind::Sync => "sync now".into(),
        JobKind::Restore(r) => {
            let from = if r.source_device.is_empty() {
                format!("snapshot {}", r.snapshot)
            } else {
                format!("snapshot {} of device {}", r.snapshot, r.source_device)
            };
            let to = match &r.target {
                Some(t) => format!(" into {t}"),
                None => " in place".into(),
            };
            match &r.scope {
                RestoreScope::Full => format!("full revert to {from}"),
                RestoreScope::SystemOnly => {
                    format!("system-only revert to {from} (user data kept)")
                }
                RestoreScope::Paths { paths } => {
                    format!("restore of {} from {from}{to}", paths.join(", "))
                }
            }
        }
        JobKind::ApplyLayers(a) => {
            let mut layers = format!("{} v{}", a.base.name, a.base.version);
            for app in &a.apps {
                layers.push_str(&format!(" + {} v{}", app.name, app.version));
            }
            format!("apply layers {layers}")
        }
        JobKind::RollbackLayers(r) => {
            format!("layer rollback to snapshot {} (user data kept)", r.snapshot)
        }
    }
}

/// The regular files and their bytes a restore writes, read from the stored trees, so its
/// progress can say "n of m". `None` when there are more than [`MAX_COUNTED`] entries.
async fn restore_totals(
    catalog: &dyn Catalog,
    device_id: &str,
    r: &RestoreJob,
) -> std::result::Result<Option<(u64, u64)>, TotalsError> {
    let mut totals = Totals::default();
    match &r.scope {
        RestoreScope::Full => totals.add(count_files(catalog, Vec::new(), r.root, None).await?),
        RestoreScope::SystemOnly => {
            let policy = catalog.device_policy(device_id).await?;
            let user_area = Area::compile(&policy.spec.user_area)?;
            totals.add(count_files(catalog, Vec::new(), r.root, Some(user_area)).await?)
        }
        RestoreScope::Paths { paths } => {
            for path in paths {
                let Some(entry) = entry_at(catalog, r.root, path).await? else {
                    continue;
                };
                match (entry.kind, entry.content) {
                    (Some(Kind::Dir), Content::Tree(id)) => {
                        let at = path.trim_end_matches('/').as_bytes().to_vec();
                        totals.add(count_files(catalog, at, id, None).await?)
                    }
                    (Some(Kind::File), _) => {
                        totals.files += 1;
                        totals.bytes += entry.size;
                    }
                    _ => {}
                }
            }
        }
    }
    Ok((totals.entries <= MAX_COUNTED).then_some((totals.files, totals.bytes)))
}

#[derive(Default)]
struct Totals {
    files: u64,
    bytes: u64,
    entries: u64,
}

impl Totals {
    fn add(&mut self, other: Totals) {
        self.files += other.files;
        self.bytes += other.bytes;
        self.entries += other.entries;
    }
}

/// Counts the files below the tree `id` found at the absolute path `at` (`/` is empty),
/// leaving out those in `skip`. (It owns `skip`: a closure over borrowed arguments makes
/// the future not `Send` for the web handlers that queue jobs.)
async fn count_files(
    catalog: &dyn Catalog,
    at: Vec<u8>,
    id: morgana_core::Id,
    skip: Option<Area>,
) -> std::result::Result<Totals, TotalsError> {
    let start = match &skip {
        Some(area) if !at.is_empty() => area.standing(&at),
        _ => Standing::default(),
    };
    let mut totals = Totals::default();
    walk_tree(catalog, id, start, |parent, path, e| {
        totals.entries += 1;
        if totals.entries > MAX_COUNTED {
            return Visit::Stop;
        }
        let standing = skip
            .as_ref()
            .map_or(Standing::default(), |a| a.child(*parent, path));
        if standing.in_area() {
            return Visit::Skip;
        }
        match e.kind {
            Some(Kind::Dir) => return Visit::Enter(standing),
            Some(Kind::File) => {
                totals.files += 1;
                totals.bytes += e.size;
            }
            _ => {}
        }
        Visit::Skip
    })
    .await?;
    Ok(totals)
}

/// The entry at the absolute `path` of the tree `root`; `None` if there is none.
async fn entry_at(
    catalog: &dyn Catalog,
    root: morgana_core::Id,
    path: &str,
) -> std::result::Result<Option<morgana_core::tree::Entry>, TotalsError> {
    // Collected first: a filtering iterator held across an await makes rustc find the
    // web handlers' futures not `Send`.
    let names: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let mut tree = root;
    for (i, name) in names.iter().enumerate() {
        let entries = load_tree(catalog, tree).await?.entries;
        let Some(e) = entries.into_iter().find(|e| e.name == name.as_bytes()) else {
            return Ok(None);
        };
        if i + 1 == names.len() {
            return Ok(Some(e));
        }
        let Content::Tree(sub) = e.content else {
            return Ok(None);
        };
        tree = sub;
    }
    Ok(None)
}

#[derive(Debug, thiserror::Error)]
enum TotalsError {
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Tree(#[from] TreeLoadError),
    #[error("the device's user area is unusable: {0}")]
    Area(#[from] morgana_core::policy::PolicyError),
}

/// A job request that means nothing, and why.
#[derive(Debug, thiserror::Error)]
pub enum JobRequestError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "there is no snapshot {0:?}: pick one from the device's snapshot list \
         (`morgana-agent snapshots` on a device)"
    )]
    NoSuchSnapshot(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// The restore scope a request asks for: `scope` `full` or `system-only` reverts the
/// device; otherwise `paths` (absolute paths in the snapshot) are restored, into `to` (an
/// absolute directory on the device) or their original place. `to` alone means the whole
/// snapshot, into `to`. Refuses combinations that mean nothing.
pub fn restore_scope(
    scope: Option<&str>,
    paths: Vec<String>,
    to: Option<&str>,
) -> std::result::Result<RestoreScope, JobRequestError> {
    let bad = |m: String| Err(JobRequestError::Invalid(m));
    if let Some(t) = to {
        check_path(t, "the target folder")?;
    }
    for p in &paths {
        check_path(p, "a path to restore")?;
    }
    match scope {
        Some(s @ ("full" | "system-only")) if !paths.is_empty() => bad(format!(
            "scope {s} reverts the whole device; leave it out to restore only the paths"
        )),
        Some(s @ ("full" | "system-only")) if to.is_some() => bad(format!(
            "scope {s} reverts the device in place; leave out the target folder (--to), or \
             restore paths into it"
        )),
        Some("full") => Ok(RestoreScope::Full),
        Some("system-only") => Ok(RestoreScope::SystemOnly),
        Some(s) if s != "paths" => bad(format!(
            "{s:?} is not a restore scope: use paths, full or system-only"
        )),
        _ if !paths.is_empty() => Ok(RestoreScope::Paths { paths }),
        _ if to.is_some() => Ok(RestoreScope::Paths {
            paths: vec!["/".into()],
        }),
        _ => bad(
            "say what to restore: one or more paths (--path P), a target folder (--to DIR) \
                  for the whole snapshot, or scope full or system-only to revert the device"
                .into(),
        ),
    }
}

fn check_path(p: &str, what: &str) -> std::result::Result<(), JobRequestError> {
    let ok = p.starts_with('/')
        && !p.contains('\0')
        && !p.split('/').any(|c| c == "..")
        && p.len() <= 4096;
    if !ok {
        return Err(JobRequestError::Invalid(format!(
            "{what} {p:?} must be an absolute path without `..` (e.g. /home/alice/docs)"
        )));
    }
    Ok(())
}

/// The restore job for `snapshot_id` (of any device: restoring onto new hardware).
pub async fn restore_kind(
    catalog: &dyn Catalog,
    snapshot_id: &str,
    scope: RestoreScope,
    target: Option<String>,
) -> std::result::Result<JobKind, JobRequestError> {
    let snap = catalog
        .snapshot(snapshot_id)
        .await?
        .ok_or_else(|| JobRequestError::NoSuchSnapshot(snapshot_id.to_owned()))?;
    Ok(JobKind::Restore(RestoreJob {
        snapshot: snap.id,
        source_device: snap.device_id,
        root: snap.root,
        scope,
        target,
        drivers: Vec::new(),
    }))
}

/// Whether the job reverts a whole device (a Protection Manager's decision).
pub fn is_revert(kind: &JobKind) -> bool {
    matches!(
        kind,
        JobKind::Restore(RestoreJob {
            scope: RestoreScope::Full | RestoreScope::SystemOnly,
            ..
        })
    )
}

pub fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
    }
}

pub fn is_finished(s: JobState) -> bool {
    matches!(s, JobState::Succeeded | JobState::Failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_map_to_scopes_and_nonsense_is_refused() {
        assert_eq!(
            restore_scope(Some("full"), vec![], None).unwrap(),
            RestoreScope::Full
        );
        assert_eq!(
            restore_scope(Some("system-only"), vec![], None).unwrap(),
            RestoreScope::SystemOnly
        );
        assert_eq!(
            restore_scope(Some("paths"), vec!["/etc".into()], Some("/srv/x")).unwrap(),
            RestoreScope::Paths {
                paths: vec!["/etc".into()]
            }
        );
        assert_eq!(
            restore_scope(None, vec![], Some("/srv/x")).unwrap(),
            RestoreScope::Paths {
                paths: vec!["/".into()]
            }
        );
        for (scope, paths, to, needle) in [
            (Some("full"), vec!["/etc".to_string()], None, "leave it out"),
            (Some("full"), vec![], Some("/x"), "leave out the target"),
            (None, vec![], None, "say what to restore"),
            (None, vec!["etc".to_string()], None, "absolute"),
            (None, vec!["/a/../b".to_string()], None, "absolute"),
            (None, vec!["/a".to_string()], Some("/a/../../b"), "absolute"),
            (Some("everything"), vec![], None, "not a restore scope"),
        ] {
            let err = restore_scope(scope, paths, to).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
