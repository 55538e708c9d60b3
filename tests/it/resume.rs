//! `kill -9` in the middle of a sync: the next run does not send again what arrived.

use std::fs;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Result;
use morgana_e2e::*;

#[test]
fn resume_after_kill_does_not_resend() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    fs::create_dir_all(&root)?;
    for i in 0..12 {
        fs::write(
            root.join(format!("part{i:02}.bin")),
            noise(24 << 20, 100 + i),
        )?;
    }
    let (appliance, agent) = one_device(tmp.path(), &root)?;
    let mut child = agent
        .cmd("sync")
        .arg("--json")
        .stdout(Stdio::null())
        .spawn()?;
    let some_arrived = wait_for(Duration::from_secs(120), || {
        appliance.pack_files().len() >= 3
    });
    // SIGKILL: no chance to clean up or flush anything.
    child.kill()?;
    let status = child.wait()?;
    assert!(
        some_arrived,
        "no packs arrived before the sync ended: {status}"
    );
    assert!(
        !status.success(),
        "the sync finished before it could be killed; make the tree larger"
    );
    let before = appliance.volume_bytes();

    let s = agent.sync()?;
    let total = appliance.volume_bytes();
    let sent = s["bytes_sent"].as_u64().unwrap();
    // Random data does not compress: what the rerun sends is what was missing, plus
    // protocol overhead (ids, trees): never the packs that had arrived.
    let needed = total - before;
    assert!(
        sent < needed + (needed / 20) + (1 << 20),
        "rerun sent {sent} bytes, but only {needed} were missing ({before} had arrived)"
    );
    let out = tmp.path().join("out");
    let r = agent.restore("latest", &out, None, false);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_same_tree(&root, &out)?;
    let check = appliance.check();
    assert!(
        check.status.success(),
        "check after resume: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    Ok(())
}
