//! `morgana snapshot pin|unpin`: exempt a snapshot from retention (legal hold, before a
//! risky change) or give it back to retention.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::catalog::{Catalog, SqliteCatalog};
use crate::config::{DEFAULT_DATA_DIR, DataDir};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR, global = true)]
    pub data_dir: PathBuf,
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Keep a snapshot whatever retention says, until it is unpinned.
    Pin {
        snapshot: String,
        /// Why, e.g. legal-hold or pre-layer-update.
        #[arg(long, default_value = "manual")]
        reason: String,
    },
    /// Let retention decide about a snapshot again.
    Unpin { snapshot: String },
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let data = DataDir::new(&args.data_dir);
    data.require_initialised()?;
    let catalog = SqliteCatalog::open(&data.catalog(), false).await?;
    let (snapshot, reason) = match &args.action {
        Action::Pin { snapshot, reason } => (snapshot, Some(reason.as_str())),
        Action::Unpin { snapshot } => (snapshot, None),
    };
    let found = catalog
        .pin_snapshot(snapshot, reason)
        .await
        .context("cannot change the snapshot's pin")?;
    if found {
        let message = match reason {
            Some(r) => format!("snapshot {snapshot} pinned ({r})"),
            None => format!("snapshot {snapshot} unpinned"),
        };
        let kind = if reason.is_some() {
            "snapshot.pinned"
        } else {
            "snapshot.unpinned"
        };
        crate::events::record(
            &catalog,
            crate::events::NewEvent::system(kind, crate::events::Severity::Info, message).by("cli"),
        )
        .await;
    }
    catalog.close().await;
    if !found {
        bail!(
            "there is no snapshot {snapshot}: list a device's snapshots with `morgana-agent snapshots`"
        );
    }
    match reason {
        Some(r) => println!("pinned {snapshot} ({r})"),
        None => println!("unpinned {snapshot}"),
    }
    Ok(())
}
