//! `morgana group`: saved device groups, for assigning layers to many devices at once.

use anyhow::bail;

use crate::catalog::Catalog;
use crate::commands::layer::{DirArgs, open, resolve_device};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create or replace a group (device ids or hostnames).
    Set {
        name: String,
        #[arg(required = true)]
        devices: Vec<String>,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// List the groups and their devices.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DirArgs,
    },
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Set { name, devices, dir } => {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                bail!("group name {name:?} is not usable: letters, digits, `-`, `_` or `.`");
            }
            let (_, catalog) = open(&dir).await?;
            let result = set(catalog.as_ref(), &name, &devices).await;
            catalog.close().await;
            let ids = result?;
            println!("group {name}: {}", ids.join(" "));
        }
        Command::List { json, dir } => {
            let (_, catalog) = open(&dir).await?;
            let groups = catalog.groups().await;
            catalog.close().await;
            let groups = groups?;
            if json {
                let list: Vec<_> = groups
                    .iter()
                    .map(|(n, d)| serde_json::json!({"name": n, "devices": d}))
                    .collect();
                println!("{}", serde_json::to_string(&list)?);
            } else {
                for (name, devices) in groups {
                    println!("{name:<24} {}", devices.join(" "));
                }
            }
        }
    }
    Ok(())
}

async fn set(catalog: &dyn Catalog, name: &str, devices: &[String]) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for d in devices {
        let id = resolve_device(catalog, d).await?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    catalog
        .save_group(
            name,
            &ids,
            &crate::clock::rfc3339_ms(crate::clock::now_ms()),
            "cli",
        )
        .await?;
    crate::events::record(
        catalog,
        crate::events::NewEvent::system(
            "group.saved",
            crate::events::Severity::Info,
            format!("device group {name} saved: {}", ids.join(", ")),
        )
        .by("cli"),
    )
    .await;
    Ok(ids)
}
