//! WASM plugins through the real host: the example plugins (built here from `plugins/`)
//! answer exactly as their built-in twins, hostile fixtures are stopped by the limit meant
//! for them while the process carries on, and `morgana plugin` refuses a component of the
//! wrong world and prints `plugin test` results as JSON.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use morgana_core::plugin::host::{Limits, Plugin, PluginHost};
use morgana_core::plugin::types::*;
use morgana_core::plugin::{
    BuiltinDriverMatcher, BuiltinLayerRules, BuiltinReflectorSelector, DriverMatcher, Fallback,
    Hook, LayerRules, PluginError, ReflectorSelector,
};
use morgana_e2e::*;

const RUST_PLUGINS: &[&str] = &[
    "driver-matcher",
    "layer-rules",
    "reflector-selector",
    "infinite-loop",
    "unbounded-alloc",
    "trap",
    "huge-result",
    "wrong-world",
];

fn plugins_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins")
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds every Rust plugin once per test process (release: components are small and fast
/// whatever profile the tests use) and returns the directory holding the `.wasm` files.
fn rust_plugins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = plugins_dir();
        // One crate per invocation: the SDK's hook features must not be unified.
        for name in RUST_PLUGINS {
            let status = cargo()
                .args([
                    "build",
                    "--release",
                    "--target",
                    "wasm32-wasip2",
                    "-p",
                    name,
                ])
                .current_dir(&dir)
                .status()
                .expect("run cargo build in plugins/");
            assert!(
                status.success(),
                "building plugin {name} failed (is the target installed? \
                 `rustup target add wasm32-wasip2`)"
            );
        }
        dir.join("target/wasm32-wasip2/release")
    })
}

fn rust_plugin(name: &str) -> Vec<u8> {
    let path = rust_plugins().join(format!("{}.wasm", name.replace('-', "_")));
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The JavaScript example, built with componentize-js (installing its npm packages on
/// first use). Rebuilt only when its sources are newer than the component.
fn js_plugin() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_js().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_js() -> Result<PathBuf> {
    let dir = plugins_dir().join("examples/driver-matcher-js");
    let out = dir.join("driver-matcher-js.wasm");
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let newest_source = [
        "driver-matcher.js",
        "package.json",
        "../../../wit/types.wit",
    ]
    .iter()
    .filter_map(|f| mtime(&dir.join(f)))
    .max();
    if mtime(&out).is_some() && mtime(&out) >= newest_source {
        return Ok(out);
    }
    if !dir.join("node_modules/.bin/componentize-js").exists() {
        run_ok(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund"])
                .current_dir(&dir),
        )
        .context("npm install for the JavaScript example (is Node.js 20+ installed?)")?;
    }
    run_ok(Command::new("npm").args(["run", "build"]).current_dir(&dir))
        .context("componentize-js build of the JavaScript example")?;
    Ok(out)
}

/// One host per test process; compiled code is cached beside the test binaries so that
/// later runs skip the (debug-build-slow) compile.
fn host() -> &'static PluginHost {
    static HOST: OnceLock<PluginHost> = OnceLock::new();
    HOST.get_or_init(|| {
        let cache = bin_dir().join("plugin-cache");
        PluginHost::new(Some(cache), Limits::default()).expect("plugin host")
    })
}

fn load(name: &str, hook: Hook) -> Plugin {
    host()
        .load(name, hook, &rust_plugin(name))
        .unwrap_or_else(|e| panic!("load {name}: {e}"))
}

// ---- Shared tables of cases ----

fn inventories() -> Vec<HardwareInventory> {
    let pci = |v, d| PciDevice {
        vendor_id: v,
        device_id: d,
    };
    vec![
        HardwareInventory {
            vendor: "LENOVO".into(),
            model: "ThinkPad T14 Gen 3".into(),
            os: "debian 12".into(),
            pci_devices: vec![pci(0x8086, 0x15f3), pci(0x10de, 0x1f95)],
        },
        HardwareInventory {
            vendor: "Dell Inc.".into(),
            model: "Latitude 5440".into(),
            os: "windows 11".into(),
            pci_devices: vec![pci(0x8086, 0xa7a0), pci(0x10ec, 0x8168)],
        },
        HardwareInventory {
            vendor: "HP".into(),
            model: "EliteDesk 800 G6".into(),
            os: "ubuntu 24.04".into(),
            pci_devices: vec![],
        },
        HardwareInventory {
            vendor: "Straße GmbH".into(),
            model: "ÉCLAIR *".into(),
            os: "".into(),
            pci_devices: vec![pci(0x1002, 0x73bf)],
        },
    ]
}

fn profiles() -> Vec<DriverProfile> {
    let c = |field, pattern: &str| Condition {
        field,
        pattern: pattern.into(),
    };
    let p = |id: &str, groups: Vec<Vec<Condition>>| DriverProfile {
        id: id.into(),
        name: id.to_uppercase(),
        any_of: groups.into_iter().map(|all| MatchGroup { all }).collect(),
    };
    use InventoryField::*;
    vec![
        p(
            "intel-nic",
            vec![vec![c(Vendor, "lenovo"), c(PciId, "8086:15f3")]],
        ),
        p("any-intel", vec![vec![c(PciId, "8086:*")]]),
        p("amd-gpu", vec![vec![c(PciId, "1002:*")]]),
        p(
            "laptops",
            vec![vec![c(Model, "thinkpad*")], vec![c(Model, "latitude *")]],
        ),
        p("windows", vec![vec![c(Os, "windows*"), c(Vendor, "*")]]),
        p(
            "umlaut",
            vec![vec![c(Vendor, "STRASSE*")], vec![c(Vendor, "straße*")]],
        ),
        p(
            "literal-star",
            vec![vec![c(Model, "éclair \\*"), c(Model, "*\\*")]],
        ),
        p("empty", vec![vec![]]),
        p("nothing", vec![]),
    ]
}

fn layer_entries() -> Vec<FileEntry> {
    let paths = [
        "/",
        "/etc/machine-id",
        "/etc/hostname",
        "/etc/hostname.old",
        "/etc/hosts",
        "/etc/ssh",
        "/etc/ssh/ssh_host_ed25519_key",
        "/etc/ssh/ssh_host_ecdsa_key.pub",
        "/etc/ssh/sshd_config",
        "/var/lib/dbus/machine-id",
        "/home",
        "/home/ann/Documents/report.odt",
        "/home/ann/.cache/fontconfig/x",
        "/homework/notes",
        "/root",
        "/root/.bash_history",
        "/rootfs/x",
        "/tmp/.X11-unix/X0",
        "/var/tmp/foo",
        "/var/cache/apt/archives/bash.deb",
        "/var/log/syslog",
        "/var/lib/apt/lists/deb.debian.org_dists",
        "/var/lib/dpkg/status",
        "/proc/self",
        "/sys/kernel",
        "/dev/null",
        "/run/user/1000",
        "/usr/bin/bash",
        "/usr/share/fonts/été.ttf",
        "/opt/app/bin/app",
        "/lost+found",
        "/swapfile",
        "/swap.img",
        "/var/lib/morgana-agent/device.json",
    ];
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| FileEntry {
            path: (*p).into(),
            kind: if i % 3 == 0 {
                FileKind::Directory
            } else {
                FileKind::File
            },
            size: i as u64 * 100,
            mode: 0o100644,
        })
        .collect()
}

fn layer_context() -> LayerContext {
    LayerContext {
        layer_name: "debian-12-base".into(),
        kind: LayerKind::Base,
        os: "debian 12".into(),
    }
}

fn reflector_cases() -> Vec<(ClientInfo, SelectorPolicy, Vec<ReflectorCandidate>)> {
    let cand = |id: &str, subnet: &str, site: Option<&str>, load: f32, lat: Option<f32>| {
        ReflectorCandidate {
            id: id.into(),
            address: format!("{}:8444", subnet.split('/').next().unwrap()),
            subnet: subnet.into(),
            site: site.map(Into::into),
            load,
            latency_ms: lat,
        }
    };
    let client = |addr: &str, site: Option<&str>| ClientInfo {
        device_id: "dev-1".into(),
        address: addr.into(),
        site: site.map(Into::into),
    };
    let policy = |subnets: &[&str], threshold| SelectorPolicy {
        preferred_subnets: subnets.iter().map(|s| s.to_string()).collect(),
        latency_threshold_ms: threshold,
    };
    let all = vec![
        cand("far-fast", "192.168.7.0/24", None, 0.1, Some(5.0)),
        cand("same-net-busy", "10.1.2.0/24", None, 0.9, Some(3.0)),
        cand("same-net", "10.1.2.0/24", None, 0.2, Some(3.0)),
        cand("same-net-unmeasured", "10.1.2.0/24", None, 0.2, None),
        cand("preferred", "10.9.4.0/24", None, 0.0, None),
        cand("site", "172.16.0.0/24", Some("paris"), 0.0, Some(30.0)),
        cand("far-slow", "192.168.8.0/24", None, 0.0, Some(80.0)),
        cand("saturated", "10.1.2.0/24", None, 1.0, Some(1.0)),
        cand("v6", "fd00:1::/64", Some("lyon"), 0.3, Some(2.0)),
        cand(
            "broken-subnet",
            "not a subnet",
            Some("paris"),
            0.5,
            Some(1.0),
        ),
        cand("tie-b", "192.168.9.0/24", None, 0.5, Some(9.0)),
        cand("tie-a", "192.168.9.0/24", None, 0.5, Some(9.0)),
    ];
    vec![
        (
            client("10.1.2.50", Some("paris")),
            policy(&["10.9.0.0/16"], 20.0),
            all.clone(),
        ),
        (
            client("10.1.2.50:51000", None),
            policy(&[], 10.0),
            all.clone(),
        ),
        (
            client("fd00:1::7", Some("lyon")),
            policy(&["fd00::/16"], 1.0),
            all.clone(),
        ),
        (
            client("[fd00:1::7]:4000", None),
            policy(&["0.0.0.0/0"], 0.0),
            all.clone(),
        ),
        (
            client("garbage", Some("berlin")),
            policy(&["bad/99"], 100.0),
            all.clone(),
        ),
        (
            client("10.1.2.50", Some("paris")),
            policy(&[], 50.0),
            vec![],
        ),
        (client("10.200.0.1", None), policy(&[], 1.0), all),
    ]
}

fn check_driver_twin(plugin: &dyn DriverMatcher, what: &str) {
    let profiles = profiles();
    for inv in inventories() {
        let want = BuiltinDriverMatcher
            .match_profiles(&inv, &profiles)
            .unwrap();
        let got = plugin
            .match_profiles(&inv, &profiles)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got, want, "{what} disagrees with the built-in on {inv:?}");
    }
}

fn driver_of(p: &Plugin) -> &dyn DriverMatcher {
    match p {
        Plugin::DriverMatcher(d) => d,
        _ => panic!("not a driver matcher"),
    }
}

#[test]
fn rust_examples_agree_with_their_builtin_twins() {
    crate::init();
    // The table must exercise every outcome, or agreement would prove little.
    let builtin = BuiltinLayerRules
        .classify(&layer_context(), &layer_entries())
        .unwrap();
    let kinds: std::collections::HashSet<_> = builtin.iter().map(|d| d.kind).collect();
    assert_eq!(kinds.len(), 4, "table covers every disposition");

    let drivers = load("driver-matcher", Hook::DriverMatcher);
    check_driver_twin(driver_of(&drivers), "driver-matcher example");

    let Plugin::LayerRules(layer) = load("layer-rules", Hook::LayerRules) else {
        panic!("layer-rules loaded as another hook")
    };
    assert_eq!(
        layer.classify(&layer_context(), &layer_entries()).unwrap(),
        builtin
    );
    // A whole tree, through several host batches.
    let tree = morgana_core::plugin::layer::synthetic_tree(20_000);
    assert_eq!(
        layer.classify(&layer_context(), &tree).unwrap(),
        BuiltinLayerRules.classify(&layer_context(), &tree).unwrap()
    );

    let Plugin::ReflectorSelector(refl) = load("reflector-selector", Hook::ReflectorSelector)
    else {
        panic!("reflector-selector loaded as another hook")
    };
    let mut non_empty = 0;
    for (client, policy, cands) in reflector_cases() {
        let want = BuiltinReflectorSelector
            .rank(&client, &policy, &cands)
            .unwrap();
        non_empty += usize::from(!want.is_empty());
        assert_eq!(
            refl.rank(&client, &policy, &cands).unwrap(),
            want,
            "reflector-selector example disagrees on {client:?} {policy:?}"
        );
    }
    assert!(non_empty >= 4, "the table ranks something in most cases");
}

#[test]
fn javascript_example_agrees_with_the_builtin() {
    crate::init();
    let path = js_plugin().expect("build the JavaScript example");
    let bytes = std::fs::read(&path).unwrap();
    let plugin = host()
        .load("driver-matcher-js", Hook::DriverMatcher, &bytes)
        .unwrap_or_else(|e| panic!("{e}"));
    check_driver_twin(driver_of(&plugin), "JavaScript driver-matcher");
    let Plugin::DriverMatcher(d) = &plugin else {
        unreachable!()
    };
    let (_, report) = d.call(&inventories()[0], &profiles());
    assert!(
        report
            .log
            .iter()
            .any(|l| l.message.contains("profiles apply")),
        "the JS plugin's log call reached the host: {report:?}"
    );
}

/// Runs one hostile call and returns its error and how long it took.
fn stopped(plugin: &Plugin) -> (PluginError, Duration) {
    let start = Instant::now();
    let result = match plugin {
        Plugin::LayerRules(p) => p.classify(&layer_context(), &layer_entries()).map(drop),
        Plugin::DriverMatcher(p) => p.match_profiles(&inventories()[0], &profiles()).map(drop),
        Plugin::ReflectorSelector(p) => {
            let (c, pol, cands) = reflector_cases().remove(0);
            p.rank(&c, &pol, &cands).map(drop)
        }
    };
    let took = start.elapsed();
    (result.expect_err("a hostile plugin must fail"), took)
}

#[test]
fn hostile_plugins_are_stopped_by_their_limit_and_the_host_carries_on() {
    crate::init();
    let limits = Limits::default();
    let good = load("layer-rules", Hook::LayerRules);
    let Plugin::LayerRules(good_layer) = &good else {
        unreachable!()
    };
    let still_works = || {
        assert_eq!(
            good_layer
                .classify(&layer_context(), &layer_entries())
                .unwrap(),
            BuiltinLayerRules
                .classify(&layer_context(), &layer_entries())
                .unwrap()
        )
    };

    let looping = load("infinite-loop", Hook::LayerRules);
    let (e, took) = stopped(&looping);
    assert!(matches!(e, PluginError::OutOfFuel { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("infinite-loop") && msg.contains("layer-rules"),
        "{msg}"
    );
    eprintln!("infinite-loop: {msg} after {took:?}");
    assert!(took < limits.deadline, "fuel stops it before the deadline");
    // The trapped instance was dropped; the next call starts afresh and fails the same way.
    assert!(matches!(stopped(&looping).0, PluginError::OutOfFuel { .. }));
    still_works();

    // With fuel to spare, the epoch deadline is what stops it.
    let deadline = Duration::from_millis(300);
    let patient = PluginHost::new(
        Some(bin_dir().join("plugin-cache")),
        Limits {
            fuel: u64::MAX / 2,
            deadline,
            ..limits
        },
    )
    .unwrap();
    let looping = patient
        .load(
            "infinite-loop",
            Hook::LayerRules,
            &rust_plugin("infinite-loop"),
        )
        .unwrap();
    let (e, took) = stopped(&looping);
    assert!(
        matches!(e, PluginError::Deadline { limit_ms: 300, .. }),
        "{e}"
    );
    eprintln!("infinite-loop, unlimited fuel: {e} after {took:?}");
    assert!(took >= deadline && took < deadline * 4, "{took:?}");

    let hog = load("unbounded-alloc", Hook::LayerRules);
    let (e, took) = stopped(&hog);
    assert!(matches!(e, PluginError::MemoryLimit { .. }), "{e}");
    eprintln!("unbounded-alloc: {e} after {took:?}");
    still_works();

    let trap = load("trap", Hook::ReflectorSelector);
    let (e, took) = stopped(&trap);
    let PluginError::Trap { detail, .. } = &e else {
        panic!("expected a trap, got {e}")
    };
    assert!(detail.contains("unreachable"), "{detail}");
    eprintln!("trap: {e} after {took:?}");

    let flood = load("huge-result", Hook::DriverMatcher);
    let (e, took) = stopped(&flood);
    assert!(matches!(e, PluginError::Malformed { .. }), "{e}");
    assert!(e.to_string().contains("100000 matches"), "{e}");
    eprintln!("huge-result: {e} after {took:?}");
    still_works();

    // Callers never see the failure as a failure of the decision: the built-in answers.
    let Plugin::ReflectorSelector(trap) = trap else {
        unreachable!()
    };
    let hook = Fallback::new(Some(trap), BuiltinReflectorSelector);
    let (c, pol, cands) = reflector_cases().remove(0);
    let d = hook.rank(&c, &pol, &cands).unwrap();
    assert_eq!(
        d.value,
        BuiltinReflectorSelector.rank(&c, &pol, &cands).unwrap()
    );
    let failure = d.failure.expect("the failure is reported");
    assert_eq!(
        (failure.plugin.as_str(), failure.hook),
        ("trap", Hook::ReflectorSelector)
    );
}

#[test]
fn wrong_world_components_are_refused_by_the_host_naming_the_export() {
    crate::init();
    let err = host()
        .load("wrong-world", Hook::LayerRules, &rust_plugin("wrong-world"))
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, PluginError::WrongWorld { .. }), "{msg}");
    assert!(
        msg.contains("`classify`") && msg.contains("classify-file"),
        "{msg}"
    );

    let err = host()
        .load(
            "driver-matcher",
            Hook::ReflectorSelector,
            &rust_plugin("driver-matcher"),
        )
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("morgana:plugins/reflector-ranking@0.1.0"),
        "{msg}"
    );
    assert!(
        msg.contains("morgana:plugins/driver-matching@0.1.0"),
        "{msg}"
    );

    let err = host()
        .load("junk", Hook::LayerRules, b"\0asm not really")
        .err()
        .expect("refused");
    assert!(matches!(err, PluginError::Invalid { .. }), "{err}");
}

fn wasm_file(name: &str) -> PathBuf {
    rust_plugins().join(format!("{}.wasm", name.replace('-', "_")))
}

#[test]
fn plugin_cli_adds_versions_enables_and_refuses_the_wrong_world() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let plugin = |args: &[&str]| {
        let mut cmd = morgana();
        cmd.arg("plugin").args(args).arg("--data-dir").arg(&data);
        cmd
    };
    let wrong = wasm_file("wrong-world");
    let out = plugin(&["add", wrong.to_str().unwrap(), "--hook", "layer-rules"]).output()?;
    ensure!(!out.status.success(), "wrong world accepted");
    let err = stderr(&out);
    ensure!(
        err.contains("`classify`") && err.contains("layer-classification"),
        "refusal does not name the missing export: {err}"
    );

    let layer = wasm_file("layer-rules");
    let add = |extra: &[&str]| -> Result<String> {
        let mut args = vec!["add", layer.to_str().unwrap(), "--hook", "layer-rules"];
        args.extend_from_slice(extra);
        Ok(String::from_utf8(run_ok(&mut plugin(&args))?.stdout)?)
    };
    let first = add(&[])?;
    ensure!(
        first.contains("layer_rules v1") && first.contains("inactive"),
        "{first}"
    );
    let second = add(&["--enable"])?;
    ensure!(
        second.contains("layer_rules v2") && second.contains("active"),
        "{second}"
    );
    let stored = data.join("plugins").join(format!(
        "{}.wasm",
        morgana_core::Id::of(&std::fs::read(&layer)?).to_hex()
    ));
    ensure!(
        stored.is_file(),
        "component not stored at {}",
        stored.display()
    );

    let list = String::from_utf8(run_ok(&mut plugin(&["list"]))?.stdout)?;
    let active: Vec<&str> = list.lines().filter(|l| l.contains(" active ")).collect();
    ensure!(active.len() == 1 && active[0].contains("  2  "), "{list}");

    run_ok(&mut plugin(&["enable", "1"]))?;
    let list = String::from_utf8(run_ok(&mut plugin(&["list"]))?.stdout)?;
    let active: Vec<&str> = list.lines().filter(|l| l.contains(" active ")).collect();
    ensure!(
        active.len() == 1 && active[0].trim_start().starts_with("1 "),
        "{list}"
    );
    run_ok(&mut plugin(&["disable", "1"]))?;
    let list = String::from_utf8(run_ok(&mut plugin(&["list"]))?.stdout)?;
    ensure!(!list.contains(" active "), "{list}");

    let out = plugin(&["enable", "42"]).output()?;
    ensure!(!out.status.success() && stderr(&out).contains("no plugin with id 42"));
    Ok(())
}

#[test]
fn plugin_test_prints_the_result_fuel_and_time_as_json() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let input = tmp.path().join("input.json");
    let entries = layer_entries();
    std::fs::write(
        &input,
        serde_json::to_vec(&LayerRulesInput {
            context: layer_context(),
            entries: entries.clone(),
        })?,
    )?;
    let test = |name: &str| {
        let mut cmd = morgana();
        cmd.args(["plugin", "test"])
            .arg(wasm_file(name))
            .args(["--hook", "layer-rules", "--input"])
            .arg(&input);
        cmd
    };
    let out = run_ok(&mut test("layer-rules"))?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stdout).to_string())?;
    ensure!(json["ok"] == true, "{json}");
    ensure!(json["fuel_used"].as_u64().unwrap_or(0) > 0, "{json}");
    ensure!(json["elapsed_us"].as_u64().is_some(), "{json}");
    let got: Vec<Disposition> = serde_json::from_value(json["result"].clone())?;
    ensure!(got == BuiltinLayerRules.classify(&layer_context(), &entries)?);

    let out = test("infinite-loop")
        .arg("--fuel")
        .arg("5000000")
        .output()?;
    ensure!(out.status.code() == Some(1), "exit {:?}", out.status);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(json["ok"] == false, "{json}");
    let error = json["error"].as_str().unwrap_or_default();
    ensure!(error.contains("ran out of fuel (5000000 units)"), "{json}");
    ensure!(json["fuel_used"] == 5_000_000, "{json}");
    Ok(())
}

fn agent_ranking(agent: &Agent, candidates: &Path) -> Result<serde_json::Value> {
    let out = run_ok(
        agent
            .cmd("reflectors")
            .arg("--candidates")
            .arg(candidates)
            .arg("--json"),
    )?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stdout).to_string())
}

/// What the built-in says about the very inputs the agent used (its own address, the
/// latencies it measured, the device's policy as `policy` gives it).
fn builtin_twin(ranking: &serde_json::Value, policy: &SelectorPolicy) -> Result<Vec<String>> {
    let client: ClientInfo = serde_json::from_value(ranking["client"].clone())?;
    let candidates: Vec<ReflectorCandidate> =
        serde_json::from_value(ranking["candidates"].clone())?;
    Ok(BuiltinReflectorSelector.rank(&client, policy, &candidates)?)
}

fn ranked(ranking: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(ranking["ranked"].clone()).unwrap_or_default()
}

/// The `reflector-selector` hook runs on the agent: the built-in by default, under the
/// device policy's reflector settings; the appliance's active plugin once one is enabled
/// (fetched once, then kept while unchanged); and a plugin that traps falls back to the
/// built-in, with a `plugin.failed` event on the appliance naming the device.
#[test]
fn the_agent_ranks_reflectors_with_the_appliances_plugin_or_the_builtin() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root)?;
    let (appliance, agent) = one_device(tmp.path(), &root)?;
    let cand =
        |id: &str, address: &str, subnet: &str, latency_ms: Option<f32>| ReflectorCandidate {
            id: id.into(),
            address: address.into(),
            subnet: subnet.into(),
            site: None,
            load: 0.1,
            latency_ms,
        };
    // Only loopback addresses are ever probed: the others carry a latency already.
    let candidates = vec![
        cand("slow", "203.0.113.9:8444", "203.0.113.0/24", Some(500.0)),
        cand(
            "measured",
            &format!("127.0.0.1:{}", appliance.port()),
            "192.0.2.0/24",
            None,
        ),
        cand("preferred", "10.8.0.7:8444", "10.8.0.0/24", Some(45.0)),
        cand("dead", "127.0.0.1:1", "198.51.100.0/24", None),
        cand("near", "127.0.0.2:8444", "127.0.0.0/8", Some(40.0)),
    ];
    let file = tmp.path().join("candidates.json");
    std::fs::write(&file, serde_json::to_vec(&candidates)?)?;
    let default_policy = SelectorPolicy {
        preferred_subnets: vec![],
        latency_threshold_ms: 30.0,
    };

    let r = agent_ranking(&agent, &file)?;
    ensure!(
        r["decided_by"] == "built-in" && r["plugin_failure"].is_null(),
        "{r}"
    );
    ensure!(r["client"]["address"] == "127.0.0.1", "{r}");
    ensure!(ranked(&r) == ["near", "measured"], "{r}");
    ensure!(ranked(&r) == builtin_twin(&r, &default_policy)?, "{r}");
    let measured = &r["candidates"][1]["latency_ms"];
    ensure!(measured.as_f64().is_some_and(|l| l < 30.0), "{r}");
    ensure!(r["candidates"][3]["latency_ms"].is_null(), "{r}");

    let policy_file = tmp.path().join("branch.toml");
    std::fs::write(
        &policy_file,
        "[reflectors]\npreferred_subnets = [\"10.8.0.0/16\"]\nlatency_threshold_ms = 30\n",
    )?;
    let data_cmd = |args: &[&str]| {
        let mut c = morgana();
        c.args(args).arg("--data-dir").arg(&appliance.data_dir);
        c
    };
    run_ok(
        data_cmd(&["policy", "set", "branch"])
            .arg("--file")
            .arg(&policy_file),
    )?;
    let device: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent.state_dir.join("device.json"))?)?;
    let device_id = device["device_id"]
        .as_str()
        .context("device id")?
        .to_owned();
    run_ok(&mut data_cmd(&["policy", "assign", "branch", &device_id]))?;
    let branch_policy = SelectorPolicy {
        preferred_subnets: vec!["10.8.0.0/16".into()],
        latency_threshold_ms: 30.0,
    };
    let r = agent_ranking(&agent, &file)?;
    ensure!(ranked(&r) == ["near", "preferred", "measured"], "{r}");
    ensure!(ranked(&r) == builtin_twin(&r, &branch_policy)?, "{r}");

    let selector = wasm_file("reflector-selector");
    run_ok(data_cmd(&["plugin", "add"]).arg(&selector).args([
        "--hook",
        "reflector-selector",
        "--enable",
    ]))?;
    let r = agent_ranking(&agent, &file)?;
    ensure!(r["decided_by"] == "plugin reflector_selector v1", "{r}");
    ensure!(r["plugin_failure"].is_null(), "{r}");
    ensure!(ranked(&r) == builtin_twin(&r, &branch_policy)?, "{r}");
    let held = agent.state_dir.join("reflector-selector.wasm");
    ensure!(std::fs::read(&held)? == std::fs::read(&selector)?);
    let fetched_at = std::fs::metadata(&held)?.modified()?;
    std::thread::sleep(Duration::from_millis(20));
    let r = agent_ranking(&agent, &file)?;
    ensure!(r["decided_by"] == "plugin reflector_selector v1", "{r}");
    ensure!(
        std::fs::metadata(&held)?.modified()? == fetched_at,
        "an unchanged plugin was downloaded again"
    );

    run_ok(data_cmd(&["plugin", "add"]).arg(wasm_file("trap")).args([
        "--hook",
        "reflector-selector",
        "--enable",
    ]))?;
    let r = agent_ranking(&agent, &file)?;
    ensure!(r["decided_by"] == "built-in", "{r}");
    let failure = r["plugin_failure"].as_str().unwrap_or_default();
    ensure!(
        failure.contains("trap") && failure.contains("reflector-selector"),
        "{r}"
    );
    ensure!(ranked(&r) == builtin_twin(&r, &branch_policy)?, "{r}");
    let out = run_ok(&mut data_cmd(&[
        "events",
        "--json",
        "--kind",
        "plugin.failed",
    ]))?;
    let events = String::from_utf8(out.stdout)?;
    ensure!(
        events.contains(&device_id) && events.contains("trap"),
        "no plugin.failed event names the device: {events}"
    );

    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, "{\"id\": 1}")?;
    let out = agent
        .cmd("reflectors")
        .arg("--candidates")
        .arg(&bad)
        .output()?;
    ensure!(
        !out.status.success()
            && stderr(&out).contains("is not a JSON array of reflector candidates"),
        "{}",
        stderr(&out)
    );
    Ok(())
}
