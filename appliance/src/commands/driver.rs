//! `morgana driver …`: the driver library (sets and profiles), the preview of who gets
//! what, and delivery on demand. The work is in [`crate::drivers`].

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};

use crate::catalog::{Catalog, DriverSetRecord, SqliteCatalog};
use crate::config::{DEFAULT_DATA_DIR, DataDir};
use crate::drivers::{self, DeviceDrivers};
use crate::hooks::Hooks;
use crate::store::PackStore;

#[derive(Debug, clap::Args)]
pub struct DirArgs {
    #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
pub enum DriverCommand {
    /// Store a folder of drivers as the next version of driver set NAME.
    Import {
        name: String,
        /// The folder; its contents land in `<path>/NAME` on devices.
        dir: PathBuf,
        #[arg(long, default_value = "")]
        notes: String,
        #[command(flatten)]
        dir_args: DirArgs,
    },
    /// List every version of every driver set.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Show one driver set version (default: the newest), optionally with its files.
    Show {
        name: String,
        #[arg(long)]
        version: Option<u32>,
        #[arg(long)]
        files: bool,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Driver profiles: which devices get which driver sets.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Per device: which profiles match and why, and the driver sets it would get.
    Preview {
        /// Only this profile.
        #[arg(long)]
        profile: Option<String>,
        /// Only this device (id or hostname).
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Queue jobs that write a device's matching driver sets onto it now.
    Deliver {
        /// The device (id or hostname).
        #[arg(long)]
        device: String,
        /// Parent folder on the device for every set (default: each profile's path, or
        /// /opt/morgana/drivers); each set goes to PATH/SET.
        #[arg(long)]
        path: Option<String>,
        #[command(flatten)]
        dir: DirArgs,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum ProfileCommand {
    /// Create or replace profile NAME from a TOML file (match rules, sets, path).
    Set {
        name: String,
        #[arg(long, value_name = "FILE.toml")]
        rules: PathBuf,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// List the profiles.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Print a profile as a TOML file `profile set` reads back.
    Show {
        name: String,
        #[command(flatten)]
        dir: DirArgs,
    },
}

async fn open(dir: &DirArgs) -> anyhow::Result<(DataDir, Arc<dyn Catalog>)> {
    let data = DataDir::new(&dir.data_dir);
    data.require_initialised()?;
    let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open(&data.catalog(), false).await?);
    Ok((data, catalog))
}

fn set_json(r: &DriverSetRecord) -> serde_json::Value {
    serde_json::json!({
        "name": r.set.name,
        "version": r.version,
        "notes": r.set.notes,
        "root": r.set.root.to_hex(),
        "files": r.set.files,
        "bytes": r.set.bytes,
        "created": r.set.created,
        "created_by": r.set.created_by,
    })
}

pub async fn run(cmd: DriverCommand) -> anyhow::Result<()> {
    match cmd {
        DriverCommand::Import {
            name,
            dir,
            notes,
            dir_args,
        } => {
            let (data, catalog) = open(&dir_args).await?;
            let store = Arc::new(PackStore::open(&[data.default_volume()])?);
            let result = drivers::import(&catalog, &store, &name, &notes, "cli", &dir).await;
            catalog.close().await;
            let r = result.with_context(|| format!("importing {} failed", dir.display()))?;
            println!(
                "imported driver set {} v{}: {} files, {} bytes",
                r.set.name, r.version, r.set.files, r.set.bytes
            );
        }
        DriverCommand::List { json, dir } => {
            let (_, catalog) = open(&dir).await?;
            let all = catalog.driver_sets().await?;
            catalog.close().await;
            if json {
                let list: Vec<_> = all.iter().map(set_json).collect();
                println!("{}", serde_json::to_string(&list)?);
            } else if all.is_empty() {
                eprintln!("no driver sets yet: import one with `morgana driver import NAME DIR`");
            } else {
                for r in &all {
                    println!(
                        "{:<24} v{:<3} {:>8} files  {:>14} bytes  {}  {}",
                        r.set.name, r.version, r.set.files, r.set.bytes, r.set.created, r.set.notes
                    );
                }
            }
        }
        DriverCommand::Show {
            name,
            version,
            files,
            dir,
        } => {
            let (_, catalog) = open(&dir).await?;
            let Some(record) = catalog.driver_set(&name, version).await? else {
                catalog.close().await;
                bail!(
                    "there is no driver set {name}{}: list them with `morgana driver list`",
                    version.map(|v| format!(" v{v}")).unwrap_or_default()
                );
            };
            let mut value = set_json(&record);
            if files {
                let paths = super::layer::list_files(catalog.as_ref(), record.set.root).await?;
                value["paths"] = serde_json::json!(paths);
            }
            catalog.close().await;
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        DriverCommand::Profile(cmd) => profile(cmd).await?,
        DriverCommand::Preview {
            profile,
            device,
            json,
            dir,
        } => {
            let (data, catalog) = open(&dir).await?;
            let hooks = Hooks::new(catalog.clone(), data.clone());
            let result = preview(
                catalog.as_ref(),
                &hooks,
                profile.as_deref(),
                device.as_deref(),
            )
            .await;
            catalog.close().await;
            let all = result?;
            if json {
                println!("{}", serde_json::to_string(&all)?);
            } else {
                print_preview(&all);
            }
        }
        DriverCommand::Deliver { device, path, dir } => {
            let (data, catalog) = open(&dir).await?;
            let hooks = Hooks::new(catalog.clone(), data.clone());
            let result = async {
                let id = resolve_device(catalog.as_ref(), &device).await?;
                let drivers = drivers::deliveries_for(catalog.as_ref(), &hooks, &id, None).await?;
                anyhow::Ok(
                    drivers::deliver_now(catalog.as_ref(), &drivers, path.as_deref(), "cli")
                        .await?,
                )
            }
            .await;
            catalog.close().await;
            for (d, job) in result? {
                println!(
                    "{}  driver set {} v{} (profile {}) into {}",
                    job.id, d.set, d.version, d.profile, d.target
                );
            }
        }
    }
    Ok(())
}

async fn resolve_device(catalog: &dyn Catalog, id_or_hostname: &str) -> anyhow::Result<String> {
    let found = catalog.find_devices(id_or_hostname).await?;
    match found.as_slice() {
        [one] => Ok(one.id.clone()),
        [] => bail!("there is no device {id_or_hostname:?}: list them with `morgana device list`"),
        _ => bail!(
            "{id_or_hostname:?} names {} devices: use the device id",
            found.len()
        ),
    }
}

async fn preview(
    catalog: &dyn Catalog,
    hooks: &Hooks,
    profile: Option<&str>,
    device: Option<&str>,
) -> anyhow::Result<Vec<DeviceDrivers>> {
    if let Some(p) = profile
        && !catalog.driver_profiles().await?.iter().any(|r| r.name == p)
    {
        bail!("there is no driver profile {p}: list them with `morgana driver profile list`");
    }
    let device = match device {
        Some(d) => Some(resolve_device(catalog, d).await?),
        None => None,
    };
    let profiles: Vec<_> = drivers::profiles(catalog)
        .await?
        .into_iter()
        .filter(|(r, _)| profile.is_none_or(|p| p == r.name))
        .collect();
    Ok(drivers::preview(catalog, hooks, &profiles, device.as_deref()).await?)
}

fn print_preview(all: &[DeviceDrivers]) {
    if all.is_empty() {
        println!("no devices enrolled");
    }
    for d in all {
        println!("{} ({})", d.device, d.hostname);
        if !d.has_inventory {
            println!("  no inventory reported yet: nothing matches");
            continue;
        }
        if d.matched.is_empty() {
            println!("  no profile matches");
        }
        for m in &d.matched {
            println!("  profile {}: {}", m.profile, m.reason);
        }
        for x in &d.deliveries {
            println!("  → {} v{} into {}", x.set, x.version, x.target);
        }
    }
}

async fn profile(cmd: ProfileCommand) -> anyhow::Result<()> {
    match cmd {
        ProfileCommand::Set { name, rules, dir } => {
            let text = std::fs::read_to_string(&rules)
                .with_context(|| format!("cannot read {}: check the path", rules.display()))?;
            let spec = drivers::parse_profile(&rules.display().to_string(), &text)?;
            let (_, catalog) = open(&dir).await?;
            let saved = drivers::save_profile(catalog.as_ref(), &name, &spec, "cli").await;
            catalog.close().await;
            saved?;
            println!("saved driver profile {name}");
        }
        ProfileCommand::List { json, dir } => {
            let (_, catalog) = open(&dir).await?;
            let all = drivers::profiles(catalog.as_ref()).await;
            catalog.close().await;
            let all = all?;
            if json {
                let list: Vec<_> = all
                    .iter()
                    .map(|(r, s)| {
                        serde_json::json!({
                            "name": r.name,
                            "rules": s,
                            "updated": r.updated,
                            "updated_by": r.updated_by,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string(&list)?);
            } else if all.is_empty() {
                eprintln!(
                    "no driver profiles yet: create one with `morgana driver profile set NAME \
                     --rules FILE.toml`"
                );
            } else {
                for (r, s) in &all {
                    println!(
                        "{:<24} sets {:<40} into {}  ({} by {})",
                        r.name,
                        s.sets
                            .iter()
                            .map(|x| match x.version() {
                                Some(v) => format!("{} v{v}", x.name()),
                                None => x.name().to_owned(),
                            })
                            .collect::<Vec<_>>()
                            .join(", "),
                        s.path(),
                        r.updated,
                        r.updated_by
                    );
                }
            }
        }
        ProfileCommand::Show { name, dir } => {
            let (_, catalog) = open(&dir).await?;
            let all = drivers::profiles(catalog.as_ref()).await;
            catalog.close().await;
            let Some((_, spec)) = all?.into_iter().find(|(r, _)| r.name == name) else {
                bail!(
                    "there is no driver profile {name}: list them with `morgana driver profile list`"
                );
            };
            print!("{}", toml::to_string(&spec)?);
        }
    }
    Ok(())
}
