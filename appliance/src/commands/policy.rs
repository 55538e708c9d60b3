//! `morgana policy`: list, show, set (create or new version), assign, and the factory rules.
//! Works beside a running `serve`: agents pick a change up at their next sync.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use morgana_core::policy::FACTORY_UNPROTECTED;
use serde_json::json;

use crate::catalog::{Catalog, SqliteCatalog};
use crate::config::{DEFAULT_DATA_DIR, DataDir};
use crate::events::{self, NewEvent, Severity};
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
            let result = async {
                let before = catalog.policy(&name, None).await?;
                let saved = catalog
                    .save_policy(
                        &name,
                        &spec,
                        &crate::clock::rfc3339_ms(crate::clock::now_ms()),
                        "cli",
                    )
                    .await?;
                let message = match &before {
                    Some(b) => format!(
                        "policy {name} changed: version {} replaces version {}",
                        saved.version, b.version
                    ),
                    None => format!("policy {name} created as version {}", saved.version),
                };
                events::record(
                    &catalog,
                    NewEvent::system("policy.saved", Severity::Info, message.clone()).by("cli"),
                )
                .await;
                Ok::<_, crate::catalog::CatalogError>(message)
            }
            .await;
            catalog.close().await;
            println!("{}", result.context("cannot save the policy")?);
            Ok(())
        }
        Command::Assign {
            name,
            devices,
            data_dir,
        } => {
            let catalog = open(&data_dir).await?;
            let result = assign(&catalog, &name, &devices).await;
            catalog.close().await;
            for line in result? {
                println!("{line}");
            }
            Ok(())
        }
    }
}

async fn assign(
    catalog: &SqliteCatalog,
    name: &str,
    wanted: &[String],
) -> anyhow::Result<Vec<String>> {
    let mut devices = Vec::with_capacity(wanted.len());
    for w in wanted {
        let found = catalog
            .find_devices(w)
            .await
            .context("cannot look up devices")?;
        match found.as_slice() {
            [] => bail!(
                "there is no device {w:?} (by id or hostname); nothing was changed. Enrolled \
                 devices are listed by `morgana events --kind device.enrolled`"
            ),
            [d] => devices.push(d.clone()),
            several => bail!(
                "{w:?} names {} devices ({}); give their ids instead; nothing was changed",
                several.len(),
                several
                    .iter()
                    .map(|d| d.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    let before = catalog
        .assign_policy(name, &ids)
        .await
        .context("cannot assign the policy")?;
    let mut lines = Vec::new();
    for (d, old) in devices.iter().zip(before) {
        let message = format!(
            "device {} ({}) now follows policy {name} (was {old})",
            d.hostname, d.id
        );
        events::record(
            catalog,
            NewEvent::system("policy.assigned", Severity::Info, message.clone())
                .for_device(&d.id)
                .by("cli"),
        )
        .await;
        lines.push(message);
    }
    Ok(lines)
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
