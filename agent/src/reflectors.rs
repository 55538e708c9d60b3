//! Reflector choice, on the device: the `reflector-selector` hook runs on the agent because
//! only the device knows its own address and the round trip it measures to each reflector.
//! The component is the appliance's active plugin, fetched when it changed, kept in the
//! state directory and compiled once into a cache beside it. With no plugin, or when the
//! plugin fails (trap, limit, malformed answer), the built-in ranks, and the appliance is
//! told so it can record a `plugin.failed` event.
//!
//! Candidates come from the caller: `morgana-agent reflectors --candidates FILE`, or
//! `distribution::discover` before a download (the appliance's list and mDNS).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use morgana_core::Id;
use morgana_core::control::{PluginFailureReport, ReflectorPolicy};
use morgana_core::plugin::host::{Limits, Plugin, PluginHost};
use morgana_core::plugin::types::{ClientInfo, ReflectorCandidate, SelectorPolicy};
use morgana_core::plugin::{BuiltinReflectorSelector, Fallback, Hook};
use serde::Serialize;

use crate::client::{Client, PluginFetch, PluginMeta};
use crate::state::State;

const COMPONENT_FILE: &str = "reflector-selector.wasm";
const META_FILE: &str = "reflector-selector.json";
/// Compiled components, keyed by the host on their bytes.
const COMPILED_DIR: &str = "plugin-cache";
/// A reflector that takes longer than this to accept a connection is no neighbour.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most candidates ranked at once: more is a misconfiguration, not a branch office.
pub const MAX_CANDIDATES: usize = 1024;

#[derive(Debug, Serialize)]
pub struct Ranking {
    pub client: ClientInfo,
    /// Candidate ids, best first; empty means: download from the appliance.
    pub ranked: Vec<String>,
    /// `plugin NAME vN` or `built-in`.
    pub decided_by: String,
    /// Why the plugin's answer was not used, when it was not.
    pub plugin_failure: Option<String>,
    /// The candidates as ranked, with the latencies measured here.
    pub candidates: Vec<ReflectorCandidate>,
}

/// Ranks `candidates` for this device with the active plugin or the built-in. Candidates
/// without a latency get one measured (a TCP connect to their address).
pub async fn rank(
    state: &State,
    client: &Client,
    mut candidates: Vec<ReflectorCandidate>,
) -> anyhow::Result<Ranking> {
    if candidates.len() > MAX_CANDIDATES {
        anyhow::bail!(
            "{} reflector candidates is more than the {MAX_CANDIDATES} ranked at once",
            candidates.len()
        );
    }
    let device = state.device()?;
    let policy = client.policy().await?;
    let plugin = current_plugin(state, client).await?;
    measure_latencies(&mut candidates).await;
    let info = ClientInfo {
        device_id: device.device_id.clone(),
        address: own_address(&device.server).await.to_string(),
        site: own_site(state, &policy.reflectors),
    };
    let selector = selector_policy(&policy.reflectors);
    let cache_dir = state.path(COMPILED_DIR);
    let (info, candidates, ranked, decided_by, failure) = tokio::task::spawn_blocking(move || {
        let (loaded, load_failure) = match &plugin {
            None => (None, None),
            Some((meta, bytes)) => match load(cache_dir, meta, bytes) {
                Ok(p) => (Some(p), None),
                Err(e) => (None, Some(e)),
            },
        };
        let decision =
            Fallback::new(loaded, BuiltinReflectorSelector).rank(&info, &selector, &candidates);
        let (ranked, failure) = match decision {
            Ok(d) => (d.value, d.failure.map(|f| f.message).or(load_failure)),
            Err(e) => return Err(anyhow::Error::new(e)),
        };
        let decided_by = match (&plugin, &failure) {
            (Some((meta, _)), None) => format!("plugin {} v{}", meta.name, meta.version),
            _ => "built-in".to_owned(),
        };
        let plugin_id = plugin.map(|(meta, _)| meta.id);
        Ok((info, candidates, ranked, decided_by, failure.zip(plugin_id)))
    })
    .await
    .context("the reflector ranking stopped unexpectedly")??;
    if let Some((message, plugin)) = &failure {
        let report = PluginFailureReport {
            plugin: *plugin,
            message: message.clone(),
        };
        if let Err(e) = client.report_plugin_failure(&report).await {
            tracing::warn!(error = %e, "cannot tell the appliance that the reflector-selector plugin failed");
        }
    }
    Ok(Ranking {
        client: info,
        ranked,
        decided_by,
        plugin_failure: failure.map(|(m, _)| m),
        candidates,
    })
}

/// The device's site: its own reflector role names it first, then its policy.
fn own_site(state: &State, policy: &ReflectorPolicy) -> Option<String> {
    crate::reflector::held_role(state)
        .and_then(|r| r.site)
        .or_else(|| policy.site.clone())
}

fn selector_policy(p: &ReflectorPolicy) -> SelectorPolicy {
    SelectorPolicy {
        preferred_subnets: p.preferred_subnets.clone(),
        latency_threshold_ms: p.latency_threshold_ms as f32,
    }
}

/// A load failure is a plugin failure like any other: the built-in answers.
fn load(
    cache_dir: PathBuf,
    meta: &PluginMeta,
    bytes: &[u8],
) -> Result<morgana_core::plugin::host::ReflectorSelectorPlugin, String> {
    let host = PluginHost::new(Some(cache_dir), Limits::default()).map_err(|e| e.to_string())?;
    match host.load(&meta.name, Hook::ReflectorSelector, bytes) {
        Ok(Plugin::ReflectorSelector(p)) => Ok(p),
        Ok(other) => Err(format!(
            "plugin {} was loaded as {}, not reflector-selector",
            meta.name,
            other.hook()
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// The active plugin, from the state directory when the appliance says it is unchanged.
async fn current_plugin(
    state: &State,
    client: &Client,
) -> anyhow::Result<Option<(PluginMeta, Vec<u8>)>> {
    let held = held_plugin(state);
    match client
        .reflector_selector(held.as_ref().map(|(m, _)| m.id))
        .await?
    {
        PluginFetch::NoneActive => Ok(None),
        PluginFetch::Unchanged(meta) => match held {
            Some((_, bytes)) => Ok(Some((meta, bytes))),
            None => anyhow::bail!(
                "the appliance says the reflector-selector plugin is unchanged, but {} is \
                 gone: retry",
                state.path(COMPONENT_FILE).display()
            ),
        },
        PluginFetch::New(meta, bytes) => {
            // The component first: a meta file always names bytes that are there.
            state.write(COMPONENT_FILE, &bytes, 0o600)?;
            state.write(META_FILE, &serde_json::to_vec(&meta)?, 0o600)?;
            Ok(Some((meta, bytes)))
        }
    }
}

/// The component kept from last time, if it is whole.
fn held_plugin(state: &State) -> Option<(PluginMeta, Vec<u8>)> {
    let meta: PluginMeta =
        serde_json::from_slice(&std::fs::read(state.path(META_FILE)).ok()?).ok()?;
    let bytes = std::fs::read(state.path(COMPONENT_FILE)).ok()?;
    (Id::of(&bytes) == meta.id).then_some((meta, bytes))
}

/// Round trip of a TCP connect to each candidate that has no latency yet, all at once;
/// unreachable ones stay unmeasured (the built-in then only takes them by subnet or site).
async fn measure_latencies(candidates: &mut [ReflectorCandidate]) {
    let probes = candidates.iter().map(|c| {
        let (known, address) = (c.latency_ms, c.address.clone());
        async move {
            if known.is_some() {
                return known;
            }
            let start = Instant::now();
            match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(&address))
                .await
            {
                Ok(Ok(_)) => Some(start.elapsed().as_secs_f32() * 1000.0),
                _ => None,
            }
        }
    });
    let measured = futures_util::future::join_all(probes).await;
    for (c, l) in candidates.iter_mut().zip(measured) {
        c.latency_ms = l;
    }
}

/// The address this device uses toward the appliance: what reflectors on its subnet see.
/// Connecting a UDP socket picks the route and source address without sending anything.
pub(crate) async fn own_address(server: &str) -> IpAddr {
    let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let Some(host_port) = server
        .strip_prefix("https://")
        .map(|r| r.split('/').next().unwrap_or(r))
    else {
        return unspecified;
    };
    let with_port = if host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host_port.to_owned()
    } else {
        format!("{host_port}:443")
    };
    let Ok(mut addrs) = tokio::net::lookup_host(with_port).await else {
        return unspecified;
    };
    let Some(target) = addrs.next() else {
        return unspecified;
    };
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("address")
    } else {
        "[::]:0".parse().expect("address")
    };
    let Ok(socket) = tokio::net::UdpSocket::bind(bind).await else {
        return unspecified;
    };
    if socket.connect(target).await.is_err() {
        return unspecified;
    }
    socket.local_addr().map_or(unspecified, |a| a.ip())
}
