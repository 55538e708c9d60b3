//! `morgana-agent`: the endpoint side of Morgana.

mod apply;
mod cache;
mod client;
mod commands;
mod delivered;
mod distribution;
mod inventory;
mod jobs;
mod mdns;
mod reflector;
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
        /// Most bytes the branch reflector cache holds when the appliance gives this device
        /// the reflector role (e.g. 512M, 20G).
        #[arg(long, value_name = "SIZE", env = "MORGANA_AGENT_REFLECTOR_CACHE",
              value_parser = parse_size, default_value = "4G")]
        reflector_cache_size: u64,
        /// The address neighbours reach this device's reflector at (default: the one it
        /// reaches the appliance from).
        #[arg(long, value_name = "IP", env = "MORGANA_AGENT_REFLECTOR_ADDRESS")]
        reflector_address: Option<std::net::IpAddr>,
        /// Use mDNS on the local network: advertise the reflector role, browse for
        /// reflectors before downloads. It multicasts on every interface: off by default.
        #[arg(long, env = "MORGANA_AGENT_MDNS", value_parser = clap::builder::BoolishValueParser::new(),
              default_value = "false", num_args = 0..=1, default_missing_value = "true")]
        mdns: bool,
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
        #[arg(
            long,
            required_unless_present = "discover",
            conflicts_with = "discover"
        )]
        candidates: Option<PathBuf>,
        /// Find the candidates as a download does: the appliance's list of live reflectors
        /// (and mDNS with --mdns).
        #[arg(long)]
        discover: bool,
        /// With --discover: also browse the local network over mDNS (multicast on every
        /// interface).
        #[arg(long, requires = "discover")]
        mdns: bool,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// `4G`, `512M`, `100K` or plain bytes (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        Some((i, 'T' | 't')) => (&t[..i], 40),
        _ => (t, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("{s:?} is not a size: give bytes or a number with K, M, G or T"))
}

fn main() -> ExitCode {
    morgana_core::memory::keep_freed_buffers();
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
    // Before the runtime starts its threads: an arena limit set later leaves the arenas of
    // threads that already allocated, so the sync's peak RSS varied from run to run.
    if matches!(cli.command, Command::Sync { .. } | Command::Run { .. }) {
        sync::limit_malloc_caching();
    }
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
                reflector_cache_size,
                reflector_address,
                mdns,
            } => {
                let reflector = reflector::Settings {
                    cache_limit: reflector_cache_size,
                    advertise: reflector_address,
                    mdns,
                };
                commands::run::run(state_dir, sync_every, reflector).await
            }
            Command::Inventory { json } => commands::inventory::run(json),
            Command::Reflectors {
                candidates,
                discover: _,
                mdns,
                state_dir,
                json,
            } => {
                let from = match &candidates {
                    Some(path) => commands::reflectors::Candidates::File(path),
                    None => commands::reflectors::Candidates::Discover { mdns },
                };
                commands::reflectors::run(state_dir, from, json).await
            }
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
