//! `morgana-agent reflectors --candidates FILE | --discover [--mdns]`: ranks branch
//! reflectors for this device the way downloads will choose them (the appliance's
//! `reflector-selector` plugin, or the built-in), and says which decided. `--discover`
//! takes the candidates a download would: the appliance's list, and mDNS when asked.

use std::path::{Path, PathBuf};

use anyhow::Context;
use morgana_core::plugin::types::ReflectorCandidate;

use crate::client::Client;
use crate::reflectors;
use crate::state::State;

/// Where the candidates come from.
pub enum Candidates<'a> {
    File(&'a Path),
    Discover { mdns: bool },
}

pub async fn run(
    state_dir: Option<PathBuf>,
    from: Candidates<'_>,
    json: bool,
) -> anyhow::Result<()> {
    let state = State::open(state_dir)?;
    let client = Client::for_device(&state)?;
    let (list, found) = match from {
        Candidates::File(path) => (read_candidates(path)?, Vec::new()),
        Candidates::Discover { mdns } => {
            crate::distribution::candidates(&state, &client, mdns).await
        }
    };
    let ranking = reflectors::rank(&state, &client, list).await?;
    if json {
        let mut v = serde_json::to_value(&ranking)?;
        v["found"] = serde_json::to_value(&found)?;
        println!("{v}");
        return Ok(());
    }
    for f in &found {
        println!("found {} at {} (through {})", f.id, f.address, f.via);
    }
    if let Some(why) = &ranking.plugin_failure {
        eprintln!(
            "warning: the reflector-selector plugin failed, the built-in ranked instead: {why}"
        );
    }
    println!(
        "device {} at {}, ranked by {}:",
        ranking.client.device_id, ranking.client.address, ranking.decided_by
    );
    if ranking.ranked.is_empty() {
        println!("  no reflector qualifies: downloads go to the appliance");
    }
    for (i, id) in ranking.ranked.iter().enumerate() {
        let c = ranking.candidates.iter().find(|c| &c.id == id);
        let latency = c
            .and_then(|c| c.latency_ms)
            .map_or("unmeasured".to_owned(), |l| format!("{l:.1} ms"));
        let address = c.map_or("", |c| c.address.as_str());
        println!("  {}. {id}  {address}  {latency}", i + 1);
    }
    Ok(())
}

fn read_candidates(candidates: &Path) -> anyhow::Result<Vec<ReflectorCandidate>> {
    let text = std::fs::read(candidates)
        .with_context(|| format!("cannot read the candidates file {}", candidates.display()))?;
    serde_json::from_slice(&text).with_context(|| {
        format!(
            "{} is not a JSON array of reflector candidates ({{\"id\", \"address\": \"HOST:PORT\", \
             \"subnet\": \"CIDR\", \"site\"?, \"load\"?, \"latency_ms\"?}})",
            candidates.display()
        )
    })
}
