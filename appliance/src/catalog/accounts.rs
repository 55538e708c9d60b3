//! What the catalog keeps for the web UI and REST API (issue 4): users, sessions, API
//! tokens, the devices page and the dashboard's figures.

use crate::auth::Role;

/// A user as stored. The password hash never leaves the catalog and `auth`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub role: Role,
    /// argon2id, PHC string.
    pub password_hash: String,
    /// The password was generated (first start, reset): the user must choose their own.
    pub must_change: bool,
    pub disabled: bool,
    /// RFC 3339 UTC.
    pub created: String,
}

/// A change to a user; `None` fields stay as they are. Disabling a user or changing their
/// password ends their sessions in the same step.
#[derive(Clone, Debug, Default)]
pub struct UserChange {
    pub role: Option<Role>,
    pub disabled: Option<bool>,
    /// New password hash and whether the user must change it at next login.
    pub password: Option<(String, bool)>,
}

/// An API token as listed (its secret is shown once, when issued, and never stored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiTokenRecord {
    pub id: i64,
    pub user: String,
    pub label: String,
    pub created: String,
    pub revoked: bool,
}

/// An enrolment token as listed: known by a prefix of its secret's hash only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollTokenRecord {
    /// The first hex digits of the secret's hash: enough to tell tokens apart.
    pub hash_prefix: String,
    pub uses_left: u32,
    pub expires_at_ms: i64,
    pub created_at_ms: i64,
}

/// A device as the devices page and API show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSummary {
    pub id: String,
    pub hostname: String,
    pub owner: Option<String>,
    /// RFC 3339 UTC.
    pub created: String,
    pub revoked: bool,
    /// RFC 3339 UTC of the newest snapshot, `None` before the first.
    pub last_snapshot: Option<String>,
    /// Logical bytes of the newest snapshot.
    pub last_snapshot_bytes: u64,
}

impl DeviceSummary {
    /// The key a page continues after when this device was shown last under `sort`.
    pub fn sort_key(&self, sort: DeviceSort) -> String {
        match sort {
            DeviceSort::Hostname => self.hostname.clone(),
            DeviceSort::Created => self.created.clone(),
            DeviceSort::LastSnapshot => self.last_snapshot.clone().unwrap_or_default(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSort {
    #[default]
    Hostname,
    Created,
    LastSnapshot,
}

impl DeviceSort {
    pub fn parse(s: &str) -> Option<DeviceSort> {
        match s {
            "hostname" => Some(DeviceSort::Hostname),
            "created" => Some(DeviceSort::Created),
            "last_snapshot" => Some(DeviceSort::LastSnapshot),
            _ => None,
        }
    }
}

/// Protection state of a device, relative to a cutoff time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceState {
    /// A snapshot at or after the cutoff.
    Protected,
    /// Snapshots, but none since the cutoff.
    Stale,
    /// No snapshot yet.
    Never,
    Revoked,
}

impl DeviceState {
    pub fn parse(s: &str) -> Option<DeviceState> {
        match s {
            "protected" => Some(DeviceState::Protected),
            "stale" => Some(DeviceState::Stale),
            "never" => Some(DeviceState::Never),
            "revoked" => Some(DeviceState::Revoked),
            _ => None,
        }
    }
}

/// One page of devices: filters, order, and the key of the last row of the page before.
#[derive(Clone, Debug, Default)]
pub struct DeviceQuery {
    /// Part of the hostname or id, case-insensitive.
    pub search: Option<String>,
    pub state: Option<DeviceState>,
    /// Only devices of this user.
    pub owner: Option<String>,
    pub sort: DeviceSort,
    pub descending: bool,
    /// `(sort key, id)` of the last device already shown.
    pub after: Option<(String, String)>,
    pub limit: u32,
    /// RFC 3339 UTC: snapshots at or after this count as protecting a device.
    pub protected_since: String,
}

/// Fleet-wide figures for the dashboard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetStats {
    pub devices: u64,
    pub revoked: u64,
    /// Devices (not revoked) with a snapshot since the cutoff.
    pub protected: u64,
    pub snapshots: u64,
    /// Sum of all retained snapshots' logical sizes.
    pub logical_bytes: u64,
    /// Sum of all pack files' sizes.
    pub stored_bytes: u64,
}
