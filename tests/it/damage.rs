//! Damage is found, named, and never restored as wrong bytes.

use std::fs;
use std::os::unix::fs::FileExt;

use anyhow::Result;
use morgana_e2e::*;

#[test]
fn check_and_restore_find_a_flipped_byte() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    fs::create_dir_all(root.join("docs"))?;
    fs::write(root.join("docs/thesis.pdf"), noise(2 << 20, 77))?;
    let (appliance, agent) = one_device(tmp.path(), &root)?;
    agent.sync()?;
    let clean = appliance.check();
    assert!(
        clean.status.success(),
        "fresh repository reported damage: {}",
        String::from_utf8_lossy(&clean.stdout)
    );

    let packs = appliance.pack_files();
    assert!(!packs.is_empty());
    // The biggest pack holds the file's chunks; flip one byte well inside the data.
    let pack = packs
        .iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let f = fs::OpenOptions::new().read(true).write(true).open(pack)?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 100_000)?;
    f.write_all_at(&[b[0] ^ 0x01], 100_000)?;
    drop(f);

    let check = appliance.check();
    let report = String::from_utf8_lossy(&check.stdout).to_string() + &stderr(&check);
    assert!(
        !check.status.success(),
        "check missed the flipped byte: {report}"
    );
    let pack_name = pack.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        report.contains(&pack_name),
        "check did not name the pack {pack_name}: {report}"
    );

    let out = tmp.path().join("out");
    let r = agent.restore("latest", &out, None, false);
    assert!(!r.status.success(), "restore of a damaged chunk succeeded");
    assert!(
        stderr(&r).contains("docs/thesis.pdf"),
        "restore did not name the file: {}",
        stderr(&r)
    );
    if let Ok(bytes) = fs::read(out.join("docs/thesis.pdf")) {
        assert_eq!(
            bytes,
            fs::read(root.join("docs/thesis.pdf"))?,
            "wrong bytes were written"
        );
    }
    Ok(())
}
