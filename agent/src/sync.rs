//! One sync: snapshot the protected root, upload what the appliance lacks, commit. The
//! `sync` command and the `run` service both go through [`sync_once`].

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use morgana_core::policy::Area;
use morgana_core::wire::{CommitRequest, SnapshotStats};
use serde::Serialize;

use crate::client::Client;
use crate::scan::{Report, Skipped};
use crate::snapshot::{self, Options};
use crate::state::{State, StateError, SyncLock};

/// When the last sync succeeded, so a restarted service keeps its schedule.
const LAST_SYNC_FILE: &str = "last-sync.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LastSync {
    /// Unix milliseconds on this machine's clock when the sync finished.
    pub at_ms: i64,
    pub snapshot: String,
    /// RFC 3339 UTC, from the appliance.
    pub created: String,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The last successful sync recorded in the state directory; `None` if none is (or the
/// record is unreadable: the next sync rewrites it).
pub fn last_sync(state: &State) -> Option<LastSync> {
    let bytes = std::fs::read(state.path(LAST_SYNC_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn record_sync(state: &State, summary: &Summary) -> Result<(), StateError> {
    let last = LastSync {
        at_ms: now_ms(),
        snapshot: summary.snapshot.clone(),
        created: summary.created.clone(),
    };
    let json = serde_json::to_vec(&last).expect("serializes");
    state.write(LAST_SYNC_FILE, &json, 0o600)
}

/// Takes the sync lock from async code; `announce` is called if another holder makes us
/// wait.
pub async fn lock(state: &State, announce: impl FnOnce()) -> anyhow::Result<SyncLock> {
    if let Some(l) = state.try_lock_sync()? {
        return Ok(l);
    }
    announce();
    let state = state.clone();
    tokio::task::spawn_blocking(move || state.lock_sync())
        .await
        .context("the lock waiter stopped unexpectedly")?
        .map_err(Into::into)
}

/// One sync under the sync lock (the caller holds `_lock`), recorded as the last
/// successful one when it succeeds.
pub async fn sync_locked(
    state: &State,
    client: &Arc<Client>,
    reason: &str,
    progress: &ProgressBar,
    _lock: &SyncLock,
) -> anyhow::Result<Summary> {
    let summary = sync_once(state, client, reason, progress).await?;
    if let Err(e) = record_sync(state, &summary) {
        tracing::warn!(error = %e, "cannot record the last sync time; the schedule may run early");
    }
    Ok(summary)
}

/// What a sync did; `sync --json` prints it as is (the contract scripts and tests rely on).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub snapshot: String,
    /// RFC 3339 UTC, from the appliance.
    pub created: String,
    pub files: u64,
    pub bytes_scanned: u64,
    pub bytes_sent: u64,
    pub new_chunks: u64,
    pub duration_ms: u64,
    /// The policy applied: its name and (appliance-wide) version.
    pub policy: String,
    pub policy_version: u64,
    pub files_read: u64,
    pub changed_while_reading: Vec<String>,
    pub skipped: Vec<Skipped>,
}

/// Takes and commits one snapshot. `reason` is recorded with it (`manual`, `scheduled`, …).
pub async fn sync_once(
    state: &State,
    client: &Arc<Client>,
    reason: &str,
    progress: &ProgressBar,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let device = state.device()?;
    // Every sync applies the policy as it is now; the saved copy serves the parts of the
    // agent that work without the appliance.
    let policy = client.policy().await?;
    let unprotected = Area::unprotected(&policy.unprotected).with_context(|| {
        format!(
            "the appliance sent policy {} (version {}) with a rule this agent cannot use; \
             fix the policy on the appliance (`morgana policy set`) or update the agent",
            policy.name, policy.version
        )
    })?;
    let held = state.policy().ok().flatten().map(|p| (p.name, p.version));
    if held.as_ref() != Some(&(policy.name.clone(), policy.version)) {
        tracing::info!(policy = %policy.name, version = policy.version, before = ?held, "applying a new policy");
        state.save_policy(&policy)?;
    }
    let unprotected = Arc::new(unprotected);
    let sent_before = client.bytes_sent();
    let mut files_read = 0;
    let mut new_chunks = 0;
    let mut use_cache = true;
    let (info, taken, report) = loop {
        let report = Arc::new(Report::default());
        let taken = {
            let (client, report, progress) = (client.clone(), report.clone(), progress.clone());
            let (root, state_dir) = (device.root.clone(), state.dir.clone());
            let unprotected = unprotected.clone();
            let rt = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let opts = Options {
                    root: &root,
                    state_dir: &state_dir,
                    use_cache,
                    unprotected: &unprotected,
                    progress: &progress,
                };
                snapshot::take(client, &rt, &opts, &report)
            })
            .await
            .context("the snapshot task stopped unexpectedly")?
        };
        let taken =
            taken.with_context(|| format!("snapshot of {} failed", device.root.display()))?;
        files_read += snapshot::files_read(&report);
        new_chunks += taken.uploads.new_chunks;
        let req = CommitRequest {
            root: taken.root,
            stats: SnapshotStats {
                files: taken.counts.files,
                dirs: taken.counts.dirs,
                bytes: taken.counts.bytes,
                bytes_sent: client.bytes_sent() - sent_before,
                new_chunks,
            },
            reason: reason.into(),
        };
        match client.commit(&req).await? {
            Ok(info) => break (info, taken, report),
            Err(refused) if use_cache => {
                // The files cache vouched for content the appliance no longer holds (lost
                // or repaired storage): forget it and read everything once more.
                tracing::warn!(error = %refused.error, "commit refused; syncing again without the files cache");
                snapshot::forget_cache(&state.dir)?;
                use_cache = false;
            }
            Err(refused) => bail!(
                "the appliance refused the snapshot even after every file was read and offered \
                 again: {} (e.g. {:?}); check the appliance's storage and logs",
                refused.error,
                refused.missing.first()
            ),
        }
    };
    // Only now is the new cache true: everything it names is committed.
    taken.cache.install()?;
    Ok(Summary {
        snapshot: info.id,
        created: info.created,
        files: taken.counts.files,
        bytes_scanned: taken.counts.bytes,
        bytes_sent: client.bytes_sent() - sent_before,
        new_chunks,
        duration_ms: started.elapsed().as_millis() as u64,
        policy: policy.name,
        policy_version: policy.version,
        files_read,
        changed_while_reading: drain(&report.changed_while_reading),
        skipped: drain(&report.skipped),
    })
}

fn drain<T>(m: &std::sync::Mutex<Vec<T>>) -> Vec<T> {
    std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Chunk buffers (up to 256 KiB) are allocated on one thread and freed on another. glibc's
/// defaults let that grow memory well past what is live: freed large blocks raise the mmap
/// threshold, so later ones land in per-thread arenas that fragment. A fixed threshold and
/// few arenas keep the agent's peak RSS close to its live data. Call it before any thread
/// starts: it overrides [`morgana_core::memory::keep_freed_buffers`] for the commands that
/// sync (pack buffers are recycled by the upload stage instead).
pub fn limit_malloc_caching() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; it has no memory-safety preconditions.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
