//! `morgana group`: saved device groups, for assigning layers to many devices at once.

use crate::commands::layer::{DirArgs, open};

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
            let (_, catalog) = open(&dir).await?;
            let result = crate::assign::save_group(catalog.as_ref(), &name, &devices, "cli").await;
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
