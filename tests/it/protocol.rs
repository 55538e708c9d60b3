//! The appliance's front door: TLS only, device certificates, and no trust in what a
//! device uploads.

use std::fs;
use std::process::Command;

use anyhow::Result;
use morgana_core::Id;
use morgana_core::pack::{BlobKind, Compression, PackBuilder};
use morgana_core::tree::{Content, Entry, Kind, Tree};
use morgana_e2e::*;

fn pack_file(
    dir: &std::path::Path,
    name: &str,
    blobs: &[(Id, BlobKind, &[u8])],
) -> Result<std::path::PathBuf> {
    let mut b = PackBuilder::default();
    for (id, kind, bytes) in blobs {
        b.add_stored(*id, *kind, Compression::None, bytes, bytes.len() as u32);
    }
    let path = dir.join(name);
    fs::write(&path, b.finish().bytes)?;
    Ok(path)
}

/// The HTTP status curl sees for a request (empty when there was no HTTP answer).
fn http_status(args: &[&str]) -> Result<String> {
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn tls_only_and_device_certificates_required() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    fs::create_dir_all(&root)?;
    let (appliance, agent) = one_device(tmp.path(), &root)?;
    let (code, _) = appliance.curl(&agent, "/healthz", None)?;
    assert_eq!(code, 200);

    let ca = agent.state_dir.join("ca.crt");
    let ca = ca.to_str().unwrap();
    let (cert, key) = (
        agent.state_dir.join("client.crt"),
        agent.state_dir.join("client.key"),
    );
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());

    // Plain HTTP gets no answer.
    let plain = format!("http://127.0.0.1:{}/healthz", appliance.port());
    assert_ne!(http_status(&["--max-time", "5", &plain])?, "200");

    // Without the device certificate the data plane is closed.
    let snapshots = format!("{}/v1/snapshots", appliance.url);
    let anon = http_status(&["-H", "x-morgana-protocol: 1", "--cacert", ca, &snapshots])?;
    assert_eq!(anon, "401");

    // An agent speaking another protocol version is told so.
    let old = http_status(&[
        "-H",
        "x-morgana-protocol: 999",
        "--cacert",
        ca,
        "--cert",
        cert,
        "--key",
        key,
        &snapshots,
    ])?;
    assert_eq!(old, "426");

    // Credential files are private.
    use std::os::unix::fs::PermissionsExt;
    for f in ["client.key", "client.crt"] {
        let mode = fs::metadata(agent.state_dir.join(f))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f} has mode {mode:o}");
    }
    Ok(())
}

#[test]
fn tokens_are_single_use_and_pinned() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    fs::create_dir_all(&root)?;
    let appliance = Appliance::start(&tmp.path().join("appliance"))?;
    let token = appliance.token()?;
    let enroll = |state: &str, token: &str| {
        agent_cmd()
            .args([
                "enroll",
                "--server",
                &appliance.url,
                "--token",
                token,
                "--root",
            ])
            .arg(&root)
            .arg("--state-dir")
            .arg(tmp.path().join(state))
            .output()
            .unwrap()
    };
    assert!(enroll("s1", &token).status.success());
    let reused = enroll("s2", &token);
    assert!(
        !reused.status.success(),
        "a used-up token enrolled a second device"
    );
    // A token pinning another CA must not even reach the appliance with its secret.
    let other = tempfile::tempdir()?;
    let other_appliance = Appliance::start(other.path())?;
    let foreign = other_appliance.token()?;
    let wrong = enroll("s3", &foreign);
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("CA"), "{}", stderr(&wrong));
    let garbage = enroll("s4", "not-a-token");
    assert!(
        stderr(&garbage).contains("enroll-token"),
        "{}",
        stderr(&garbage)
    );
    Ok(())
}

#[test]
fn forged_chunks_and_hostile_trees_are_refused() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let victim_root = tmp.path().join("victim");
    fs::create_dir_all(&victim_root)?;
    let popular = noise(300_000, 31337);
    fs::write(victim_root.join("popular.dll"), &popular)?;
    let attacker_root = tmp.path().join("attacker");
    fs::create_dir_all(&attacker_root)?;
    let appliance = Appliance::start(&tmp.path().join("appliance"))?;
    let attacker = Agent::enroll(&appliance, &attacker_root, &tmp.path().join("sa"))?;

    // Wrong bytes under the id of a chunk every device has.
    let chunk_id = {
        let mut chunker = morgana_core::Chunker::new(Default::default())?;
        chunker
            .chunk::<_, std::io::Error>(&popular[..], |_, _| Ok(()))?
            .chunks[0]
    };
    let forged = pack_file(
        tmp.path(),
        "forged.pack",
        &[(chunk_id, BlobKind::Chunk, b"malware")],
    )?;
    let (code, body) = appliance.curl(&attacker, "/v1/packs", Some(&forged))?;
    assert_eq!(code, 422, "forged pack accepted: {body}");
    assert!(
        body.contains(&chunk_id.to_hex()),
        "the refusal does not name the blob: {body}"
    );

    // A tree whose entry would climb out of the restore directory.
    let evil = Tree {
        entries: vec![Entry {
            name: b"..".to_vec(),
            kind: Some(Kind::File),
            size: 1,
            content: Content::Inline(b"x".to_vec()),
            ..Default::default()
        }],
    };
    let (tree_id, tree_bytes) = evil.seal();
    let hostile = pack_file(
        tmp.path(),
        "hostile.pack",
        &[(tree_id, BlobKind::Tree, &tree_bytes)],
    )?;
    let (code, body) = appliance.curl(&attacker, "/v1/packs", Some(&hostile))?;
    assert_eq!(code, 422, "hostile tree accepted: {body}");
    assert!(body.contains("not allowed"), "{body}");

    // A commit of something the appliance does not hold is refused.
    let commit = tmp.path().join("commit.json");
    fs::write(
        &commit,
        format!(
            r#"{{"root":"{tree_id}","stats":{{"files":0,"dirs":0,"bytes":0,"bytes_sent":0,"new_chunks":0}},"reason":"manual"}}"#
        ),
    )?;
    let (code, body) = appliance.curl(&attacker, "/v1/snapshots", Some(&commit))?;
    assert_eq!(code, 409, "{body}");

    // The victim's data is untouched by all of it.
    let victim = Agent::enroll(&appliance, &victim_root, &tmp.path().join("sv"))?;
    victim.sync()?;
    let out = tmp.path().join("out");
    let r = victim.restore("latest", &out, None, false);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(fs::read(out.join("popular.dll"))?, popular);
    assert!(appliance.check().status.success());
    Ok(())
}
