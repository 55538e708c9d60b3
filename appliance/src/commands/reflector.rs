//! `morgana reflector`: turn the branch reflector role on or off for a device, and list the
//! reflectors with what they last reported.

use morgana_core::control::{DEFAULT_REFLECTOR_PORT, ReflectorRole};

use crate::commands::layer::{DirArgs, open, resolve_device};
use crate::reflectors;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Make a device a branch reflector: its agent serves layer and restore downloads to its
    /// neighbours (at its next heartbeat).
    Enable {
        /// Device id or hostname.
        device: String,
        /// TCP port of the reflector's HTTPS listener on the device.
        #[arg(long, default_value_t = DEFAULT_REFLECTOR_PORT)]
        port: u16,
        /// The branch office it serves (devices of the same site prefer it).
        #[arg(long)]
        site: Option<String>,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Take the reflector role away; the agent stops serving at its next heartbeat.
    Disable {
        device: String,
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Devices with (or once with) the role: address, site, load, cache, bytes served.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DirArgs,
    },
}

pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Enable {
            device,
            port,
            site,
            dir,
        } => {
            let (_, catalog) = open(&dir).await?;
            let result = async {
                let id = resolve_device(catalog.as_ref(), &device).await?;
                let role = ReflectorRole { port, site };
                reflectors::set_role(catalog.as_ref(), &id, Some(role), "cli").await?;
                anyhow::Ok(id)
            }
            .await;
            catalog.close().await;
            let id = result?;
            println!(
                "device {id} is a branch reflector on port {port}; its agent starts serving at \
                 its next heartbeat"
            );
        }
        Command::Disable { device, dir } => {
            let (_, catalog) = open(&dir).await?;
            let result = async {
                let id = resolve_device(catalog.as_ref(), &device).await?;
                reflectors::set_role(catalog.as_ref(), &id, None, "cli").await?;
                anyhow::Ok(id)
            }
            .await;
            catalog.close().await;
            let id = result?;
            println!("device {id} is no longer a branch reflector");
        }
        Command::List { json, dir } => {
            let (_, catalog) = open(&dir).await?;
            let list = reflectors::list(catalog.as_ref(), crate::clock::now_ms()).await;
            catalog.close().await;
            let list = list?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
                return Ok(());
            }
            if list.is_empty() {
                println!("no reflectors: turn the role on with `morgana reflector enable DEVICE`");
            }
            for r in &list {
                let rec = &r.record;
                let state = match (rec.enabled, r.live) {
                    (false, _) => "disabled",
                    (true, true) => "live",
                    (true, false) => "not heard from",
                };
                println!(
                    "{} {:<20} {:<14} {:<22} site {:<12} load {:>3.0}% cache {}/{} MiB served {} MiB last seen {}",
                    rec.device_id,
                    rec.hostname,
                    state,
                    rec.address
                        .as_deref()
                        .map_or(format!("-:{}", rec.port), |a| format!("{a}:{}", rec.port)),
                    rec.site.as_deref().unwrap_or("-"),
                    rec.load * 100.0,
                    rec.cache_bytes >> 20,
                    rec.cache_limit >> 20,
                    rec.bytes_served >> 20,
                    r.last_seen.as_deref().unwrap_or("never"),
                );
            }
        }
    }
    Ok(())
}
