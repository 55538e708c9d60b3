//! Deduplication across devices and within a file's history.

use std::fs;
use std::path::Path;

use anyhow::Result;
use morgana_e2e::*;

fn endpoint_tree(root: &Path) -> Result<()> {
    for d in 0..20 {
        let dir = root.join(format!("usr/lib/pkg{d}"));
        fs::create_dir_all(&dir)?;
        for f in 0..25 {
            let seed = d * 100 + f;
            let len = 1000 + (seed as usize * 7919) % 200_000;
            fs::write(dir.join(format!("lib{f}.so")), noise(len, seed))?;
        }
    }
    fs::write(root.join("usr/big.iso"), noise(40 << 20, 4242))?;
    Ok(())
}

#[test]
fn second_device_with_the_same_tree_adds_under_one_percent() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let appliance = Appliance::start(&tmp.path().join("appliance"))?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    endpoint_tree(&a)?;
    endpoint_tree(&b)?;
    let first = Agent::enroll(&appliance, &a, &tmp.path().join("sa"))?;
    first.sync()?;
    let after_first = appliance.volume_bytes();
    let second = Agent::enroll(&appliance, &b, &tmp.path().join("sb"))?;
    let s = second.sync()?;
    let added = appliance.volume_bytes() - after_first;
    assert!(
        (added as f64) < after_first as f64 * 0.01,
        "second device added {added} bytes to {after_first} ({s})"
    );
    assert_eq!(s["new_chunks"].as_u64(), Some(0), "{s}");
    Ok(())
}

#[test]
fn edit_in_the_middle_of_100_mib_sends_under_1_mib() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    fs::create_dir_all(&root)?;
    let mut data = noise(100 << 20, 5);
    fs::write(root.join("vm.img"), &data)?;
    let (_appliance, agent) = one_device(tmp.path(), &root)?;
    let first = agent.sync()?;
    assert!(first["bytes_sent"].as_u64().unwrap() > 100 << 20, "{first}");
    data[50 << 20..(50 << 20) + 100].copy_from_slice(&[0xAB; 100]);
    fs::write(root.join("vm.img"), &data)?;
    let second = agent.sync()?;
    let sent = second["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < 1 << 20,
        "an edit of 100 bytes sent {sent} bytes: {second}"
    );
    let out = tmp.path().join("out");
    let r = agent.restore("latest", &out, None, false);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(fs::read(out.join("vm.img"))?, data);
    Ok(())
}
