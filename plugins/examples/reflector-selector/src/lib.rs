//! Morgana's built-in reflector ranking, as a plugin: own subnet first, then preferred
//! subnets or the same site, then anything under the latency threshold; saturated
//! reflectors never. An empty answer sends the device to the server.

use std::net::{IpAddr, SocketAddr};

use morgana_plugin_sdk::reflector_selector::*;

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = s.trim().split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

fn in_subnet(ip: IpAddr, (net, len): (IpAddr, u8)) -> bool {
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

fn host_ip(address: &str) -> Option<IpAddr> {
    address
        .parse()
        .ok()
        .or_else(|| address.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

struct Nearest;

impl ReflectorSelector for Nearest {
    fn rank(
        client: ClientInfo,
        policy: SelectorPolicy,
        candidates: Vec<ReflectorCandidate>,
    ) -> Result<Vec<String>, String> {
        let client_ip = host_ip(&client.address);
        let preferred: Vec<_> = policy
            .preferred_subnets
            .iter()
            .filter_map(|s| parse_cidr(s))
            .collect();
        let mut tiered: Vec<(u8, &ReflectorCandidate)> = Vec::new();
        for c in candidates.iter().filter(|c| c.load < 1.0) {
            let subnet = parse_cidr(&c.subnet);
            let tier = if matches!((client_ip, subnet), (Some(ip), Some(net)) if in_subnet(ip, net))
            {
                0
            } else if subnet.is_some_and(|(net, _)| preferred.iter().any(|&p| in_subnet(net, p)))
                || (client.site.is_some() && c.site == client.site)
            {
                1
            } else if c
                .latency_ms
                .is_some_and(|l| l <= policy.latency_threshold_ms)
            {
                2
            } else {
                continue;
            };
            tiered.push((tier, c));
        }
        let lat = |c: &ReflectorCandidate| c.latency_ms.unwrap_or(f32::INFINITY);
        tiered.sort_by(|(ta, a), (tb, b)| {
            ta.cmp(tb)
                .then_with(|| lat(a).total_cmp(&lat(b)))
                .then_with(|| a.load.total_cmp(&b.load))
                .then_with(|| a.id.cmp(&b.id))
        });
        let mut out: Vec<String> = Vec::new();
        for (_, c) in tiered {
            if !out.contains(&c.id) {
                out.push(c.id.clone());
            }
        }
        Ok(out)
    }
}

morgana_plugin_sdk::export_reflector_selector!(Nearest);
