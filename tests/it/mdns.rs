//! Reflector discovery over mDNS, inside network namespaces this test creates (multicast
//! must never leave them): a bridge namespace holding the appliance, and a reflector and a
//! client each in a namespace of their own on a veth pair into that bridge, like desktops
//! on one branch office switch. The client finds the reflector by its `_morgana-br._tcp`
//! advertisement and fetches a layer from it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use morgana_e2e::*;
use serde_json::Value;

use crate::reflectors::{contents, free_port, morgana_ok, write};

/// Network namespaces made for one test; deleted on drop, whatever happened.
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn new() -> Namespaces {
        Namespaces { names: Vec::new() }
    }

    fn add(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.names.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        anyhow::anyhow!(
            "cannot run `ip` ({e}): this test needs iproute2 (`apt-get install iproute2`, as \
             .ci/run does) and root"
        )
    })?;
    ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(bin_dir().join(program));
    c
}

/// `morgana-agent run` inside a namespace; killed on drop.
struct NsDaemon {
    child: Child,
    log: PathBuf,
}

impl NsDaemon {
    fn start(ns: &str, state: &Path, log: &Path) -> Result<NsDaemon> {
        let file = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = in_ns(ns, "morgana-agent")
            .args(["run", "--sync-every", "1h", "--mdns", "--state-dir"])
            .arg(state)
            .env("MORGANA_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("spawn morgana-agent run in its namespace")?;
        Ok(NsDaemon {
            child,
            log: log.to_path_buf(),
        })
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NsDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn enroll(ns: &str, appliance: &Appliance, root: &Path, state: &Path) -> Result<String> {
    fs::create_dir_all(root)?;
    let token = appliance.token()?;
    run_ok(
        in_ns(ns, "morgana-agent")
            .args(["enroll", "--server", &appliance.url, "--token", &token])
            .arg("--root")
            .arg(root)
            .arg("--state-dir")
            .arg(state),
    )?;
    let json: Value = serde_json::from_slice(&fs::read(state.join("device.json"))?)?;
    Ok(json["device_id"].as_str().context("device_id")?.to_owned())
}

#[test]
fn a_client_finds_the_branch_reflector_over_mdns_and_downloads_from_it() -> Result<()> {
    crate::init();
    if !is_root() {
        bail!("this test creates network namespaces: run it as root");
    }
    let tmp = tempfile::tempdir()?;
    let t = tmp.path();
    // Short, unique names: interface names have at most 15 bytes.
    let tag = format!("mg{}", std::process::id() % 100_000);
    let (br, rn, cn) = (format!("{tag}b"), format!("{tag}r"), format!("{tag}c"));
    let mut spaces = Namespaces::new();
    spaces.add(&br)?;
    ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &br, "addr", "add", "10.77.0.1/24", "dev", "br0"])?;
    ip(&["-n", &br, "link", "set", "br0", "up"])?;
    for (ns, addr) in [(&rn, "10.77.0.2/24"), (&cn, "10.77.0.3/24")] {
        spaces.add(ns)?;
        let (inner, outer) = (format!("{ns}i"), format!("{ns}o"));
        ip(&[
            "link", "add", &inner, "netns", ns, "type", "veth", "peer", "name", &outer, "netns",
            &br,
        ])?;
        ip(&["-n", &br, "link", "set", &outer, "master", "br0", "up"])?;
        ip(&["-n", ns, "addr", "add", addr, "dev", &inner])?;
        ip(&["-n", ns, "link", "set", &inner, "up"])?;
    }

    let appliance = Appliance::start_in_netns(
        &br,
        &t.join("appliance"),
        "10.77.0.1:0",
        &["--gc-every", "off", "--heartbeat-every", "1s"],
    )?;

    // A base layer, captured from a reference machine on the client's segment.
    let refroot = t.join("ref");
    for n in 0..3u64 {
        write(
            &refroot,
            &format!("usr/lib/lib{n}.so"),
            &noise(300_000, 40 + n),
        )?;
    }
    let ref_state = t.join("ref-state");
    let ref_id = enroll(&cn, &appliance, &refroot, &ref_state)?;
    run_ok(
        in_ns(&cn, "morgana-agent")
            .args(["sync", "--state-dir"])
            .arg(&ref_state),
    )?;
    morgana_ok(&appliance, &["reference", "mark", &ref_id])?;
    morgana_ok(
        &appliance,
        &["layer", "capture-base", "base", "--device", &ref_id],
    )?;
    let want = contents(&refroot)?;

    // The reflector, advertising itself over mDNS.
    let rstate = t.join("reflector-state");
    let rid = enroll(&rn, &appliance, &t.join("reflector"), &rstate)?;
    let reflector = NsDaemon::start(&rn, &rstate, &t.join("reflector.log"))?;
    let port = free_port()?;
    morgana_ok(
        &appliance,
        &[
            "reflector",
            "enable",
            &rid,
            "--port",
            &port.to_string(),
            "--site",
            "branch",
        ],
    )?;

    // The client sees it on the segment, with what its TXT records say.
    let cstate = t.join("client-state");
    let croot = t.join("client");
    let cid = enroll(&cn, &appliance, &croot, &cstate)?;
    let mut last = String::new();
    let seen = wait_for(Duration::from_secs(90), || {
        let out = in_ns(&cn, "morgana-agent")
            .args([
                "reflectors",
                "--discover",
                "--mdns",
                "--json",
                "--state-dir",
            ])
            .arg(&cstate)
            .output();
        let Ok(out) = out else { return false };
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) else {
            return false;
        };
        v["found"].as_array().is_some_and(|f| {
            f.iter().any(|f| {
                f["id"] == rid.as_str()
                    && f["via"] == "mdns"
                    && f["address"] == format!("10.77.0.2:{port}")
            })
        })
    });
    ensure!(
        seen,
        "the client did not find the reflector over mDNS: {last}\nreflector log:\n{}",
        reflector.log()
    );
    let ranking: Value = serde_json::from_str(last.lines().next().unwrap_or("{}"))?;
    let cand = ranking["candidates"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["id"] == rid.as_str()))
        .with_context(|| format!("{ranking}"))?;
    ensure!(
        cand["site"] == "branch" && cand["subnet"] == "10.77.0.0/24",
        "{cand}"
    );
    ensure!(ranking["ranked"][0] == rid.as_str(), "{ranking}");

    // And downloads a layer from it.
    let client = NsDaemon::start(&cn, &cstate, &t.join("client.log"))?;
    let out: Value = serde_json::from_str(&morgana_ok(
        &appliance,
        &[
            "layer", "assign", "--device", &cid, "--base", "base", "--json",
        ],
    )?)?;
    let job = out["devices"][0]["job"].as_str().context("job")?.to_owned();
    let waited = crate::daemon::morgana_at(&appliance, &["job", "wait", &job, "--timeout", "3m"]);
    ensure!(
        waited.status.success(),
        "the apply failed: {}\nclient log:\n{}",
        stderr(&waited),
        client.log()
    );
    let mut got = contents(&croot)?;
    got.remove("etc/machine-id");
    got.remove("etc/hostname");
    ensure!(got == want, "the client's files differ from the layer");
    let d: Value = serde_json::from_slice(&fs::read(cstate.join("last-download.json"))?)?;
    ensure!(
        d["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == rid.as_str() && c["via"] == "mdns"),
        "{d}"
    );
    ensure!(
        d["from_reflectors"][&rid].as_u64().unwrap_or(0) > 0,
        "nothing came from the reflector: {d}"
    );
    drop(client);
    drop(reflector);
    drop(appliance);
    drop(spaces);
    Ok(())
}
