//! `morgana gc`: applies retention and reclaims what no retained snapshot, live upload or
//! (later) layer needs, while the appliance keeps serving. See `gc.rs` for the protocol.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::catalog::{Catalog, SqliteCatalog};
use crate::commands::enroll_token::parse_duration;
use crate::config::{DEFAULT_DATA_DIR, DataDir};
use crate::gc::{self, GcOptions, GcReport};
use crate::retention::RetentionOverride;
use crate::store::PackStore;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Where rewritten packs go, as for `serve` (default: the data directory's volume).
    #[arg(long = "volume", value_name = "DIR")]
    pub volumes: Vec<PathBuf>,
    /// Report what would be pruned and freed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Take this time (RFC 3339) as now for hold expiry and the pack grace period, for
    /// audits and tests. Retention depends only on the snapshots' own times.
    #[arg(long, value_name = "RFC3339", value_parser = parse_now)]
    pub now: Option<i64>,
    #[command(flatten)]
    pub tuning: Tuning,
}

/// An RFC 3339 time as unix milliseconds, for `--now`.
pub fn parse_now(s: &str) -> Result<i64, String> {
    crate::clock::parse_rfc3339_ms(s)
        .ok_or_else(|| format!("`{s}` is not an RFC 3339 time such as 2026-11-26T08:00:00Z"))
}

/// What `gc` and the schedule inside `serve` share.
///
/// Retention comes from each device's policy (`morgana policy show`); a `--keep-*` flag,
/// when given, overrides that tier for every device.
#[derive(Debug, Clone, clap::Args)]
pub struct Tuning {
    /// Override every device's policy: keep the newest snapshot of each of this many recent
    /// hours. Default: each device's policy decides.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Override every device's policy: keep the newest snapshot of each of this many recent
    /// days. Default: each device's policy decides.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Override every device's policy: keep the newest snapshot of each of this many recent
    /// ISO weeks. Default: each device's policy decides.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Override every device's policy: keep the newest snapshot of each of this many recent
    /// months. Default: each device's policy decides.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Pack files no longer used are deleted this long after (so restores in flight finish).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub pack_grace: Duration,
    /// An upload not committed within this long is abandoned and stops protecting its data.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_duration)]
    pub hold_ttl: Duration,
}

impl Tuning {
    pub fn options(&self, dry_run: bool) -> GcOptions {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        GcOptions {
            dry_run,
            retention_override: RetentionOverride {
                hourly: self.keep_hourly,
                daily: self.keep_daily,
                weekly: self.keep_weekly,
                monthly: self.keep_monthly,
            },
            hold_ttl_ms: ms(self.hold_ttl),
            pack_grace_ms: ms(self.pack_grace),
            ..GcOptions::default()
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let data = DataDir::new(&args.data_dir);
    data.require_initialised()?;
    let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open(&data.catalog(), false).await?);
    let volumes = if args.volumes.is_empty() {
        vec![data.default_volume()]
    } else {
        args.volumes
    };
    let store = Arc::new(PackStore::open(&volumes)?);
    let options = GcOptions {
        now_ms: args.now,
        ..args.tuning.options(args.dry_run)
    };
    let result = gc::run(&catalog, &store, &options).await;
    catalog.close().await;
    let report = result.context("garbage collection stopped")?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", human(&report));
    }
    Ok(())
}

fn human(r: &GcReport) -> String {
    let verb = if r.dry_run { "would free" } else { "freed" };
    format!(
        "snapshots: {} kept, {} {}\n\
         marked: {} blobs in {} trees\n\
         {verb}: {} blobs, {} stored bytes\n\
         packs: {} rewritten, {} retired, {} files deleted ({} bytes)\n\
         took {} ms{}\n",
        r.snapshots_kept,
        r.snapshots_pruned,
        if r.dry_run { "to prune" } else { "pruned" },
        r.blobs_marked,
        r.trees_marked,
        r.blobs_freed,
        r.bytes_freed,
        r.packs_rewritten,
        r.packs_retired,
        r.pack_files_deleted,
        r.pack_bytes_deleted,
        r.duration_ms,
        if r.fence_retries > 0 {
            format!(
                ", marked again {} times for snapshots committed meanwhile",
                r.fence_retries
            )
        } else {
            String::new()
        },
    )
}
