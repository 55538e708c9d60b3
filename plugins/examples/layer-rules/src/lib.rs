//! Morgana's built-in Linux layer rules, as a plugin: machine identity stays with the
//! device, homes are user areas, caches and runtime state are excluded, the rest is layer.

use morgana_plugin_sdk::layer_rules::*;

const MACHINE_IDENTITY: &[&str] = &[
    "/etc/machine-id",
    "/var/lib/dbus/machine-id",
    "/etc/hostname",
];
const MACHINE_IDENTITY_PREFIX: &[&str] = &["/etc/ssh/ssh_host_"];
const USER_AREAS: &[&str] = &["/home", "/root"];
/// Morgana's factory unprotected area (never uploaded), then what is regenerated on a device.
const EXCLUDED: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/tmp",
    "/var/tmp",
    "/var/cache",
    "/var/lib/morgana-agent",
    "/lost+found",
    "/swapfile",
    "/swap.img",
    "/var/log",
    "/var/lib/apt/lists",
];

fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

struct LinuxRules;

impl LayerRules for LinuxRules {
    fn classify(_: &LayerContext, entry: &FileEntry) -> Result<Disposition, String> {
        let path = entry.path.as_str();
        Ok(
            if MACHINE_IDENTITY.contains(&path)
                || MACHINE_IDENTITY_PREFIX.iter().any(|p| path.starts_with(p))
            {
                Disposition::machine_identity()
            } else if USER_AREAS.iter().any(|p| under(path, p)) {
                Disposition::user_area()
            } else if EXCLUDED.iter().any(|p| under(path, p)) {
                Disposition::exclude()
            } else {
                Disposition::layer()
            },
        )
    }
}

morgana_plugin_sdk::export_layer_rules!(LinuxRules);
