//! `morgana policy`: list, show, set (create or new version), assign, and the factory rules.
//! Works beside a running `serve`: agents pick a change up at their next sync.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use morgana_core::policy::FACTORY_UNPROTECTED;
use serde_json::json;

use crate::catalog::{Catalog, SqliteCatalog};
use crate::config::{DEFAULT_DATA_DIR, DataDir};
use crate::policy::{self, PolicyVersion, format_duration};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List the policies in force, with their versions and how many devices follow each.
    List {
        #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print a policy as a file `policy set` reads back, with its saved versions.
    Show {
        name: String,
        /// An older version (version numbers are appliance-wide).
        #[arg(long, value_name = "N")]
        version: Option<u64>,
        #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Create a policy, or save a new version of it, from a TOML file; a bad rule or value
    /// refuses the whole file and changes nothing.
    Set {
        name: String,
        #[arg(long, value_name = "POLICY.toml")]
        file: PathBuf,
        #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// What a new version from a TOML file would change on devices, judged on each one's
    /// newest snapshot: files dropped from protection, files moving in or out of the user
    /// area. Saves nothing.
    DryRun {
        name: String,
        #[arg(long, value_name = "POLICY.toml")]
        file: PathBuf,
        /// Devices to judge (id or hostname); default: those following the policy (at most 50).
        #[arg(long = "device", value_name = "DEVICE")]
        devices: Vec<String>,
        #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Make devices (by id or hostname) follow a policy.
    Assign {
        name: String,
        #[arg(required = true, value_name = "DEVICE")]
        devices: Vec<String>,
        #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// Print the factory rules: never uploaded, part of every policy's unprotected area.
    Factory,
}

async fn open(data_dir: &Path) -> anyhow::Result<SqliteCatalog> {
    let data = DataDir::new(data_dir);
    data.require_initialised()?;
    Ok(SqliteCatalog::open(&data.catalog(), false).await?)
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Factory => {
            for rule in FACTORY_UNPROTECTED {
                println!("{rule}");
            }
            Ok(())
        }
        Command::List { data_dir, json } => {
            let catalog = open(&data_dir).await?;
            let result = catalog.policies().await;
            catalog.close().await;
            let policies = result.context("cannot list the policies")?;
            if json {
                let list: Vec<_> = policies
                    .iter()
                    .map(|(p, devices)| {
                        let mut v = policy_json(p);
                        v["devices"] = json!(devices);
                        v
                    })
                    .collect();
                println!("{}", serde_json::to_string(&list)?);
                return Ok(());
            }
            println!(
                "{:<20} {:>7} {:>7} {:>8} {:>8}  retention (h/d/w/m)",
                "NAME", "VERSION", "DEVICES", "SYNC", "ALERT"
            );
            for (p, devices) in &policies {
                let r = &p.spec.retention;
                println!(
                    "{:<20} {:>7} {:>7} {:>8} {:>8}  {}/{}/{}/{}",
                    p.name,
                    p.version,
                    devices,
                    format_duration(u64::from(p.spec.sync_interval_secs)),
                    format_duration(p.spec.alert_after_secs),
                    r.hourly,
                    r.daily,
                    r.weekly,
                    r.monthly
                );
            }
            Ok(())
        }
        Command::Show {
            name,
            version,
            data_dir,
            json,
        } => {
            let catalog = open(&data_dir).await?;
            let result = async {
                let p = catalog.policy(&name, version).await?;
                let history = catalog.policy_history(&name).await?;
                Ok::<_, crate::catalog::CatalogError>((p, history))
            }
            .await;
            catalog.close().await;
            let (p, history) = result.context("cannot read the policy")?;
            let versions: Vec<u64> = history.iter().map(|v| v.version).collect();
            let Some(p) = p else {
                match version {
                    Some(v) if !versions.is_empty() => {
                        bail!("policy {name} has no version {v}; its versions are {versions:?}")
                    }
                    _ => bail!("there is no policy {name:?}: list them with `morgana policy list`"),
                }
            };
            if json {
                let mut v = policy_json(&p);
                v["versions"] = json!(
                    history
                        .iter()
                        .map(|h| json!({"version": h.version, "created": h.created, "actor": h.actor}))
                        .collect::<Vec<_>>()
                );
                println!("{}", serde_json::to_string(&v)?);
                return Ok(());
            }
            println!(
                "# policy {}, version {} (saved {} by {}); versions: {}",
                p.name,
                p.version,
                p.created,
                p.actor,
                versions
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!(
                "# the factory rules are unprotected as well, always: {}",
                FACTORY_UNPROTECTED.join(" ")
            );
            print!("{}", policy::to_toml(&p.spec));
            Ok(())
        }
        Command::Set {
            name,
            file,
            data_dir,
        } => {
            policy::check_name(&name)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read the policy file {}", file.display()))?;
            let spec = policy::parse_toml(&text)
                .with_context(|| format!("policy file {} refused", file.display()))?;
            let catalog = open(&data_dir).await?;
            let result = policy::save(&catalog, &name, &spec, "cli").await;
            catalog.close().await;
            println!("{}", result.context("cannot save the policy")?.1);
            Ok(())
        }
        Command::DryRun {
            name,
            file,
            devices,
            data_dir,
            json,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read the policy file {}", file.display()))?;
            let new = policy::parse_toml(&text)
                .with_context(|| format!("policy file {} refused", file.display()))?;
            let catalog = open(&data_dir).await?;
            let result = policy::dry_run_devices(&catalog, &name, &new, &devices).await;
            catalog.close().await;
            let runs = result.context("the dry run failed")?;
            if json {
                println!("{}", serde_json::to_string(&runs)?);
                return Ok(());
            }
            println!(
                "{:<24} {:>9} {:>12} {:>14} {:>14}",
                "DEVICE", "DROPPED", "BYTES", "TO USER AREA", "FROM USER AREA"
            );
            for r in &runs {
                println!(
                    "{:<24} {:>9} {:>12} {:>14} {:>14}{}{}",
                    format!("{} ({})", r.hostname, r.device_id),
                    r.dropped.files,
                    r.dropped.bytes,
                    r.into_user_area.files,
                    r.out_of_user_area.files,
                    if r.snapshot.is_none() {
                        "  no snapshot yet"
                    } else {
                        ""
                    },
                    if r.capped {
                        "  (stopped early: at least these)"
                    } else {
                        ""
                    },
                );
            }
            if let Some(r) = runs.first().filter(|r| !r.uploaded_again.is_empty()) {
                println!(
                    "uploaded again from the next sync on (not in any snapshot, so not counted): {}",
                    r.uploaded_again.join(" ")
                );
            }
            Ok(())
        }
        Command::Assign {
            name,
            devices,
            data_dir,
        } => {
            let catalog = open(&data_dir).await?;
            let result = policy::assign(&catalog, &name, &devices, "cli").await;
            catalog.close().await;
            for line in result? {
                println!("{line}");
            }
            Ok(())
        }
    }
}

fn policy_json(p: &PolicyVersion) -> serde_json::Value {
    json!({
        "name": p.name,
        "version": p.version,
        "created": p.created,
        "actor": p.actor,
        "unprotected": p.spec.unprotected,
        "factory_unprotected": FACTORY_UNPROTECTED,
        "user_area": p.spec.user_area,
        "sync_interval_secs": p.spec.sync_interval_secs,
        "alert_after_secs": p.spec.alert_after_secs,
        "retention": p.spec.retention,
    })
}
