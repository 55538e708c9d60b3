//! Branch reflectors (DESIGN flow 5) against real processes on loopback: an appliance, a
//! device given the reflector role, and client devices applying a base layer through it;
//! then the reflector killed in the middle of a download, and a reflector whose cache was
//! damaged on disk. Every target must end byte for byte as the layer says.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use morgana_e2e::*;
use serde_json::Value;

use crate::daemon::{Daemon, device_id, morgana_at, wait_ok};

pub(crate) fn write(root: &Path, path: &str, data: &[u8]) -> Result<()> {
    let p = root.join(path);
    fs::create_dir_all(p.parent().unwrap())?;
    fs::write(&p, data).with_context(|| format!("write {}", p.display()))
}

/// Every file below `root` with its content.
pub(crate) fn contents(root: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let path = e.path();
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            if e.file_type()?.is_dir() {
                stack.push(path);
            } else {
                out.insert(rel, fs::read(&path)?);
            }
        }
    }
    Ok(out)
}

pub(crate) fn morgana_ok(appliance: &Appliance, args: &[&str]) -> Result<String> {
    let out = morgana_at(appliance, args);
    ensure!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A TCP port nobody listens on right now.
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn reflector_list(appliance: &Appliance) -> Result<Vec<Value>> {
    let v: Value = serde_json::from_str(&morgana_ok(appliance, &["reflector", "list", "--json"])?)?;
    Ok(v.as_array().context("reflector list")?.clone())
}

/// The reflector's row once `pred` holds for it.
pub(crate) fn wait_reflector(
    appliance: &Appliance,
    id: &str,
    daemon: &Daemon,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let mut last = Value::Null;
    let found = wait_for(Duration::from_secs(90), || {
        let row = reflector_list(appliance)
            .ok()
            .and_then(|l| l.into_iter().find(|r| r["device_id"] == id));
        match row {
            Some(r) if pred(&r) => {
                last = r;
                true
            }
            Some(r) => {
                last = r;
                false
            }
            None => false,
        }
    });
    ensure!(
        found,
        "reflector {id} never became {what}: {last}\nits log:\n{}",
        daemon.log()
    );
    Ok(last)
}

pub(crate) fn downloads(agent: &Agent) -> Result<Value> {
    let path = agent.state_dir.join("last-download.json");
    let bytes = fs::read(&path).with_context(|| {
        format!(
            "{} is missing: the download did not consider reflectors",
            path.display()
        )
    })?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn from_reflector(d: &Value, id: &str) -> u64 {
    d["from_reflectors"][id].as_u64().unwrap_or(0)
}

struct Client {
    agent: Agent,
    root: PathBuf,
    id: String,
    daemon: Daemon,
}

fn client(appliance: &Appliance, t: &Path, name: &str) -> Result<Client> {
    let root = t.join(name);
    fs::create_dir_all(&root)?;
    let agent = Agent::enroll(appliance, &root, &t.join(format!("{name}-state")))?;
    let id = device_id(&agent)?;
    let daemon = Daemon::start(&agent, "1h", &t.join(format!("{name}.log")))?;
    Ok(Client {
        agent,
        root,
        id,
        daemon,
    })
}

/// Assigns layer `base` to the client, waits for the apply, and checks the result.
fn apply(appliance: &Appliance, c: &Client, want: &BTreeMap<String, Vec<u8>>) -> Result<Value> {
    let out: Value = serde_json::from_str(&morgana_ok(
        appliance,
        &[
            "layer", "assign", "--device", &c.id, "--base", "base", "--json",
        ],
    )?)?;
    let job = out["devices"][0]["job"]
        .as_str()
        .with_context(|| format!("no job queued: {out}"))?;
    wait_ok(appliance, &c.daemon, job)?;
    let mut got = contents(&c.root)?;
    // The apply gives an empty device its own identity; the layer carries none.
    got.remove("etc/machine-id");
    got.remove("etc/hostname");
    ensure!(
        got.keys().collect::<Vec<_>>() == want.keys().collect::<Vec<_>>(),
        "{}: files differ from the layer: {:?}",
        c.id,
        got.keys().collect::<Vec<_>>()
    );
    ensure!(got == *want, "{}: contents differ from the layer", c.id);
    downloads(&c.agent)
}

#[test]
fn layers_come_through_the_branch_reflector_and_fall_back_when_it_dies_or_lies() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let t = tmp.path();
    let appliance = Appliance::start_with(
        &t.join("appliance"),
        &["--gc-every", "off", "--heartbeat-every", "1s"],
    )?;

    // A base layer of incompressible files, so bytes on the wire are the layer's size.
    let refroot = t.join("ref");
    write(&refroot, "etc/app.conf", b"level = 1\n")?;
    for n in 0..6u64 {
        write(
            &refroot,
            &format!("usr/lib/lib{n}.so"),
            &noise(400_000, 10 + n),
        )?;
    }
    write(&refroot, "usr/bin/tool", &noise(300_000, 2))?;
    let reference = Agent::enroll(&appliance, &refroot, &t.join("ref-state"))?;
    reference.sync()?;
    let ref_id = device_id(&reference)?;
    morgana_ok(&appliance, &["reference", "mark", &ref_id])?;
    morgana_ok(
        &appliance,
        &["layer", "capture-base", "base", "--device", &ref_id],
    )?;
    let want = contents(&refroot)?;
    let layer_bytes: u64 = want.values().map(|v| v.len() as u64).sum();

    // The reflector: an enrolled device of its own, given the role.
    let rroot = t.join("reflector");
    fs::create_dir_all(&rroot)?;
    let ragent = Agent::enroll(&appliance, &rroot, &t.join("reflector-state"))?;
    let rid = device_id(&ragent)?;
    let port = free_port()?;
    let rlog = t.join("reflector.log");
    let rdaemon = Daemon::start(&ragent, "1h", &rlog)?;
    morgana_ok(
        &appliance,
        &[
            "reflector",
            "enable",
            &rid,
            "--port",
            &port.to_string(),
            "--site",
            "lyon",
        ],
    )?;
    let row = wait_reflector(&appliance, &rid, &rdaemon, "live", |r| r["live"] == true)?;
    ensure!(
        row["address"] == "127.0.0.1" && row["port"] == port,
        "{row}"
    );
    ensure!(
        row["site"] == "lyon" && row["subnet"] == "127.0.0.0/8",
        "{row}"
    );

    // Without a device certificate of this appliance, the reflector answers nobody.
    let anonymous = std::process::Command::new("curl")
        .args(["-sS", "-k", "-o", "/dev/null", "-X", "POST"])
        .arg(format!("https://127.0.0.1:{port}/v1/blobs"))
        .output()?;
    ensure!(
        !anonymous.status.success(),
        "a client without a certificate was served"
    );

    // First client: the reflector fills its cache from the appliance as it serves.
    let a = client(&appliance, t, "client-a")?;
    let da = apply(&appliance, &a, &want)?;
    ensure!(da["ranked"][0] == rid.as_str(), "{da}");
    ensure!(
        from_reflector(&da, &rid) >= layer_bytes,
        "the first client's layer did not come through the reflector: {da}"
    );
    ensure!(da["failed"].as_array().unwrap().is_empty(), "{da}");

    // Second client: every blob from the reflector's cache, nothing from the appliance.
    let b = client(&appliance, t, "client-b")?;
    let db = apply(&appliance, &b, &want)?;
    let b_reflected = from_reflector(&db, &rid);
    ensure!(
        b_reflected >= layer_bytes && db["from_appliance"] == 0,
        "the second client should have everything from the reflector: {db}"
    );
    let served = from_reflector(&da, &rid) + b_reflected;
    let row = wait_reflector(&appliance, &rid, &rdaemon, "counting", |r| {
        r["bytes_served"].as_u64().unwrap_or(0) >= served
    })?;
    ensure!(
        row["cache_bytes"].as_u64().unwrap() >= layer_bytes,
        "the cache should hold the layer: {row}"
    );
    eprintln!(
        "layer {layer_bytes} B; client b: {b_reflected} B from the reflector, {} B from the \
         appliance; reflector served {} B, caches {} B",
        db["from_appliance"], row["bytes_served"], row["cache_bytes"]
    );

    // Killed in the middle of an answer: the apply still ends right, through the appliance.
    rdaemon.stop()?;
    let mut rdaemon = Daemon::start_env(
        &ragent,
        "1h",
        &rlog,
        &[("MORGANA_AGENT_REFLECTOR_DIE_AFTER_BLOBS", "5")],
    )?;
    wait_reflector(&appliance, &rid, &rdaemon, "live again", |r| {
        r["live"] == true && r["bytes_served"] == 0
    })?;
    let c = client(&appliance, t, "client-c")?;
    let dc = apply(&appliance, &c, &want)?;
    ensure!(
        from_reflector(&dc, &rid) > 0 && dc["from_appliance"].as_u64().unwrap() > 0,
        "the download should have begun at the reflector and ended at the appliance: {dc}"
    );
    ensure!(dc["failed"][0]["reflector"] == rid.as_str(), "{dc}");
    ensure!(
        wait_for(Duration::from_secs(30), || !rdaemon.running()),
        "the reflector did not die as the hook says:\n{}",
        rdaemon.log()
    );

    // A damaged cache: a chunk flipped on the reflector's disk is caught by the client,
    // which takes that blob and the rest from the appliance.
    let rdaemon = Daemon::start(&ragent, "1h", &rlog)?;
    let mut damaged = 0;
    for f in walk(&ragent.state_dir.join("reflector-cache")) {
        let mut bytes = fs::read(&f)?;
        // Frame header: id (32), kind (0 = chunk), …; damage the chunks' last byte.
        if bytes.len() > 42 + 1000 && bytes[32] == 0 {
            *bytes.last_mut().unwrap() ^= 0x55;
            fs::write(&f, &bytes)?;
            damaged += 1;
        }
    }
    ensure!(damaged > 0, "no chunk in the reflector's cache to damage");
    wait_reflector(&appliance, &rid, &rdaemon, "live again", |r| {
        r["live"] == true && r["bytes_served"] == 0
    })?;
    let d = client(&appliance, t, "client-d")?;
    let dd = apply(&appliance, &d, &want)?;
    let failed = dd["failed"].as_array().unwrap();
    ensure!(
        failed.len() == 1
            && failed[0]["reflector"] == rid.as_str()
            && failed[0]["reason"]
                .as_str()
                .unwrap()
                .contains("does not verify"),
        "the damaged blob should have been caught: {dd}"
    );
    ensure!(dd["from_appliance"].as_u64().unwrap() > 0, "{dd}");

    // The role taken away: the reflector stops serving, and downloads go to the appliance.
    morgana_ok(&appliance, &["reflector", "disable", &rid])?;
    ensure!(
        wait_for(Duration::from_secs(60), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        }),
        "the reflector still listens after its role was taken away:\n{}",
        rdaemon.log()
    );
    let list = reflector_list(&appliance)?;
    ensure!(
        list[0]["enabled"] == false && list[0]["live"] == false,
        "{list:?}"
    );
    Ok(())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}
