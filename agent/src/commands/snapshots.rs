//! `morgana-agent snapshots`: this device's snapshots, as the appliance lists them.

use std::path::PathBuf;

use crate::client::Client;
use crate::state::State;

pub async fn run(state_dir: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let state = State::open(state_dir)?;
    let client = Client::for_device(&state)?;
    let snapshots = client.snapshots().await?;
    if json {
        println!("{}", serde_json::to_string(&snapshots)?);
        return Ok(());
    }
    if snapshots.is_empty() {
        println!("no snapshots yet: run `morgana-agent sync`");
        return Ok(());
    }
    println!(
        "{:<22} {:<26} {:>10} {:>14}  reason",
        "id", "created", "files", "bytes"
    );
    for s in &snapshots {
        println!(
            "{:<22} {:<26} {:>10} {:>14}  {}",
            s.id, s.created, s.stats.files, s.stats.bytes, s.reason
        );
    }
    Ok(())
}
