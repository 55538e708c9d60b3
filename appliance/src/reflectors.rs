//! Branch reflectors, appliance side: the role an Image Manager turns on per device (CLI,
//! REST, web page share these functions), and which reflectors count as live candidates.
//! The agent learns its role from every heartbeat reply; the reflector heartbeats its
//! address and load on its own call (`api::reflectors`).

use morgana_core::control::{DEFAULT_REFLECTOR_PORT, ReflectorInfo, ReflectorRole, valid_site};
use serde::Serialize;

use crate::catalog::{Catalog, CatalogError, ReflectorRecord};
use crate::events::{self, NewEvent, Severity};

/// A reflector not heard from for this long is left out of download candidates (its agent
/// heartbeats every minute by default; three missed beats means gone).
pub const STALE_AFTER_MS: i64 = 3 * 60 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum ReflectorError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(
        "there is no device {0}: list the enrolled ones with `morgana device list` or on the \
         devices page"
    )]
    NoDevice(String),
    #[error("site {0:?} is not usable: 1 to 64 letters, digits, `-`, `_` or `.`, e.g. lyon-office")]
    BadSite(String),
    #[error(
        "port 0 is not usable: pick a free TCP port on the device, e.g. {DEFAULT_REFLECTOR_PORT}"
    )]
    BadPort,
}

/// Turns the role on (`Some`) or off for `device_id`, with an audit event by `actor`.
pub async fn set_role(
    catalog: &dyn Catalog,
    device_id: &str,
    role: Option<ReflectorRole>,
    actor: &str,
) -> Result<(), ReflectorError> {
    if let Some(r) = &role {
        if r.port == 0 {
            return Err(ReflectorError::BadPort);
        }
        if let Some(site) = &r.site
            && !valid_site(site)
        {
            return Err(ReflectorError::BadSite(site.clone()));
        }
    }
    let now = crate::clock::rfc3339_ms(crate::clock::now_ms());
    if !catalog
        .set_reflector_role(device_id, role.as_ref(), &now, actor)
        .await?
    {
        return Err(ReflectorError::NoDevice(device_id.to_owned()));
    }
    let (kind, message) = match &role {
        Some(r) => (
            "reflector.enabled",
            format!(
                "device {device_id} serves as a branch reflector on port {}{}",
                r.port,
                r.site
                    .as_deref()
                    .map(|s| format!(" for site {s}"))
                    .unwrap_or_default()
            ),
        ),
        None => (
            "reflector.disabled",
            format!("device {device_id} no longer serves as a branch reflector"),
        ),
    };
    events::record(
        catalog,
        NewEvent::system(kind, Severity::Info, message)
            .for_device(device_id)
            .by(actor),
    )
    .await;
    Ok(())
}

/// A reflector as the CLI, REST API and page show it.
#[derive(Clone, Debug, Serialize)]
pub struct ReflectorView {
    #[serde(flatten)]
    pub record: ReflectorRecord,
    /// RFC 3339 UTC of the last heartbeat.
    pub last_seen: Option<String>,
    /// Enabled and heard from within [`STALE_AFTER_MS`].
    pub live: bool,
}

pub async fn list(catalog: &dyn Catalog, now_ms: i64) -> Result<Vec<ReflectorView>, CatalogError> {
    Ok(catalog
        .reflectors()
        .await?
        .into_iter()
        .map(|record| ReflectorView {
            last_seen: record.last_seen_ms.map(crate::clock::rfc3339_ms),
            live: is_live(&record, now_ms),
            record,
        })
        .collect())
}

fn is_live(r: &ReflectorRecord, now_ms: i64) -> bool {
    r.enabled && r.address.is_some() && r.last_seen_ms.is_some_and(|t| now_ms - t <= STALE_AFTER_MS)
}

/// Live reflectors other than `caller`, as download candidates.
pub fn candidates(records: &[ReflectorRecord], caller: &str, now_ms: i64) -> Vec<ReflectorInfo> {
    records
        .iter()
        .filter(|r| r.device_id != caller && is_live(r, now_ms))
        .filter_map(|r| {
            let ip: std::net::IpAddr = r.address.as_deref()?.parse().ok()?;
            Some(ReflectorInfo {
                device_id: r.device_id.clone(),
                address: std::net::SocketAddr::new(ip, r.port).to_string(),
                subnet: r.subnet.clone().unwrap_or_default(),
                site: r.site.clone(),
                load: r.load,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, enabled: bool, address: Option<&str>, seen: Option<i64>) -> ReflectorRecord {
        ReflectorRecord {
            device_id: id.into(),
            hostname: id.into(),
            enabled,
            port: 8444,
            site: Some("lyon".into()),
            changed: String::new(),
            changed_by: "cli".into(),
            address: address.map(str::to_owned),
            subnet: Some("10.0.0.0/24".into()),
            in_flight: 0,
            load: 0.25,
            cache_bytes: 0,
            cache_limit: 0,
            bytes_served: 0,
            last_seen_ms: seen,
        }
    }

    #[test]
    fn candidates_are_live_enabled_reflectors_other_than_the_caller() {
        let now = 10 * STALE_AFTER_MS;
        let records = [
            rec("live", true, Some("10.0.0.5"), Some(now - 1000)),
            rec("v6", true, Some("fd00::5"), Some(now)),
            rec("caller", true, Some("10.0.0.6"), Some(now)),
            rec("off", false, Some("10.0.0.7"), Some(now)),
            rec(
                "stale",
                true,
                Some("10.0.0.8"),
                Some(now - STALE_AFTER_MS - 1),
            ),
            rec("never-beat", true, None, None),
            rec("garbage", true, Some("not an ip"), Some(now)),
        ];
        let got = candidates(&records, "caller", now);
        let ids: Vec<_> = got.iter().map(|c| c.device_id.as_str()).collect();
        assert_eq!(ids, ["live", "v6"]);
        assert_eq!(got[0].address, "10.0.0.5:8444");
        assert_eq!(got[1].address, "[fd00::5]:8444");
        assert_eq!(got[0].site.as_deref(), Some("lyon"));
    }
}
