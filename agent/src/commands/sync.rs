//! `morgana-agent sync`: one snapshot of the protected root.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use morgana_core::wire::{CommitRequest, SnapshotStats};
use serde::Serialize;

use crate::client::Client;
use crate::scan::{Report, Skipped};
use crate::snapshot::{self, Options};
use crate::state::State;

/// What `--json` prints: one object, the contract scripts and tests rely on.
#[derive(Serialize)]
struct Summary {
    snapshot: String,
    files: u64,
    bytes_scanned: u64,
    bytes_sent: u64,
    new_chunks: u64,
    duration_ms: u64,
    files_read: u64,
    changed_while_reading: Vec<String>,
    skipped: Vec<Skipped>,
}

pub async fn run(state_dir: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    limit_malloc_caching();
    let state = State::open(state_dir)?;
    let device = state.device()?;
    let client = Arc::new(Client::for_device(&state)?);
    client.health().await?;

    let progress = if !json && std::io::stderr().is_terminal() {
        let bar = ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {bytes} read ({bytes_per_sec}) {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    } else {
        ProgressBar::hidden()
    };

    let mut files_read = 0;
    let mut new_chunks = 0;
    let mut use_cache = true;
    let (info, taken, report) = loop {
        let report = Arc::new(Report::default());
        let taken = {
            let (client, report, progress) = (client.clone(), report.clone(), progress.clone());
            let (root, state_dir) = (device.root.clone(), state.dir.clone());
            let rt = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let opts = Options {
                    root: &root,
                    state_dir: &state_dir,
                    use_cache,
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
                bytes_sent: client.bytes_sent(),
                new_chunks,
            },
            reason: "manual".into(),
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
    progress.finish_and_clear();

    let summary = Summary {
        snapshot: info.id,
        files: taken.counts.files,
        bytes_scanned: taken.counts.bytes,
        bytes_sent: client.bytes_sent(),
        new_chunks,
        duration_ms: started.elapsed().as_millis() as u64,
        files_read,
        changed_while_reading: drain(&report.changed_while_reading),
        skipped: drain(&report.skipped),
    };
    if json {
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    println!(
        "snapshot {}: {} files, {} scanned, {} files read, {} sent ({} new chunks) in {:.2}s",
        summary.snapshot,
        summary.files,
        HumanBytes(summary.bytes_scanned),
        summary.files_read,
        HumanBytes(summary.bytes_sent),
        summary.new_chunks,
        summary.duration_ms as f64 / 1000.0
    );
    for p in &summary.changed_while_reading {
        println!("  changed while being read (kept as last read): {p}");
    }
    for s in &summary.skipped {
        println!("  skipped {}: {}", s.path, s.error);
    }
    Ok(())
}

fn drain<T>(m: &std::sync::Mutex<Vec<T>>) -> Vec<T> {
    std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Chunk buffers (up to 256 KiB) are allocated on one thread and freed on another. glibc's
/// defaults let that grow memory well past what is live: freed large blocks raise the mmap
/// threshold, so later ones land in per-thread arenas that fragment. A fixed threshold and
/// few arenas keep the agent's peak RSS close to its live data.
fn limit_malloc_caching() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; it has no memory-safety preconditions.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
