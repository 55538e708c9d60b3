//! `morgana alerts check`: runs the alert checks once (as `serve` does every
//! `--alert-check-every`), for cron and tests.

use std::path::PathBuf;

use anyhow::Context;

use crate::alerts;
use crate::catalog::{Catalog, SqliteCatalog};
use crate::commands::gc::parse_now;
use crate::config::{DEFAULT_DATA_DIR, DataDir};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Raise alerts for stale devices and full volumes, once per episode, and record
    /// recoveries; print what changed and what is open.
    Check {
        #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// The volumes to check, as given to `serve` (default: the data directory's).
        #[arg(long = "volume", value_name = "DIR")]
        volumes: Vec<PathBuf>,
        /// Check as of this time (RFC 3339) instead of now, for audits and tests.
        #[arg(long, value_name = "RFC3339", value_parser = parse_now)]
        now: Option<i64>,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    let Command::Check {
        data_dir,
        volumes,
        now,
        json,
    } = cmd;
    let data = DataDir::new(&data_dir);
    data.require_initialised()?;
    let catalog = SqliteCatalog::open(&data.catalog(), false).await?;
    let volumes = if volumes.is_empty() {
        vec![data.default_volume()]
    } else {
        volumes
    };
    let now = now.unwrap_or_else(crate::clock::now_ms);
    let result = alerts::check(&catalog, &volumes, now).await;
    catalog.close().await;
    let report = result.context("the alert check stopped")?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    for m in &report.raised {
        println!("raised: {m}");
    }
    for m in &report.recovered {
        println!("{m}");
    }
    println!("{} alert(s) open", report.open.len());
    for a in &report.open {
        println!(
            "  since {}: {}",
            crate::clock::rfc3339_ms(a.since_ms),
            a.message
        );
    }
    Ok(())
}
