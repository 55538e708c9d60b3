//! `morgana device list|show`: enrolled devices, when they were last seen, and their
//! hardware inventory.

use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::json;

use crate::catalog::{Catalog, DeviceStatus, SqliteCatalog};
use crate::config::{DEFAULT_DATA_DIR, DataDir};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Every enrolled device: id, hostname, last seen, agent version, last snapshot.
    List {
        #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// One device, with its inventory.
    Show {
        /// The device id, as `morgana device list` shows it.
        id: String,
        #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    let (data_dir, json) = match &cmd {
        Command::List { data_dir, json } | Command::Show { data_dir, json, .. } => {
            (data_dir, *json)
        }
    };
    let data = DataDir::new(data_dir);
    data.require_initialised()?;
    let catalog = SqliteCatalog::open(&data.catalog(), false).await?;
    let result = match &cmd {
        Command::List { .. } => catalog.devices().await.context("cannot list devices"),
        Command::Show { id, .. } => catalog
            .device_status(id)
            .await
            .context("cannot look up the device")
            .map(|d| d.into_iter().collect()),
    };
    catalog.close().await;
    let devices = result?;
    match cmd {
        Command::List { .. } if json => {
            let all: Vec<_> = devices.iter().map(to_json).collect();
            println!("{}", serde_json::to_string_pretty(&all)?);
        }
        Command::List { .. } => {
            println!(
                "{:<16}  {:<24}  {:<24}  {:<10}  LAST SNAPSHOT",
                "ID", "HOSTNAME", "LAST SEEN", "AGENT"
            );
            for d in &devices {
                println!(
                    "{:<16}  {:<24}  {:<24}  {:<10}  {}{}",
                    d.device.id,
                    d.device.hostname,
                    seen(d),
                    d.agent_version.as_deref().unwrap_or("-"),
                    d.last_snapshot.as_deref().unwrap_or("-"),
                    if d.device.revoked { "  (revoked)" } else { "" }
                );
            }
        }
        Command::Show { id, .. } => {
            let Some(d) = devices.first() else {
                bail!("there is no device {id:?}: list them with `morgana device list`");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&to_json(d))?);
            } else {
                print_device(d);
            }
        }
    }
    Ok(())
}

fn seen(d: &DeviceStatus) -> String {
    d.last_seen_ms
        .map_or_else(|| "never".into(), crate::clock::rfc3339_ms)
}

fn to_json(d: &DeviceStatus) -> serde_json::Value {
    json!({
        "id": d.device.id,
        "hostname": d.device.hostname,
        "enrolled": d.device.created,
        "revoked": d.device.revoked,
        "last_seen": d.last_seen_ms.map(crate::clock::rfc3339_ms),
        "agent_version": d.agent_version,
        "last_snapshot": d.last_snapshot,
        "inventory": d.inventory,
        "inventory_digest": d.inventory_digest.map(|i| i.to_hex()),
    })
}

fn print_device(d: &DeviceStatus) {
    println!("device      {}", d.device.id);
    println!("hostname    {}", d.device.hostname);
    println!("enrolled    {}", d.device.created);
    if d.device.revoked {
        println!("revoked     yes");
    }
    println!("last seen   {}", seen(d));
    println!("agent       {}", d.agent_version.as_deref().unwrap_or("-"));
    println!(
        "last sync   {}",
        d.last_snapshot.as_deref().unwrap_or("never")
    );
    let Some(inv) = &d.inventory else {
        println!("inventory   none reported yet");
        return;
    };
    println!("vendor      {}", inv.vendor);
    println!("model       {}", inv.model);
    println!("serial      {}", inv.serial);
    println!("cpu         {} × {}", inv.cpu_count, inv.cpu_model);
    println!("memory      {} MiB", inv.memory_bytes >> 20);
    println!(
        "os          {} ({} {})",
        inv.os_name, inv.os_id, inv.os_version
    );
    println!("kernel      {}", inv.kernel);
    for disk in &inv.disks {
        println!(
            "disk        {} {} ({} GB)",
            disk.name,
            disk.model,
            disk.size_bytes / 1_000_000_000
        );
    }
    for nic in &inv.network {
        println!(
            "network     {} {} {}",
            nic.name,
            nic.mac,
            nic.addresses.join(" ")
        );
    }
    println!("pci         {} devices", inv.pci.len());
}
