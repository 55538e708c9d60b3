//! The agent's state directory: which appliance it belongs to, its credential, its caches.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use morgana_core::control::AgentPolicy;
use serde::{Deserialize, Serialize};

const DEVICE_FILE: &str = "device.json";
/// The policy fetched at the last sync (`morgana_core::control::AgentPolicy`), for the
/// parts of the agent that run without asking the appliance.
pub const POLICY_FILE: &str = "policy.json";
/// Held (flock) by whoever syncs or restores into the protected root.
pub const SYNC_LOCK_FILE: &str = "sync.lock";
pub const CLIENT_KEY_FILE: &str = "client.key";
pub const CLIENT_CERT_FILE: &str = "client.crt";
pub const CA_CERT_FILE: &str = "ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "this agent is not enrolled (no {0}): run `morgana-agent enroll --server URL --token TOKEN \
         --root DIR` with a token from `morgana enroll-token`"
    )]
    NotEnrolled(PathBuf),
    #[error("cannot read or write the agent state at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the agent state file {path} is damaged ({reason}); enrol again into a new --state-dir"
    )]
    Damaged { path: PathBuf, reason: String },
    #[error(
        "cannot choose a state directory: neither XDG_STATE_HOME nor HOME is set; pass --state-dir"
    )]
    NoDefault,
}

/// `/var/lib/morgana-agent` as root, else `$XDG_STATE_HOME/morgana-agent` (which defaults to
/// `~/.local/state`).
pub fn default_dir() -> Result<PathBuf, StateError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(PathBuf::from("/var/lib/morgana-agent"));
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("morgana-agent"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or(StateError::NoDefault)?;
    Ok(PathBuf::from(home).join(".local/state/morgana-agent"))
}

/// What enrolment learned, saved as `device.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Device {
    pub server: String,
    pub device_id: String,
    /// The directory this device protects.
    pub root: PathBuf,
}

/// The sync lock; released when dropped (closing the descriptor releases the flock).
#[derive(Debug)]
pub struct SyncLock {
    _file: fs::File,
}

/// An open state directory.
#[derive(Clone, Debug)]
pub struct State {
    pub dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl State {
    pub fn open(dir: Option<PathBuf>) -> Result<State, StateError> {
        let dir = match dir {
            Some(d) => d,
            None => default_dir()?,
        };
        Ok(State { dir })
    }

    pub fn create_dir(&self) -> Result<(), StateError> {
        fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(io(&self.dir))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn is_enrolled(&self) -> bool {
        self.path(DEVICE_FILE).exists()
    }

    pub fn device(&self) -> Result<Device, StateError> {
        let path = self.path(DEVICE_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotEnrolled(path));
            }
            Err(e) => return Err(io(&path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| StateError::Damaged {
            path,
            reason: e.to_string(),
        })
    }

    pub fn read(&self, name: &str) -> Result<Vec<u8>, StateError> {
        let path = self.path(name);
        fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StateError::NotEnrolled(path),
            _ => io(&path)(e),
        })
    }

    /// Writes a state file atomically with the given mode (credentials get 0600).
    pub fn write(&self, name: &str, bytes: &[u8], mode: u32) -> Result<(), StateError> {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io(&tmp))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// Takes the sync lock, waiting while another process (or task) holds it. One sync (or
    /// revert) at a time per state directory: the `run` service, a manual `sync` and a
    /// restore job never overlap. Blocking: call from a blocking thread.
    pub fn lock_sync(&self) -> Result<SyncLock, StateError> {
        self.sync_lock(true)
            .map(|l| l.expect("a blocking flock returns the lock"))
    }

    /// The sync lock if nobody holds it, else `None`.
    pub fn try_lock_sync(&self) -> Result<Option<SyncLock>, StateError> {
        self.sync_lock(false)
    }

    fn sync_lock(&self, wait: bool) -> Result<Option<SyncLock>, StateError> {
        use std::os::fd::AsRawFd;
        let path = self.path(SYNC_LOCK_FILE);
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        let op = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        loop {
            // SAFETY: a valid descriptor we own; flock has no memory preconditions.
            if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
                return Ok(Some(SyncLock { _file: file }));
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) if !wait => return Ok(None),
                _ => return Err(io(&path)(e)),
            }
        }
    }

    pub fn save_device(&self, device: &Device) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(device).expect("device serializes");
        self.write(DEVICE_FILE, &json, 0o600)
    }

    pub fn save_policy(&self, policy: &AgentPolicy) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(policy).expect("policy serializes");
        self.write(POLICY_FILE, &json, 0o600)
    }

    /// The policy saved by the last sync; `None` before the first.
    pub fn policy(&self) -> Result<Option<AgentPolicy>, StateError> {
        let path = self.path(POLICY_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::Damaged {
                path,
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sync_lock_holder_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let state = State {
            dir: tmp.path().to_path_buf(),
        };
        let held = state.try_lock_sync().unwrap().expect("free at first");
        // A second open of the lock file (another process, or another task) is refused.
        assert!(state.try_lock_sync().unwrap().is_none());
        let waiter = {
            let state = state.clone();
            std::thread::spawn(move || state.lock_sync().map(drop))
        };
        drop(held);
        waiter.join().unwrap().unwrap();
        assert!(state.try_lock_sync().unwrap().is_some());
    }
}
