//! The hammer: agents sync in a loop, and restore now and then, while `morgana gc` runs over
//! and over beside them with the harshest retention (newest snapshot only, plus a pinned
//! one). No sync or restore may fail,
//! `morgana check` must end clean, and every retained snapshot must restore bit for bit.
//!
//! `MORGANA_HAMMER_SECS` sets how long the load runs (default 40).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use morgana_e2e::*;

const AGENTS: usize = 3;

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    run_ok(std::process::Command::new("cp").arg("-a").arg(from).arg(to))?;
    Ok(())
}

/// Changes the tree a little, differently each round: a new file, an edited one, a deleted
/// one, so every round leaves some garbage behind once older snapshots are pruned.
fn mutate(root: &Path, agent: usize, round: u64) -> Result<()> {
    let seed = (agent as u64) << 32 | round;
    let size = 20_000 + (seed.wrapping_mul(2_654_435_761) % 300_000) as usize;
    fs::write(root.join(format!("new-{round:04}.bin")), noise(size, seed))?;
    let edited = root.join(format!("f{:02}.bin", round % 12));
    fs::write(&edited, noise(size / 2 + 1, seed ^ 0xabcdef))?;
    if round >= 3 {
        let _ = fs::remove_file(root.join(format!("new-{:04}.bin", round - 3)));
    }
    Ok(())
}

struct Loaded {
    agent: Agent,
    /// Copies of the tree at the snapshots that will be retained: the pinned one and the
    /// newest.
    copies: PathBuf,
    pinned: String,
    newest: String,
    syncs: u64,
    /// Restores of the pinned snapshot made while gc ran.
    restores: u64,
}

fn hammer_agent(appliance: &Appliance, base: &Path, i: usize, until: Instant) -> Result<Loaded> {
    let root = base.join(format!("root{i}"));
    fs::create_dir_all(&root)?;
    // Shared between agents, so deduplicated blobs are in play too.
    fs::write(root.join("shared.bin"), noise(700_000, 42))?;
    for f in 0..12 {
        fs::write(
            root.join(format!("f{f:02}.bin")),
            noise(10_000 * (f + 1), (i * 100 + f) as u64),
        )?;
    }
    let agent = Agent::enroll(appliance, &root, &base.join(format!("state{i}")))?;
    let copies = base.join(format!("copies{i}"));
    fs::create_dir_all(&copies)?;
    let first = agent.sync()?["snapshot"]
        .as_str()
        .context("sync --json has no snapshot id")?
        .to_string();
    copy_tree(&root, &copies.join(&first))?;
    run_ok(
        morgana()
            .args(["snapshot", "--data-dir"])
            .arg(&appliance.data_dir)
            .args(["pin", &first, "--reason", "hammer"]),
    )?;
    let mut newest = first.clone();
    let mut syncs = 1;
    let mut restores = 0;
    while Instant::now() < until {
        mutate(&root, i, syncs)?;
        let s = agent
            .sync()
            .with_context(|| format!("agent {i}, sync {syncs}, while gc runs"))?;
        let id = s["snapshot"]
            .as_str()
            .context("no snapshot id")?
            .to_string();
        copy_tree(&root, &copies.join(&id))?;
        if newest != first {
            fs::remove_dir_all(copies.join(&newest))?;
        }
        newest = id;
        syncs += 1;
        // Restores run beside the collections too, reading what gc is rewriting.
        if syncs % 4 == 0 {
            let to = base.join(format!("restore{i}"));
            let _ = fs::remove_dir_all(&to);
            let out = agent.restore(&first, &to, None, false);
            ensure!(
                out.status.success(),
                "agent {i}: restoring the pinned snapshot while gc runs: {}",
                stderr(&out)
            );
            assert_same_tree(&copies.join(&first), &to)
                .with_context(|| format!("agent {i}: pinned snapshot restored while gc runs"))?;
            restores += 1;
        }
    }
    Ok(Loaded {
        agent,
        copies,
        pinned: first,
        newest,
        syncs,
        restores,
    })
}

fn gc(appliance: &Appliance) -> Result<serde_json::Value> {
    let out = run_ok(
        morgana()
            .args(["gc", "--json", "--data-dir"])
            .arg(&appliance.data_dir)
            .args(["--keep-hourly", "0", "--keep-daily", "0"])
            .args(["--keep-weekly", "0", "--keep-monthly", "0"])
            .args(["--pack-grace", "1s"]),
    )?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn gc_in_a_loop_beside_syncing_agents_loses_nothing() -> Result<()> {
    crate::init();
    let secs: u64 = std::env::var("MORGANA_HAMMER_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let tmp = tempfile::tempdir()?;
    let appliance = Appliance::start_with(&tmp.path().join("appliance"), &["--gc-every", "off"])?;
    let until = Instant::now() + Duration::from_secs(secs);

    let (loaded, gc_runs) = std::thread::scope(|s| -> Result<_> {
        let workers: Vec<_> = (0..AGENTS)
            .map(|i| {
                let (appliance, base) = (&appliance, tmp.path());
                s.spawn(move || hammer_agent(appliance, base, i, until))
            })
            .collect();
        let mut runs = Vec::new();
        while Instant::now() < until {
            runs.push(gc(&appliance)?);
        }
        let loaded = workers
            .into_iter()
            .map(|w| w.join().expect("agent thread panicked"))
            .collect::<Result<Vec<_>>>()?;
        Ok((loaded, runs))
    })?;
    let last = gc(&appliance)?;

    let freed: u64 = gc_runs
        .iter()
        .map(|r| r["blobs_freed"].as_u64().unwrap())
        .sum();
    let syncs: u64 = loaded.iter().map(|l| l.syncs).sum();
    let restores: u64 = loaded.iter().map(|l| l.restores).sum();
    eprintln!(
        "hammer: {secs} s, {syncs} syncs and {restores} restores by {AGENTS} agents, {} gc runs \
         freed {freed} blobs, {} fence retries",
        gc_runs.len(),
        gc_runs
            .iter()
            .map(|r| r["fence_retries"].as_u64().unwrap())
            .sum::<u64>()
    );
    ensure!(
        gc_runs.len() >= 3,
        "only {} gc runs: raise MORGANA_HAMMER_SECS",
        gc_runs.len()
    );
    ensure!(
        restores > 0,
        "no restore ran beside the collections: raise MORGANA_HAMMER_SECS"
    );
    ensure!(
        freed > 0,
        "the collections freed nothing while agents made garbage"
    );
    ensure!(
        last["snapshots_kept"].as_u64() == Some(2 * AGENTS as u64),
        "expected the newest and the pinned snapshot of each device: {last}"
    );

    let check = appliance.check();
    ensure!(
        check.status.success(),
        "morgana check after the hammer: {}",
        stderr(&check)
    );
    for l in &loaded {
        let listed = l.agent.snapshots()?;
        let mut ids: Vec<&str> = listed
            .as_array()
            .context("snapshots --json is not a list")?
            .iter()
            .map(|s| s["id"].as_str().unwrap())
            .collect();
        ids.sort();
        let mut expected = vec![l.pinned.as_str(), l.newest.as_str()];
        expected.sort();
        ensure!(ids == expected, "retained {ids:?}, expected {expected:?}");
        for id in expected {
            let out = tmp.path().join(format!("restored-{id}"));
            let r = l.agent.restore(id, &out, None, false);
            ensure!(r.status.success(), "restore of {id}: {}", stderr(&r));
            assert_same_tree(&l.copies.join(id), &out)?;
        }
    }
    Ok(())
}
