//! Branch reflectors on the local network: reflectors advertise `_morgana-br._tcp.local.`
//! and agents browse for it briefly before a download. Multicast reaches every interface of
//! the machine, so both are off unless configured on (`run --mdns`, `MORGANA_AGENT_MDNS`).
//!
//! TXT records: `id` (device id), `site`, `port`, `load` (0 to 1), `subnet` and `ca` (the
//! hex pin of the appliance CA): a device enrolled on another appliance ignores the
//! reflector, which could not verify its certificate anyway.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use morgana_core::Id;
use morgana_core::control::{ReflectorRole, valid_site};
use morgana_core::plugin::types::ReflectorCandidate;
use morgana_core::wire::EnrollToken;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tracing::{debug, warn};

use crate::state::{CA_CERT_FILE, State};

pub const SERVICE_TYPE: &str = "_morgana-br._tcp.local.";
/// How long an agent listens for reflectors before a download.
pub const BROWSE_FOR: Duration = Duration::from_millis(1500);

/// The pin of the appliance CA this device trusts, as it travels in TXT records.
pub fn ca_pin(state: &State) -> anyhow::Result<Id> {
    let ca = CertificateDer::from_pem_slice(&state.read(CA_CERT_FILE)?)
        .with_context(|| format!("{CA_CERT_FILE} is damaged; enrol again"))?;
    Ok(EnrollToken::pin_of(&ca))
}

/// A registered reflector service; unregistered on drop.
pub struct Advertiser {
    daemon: ServiceDaemon,
    name: String,
    host: String,
    address: IpAddr,
    port: u16,
    fullname: String,
    properties: Vec<(String, String)>,
    /// The load last advertised, in tenths: re-registering on every small change would
    /// flood the segment.
    load_tenths: std::sync::atomic::AtomicU32,
}

impl Advertiser {
    pub fn start(
        state: &State,
        device_id: &str,
        role: &ReflectorRole,
        address: IpAddr,
        subnet: &str,
    ) -> anyhow::Result<Advertiser> {
        let pin = ca_pin(state)?;
        let properties = vec![
            ("id".to_owned(), device_id.to_owned()),
            ("site".to_owned(), role.site.clone().unwrap_or_default()),
            ("port".to_owned(), role.port.to_string()),
            ("subnet".to_owned(), subnet.to_owned()),
            ("ca".to_owned(), pin.to_hex()),
        ];
        let daemon = ServiceDaemon::new().context("cannot open the mDNS sockets")?;
        let name = format!("morgana-br-{device_id}");
        let me = Advertiser {
            daemon,
            host: format!("{name}.local."),
            fullname: format!("{name}.{SERVICE_TYPE}"),
            name,
            address,
            port: role.port,
            properties,
            load_tenths: std::sync::atomic::AtomicU32::new(0),
        };
        me.register(0.0)?;
        Ok(me)
    }

    fn register(&self, load: f32) -> anyhow::Result<()> {
        let mut props: HashMap<String, String> = self.properties.iter().cloned().collect();
        props.insert("load".into(), format!("{load:.2}"));
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            &self.name,
            &self.host,
            self.address,
            self.port,
            props,
        )
        .context("the reflector's mDNS record")?;
        self.daemon
            .register(info)
            .context("cannot register the reflector over mDNS")
    }

    pub fn update_load(&self, load: f32) {
        let tenths = (load * 10.0).round() as u32;
        let held = self
            .load_tenths
            .swap(tenths, std::sync::atomic::Ordering::Relaxed);
        if held != tenths
            && let Err(e) = self.register(load)
        {
            warn!("cannot update the reflector's mDNS load: {e:#}");
        }
    }
}

impl Drop for Advertiser {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}

/// Reflectors answering on the local network within `wait` that belong to the appliance of
/// `pin`, as ranking candidates (blocking: run it off the async workers).
pub fn browse(pin: Id, own_id: &str, wait: Duration) -> anyhow::Result<Vec<ReflectorCandidate>> {
    let daemon = ServiceDaemon::new().context("cannot open the mDNS sockets")?;
    let events = daemon
        .browse(SERVICE_TYPE)
        .context("cannot browse for reflectors over mDNS")?;
    let deadline = Instant::now() + wait;
    // A service resolves again when more of its addresses arrive: the last one counts.
    let mut by_name: HashMap<String, ReflectorCandidate> = HashMap::new();
    while let Ok(event) = events.recv_deadline(deadline) {
        let ServiceEvent::ServiceResolved(service) = event else {
            continue;
        };
        let txt = |k: &str| service.txt_properties.get_property_val_str(k);
        if txt("ca") != Some(pin.to_hex().as_str()) {
            debug!(name = %service.fullname, "a reflector of another appliance; ignored");
            continue;
        }
        let Some(id) = txt("id").filter(|i| !i.is_empty() && *i != own_id) else {
            continue;
        };
        // IPv4 first: a v6 link-local address needs a scope the address string lacks.
        let mut addrs: Vec<IpAddr> = service.addresses.iter().map(|a| a.to_ip_addr()).collect();
        addrs.sort_by_key(|a| (!a.is_ipv4(), *a));
        let Some(ip) = addrs
            .into_iter()
            .find(|a| !matches!(a, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        else {
            continue;
        };
        let site = txt("site").filter(|s| valid_site(s)).map(str::to_owned);
        let load = txt("load")
            .and_then(|l| l.parse::<f32>().ok())
            .filter(|l| (0.0..=1.0).contains(l))
            .unwrap_or(0.0);
        by_name.insert(
            service.fullname.clone(),
            ReflectorCandidate {
                id: id.to_owned(),
                address: std::net::SocketAddr::new(ip, service.port).to_string(),
                subnet: txt("subnet").unwrap_or_default().to_owned(),
                site,
                load,
                latency_ms: None,
            },
        );
    }
    let _ = daemon.stop_browse(SERVICE_TYPE);
    let _ = daemon.shutdown();
    let mut out: Vec<ReflectorCandidate> = by_name.into_values().collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}
