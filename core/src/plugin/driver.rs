//! The built-in `driver-matcher`: a profile applies when any of its match groups has all
//! of its conditions true (OR of ANDs) over the device's inventory.

use super::types::{Condition, DriverProfile, HardwareInventory, InventoryField, ProfileMatch};
use super::{DriverMatcher, PluginError};

/// Matches profiles by their configured rules; the default when no plugin is active.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuiltinDriverMatcher;

impl DriverMatcher for BuiltinDriverMatcher {
    fn match_profiles(
        &self,
        inventory: &HardwareInventory,
        profiles: &[DriverProfile],
    ) -> Result<Vec<ProfileMatch>, PluginError> {
        Ok(match_profiles(inventory, profiles))
    }
}

/// The profiles that apply, in the order given, each with the first group that matched
/// written out as the reason (e.g. `vendor matches "LENOVO" and pci-id matches "8086:*"`).
pub fn match_profiles(
    inventory: &HardwareInventory,
    profiles: &[DriverProfile],
) -> Vec<ProfileMatch> {
    let pci_ids: Vec<String> = inventory
        .pci_devices
        .iter()
        .map(|d| d.id_string())
        .collect();
    profiles
        .iter()
        .filter_map(|profile| {
            let group = profile.any_of.iter().find(|g| {
                // An empty group would match every device: almost certainly a mistake.
                !g.all.is_empty() && g.all.iter().all(|c| holds(c, inventory, &pci_ids))
            })?;
            let reason = group
                .all
                .iter()
                .map(|c| format!("{} matches \"{}\"", c.field.wit_name(), c.pattern))
                .collect::<Vec<_>>()
                .join(" and ");
            Some(ProfileMatch {
                profile_id: profile.id.clone(),
                reason,
            })
        })
        .collect()
}

fn holds(c: &Condition, inv: &HardwareInventory, pci_ids: &[String]) -> bool {
    match c.field {
        InventoryField::Vendor => glob_match(&c.pattern, &inv.vendor),
        InventoryField::Model => glob_match(&c.pattern, &inv.model),
        InventoryField::Os => glob_match(&c.pattern, &inv.os),
        InventoryField::PciId => pci_ids.iter().any(|id| glob_match(&c.pattern, id)),
    }
}

/// Case-insensitive glob where `*` matches any run of characters (including none) and
/// every other character matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().flat_map(char::to_lowercase).collect();
    let t: Vec<char> = text.chars().flat_map(char::to_lowercase).collect();
    // Classic linear-time wildcard match: remember the last `*` and where it resumed.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::types::{MatchGroup, PciDevice};

    fn cond(field: InventoryField, pattern: &str) -> Condition {
        Condition {
            field,
            pattern: pattern.into(),
        }
    }

    fn profile(id: &str, groups: Vec<Vec<Condition>>) -> DriverProfile {
        DriverProfile {
            id: id.into(),
            name: id.to_uppercase(),
            any_of: groups.into_iter().map(|all| MatchGroup { all }).collect(),
        }
    }

    fn thinkpad() -> HardwareInventory {
        HardwareInventory {
            vendor: "LENOVO".into(),
            model: "ThinkPad T14 Gen 3".into(),
            os: "debian 12".into(),
            pci_devices: vec![
                PciDevice {
                    vendor_id: 0x8086,
                    device_id: 0x15f3,
                },
                PciDevice {
                    vendor_id: 0x10de,
                    device_id: 0x1f95,
                },
            ],
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("thinkpad*", "ThinkPad T14"));
        assert!(glob_match("*T14*", "ThinkPad T14 Gen 3"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(!glob_match("lenovo", "LENOVO X"));
        assert!(glob_match("8086:????", "8086:????"));
        assert!(!glob_match("", "x"));
    }

    #[test]
    fn and_within_a_group_or_across_groups() {
        let inv = thinkpad();
        let profiles = vec![
            profile(
                "intel-nic",
                vec![vec![
                    cond(InventoryField::Vendor, "lenovo"),
                    cond(InventoryField::PciId, "8086:15f3"),
                ]],
            ),
            profile("amd-gpu", vec![vec![cond(InventoryField::PciId, "1002:*")]]),
            profile(
                "either",
                vec![
                    vec![cond(InventoryField::Model, "Latitude*")],
                    vec![
                        cond(InventoryField::Os, "debian *"),
                        cond(InventoryField::PciId, "10de:*"),
                    ],
                ],
            ),
            profile(
                "half",
                vec![vec![
                    cond(InventoryField::Vendor, "LENOVO"),
                    cond(InventoryField::Os, "windows*"),
                ]],
            ),
            profile("empty-group", vec![vec![]]),
        ];
        let got = match_profiles(&inv, &profiles);
        let ids: Vec<&str> = got.iter().map(|m| m.profile_id.as_str()).collect();
        assert_eq!(ids, ["intel-nic", "either"]);
        assert_eq!(
            got[0].reason,
            "vendor matches \"lenovo\" and pci-id matches \"8086:15f3\""
        );
        assert_eq!(
            got[1].reason,
            "os matches \"debian *\" and pci-id matches \"10de:*\""
        );
    }
}
