//! Which driver set each driver folder holds since the agent delivered it, so that an apply
//! (every apply brings the device's driver sets) leaves a folder that already holds its set
//! exactly as delivered alone instead of rewriting it.
//!
//! A record names the set's tree and a fingerprint of the folder as it was right after the
//! delivery: every entry's path, kind, mode, owner, size, mtime, ctime and inode (and a
//! symlink's target). Any change to the folder, however it was made, changes the ctime of
//! what changed, so a folder whose fingerprint still matches holds the delivered bytes; one
//! that does not is delivered again.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use morgana_core::Id;
use serde::{Deserialize, Serialize};

use crate::state::State;

pub const FILE_NAME: &str = "drivers-delivered.json";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Delivered {
    /// By target folder, as the job names it (absolute from the protected root).
    folders: BTreeMap<String, Record>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    set: String,
    version: u32,
    /// The set's tree, in hex.
    tree: String,
    /// BLAKE3 of the folder's entries' stat (see [`fingerprint`]), in hex.
    fingerprint: String,
}

impl Delivered {
    /// The records in `state`; none when there are none or they are unreadable (every set
    /// is then delivered again, which is always safe).
    pub fn load(state: &State) -> Delivered {
        let path = state.path(FILE_NAME);
        let Ok(bytes) = std::fs::read(&path) else {
            return Delivered::default();
        };
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(
                path = %path.display(),
                "the record of delivered driver sets is unreadable ({e}); every set is delivered again"
            );
            Delivered::default()
        })
    }

    pub fn save(&self, state: &State) -> anyhow::Result<()> {
        use anyhow::Context;
        let bytes = serde_json::to_vec_pretty(self).expect("records serialize");
        state.write(FILE_NAME, &bytes, 0o600).context(
            "the driver sets are delivered, but the record of them could not be written \
             (the next apply delivers them again)",
        )
    }

    /// Whether `dest` (the folder `target` names) holds the set `tree` just as delivered.
    pub fn holds(&self, target: &str, tree: &Id, dest: &Path) -> bool {
        self.folders.get(target).is_some_and(|r| {
            r.tree == tree.to_hex() && fingerprint(dest).is_some_and(|f| f == r.fingerprint)
        })
    }

    /// Notes that `dest` now holds the set just delivered there.
    pub fn record(&mut self, target: &str, set: &str, version: u32, tree: &Id, dest: &Path) {
        match fingerprint(dest) {
            Some(fingerprint) => {
                self.folders.insert(
                    target.to_owned(),
                    Record {
                        set: set.to_owned(),
                        version,
                        tree: tree.to_hex(),
                        fingerprint,
                    },
                );
            }
            None => {
                self.folders.remove(target);
            }
        }
    }
}

/// The fingerprint of the folder `dir` and everything below it; `None` when it cannot be
/// read whole (or is not a folder).
fn fingerprint(dir: &Path) -> Option<String> {
    let meta = std::fs::symlink_metadata(dir).ok()?;
    if !meta.is_dir() {
        return None;
    }
    let mut h = Vec::new();
    add(&mut h, b"", &meta);
    let mut stack = vec![(dir.to_path_buf(), Vec::new())];
    while let Some((path, rel)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&path)
            .ok()?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .ok()?;
        entries.sort();
        for name in entries {
            let full = path.join(&name);
            let meta = std::fs::symlink_metadata(&full).ok()?;
            let mut child = rel.clone();
            child.push(b'/');
            child.extend_from_slice(name.as_bytes());
            add(&mut h, &child, &meta);
            if meta.file_type().is_symlink() {
                h.extend_from_slice(std::fs::read_link(&full).ok()?.as_os_str().as_bytes());
            } else if meta.is_dir() {
                stack.push((full, child));
            }
        }
    }
    Some(Id::of(&h).to_hex())
}

fn add(h: &mut Vec<u8>, rel: &[u8], m: &std::fs::Metadata) {
    h.extend_from_slice(&(rel.len() as u64).to_le_bytes());
    h.extend_from_slice(rel);
    for v in [
        u64::from(m.mode()),
        u64::from(m.uid()),
        u64::from(m.gid()),
        m.size(),
        m.mtime() as u64,
        m.mtime_nsec() as u64,
        m.ctime() as u64,
        m.ctime_nsec() as u64,
        m.ino(),
        m.dev(),
    ] {
        h.extend_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_holds_its_set_until_anything_in_it_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let state = State {
            dir: tmp.path().join("state"),
        };
        std::fs::create_dir(&state.dir).unwrap();
        let dest = tmp.path().join("drivers/nic");
        std::fs::create_dir_all(dest.join("sub")).unwrap();
        std::fs::write(dest.join("sub/a.ko"), b"driver").unwrap();
        std::os::unix::fs::symlink("sub/a.ko", dest.join("link")).unwrap();
        let tree = Id::of(b"set v1");
        let mut d = Delivered::default();
        assert!(!d.holds("/drivers/nic", &tree, &dest), "nothing recorded");
        d.record("/drivers/nic", "nic", 1, &tree, &dest);
        d.save(&state).unwrap();
        let d = Delivered::load(&state);
        assert!(d.holds("/drivers/nic", &tree, &dest));
        assert!(
            !d.holds("/drivers/nic", &Id::of(b"set v2"), &dest),
            "another set"
        );
        assert!(!d.holds("/drivers/gpu", &tree, &dest), "another folder");
        // Any change: content rewritten in place (same size), a file added, the folder gone.
        // File times advance by clock ticks: let one pass so the rewrite gets another ctime.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dest.join("sub/a.ko"), b"DRIVER").unwrap();
        assert!(!d.holds("/drivers/nic", &tree, &dest));
        let mut d = d;
        d.record("/drivers/nic", "nic", 1, &tree, &dest);
        std::fs::write(dest.join("sub/extra"), b"x").unwrap();
        assert!(!d.holds("/drivers/nic", &tree, &dest));
        std::fs::remove_dir_all(&dest).unwrap();
        assert!(!d.holds("/drivers/nic", &tree, &dest));
    }
}
