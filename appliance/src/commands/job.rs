//! `morgana job …`: queue jobs for agents (sync now, restore, revert) and follow them.
//! Queuing works beside a running `serve`: it finds new jobs within a second and hands
//! them to the device's waiting poll.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use morgana_core::control::{JobKind, JobState};

use crate::catalog::{Catalog, JobRecord, SqliteCatalog};
use crate::commands::enroll_token::parse_duration;
use crate::config::{DEFAULT_DATA_DIR, DataDir};
use crate::hooks::Hooks;
use crate::jobs::state_name;

#[derive(Debug, clap::Args)]
pub struct DirArgs {
    #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Ask a device to take a snapshot now (reason `manual`).
    Sync {
        device: String,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Restore files or folders of a snapshot onto a device, or revert the device to it.
    /// The snapshot may be another device's (restore onto new hardware).
    Restore {
        device: String,
        #[arg(long)]
        snapshot: String,
        /// full: the device becomes the snapshot (its unprotected area aside);
        /// system-only: the same, but the user area stays as it is now.
        #[arg(long, value_parser = ["full", "system-only"])]
        scope: Option<String>,
        /// An absolute path in the snapshot (repeatable); only these are restored.
        #[arg(long = "path", value_name = "P")]
        paths: Vec<String>,
        /// An absolute directory on the device to restore into (default: the original
        /// place). Without --path, the whole snapshot goes there.
        #[arg(long, value_name = "DIR")]
        to: Option<String>,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Jobs, newest first.
    List {
        #[arg(long, value_name = "ID")]
        device: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// One job: state, progress, message.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Wait for a job to finish: exit 0 if it succeeded, 1 if it failed.
    Wait {
        id: String,
        #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        dir: DirArgs,
    },
}

/// How often `job wait` looks at the catalog.
const WAIT_POLL: Duration = Duration::from_millis(200);

pub async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let dir = match &cmd {
        Command::Sync { dir, .. }
        | Command::Restore { dir, .. }
        | Command::List { dir, .. }
        | Command::Show { dir, .. }
        | Command::Wait { dir, .. } => dir,
    };
    let data = DataDir::new(&dir.data_dir);
    data.require_initialised()?;
    let catalog = Arc::new(SqliteCatalog::open(&data.catalog(), false).await?);
    let hooks = Hooks::new(catalog.clone(), data);
    let result = run_with(&catalog, &hooks, cmd).await;
    catalog.close().await;
    result
}

async fn run_with(
    catalog: &SqliteCatalog,
    hooks: &Hooks,
    cmd: Command,
) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Sync { device, .. } => {
            require_device(catalog, &device).await?;
            let job = queue(catalog, &device, JobKind::Sync).await?;
            println!("{}", job.id);
        }
        Command::Restore {
            device,
            snapshot,
            scope,
            paths,
            to,
            ..
        } => {
            require_device(catalog, &device).await?;
            let scope = crate::jobs::restore_scope(scope.as_deref(), paths, to.as_deref())?;
            let kind = crate::jobs::restore_kind(catalog, &snapshot, scope, to).await?;
            let kind = crate::drivers::for_new_hardware(catalog, hooks, &device, kind).await?;
            let job = queue(catalog, &device, kind).await?;
            println!("{}", job.id);
        }
        Command::List {
            device,
            limit,
            json,
            ..
        } => {
            let jobs = catalog
                .jobs(device.as_deref(), limit)
                .await
                .context("cannot list jobs")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else {
                println!(
                    "{:<25}  {:<16}  {:<9}  {:<24}  WHAT",
                    "ID", "DEVICE", "STATE", "CREATED"
                );
                for j in &jobs {
                    println!(
                        "{:<25}  {:<16}  {:<9}  {:<24}  {}",
                        j.id,
                        j.device_id,
                        state_name(j.state),
                        crate::clock::rfc3339_ms(j.created_ms),
                        crate::jobs::describe(&j.kind)
                    );
                }
            }
        }
        Command::Show { id, json, .. } => {
            let job = find(catalog, &id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&job)?);
            } else {
                print_job(&job);
            }
        }
        Command::Wait { id, timeout, .. } => {
            find(catalog, &id).await?;
            let Some(job) = crate::jobs::wait_finished(catalog, &id, timeout, WAIT_POLL).await?
            else {
                let job = find(catalog, &id).await?;
                bail!(
                    "job {id} is still {} after {}s; wait longer with --timeout, or look at \
                     the device (`morgana device show {}`)",
                    state_name(job.state),
                    timeout.as_secs(),
                    job.device_id
                );
            };
            if job.state == JobState::Succeeded {
                println!("job {id} succeeded{}", suffix(&job.message));
                return Ok(ExitCode::SUCCESS);
            }
            println!("job {id} failed: {}", job.message);
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn queue(catalog: &SqliteCatalog, device: &str, kind: JobKind) -> anyhow::Result<JobRecord> {
    crate::jobs::queue(catalog, device, kind, "cli")
        .await
        .context("cannot queue the job")
}

async fn require_device(catalog: &SqliteCatalog, id: &str) -> anyhow::Result<()> {
    match catalog
        .device_status(id)
        .await
        .context("cannot look up the device")?
    {
        None => bail!("there is no device {id:?}: list them with `morgana device list`"),
        Some(d) if d.device.revoked => {
            bail!(
                "device {id} ({}) is revoked: it takes no jobs",
                d.device.hostname
            )
        }
        Some(_) => Ok(()),
    }
}

async fn find(catalog: &SqliteCatalog, id: &str) -> anyhow::Result<JobRecord> {
    catalog
        .job(id)
        .await
        .context("cannot look up the job")?
        .with_context(|| format!("there is no job {id:?}: list them with `morgana job list`"))
}

fn suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

fn print_job(j: &JobRecord) {
    let time = |t: Option<i64>| t.map_or_else(|| "-".into(), crate::clock::rfc3339_ms);
    println!("job       {}", j.id);
    println!("device    {}", j.device_id);
    println!("what      {}", crate::jobs::describe(&j.kind));
    println!("state     {}", state_name(j.state));
    println!("queued    {} by {}", time(Some(j.created_ms)), j.created_by);
    println!("started   {}", time(j.started_ms));
    println!("finished  {}", time(j.finished_ms));
    let p = &j.progress;
    if p.files_total > 0 || p.bytes_total > 0 || p.files_done > 0 {
        println!(
            "progress  {}/{} files, {}/{} bytes",
            p.files_done, p.files_total, p.bytes_done, p.bytes_total
        );
    }
    if !j.message.is_empty() {
        println!("message   {}", j.message);
    }
}
