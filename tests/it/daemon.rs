//! The agent service (`morgana-agent run`) against a real appliance: scheduled syncs, jobs
//! queued with `morgana job …` (sync now, restores to a new place and in place, full and
//! system-only reverts, restore onto a new device, failures), heartbeats with inventory,
//! backoff while the appliance is away, and one sync at a time.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use morgana_e2e::*;
use serde_json::Value;

/// A running `morgana-agent run`; stopped with SIGTERM by `stop`, killed on drop.
pub(crate) struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    pub(crate) fn start(agent: &Agent, sync_every: &str, log: &Path) -> Result<Daemon> {
        Daemon::start_env(agent, sync_every, log, &[])
    }

    pub(crate) fn start_env(
        agent: &Agent,
        sync_every: &str,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        let file = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = agent
            .cmd("run")
            .envs(env.iter().copied())
            .args(["--sync-every", sync_every])
            .envs(env.iter().copied())
            .env("MORGANA_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("spawn morgana-agent run")?;
        Ok(Daemon {
            child,
            log: log.to_path_buf(),
        })
    }

    pub(crate) fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub(crate) fn stop(mut self) -> Result<ExitStatus> {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let mut status = None;
        wait_for(Duration::from_secs(60), || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status.with_context(|| format!("the service did not stop on SIGTERM:\n{}", self.log()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn device_id(agent: &Agent) -> Result<String> {
    let json: Value = serde_json::from_slice(&fs::read(agent.state_dir.join("device.json"))?)?;
    Ok(json["device_id"].as_str().context("device_id")?.to_owned())
}

pub(crate) fn morgana_at(appliance: &Appliance, args: &[&str]) -> Output {
    morgana()
        .args(args)
        .arg("--data-dir")
        .arg(&appliance.data_dir)
        .output()
        .expect("spawn morgana")
}

/// Queues a job; its id is what the command prints.
pub(crate) fn queue(appliance: &Appliance, args: &[&str]) -> Result<String> {
    let out = morgana_at(appliance, args);
    ensure!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout)?.trim().to_owned();
    ensure!(id.starts_with('j'), "not a job id: {id:?}");
    Ok(id)
}

/// `morgana job wait`, which must succeed.
pub(crate) fn wait_ok(appliance: &Appliance, daemon: &Daemon, id: &str) -> Result<()> {
    let out = morgana_at(appliance, &["job", "wait", id, "--timeout", "3m"]);
    ensure!(
        out.status.success(),
        "job {id} did not succeed: {}{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    Ok(())
}

fn job_json(appliance: &Appliance, id: &str) -> Result<Value> {
    let out = run_ok(
        morgana()
            .args(["job", "show", id, "--json", "--data-dir"])
            .arg(&appliance.data_dir),
    )?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn reasons(agent: &Agent) -> Result<Vec<String>> {
    Ok(agent
        .snapshots()?
        .as_array()
        .context("snapshot list")?
        .iter()
        .map(|s| s["reason"].as_str().unwrap_or_default().to_owned())
        .collect())
}

fn count(agent: &Agent, reason: &str) -> usize {
    reasons(agent)
        .map(|r| r.iter().filter(|x| *x == reason).count())
        .unwrap_or(0)
}

pub(crate) fn write(root: &Path, rel: &str, data: &[u8]) -> Result<()> {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap())?;
    fs::write(p, data)?;
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    run_ok(std::process::Command::new("cp").arg("-a").arg(from).arg(to))?;
    Ok(())
}

fn events(appliance: &Appliance, kind: &str) -> Result<Vec<Value>> {
    let out = run_ok(
        morgana()
            .args(["events", "--json", "--kind", kind, "--data-dir"])
            .arg(&appliance.data_dir),
    )?;
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| serde_json::from_str(l).map_err(Into::into))
        .collect()
}

#[test]
fn the_service_syncs_on_schedule_takes_jobs_and_reports_inventory() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    write(&root, "docs/a.txt", b"hello")?;
    write(&root, "big.bin", &noise(300_000, 1))?;
    let appliance =
        Appliance::start_with(&tmp.path().join("appliance"), &["--heartbeat-every", "1s"])?;
    let agent = Agent::enroll(&appliance, &root, &tmp.path().join("state"))?;
    let id = device_id(&agent)?;
    let daemon = Daemon::start(&agent, "2s", &tmp.path().join("agent.log"))?;

    // Several snapshots on its own, the first at start (no sync recorded yet).
    ensure!(
        wait_for(Duration::from_secs(90), || count(&agent, "scheduled") >= 3),
        "fewer than 3 scheduled snapshots: {:?}\n{}",
        reasons(&agent),
        daemon.log()
    );

    // A job is picked up by the waiting long poll, not by the next poll after it expires
    // (60 s): the appliance wakes it.
    let job = queue(&appliance, &["job", "sync", &id])?;
    wait_ok(&appliance, &daemon, &job)?;
    let shown = job_json(&appliance, &job)?;
    let latency = shown["started_ms"].as_i64().context("started")?
        - shown["created_ms"].as_i64().context("created")?;
    eprintln!("sync job picked up {latency} ms after it was queued");
    ensure!(latency < 30_000, "picked up after {latency} ms: {shown}");
    assert_eq!(shown["state"], "succeeded");
    assert!(
        shown["message"].as_str().unwrap().starts_with("snapshot "),
        "{shown}"
    );
    ensure!(count(&agent, "manual") == 1, "{:?}", reasons(&agent));
    let succeeded = events(&appliance, "job.succeeded")?;
    ensure!(
        succeeded
            .iter()
            .any(|e| e["message"].as_str().unwrap().contains(&job))
    );

    // Heartbeats: last seen, version, last snapshot, inventory.
    let out = run_ok(
        morgana()
            .args(["device", "show", &id, "--json", "--data-dir"])
            .arg(&appliance.data_dir),
    )?;
    let device: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(device["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(device["last_seen"].is_string(), "{device}");
    assert!(device["last_snapshot"].is_string(), "{device}");
    assert!(
        !device["inventory"]["kernel"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "{device}"
    );
    // Recorded when it changes, not with every heartbeat (once here, unless the machine's
    // network changed meanwhile).
    let inventory_events = events(&appliance, "device.inventory-changed")?.len();
    ensure!(
        (1..5).contains(&inventory_events),
        "{inventory_events} inventory events"
    );
    let list = run_ok(
        morgana()
            .args(["device", "list", "--data-dir"])
            .arg(&appliance.data_dir),
    )?;
    assert!(String::from_utf8_lossy(&list.stdout).contains(&id));

    let status = daemon.stop()?;
    ensure!(status.success(), "exit {status} on SIGTERM");
    Ok(())
}

#[test]
fn restore_jobs_put_folders_in_a_new_place_and_back_in_place() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    write(&root, "home/alice/docs/a.txt", b"first")?;
    write(&root, "home/alice/docs/b.bin", &noise(200_000, 2))?;
    write(&root, "home/alice/docs/sub/c.txt", b"deep")?;
    write(&root, "home/alice/other.txt", b"other")?;
    let (appliance, agent) = one_device(tmp.path(), &root)?;
    let id = device_id(&agent)?;
    let snap = agent.sync()?["snapshot"].as_str().unwrap().to_owned();
    let reference = tmp.path().join("reference");
    fs::create_dir(&reference)?;
    copy_tree(&root.join("home/alice/docs"), &reference)?;
    // The last sync is recent: the service syncs again only in an hour.
    let daemon = Daemon::start(&agent, "1h", &tmp.path().join("agent.log"))?;

    fs::write(root.join("home/alice/docs/a.txt"), b"changed")?;
    fs::remove_file(root.join("home/alice/docs/b.bin"))?;
    write(&root, "home/alice/docs/sub/new.txt", b"added later")?;
    write(&root, "home/alice/other.txt", b"edited, not restored")?;

    // To a new place: the folder under its own name.
    let out = tmp.path().join("out");
    let job = queue(
        &appliance,
        &[
            "job",
            "restore",
            &id,
            "--snapshot",
            &snap,
            "--path",
            "/home/alice/docs",
            "--to",
            out.to_str().unwrap(),
        ],
    )?;
    wait_ok(&appliance, &daemon, &job)?;
    assert_same_tree(&reference, &out)?;
    // Progress has totals, counted by the appliance, and the agent's count reaches them.
    let progress = &job_json(&appliance, &job)?["progress"];
    let three_files = 5 + 200_000 + 4;
    for (done, total, want) in [
        ("files_done", "files_total", 3),
        ("bytes_done", "bytes_total", three_files),
    ] {
        ensure!(
            progress[done] == want && progress[total] == want,
            "{progress}"
        );
    }

    // In place: the folder becomes the snapshot's; nothing beside it changes.
    let job = queue(
        &appliance,
        &[
            "job",
            "restore",
            &id,
            "--snapshot",
            &snap,
            "--path",
            "/home/alice/docs",
        ],
    )?;
    wait_ok(&appliance, &daemon, &job)?;
    assert_same_tree(&reference.join("docs"), &root.join("home/alice/docs"))?;
    assert_eq!(
        fs::read(root.join("home/alice/other.txt"))?,
        b"edited, not restored"
    );
    daemon.stop()?;
    Ok(())
}

#[test]
fn full_and_system_only_reverts() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    write(&root, "etc/app.conf", b"setting = 1\n")?;
    write(&root, "usr/bin/tool", &noise(150_000, 3))?;
    write(&root, "home/alice/notes.txt", b"my notes")?;
    write(&root, "tmp/scratch", b"scratch")?;
    let (appliance, agent) = one_device(tmp.path(), &root)?;
    let id = device_id(&agent)?;
    let snap = agent.sync()?["snapshot"].as_str().unwrap().to_owned();
    let reference = tmp.path().join("reference");
    copy_tree(&root, &reference)?;
    let daemon = Daemon::start(&agent, "1h", &tmp.path().join("agent.log"))?;

    // Full: the added file goes, the changed ones come back, /tmp stays as it is now.
    write(&root, "etc/new.conf", b"added")?;
    write(&root, "etc/app.conf", b"setting = 2\n")?;
    write(&root, "home/alice/notes.txt", b"notes, edited")?;
    write(&root, "tmp/scratch", b"scratch, edited")?;
    write(&root, "tmp/new", b"new scratch")?;
    let tmp_now = tmp.path().join("tmp-now");
    copy_tree(&root.join("tmp"), &tmp_now)?;
    let job = queue(
        &appliance,
        &[
            "job",
            "restore",
            &id,
            "--snapshot",
            &snap,
            "--scope",
            "full",
        ],
    )?;
    wait_ok(&appliance, &daemon, &job)?;
    for dir in ["etc", "usr", "home"] {
        assert_same_tree(&reference.join(dir), &root.join(dir)).context(dir)?;
    }
    assert_same_tree(&tmp_now, &root.join("tmp")).context("tmp")?;
    ensure!(count(&agent, "pre-revert") == 1, "{:?}", reasons(&agent));

    // System-only: system files come back; the user area stays exactly as modified.
    write(&root, "etc/app.conf", b"setting = 3\n")?;
    write(&root, "usr/bin/extra", b"installed later")?;
    write(&root, "home/alice/notes.txt", b"notes, edited again")?;
    write(&root, "home/alice/new.txt", b"new user file")?;
    write(&root, "home/bob/hello.txt", b"a new user")?;
    let home_now = tmp.path().join("home-now");
    copy_tree(&root.join("home"), &home_now)?;
    let job = queue(
        &appliance,
        &[
            "job",
            "restore",
            &id,
            "--snapshot",
            &snap,
            "--scope",
            "system-only",
        ],
    )?;
    wait_ok(&appliance, &daemon, &job)?;
    for dir in ["etc", "usr"] {
        assert_same_tree(&reference.join(dir), &root.join(dir)).context(dir)?;
    }
    assert_same_tree(&home_now, &root.join("home")).context("home")?;
    ensure!(count(&agent, "pre-revert") == 2, "{:?}", reasons(&agent));
    // The states reverted away from outlive retention until someone unpins them.
    for s in agent.snapshots()?.as_array().context("snapshot list")? {
        let pre_revert = s["reason"] == "pre-revert";
        ensure!(
            (s["pinned"] == "pre-revert") == pre_revert,
            "only pre-revert snapshots are pinned: {s}"
        );
    }
    daemon.stop()?;
    Ok(())
}

#[test]
fn a_snapshot_of_one_device_restores_onto_a_new_one_and_failures_say_why() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root_a = tmp.path().join("a");
    write(&root_a, "etc/hostname", b"pc-a\n")?;
    write(&root_a, "home/alice/thesis.pdf", &noise(400_000, 4))?;
    write(&root_a, "opt/app/run.sh", b"#!/bin/sh\n")?;
    std::os::unix::fs::symlink("run.sh", root_a.join("opt/app/start"))?;
    let (appliance, a) = one_device(tmp.path(), &root_a)?;
    let snap = a.sync()?["snapshot"].as_str().unwrap().to_owned();

    let root_b = tmp.path().join("b");
    fs::create_dir(&root_b)?;
    let b = Agent::enroll(&appliance, &root_b, &tmp.path().join("state-b"))?;
    let id_b = device_id(&b)?;
    let daemon = Daemon::start(&b, "1h", &tmp.path().join("agent-b.log"))?;
    let job = queue(
        &appliance,
        &[
            "job",
            "restore",
            &id_b,
            "--snapshot",
            &snap,
            "--scope",
            "full",
        ],
    )?;
    wait_ok(&appliance, &daemon, &job)?;
    assert_same_tree(&root_a, &root_b)?;

    // A target that cannot be written: the job fails, saying so, and the log has it.
    let blocker = tmp.path().join("a-file");
    fs::write(&blocker, b"not a folder")?;
    let bad_target = blocker.join("restore-here");
    let job = queue(
        &appliance,
        &[
            "job",
            "restore",
            &id_b,
            "--snapshot",
            &snap,
            "--path",
            "/etc",
            "--to",
            bad_target.to_str().unwrap(),
        ],
    )?;
    let out = morgana_at(&appliance, &["job", "wait", &job, "--timeout", "3m"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("failed") && said.contains("cannot create the restore target"),
        "{said}"
    );
    assert_eq!(job_json(&appliance, &job)?["state"], "failed");
    let failed = events(&appliance, "job.failed")?;
    ensure!(
        failed.iter().any(|e| {
            let m = e["message"].as_str().unwrap_or("");
            m.contains(&job) && m.contains("cannot create the restore target")
        }),
        "{failed:?}"
    );

    // Bad requests never become jobs.
    let out = morgana_at(
        &appliance,
        &[
            "job",
            "restore",
            &id_b,
            "--snapshot",
            "nope",
            "--scope",
            "full",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("there is no snapshot"),
        "{}",
        stderr(&out)
    );
    let out = morgana_at(&appliance, &["job", "sync", "no-such-device"]);
    assert!(
        stderr(&out).contains("there is no device"),
        "{}",
        stderr(&out)
    );
    daemon.stop()?;
    Ok(())
}

#[test]
fn the_service_backs_off_while_the_appliance_is_away_and_resumes() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    write(&root, "f.txt", b"data")?;
    let data_dir = tmp.path().join("appliance");
    let appliance = Appliance::start_with(&data_dir, &["--heartbeat-every", "1s"])?;
    let listen = format!("127.0.0.1:{}", appliance.port());
    let agent = Agent::enroll(&appliance, &root, &tmp.path().join("state"))?;
    let mut daemon = Daemon::start(&agent, "2s", &tmp.path().join("agent.log"))?;
    ensure!(
        wait_for(Duration::from_secs(60), || count(&agent, "scheduled") >= 1),
        "{}",
        daemon.log()
    );
    drop(appliance);
    // Each loop notices, logs and backs off; the service keeps running.
    ensure!(
        wait_for(Duration::from_secs(60), || {
            let log = daemon.log();
            log.contains("heartbeat failed") && log.contains("retrying in")
        }),
        "{}",
        daemon.log()
    );
    ensure!(daemon.running(), "the service exited:\n{}", daemon.log());
    let appliance = Appliance::start_on(&data_dir, &listen, &[])?;
    let before = count(&agent, "scheduled");
    ensure!(
        wait_for(Duration::from_secs(120), || count(&agent, "scheduled")
            > before),
        "no sync after the appliance returned:\n{}",
        daemon.log()
    );
    drop(appliance);
    daemon.stop()?;
    Ok(())
}

#[test]
fn a_manual_sync_waits_for_the_one_running() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    write(&root, "f.txt", b"data")?;
    let (_appliance, agent) = one_device(tmp.path(), &root)?;
    // Hold the lock as a running sync does.
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(agent.state_dir.join("sync.lock"))?;
    // SAFETY: a valid descriptor we own.
    ensure!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } == 0);
    let mut child = agent
        .cmd("sync")
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line)?;
    ensure!(line.contains("a sync is already running"), "{line}");
    ensure!(
        child.try_wait()?.is_none(),
        "the sync did not wait for the lock"
    );
    ensure!(count(&agent, "manual") == 0);
    drop(lock);
    let status = child.wait()?;
    ensure!(status.success(), "{status}");
    ensure!(count(&agent, "manual") == 1);
    Ok(())
}

#[test]
fn a_job_the_agent_lost_fails_after_the_grace_and_the_next_one_runs() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    write(&root, "f.txt", b"data")?;
    let appliance =
        Appliance::start_with(&tmp.path().join("appliance"), &["--heartbeat-every", "1s"])?;
    let agent = Agent::enroll(&appliance, &root, &tmp.path().join("state"))?;
    let id = device_id(&agent)?;
    agent.sync()?;
    // A sync job blocks on this lock, so it is running when the service is killed.
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(agent.state_dir.join("sync.lock"))?;
    // SAFETY: a valid descriptor we own.
    ensure!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } == 0);
    let daemon = Daemon::start(&agent, "1h", &tmp.path().join("agent-1.log"))?;
    let lost = queue(&appliance, &["job", "sync", &id])?;
    let state = |job: &str| {
        job_json(&appliance, job)
            .map(|j| j["state"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    ensure!(
        wait_for(Duration::from_secs(60), || state(&lost) == "running"),
        "the job never started:\n{}",
        daemon.log()
    );
    // SIGKILL: the service cannot report anything.
    drop(daemon);
    drop(lock);
    ensure!(state(&lost) == "running");

    let daemon = Daemon::start(&agent, "1h", &tmp.path().join("agent-2.log"))?;
    ensure!(
        wait_for(Duration::from_secs(90), || state(&lost) == "failed"),
        "the lost job was not failed: {}\n{}",
        job_json(&appliance, &lost)?,
        daemon.log()
    );
    let message = job_json(&appliance, &lost)?["message"].to_string();
    ensure!(message.contains("queue the job again"), "{message}");
    let events = run_ok(
        morgana()
            .args(["events", "--kind", "job.failed", "--json", "--data-dir"])
            .arg(&appliance.data_dir),
    )?;
    ensure!(
        String::from_utf8_lossy(&events.stdout).contains(&lost),
        "no job.failed event for {lost}"
    );
    let next = queue(&appliance, &["job", "sync", &id])?;
    wait_ok(&appliance, &daemon, &next)?;
    daemon.stop()?;
    Ok(())
}
