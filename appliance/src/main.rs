//! `morgana`: the Morgana appliance in one binary.

mod alerts;
mod api;
mod assign;
mod auth;
mod catalog;
mod clock;
mod commands;
mod config;
mod drivers;
mod events;
mod gc;
mod hooks;
mod jobs;
mod layers;
mod plugins;
mod policy;
mod random;
mod reflectors;
mod rest;
mod retention;
mod snapshot;
mod store;
mod tls;
mod web;
mod zip;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "morgana",
    version,
    about = "Morgana appliance: centralized desktop image management"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the appliance (agent API over HTTPS); creates the data directory on first start.
    Serve(commands::serve::Args),
    /// Print a new enrolment token for `morgana-agent enroll`.
    EnrollToken(commands::enroll_token::Args),
    /// Verify every stored pack and snapshot; exit 1 if anything is damaged or missing.
    Check(commands::check::Args),
    /// Apply retention and reclaim unreferenced data, while agents keep working.
    Gc(commands::gc::Args),
    /// Show the event and audit log, or verify that nobody tampered with it.
    Events(commands::events::Args),
    /// Pin or unpin a snapshot against retention.
    Snapshot(commands::snapshot::Args),
    /// Mark or unmark reference machines, the devices layers are captured from.
    #[command(subcommand)]
    Reference(commands::layer::ReferenceCommand),
    /// Capture, list and show base and app layers.
    #[command(subcommand)]
    Layer(commands::layer::LayerCommand),
    /// Saved device groups, for assigning layers to many devices at once.
    #[command(subcommand)]
    Group(commands::group::Command),
    /// Driver library: import driver sets, profiles that match hardware, preview, deliver.
    #[command(subcommand)]
    Driver(commands::driver::DriverCommand),
    /// Enrolled devices: status, last seen, inventory.
    #[command(subcommand)]
    Device(commands::device::Command),
    /// Jobs for agents: sync now, restore, revert; list, show, wait.
    #[command(subcommand)]
    Job(commands::job::Command),
    /// Manage WASM plugins: add, list, enable, disable, and test one call.
    #[command(subcommand)]
    Plugin(commands::plugin::Command),
    /// Manage upload policies: what devices protect, how often, how long it is kept.
    #[command(subcommand)]
    Policy(commands::policy::Command),
    /// Run the alert checks (stale devices, full volumes) once.
    #[command(subcommand)]
    Alerts(commands::alerts::Command),
    /// Manage web UI and API accounts: add, list.
    #[command(subcommand)]
    User(commands::user::Command),
    /// Branch reflectors: turn the role on or off for a device, list them.
    #[command(subcommand)]
    Reflector(commands::reflector::Command),
}

/// Exit status for failures (as opposed to `check` finding damage, which is 1).
const EXIT_FAILURE: u8 = 2;

fn main() -> ExitCode {
    morgana_core::memory::keep_freed_buffers();
    // ring is the only crypto provider compiled in; rustls must be told before first use.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => commands::serve::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::EnrollToken(args) => commands::enroll_token::run(args)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Check(args) => commands::check::run(args).await,
            Command::Events(args) => commands::events::run(args).await,
            Command::Gc(args) => commands::gc::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Snapshot(args) => commands::snapshot::run(args)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Reference(cmd) => commands::layer::reference(cmd)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Layer(cmd) => commands::layer::layer(cmd)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Group(cmd) => commands::group::run(cmd).await.map(|()| ExitCode::SUCCESS),
            Command::Plugin(cmd) => commands::plugin::run(cmd).await,
            Command::Driver(cmd) => commands::driver::run(cmd).await.map(|()| ExitCode::SUCCESS),
            Command::Policy(cmd) => commands::policy::run(cmd).await.map(|()| ExitCode::SUCCESS),
            Command::Alerts(cmd) => commands::alerts::run(cmd).await.map(|()| ExitCode::SUCCESS),
            Command::Device(cmd) => commands::device::run(cmd).await.map(|()| ExitCode::SUCCESS),
            Command::Job(cmd) => commands::job::run(cmd).await,
            Command::User(cmd) => commands::user::run(cmd).await.map(|()| ExitCode::SUCCESS),
            Command::Reflector(cmd) => commands::reflector::run(cmd)
                .await
                .map(|()| ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
