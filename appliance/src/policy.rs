//! Upload policies: what a device protects (its unprotected area is left out, its user area
//! is kept in place by system-only reverts), how often it syncs, how long its snapshots are
//! kept, and after how long without a snapshot it raises an alert.
//!
//! Administrators write a policy as TOML (`morgana policy set NAME --file POLICY.toml`):
//!
//! ```toml
//! unprotected = { rules = ["%home%/Downloads", "/data/big"], exceptions = [] }
//! user_area = { rules = ["%home%"] }
//! sync_interval = "60m"
//! alert_after = "24h"
//!
//! [retention]
//! hourly = 24
//! daily = 14
//! weekly = 8
//! monthly = 12
//!
//! [reflectors]
//! preferred_subnets = ["10.20.0.0/16"]
//! latency_threshold_ms = 30
//! site = "lyon"              # the devices' branch office, for ranking reflectors
//! ```
//!
//! Every field may be left out (it takes the built-in default's value); an unknown field or
//! an unusable rule refuses the whole file. The factory rules
//! (`morgana_core::policy::FACTORY_UNPROTECTED`) are never stored: they are merged into the
//! unprotected area whenever a policy goes to an agent, so no policy can drop them.

use morgana_core::control::{AgentPolicy, ReflectorPolicy, RuleSet};
use morgana_core::policy::{self as areas, FACTORY_UNPROTECTED};
use serde::{Deserialize, Serialize};

use morgana_core::policy::Standing;
use morgana_core::tree::Kind;

use crate::catalog::{Catalog, CatalogError};
use crate::commands::enroll_token::parse_duration;
use crate::events::{self, NewEvent, Severity};
use crate::retention::Retention;
use crate::store::{TreeLoadError, Visit, walk_tree};

const MAX_NAME: usize = 64;
/// Bounds that keep a typo from making a policy useless: a sync every second, or a
/// threshold of years.
const MIN_SYNC_INTERVAL_SECS: u64 = 60;
const MAX_SYNC_INTERVAL_SECS: u64 = 30 * 86_400;
const MAX_ALERT_AFTER_SECS: u64 = 365 * 86_400;
const MAX_LATENCY_THRESHOLD_MS: u32 = 10_000;
const MAX_PREFERRED_SUBNETS: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("the policy file is not valid TOML: {0}")]
    Toml(String),
    #[error("in {area}: {reason}; nothing was saved")]
    BadRule {
        area: &'static str,
        reason: areas::PolicyError,
    },
    #[error("{field} = {value:?} is refused: {why}; nothing was saved")]
    BadValue {
        field: &'static str,
        value: String,
        why: String,
    },
    #[error(
        "{0:?} is not a usable policy name: use 1 to {MAX_NAME} letters, digits, '-', '_' or '.', \
         starting with a letter or digit"
    )]
    BadName(String),
}

/// A policy's content, as stored (JSON) and compared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    /// The policy's own rules; the factory rules are added when it goes to an agent.
    pub unprotected: RuleSet,
    pub user_area: RuleSet,
    pub sync_interval_secs: u32,
    pub alert_after_secs: u64,
    pub retention: Retention,
    /// Policies saved before reflectors existed read as the default.
    #[serde(default)]
    pub reflectors: ReflectorPolicy,
}

impl Default for PolicySpec {
    fn default() -> Self {
        PolicySpec {
            unprotected: RuleSet::default(),
            // User data lives in homes: a system-only revert and layer updates keep them.
            user_area: RuleSet {
                rules: vec![morgana_core::policy::HOME_MACRO.to_owned()],
                exceptions: Vec::new(),
            },
            sync_interval_secs: 3600,
            alert_after_secs: 86_400,
            retention: Retention::default(),
            reflectors: ReflectorPolicy::default(),
        }
    }
}

/// One saved version of a named policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyVersion {
    pub name: String,
    /// Appliance-wide: every save of any policy takes the next number.
    pub version: u64,
    pub spec: PolicySpec,
    /// RFC 3339 UTC.
    pub created: String,
    pub actor: String,
}

impl PolicyVersion {
    /// The policy as an agent applies it: the factory rules merged into the unprotected area.
    pub fn agent_policy(&self) -> AgentPolicy {
        let mut rules: Vec<String> = FACTORY_UNPROTECTED.iter().map(|r| r.to_string()).collect();
        rules.extend(self.spec.unprotected.rules.iter().cloned());
        AgentPolicy {
            name: self.name.clone(),
            version: self.version,
            unprotected: RuleSet {
                rules,
                exceptions: self.spec.unprotected.exceptions.clone(),
            },
            user_area: self.spec.user_area.clone(),
            sync_interval_secs: self.spec.sync_interval_secs,
            reflectors: self.spec.reflectors.clone(),
        }
    }
}

pub fn check_name(name: &str) -> Result<(), PolicyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(PolicyError::BadName(name.to_owned()))
    }
}

/// The file format: every field optional, nothing unknown.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    // Plain values before tables: TOML cannot put a plain value after a table.
    #[serde(default)]
    sync_interval: Option<String>,
    #[serde(default)]
    alert_after: Option<String>,
    #[serde(default)]
    unprotected: Option<RuleSetFile>,
    #[serde(default)]
    user_area: Option<RuleSetFile>,
    #[serde(default)]
    retention: Option<RetentionFile>,
    #[serde(default)]
    reflectors: Option<ReflectorsFile>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReflectorsFile {
    #[serde(default)]
    preferred_subnets: Vec<String>,
    latency_threshold_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    site: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSetFile {
    #[serde(default)]
    rules: Vec<String>,
    #[serde(default)]
    exceptions: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionFile {
    hourly: Option<u32>,
    daily: Option<u32>,
    weekly: Option<u32>,
    monthly: Option<u32>,
}

/// Parses and checks a policy file; on any error nothing about it is usable.
pub fn parse_toml(text: &str) -> Result<PolicySpec, PolicyError> {
    let file: PolicyFile = toml::from_str(text).map_err(|e| PolicyError::Toml(e.to_string()))?;
    let defaults = PolicySpec::default();
    let rules = |f: Option<RuleSetFile>, default: &RuleSet| {
        f.map(|f| RuleSet {
            rules: f.rules,
            exceptions: f.exceptions,
        })
        .unwrap_or_else(|| default.clone())
    };
    let r = file.retention.unwrap_or_default();
    let reflectors = match file.reflectors {
        None => defaults.reflectors.clone(),
        Some(f) => ReflectorPolicy {
            preferred_subnets: f.preferred_subnets,
            latency_threshold_ms: f
                .latency_threshold_ms
                .unwrap_or(defaults.reflectors.latency_threshold_ms),
            site: f.site,
        },
    };
    let spec = PolicySpec {
        unprotected: rules(file.unprotected, &defaults.unprotected),
        user_area: rules(file.user_area, &defaults.user_area),
        sync_interval_secs: match &file.sync_interval {
            None => defaults.sync_interval_secs,
            Some(v) => {
                let secs = duration_field("sync_interval", v)?;
                if !(MIN_SYNC_INTERVAL_SECS..=MAX_SYNC_INTERVAL_SECS).contains(&secs) {
                    return Err(PolicyError::BadValue {
                        field: "sync_interval",
                        value: v.clone(),
                        why: "give between 1m and 30d".into(),
                    });
                }
                secs as u32
            }
        },
        alert_after_secs: match &file.alert_after {
            None => defaults.alert_after_secs,
            Some(v) => {
                let secs = duration_field("alert_after", v)?;
                if secs > MAX_ALERT_AFTER_SECS {
                    return Err(PolicyError::BadValue {
                        field: "alert_after",
                        value: v.clone(),
                        why: "give at most 365d".into(),
                    });
                }
                secs
            }
        },
        retention: Retention {
            hourly: r.hourly.unwrap_or(defaults.retention.hourly),
            daily: r.daily.unwrap_or(defaults.retention.daily),
            weekly: r.weekly.unwrap_or(defaults.retention.weekly),
            monthly: r.monthly.unwrap_or(defaults.retention.monthly),
        },
        reflectors,
    };
    validate(&spec)?;
    Ok(spec)
}

fn duration_field(field: &'static str, value: &str) -> Result<u64, PolicyError> {
    parse_duration(value)
        .map(|d| d.as_secs())
        .map_err(|why| PolicyError::BadValue {
            field,
            value: value.to_owned(),
            why,
        })
}

/// Checks every rule of both areas and the reflector settings.
pub fn validate(spec: &PolicySpec) -> Result<(), PolicyError> {
    areas::validate(&spec.unprotected).map_err(|reason| PolicyError::BadRule {
        area: "unprotected",
        reason,
    })?;
    areas::validate(&spec.user_area).map_err(|reason| PolicyError::BadRule {
        area: "user_area",
        reason,
    })?;
    let r = &spec.reflectors;
    if !(1..=MAX_LATENCY_THRESHOLD_MS).contains(&r.latency_threshold_ms) {
        return Err(PolicyError::BadValue {
            field: "reflectors.latency_threshold_ms",
            value: r.latency_threshold_ms.to_string(),
            why: format!("give between 1 and {MAX_LATENCY_THRESHOLD_MS}"),
        });
    }
    if r.preferred_subnets.len() > MAX_PREFERRED_SUBNETS {
        return Err(PolicyError::BadValue {
            field: "reflectors.preferred_subnets",
            value: format!("{} subnets", r.preferred_subnets.len()),
            why: format!("give at most {MAX_PREFERRED_SUBNETS}"),
        });
    }
    if let Some(site) = &r.site
        && !morgana_core::control::valid_site(site)
    {
        return Err(PolicyError::BadValue {
            field: "reflectors.site",
            value: site.clone(),
            why: "give 1 to 64 letters, digits, `-`, `_` or `.`, such as lyon-office".into(),
        });
    }
    for subnet in &r.preferred_subnets {
        if morgana_core::plugin::reflector::parse_cidr(subnet).is_none() {
            return Err(PolicyError::BadValue {
                field: "reflectors.preferred_subnets",
                value: subnet.clone(),
                why: "write a network as ADDRESS/PREFIX, such as 10.20.0.0/16".into(),
            });
        }
    }
    Ok(())
}

/// `90s`, `15m`, `24h`, `7d`: the largest unit that says it exactly, as `parse_duration`
/// reads it back.
pub fn format_duration(secs: u64) -> String {
    for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs >= n && secs.is_multiple_of(n) {
            return format!("{}{unit}", secs / n);
        }
    }
    format!("{secs}s")
}

/// The policy as a file `parse_toml` reads back to the same spec.
pub fn to_toml(spec: &PolicySpec) -> String {
    let file = PolicyFile {
        unprotected: Some(RuleSetFile {
            rules: spec.unprotected.rules.clone(),
            exceptions: spec.unprotected.exceptions.clone(),
        }),
        user_area: Some(RuleSetFile {
            rules: spec.user_area.rules.clone(),
            exceptions: spec.user_area.exceptions.clone(),
        }),
        sync_interval: Some(format_duration(u64::from(spec.sync_interval_secs))),
        alert_after: Some(format_duration(spec.alert_after_secs)),
        retention: Some(RetentionFile {
            hourly: Some(spec.retention.hourly),
            daily: Some(spec.retention.daily),
            weekly: Some(spec.retention.weekly),
            monthly: Some(spec.retention.monthly),
        }),
        reflectors: Some(ReflectorsFile {
            preferred_subnets: spec.reflectors.preferred_subnets.clone(),
            latency_threshold_ms: Some(spec.reflectors.latency_threshold_ms),
            site: spec.reflectors.site.clone(),
        }),
    };
    toml::to_string(&file).expect("a policy file serializes")
}

/// Saves `spec` as the newest version of policy `name` (creating it) and records who did.
/// Returns the saved version and a line for a person.
pub async fn save(
    catalog: &dyn Catalog,
    name: &str,
    spec: &PolicySpec,
    actor: &str,
) -> Result<(PolicyVersion, String), CatalogError> {
    let before = catalog.policy(name, None).await?;
    let saved = catalog
        .save_policy(
            name,
            spec,
            &crate::clock::rfc3339_ms(crate::clock::now_ms()),
            actor,
        )
        .await?;
    let message = match &before {
        Some(b) => format!(
            "policy {name} changed: version {} replaces version {}",
            saved.version, b.version
        ),
        None => format!("policy {name} created as version {}", saved.version),
    };
    events::record(
        catalog,
        NewEvent::system("policy.saved", Severity::Info, message.clone()).by(actor),
    )
    .await;
    Ok((saved, message))
}

#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(
        "there is no device {0:?} (by id or hostname); nothing was changed. The devices page \
         and `morgana device list` show the enrolled ones"
    )]
    NoSuchDevice(String),
    #[error(
        "{wanted:?} names {count} devices ({ids}); give their ids instead; nothing was changed"
    )]
    Ambiguous {
        wanted: String,
        count: usize,
        ids: String,
    },
    #[error("there is no policy {0:?}; create it first, then assign it")]
    NoSuchPolicy(String),
}

/// Makes the devices named in `wanted` (ids or hostnames) follow policy `name`; all or
/// nothing. Returns a line per device for a person.
pub async fn assign(
    catalog: &dyn Catalog,
    name: &str,
    wanted: &[String],
    actor: &str,
) -> Result<Vec<String>, AssignError> {
    if catalog.policy(name, None).await?.is_none() {
        return Err(AssignError::NoSuchPolicy(name.to_owned()));
    }
    let mut devices = Vec::with_capacity(wanted.len());
    for w in wanted {
        devices.push(find_device(catalog, w).await?);
    }
    let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    let before = catalog.assign_policy(name, &ids).await?;
    let mut lines = Vec::new();
    for (d, old) in devices.iter().zip(before) {
        let message = format!(
            "device {} ({}) now follows policy {name} (was {old})",
            d.hostname, d.id
        );
        events::record(
            catalog,
            NewEvent::system("policy.assigned", Severity::Info, message.clone())
                .for_device(&d.id)
                .by(actor),
        )
        .await;
        lines.push(message);
    }
    Ok(lines)
}

/// The one device `wanted` names, by id or hostname.
pub async fn find_device(
    catalog: &dyn Catalog,
    wanted: &str,
) -> Result<crate::catalog::Device, AssignError> {
    let mut found = catalog.find_devices(wanted).await?;
    match found.len() {
        0 => Err(AssignError::NoSuchDevice(wanted.to_owned())),
        1 => Ok(found.remove(0)),
        count => Err(AssignError::Ambiguous {
            wanted: wanted.to_owned(),
            count,
            ids: found
                .iter()
                .map(|d| d.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Files and their bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    pub files: u64,
    pub bytes: u64,
}

impl Count {
    fn add(&mut self, size: u64) {
        self.files += 1;
        self.bytes += size;
    }
}

/// What a policy change would do to one device, judged on its newest snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DryRun {
    pub device_id: String,
    pub hostname: String,
    /// The snapshot judged; `None` when the device has none yet.
    pub snapshot: Option<String>,
    /// Files the new unprotected area leaves out of the next snapshots.
    pub dropped: Count,
    /// Files that become user data (kept by system-only reverts and layer updates).
    pub into_user_area: Count,
    /// Files that stop being user data.
    pub out_of_user_area: Count,
    /// Rules of the old unprotected area that the new one drops: what they held is not in
    /// any snapshot, so its size is known only after the next sync reads it.
    pub uploaded_again: Vec<String>,
    /// The walk stopped at [`MAX_DRY_RUN_ENTRIES`]: the counts are lower bounds.
    pub capped: bool,
}

/// Entries a dry run reads per device at most.
pub const MAX_DRY_RUN_ENTRIES: u64 = 2_000_000;

#[derive(Debug, thiserror::Error)]
pub enum DryRunError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("reading the device's newest snapshot failed: {0}")]
    Tree(#[from] TreeLoadError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Device(#[from] AssignError),
}

/// Devices a dry run looks at unless named: those following the policy, at most this many.
pub const DRY_RUN_DEVICES: usize = 50;

/// [`dry_run`] of saving `new` as policy `name`, on the devices named in `wanted` (ids or
/// hostnames), or on those following the policy (at most [`DRY_RUN_DEVICES`]).
pub async fn dry_run_devices(
    catalog: &dyn Catalog,
    name: &str,
    new: &PolicySpec,
    wanted: &[String],
) -> Result<Vec<DryRun>, DryRunError> {
    let old = catalog
        .policy(name, None)
        .await?
        .map(|p| p.spec)
        .unwrap_or_default();
    let mut devices = Vec::new();
    if wanted.is_empty() {
        for d in catalog.device_protection().await? {
            if d.policy.name == name && devices.len() < DRY_RUN_DEVICES {
                devices.push(d.device);
            }
        }
    } else {
        for w in wanted {
            devices.push(find_device(catalog, w).await?);
        }
    }
    let mut runs = Vec::with_capacity(devices.len());
    for d in &devices {
        runs.push(dry_run(catalog, d, &old, new).await?);
    }
    Ok(runs)
}

/// What saving `new` in place of the policy `old` would change on `device`.
pub async fn dry_run(
    catalog: &dyn Catalog,
    device: &crate::catalog::Device,
    old: &PolicySpec,
    new: &PolicySpec,
) -> Result<DryRun, DryRunError> {
    let area = |set: &RuleSet, name: &'static str| {
        areas::Area::compile(set).map_err(|reason| PolicyError::BadRule { area: name, reason })
    };
    let unprotected =
        areas::Area::unprotected(&new.unprotected).map_err(|reason| PolicyError::BadRule {
            area: "unprotected",
            reason,
        })?;
    let (user_old, user_new) = (
        area(&old.user_area, "user_area")?,
        area(&new.user_area, "user_area")?,
    );
    let mut run = DryRun {
        device_id: device.id.clone(),
        hostname: device.hostname.clone(),
        snapshot: None,
        dropped: Count::default(),
        into_user_area: Count::default(),
        out_of_user_area: Count::default(),
        uploaded_again: old
            .unprotected
            .rules
            .iter()
            .filter(|r| !new.unprotected.rules.contains(r))
            .cloned()
            .collect(),
        capped: false,
    };
    let Some(newest) = catalog.device_snapshots(&device.id).await?.pop() else {
        return Ok(run);
    };
    run.snapshot = Some(newest.id.clone());
    let mut entries = 0u64;
    let start = [Standing::default(); 3];
    walk_tree(catalog, newest.root, start, |parent, path, e| {
        entries += 1;
        if entries > MAX_DRY_RUN_ENTRIES {
            run.capped = true;
            return Visit::Stop;
        }
        let here = [
            unprotected.child(parent[0], path),
            user_old.child(parent[1], path),
            user_new.child(parent[2], path),
        ];
        if e.kind == Some(Kind::Dir) {
            return Visit::Enter(here);
        }
        if e.kind != Some(Kind::File) {
            return Visit::Skip;
        }
        if here[0].in_area() {
            run.dropped.add(e.size);
        } else {
            match (here[1].in_area(), here[2].in_area()) {
                (false, true) => run.into_user_area.add(e.size),
                (true, false) => run.out_of_user_area.add(e.size),
                _ => {}
            }
        }
        Visit::Skip
    })
    .await?;
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses_and_shows_back_the_same() {
        let spec = parse_toml(
            r#"
            unprotected = { rules = ["%home%/Downloads", "/data/big"], exceptions = ["/data/big/keep"] }
            user_area = { rules = ["%home%"] }
            sync_interval = "15m"
            alert_after = "2d"

            [retention]
            hourly = 3
            daily = 2
            weekly = 0
            monthly = 12

            [reflectors]
            preferred_subnets = ["10.20.0.0/16", "fd00:1::/64"]
            latency_threshold_ms = 12
            site = "lyon"
            "#,
        )
        .unwrap();
        assert_eq!(
            spec.reflectors,
            ReflectorPolicy {
                preferred_subnets: vec!["10.20.0.0/16".into(), "fd00:1::/64".into()],
                latency_threshold_ms: 12,
                site: Some("lyon".into()),
            }
        );
        assert_eq!(spec.unprotected.rules, ["%home%/Downloads", "/data/big"]);
        assert_eq!(spec.unprotected.exceptions, ["/data/big/keep"]);
        assert_eq!(spec.user_area.rules, ["%home%"]);
        assert_eq!(spec.sync_interval_secs, 900);
        assert_eq!(spec.alert_after_secs, 2 * 86_400);
        assert_eq!(
            spec.retention,
            Retention {
                hourly: 3,
                daily: 2,
                weekly: 0,
                monthly: 12
            }
        );
        assert_eq!(parse_toml(&to_toml(&spec)).unwrap(), spec);
    }

    #[test]
    fn left_out_fields_take_the_defaults() {
        assert_eq!(parse_toml("").unwrap(), PolicySpec::default());
        let spec = parse_toml("[retention]\ndaily = 3\n").unwrap();
        assert_eq!(spec.retention.daily, 3);
        assert_eq!(spec.retention.hourly, Retention::default().hourly);
        assert_eq!(format_duration(3600), "1h");
        assert_eq!(format_duration(90), "90s");
        assert_eq!(format_duration(86_400 * 3), "3d");
    }

    #[test]
    fn bad_files_are_refused_naming_what_is_wrong() {
        for (text, expected) in [
            (r#"unprotected = { rules = ["home/x"] }"#, "home/x"),
            (r#"unprotected = { rules = ["/a/[b"] }"#, "/a/[b"),
            (r#"user_area = { exceptions = ["/a/../b"] }"#, "user_area"),
            (r#"sync_interval = "10s""#, "sync_interval"),
            (r#"sync_interval = "soon""#, "not a duration"),
            (r#"alert_after = "400d""#, "alert_after"),
            ("retension = 3", "retension"),
            ("[retention]\nyearly = 3", "yearly"),
            ("[retention]\ndaily = -1", "daily"),
            (
                "[reflectors]\npreferred_subnets = [\"10.0.0.0\"]",
                "ADDRESS/PREFIX",
            ),
            (
                "[reflectors]\nlatency_threshold_ms = 0",
                "latency_threshold_ms",
            ),
            ("[reflectors]\nsite = \"a b\"", "reflectors.site"),
            ("[reflectors]\nbranch = \"x\"", "branch"),
            ("unprotected = [", "TOML"),
        ] {
            let err = parse_toml(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn names_are_checked() {
        for ok in ["default", "office-2", "a.b_c"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "-x", "a b", "x/y", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn agents_get_the_factory_rules_first() {
        let p = PolicyVersion {
            name: "office".into(),
            version: 7,
            spec: parse_toml(r#"unprotected = { rules = ["/data/big"] }"#).unwrap(),
            created: String::new(),
            actor: "cli".into(),
        };
        let a = p.agent_policy();
        assert_eq!(a.version, 7);
        assert_eq!(a.unprotected.rules.len(), FACTORY_UNPROTECTED.len() + 1);
        assert_eq!(a.unprotected.rules.last().unwrap(), "/data/big");
        assert_eq!(a.sync_interval_secs, 3600);
    }

    #[test]
    fn the_migrations_default_policy_is_the_built_in_default() {
        let sql = include_str!("../migrations/20261126000004_policies.sql");
        let json = sql
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("'{"))
            .unwrap()
            .trim_start_matches('\'')
            .trim_end_matches("',");
        let spec: PolicySpec = serde_json::from_str(json).unwrap();
        assert_eq!(spec, PolicySpec::default());
    }
}
