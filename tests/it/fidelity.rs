//! Round-trip fidelity: everything a desktop's file system holds comes back bit for bit.

use std::ffi::OsStr;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use anyhow::Result;
use morgana_e2e::*;

fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let ts = [
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: valid NUL-terminated path and two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", path.display());
}

/// A tree with every kind of entry and attribute the agent must keep.
fn build_tree(root: &Path) -> Result<()> {
    fs::create_dir_all(root.join("etc/conf.d"))?;
    fs::create_dir_all(root.join("home/alice/docs"))?;
    fs::write(root.join("empty"), b"")?;
    fs::write(root.join("tiny.txt"), b"hello")?;
    fs::write(root.join("etc/conf.d/exactly-inline"), vec![b'i'; 512])?;
    fs::write(root.join("etc/conf.d/just-over-inline"), vec![b'j'; 513])?;
    fs::write(
        root.join("home/alice/docs/report.bin"),
        noise(3 * 1024 * 1024 + 11, 1),
    )?;
    fs::write(
        root.join("home/alice/docs/compressible.txt"),
        "lorem ipsum ".repeat(200_000),
    )?;
    // Sparse: 64 MiB with data at both ends and a hole between.
    let mut f = fs::File::create(root.join("sparse.img"))?;
    f.write_all(&noise(100_000, 2))?;
    f.seek(SeekFrom::Start(64 << 20))?;
    f.write_all(b"tail")?;
    drop(f);
    symlink("docs/report.bin", root.join("home/alice/link-rel"))?;
    symlink("/nonexistent/absolute", root.join("dangling"))?;
    fs::write(root.join("hard-a"), noise(70_000, 3))?;
    fs::hard_link(root.join("hard-a"), root.join("home/hard-b"))?;
    fs::write(root.join("setuid"), b"#!/bin/sh\n")?;
    fs::set_permissions(root.join("setuid"), fs::Permissions::from_mode(0o4755))?;
    fs::create_dir(root.join("shared"))?;
    fs::set_permissions(root.join("shared"), fs::Permissions::from_mode(0o3777))?;
    fs::write(root.join("private"), b"secret")?;
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o600))?;
    // Names that are not UTF-8, and one that looks like a path trick but is just a name.
    fs::write(
        root.join(OsStr::from_bytes(b"latin1-\xe9t\xe9")),
        b"caf\xe9",
    )?;
    fs::create_dir(root.join(OsStr::from_bytes(b"dir-\xff\xfe")))?;
    fs::write(root.join(OsStr::from_bytes(b"dir-\xff\xfe/..x")), b"dots")?;
    xattr::set(
        root.join("tiny.txt"),
        "user.morgana.test",
        b"value\0with nul",
    )?;
    xattr::set(root.join("home/alice"), "user.dir-attr", b"d")?;
    let fifo = std::ffi::CString::new(root.join("pipe").as_os_str().as_bytes())?;
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    if is_root() {
        let dev = std::ffi::CString::new(root.join("null-dev").as_os_str().as_bytes())?;
        // SAFETY: valid path; char device 1:3 like /dev/null.
        assert_eq!(
            unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) },
            0
        );
        std::os::unix::fs::lchown(root.join("tiny.txt"), Some(1234), Some(5678))?;
        std::os::unix::fs::lchown(root.join("dangling"), Some(4321), Some(8765))?;
        std::os::unix::fs::lchown(root.join("home/alice"), Some(1000), Some(1000))?;
        // chown clears setuid: set it again.
        std::os::unix::fs::lchown(root.join("setuid"), Some(0), Some(0))?;
        fs::set_permissions(root.join("setuid"), fs::Permissions::from_mode(0o4755))?;
    }
    // Nanosecond mtimes everywhere, set last, deepest first (writing a child touches the dir).
    let mut all = Vec::new();
    collect(root, &mut all)?;
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in all.iter().enumerate() {
        set_mtime(p, 1_700_000_000 + i as i64 * 3600, 123_456_789 - i as i64);
    }
    Ok(())
}

fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        out.push(e.path());
        if e.file_type()?.is_dir() {
            collect(&e.path(), out)?;
        }
    }
    Ok(())
}

#[test]
fn round_trip_keeps_everything() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    build_tree(&root)?;
    let (_appliance, agent) = one_device(tmp.path(), &root)?;
    let summary = agent.sync()?;
    assert!(summary["snapshot"].is_string(), "{summary}");
    let files = summary["files"].as_u64().unwrap();
    assert!(files >= 12, "{summary}");

    let out = tmp.path().join("restored");
    let r = agent.restore("latest", &out, None, false);
    assert!(r.status.success(), "restore failed: {}", stderr(&r));
    assert_same_tree(&root, &out)?;

    // Holes stay holes.
    let sparse = fs::metadata(out.join("sparse.img"))?;
    assert!(
        sparse.blocks() * 512 < 8 << 20,
        "sparse file restored dense: {} blocks",
        sparse.blocks()
    );

    // Into a non-empty directory only with --overwrite.
    let again = agent.restore("latest", &out, None, false);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("--overwrite"), "{}", stderr(&again));
    fs::write(out.join("tiny.txt"), b"clobbered")?;
    let forced = agent.restore("latest", &out, None, true);
    assert!(forced.status.success(), "{}", stderr(&forced));
    assert_same_tree(&root, &out)?;

    // A single folder, at its own relative path.
    let part = tmp.path().join("part");
    let r = agent.restore(
        summary["snapshot"].as_str().unwrap(),
        &part,
        Some("home/alice"),
        false,
    );
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(
        fs::read(part.join("home/alice/docs/report.bin"))?,
        fs::read(root.join("home/alice/docs/report.bin"))?
    );
    assert!(!part.join("tiny.txt").exists());

    // Listing shows the snapshot with its counts.
    let list = agent.snapshots()?;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], summary["snapshot"]);
    assert_eq!(list[0]["files"].as_u64(), Some(files));
    assert!(list[0]["created"].is_string() && list[0]["bytes"].as_u64().unwrap() > 64 << 20);
    Ok(())
}

#[test]
fn unchanged_files_are_not_read_again() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    fs::create_dir_all(root.join("a/b"))?;
    for i in 0..50 {
        fs::write(root.join(format!("a/b/f{i}")), noise(20_000, i))?;
    }
    let (_appliance, agent) = one_device(tmp.path(), &root)?;
    let first = agent.sync()?;
    assert_eq!(first["files_read"].as_u64(), Some(50), "{first}");
    let second = agent.sync()?;
    assert_eq!(second["files_read"].as_u64(), Some(0), "{second}");
    assert_eq!(second["new_chunks"].as_u64(), Some(0), "{second}");
    fs::write(root.join("a/b/f7"), noise(20_000, 777))?;
    let third = agent.sync()?;
    assert_eq!(third["files_read"].as_u64(), Some(1), "{third}");
    let out = tmp.path().join("out");
    let r = agent.restore("latest", &out, None, false);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_same_tree(&root, &out)?;
    Ok(())
}

/// > 4 GiB, sparse, streamed both ways: the agent never holds it in memory.
#[test]
fn file_larger_than_4_gib() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    fs::create_dir_all(&root)?;
    let big = root.join("disk.img");
    let mut f = fs::File::create(&big)?;
    f.write_all(&noise(1 << 20, 9))?;
    f.seek(SeekFrom::Start((4u64 << 30) + 12345))?;
    f.write_all(&noise(1 << 20, 10))?;
    drop(f);
    let (appliance, agent) = one_device(tmp.path(), &root)?;
    let s = agent.sync()?;
    assert_eq!(
        s["bytes_scanned"].as_u64(),
        Some(fs::metadata(&big)?.len()),
        "{s}"
    );
    // The zero run dedups to a handful of chunks.
    assert!(
        appliance.volume_bytes() < 16 << 20,
        "volume holds {} bytes",
        appliance.volume_bytes()
    );
    let out = tmp.path().join("out");
    let r = agent.restore("latest", &out, None, false);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(hash_file(&out.join("disk.img"))?, hash_file(&big)?);
    assert!(
        fs::metadata(out.join("disk.img"))?.blocks() * 512 < 64 << 20,
        "restored dense"
    );
    Ok(())
}
