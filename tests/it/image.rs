//! Image management, deployment side: a reference machine's base and app layers assigned
//! to three targets (one by a saved group), the dry run's conflicts, the apply jobs on the
//! agents, a second app version, rollback, and an apply killed in the middle.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use morgana_e2e::*;
use serde_json::Value;

use crate::daemon::{Daemon, device_id, morgana_at, wait_ok};

fn write(root: &Path, path: &str, data: &[u8]) -> Result<()> {
    let p = root.join(path);
    fs::create_dir_all(p.parent().unwrap())?;
    fs::write(&p, data).with_context(|| format!("write {}", p.display()))
}

fn dpkg(version: &str) -> Vec<u8> {
    format!(
        "Package: curl\nStatus: install ok installed\nArchitecture: amd64\nVersion: {version}\n\n\
         Package: tool\nStatus: install ok installed\nVersion: 1.0-1\n"
    )
    .into_bytes()
}

/// Every file and symlink below `root` with its content (a symlink as `-> target`).
fn contents(root: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let path = e.path();
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_symlink() {
                let t = fs::read_link(&path)?;
                out.insert(rel, format!("-> {}", t.display()).into_bytes());
            } else {
                out.insert(rel, fs::read(&path)?);
            }
        }
    }
    Ok(out)
}

fn morgana_ok(appliance: &Appliance, args: &[&str]) -> Result<String> {
    let out = morgana_at(appliance, args);
    ensure!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Only the entries below `prefix` (a top-level folder or file), compared as a map.
fn under(map: &BTreeMap<String, Vec<u8>>, prefixes: &[&str]) -> BTreeMap<String, Vec<u8>> {
    map.iter()
        .filter(|(k, _)| {
            prefixes
                .iter()
                .any(|p| k.as_str() == *p || k.starts_with(&format!("{p}/")))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

struct Target {
    root: std::path::PathBuf,
    agent: Agent,
    id: String,
    daemon: Option<Daemon>,
    log: std::path::PathBuf,
}

#[test]
fn layers_deploy_to_targets_keep_their_own_and_roll_back() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let appliance = Appliance::start_with(&tmp.path().join("appliance"), &["--gc-every", "off"])?;

    // The reference machine: system files, identity, a user.
    let refroot = tmp.path().join("ref");
    write(&refroot, "etc/hostname", b"ref\n")?;
    write(&refroot, "etc/machine-id", b"ref-machine-id\n")?;
    write(&refroot, "etc/app.conf", b"level = 1\n")?;
    write(&refroot, "usr/bin/tool", &noise(200_000, 1))?;
    write(&refroot, "usr/lib/libx.so", &noise(100_000, 2))?;
    write(&refroot, "var/lib/dpkg/status", &dpkg("7.88.1-10"))?;
    write(&refroot, "home/admin/notes.txt", b"reference notes")?;
    let reference = Agent::enroll(&appliance, &refroot, &tmp.path().join("ref-state"))?;
    let before = reference.sync()?["snapshot"].as_str().unwrap().to_owned();
    let ref_id = device_id(&reference)?;
    morgana_ok(&appliance, &["reference", "mark", &ref_id])?;
    morgana_ok(
        &appliance,
        &["layer", "capture-base", "base", "--device", &ref_id],
    )?;
    let base_files = under(&contents(&refroot)?, &["usr", "var", "etc/app.conf"]);

    // App v1: a program and its data.
    write(&refroot, "usr/bin/app", b"app v1")?;
    write(&refroot, "usr/share/app/data-v1", &noise(50_000, 3))?;
    reference.sync()?;
    morgana_ok(
        &appliance,
        &[
            "layer",
            "capture-app",
            "app",
            "--device",
            &ref_id,
            "--before",
            &before,
        ],
    )?;
    let image_v1 = under(&contents(&refroot)?, &["usr", "var", "etc/app.conf"]);

    // Three targets, each with its own identity, user data and an application its user
    // installed; the first changed a layer file and has a newer curl.
    let mut targets = Vec::new();
    for n in 1..=3 {
        let root = tmp.path().join(format!("t{n}"));
        write(&root, "etc/hostname", format!("t{n}\n").as_bytes())?;
        write(&root, "etc/machine-id", format!("machine-{n}\n").as_bytes())?;
        write(&root, "home/user/doc.txt", format!("user {n}").as_bytes())?;
        write(
            &root,
            "opt/mine/tool",
            format!("installed by {n}").as_bytes(),
        )?;
        write(&root, "usr/bin/tool", b"an old tool")?;
        if n == 1 {
            write(&root, "etc/app.conf", b"level = 99 # the user's\n")?;
            write(&root, "var/lib/dpkg/status", &dpkg("7.88.1-10+deb12u5"))?;
        }
        let agent = Agent::enroll(&appliance, &root, &tmp.path().join(format!("t{n}-state")))?;
        agent.sync()?;
        let id = device_id(&agent)?;
        let log = tmp.path().join(format!("t{n}.log"));
        let daemon = Some(Daemon::start(&agent, "1h", &log)?);
        targets.push(Target {
            root,
            agent,
            id,
            daemon,
            log,
        });
    }
    let own = |t: &Target| -> Result<BTreeMap<String, Vec<u8>>> {
        Ok(under(
            &contents(&t.root)?,
            &["etc/hostname", "etc/machine-id", "home", "opt"],
        ))
    };
    let owns: Vec<_> = targets.iter().map(own).collect::<Result<_>>()?;
    morgana_ok(
        &appliance,
        &["group", "set", "rest", &targets[1].id, &targets[2].id],
    )?;
    assert!(morgana_ok(&appliance, &["group", "list"])?.contains(&targets[2].id));

    // Dry run: the seeded conflicts, nothing queued.
    let assign = |extra: &[&str]| -> Result<Value> {
        let mut args = vec![
            "layer",
            "assign",
            "--device",
            targets[0].id.as_str(),
            "--group",
            "rest",
            "--base",
            "base",
            "--app",
            "app",
            "--json",
        ];
        args.extend(extra);
        Ok(serde_json::from_str(&morgana_ok(&appliance, &args)?)?)
    };
    let dry = assign(&["--dry-run"])?;
    let devices = dry["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 3, "{dry}");
    let t1 = &devices[0];
    let conflicts = t1["conflicts"].as_array().unwrap();
    assert!(
        conflicts
            .iter()
            .any(|c| c["kind"] == "user-changed" && c["path"] == "/etc/app.conf"),
        "{t1}"
    );
    assert!(
        conflicts.iter().any(|c| c["kind"] == "package-downgrade"
            && c["detail"].as_str().unwrap().starts_with("curl:")),
        "{t1}"
    );
    assert!(
        t1["add"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "/usr/share/app/data-v1"),
        "{t1}"
    );
    assert!(
        t1["replace"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "/usr/bin/tool")
    );
    assert!(t1["download_bytes"].as_u64().unwrap() > 0, "{t1}");
    assert!(devices.iter().all(|d| d["job"].is_null()));

    // Apply: each target is base ⊕ app ⊕ its own files.
    let applied = assign(&[])?;
    for (t, d) in targets.iter().zip(applied["devices"].as_array().unwrap()) {
        wait_ok(
            &appliance,
            t.daemon.as_ref().unwrap(),
            d["job"].as_str().unwrap(),
        )?;
    }
    for (t, own) in targets.iter().zip(&owns) {
        let mut want = image_v1.clone();
        want.extend(own.clone());
        assert_eq!(
            contents(&t.root)?.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        assert!(
            contents(&t.root)? == want,
            "{} differs from the image",
            t.id
        );
    }
    assert!(image_v1.len() > base_files.len());
    let after_first = contents(&targets[0].root)?;
    let status = |id: &str| -> Result<Value> {
        Ok(serde_json::from_str(&morgana_ok(
            &appliance,
            &["layer", "status", "--device", id, "--json"],
        )?)?)
    };
    let st = status(&targets[0].id)?;
    assert_eq!(
        st["applied"]["layers"],
        serde_json::json!(["base:1", "app:1"]),
        "{st}"
    );
    assert_eq!(
        st["assigned"]["assignment"]["apps"][0]["version"], 1,
        "{st}"
    );

    // App v2 replaces v1: a changed program, new data, v1's data gone.
    fs::remove_file(refroot.join("usr/share/app/data-v1"))?;
    write(&refroot, "usr/bin/app", b"app v2")?;
    write(&refroot, "usr/share/app/data-v2", &noise(60_000, 4))?;
    reference.sync()?;
    morgana_ok(
        &appliance,
        &[
            "layer",
            "capture-app",
            "app",
            "--device",
            &ref_id,
            "--before",
            &before,
        ],
    )?;
    let image_v2 = under(&contents(&refroot)?, &["usr", "var", "etc/app.conf"]);
    let t1 = &targets[0];
    // The dry run compares with the newest snapshot: one after the first apply.
    t1.agent.sync()?;
    let out: Value = serde_json::from_str(&morgana_ok(
        &appliance,
        &[
            "layer", "assign", "--device", &t1.id, "--base", "base", "--app", "app:2", "--json",
        ],
    )?)?;
    let dev = &out["devices"][0];
    assert_eq!(
        dev["remove"],
        serde_json::json!(["/usr/share/app/data-v1"]),
        "{dev}"
    );
    wait_ok(
        &appliance,
        t1.daemon.as_ref().unwrap(),
        dev["job"].as_str().unwrap(),
    )?;
    let mut want = image_v2.clone();
    want.extend(owns[0].clone());
    assert!(
        contents(&t1.root)? == want,
        "second app version not applied exactly"
    );
    assert!(!t1.root.join("usr/share/app/data-v1").exists());

    // Rollback: the system as before the second apply; user data written since stays.
    write(&t1.root, "home/user/since.txt", b"written after the update")?;
    let job = morgana_ok(&appliance, &["layer", "rollback", "--device", &t1.id])?;
    wait_ok(&appliance, t1.daemon.as_ref().unwrap(), job.trim())?;
    let mut want = after_first.clone();
    want.insert(
        "home/user/since.txt".into(),
        b"written after the update".to_vec(),
    );
    assert!(
        contents(&t1.root)? == want,
        "rollback did not restore the previous system"
    );
    let st = status(&t1.id)?;
    assert_eq!(
        st["applied"]["layers"],
        serde_json::json!(["base:1", "app:1"]),
        "{st}"
    );

    // Killed in the middle of an apply: the restarted agent finishes it.
    let t2 = &mut targets[1];
    t2.daemon.take().unwrap().stop()?;
    t2.daemon = Some(Daemon::start_env(
        &t2.agent,
        "1h",
        &t2.log,
        &[("MORGANA_AGENT_APPLY_DELAY_MS", "120000")],
    )?);
    let out: Value = serde_json::from_str(&morgana_ok(
        &appliance,
        &[
            "layer", "assign", "--device", &t2.id, "--base", "base", "--app", "app:2", "--json",
        ],
    )?)?;
    let job = out["devices"][0]["job"].as_str().unwrap().to_owned();
    let journal = t2.agent.state_dir.join("apply-journal.json");
    // v2's data is written, v1's not yet removed: half applied.
    assert!(
        wait_for(Duration::from_secs(120), || t2
            .root
            .join("usr/share/app/data-v2")
            .exists()),
        "the apply did not start:\n{}",
        t2.daemon.as_ref().unwrap().log()
    );
    assert!(t2.root.join("usr/share/app/data-v1").exists());
    assert!(journal.exists());
    drop(t2.daemon.take()); // SIGKILL
    t2.daemon = Some(Daemon::start(&t2.agent, "1h", &t2.log)?);
    wait_ok(&appliance, t2.daemon.as_ref().unwrap(), &job)?;
    let mut want = image_v2.clone();
    want.extend(owns[1].clone());
    assert!(
        contents(&t2.root)? == want,
        "the resumed apply is not complete"
    );
    assert!(!journal.exists());
    let log = t2.daemon.as_ref().unwrap().log();
    assert!(log.contains("resuming an interrupted layer apply"), "{log}");
    for t in targets {
        if let Some(d) = t.daemon {
            d.stop()?;
        }
    }
    Ok(())
}

/// Provisioning: an empty device, once enrolled, is given a base layer (captured from a
/// fresh snapshot the appliance asks the reference machine for), an app layer and its
/// drivers, and ends as exactly base ⊕ app ⊕ drivers plus an identity of its own.
#[test]
fn an_empty_device_is_provisioned_from_layers_with_its_own_identity() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let t = tmp.path();
    let appliance = Appliance::start_with(
        &t.join("appliance"),
        &["--gc-every", "off", "--heartbeat-every", "1s"],
    )?;
    let refroot = t.join("ref");
    write(&refroot, "etc/hostname", b"ref\n")?;
    write(
        &refroot,
        "etc/machine-id",
        b"0123456789abcdef0123456789abcdef\n",
    )?;
    write(&refroot, "etc/app.conf", b"level = 1\n")?;
    write(&refroot, "usr/bin/tool", &noise(200_000, 1))?;
    write(&refroot, "usr/lib/big.so", &noise(2_000_000, 5))?;
    write(&refroot, "var/lib/dpkg/status", &dpkg("7.88.1-10"))?;
    write(
        &refroot,
        "var/lib/dbus/machine-id",
        b"0123456789abcdef0123456789abcdef\n",
    )?;
    write(&refroot, "var/lib/dbus/README", b"D-Bus is installed\n")?;
    write(&refroot, "home/admin/notes.txt", b"reference notes")?;
    let reference = Agent::enroll(&appliance, &refroot, &t.join("ref-state"))?;
    let before = reference.sync()?["snapshot"].as_str().unwrap().to_owned();
    let ref_id = device_id(&reference)?;
    morgana_ok(&appliance, &["reference", "mark", &ref_id])?;

    // --fresh with the agent not running: a clear error, and nothing captured.
    write(&refroot, "usr/bin/fresh", b"only in the fresh snapshot")?;
    let out = morgana_at(
        &appliance,
        &[
            "layer",
            "capture-base",
            "base",
            "--device",
            &ref_id,
            "--fresh",
            "--fresh-timeout",
            "2s",
        ],
    );
    ensure!(!out.status.success(), "captured without a snapshot");
    ensure!(
        stderr(&out).contains("did not take the fresh snapshot within 2s")
            && stderr(&out).contains("morgana-agent run"),
        "{}",
        stderr(&out)
    );
    ensure!(morgana_ok(&appliance, &["layer", "list", "--json"])?.trim() == "[]");

    // With the service running, --fresh captures what the machine holds now.
    let ref_daemon = Daemon::start(&reference, "1h", &t.join("ref.log"))?;
    let out = morgana_at(
        &appliance,
        &[
            "layer",
            "capture-base",
            "base",
            "--device",
            &ref_id,
            "--fresh",
            "--fresh-timeout",
            "2m",
        ],
    );
    ensure!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        ref_daemon.log()
    );
    let base: Value = serde_json::from_str(&morgana_ok(
        &appliance,
        &["layer", "show", "base", "--json"],
    )?)?;
    ensure!(base["snapshot"] != before.as_str(), "{base}");
    let files = morgana_ok(&appliance, &["layer", "show", "base", "--files"])?;
    ensure!(files.contains("/usr/bin/fresh"), "{files}");

    // App layer: after = a fresh snapshot too.
    write(&refroot, "usr/bin/app", b"app v1")?;
    write(&refroot, "usr/share/app/data", &noise(80_000, 2))?;
    let snap = base["snapshot"].as_str().unwrap().to_owned();
    morgana_ok(
        &appliance,
        &[
            "layer",
            "capture-app",
            "app",
            "--device",
            &ref_id,
            "--before",
            &snap,
            "--fresh",
        ],
    )?;
    ref_daemon.stop()?;
    let image = under(&contents(&refroot)?, &["usr", "var", "etc/app.conf"]);

    // Drivers for the new device's hardware.
    let lib = t.join("lib");
    write(&lib, "nic/e1000e.ko", &noise(90_000, 3))?;
    morgana_ok(
        &appliance,
        &["driver", "import", "nic", lib.join("nic").to_str().unwrap()],
    )?;
    let rules = t.join("nic.toml");
    fs::write(
        &rules,
        "all = { pci = [\"8086:15f3\"] }\nsets = [\"nic\"]\n",
    )?;
    morgana_ok(
        &appliance,
        &[
            "driver",
            "profile",
            "set",
            "nic",
            "--rules",
            rules.to_str().unwrap(),
        ],
    )?;
    let hw = t.join("hw");
    write(&hw, "sys/bus/pci/devices/0000:00:00.0/vendor", b"0x8086\n")?;
    write(&hw, "sys/bus/pci/devices/0000:00:00.0/device", b"0x15f3\n")?;

    // The empty device.
    let root = t.join("new");
    fs::create_dir_all(&root)?;
    let agent = Agent::enroll(&appliance, &root, &t.join("new-state"))?;
    let id = device_id(&agent)?;
    let daemon = Daemon::start_env(
        &agent,
        "1h",
        &t.join("new.log"),
        &[("MORGANA_AGENT_INVENTORY_ROOT", hw.to_str().unwrap())],
    )?;
    ensure!(
        wait_for(Duration::from_secs(60), || {
            morgana_ok(
                &appliance,
                &["driver", "preview", "--device", &id, "--json"],
            )
            .is_ok_and(|o| o.contains("\"set\":\"nic\""))
        }),
        "the device's inventory did not arrive:\n{}",
        daemon.log()
    );
    let out: Value = serde_json::from_str(&morgana_ok(
        &appliance,
        &[
            "layer", "assign", "--device", &id, "--base", "base", "--app", "app", "--json",
        ],
    )?)?;
    wait_ok(
        &appliance,
        &daemon,
        out["devices"][0]["job"].as_str().unwrap(),
    )?;

    // base ⊕ app ⊕ drivers, byte for byte, plus its own identity and nothing else.
    let got = contents(&root)?;
    let mut want = image.clone();
    want.insert("opt/morgana/drivers/nic/e1000e.ko".into(), noise(90_000, 3));
    let machine_id = got
        .get("etc/machine-id")
        .context("no /etc/machine-id")?
        .clone();
    let hostname = got.get("etc/hostname").context("no /etc/hostname")?.clone();
    want.insert("etc/machine-id".into(), machine_id.clone());
    want.insert("etc/hostname".into(), hostname.clone());
    // D-Bus's copy of the machine id is identity too: the device's own, not the reference's.
    let dbus_id = got
        .get("var/lib/dbus/machine-id")
        .context("no /var/lib/dbus/machine-id")?
        .clone();
    ensure!(
        dbus_id == machine_id,
        "D-Bus's machine id differs from /etc/machine-id"
    );
    want.insert("var/lib/dbus/machine-id".into(), dbus_id);
    ensure!(
        got.keys().collect::<Vec<_>>() == want.keys().collect::<Vec<_>>(),
        "{:?}",
        got.keys().collect::<Vec<_>>()
    );
    ensure!(got == want, "the provisioned device differs from the image");
    let mid = String::from_utf8(machine_id)?;
    ensure!(
        mid.len() == 33
            && mid.ends_with('\n')
            && mid[..32]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            && &mid[12..13] == "4",
        "not a systemd machine id: {mid:?}"
    );
    ensure!(mid != "0123456789abcdef0123456789abcdef\n");
    let enrolled = fs::read_to_string("/proc/sys/kernel/hostname")?;
    ensure!(
        String::from_utf8(hostname)? == format!("{}\n", enrolled.trim()),
        "the hostname is not the enrolled one"
    );
    ensure!(!root.join("home/admin").exists(), "user data came along");

    // The per-file report: everything added, the identity named.
    let st: Value = serde_json::from_str(&morgana_ok(
        &appliance,
        &["layer", "status", "--device", &id, "--files", "--json"],
    )?)?;
    let r = &st["files"]["results"];
    ensure!(st["files"]["state"] == "succeeded", "{st}");
    ensure!(
        r["replaced"] == 0 && r["failed"] == 0 && r["removed"] == 0,
        "{r}"
    );
    ensure!(
        r["added"].as_u64().unwrap() >= image.len() as u64 + 3,
        "{r}"
    );
    ensure!(r["written_bytes"].as_u64().unwrap() >= 200_000, "{r}");
    ensure!(
        r["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["path"] == "/etc/machine-id" && f["outcome"] == "added"),
        "{r}"
    );
    let text = morgana_ok(&appliance, &["layer", "status", "--device", &id, "--files"])?;
    ensure!(text.contains("added     /usr/bin/tool"), "{text}");

    // A second apply of the same layers writes nothing: every layer file is unchanged, the
    // identity stays the device's, and the driver folder, which holds its set as delivered,
    // is left alone.
    let nic = root.join("opt/morgana/drivers/nic");
    let stat = |p: &Path| -> Result<(u64, i64, i64)> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::symlink_metadata(p)?;
        Ok((m.ino(), m.mtime(), m.mtime_nsec()))
    };
    let drivers_before = (stat(&nic)?, stat(&nic.join("e1000e.ko"))?);
    agent.sync()?;
    let out: Value = serde_json::from_str(&morgana_ok(
        &appliance,
        &[
            "layer", "assign", "--device", &id, "--base", "base", "--app", "app", "--json",
        ],
    )?)?;
    wait_ok(
        &appliance,
        &daemon,
        out["devices"][0]["job"].as_str().unwrap(),
    )?;
    let st: Value = serde_json::from_str(&morgana_ok(
        &appliance,
        &["layer", "status", "--device", &id, "--files", "--json"],
    )?)?;
    let r = &st["files"]["results"];
    ensure!(
        r["added"] == 0 && r["replaced"] == 0 && r["written_bytes"] == 0 && r["fetched_bytes"] == 0,
        "{r}"
    );
    ensure!(
        r["unchanged"].as_u64().unwrap() >= image.len() as u64,
        "{r}"
    );
    ensure!(
        contents(&root)? == got,
        "a repeated apply changed the device"
    );
    ensure!(
        (stat(&nic)?, stat(&nic.join("e1000e.ko"))?) == drivers_before,
        "the driver folder was written again"
    );

    // A base update that changes the middle of a large file downloads only the changed
    // chunks (the rest is read from the file the device holds); a new version of the driver
    // set is delivered.
    let mut big = noise(2_000_000, 5);
    big[1_000_000..1_000_100].copy_from_slice(&noise(100, 6));
    write(&refroot, "usr/lib/big.so", &big)?;
    reference.sync()?;
    morgana_ok(
        &appliance,
        &["layer", "capture-base", "base", "--device", &ref_id],
    )?;
    write(&lib, "nic/e1000e.ko", &noise(90_000, 7))?;
    morgana_ok(
        &appliance,
        &["driver", "import", "nic", lib.join("nic").to_str().unwrap()],
    )?;
    agent.sync()?;
    let assign = |extra: &[&str]| -> Result<Value> {
        let mut args = vec![
            "layer", "assign", "--device", &id, "--base", "base", "--app", "app", "--json",
        ];
        args.extend(extra);
        Ok(serde_json::from_str(&morgana_ok(&appliance, &args)?)?)
    };
    let dry = assign(&["--dry-run"])?;
    let changed = dry["devices"][0]["download_bytes"].as_u64().unwrap();
    ensure!(changed > 0 && changed < 600_000, "{dry}");
    let out = assign(&[])?;
    wait_ok(
        &appliance,
        &daemon,
        out["devices"][0]["job"].as_str().unwrap(),
    )?;
    let st: Value = serde_json::from_str(&morgana_ok(
        &appliance,
        &["layer", "status", "--device", &id, "--files", "--json"],
    )?)?;
    let r = &st["files"]["results"];
    ensure!(fs::read(root.join("usr/lib/big.so"))? == big);
    ensure!(fs::read(nic.join("e1000e.ko"))? == noise(90_000, 7));
    ensure!(r["replaced"] == 2 && r["added"] == 0, "{r}");
    // Noise does not compress: chunks are stored as they are. The driver set is new.
    let fetched = r["fetched_bytes"].as_u64().unwrap();
    ensure!(fetched <= changed + 90_000, "fetched {fetched}: {r}");
    ensure!(
        r["reused_bytes"].as_u64().unwrap() >= 2_000_000 - changed,
        "{r}"
    );
    daemon.stop()?;
    Ok(())
}
