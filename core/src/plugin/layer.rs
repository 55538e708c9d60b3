//! The built-in `layer-rules` for Linux endpoints: what identifies one machine stays with
//! the device, home directories are the user's, caches and runtime state go nowhere, and
//! everything else belongs to the layer.

use super::types::{
    ConflictPolicy, Disposition, DispositionKind, FileEntry, FileKind, LayerContext,
};
use super::{LayerRules, PluginError};

/// Files that identify one machine: cloning them would give every device the same identity.
/// Layers leave them out, an apply never writes over them, and a device being provisioned
/// is given its own of those it lacks (the agent makes machine ids and the hostname).
pub const MACHINE_IDENTITY: &[&str] = &[
    "/etc/machine-id",
    "/var/lib/dbus/machine-id",
    "/etc/hostname",
];
/// Name prefixes of per-device identity files (SSH host keys: sshd makes its own).
pub const MACHINE_IDENTITY_PREFIX: &[&str] = &["/etc/ssh/ssh_host_"];

/// Whether `path` (absolute) is machine identity.
pub fn is_machine_identity(path: &str) -> bool {
    MACHINE_IDENTITY.contains(&path) || MACHINE_IDENTITY_PREFIX.iter().any(|p| path.starts_with(p))
}
const USER_AREAS: &[&str] = &["/home", "/root"];
/// Beside the factory unprotected area (kernel and runtime file systems, temporary files,
/// caches, swap, the agent's state: never uploaded, so never in a layer either), what is
/// regenerated on the device and worth nothing in a layer.
const EXCLUDED_FROM_LAYERS: &[&str] = &["/var/log", "/var/lib/apt/lists"];

fn excluded(path: &str) -> bool {
    crate::policy::FACTORY_UNPROTECTED
        .iter()
        .filter(|p| !p.contains(crate::policy::HOME_MACRO))
        .chain(EXCLUDED_FROM_LAYERS)
        .any(|p| under(path, p))
}

/// The Linux rules above; the default when no plugin is active.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuiltinLayerRules;

impl LayerRules for BuiltinLayerRules {
    fn classify(
        &self,
        _context: &LayerContext,
        entries: &[FileEntry],
    ) -> Result<Vec<Disposition>, PluginError> {
        Ok(entries.iter().map(|e| classify_path(&e.path)).collect())
    }
}

/// `path` is `prefix` or lies below it.
fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The disposition of one absolute path.
pub fn classify_path(path: &str) -> Disposition {
    let (kind, conflict) = if is_machine_identity(path) {
        (DispositionKind::MachineIdentity, ConflictPolicy::KeepDevice)
    } else if USER_AREAS.iter().any(|p| under(path, p)) {
        (DispositionKind::UserArea, ConflictPolicy::KeepDevice)
    } else if excluded(path) {
        (DispositionKind::Exclude, ConflictPolicy::Skip)
    } else {
        (DispositionKind::Layer, ConflictPolicy::LayerWins)
    };
    Disposition { kind, conflict }
}

/// A deterministic file list shaped like a Linux endpoint (system files, a few homes with
/// caches, identity files, runtime and cache directories), for tests and benchmarks.
pub fn synthetic_tree(n: usize) -> Vec<FileEntry> {
    const DIRS: &[&str] = &[
        "/usr/lib/x86_64-linux-gnu",
        "/usr/share/doc",
        "/usr/bin",
        "/etc",
        "/etc/ssh",
        "/opt/office/program",
        "/var/lib/dpkg/info",
        "/var/cache/apt/archives",
        "/var/log/journal",
        "/home/ann/Documents",
        "/home/ann/.cache/mozilla",
        "/home/bob/src/project",
        "/root/.config",
        "/tmp/build",
        "/usr/share/icons/hicolor/48x48/apps",
    ];
    const SPECIAL: &[&str] = &[
        "/etc/machine-id",
        "/etc/hostname",
        "/etc/ssh/ssh_host_ed25519_key",
        "/etc/ssh/ssh_host_rsa_key.pub",
        "/var/lib/dbus/machine-id",
    ];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        // xorshift64*: cheap, deterministic, good enough to spread names and sizes.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    (0..n)
        .map(|i| {
            let r = next();
            let path = if i % 1000 < SPECIAL.len() {
                SPECIAL[i % 1000].to_string()
            } else {
                let dir = DIRS[(r % DIRS.len() as u64) as usize];
                format!("{dir}/file-{:x}-{i}.dat", r >> 40)
            };
            FileEntry {
                path,
                kind: FileKind::File,
                size: (r >> 20) % 1_000_000,
                mode: 0o100644,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_rules() {
        use ConflictPolicy::*;
        use DispositionKind::*;
        for (path, kind, conflict) in [
            ("/etc/machine-id", MachineIdentity, KeepDevice),
            ("/etc/hostname", MachineIdentity, KeepDevice),
            ("/var/lib/dbus/machine-id", MachineIdentity, KeepDevice),
            ("/var/lib/dbus", Layer, LayerWins),
            ("/etc/ssh/ssh_host_ed25519_key", MachineIdentity, KeepDevice),
            ("/etc/ssh/ssh_host_rsa_key.pub", MachineIdentity, KeepDevice),
            ("/etc/ssh/sshd_config", Layer, LayerWins),
            ("/etc/hostname.bak", Layer, LayerWins),
            ("/home", UserArea, KeepDevice),
            ("/home/ann/.bashrc", UserArea, KeepDevice),
            ("/home/ann/.cache/x", UserArea, KeepDevice),
            ("/homework", Layer, LayerWins),
            ("/root/.profile", UserArea, KeepDevice),
            ("/var/cache/apt/pkgcache.bin", Exclude, Skip),
            ("/tmp", Exclude, Skip),
            ("/proc/1/status", Exclude, Skip),
            ("/usr/bin/bash", Layer, LayerWins),
            ("/", Layer, LayerWins),
        ] {
            assert_eq!(
                classify_path(path),
                Disposition { kind, conflict },
                "{path}"
            );
        }
    }
}
