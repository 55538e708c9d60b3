//! `morgana-agent sync`: one snapshot of the protected root.

use std::path::PathBuf;

pub async fn run(_state_dir: Option<PathBuf>, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("sync is not built yet")
}
