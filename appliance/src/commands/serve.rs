//! `morgana serve`: the appliance with all roles on one box.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::api::{self, AppState};
use crate::catalog::{Catalog, SqliteCatalog};
use crate::commands::enroll_token::parse_duration;
use crate::config::{DEFAULT_DATA_DIR, DEFAULT_LISTEN, DataDir};
use crate::store::PackStore;
use crate::tls::{self, Pki};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the CA, catalog and (by default) packs live; created on first start.
    #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Address and port to serve HTTPS on (port 0 picks a free one).
    #[arg(long, value_name = "ADDR:PORT", env = "MORGANA_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// A directory to store packs in; repeat for several (new packs go to the one with the
    /// most free space). Default: <data-dir>/volumes/default.
    #[arg(long = "volume", value_name = "DIR")]
    pub volumes: Vec<PathBuf>,
    /// Run garbage collection this often, or `off`.
    #[arg(long, value_name = "DURATION|off", env = "MORGANA_GC_EVERY", default_value = "24h", value_parser = parse_every)]
    pub gc_every: Every,
    #[command(flatten)]
    pub gc: crate::commands::gc::Tuning,
    /// Check for stale devices and full volumes this often (raising `alert.*` events), or
    /// `off`.
    #[arg(long, value_name = "DURATION|off", env = "MORGANA_ALERT_CHECK_EVERY", default_value = "5m", value_parser = parse_every)]
    pub alert_check_every: Every,
    /// How often agents send a heartbeat (status, inventory changes).
    #[arg(long, value_name = "DURATION", env = "MORGANA_HEARTBEAT_EVERY", default_value = "60s", value_parser = parse_duration)]
    pub heartbeat_every: Duration,
}

/// An interval, or none (`off`).
#[derive(Clone, Copy, Debug)]
pub struct Every(pub Option<Duration>);

fn parse_every(s: &str) -> Result<Every, String> {
    if s == "off" {
        Ok(Every(None))
    } else {
        parse_duration(s).map(|d| Every(Some(d)))
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let data = DataDir::new(&args.data_dir);
    std::fs::create_dir_all(data.root())
        .with_context(|| format!("cannot create the data directory {}", data.root().display()))?;
    let pki = Pki::ensure(&data).with_context(|| {
        format!(
            "cannot set up the TLS certificates in {}",
            data.tls_dir().display()
        )
    })?;
    let catalog = SqliteCatalog::open(&data.catalog(), true).await?;
    let volumes = if args.volumes.is_empty() {
        vec![data.default_volume()]
    } else {
        args.volumes
    };
    let store = PackStore::open(&volumes)?;
    let tls_config = Arc::new(pki.server_config().context("cannot configure TLS")?);
    let listener = TcpListener::bind(&args.listen).await.with_context(|| {
        format!("cannot listen on {}: is the port in use or the address wrong? pick another with --listen", args.listen)
    })?;
    let addr = listener
        .local_addr()
        .context("cannot learn the address listened on")?;
    info!(data_dir = %data.root().display(), volumes = ?store.volumes(), "appliance ready");

    let catalog: Arc<dyn Catalog> = Arc::new(catalog);
    crate::commands::plugin::check_active(catalog.as_ref(), &data).await;
    let store = Arc::new(store);
    let hooks = Arc::new(crate::hooks::Hooks::new(catalog.clone(), data.clone()));
    let web = crate::web::WebState::new(
        catalog.clone(),
        pki.ca_cert_der.to_vec(),
        data.clone(),
        store.clone(),
        hooks.clone(),
    );
    let first_admin_password = crate::auth::ensure_admin(catalog.as_ref()).await?;
    let state = AppState::new(catalog.clone(), store.clone(), Arc::new(pki))
        .heartbeat_every(args.heartbeat_every)
        .with_hooks(hooks);
    api::control::spawn_sweeper(&state);
    if let Every(Some(every)) = args.alert_check_every {
        let catalog = catalog.clone();
        let volumes = store.volumes().to_vec();
        tokio::spawn(async move {
            // The first check at start: a device may have gone stale while we were down.
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let now = crate::clock::now_ms();
                if let Err(e) = crate::alerts::check(catalog.as_ref(), &volumes, now).await {
                    warn!(error = %e, "the alert check failed; it runs again at the next interval");
                }
            }
        });
    }
    if let Every(Some(every)) = args.gc_every {
        let options = args.gc.options(false);
        let catalog = catalog.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if let Err(e) = crate::gc::run(&catalog, &store, &options).await {
                    warn!(error = %e, "scheduled garbage collection failed; it runs again at the next interval");
                }
            }
        });
    }
    {
        // Tests and supervisors read this one line to learn the port.
        let mut out = std::io::stdout().lock();
        if let Some(password) = first_admin_password {
            writeln!(
                out,
                "morgana administrator created: sign in at https://{addr}/ as `admin` with the \
                 one-time password {password} (shown only now; you choose your own at first sign-in)"
            )
            .context("cannot write to stdout")?;
        }
        writeln!(out, "morgana listening on https://{addr}").context("cannot write to stdout")?;
        out.flush().context("cannot write to stdout")?;
    }
    let app = api::router(state).merge(crate::web::router(web));
    tls::serve(listener, tls_config, app, shutdown_signal()).await;
    catalog.close().await;
    info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received, stopping"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received, stopping"),
    }
}
