//! `morgana reference` and `morgana layer`: reference machines and the layers captured from
//! them.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use morgana_core::control::JobKind;
use morgana_core::plugin::types::LayerKind;
use morgana_core::tree::{Content, Kind};

use crate::catalog::{Catalog, Device, LayerRecord, SqliteCatalog};
use crate::config::{DEFAULT_DATA_DIR, DataDir};
use crate::hooks::Hooks;
use crate::layers::{self, Env, Request};
use crate::store::{PackStore, load_tree};

#[derive(Debug, clap::Args)]
pub struct DirArgs {
    #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

/// Taking the snapshot to capture now, rather than using one the machine already has.
#[derive(Debug, clap::Args)]
pub struct FreshArgs {
    /// Take a fresh snapshot of the reference machine first (a sync job its agent runs;
    /// `morgana-agent run` must be running there) and capture from it.
    #[arg(long)]
    pub fresh: bool,
    /// How long --fresh waits for the agent to take the snapshot.
    #[arg(long, value_name = "DURATION", default_value = "10m", requires = "fresh",
          value_parser = crate::commands::enroll_token::parse_duration)]
    pub fresh_timeout: std::time::Duration,
}

#[derive(Debug, clap::Subcommand)]
pub enum ReferenceCommand {
    /// Mark an enrolled device as a reference machine: layers are captured from it.
    Mark {
        device: String,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Make a reference machine an ordinary device again (its layers stay).
    Unmark {
        device: String,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// List the reference machines.
    List {
        #[command(flatten)]
        dir: DirArgs,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum LayerCommand {
    /// Capture a base layer from a reference machine's snapshot.
    CaptureBase {
        /// The layer's name; capturing again under it makes the next version.
        name: String,
        /// The reference machine.
        #[arg(long)]
        device: String,
        /// Its snapshot to capture (default: its newest).
        #[arg(long, conflicts_with = "fresh")]
        snapshot: Option<String>,
        #[command(flatten)]
        fresh: FreshArgs,
        #[arg(long, default_value = "")]
        notes: String,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Capture an app layer: what changed on a reference machine between two snapshots.
    CaptureApp {
        name: String,
        #[arg(long)]
        device: String,
        /// The snapshot before installing the applications.
        #[arg(long)]
        before: String,
        /// The snapshot after installing them (default: the device's newest).
        #[arg(long, conflicts_with = "fresh")]
        after: Option<String>,
        #[command(flatten)]
        fresh: FreshArgs,
        #[arg(long, default_value = "")]
        notes: String,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// List every version of every layer.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Give devices a base layer and ordered app layers: prints the dry run, then queues an
    /// apply job per device (unless --dry-run).
    Assign {
        /// A device id or hostname; repeat for more.
        #[arg(long = "device")]
        devices: Vec<String>,
        /// A saved group (`morgana group set`); repeat for more.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// NAME or NAME:VERSION (default: the newest version).
        #[arg(long)]
        base: String,
        /// NAME or NAME:VERSION, in order: a later layer wins. Repeat for more.
        #[arg(long = "app")]
        apps: Vec<String>,
        /// An absolute path the layers never replace or remove. Repeat for more.
        #[arg(long = "do-not-override")]
        do_not_override: Vec<String>,
        /// Only report what applying would do; record and queue nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// The layers assigned to a device and the ones its last apply put there.
    Status {
        #[arg(long)]
        device: String,
        /// Also what the newest apply job did, file by file: added, replaced, removed,
        /// kept (and why) or failed (and the error).
        #[arg(long)]
        files: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Return a device to the system state before its last layer apply (user data written
    /// since stays).
    Rollback {
        #[arg(long)]
        device: String,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Show one layer version (default: the newest), optionally with every path in it.
    Show {
        name: String,
        #[arg(long)]
        version: Option<u32>,
        /// List the layer's files (and an app layer's removed paths).
        #[arg(long)]
        files: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DirArgs,
    },
}

pub(crate) async fn open(dir: &DirArgs) -> anyhow::Result<(DataDir, Arc<dyn Catalog>)> {
    let data = DataDir::new(&dir.data_dir);
    data.require_initialised()?;
    let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open(&data.catalog(), false).await?);
    Ok((data, catalog))
}

pub async fn reference(cmd: ReferenceCommand) -> anyhow::Result<()> {
    let (dir, device, on) = match &cmd {
        ReferenceCommand::Mark { device, dir } => (dir, Some(device), true),
        ReferenceCommand::Unmark { device, dir } => (dir, Some(device), false),
        ReferenceCommand::List { dir } => (dir, None, false),
    };
    let (_, catalog) = open(dir).await?;
    let Some(device) = device else {
        for d in catalog.reference_devices().await? {
            println!("{}  {}", d.id, d.hostname);
        }
        catalog.close().await;
        return Ok(());
    };
    let result = layers::set_reference(catalog.as_ref(), device, on, "cli").await;
    catalog.close().await;
    result?;
    println!(
        "{} {device} as a reference machine",
        if on { "marked" } else { "unmarked" }
    );
    Ok(())
}

pub async fn layer(cmd: LayerCommand) -> anyhow::Result<()> {
    match cmd {
        LayerCommand::CaptureBase {
            name,
            device,
            snapshot,
            fresh,
            notes,
            dir,
        } => {
            let (data, catalog) = open(&dir).await?;
            let device = layers::reference_machine(catalog.as_ref(), &device).await?;
            let snapshot = if fresh.fresh {
                Some(fresh_snapshot(catalog.as_ref(), &device, &fresh).await?)
            } else {
                snapshot
            };
            let snapshot =
                layers::device_snapshot(catalog.as_ref(), &device, snapshot.as_deref()).await?;
            let (store, hooks) = parts(&data, &catalog)?;
            let env = Env {
                catalog: &catalog,
                store: &store,
                hooks: &hooks,
            };
            let req = Request {
                name: layers::check_name(&name)?,
                notes: &notes,
                actor: "cli",
                device: &device,
            };
            let result = layers::capture_base(&env, &req, &snapshot).await;
            catalog.close().await;
            print_captured(&result.context("capturing the base layer failed")?);
        }
        LayerCommand::CaptureApp {
            name,
            device,
            before,
            after,
            fresh,
            notes,
            dir,
        } => {
            let (data, catalog) = open(&dir).await?;
            let device = layers::reference_machine(catalog.as_ref(), &device).await?;
            let before = layers::device_snapshot(catalog.as_ref(), &device, Some(&before)).await?;
            let after = if fresh.fresh {
                Some(fresh_snapshot(catalog.as_ref(), &device, &fresh).await?)
            } else {
                after
            };
            let after =
                layers::device_snapshot(catalog.as_ref(), &device, after.as_deref()).await?;
            let (store, hooks) = parts(&data, &catalog)?;
            let env = Env {
                catalog: &catalog,
                store: &store,
                hooks: &hooks,
            };
            let req = Request {
                name: layers::check_name(&name)?,
                notes: &notes,
                actor: "cli",
                device: &device,
            };
            let result = layers::capture_app(&env, &req, &before, &after).await;
            catalog.close().await;
            print_captured(&result.context("capturing the app layer failed")?);
        }
        LayerCommand::Assign {
            devices,
            groups,
            base,
            apps,
            do_not_override,
            dry_run,
            json,
            dir,
        } => {
            let (data, catalog) = open(&dir).await?;
            let hooks = Hooks::new(catalog.clone(), data);
            let req = AssignArgs {
                devices: &devices,
                groups: &groups,
                base: &base,
                apps: &apps,
                do_not_override: &do_not_override,
                dry_run,
                json,
            };
            let result = assign(catalog.as_ref(), &hooks, &req).await;
            catalog.close().await;
            result?;
        }
        LayerCommand::Status {
            device,
            files,
            json,
            dir,
        } => {
            let (_, catalog) = open(&dir).await?;
            let result = status(catalog.as_ref(), &device, files, json).await;
            catalog.close().await;
            result?;
        }
        LayerCommand::Rollback { device, dir } => {
            let (_, catalog) = open(&dir).await?;
            let result = rollback(catalog.as_ref(), &device).await;
            catalog.close().await;
            result?;
        }
        LayerCommand::List { json, dir } => {
            let (_, catalog) = open(&dir).await?;
            let all = catalog.layers().await?;
            catalog.close().await;
            if json {
                let list: Vec<_> = all.iter().map(layer_json).collect();
                println!("{}", serde_json::to_string(&list)?);
            } else if all.is_empty() {
                eprintln!(
                    "no layers yet: mark a reference machine with `morgana reference mark`, then \
                     `morgana layer capture-base`"
                );
            } else {
                for r in &all {
                    let l = &r.layer;
                    println!(
                        "{:<24} v{:<3} {:<4}  {:>8} files  {:>14} bytes  from {} snapshot {}  {}",
                        l.name,
                        r.version,
                        kind_name(l.kind),
                        l.files,
                        l.bytes,
                        l.source_device,
                        l.snapshot,
                        l.created
                    );
                }
            }
        }
        LayerCommand::Show {
            name,
            version,
            files,
            json,
            dir,
        } => {
            let (_, catalog) = open(&dir).await?;
            let Some(record) = catalog.layer(&name, version).await? else {
                catalog.close().await;
                bail!(
                    "there is no layer {name}{}: list them with `morgana layer list`",
                    version.map(|v| format!(" v{v}")).unwrap_or_default()
                );
            };
            let paths = if files {
                Some(list_files(catalog.as_ref(), record.layer.root).await?)
            } else {
                None
            };
            catalog.close().await;
            let mut value = layer_json(&record);
            if let Some(paths) = &paths {
                value["paths"] = serde_json::json!(paths);
                value["deletions"] = serde_json::json!(
                    record
                        .layer
                        .deletions
                        .iter()
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .collect::<Vec<_>>()
                );
            }
            if json {
                println!("{value}");
            } else {
                println!("{}", serde_json::to_string_pretty(&value)?);
            }
        }
    }
    Ok(())
}

fn parts(data: &DataDir, catalog: &Arc<dyn Catalog>) -> anyhow::Result<(Arc<PackStore>, Hooks)> {
    let store = Arc::new(PackStore::open(&[data.default_volume()])?);
    Ok((store, Hooks::new(catalog.clone(), data.clone())))
}

/// Queues a sync job on the reference machine, waits for its agent to run it, and names
/// the snapshot it took. An agent that does not answer is an error saying so; its job
/// stays queued (it runs when the agent comes back) and nothing is captured.
async fn fresh_snapshot(
    catalog: &dyn Catalog,
    device: &Device,
    fresh: &FreshArgs,
) -> anyhow::Result<String> {
    let had: Vec<String> = catalog
        .device_snapshots(&device.id)
        .await?
        .into_iter()
        .map(|s| s.id)
        .collect();
    let job = crate::jobs::queue(catalog, &device.id, JobKind::Sync, "cli")
        .await
        .context("cannot queue the sync job for a fresh snapshot")?;
    eprintln!(
        "waiting for {} to take a fresh snapshot (job {})",
        device.hostname, job.id
    );
    let done = crate::jobs::wait_finished(
        catalog,
        &job.id,
        fresh.fresh_timeout,
        std::time::Duration::from_millis(200),
    )
    .await?;
    let Some(done) = done else {
        let status = catalog.device_status(&device.id).await?;
        let seen = status
            .and_then(|s| s.last_seen_ms)
            .map_or("never".to_owned(), crate::clock::rfc3339_ms);
        let state = catalog
            .job(&job.id)
            .await?
            .map_or("queued", |j| crate::jobs::state_name(j.state));
        bail!(
            "the reference machine {} ({}) did not take the fresh snapshot within {}s: sync job \
             {} is still {state}, and its agent was last seen {seen}; check that `morgana-agent \
             run` is running there, or wait longer with --fresh-timeout; nothing was captured",
            device.hostname,
            device.id,
            fresh.fresh_timeout.as_secs(),
            job.id
        );
    };
    if done.state != morgana_core::control::JobState::Succeeded {
        bail!(
            "the fresh snapshot of {} failed (job {}): {}; nothing was captured",
            device.hostname,
            job.id,
            done.message
        );
    }
    // The sync job's snapshot: the device's newest, and one it did not have before.
    let newest = catalog.device_snapshots(&device.id).await?.pop();
    match newest {
        Some(s) if !had.contains(&s.id) => {
            eprintln!("fresh snapshot {} taken", s.id);
            Ok(s.id)
        }
        _ => bail!(
            "sync job {} succeeded but no snapshot of {} newer than the job is recorded; run \
             `morgana check` and capture with --snapshot",
            job.id,
            device.id
        ),
    }
}

fn kind_name(kind: LayerKind) -> &'static str {
    match kind {
        LayerKind::Base => "base",
        LayerKind::App => "app",
    }
}

fn layer_json(r: &LayerRecord) -> serde_json::Value {
    let l = &r.layer;
    serde_json::json!({
        "name": l.name,
        "version": r.version,
        "kind": kind_name(l.kind),
        "notes": l.notes,
        "source_device": l.source_device,
        "snapshot": l.snapshot,
        "before_snapshot": l.before_snapshot,
        "root": l.root.to_hex(),
        "files": l.files,
        "bytes": l.bytes,
        "removed": l.deletions.len(),
        "created": l.created,
        "created_by": l.created_by,
    })
}

fn print_captured(r: &LayerRecord) {
    let l = &r.layer;
    println!(
        "captured {} layer {} v{}: {} files, {} bytes{}",
        kind_name(l.kind),
        l.name,
        r.version,
        l.files,
        l.bytes,
        if l.kind == LayerKind::App {
            format!(", {} removed paths", l.deletions.len())
        } else {
            String::new()
        }
    );
}

/// Every path in the tree `root` (a layer's, a driver set's), sorted, directories with a
/// trailing `/`.
pub async fn list_files(
    catalog: &dyn Catalog,
    root: morgana_core::Id,
) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![(root, Vec::<u8>::new())];
    while let Some((id, dir)) = stack.pop() {
        let tree = load_tree(catalog, id).await?;
        for e in tree.entries.iter().rev() {
            let mut path = dir.clone();
            path.push(b'/');
            path.extend_from_slice(&e.name);
            match (&e.content, e.kind) {
                (Content::Tree(sub), Some(Kind::Dir)) => {
                    out.push(format!("{}/", String::from_utf8_lossy(&path)));
                    stack.push((*sub, path));
                }
                _ => out.push(String::from_utf8_lossy(&path).into_owned()),
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A device id or hostname as exactly one device id.
pub(crate) async fn resolve_device(catalog: &dyn Catalog, d: &str) -> anyhow::Result<String> {
    let found = catalog.find_devices(d).await?;
    match found.as_slice() {
        [one] => Ok(one.id.clone()),
        [] => bail!("there is no device {d}: list them with `morgana device list`"),
        many => bail!(
            "{d} names {} devices ({}): pass a device id instead",
            many.len(),
            many.iter()
                .map(|d| d.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

struct AssignArgs<'a> {
    devices: &'a [String],
    groups: &'a [String],
    base: &'a str,
    apps: &'a [String],
    do_not_override: &'a [String],
    dry_run: bool,
    json: bool,
}

async fn assign(catalog: &dyn Catalog, hooks: &Hooks, req: &AssignArgs<'_>) -> anyhow::Result<()> {
    use crate::assign;
    let ids = assign::targets(catalog, req.devices, req.groups).await?;
    let assignment = assign::assignment(catalog, req.base, req.apps, req.do_not_override).await?;
    let (plans, reports): (Vec<_>, Vec<_>) = assign::dry_runs(catalog, &ids, &assignment)
        .await?
        .into_iter()
        .unzip();
    let mut jobs = Vec::new();
    if !req.dry_run {
        jobs = assign::apply(catalog, hooks, &ids, &assignment, plans, "cli")
            .await?
            .into_iter()
            .map(|j| j.id)
            .collect();
    }
    if req.json {
        let list: Vec<_> = reports
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut v = serde_json::to_value(r).expect("dry runs serialize");
                v["job"] = serde_json::json!(jobs.get(i));
                v
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"assignment": assignment, "devices": list, "dry_run": req.dry_run})
        );
        return Ok(());
    }
    println!("{}", assign::describe(&assignment));
    println!(
        "{:<18} {:>7} {:>7} {:>7} {:>6} {:>14} {:>9}  job",
        "device", "add", "replace", "remove", "kept", "download", "conflicts"
    );
    for (i, r) in reports.iter().enumerate() {
        println!(
            "{:<18} {:>7} {:>7} {:>7} {:>6} {:>14} {:>9}  {}",
            r.device,
            r.add.len(),
            r.replace.len(),
            r.remove.len(),
            r.kept.len(),
            r.download_bytes,
            r.conflicts.len(),
            jobs.get(i).map_or("-", String::as_str)
        );
    }
    for r in &reports {
        for c in &r.conflicts {
            println!("  {} {:<18} {}: {}", r.device, c.kind, c.path, c.detail);
        }
        for k in &r.kept {
            println!("  {} do-not-override    {k}: kept as it is", r.device);
        }
    }
    if req.dry_run {
        println!("dry run: nothing recorded or queued");
    }
    Ok(())
}

async fn rollback(catalog: &dyn Catalog, device: &str) -> anyhow::Result<()> {
    let id = resolve_device(catalog, device).await?;
    let job = crate::assign::rollback(catalog, &id, "cli").await?;
    println!("{}", job.id);
    Ok(())
}

async fn status(
    catalog: &dyn Catalog,
    device: &str,
    files: bool,
    json: bool,
) -> anyhow::Result<()> {
    let id = resolve_device(catalog, device).await?;
    let assigned = catalog.layer_assignment(&id).await?;
    let applied = catalog.applied_layers(&id).await?;
    let layers = |a: &morgana_core::control::ApplyJob| {
        let mut v = vec![format!("{}:{}", a.base.name, a.base.version)];
        v.extend(a.apps.iter().map(|l| format!("{}:{}", l.name, l.version)));
        v
    };
    let mut value = serde_json::json!({
        "device": id,
        "assigned": assigned,
        "applied": applied.as_ref().map(|a| serde_json::json!({
            "layers": layers(&a.applied),
            "job": a.job_id,
            "at": a.applied_at,
            "previous": a.previous.as_ref().map(layers),
        })),
    });
    let newest = if files {
        newest_apply(catalog, &id).await?
    } else {
        None
    };
    if files {
        value["files"] = match &newest {
            Some((job, results)) => serde_json::json!({
                "job": job.id,
                "state": crate::jobs::state_name(job.state),
                "results": results,
            }),
            None => serde_json::Value::Null,
        };
    }
    if json {
        println!("{value}");
        return Ok(());
    }
    if files {
        value.as_object_mut().map(|o| o.remove("files"));
    }
    println!("{}", serde_json::to_string_pretty(&value)?);
    if !files {
        return Ok(());
    }
    let Some((job, results)) = newest else {
        println!("no apply job has run on {id} yet");
        return Ok(());
    };
    let state = crate::jobs::state_name(job.state);
    let Some(r) = results else {
        println!(
            "apply job {} is {state}; its agent has reported no per-file results{}",
            job.id,
            if crate::jobs::is_finished(job.state) {
                " (an agent older than this appliance)"
            } else {
                " yet"
            }
        );
        return Ok(());
    };
    println!(
        "apply job {} ({state}): {} added, {} replaced, {} removed, {} kept, {} unchanged, {} \
         failed; {} bytes fetched, {} bytes of chunks the device already held, {} bytes \
         written",
        job.id,
        r.added,
        r.replaced,
        r.removed,
        r.kept,
        r.unchanged,
        r.failed,
        r.fetched_bytes,
        r.reused_bytes,
        r.written_bytes
    );
    for f in &r.files {
        if f.detail.is_empty() {
            println!("{:<9} {}", f.outcome.name(), f.path);
        } else {
            println!("{:<9} {}  ({})", f.outcome.name(), f.path, f.detail);
        }
    }
    if r.unlisted > 0 {
        println!(
            "… and {} more paths, counted above but not listed",
            r.unlisted
        );
    }
    Ok(())
}

/// The device's newest apply job and its per-file results, if any.
async fn newest_apply(
    catalog: &dyn Catalog,
    device_id: &str,
) -> anyhow::Result<
    Option<(
        crate::catalog::JobRecord,
        Option<morgana_core::control::FileResults>,
    )>,
> {
    let Some(job) = catalog
        .jobs(Some(device_id), 1000)
        .await?
        .into_iter()
        .find(|j| matches!(j.kind, JobKind::ApplyLayers(_)))
    else {
        return Ok(None);
    };
    let results = catalog.apply_results(&job.id).await?;
    Ok(Some((job, results)))
}
