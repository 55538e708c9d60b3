//! `morgana-agent`: the endpoint side of Morgana.

mod apply;
mod cache;
mod client;
mod commands;
mod delivered;
mod inventory;
mod jobs;
mod reflectors;
mod restore;
mod reuse;
mod scan;
mod service;
mod snapshot;
mod state;
mod sync;
mod upload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "morgana-agent",
    version,
    about = "Morgana endpoint agent: protect and restore this machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enrol this endpoint with an appliance, using a token from `morgana enroll-token`.
    Enroll {
        /// The appliance, e.g. https://appliance.example:8443
        #[arg(long)]
        server: String,
        #[arg(long)]
        token: String,
        /// The directory tree this device protects.
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Take one snapshot of the protected root.
    Sync {
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Print one JSON object instead of a human summary.
        #[arg(long)]
        json: bool,
    },
    /// List this device's snapshots.
    Snapshots {
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot, or a path inside it, into a directory.
    Restore {
        /// A snapshot id, or `latest`.
        #[arg(long)]
        snapshot: String,
        #[arg(long)]
        to: PathBuf,
        /// Restore only this file or directory (relative to the protected root).
        #[arg(long)]
        path: Option<PathBuf>,
        /// Allow restoring into a directory that is not empty, replacing what is there.
        #[arg(long)]
        overwrite: bool,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Run as the endpoint service: scheduled syncs, heartbeats, jobs from the appliance.
    Run {
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Sync this often (e.g. 30m, 2h), overriding the policy's interval (default 1h).
        #[arg(long, value_name = "DURATION", value_parser = morgana_core::duration::parse_duration)]
        sync_every: Option<Duration>,
    },
    /// Print the hardware and OS inventory this agent reports.
    Inventory {
        #[arg(long)]
        json: bool,
    },
    /// Rank branch reflectors for this device as downloads choose them: the appliance's
    /// reflector-selector plugin, or the built-in.
    Reflectors {
        /// A JSON array of candidates: {"id", "address": "HOST:PORT", "subnet": "CIDR",
        /// "site"?, "load"?, "latency_ms"?}; a missing latency is measured.
        #[arg(long)]
        candidates: PathBuf,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    rustls::crypto::ring::default_provider()
        .install_default()
        .expect("no other crypto provider is installed");
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MORGANA_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Enroll {
                server,
                token,
                root,
                state_dir,
            } => commands::enroll::run(state_dir, &server, &token, &root).await,
            Command::Sync { state_dir, json } => commands::sync::run(state_dir, json).await,
            Command::Snapshots { state_dir, json } => {
                commands::snapshots::run(state_dir, json).await
            }
            Command::Restore {
                snapshot,
                to,
                path,
                overwrite,
                state_dir,
            } => {
                commands::restore::run(state_dir, &snapshot, &to, path.as_deref(), overwrite).await
            }
            Command::Run {
                state_dir,
                sync_every,
            } => commands::run::run(state_dir, sync_every).await,
            Command::Inventory { json } => commands::inventory::run(json),
            Command::Reflectors {
                candidates,
                state_dir,
                json,
            } => commands::reflectors::run(state_dir, &candidates, json).await,
        }
    });
    // A sync or restore abandoned on SIGTERM may still run on a blocking thread: it commits
    // nothing more once its task is gone, so do not wait for it.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("morgana-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
