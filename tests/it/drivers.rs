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
