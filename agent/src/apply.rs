//! Applying layers: the device becomes base ⊕ apps, keeping its user area, unprotected
//! area, machine identity (never in a layer) and the files its users installed (in no
//! layer, so neither written nor removed).
//!
//! 1. A journal in the state directory names the job before anything happens; then a
//!    `pre-layer-update` snapshot (the appliance pins it) is taken and its id journaled.
//! 2. The target is built from the layers' trees exactly as the appliance's dry run builds
//!    it (`morgana_core::image`); its new directory trees live in memory and are served to
//!    the restore engine beside the appliance's blobs.
//! 3. The restore engine writes every file under a temporary name in its own folder (same
//!    filesystem) and renames it into place, file by file; then the paths the previous
//!    layers owned and the new ones lack are removed.
//! 4. The journal goes last. If the agent dies before, `run` finds the journal on its next
//!    start and applies the same job again: every step converges on the same target, so a
//!    device never stays half-applied.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use indicatif::ProgressBar;
use morgana_core::Id;
use morgana_core::control::{ApplyJob, Job, RuleSet};
use morgana_core::image::{self, Flat};
use morgana_core::pack::{BlobKind, Codec, Compression, DEFAULT_ZSTD_LEVEL};
use morgana_core::policy::{Area, HOME_MACRO};
use morgana_core::tree::{Content, Kind, Tree};
use morgana_core::wire::BlobFrame;
use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::commands::restore::{ClientSource, human};
use crate::jobs::remove_any;
use crate::restore::{self, BlobSource, Keep, OnBlob, Progress, Request, RestoreError};
use crate::state::{State, SyncLock};
use crate::sync::sync_locked;

/// The apply in progress, in the state directory.
pub const JOURNAL_FILE: &str = "apply-journal.json";
/// Test hook: milliseconds to wait between writing the layers' files and removing stale
/// ones, so a test can kill the agent in the middle of an apply.
const DELAY_ENV: &str = "MORGANA_AGENT_APPLY_DELAY_MS";
/// The restore engine's temporary names; what a killed apply leaves behind.
const TMP_PREFIX: &[u8] = b".morgana-restore.";

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Journal {
    job: Job,
    /// Set once the pre-layer-update snapshot is committed.
    pre_snapshot: Option<String>,
}

/// The apply job a killed agent left unfinished, if any.
pub fn pending(state: &State) -> Option<Job> {
    let bytes = std::fs::read(state.path(JOURNAL_FILE)).ok()?;
    match serde_json::from_slice::<Journal>(&bytes) {
        Ok(j) => Some(j.job),
        Err(e) => {
            tracing::error!(
                "the apply journal {} is unreadable ({e}); the device may be half-applied: \
                 queue the apply again or roll back with `morgana layer rollback`",
                state.path(JOURNAL_FILE).display()
            );
            None
        }
    }
}

fn save(state: &State, journal: &Journal) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec(journal).expect("journals serialize");
    state
        .write(JOURNAL_FILE, &bytes, 0o600)
        .context("cannot write the apply journal, so nothing was applied")
}

/// Runs (or resumes) the apply job `job_id`.
pub async fn run(
    state: &State,
    client: &Arc<Client>,
    job_id: &str,
    job: &ApplyJob,
    live: &Arc<Progress>,
    bar: &ProgressBar,
    lock: &SyncLock,
) -> anyhow::Result<String> {
    let resumed = std::fs::read(state.path(JOURNAL_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Journal>(&b).ok())
        .filter(|j| j.job.id == job_id);
    let mut journal = match resumed.clone() {
        Some(j) => j,
        None => {
            let j = Journal {
                job: Job {
                    id: job_id.to_owned(),
                    kind: morgana_core::control::JobKind::ApplyLayers(job.clone()),
                },
                pre_snapshot: None,
            };
            save(state, &j)?;
            j
        }
    };
    if journal.pre_snapshot.is_none() {
        let before = sync_locked(state, client, "pre-layer-update", bar, lock)
            .await
            .context("the pre-layer-update snapshot failed, so nothing was applied")?;
        journal.pre_snapshot = Some(before.snapshot.clone());
        save(state, &journal)?;
    }
    let root = state.device()?.root;
    let keep = keep(state, &root, job)?;
    let client2 = client.clone();
    let handle = tokio::runtime::Handle::current();
    let job2 = job.clone();
    let live = live.clone();
    let root2 = root.clone();
    let keep2 = keep.clone();
    let resuming = resumed.is_some();
    let done = tokio::task::spawn_blocking(move || {
        let source = ClientSource {
            client: client2,
            handle,
        };
        write_target(&source, &job2, &root2, keep2, live, resuming)
    })
    .await
    .context("the apply thread stopped unexpectedly")??;
    if let Some(ms) = std::env::var(DELAY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let mut removed = 0u64;
    for p in &job.remove {
        let rel = p.strip_prefix(b"/").unwrap_or(p);
        if rel.is_empty() || keep.keeps(rel) {
            continue;
        }
        if restore::parse_subpath(Path::new(std::ffi::OsStr::from_bytes(rel))).is_err() {
            tracing::warn!(
                "skipping a hostile path in the removal list: {}",
                restore::show(p)
            );
            continue;
        }
        let path = root.join(std::ffi::OsStr::from_bytes(rel));
        if remove_any(&path)? {
            tracing::info!(path = %path.display(), "removed: the new layers do not have it");
            removed += 1;
        }
    }
    std::fs::remove_file(state.path(JOURNAL_FILE))
        .context("the layers are applied but the apply journal could not be removed")?;
    Ok(format!(
        "{}layers applied (the state before is snapshot {}): {} files ({}) written, {} folders, \
         {} stale paths removed, {} fetched, {} leftovers of an interrupted apply cleaned",
        if resuming {
            "interrupted apply resumed: "
        } else {
            ""
        },
        journal.pre_snapshot.unwrap_or_default(),
        done.stats.files,
        human(done.stats.bytes),
        done.stats.dirs,
        removed,
        human(done.stats.fetched_bytes),
        done.cleaned
    ))
}

/// Paths an apply never writes or removes: the agent's state, the unprotected area, the
/// user area and the do-not-override list.
fn keep(state: &State, root: &Path, job: &ApplyJob) -> anyhow::Result<Keep> {
    let policy = crate::jobs::held_policy(state);
    let unprotected = Area::unprotected(
        policy
            .as_ref()
            .map_or(&RuleSet::default(), |p| &p.unprotected),
    )
    .context("the held policy's unprotected area is unusable")?;
    let default_user = RuleSet {
        rules: vec![HOME_MACRO.to_owned()],
        exceptions: vec![],
    };
    let user = Area::compile(policy.as_ref().map_or(&default_user, |p| &p.user_area))
        .context("the held policy's user area is unusable")?;
    let state_rel = root.canonicalize().ok().and_then(|root| {
        let dir = state.dir.canonicalize().ok()?;
        Some(
            dir.strip_prefix(&root)
                .ok()?
                .as_os_str()
                .as_bytes()
                .to_vec(),
        )
    });
    let dno = job.do_not_override.clone();
    Ok(Keep(Arc::new(move |rel: &[u8]| {
        if state_rel.as_ref().is_some_and(|s| image::is_within(rel, s)) {
            return true;
        }
        let mut abs = Vec::with_capacity(rel.len() + 1);
        abs.push(b'/');
        abs.extend_from_slice(rel);
        unprotected.contains(&abs)
            || user.contains(&abs)
            || dno.iter().any(|d| image::is_within(&abs, d))
    })))
}

struct Written {
    stats: restore::Stats,
    cleaned: u64,
}

/// Builds the target and writes it over the root (blocking).
fn write_target(
    source: &ClientSource,
    job: &ApplyJob,
    root: &Path,
    keep: Keep,
    live: Arc<Progress>,
    resuming: bool,
) -> anyhow::Result<Written> {
    let mut codec = Codec::new(DEFAULT_ZSTD_LEVEL);
    let base = flatten(source, &mut codec, job.base.root)?;
    let mut apps = Vec::new();
    for app in &job.apps {
        apps.push((
            flatten(source, &mut codec, app.root)?,
            app.deletions.as_slice(),
        ));
    }
    let (target, _) = image::target(base, apps, &job.do_not_override);
    let (tree_root, trees) = image::build(&target);
    let source = WithTrees {
        trees: trees.into_iter().map(|(id, t)| (id, t.encode())).collect(),
        inner: source,
    };
    let mut req = Request::new(
        format!("layers {} + {} app layers", job.base.name, job.apps.len()),
        tree_root,
        Vec::new(),
        root.to_path_buf(),
    );
    req.keep = Some(keep);
    req.progress = Some(live);
    let stats = restore::restore(&source, &req).context("writing the layers' files failed")?;
    let cleaned = if resuming {
        clean_leftovers(root, &target)?
    } else {
        0
    };
    Ok(Written { stats, cleaned })
}

/// Removes temporary files a killed apply left in the layers' folders.
fn clean_leftovers(root: &Path, target: &Flat) -> anyhow::Result<u64> {
    let mut cleaned = 0;
    let dirs = std::iter::once(&b""[..]).chain(
        target
            .iter()
            .filter(|(_, e)| e.kind == Some(Kind::Dir))
            .map(|(p, _)| p.as_slice()),
    );
    for dir in dirs {
        let rel = dir.strip_prefix(b"/").unwrap_or(dir);
        let path = root.join(std::ffi::OsStr::from_bytes(rel));
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_name().as_bytes().starts_with(TMP_PREFIX) {
                remove_any(&entry.path())?;
                cleaned += 1;
            }
        }
    }
    Ok(cleaned)
}

/// Every entry below the tree `root`, by absolute path.
fn flatten(source: &dyn BlobSource, codec: &mut Codec, root: Id) -> anyhow::Result<Flat> {
    let mut flat = Flat::new();
    let mut stack = vec![(root, Vec::new())];
    while let Some((id, dir)) = stack.pop() {
        for entry in load_tree(source, codec, id)?.entries {
            let path = image::child_path(&dir, &entry.name);
            if let (Some(Kind::Dir), Content::Tree(sub)) = (entry.kind, &entry.content) {
                stack.push((*sub, path.clone()));
            }
            flat.insert(path, entry);
        }
    }
    Ok(flat)
}

fn load_tree(source: &dyn BlobSource, codec: &mut Codec, id: Id) -> anyhow::Result<Tree> {
    let mut tree = None;
    source.fetch(&[id], &mut |frame, stored| {
        if frame.kind.is_none() {
            return Ok(());
        }
        let raw = codec
            .open(frame.id, frame.compression, stored, frame.raw_len)
            .map_err(|e| RestoreError::Protocol(format!("layer tree {id}: {e}")))?;
        tree = Some(
            Tree::decode(&raw)
                .map_err(|e| RestoreError::Protocol(format!("layer tree {id}: {e}")))?,
        );
        Ok(())
    })?;
    tree.with_context(|| {
        format!("the appliance does not have layer tree {id}; run `morgana check` there")
    })
}

/// The appliance's blobs, plus the target's directory trees built here.
struct WithTrees<'a> {
    trees: HashMap<Id, Vec<u8>>,
    inner: &'a ClientSource,
}

impl BlobSource for WithTrees<'_> {
    fn fetch(&self, ids: &[Id], each: &mut OnBlob<'_>) -> Result<(), RestoreError> {
        // Frames go out in request order: runs of remote ids are fetched together.
        let mut start = 0;
        while start < ids.len() {
            if let Some(raw) = self.trees.get(&ids[start]) {
                let frame = BlobFrame {
                    id: ids[start],
                    kind: Some(BlobKind::Tree),
                    compression: Compression::None,
                    raw_len: raw.len() as u32,
                    stored_len: raw.len() as u32,
                };
                each(frame, raw)?;
                start += 1;
                continue;
            }
            let end = ids[start..]
                .iter()
                .position(|id| self.trees.contains_key(id))
                .map_or(ids.len(), |n| start + n);
            self.inner.fetch(&ids[start..end], each)?;
            start = end;
        }
        Ok(())
    }
}
