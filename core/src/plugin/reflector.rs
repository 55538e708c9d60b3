//! The built-in `reflector-selector`: reflectors in the device's own subnet first, then
//! those in the site's configured subnets or at the device's site, then any answering
//! within the latency threshold; nothing else (an empty ranking means the server).

use std::net::IpAddr;

use super::types::{ClientInfo, ReflectorCandidate, SelectorPolicy};
use super::{PluginError, ReflectorSelector};

/// The ranking above; the default when no plugin is active.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuiltinReflectorSelector;

impl ReflectorSelector for BuiltinReflectorSelector {
    fn rank(
        &self,
        client: &ClientInfo,
        policy: &SelectorPolicy,
        candidates: &[ReflectorCandidate],
    ) -> Result<Vec<String>, PluginError> {
        Ok(rank(client, policy, candidates))
    }
}

/// `a.b.c.d/n` or `v6::/n`; `None` when malformed or the prefix is too long.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = s.trim().split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

/// Whether `ip` lies inside the network `net`/`len` (same address family only).
pub fn in_subnet(ip: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    let (a, b, bits) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return false,
    };
    if len == 0 {
        return true;
    }
    let shift = bits - u32::from(len);
    (a >> shift) == (b >> shift)
}

/// The host part of `host:port`, `[v6]:port` or a bare address.
fn host_ip(address: &str) -> Option<IpAddr> {
    if let Ok(ip) = address.parse() {
        return Some(ip);
    }
    address.parse::<std::net::SocketAddr>().ok().map(|s| s.ip())
}

pub fn rank(
    client: &ClientInfo,
    policy: &SelectorPolicy,
    candidates: &[ReflectorCandidate],
) -> Vec<String> {
    let client_ip = host_ip(&client.address);
    let preferred: Vec<(IpAddr, u8)> = policy
        .preferred_subnets
        .iter()
        .filter_map(|s| parse_cidr(s))
        .collect();
    let mut tiered: Vec<(u8, &ReflectorCandidate)> = candidates
        .iter()
        // A saturated reflector would only slow its neighbours down further.
        .filter(|c| c.load < 1.0)
        .filter_map(|c| {
            let subnet = parse_cidr(&c.subnet);
            let same_subnet =
                matches!((client_ip, subnet), (Some(ip), Some(net)) if in_subnet(ip, net));
            let in_preferred =
                subnet.is_some_and(|(net, _)| preferred.iter().any(|&p| in_subnet(net, p)));
            let same_site = client.site.is_some() && c.site == client.site;
            let fast = c
                .latency_ms
                .is_some_and(|l| l <= policy.latency_threshold_ms);
            let tier = if same_subnet {
                0
            } else if in_preferred || same_site {
                1
            } else if fast {
                2
            } else {
                return None;
            };
            Some((tier, c))
        })
        .collect();
    tiered.sort_by(|(ta, a), (tb, b)| {
        ta.cmp(tb)
            .then_with(|| latency_key(a).total_cmp(&latency_key(b)))
            .then_with(|| a.load.total_cmp(&b.load))
            .then_with(|| a.id.cmp(&b.id))
    });
    let mut out: Vec<String> = Vec::with_capacity(tiered.len());
    for (_, c) in tiered {
        // Ids are the answer's currency: a duplicate id would be a malformed ranking.
        if !out.contains(&c.id) {
            out.push(c.id.clone());
        }
    }
    out
}

/// Unmeasured reflectors sort after every measured one.
fn latency_key(c: &ReflectorCandidate) -> f32 {
    c.latency_ms.unwrap_or(f32::INFINITY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(
        id: &str,
        subnet: &str,
        site: Option<&str>,
        load: f32,
        lat: Option<f32>,
    ) -> ReflectorCandidate {
        ReflectorCandidate {
            id: id.into(),
            address: format!("{}:8444", subnet.split('/').next().unwrap()),
            subnet: subnet.into(),
            site: site.map(Into::into),
            load,
            latency_ms: lat,
        }
    }

    #[test]
    fn subnets() {
        let net = parse_cidr("10.1.2.0/24").unwrap();
        assert!(in_subnet("10.1.2.77".parse().unwrap(), net));
        assert!(!in_subnet("10.1.3.1".parse().unwrap(), net));
        assert!(in_subnet(
            "fd00::5".parse().unwrap(),
            parse_cidr("fd00::/64").unwrap()
        ));
        assert!(!in_subnet("fd00::5".parse().unwrap(), net));
        assert!(in_subnet(
            "1.2.3.4".parse().unwrap(),
            parse_cidr("0.0.0.0/0").unwrap()
        ));
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert_eq!(parse_cidr("nonsense"), None);
    }

    #[test]
    fn subnet_then_site_then_latency_then_nothing() {
        let client = ClientInfo {
            device_id: "d1".into(),
            address: "10.1.2.50".into(),
            site: Some("paris".into()),
        };
        let policy = SelectorPolicy {
            preferred_subnets: vec!["10.9.0.0/16".into()],
            latency_threshold_ms: 20.0,
        };
        let cands = vec![
            cand("far-fast", "192.168.7.0/24", None, 0.1, Some(5.0)),
            cand("same-net-busy", "10.1.2.0/24", None, 0.9, Some(3.0)),
            cand("same-net", "10.1.2.0/24", None, 0.2, Some(3.0)),
            cand("preferred", "10.9.4.0/24", None, 0.0, None),
            cand("site", "172.16.0.0/24", Some("paris"), 0.0, Some(30.0)),
            cand("far-slow", "192.168.8.0/24", None, 0.0, Some(80.0)),
            cand("saturated", "10.1.2.0/24", None, 1.0, Some(1.0)),
        ];
        assert_eq!(
            rank(&client, &policy, &cands),
            ["same-net", "same-net-busy", "site", "preferred", "far-fast"]
        );
        let none = rank(
            &client,
            &policy,
            &[cand("far-slow", "192.168.8.0/24", None, 0.0, Some(80.0))],
        );
        assert!(none.is_empty(), "{none:?}");
    }
}
