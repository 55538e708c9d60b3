//! The driver library end to end: driver sets imported with `morgana driver import`,
//! profiles matching hardware inventory, the preview, and delivery on demand onto two real
//! agents whose inventories (read from fake roots through `MORGANA_AGENT_INVENTORY_ROOT`)
//! differ: each gets its own sets, exactly what the preview said, byte for byte, also after
//! a garbage collection.

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use morgana_e2e::*;
use serde_json::Value;

use crate::daemon::{Daemon, device_id, morgana_at, wait_ok, write};

fn ok(appliance: &Appliance, args: &[&str]) -> Result<String> {
    let out = morgana_at(appliance, args);
    ensure!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A fake machine for the inventory: DMI, os-release and PCI ids.
fn fake_hardware(
    root: &Path,
    vendor: &str,
    model: &str,
    os: (&str, &str),
    pci: &[(&str, &str)],
) -> Result<()> {
    write(
        root,
        "sys/class/dmi/id/sys_vendor",
        format!("{vendor}\n").as_bytes(),
    )?;
    write(
        root,
        "sys/class/dmi/id/product_name",
        format!("{model}\n").as_bytes(),
    )?;
    write(
        root,
        "etc/os-release",
        format!(
            "ID={}\nVERSION_ID=\"{}\"\nPRETTY_NAME=\"test\"\n",
            os.0, os.1
        )
        .as_bytes(),
    )?;
    for (i, (v, d)) in pci.iter().enumerate() {
        let dir = format!("sys/bus/pci/devices/0000:00:{i:02x}.0");
        write(
            root,
            &format!("{dir}/vendor"),
            format!("0x{v}\n").as_bytes(),
        )?;
        write(
            root,
            &format!("{dir}/device"),
            format!("0x{d}\n").as_bytes(),
        )?;
    }
    Ok(())
}

fn preview(appliance: &Appliance) -> Result<Vec<Value>> {
    let out = ok(appliance, &["driver", "preview", "--json"])?;
    serde_json::from_str::<Vec<Value>>(&out).with_context(|| out.clone())
}

fn of<'a>(all: &'a [Value], device: &str) -> Result<&'a Value> {
    all.iter()
        .find(|d| d["device"] == device)
        .with_context(|| format!("device {device} not in the preview: {all:?}"))
}

fn sets(d: &Value) -> Vec<String> {
    d["deliveries"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| x["set"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn devices_with_different_hardware_get_their_own_driver_sets_as_previewed() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let t = tmp.path();
    let appliance = Appliance::start_with(&t.join("appliance"), &["--heartbeat-every", "1s"])?;

    // Driver sets: files big enough to be chunked, small ones inline, folders, a symlink.
    let lib = t.join("library");
    write(&lib, "intel/e1000e.ko", &noise(300_000, 1))?;
    write(&lib, "intel/firmware/e1000e.bin", &noise(70_000, 2))?;
    write(&lib, "intel/README", b"intel nic\n")?;
    std::os::unix::fs::symlink("e1000e.ko", lib.join("intel/current.ko"))?;
    write(&lib, "nvidia/nvidia.ko", &noise(500_000, 3))?;
    write(
        &lib,
        "nvidia/conf/nvidia.conf",
        b"options nvidia modeset=1\n",
    )?;
    write(&lib, "common/udev/99-morgana.rules", b"# shared rules\n")?;
    for set in ["intel", "nvidia", "common"] {
        let dir = lib.join(set);
        let out = ok(
            &appliance,
            &["driver", "import", set, dir.to_str().unwrap()],
        )?;
        ensure!(
            out.contains(&format!("imported driver set {set} v1")),
            "{out}"
        );
    }
    let listed = ok(&appliance, &["driver", "list", "--json"])?;
    ensure!(
        serde_json::from_str::<Vec<Value>>(&listed)?.len() == 3,
        "{listed}"
    );
    let shown = ok(&appliance, &["driver", "show", "intel", "--files"])?;
    ensure!(
        shown.contains("/firmware/e1000e.bin") && shown.contains("/current.ko"),
        "{shown}"
    );

    // Profiles: Lenovo with the Intel NIC; anything with an NVIDIA GPU on Ubuntu.
    let lenovo = t.join("lenovo.toml");
    fs::write(
        &lenovo,
        "all = { vendor = \"LENOVO\" }\nany = [ { pci = [\"8086:15f3\"] }, { model = \"ThinkPad X1*\" } ]\n\
         sets = [\"intel\", \"common\"]\n",
    )?;
    let nvidia = t.join("nvidia.toml");
    fs::write(
        &nvidia,
        "all = { pci = [\"10de:*\"], os_id = \"ubuntu\" }\nsets = [\"nvidia\", { name = \"common\", version = 1 }]\n",
    )?;
    ok(
        &appliance,
        &[
            "driver",
            "profile",
            "set",
            "lenovo",
            "--rules",
            lenovo.to_str().unwrap(),
        ],
    )?;
    ok(
        &appliance,
        &[
            "driver",
            "profile",
            "set",
            "gpu",
            "--rules",
            nvidia.to_str().unwrap(),
        ],
    )?;
    // A profile bringing a set that does not exist is refused, naming it.
    let bad = t.join("bad.toml");
    fs::write(&bad, "all = { vendor = \"x\" }\nsets = [\"missing\"]\n")?;
    let out = morgana_at(
        &appliance,
        &[
            "driver",
            "profile",
            "set",
            "bad",
            "--rules",
            bad.to_str().unwrap(),
        ],
    );
    ensure!(
        !out.status.success() && stderr(&out).contains("driver set missing"),
        "{}",
        stderr(&out)
    );

    // Two devices with different hardware.
    let (hw_a, hw_b) = (t.join("hw-a"), t.join("hw-b"));
    fake_hardware(
        &hw_a,
        "LENOVO",
        "ThinkPad T14 Gen 3",
        ("debian", "12"),
        &[("8086", "15f3")],
    )?;
    fake_hardware(
        &hw_b,
        "Dell Inc.",
        "Latitude 7440",
        ("ubuntu", "24.04"),
        &[("10de", "1f95"), ("8086", "a0f0")],
    )?;
    let (root_a, root_b) = (t.join("root-a"), t.join("root-b"));
    fs::create_dir_all(&root_a)?;
    fs::create_dir_all(&root_b)?;
    let a = Agent::enroll(&appliance, &root_a, &t.join("state-a"))?;
    let b = Agent::enroll(&appliance, &root_b, &t.join("state-b"))?;
    let (id_a, id_b) = (device_id(&a)?, device_id(&b)?);
    let env = morgana_agent_inventory_root();
    let daemon_a = Daemon::start_env(&a, "1h", &t.join("a.log"), &[(env, hw_a.to_str().unwrap())])?;
    let daemon_b = Daemon::start_env(&b, "1h", &t.join("b.log"), &[(env, hw_b.to_str().unwrap())])?;

    // Until both have reported their inventory, nothing can match.
    let mut all = Vec::new();
    let reported = wait_for(Duration::from_secs(120), || {
        all = preview(&appliance).unwrap_or_default();
        all.len() == 2 && all.iter().all(|d| d["has_inventory"] == true)
    });
    ensure!(
        reported,
        "inventories not reported: {all:?}\n{}",
        daemon_a.log()
    );
    let (pa, pb) = (of(&all, &id_a)?.clone(), of(&all, &id_b)?.clone());
    ensure!(sets(&pa) == ["intel", "common"], "{pa}");
    ensure!(sets(&pb) == ["nvidia", "common"], "{pb}");
    ensure!(pa["matched"][0]["profile"] == "lenovo", "{pa}");
    ensure!(
        pa["matched"][0]["reason"] == "vendor matches \"LENOVO\" and pci-id matches \"8086:15f3\"",
        "{pa}"
    );
    ensure!(
        pb["matched"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("os matches \"ubuntu *\""),
        "{pb}"
    );
    // --profile narrows the preview.
    let only = ok(
        &appliance,
        &["driver", "preview", "--json", "--profile", "gpu"],
    )?;
    let only: Vec<Value> = serde_json::from_str(&only)?;
    ensure!(sets(of(&only, &id_a)?).is_empty() && sets(of(&only, &id_b)?) == ["nvidia", "common"]);

    // Garbage collection keeps driver sets, however old, and check finds nothing wrong.
    ok(&appliance, &["gc", "--now", "2100-01-01T00:00:00Z"])?;
    let said = ok(&appliance, &["check"])?;
    ensure!(said.contains(" driver sets: clean"), "{said}");
    ensure!(
        !said.contains(", 0 driver sets"),
        "check read no driver set: {said}"
    );

    // Deliver on demand; each device ends with exactly the sets the preview listed.
    for (id, daemon, dest, expected) in [
        (&id_a, &daemon_a, t.join("drivers-a"), &pa),
        (&id_b, &daemon_b, t.join("drivers-b"), &pb),
    ] {
        let out = ok(
            &appliance,
            &[
                "driver",
                "deliver",
                "--device",
                id,
                "--path",
                dest.to_str().unwrap(),
            ],
        )?;
        let jobs: Vec<&str> = out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        ensure!(jobs.len() == sets(expected).len(), "{out}");
        for job in jobs {
            wait_ok(&appliance, daemon, job)?;
        }
        let mut got: Vec<String> = fs::read_dir(&dest)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        got.sort();
        let mut want = sets(expected);
        want.sort();
        ensure!(got == want, "{id} got {got:?}, the preview said {want:?}");
        for set in &want {
            assert_same_tree(&lib.join(set), &dest.join(set))
                .with_context(|| format!("driver set {set} on {id}"))?;
        }
    }
    daemon_a.stop()?;
    daemon_b.stop()?;
    Ok(())
}

fn morgana_agent_inventory_root() -> &'static str {
    "MORGANA_AGENT_INVENTORY_ROOT"
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Result<Vec<String>> {
    let mut got: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    got.sort();
    Ok(got)
}

#[test]
fn base_layer_updates_and_restores_to_new_hardware_bring_each_device_its_own_drivers() -> Result<()>
{
    crate::init();
    let tmp = tempfile::tempdir()?;
    let t = tmp.path();
    let appliance = Appliance::start_with(&t.join("appliance"), &["--heartbeat-every", "1s"])?;
    let lib = t.join("library");
    write(&lib, "intel/e1000e.ko", &noise(300_000, 1))?;
    write(&lib, "intel/README", b"intel nic\n")?;
    write(&lib, "nvidia/nvidia.ko", &noise(200_000, 3))?;
    write(
        &lib,
        "nvidia/conf/nvidia.conf",
        b"options nvidia modeset=1\n",
    )?;
    for set in ["intel", "nvidia"] {
        ok(
            &appliance,
            &["driver", "import", set, lib.join(set).to_str().unwrap()],
        )?;
    }
    // Default path: /opt/morgana/drivers as seen from each device's protected root.
    for (name, rules) in [
        (
            "nic",
            "all = { pci = [\"8086:15f3\"] }\nsets = [\"intel\"]\n",
        ),
        ("gpu", "all = { pci = [\"10de:*\"] }\nsets = [\"nvidia\"]\n"),
    ] {
        let file = t.join(format!("{name}.toml"));
        fs::write(&file, rules)?;
        ok(
            &appliance,
            &[
                "driver",
                "profile",
                "set",
                name,
                "--rules",
                file.to_str().unwrap(),
            ],
        )?;
    }

    // The reference machine has drivers of its own in the driver folder: never captured.
    let refroot = t.join("ref");
    write(&refroot, "etc/app.conf", b"level = 1\n")?;
    write(&refroot, "usr/bin/tool", &noise(150_000, 4))?;
    write(
        &refroot,
        "opt/morgana/drivers/refgpu/ref.ko",
        b"the reference's own driver",
    )?;
    let reference = Agent::enroll(&appliance, &refroot, &t.join("ref-state"))?;
    reference.sync()?;
    let ref_id = device_id(&reference)?;
    ok(&appliance, &["reference", "mark", &ref_id])?;
    ok(
        &appliance,
        &["layer", "capture-base", "base", "--device", &ref_id],
    )?;
    let files = ok(&appliance, &["layer", "show", "base", "--files"])?;
    ensure!(files.contains("/usr/bin/tool"), "{files}");
    ensure!(
        !files.contains("/opt/morgana/drivers"),
        "the layer captured the reference's drivers: {files}"
    );

    // Two targets with different hardware.
    let env = morgana_agent_inventory_root();
    let mut targets = Vec::new();
    for (n, pci) in [("a", ("8086", "15f3")), ("b", ("10de", "1f95"))] {
        let hw = t.join(format!("hw-{n}"));
        fake_hardware(&hw, "Vendor", "Model", ("debian", "12"), &[pci])?;
        let root = t.join(format!("root-{n}"));
        write(&root, "home/user/doc.txt", n.as_bytes())?;
        let agent = Agent::enroll(&appliance, &root, &t.join(format!("state-{n}")))?;
        agent.sync()?;
        let id = device_id(&agent)?;
        let daemon = Daemon::start_env(
            &agent,
            "1h",
            &t.join(format!("{n}.log")),
            &[(env, hw.to_str().unwrap())],
        )?;
        targets.push((root, agent, id, daemon));
    }
    let mut all = Vec::new();
    ensure!(
        wait_for(Duration::from_secs(120), || {
            all = preview(&appliance).unwrap_or_default();
            // The reference runs no service, so only the two targets report.
            all.iter().filter(|d| d["has_inventory"] == true).count() == 2
        }),
        "inventories not reported: {all:?}"
    );

    // A base-layer update delivers each device's matching sets in the same apply.
    let out = ok(
        &appliance,
        &[
            "layer",
            "assign",
            "--device",
            &targets[0].2,
            "--device",
            &targets[1].2,
            "--base",
            "base",
            "--json",
        ],
    )?;
    let assigned: Value = serde_json::from_str(&out)?;
    for ((_, _, id, daemon), d) in targets.iter().zip(assigned["devices"].as_array().unwrap()) {
        ensure!(d["device"] == id.as_str(), "{d}");
        wait_ok(&appliance, daemon, d["job"].as_str().unwrap())?;
    }
    for (root, _, id, _) in &targets {
        let want = sets(of(&all, id)?);
        ensure!(want.len() == 1, "{id}: preview {all:?}");
        let drivers = root.join("opt/morgana/drivers");
        ensure!(
            names(&drivers)? == want,
            "{id} got {:?}, the preview said {want:?}",
            names(&drivers)?
        );
        assert_same_tree(&lib.join(&want[0]), &drivers.join(&want[0]))?;
        ensure!(fs::read(root.join("usr/bin/tool"))? == noise(150_000, 4));
        // The apply's per-file report names the delivery.
        let st: Value = serde_json::from_str(&ok(
            &appliance,
            &["layer", "status", "--device", id, "--files", "--json"],
        )?)?;
        let listed = st["files"]["results"]["files"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        ensure!(
            listed
                .iter()
                .any(|f| f["path"] == format!("/opt/morgana/drivers/{}", want[0])
                    && f["outcome"] == "added"
                    && f["detail"] == format!("driver set {} v1", want[0])),
            "{st}"
        );
    }

    // Restore to new hardware: b reverted to a's snapshot keeps its own driver folder
    // (a's drivers would not fit it) and gets its own sets delivered.
    let snap = targets[0].1.sync()?["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();
    let (root_b, _, id_b, daemon_b) = &targets[1];
    let job = ok(
        &appliance,
        &[
            "job",
            "restore",
            id_b,
            "--snapshot",
            &snap,
            "--scope",
            "system-only",
        ],
    )?;
    let shown = ok(&appliance, &["job", "show", job.trim(), "--json"])?;
    ensure!(
        shown.contains("\"drivers\""),
        "no drivers in the restore job: {shown}"
    );
    wait_ok(&appliance, daemon_b, job.trim())?;
    ensure!(fs::read(root_b.join("usr/bin/tool"))? == noise(150_000, 4));
    ensure!(
        names(&root_b.join("opt/morgana/drivers"))? == ["nvidia"],
        "{:?}",
        names(&root_b.join("opt/morgana/drivers"))?
    );
    assert_same_tree(
        &lib.join("nvidia"),
        &root_b.join("opt/morgana/drivers/nvidia"),
    )?;
    for (_, _, _, daemon) in targets {
        daemon.stop()?;
    }
    Ok(())
}
