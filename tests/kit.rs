//! Test kit for end-to-end tests: builds and starts real `morgana` and `morgana-agent`
//! processes (TLS over loopback, each in its own temporary directory) and compares trees.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// Directory holding the `morgana` and `morgana-agent` binaries, built once per test
/// process with the same profile as the tests themselves.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps/test");
        let target = profile_dir.parent().expect("target dir");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        // Selected as `cargo test --workspace` selects (every member, dev-dependencies on),
        // so features resolve the same and no dependency is compiled a second time.
        cmd.args(["build", "--workspace", "--bins", "--tests", "--target-dir"])
            .arg(target);
        if profile_dir.file_name() == Some(OsStr::new("release")) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the binaries");
        assert!(
            status.success(),
            "building morgana and morgana-agent failed"
        );
        profile_dir.to_path_buf()
    })
}

pub fn morgana() -> Command {
    Command::new(bin_dir().join("morgana"))
}

pub fn agent_cmd() -> Command {
    Command::new(bin_dir().join("morgana-agent"))
}

/// Runs a command, failing with its stderr when it fails.
pub fn run_ok(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// A running `morgana serve` in its own data directory; killed on drop.
pub struct Appliance {
    pub data_dir: PathBuf,
    pub url: String,
    child: Child,
}

impl Appliance {
    pub fn start(data_dir: &Path) -> Result<Appliance> {
        Self::start_with(data_dir, &[])
    }

    pub fn start_with(data_dir: &Path, extra: &[&str]) -> Result<Appliance> {
        Self::start_full(data_dir, "127.0.0.1:0", extra, &[])
    }

    /// Started inside network namespace `netns` (which the test created), on `listen`.
    pub fn start_in_netns(
        netns: &str,
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
    ) -> Result<Appliance> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(bin_dir().join("morgana"));
        Self::start_cmd(cmd, data_dir, listen, extra, &[])
    }

    /// Starts on a given address, e.g. again on the port an earlier run used.
    pub fn start_on(data_dir: &Path, listen: &str, extra: &[&str]) -> Result<Appliance> {
        Self::start_full(data_dir, listen, extra, &[])
    }

    /// Started with extra flags and environment variables (e.g. `MORGANA_ADMIN_PASSWORD`).
    pub fn start_with_env(
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Appliance> {
        Self::start_full(data_dir, "127.0.0.1:0", extra, env)
    }

    fn start_full(
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Appliance> {
        Self::start_cmd(morgana(), data_dir, listen, extra, env)
    }

    fn start_cmd(
        mut cmd: Command,
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Appliance> {
        let mut child = cmd
            .arg("serve")
            .envs(env.iter().copied())
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn morgana serve")?;
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if let Some(url) = line.strip_prefix("morgana listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                bail!("morgana serve did not print its listening line within 60 s");
            }
        };
        Ok(Appliance {
            data_dir: data_dir.to_path_buf(),
            url,
            child,
        })
    }

    pub fn token(&self) -> Result<String> {
        let out = run_ok(
            morgana()
                .arg("enroll-token")
                .arg("--data-dir")
                .arg(&self.data_dir),
        )?;
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    pub fn check(&self) -> Output {
        morgana()
            .arg("check")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .output()
            .expect("spawn morgana check")
    }

    /// Bytes of all pack files on the default volume.
    pub fn volume_bytes(&self) -> u64 {
        du(&self.data_dir.join("volumes"))
    }

    pub fn pack_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk_files(&self.data_dir.join("volumes"), &mut |p| {
            if p.extension() == Some(OsStr::new("pack")) {
                out.push(p.to_path_buf())
            }
        });
        out.sort();
        out
    }

    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// `curl` with this device's credential: the tests' independent HTTPS client.
    pub fn curl(&self, agent: &Agent, path: &str, body: Option<&Path>) -> Result<(u16, String)> {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-H",
            "x-morgana-protocol: 1",
        ])
        .arg("--cacert")
        .arg(agent.state_dir.join("ca.crt"))
        .arg("--cert")
        .arg(agent.state_dir.join("client.crt"))
        .arg("--key")
        .arg(agent.state_dir.join("client.key"));
        if let Some(b) = body {
            let json = b.extension() == Some(OsStr::new("json"));
            let ct = if json {
                "application/json"
            } else {
                "application/octet-stream"
            };
            cmd.args(["-H", &format!("content-type: {ct}")]);
            cmd.arg("--data-binary").arg(format!("@{}", b.display()));
        }
        cmd.arg(format!("{}{}", self.url, path));
        let out = run_ok(&mut cmd)?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').context("curl output")?;
        Ok((code.trim().parse()?, body.to_string()))
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An enrolled agent with its own state directory.
pub struct Agent {
    pub state_dir: PathBuf,
    pub root: PathBuf,
}

impl Agent {
    pub fn enroll(appliance: &Appliance, root: &Path, state_dir: &Path) -> Result<Agent> {
        let token = appliance.token()?;
        run_ok(
            agent_cmd()
                .arg("enroll")
                .args(["--server", &appliance.url, "--token", &token])
                .arg("--root")
                .arg(root)
                .arg("--state-dir")
                .arg(state_dir),
        )?;
        Ok(Agent {
            state_dir: state_dir.to_path_buf(),
            root: root.to_path_buf(),
        })
    }

    pub fn cmd(&self, sub: &str) -> Command {
        let mut c = agent_cmd();
        c.arg(sub).arg("--state-dir").arg(&self.state_dir);
        c
    }

    /// `sync --json`, parsed.
    pub fn sync(&self) -> Result<serde_json::Value> {
        let out = run_ok(self.cmd("sync").arg("--json"))?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "sync --json printed: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn restore(
        &self,
        snapshot: &str,
        to: &Path,
        path: Option<&str>,
        overwrite: bool,
    ) -> Output {
        let mut c = self.cmd("restore");
        c.args(["--snapshot", snapshot]).arg("--to").arg(to);
        if let Some(p) = path {
            c.args(["--path", p]);
        }
        if overwrite {
            c.arg("--overwrite");
        }
        c.output().expect("spawn morgana-agent restore")
    }

    pub fn snapshots(&self) -> Result<serde_json::Value> {
        let out = run_ok(self.cmd("snapshots").arg("--json"))?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

/// The usual start: an appliance in `tmp/appliance` and one agent enrolled for `root`
/// with its state in `tmp/state`.
pub fn one_device(tmp: &Path, root: &Path) -> Result<(Appliance, Agent)> {
    let appliance = Appliance::start(&tmp.join("appliance"))?;
    let agent = Agent::enroll(&appliance, root, &tmp.join("state"))?;
    Ok((appliance, agent))
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub use morgana_core::testdata::noise;

pub fn du(dir: &Path) -> u64 {
    let mut total = 0;
    walk_files(dir, &mut |p| {
        total += std::fs::symlink_metadata(p).map(|m| m.len()).unwrap_or(0)
    });
    total
}

fn walk_files(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => walk_files(&p, f),
            Ok(_) => f(&p),
            Err(_) => {}
        }
    }
}

/// Everything a restore must reproduce about one entry.
#[derive(Debug, PartialEq, Eq)]
struct Meta {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i128,
    size: u64,
    rdev: u64,
    target: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    content: Option<blake3::Hash>,
}

fn meta(path: &Path) -> Result<Meta> {
    let m = std::fs::symlink_metadata(path)?;
    let t = m.file_type();
    let kind = if t.is_file() {
        "file"
    } else if t.is_dir() {
        "dir"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_char_device() {
        "char"
    } else if t.is_block_device() {
        "block"
    } else {
        "socket"
    };
    let mut xattrs: Vec<_> = xattr::list(path)
        .map(|names| {
            names
                .map(|n| {
                    let value = xattr::get(path, &n).ok().flatten().unwrap_or_default();
                    (n.as_bytes().to_vec(), value)
                })
                .collect()
        })
        .unwrap_or_default();
    xattrs.sort();
    let content = if t.is_file() {
        Some(hash_file(path)?)
    } else {
        None
    };
    Ok(Meta {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        size: if t.is_dir() { 0 } else { m.len() },
        rdev: if t.is_char_device() || t.is_block_device() {
            m.rdev()
        } else {
            0
        },
        target: if t.is_symlink() {
            std::fs::read_link(path)?.as_os_str().as_bytes().to_vec()
        } else {
            vec![]
        },
        xattrs,
        content,
    })
}

pub fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize())
}

/// Asserts two trees are equal in every way a restore must reproduce: names (as bytes),
/// kinds, permission bits, owners, mtimes to the nanosecond, sizes, device numbers, symlink
/// targets, xattrs, contents, and which names are hard links of each other.
pub fn assert_same_tree(a: &Path, b: &Path) -> Result<()> {
    let mut links_a: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    let mut links_b: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    // The roots themselves are the test's directories; their contents are what must match.
    let (na, nb) = (sorted_names(a)?, sorted_names(b)?);
    ensure!(na == nb, "top-level entries differ: {na:?} vs {nb:?}");
    for n in na {
        compare(
            &a.join(&n),
            &b.join(&n),
            Path::new(&n),
            &mut links_a,
            &mut links_b,
        )?;
    }
    let mut groups_a: Vec<Vec<PathBuf>> = links_a.into_values().filter(|v| v.len() > 1).collect();
    let mut groups_b: Vec<Vec<PathBuf>> = links_b.into_values().filter(|v| v.len() > 1).collect();
    groups_a.iter_mut().for_each(|g| g.sort());
    groups_b.iter_mut().for_each(|g| g.sort());
    groups_a.sort();
    groups_b.sort();
    ensure!(
        groups_a == groups_b,
        "hard link groups differ: {groups_a:?} vs {groups_b:?}"
    );
    Ok(())
}

fn sorted_names(dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let mut v: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    v.sort();
    Ok(v)
}

type Links = HashMap<(u64, u64), Vec<PathBuf>>;

fn compare(a: &Path, b: &Path, rel: &Path, la: &mut Links, lb: &mut Links) -> Result<()> {
    let ma = meta(a).with_context(|| format!("source {}", a.display()))?;
    let mb = meta(b).with_context(|| format!("restored {} is missing", b.display()))?;
    ensure!(
        ma == mb,
        "{} differs:\n source:   {ma:?}\n restored: {mb:?}",
        rel.display()
    );
    if ma.kind == "file" {
        let (sa, sb) = (std::fs::symlink_metadata(a)?, std::fs::symlink_metadata(b)?);
        if sa.nlink() > 1 {
            la.entry((sa.dev(), sa.ino()))
                .or_default()
                .push(rel.to_path_buf());
        }
        if sb.nlink() > 1 {
            lb.entry((sb.dev(), sb.ino()))
                .or_default()
                .push(rel.to_path_buf());
        }
    }
    if ma.kind == "dir" {
        let (na, nb) = (sorted_names(a)?, sorted_names(b)?);
        ensure!(
            na == nb,
            "{}: entries differ: {na:?} vs {nb:?}",
            rel.display()
        );
        for n in na {
            compare(&a.join(&n), &b.join(&n), &rel.join(&n), la, lb)?;
        }
    }
    Ok(())
}

/// Waits until `f` holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
