//! Morgana's built-in driver matcher, as a plugin: a profile applies when any of its match
//! groups has all of its conditions true (OR of ANDs) over the device's inventory.

use morgana_plugin_sdk::driver_matcher::*;

/// Case-insensitive glob: `*` matches any run of characters, everything else itself.
fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().flat_map(char::to_lowercase).collect();
    let t: Vec<char> = text.chars().flat_map(char::to_lowercase).collect();
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

fn holds(c: &Condition, inv: &HardwareInventory, pci_ids: &[String]) -> bool {
    match c.field {
        InventoryField::Vendor => glob_match(&c.pattern, &inv.vendor),
        InventoryField::Model => glob_match(&c.pattern, &inv.model),
        InventoryField::Os => glob_match(&c.pattern, &inv.os),
        InventoryField::PciId => pci_ids.iter().any(|id| glob_match(&c.pattern, id)),
    }
}

struct Rules;

impl DriverMatcher for Rules {
    fn match_profiles(
        inventory: HardwareInventory,
        profiles: Vec<DriverProfile>,
    ) -> Result<Vec<ProfileMatch>, String> {
        let pci_ids: Vec<String> = inventory
            .pci_devices
            .iter()
            .map(|d| d.id_string())
            .collect();
        let matches: Vec<ProfileMatch> = profiles
            .iter()
            .filter_map(|profile| {
                let group = profile.any_of.iter().find(|g| {
                    !g.all.is_empty() && g.all.iter().all(|c| holds(c, &inventory, &pci_ids))
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
            .collect();
        morgana_plugin_sdk::log::debug(&format!(
            "{} of {} profiles apply",
            matches.len(),
            profiles.len()
        ));
        Ok(matches)
    }
}

morgana_plugin_sdk::export_driver_matcher!(Rules);
