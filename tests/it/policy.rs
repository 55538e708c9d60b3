//! Upload policies end to end: the unprotected area follows policy versions without reading
//! unchanged files again, retention follows each device's policy on a synthetic clock,
//! stale devices raise one alert per episode, and bad policy files change nothing.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use morgana_e2e::*;
use serde_json::Value;

fn data_cmd(appliance: &Appliance, args: &[&str]) -> Command {
    let mut c = morgana();
    c.args(args).arg("--data-dir").arg(&appliance.data_dir);
    c
}

/// `morgana policy set NAME --file <text>`.
fn set_policy(appliance: &Appliance, dir: &Path, name: &str, text: &str) -> Result<String> {
    let file = dir.join(format!("{name}.toml"));
    fs::write(&file, text)?;
    let out = run_ok(
        data_cmd(appliance, &["policy", "set", name])
            .arg("--file")
            .arg(&file),
    )?;
    Ok(String::from_utf8(out.stdout)?)
}

fn show_policy(appliance: &Appliance, name: &str) -> Result<Value> {
    let out = run_ok(&mut data_cmd(
        appliance,
        &["policy", "show", name, "--json"],
    ))?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn device_id(agent: &Agent) -> Result<String> {
    let device: Value = serde_json::from_slice(&fs::read(agent.state_dir.join("device.json"))?)?;
    Ok(device["device_id"]
        .as_str()
        .context("device.json has no device_id")?
        .to_string())
}

fn assign(appliance: &Appliance, name: &str, agent: &Agent) -> Result<()> {
    run_ok(&mut data_cmd(
        appliance,
        &["policy", "assign", name, &device_id(agent)?],
    ))?;
    Ok(())
}

fn events(appliance: &Appliance, kind: &str) -> Result<Vec<Value>> {
    let out = run_ok(&mut data_cmd(
        appliance,
        &["events", "--json", "--limit", "1000", "--kind", kind],
    ))?;
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

fn write_files(root: &Path, files: &[(&str, usize)], seed: u64) -> Result<()> {
    for (i, (path, size)) in files.iter().enumerate() {
        let p = root.join(path);
        fs::create_dir_all(p.parent().unwrap())?;
        fs::write(&p, noise(*size, seed + i as u64))?;
    }
    Ok(())
}

#[test]
fn a_policy_version_leaves_a_folder_out_and_back_in_without_a_full_reread() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    let big: &[(&str, usize)] = &[
        ("data/big/a.bin", 300_000),
        ("data/big/b.bin", 5_000),
        ("data/big/deep/c.bin", 200_000),
    ];
    let rest: &[(&str, usize)] = &[
        ("data/small.txt", 3_000),
        ("docs/report.odt", 150_000),
        ("docs/notes.txt", 800),
        ("top.txt", 10),
    ];
    write_files(&root, big, 1)?;
    write_files(&root, rest, 100)?;
    let (appliance, agent) = one_device(tmp.path(), &root)?;

    let first = agent.sync()?;
    ensure!(first["policy"] == "default", "{first}");
    ensure!(
        first["files_read"].as_u64() == Some((big.len() + rest.len()) as u64),
        "the first sync reads every file: {first}"
    );
    let saved = agent.state_dir.join("policy.json");
    ensure!(
        fs::metadata(&saved)?.permissions().mode() & 0o777 == 0o600,
        "policy.json must be private to the agent"
    );

    // The dry run judges a change on the newest snapshot and saves nothing.
    let trial = tmp.path().join("trial.toml");
    fs::write(
        &trial,
        r#"
        unprotected = { rules = ["/data/big"] }
        user_area = { rules = ["/docs"] }
        "#,
    )?;
    let out = run_ok(
        data_cmd(&appliance, &["policy", "dry-run", "office", "--json"])
            .args(["--device", &device_id(&agent)?])
            .arg("--file")
            .arg(&trial),
    )?;
    let runs: Value = serde_json::from_slice(&out.stdout)?;
    let run = &runs[0];
    let sum = |files: &[(&str, usize)]| files.iter().map(|f| f.1 as u64).sum::<u64>();
    ensure!(
        run["dropped"]["files"] == 3 && run["dropped"]["bytes"] == sum(big),
        "{run}"
    );
    ensure!(
        run["into_user_area"]["files"] == 2
            && run["into_user_area"]["bytes"] == sum(&rest[1..3])
            && run["out_of_user_area"]["files"] == 0,
        "{run}"
    );
    ensure!(run["snapshot"] == first["snapshot"], "{run} vs {first}");
    let show = data_cmd(&appliance, &["policy", "show", "office"]).output()?;
    ensure!(!show.status.success(), "a dry run saves nothing");

    // A new policy leaves /data/big out; one other file changes meanwhile.
    set_policy(
        &appliance,
        tmp.path(),
        "office",
        r#"unprotected = { rules = ["/data/big"] }"#,
    )?;
    assign(&appliance, "office", &agent)?;
    let office = show_policy(&appliance, "office")?;
    fs::write(root.join("docs/notes.txt"), b"edited after the first sync")?;
    let second = agent.sync()?;
    ensure!(
        second["policy"] == "office" && second["policy_version"] == office["version"],
        "the sync applies the policy in force: {second} vs {office}"
    );
    ensure!(
        second["files_read"].as_u64() == Some(1),
        "only the edited file is read again after the policy change: {second}"
    );
    ensure!(
        second["files"].as_u64() == Some(rest.len() as u64),
        "{second}"
    );
    let saved: Value = serde_json::from_slice(&fs::read(agent.state_dir.join("policy.json"))?)?;
    ensure!(saved["version"] == office["version"], "saved {saved}");
    ensure!(
        saved["unprotected"]["rules"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| *x == "/proc") && r.iter().any(|x| *x == "/data/big")),
        "the agent gets the factory rules merged in: {saved}"
    );

    let out = tmp.path().join("restored-without");
    let r = agent.restore(second["snapshot"].as_str().unwrap(), &out, None, false);
    ensure!(r.status.success(), "restore: {}", stderr(&r));
    ensure!(!out.join("data/big").exists(), "data/big left out");
    let expected = tmp.path().join("expected-without");
    run_ok(Command::new("cp").arg("-a").arg(&root).arg(&expected))?;
    fs::remove_dir_all(expected.join("data/big"))?;
    // Removing big touched data's mtime; the snapshot has the original.
    run_ok(
        Command::new("touch")
            .arg("-r")
            .arg(root.join("data"))
            .arg(expected.join("data")),
    )?;
    assert_same_tree(&expected, &out)?;

    // The next version takes the folder back: only its files are read.
    set_policy(&appliance, tmp.path(), "office", "")?;
    let third = agent.sync()?;
    ensure!(
        third["files_read"].as_u64() == Some(big.len() as u64),
        "only the files taken back are read: {third}"
    );
    let out = tmp.path().join("restored-with");
    let r = agent.restore(third["snapshot"].as_str().unwrap(), &out, None, false);
    ensure!(r.status.success(), "restore: {}", stderr(&r));
    assert_same_tree(&root, &out)?;

    let saved = events(&appliance, "policy.")?;
    ensure!(
        saved.len() == 3 && saved.iter().all(|e| e["actor"] == "cli"),
        "two saves and one assignment, by the cli: {saved:?}"
    );
    Ok(())
}

#[test]
fn bad_policy_files_are_refused_naming_the_rule_and_change_nothing() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let appliance = Appliance::start(&tmp.path().join("appliance"))?;
    set_policy(
        &appliance,
        tmp.path(),
        "lab",
        r#"unprotected = { rules = ["/scratch"] }"#,
    )?;
    let before = show_policy(&appliance, "lab")?;
    for (text, named) in [
        (
            r#"unprotected = { rules = ["/ok", "scratch/relative"] }"#,
            "scratch/relative",
        ),
        (
            r#"unprotected = { exceptions = ["/a/../etc"] }"#,
            "/a/../etc",
        ),
        (r#"user_area = { rules = ["/x/[oops"] }"#, "/x/[oops"),
        ("sync_interval = \"5s\"", "sync_interval"),
        ("[retention]\nyearly = 1", "yearly"),
    ] {
        let file = tmp.path().join("bad.toml");
        fs::write(&file, text)?;
        let out = data_cmd(&appliance, &["policy", "set", "lab"])
            .arg("--file")
            .arg(&file)
            .output()?;
        ensure!(!out.status.success(), "{text} was accepted");
        let err = stderr(&out);
        ensure!(
            err.contains(named),
            "{text}: the error does not name {named}: {err}"
        );
        ensure!(
            show_policy(&appliance, "lab")? == before,
            "{text} changed the policy"
        );
    }
    let out = data_cmd(&appliance, &["policy", "show", "nothing"]).output()?;
    ensure!(
        !out.status.success() && stderr(&out).contains("policy list"),
        "showing an unknown policy: {}",
        stderr(&out)
    );
    let factory = run_ok(morgana().args(["policy", "factory"]))?;
    ensure!(
        String::from_utf8(factory.stdout)?
            .lines()
            .any(|l| l == "/proc"),
        "policy factory lists /proc"
    );
    Ok(())
}

/// Unix milliseconds of `YYYY-MM-DDTHH:MM:SSZ`, computed here (days from civil), so the
/// expectation does not lean on the appliance's own time code.
fn ms_of(t: &str) -> i64 {
    let n = |a: usize, b: usize| t[a..b].parse::<i64>().unwrap();
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + n(11, 13)) * 60 + n(14, 16)) * 60_000 + n(17, 19) * 1000
}

/// The inverse of [`ms_of`] (civil from days), to whole seconds.
fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The snapshots the tier rules keep: for each tier, the newest snapshot of each of the N
/// newest periods holding one; plus the newest and the pinned.
fn expected_kept(times: &[(String, String)], tiers: [u32; 4], pinned: &str) -> BTreeSet<String> {
    let mut newest_first: Vec<&(String, String)> = times.iter().collect();
    newest_first.sort_by(|a, b| b.1.cmp(&a.1));
    let hour = |t: &str| ms_of(t) / 3_600_000;
    let day = |t: &str| ms_of(t) / 86_400_000;
    // 1970-01-01 was a Thursday; ISO weeks start on Monday.
    let week = |t: &str| (ms_of(t) / 86_400_000 + 3) / 7;
    let month = |t: &str| t[..7].replace('-', "").parse::<i64>().unwrap();
    let periods: [&dyn Fn(&str) -> i64; 4] = [&hour, &day, &week, &month];
    let mut kept: BTreeSet<String> = BTreeSet::from([newest_first[0].0.clone()]);
    if times.iter().any(|(id, _)| id == pinned) {
        kept.insert(pinned.to_string());
    }
    for (count, period) in tiers.into_iter().zip(periods) {
        let mut seen = BTreeSet::new();
        for (id, t) in &newest_first {
            if seen.len() == count as usize {
                break;
            }
            if seen.insert(period(t)) {
                kept.insert(id.clone());
            }
        }
    }
    kept
}

/// Gives snapshots chosen creation times. The appliance stamps `created` from its own
/// clock at commit, and nothing else decides retention; editing that one column after real
/// commits (rather than a test-only clock inside the shipped binary) keeps the test honest
/// about the code path and needs no waiting for months. Python's sqlite3 is on every test
/// machine; the catalog is in WAL mode, so this works beside the running appliance.
fn set_created(appliance: &Appliance, times: &[(String, String)]) -> Result<()> {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        "import sqlite3, sys\n\
         db = sqlite3.connect(sys.argv[1], timeout=30)\n\
         args = sys.argv[2:]\n\
         for i in range(0, len(args), 2):\n    \
             n = db.execute('UPDATE snapshots SET created = ? WHERE id = ?', (args[i + 1], args[i])).rowcount\n    \
             assert n == 1, args[i]\n\
         db.commit()\n",
    ])
    .arg(appliance.data_dir.join("catalog.sqlite"));
    for (id, t) in times {
        cmd.arg(id).arg(t);
    }
    run_ok(&mut cmd)?;
    Ok(())
}

fn snapshot_ids(agent: &Agent) -> Result<BTreeSet<String>> {
    Ok(agent
        .snapshots()?
        .as_array()
        .context("snapshots --json is not a list")?
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect())
}

#[test]
fn retention_follows_each_devices_policy_on_a_synthetic_clock() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let appliance = Appliance::start_with(
        &tmp.path().join("appliance"),
        &["--gc-every", "off", "--alert-check-every", "off"],
    )?;
    // Spread over five months: runs within one hour, days, weeks and months apart.
    let schedule = [
        "2026-01-05T10:00:00Z",
        "2026-01-20T10:00:00Z",
        "2026-02-02T09:00:00Z",
        "2026-02-16T09:00:00Z",
        "2026-03-02T08:00:00Z",
        "2026-03-04T08:00:00Z",
        "2026-04-06T07:00:00Z",
        "2026-04-07T07:00:00Z",
        "2026-05-11T06:00:00Z",
        "2026-05-12T06:00:00Z",
        "2026-05-13T06:00:00Z",
        "2026-05-13T07:10:00Z",
        "2026-05-13T07:20:00Z",
        "2026-05-13T08:30:00Z",
    ];
    let policies = [("tiered", [3u32, 2, 2, 2]), ("daily", [0, 5, 0, 0])];
    let mut devices = Vec::new();
    for (i, (name, t)) in policies.iter().enumerate() {
        set_policy(
            &appliance,
            tmp.path(),
            name,
            &format!(
                "[retention]\nhourly = {}\ndaily = {}\nweekly = {}\nmonthly = {}\n",
                t[0], t[1], t[2], t[3]
            ),
        )?;
        let root = tmp.path().join(format!("root{i}"));
        fs::create_dir_all(&root)?;
        let agent = Agent::enroll(&appliance, &root, &tmp.path().join(format!("state{i}")))?;
        assign(&appliance, name, &agent)?;
        let mut times = Vec::new();
        for (round, t) in schedule.iter().enumerate() {
            fs::write(root.join("round.txt"), format!("round {round}"))?;
            let s = agent.sync()?;
            times.push((s["snapshot"].as_str().unwrap().to_string(), t.to_string()));
        }
        set_created(&appliance, &times)?;
        devices.push((agent, times, *t));
    }
    // The oldest snapshot of the first device is pinned: no tier keeps it.
    let pinned = devices[0].1[0].0.clone();
    run_ok(&mut data_cmd(
        &appliance,
        &["snapshot", "pin", &pinned, "--reason", "legal-hold"],
    ))?;

    let out = run_ok(&mut data_cmd(
        &appliance,
        &[
            "gc",
            "--json",
            "--now",
            "2026-05-13T09:00:00Z",
            "--pack-grace",
            "1s",
        ],
    ))?;
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let mut kept_sets = Vec::new();
    for (agent, times, tiers) in &devices {
        let expected = expected_kept(times, *tiers, &pinned);
        let kept = snapshot_ids(agent)?;
        ensure!(
            kept == expected,
            "policy tiers {tiers:?}: kept {kept:?}, expected {expected:?}"
        );
        kept_sets.push(kept);
    }
    ensure!(kept_sets[0].contains(&pinned), "the pinned snapshot stays");
    let total: usize = kept_sets.iter().map(BTreeSet::len).sum();
    ensure!(
        report["snapshots_kept"].as_u64() == Some(total as u64)
            && report["snapshots_pruned"].as_u64() == Some((2 * schedule.len() - total) as u64),
        "gc report {report} vs {total} kept"
    );
    // The two policies keep different sets of the same schedule.
    let positions = |kept: &BTreeSet<String>, times: &[(String, String)]| -> Vec<usize> {
        (0..times.len())
            .filter(|&i| kept.contains(&times[i].0))
            .collect()
    };
    ensure!(
        positions(&kept_sets[0], &devices[0].1) != positions(&kept_sets[1], &devices[1].1),
        "different policies kept the same runs"
    );
    let check = appliance.check();
    ensure!(check.status.success(), "morgana check: {}", stderr(&check));
    Ok(())
}

#[test]
fn the_tests_own_time_helpers_agree() {
    for t in [
        "1970-01-01T00:00:00Z",
        "2026-03-01T05:06:07Z",
        "2028-02-29T23:59:59Z",
    ] {
        assert_eq!(rfc3339(ms_of(t)), t);
    }
    assert_eq!(
        ms_of("2026-01-05T00:00:00Z") / 86_400_000 % 7,
        4,
        "a Monday"
    );
}

#[test]
fn a_stale_device_raises_one_alert_per_episode() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    fs::create_dir_all(&root)?;
    fs::write(root.join("f"), b"x")?;
    let appliance = Appliance::start_with(
        &tmp.path().join("appliance"),
        &["--alert-check-every", "off"],
    )?;
    let agent = Agent::enroll(&appliance, &root, &tmp.path().join("state"))?;
    set_policy(&appliance, tmp.path(), "laptops", "alert_after = \"2h\"")?;
    assign(&appliance, "laptops", &agent)?;
    let created = agent.sync()?["created"].as_str().unwrap().to_string();
    let at = |hours: i64| rfc3339(ms_of(&created) + hours * 3_600_000);
    let check = |now: &str| -> Result<Value> {
        let out = run_ok(&mut data_cmd(
            &appliance,
            &["alerts", "check", "--json", "--now", now],
        ))?;
        let mut v: Value = serde_json::from_slice(&out.stdout)?;
        // Only the device's alerts: the machine's own disk may be full enough for a
        // volume alert, which is not what this test is about.
        v["raised"]
            .as_array_mut()
            .unwrap()
            .retain(|m| m.as_str().unwrap().starts_with("device "));
        v["recovered"]
            .as_array_mut()
            .unwrap()
            .retain(|m| m.as_str().unwrap().contains("(alert.no-recent-snapshot "));
        v["open"]
            .as_array_mut()
            .unwrap()
            .retain(|a| a["kind"] == "alert.no-recent-snapshot");
        Ok(v)
    };

    let fresh = check(&at(1))?;
    ensure!(fresh["raised"].as_array().unwrap().is_empty(), "{fresh}");
    let stale = check(&at(3))?;
    ensure!(stale["raised"].as_array().unwrap().len() == 1, "{stale}");
    let again = check(&at(5))?;
    ensure!(
        again["raised"].as_array().unwrap().is_empty()
            && again["open"].as_array().unwrap().len() == 1,
        "the same episode is not raised twice: {again}"
    );
    let raised = events(&appliance, "alert.no-recent-snapshot")?;
    ensure!(raised.len() == 1, "{raised:?}");
    ensure!(
        raised[0]["device_id"] == device_id(&agent)?.as_str(),
        "{raised:?}"
    );

    let created = agent.sync()?["created"].as_str().unwrap().to_string();
    let after_sync = rfc3339(ms_of(&created) + 600_000);
    let recovered = check(&after_sync)?;
    ensure!(
        recovered["recovered"].as_array().unwrap().len() == 1
            && recovered["open"].as_array().unwrap().is_empty(),
        "{recovered}"
    );
    let device = device_id(&agent)?;
    ensure!(
        events(&appliance, "alert.recovered")?
            .iter()
            .filter(|e| e["device_id"] == device.as_str())
            .count()
            == 1,
        "one recovery"
    );
    ensure!(
        events(&appliance, "alert.no-recent-snapshot")?.len() == 1,
        "still one alert"
    );
    Ok(())
}

/// Unmounts the test's tmpfs however the test ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_volume_raises_one_alert_and_recovers() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let volume = tmp.path().join("small-volume");
    fs::create_dir_all(&volume)?;
    // A filesystem of known size is needed to fill one: a tmpfs, which takes root.
    let mounted = is_root()
        && Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(&volume)
            .status()
            .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("cannot mount a tmpfs here (needs root); skipping the volume-full check");
        return Ok(());
    }
    let _unmount = Mounted(volume.clone());
    let appliance = Appliance::start_with(
        &tmp.path().join("appliance"),
        &["--alert-check-every", "off"],
    )?;
    let check = || -> Result<Value> {
        let out = run_ok(
            data_cmd(&appliance, &["alerts", "check", "--json"])
                .arg("--volume")
                .arg(&volume),
        )?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let empty = check()?;
    ensure!(empty["open"].as_array().unwrap().is_empty(), "{empty}");
    fs::write(volume.join("filler"), vec![7u8; 3_900_000])?;
    let full = check()?;
    ensure!(full["raised"].as_array().unwrap().len() == 1, "{full}");
    ensure!(
        check()?["raised"].as_array().unwrap().is_empty(),
        "raised twice"
    );
    fs::remove_file(volume.join("filler"))?;
    let freed = check()?;
    ensure!(freed["recovered"].as_array().unwrap().len() == 1, "{freed}");
    let raised = events(&appliance, "alert.volume-full")?;
    ensure!(
        raised.len() == 1 && raised[0]["severity"] == "error",
        "{raised:?}"
    );
    Ok(())
}

#[test]
fn serve_runs_the_alert_check_by_itself() -> Result<()> {
    crate::init();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("root");
    fs::create_dir_all(&root)?;
    let appliance = Appliance::start_with(
        &tmp.path().join("appliance"),
        &["--alert-check-every", "1s"],
    )?;
    set_policy(&appliance, tmp.path(), "strict", "alert_after = \"1s\"")?;
    let agent = Agent::enroll(&appliance, &root, &tmp.path().join("state"))?;
    assign(&appliance, "strict", &agent)?;
    // A device that never synced goes stale a second after its enrolment.
    let id = device_id(&agent)?;
    let raised = wait_for(std::time::Duration::from_secs(60), || {
        events(&appliance, "alert.no-recent-snapshot")
            .is_ok_and(|e| e.iter().any(|e| e["device_id"] == id.as_str()))
    });
    ensure!(
        raised,
        "serve raised no alert for a device that never synced"
    );
    Ok(())
}
