//! `morgana-agent sync`: one snapshot of the protected root.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::client::Client;
use crate::state::State;
use crate::sync::sync_locked;

pub async fn run(state_dir: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let state = State::open(state_dir)?;
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
    let lock = crate::sync::lock(&state, || {
        eprintln!(
            "a sync is already running (the agent service, a restore job or another \
             `morgana-agent sync`); waiting for it to finish"
        )
    })
    .await?;
    let summary = sync_locked(&state, &client, "manual", &progress, &lock).await?;
    drop(lock);
    progress.finish_and_clear();
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
