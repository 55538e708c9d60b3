//! `morgana-agent restore`: a snapshot, or a path inside it, into a directory.

use std::path::{Path, PathBuf};

pub async fn run(
    _state_dir: Option<PathBuf>,
    _snapshot: &str,
    _to: &Path,
    _path: Option<&Path>,
    _overwrite: bool,
) -> anyhow::Result<()> {
    anyhow::bail!("restore is not built yet")
}
