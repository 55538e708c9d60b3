//! `morgana events`: read the event and audit log, and verify its hash chain.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::catalog::{Catalog, SqliteCatalog};
use crate::config::{DEFAULT_DATA_DIR, DataDir};
use crate::events::{ChainCheck, EventFilter, Severity};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Only events about this device.
    #[arg(long, value_name = "DEVICE_ID")]
    pub device: Option<String>,
    /// Only kinds starting with this, e.g. `alert.` or `job.failed`.
    #[arg(long, value_name = "PREFIX")]
    pub kind: Option<String>,
    /// Only events at least this severe: info, warning or error.
    #[arg(long, value_name = "SEVERITY")]
    pub severity: Option<Severity>,
    /// How many events, newest first.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Re-hash the whole log and exit 1 if any event was changed, inserted or removed.
    #[arg(long)]
    pub verify: bool,
}

pub async fn run(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let data = DataDir::new(&args.data_dir);
    data.require_initialised()?;
    let catalog = SqliteCatalog::open(&data.catalog(), false).await?;
    if args.verify {
        let check = catalog
            .verify_events()
            .await
            .context("cannot verify the event log")?;
        catalog.close().await;
        return Ok(match check {
            ChainCheck::Intact { events } => {
                println!("event log intact: {events} events verified");
                std::process::ExitCode::SUCCESS
            }
            ChainCheck::BrokenAt { seq, events_before } => {
                println!(
                    "event log TAMPERED: event {seq} does not match the chain \
                     ({events_before} events before it verify); it or an event before it was \
                     changed, inserted or removed. Compare with a backup of the catalog."
                );
                std::process::ExitCode::from(1)
            }
        });
    }
    if args.limit == 0 {
        bail!("--limit must be at least 1");
    }
    let filter = EventFilter {
        device_id: args.device,
        kind_prefix: args.kind,
        min_severity: args.severity,
    };
    let events = catalog
        .events_page(&filter, None, args.limit)
        .await
        .context("cannot read the event log")?;
    catalog.close().await;
    for e in &events {
        let ev = &e.event;
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "seq": e.seq,
                    "at": crate::clock::rfc3339_ms(ev.at_ms),
                    "kind": ev.kind,
                    "severity": ev.severity.name(),
                    "actor": ev.actor,
                    "device_id": ev.device_id,
                    "message": ev.message,
                })
            );
        } else {
            println!(
                "{:>6}  {}  {:<7}  {:<20}  {:<18}  {}",
                e.seq,
                crate::clock::rfc3339_ms(ev.at_ms),
                ev.severity.name(),
                ev.kind,
                ev.device_id.as_deref().unwrap_or("-"),
                ev.message
            );
        }
    }
    if events.is_empty() && !args.json {
        eprintln!("no events match");
    }
    Ok(std::process::ExitCode::SUCCESS)
}
