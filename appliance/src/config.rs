//! The data directory layout: every path the appliance keeps state under, in one place.

use std::path::{Path, PathBuf};

pub const DEFAULT_DATA_DIR: &str = "./morgana-data";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";

/// Paths inside one data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.tls_dir().join("ca.pem")
    }

    pub fn ca_key(&self) -> PathBuf {
        self.tls_dir().join("ca.key")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.tls_dir().join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.tls_dir().join("server.key")
    }

    pub fn catalog(&self) -> PathBuf {
        self.root.join("catalog.sqlite")
    }

    /// Uploaded plugin components, named by the BLAKE3 hash of their bytes.
    pub fn plugins_dir(&self) -> PathBuf {
        self.root.join("plugins")
    }

    /// Compiled plugin code, cached so each component is compiled once.
    pub fn plugin_cache_dir(&self) -> PathBuf {
        self.plugins_dir().join("compiled")
    }

    pub fn default_volume(&self) -> PathBuf {
        self.root.join("volumes").join("default")
    }

    /// Whether `serve` has initialised this directory: commands other than `serve` must not
    /// create a CA or catalog of their own, or agents would pin a CA the server never uses.
    pub fn is_initialised(&self) -> bool {
        self.ca_cert().is_file() && self.ca_key().is_file() && self.catalog().is_file()
    }

    /// The error every non-`serve` command gives on a directory `serve` never initialised.
    pub fn require_initialised(&self) -> anyhow::Result<()> {
        if self.is_initialised() {
            return Ok(());
        }
        anyhow::bail!(
            "{} holds no Morgana CA and catalog yet: run `morgana serve --data-dir {}` once first \
             (it creates them), then retry",
            self.root.display(),
            self.root.display()
        )
    }
}
