//! Image management, capture side: reference machines, base and app layers.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use morgana_e2e::*;

fn write(root: &Path, path: &str, data: &[u8]) -> Result<()> {
    let p = root.join(path);
    fs::create_dir_all(p.parent().unwrap())?;
    fs::write(&p, data).with_context(|| format!("write {}", p.display()))
}

/// A small Linux endpoint: system files, identity, a home, runtime and cache folders.
fn reference_tree(root: &Path) -> Result<()> {
    write(root, "etc/hostname", b"ref-1\n")?;
    write(
        root,
        "etc/machine-id",
        b"0123456789abcdef0123456789abcdef\n",
    )?;
    write(root, "etc/ssh/ssh_host_ed25519_key", b"secret key")?;
    write(root, "etc/app.conf", b"level = 1\n")?;
    write(root, "usr/bin/tool", &noise(200_000, 1))?;
    write(root, "usr/lib/libold.so", &noise(300_000, 2))?;
    write(root, "var/lib/dpkg/status", b"Package: tool\n")?;
    write(root, "var/cache/apt/pkgcache.bin", &noise(10_000, 3))?;
    write(root, "tmp/junk", b"x")?;
    write(root, "home/alice/doc.txt", b"alice's work")?;
    write(root, "root/.bashrc", b"alias ll='ls -l'\n")?;
    Ok(())
}

fn morgana_ok(appliance: &Appliance, args: &[&str]) -> Result<String> {
    let out = run_ok(
        morgana()
            .args(args)
            .arg("--data-dir")
            .arg(&appliance.data_dir),
    )?;
    Ok(String::from_utf8(out.stdout)?)
}

fn show(appliance: &Appliance, name: &str, version: Option<u32>) -> Result<serde_json::Value> {
    let v = version.map(|v| v.to_string());
    let mut args = vec!["layer", "show", name, "--files", "--json"];
    if let Some(v) = &v {
        args.extend(["--version", v]);
    }
    Ok(serde_json::from_str(&morgana_ok(appliance, &args)?)?)
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn base_and_app_layers_keep_what_the_rules_assign_and_survive_gc() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    reference_tree(&root)?;
    let appliance = Appliance::start_with(&tmp.path().join("appliance"), &["--gc-every", "off"])?;
    let agent = Agent::enroll(&appliance, &root, &tmp.path().join("state"))?;
    // User data outside homes, which only this device's policy calls user area.
    write(&root, "srv/userdata/shared.db", b"the team's data")?;
    let first = agent.sync()?;
    let before = first["snapshot"].as_str().unwrap().to_string();
    let device = agent.snapshots()?[0]["device_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Only reference machines give layers.
    let refused = morgana()
        .args(["layer", "capture-base", "debian-base", "--device", &device])
        .arg("--data-dir")
        .arg(&appliance.data_dir)
        .output()?;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("morgana reference mark"),
        "{}",
        stderr(&refused)
    );
    let policy = tmp.path().join("reference.toml");
    fs::write(
        &policy,
        r#"user_area = { rules = ["%home%", "/srv/userdata"] }"#,
    )?;
    morgana_ok(
        &appliance,
        &[
            "policy",
            "set",
            "reference",
            "--file",
            policy.to_str().unwrap(),
        ],
    )?;
    morgana_ok(&appliance, &["policy", "assign", "reference", &device])?;
    morgana_ok(&appliance, &["reference", "mark", &device])?;
    assert!(morgana_ok(&appliance, &["reference", "list"])?.contains(&device));

    let out = morgana_ok(
        &appliance,
        &["layer", "capture-base", "debian-base", "--device", &device],
    )?;
    assert!(out.contains("captured base layer debian-base v1"), "{out}");
    let base = show(&appliance, "debian-base", None)?;
    let paths = strings(&base["paths"]);
    for kept in [
        "/etc/app.conf",
        "/usr/bin/tool",
        "/usr/lib/libold.so",
        "/var/lib/dpkg/status",
    ] {
        assert!(
            paths.contains(&kept.to_string()),
            "{kept} missing: {paths:?}"
        );
    }
    for left_out in [
        "/etc/hostname",
        "/etc/machine-id",
        "/etc/ssh/ssh_host_ed25519_key",
        "/home/alice/doc.txt",
        "/home/",
        "/root/.bashrc",
        "/tmp/junk",
        "/var/cache/apt/pkgcache.bin",
        "/srv/userdata/shared.db",
    ] {
        assert!(
            !paths.contains(&left_out.to_string()),
            "{left_out} in {paths:?}"
        );
    }
    assert_eq!(base["files"].as_u64(), Some(4), "{base}");
    assert_eq!(base["snapshot"].as_str(), Some(before.as_str()));

    // Install an application: new and changed system files, one removed; the user's and
    // the machine's own changes are not the layer's business.
    write(&root, "usr/bin/newapp", &noise(150_000, 4))?;
    write(&root, "etc/app.conf", b"level = 2\n")?;
    fs::remove_file(root.join("usr/lib/libold.so"))?;
    write(&root, "home/alice/new.txt", b"more work")?;
    write(&root, "etc/hostname", b"ref-1-renamed\n")?;
    agent.sync()?;
    let out = morgana_ok(
        &appliance,
        &[
            "layer",
            "capture-app",
            "newapp",
            "--device",
            &device,
            "--before",
            &before,
        ],
    )?;
    assert!(out.contains("captured app layer newapp v1"), "{out}");
    let app = show(&appliance, "newapp", None)?;
    let files: Vec<String> = strings(&app["paths"])
        .into_iter()
        .filter(|p| !p.ends_with('/'))
        .collect();
    assert_eq!(files, ["/etc/app.conf", "/usr/bin/newapp"], "{app}");
    assert_eq!(strings(&app["deletions"]), ["/usr/lib/libold.so"]);

    // Only the user's files changed: nothing for a layer, refused with what to do.
    let unchanged = agent.sync()?["snapshot"].as_str().unwrap().to_string();
    write(&root, "home/alice/more.txt", b"user data only")?;
    agent.sync()?;
    let same = morgana()
        .args(["layer", "capture-app", "none", "--device", &device])
        .args(["--before", &unchanged])
        .arg("--data-dir")
        .arg(&appliance.data_dir)
        .output()?;
    assert!(!same.status.success());
    assert!(stderr(&same).contains("do not differ"), "{}", stderr(&same));

    // Capturing again makes version 2; version 1 stays.
    write(&root, "usr/bin/tool", &noise(200_000, 5))?;
    agent.sync()?;
    let out = morgana_ok(
        &appliance,
        &[
            "layer",
            "capture-base",
            "debian-base",
            "--device",
            &device,
            "--notes",
            "tool 2",
        ],
    )?;
    assert!(out.contains("v2"), "{out}");
    let list: serde_json::Value =
        serde_json::from_str(&morgana_ok(&appliance, &["layer", "list", "--json"])?)?;
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");

    // Retention keeps only the newest snapshot; the layers still hold what they captured
    // from the older ones, which collection must not take.
    let gc: serde_json::Value = serde_json::from_str(&morgana_ok(
        &appliance,
        &[
            "gc",
            "--json",
            "--keep-hourly",
            "0",
            "--keep-daily",
            "0",
            "--keep-weekly",
            "0",
            "--keep-monthly",
            "0",
        ],
    )?)?;
    assert!(gc["snapshots_pruned"].as_u64().unwrap() >= 2, "{gc}");
    assert!(gc["blobs_freed"].as_u64().unwrap() > 0, "{gc}");
    let check = appliance.check();
    assert!(check.status.success(), "{}", stderr(&check));
    // Check reads the layers' closures too, not only the snapshots'.
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(said.contains(", 3 layers, 0 driver sets: clean"), "{said}");
    assert_eq!(
        strings(&show(&appliance, "debian-base", Some(1))?["paths"]),
        paths
    );
    assert_eq!(
        strings(&show(&appliance, "newapp", None)?["deletions"]),
        ["/usr/lib/libold.so"]
    );
    Ok(())
}
