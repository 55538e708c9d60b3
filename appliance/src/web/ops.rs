//! What the UI and the REST API both do, once: each operation checks its input, acts on
//! the catalog, and records an audit event naming the user who acted. The UI and API
//! modules only translate requests and answers.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::Response;
use morgana_core::wire::SnapshotInfo;

use super::browse::BrowseError;
use crate::auth::{self, AuthError, Role};
use crate::catalog::{
    ApiTokenRecord, Catalog, CatalogError, DeviceQuery, DeviceSort, DeviceState, DeviceSummary,
    FleetStats, User, UserChange,
};
use crate::events::{ChainAnchor, ChainCheck, Event, EventFilter, NewEvent, Severity};

/// Devices per page unless asked otherwise, and at most.
pub const DEVICES_PER_PAGE: u32 = 50;
pub const MAX_PER_PAGE: u32 = 500;
pub const EVENTS_PER_PAGE: u32 = 50;
/// A device counts as protected with a snapshot this recent.
pub const PROTECTED_WITHIN: Duration = Duration::from_secs(24 * 3600);
const MAX_LABEL: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Browse(#[from] BrowseError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(
        "the appliance failed while {0}; retry later, and tell its administrator if it persists"
    )]
    Internal(String),
}

impl OpError {
    pub fn status(&self) -> StatusCode {
        match self {
            OpError::NotFound(_) => StatusCode::NOT_FOUND,
            OpError::Invalid(_) => StatusCode::BAD_REQUEST,
            OpError::Conflict(_) => StatusCode::CONFLICT,
            OpError::Forbidden(_) => StatusCode::FORBIDDEN,
            OpError::Catalog(CatalogError::UserExists(_)) => StatusCode::CONFLICT,
            OpError::Catalog(CatalogError::UserUnknown(_)) => StatusCode::NOT_FOUND,
            OpError::Browse(BrowseError::NoSuchPath { .. } | BrowseError::NotAFolder { .. }) => {
                StatusCode::NOT_FOUND
            }
            OpError::Auth(AuthError::Catalog(_) | AuthError::Hash(_)) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            OpError::Auth(_) => StatusCode::BAD_REQUEST,
            OpError::Catalog(_) | OpError::Browse(_) | OpError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn message(&self) -> String {
        let status = self.status();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "web request failed");
        }
        match self {
            OpError::Catalog(e @ (CatalogError::UserExists(_) | CatalogError::UserUnknown(_))) => {
                e.to_string()
            }
            OpError::Catalog(e) => format!(
                "the appliance could not use its catalog ({e}); retry later, and tell its \
                 administrator if it persists"
            ),
            e => e.to_string(),
        }
    }

    pub fn into_api(self) -> crate::api::ApiError {
        crate::api::ApiError::new(self.status(), self.message())
    }

    pub fn into_page(self) -> Response {
        super::ui::error_page(self.status(), &self.message())
    }
}

pub type OpResult<T> = Result<T, OpError>;

fn now() -> i64 {
    crate::clock::now_ms()
}

pub fn protected_since() -> String {
    crate::clock::rfc3339_ms(now() - PROTECTED_WITHIN.as_millis() as i64)
}

async fn audit(catalog: &dyn Catalog, actor: &str, kind: &str, message: String) {
    crate::events::record(
        catalog,
        NewEvent::system(kind, Severity::Info, message).by(actor),
    )
    .await;
}

// ---- Dashboard ----

pub struct Dashboard {
    pub stats: FleetStats,
    /// Share of devices (not revoked) protected within [`PROTECTED_WITHIN`], 0–100.
    pub protected_percent: f64,
    /// Logical bytes per stored byte; `None` while nothing is stored.
    pub dedup_ratio: Option<f64>,
    pub recent: Vec<Event>,
}

pub async fn dashboard(catalog: &dyn Catalog) -> OpResult<Dashboard> {
    let stats = catalog.fleet_stats(&protected_since()).await?;
    let active = stats.devices - stats.revoked;
    let protected_percent = if active == 0 {
        0.0
    } else {
        stats.protected as f64 * 100.0 / active as f64
    };
    let dedup_ratio =
        (stats.stored_bytes > 0).then(|| stats.logical_bytes as f64 / stats.stored_bytes as f64);
    let recent = catalog
        .events_page(&EventFilter::default(), None, 10)
        .await?;
    Ok(Dashboard {
        stats,
        protected_percent,
        dedup_ratio,
        recent,
    })
}

// ---- Devices ----

/// The devices page's parameters as they come in a query string.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct DeviceParams {
    pub q: String,
    pub state: String,
    pub sort: String,
    pub dir: String,
    /// `KEY|ID` of the last device of the page before.
    pub after: String,
    pub limit: Option<u32>,
}

/// The query for `params`, seen by `caller`: end users see only their own devices.
pub fn device_query(caller: &User, params: &DeviceParams) -> OpResult<DeviceQuery> {
    let sort = if params.sort.is_empty() {
        DeviceSort::Hostname
    } else {
        DeviceSort::parse(&params.sort).ok_or_else(|| {
            OpError::Invalid(format!(
                "cannot sort devices by {:?}: use hostname, created or last_snapshot",
                params.sort
            ))
        })?
    };
    let state = match params.state.as_str() {
        "" | "all" => None,
        s => Some(DeviceState::parse(s).ok_or_else(|| {
            OpError::Invalid(format!(
                "{s:?} is not a device state: use protected, stale, never or revoked"
            ))
        })?),
    };
    let descending = match params.dir.as_str() {
        "" | "asc" => false,
        "desc" => true,
        d => {
            return Err(OpError::Invalid(format!(
                "{d:?} is not a sort direction: use asc or desc"
            )));
        }
    };
    let after = match params.after.as_str() {
        "" => None,
        a => {
            let (key, id) = a.rsplit_once('|').ok_or_else(|| {
                OpError::Invalid(
                    "the page cursor is malformed: start again from the first page".into(),
                )
            })?;
            Some((key.to_owned(), id.to_owned()))
        }
    };
    let search = params.q.trim();
    Ok(DeviceQuery {
        search: (!search.is_empty()).then(|| search.chars().take(200).collect()),
        state,
        owner: (!caller.role.sees_all_devices()).then(|| caller.name.clone()),
        sort,
        descending,
        after,
        limit: params
            .limit
            .unwrap_or(DEVICES_PER_PAGE)
            .clamp(1, MAX_PER_PAGE),
        protected_since: protected_since(),
    })
}

pub struct DevicePage {
    pub devices: Vec<DeviceSummary>,
    /// The `after` cursor of the next page, if there may be one.
    pub next: Option<String>,
}

pub async fn devices(
    catalog: &dyn Catalog,
    caller: &User,
    params: &DeviceParams,
) -> OpResult<DevicePage> {
    let query = device_query(caller, params)?;
    let devices = catalog.devices_page(&query).await?;
    let next = (devices.len() == query.limit as usize)
        .then(|| devices.last())
        .flatten()
        .map(|d| format!("{}|{}", d.sort_key(query.sort), d.id));
    Ok(DevicePage { devices, next })
}

/// A device `caller` may see: staff see all, end users only their own. Others' devices
/// answer exactly like devices that do not exist, so ids cannot be probed.
pub async fn device(catalog: &dyn Catalog, caller: &User, id: &str) -> OpResult<DeviceSummary> {
    let not_found = || {
        OpError::NotFound(format!(
            "there is no device {id:?} you can see: pick one from the devices list"
        ))
    };
    let d = catalog.device_summary(id).await?.ok_or_else(not_found)?;
    if caller.role.sees_all_devices() {
        return Ok(d);
    }
    if d.owner.as_deref() != Some(caller.name.as_str()) {
        return Err(not_found());
    }
    // An end user reaches their files through the portal or the API alike: turning the
    // portal off closes both.
    require_portal(catalog, &d).await?;
    Ok(d)
}

/// Refuses when an administrator turned the file portal off for `d`.
pub async fn require_portal(catalog: &dyn Catalog, d: &DeviceSummary) -> OpResult<()> {
    if catalog.device_portal_enabled(&d.id).await?.unwrap_or(false) {
        return Ok(());
    }
    Err(OpError::Forbidden(format!(
        "the file portal is turned off for {}, so its files cannot be browsed or downloaded \
         here; ask your administrator to turn it on (device page, File portal)",
        d.hostname
    )))
}

/// A device's snapshots, newest first.
pub async fn snapshots(catalog: &dyn Catalog, device_id: &str) -> OpResult<Vec<SnapshotInfo>> {
    let mut all = catalog.device_snapshots(device_id).await?;
    all.reverse();
    Ok(all)
}

pub async fn snapshot(
    catalog: &dyn Catalog,
    device: &DeviceSummary,
    snapshot_id: &str,
) -> OpResult<SnapshotInfo> {
    snapshots(catalog, &device.id)
        .await?
        .into_iter()
        .find(|s| s.id == snapshot_id)
        .ok_or_else(|| {
            OpError::NotFound(format!(
                "device {} has no snapshot {snapshot_id:?} (retention may have removed it): \
                 pick one from the device's snapshot list",
                device.hostname
            ))
        })
}

pub async fn set_owner(
    catalog: &dyn Catalog,
    actor: &str,
    device: &DeviceSummary,
    owner: &str,
) -> OpResult<()> {
    let owner = owner.trim();
    let owner = if owner.is_empty() {
        None
    } else {
        if catalog.user(owner).await?.is_none() {
            return Err(OpError::Invalid(format!(
                "there is no user {owner:?}: add the user first, or leave the owner empty"
            )));
        }
        Some(owner)
    };
    if !catalog.set_device_owner(&device.id, owner).await? {
        return Err(OpError::NotFound(format!("device {} is gone", device.id)));
    }
    crate::events::record(
        catalog,
        NewEvent::system(
            "device.owner_set",
            Severity::Info,
            match owner {
                Some(o) => format!("owner of {} set to {o}", device.hostname),
                None => format!("owner of {} cleared", device.hostname),
            },
        )
        .for_device(&device.id)
        .by(actor),
    )
    .await;
    Ok(())
}

// ---- Events ----

#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct EventParams {
    pub device: String,
    pub kind: String,
    pub severity: String,
    pub before: Option<i64>,
    pub limit: Option<u32>,
}

pub struct EventPage {
    pub events: Vec<Event>,
    /// The `before` of the next (older) page, if there may be one.
    pub older: Option<i64>,
}

pub async fn events(catalog: &dyn Catalog, params: &EventParams) -> OpResult<EventPage> {
    let min_severity = match params.severity.as_str() {
        "" | "all" => None,
        s => Some(s.parse::<Severity>().map_err(OpError::Invalid)?),
    };
    let filter = EventFilter {
        device_id: Some(params.device.trim().to_owned()).filter(|d| !d.is_empty()),
        kind_prefix: Some(params.kind.trim().to_owned()).filter(|k| !k.is_empty()),
        min_severity,
    };
    let limit = params
        .limit
        .unwrap_or(EVENTS_PER_PAGE)
        .clamp(1, MAX_PER_PAGE);
    let events = catalog.events_page(&filter, params.before, limit).await?;
    let older = (events.len() == limit as usize)
        .then(|| events.last().map(|e| e.seq))
        .flatten();
    Ok(EventPage { events, older })
}

pub async fn event(catalog: &dyn Catalog, seq: i64) -> OpResult<Event> {
    catalog
        .events_page(&EventFilter::default(), seq.checked_add(1), 1)
        .await?
        .into_iter()
        .find(|e| e.seq == seq)
        .ok_or_else(|| {
            OpError::NotFound(format!(
                "there is no event number {seq}: pick one from the events list"
            ))
        })
}

/// Re-hashes the events recorded since the last check of this process (all of them when
/// `full`, or on the first check), after checking that the last checked one is unchanged.
/// An edit inside the already-checked part that keeps every stored hash shows only in a
/// full check; `morgana events --verify` always does one.
pub async fn verify_events(
    catalog: &dyn Catalog,
    last: &std::sync::Mutex<Option<ChainAnchor>>,
    full: bool,
) -> OpResult<ChainCheck> {
    let from = if full {
        None
    } else {
        *last.lock().unwrap_or_else(|p| p.into_inner())
    };
    let (check, reached) = catalog.verify_events_from(from).await?;
    if let ChainCheck::Intact { .. } = check {
        *last.lock().unwrap_or_else(|p| p.into_inner()) = reached;
    }
    Ok(check)
}

// ---- Users ----

async fn hash(password: String) -> OpResult<String> {
    tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(|e| OpError::Internal(format!("hashing a password ({e})")))?
        .map_err(OpError::from)
}

/// Adds a user; with no password given, one is generated, returned once, and must be
/// changed at first login.
pub async fn create_user(
    catalog: &dyn Catalog,
    actor: &str,
    name: &str,
    role: &str,
    password: Option<&str>,
) -> OpResult<(User, Option<String>)> {
    let name = name.trim();
    auth::check_user_name(name)?;
    let role: Role = role.parse()?;
    let (password, generated) = match password.filter(|p| !p.is_empty()) {
        Some(p) => (p.to_owned(), false),
        None => (auth::generate_password(), true),
    };
    let user = User {
        name: name.to_owned(),
        role,
        password_hash: hash(password.clone()).await?,
        must_change: generated,
        disabled: false,
        created: crate::clock::rfc3339_ms(now()),
    };
    catalog.create_user(&user).await?;
    audit(
        catalog,
        actor,
        "user.created",
        format!("user {name} created with role {}", role.name()),
    )
    .await;
    Ok((user, generated.then_some(password)))
}

/// Refuses a change that would leave no enabled administrator: nobody could undo it.
async fn keep_an_administrator(catalog: &dyn Catalog, name: &str) -> OpResult<()> {
    let others = catalog
        .users()
        .await?
        .into_iter()
        .filter(|u| u.name != name && u.role == Role::Administrator && !u.disabled)
        .count();
    if others == 0 {
        return Err(OpError::Conflict(format!(
            "{name} is the last enabled administrator: make another user an administrator first"
        )));
    }
    Ok(())
}

pub async fn set_role(
    catalog: &dyn Catalog,
    actor: &str,
    name: &str,
    role: &str,
) -> OpResult<User> {
    let role: Role = role.parse()?;
    let current = catalog
        .user(name)
        .await?
        .ok_or_else(|| CatalogError::UserUnknown(name.to_owned()))?;
    if current.role == Role::Administrator && role != Role::Administrator && !current.disabled {
        keep_an_administrator(catalog, name).await?;
    }
    let user = catalog
        .update_user(
            name,
            &UserChange {
                role: Some(role),
                ..Default::default()
            },
        )
        .await?;
    audit(
        catalog,
        actor,
        "user.role_changed",
        format!(
            "role of {name} changed from {} to {}",
            current.role.name(),
            role.name()
        ),
    )
    .await;
    Ok(user)
}

pub async fn set_disabled(
    catalog: &dyn Catalog,
    actor: &str,
    name: &str,
    disabled: bool,
) -> OpResult<User> {
    let current = catalog
        .user(name)
        .await?
        .ok_or_else(|| CatalogError::UserUnknown(name.to_owned()))?;
    if disabled && current.role == Role::Administrator && !current.disabled {
        keep_an_administrator(catalog, name).await?;
    }
    let user = catalog
        .update_user(
            name,
            &UserChange {
                disabled: Some(disabled),
                ..Default::default()
            },
        )
        .await?;
    let (kind, what) = if disabled {
        ("user.disabled", "disabled; their sessions ended")
    } else {
        ("user.enabled", "enabled")
    };
    audit(catalog, actor, kind, format!("user {name} {what}")).await;
    Ok(user)
}

/// Sets a new password chosen by an administrator, or generates one (returned once); the
/// user must change it at next login. Ends the user's sessions.
pub async fn reset_password(
    catalog: &dyn Catalog,
    actor: &str,
    name: &str,
    password: Option<&str>,
) -> OpResult<Option<String>> {
    let (password, generated) = match password.filter(|p| !p.is_empty()) {
        Some(p) => (p.to_owned(), false),
        None => (auth::generate_password(), true),
    };
    let hashed = hash(password.clone()).await?;
    catalog
        .update_user(
            name,
            &UserChange {
                password: Some((hashed, true)),
                ..Default::default()
            },
        )
        .await?;
    audit(
        catalog,
        actor,
        "user.password_reset",
        format!("password of {name} reset; their sessions ended"),
    )
    .await;
    Ok(generated.then_some(password))
}

/// A user changing their own password, proving they know the current one.
pub async fn change_own_password(
    catalog: &dyn Catalog,
    user: &User,
    current: &str,
    new: &str,
    confirm: &str,
) -> OpResult<()> {
    if new != confirm {
        return Err(OpError::Invalid(
            "the new password and its confirmation differ: type the same password twice".into(),
        ));
    }
    if auth::authenticate(catalog, &user.name, current)
        .await?
        .is_none()
    {
        return Err(OpError::Invalid(
            "the current password is wrong: nothing was changed".into(),
        ));
    }
    if new == current {
        return Err(OpError::Invalid(
            "the new password is the current one: choose a different one".into(),
        ));
    }
    let hashed = hash(new.to_owned()).await?;
    catalog
        .update_user(
            &user.name,
            &UserChange {
                password: Some((hashed, false)),
                ..Default::default()
            },
        )
        .await?;
    audit(
        catalog,
        &format!("user:{}", user.name),
        "user.password_changed",
        format!("{} changed their password", user.name),
    )
    .await;
    Ok(())
}

// ---- API tokens ----

pub async fn issue_api_token(
    catalog: &dyn Catalog,
    actor: &str,
    user: &str,
    label: &str,
) -> OpResult<(ApiTokenRecord, String)> {
    let label = label.trim();
    if label.is_empty() || label.len() > MAX_LABEL || label.chars().any(char::is_control) {
        return Err(OpError::Invalid(format!(
            "give the token a label of 1 to {MAX_LABEL} characters saying what uses it \
             (e.g. `inventory script`)"
        )));
    }
    let (secret, hash) = auth::new_secret("mgt_");
    let record = catalog.create_api_token(hash, user, label).await?;
    audit(
        catalog,
        actor,
        "api_token.issued",
        format!("API token {} ({label}) issued for {user}", record.id),
    )
    .await;
    Ok((record, secret))
}

pub async fn revoke_api_token(catalog: &dyn Catalog, actor: &str, id: i64) -> OpResult<()> {
    if !catalog.revoke_api_token(id).await? {
        return Err(OpError::NotFound(format!(
            "there is no API token {id}: pick one from the list"
        )));
    }
    audit(
        catalog,
        actor,
        "api_token.revoked",
        format!("API token {id} revoked"),
    )
    .await;
    Ok(())
}

// ---- Enrolment tokens ----

pub struct NewEnrollToken {
    pub token: String,
    pub uses: u32,
    pub expires_at: String,
}

pub async fn create_enroll_token(
    catalog: &dyn Catalog,
    ca_cert_der: &[u8],
    actor: &str,
    uses: u32,
    expires: &str,
) -> OpResult<NewEnrollToken> {
    if !(1..=100_000).contains(&uses) {
        return Err(OpError::Invalid(
            "uses must be between 1 and 100000 devices".into(),
        ));
    }
    let expires =
        crate::commands::enroll_token::parse_duration(expires).map_err(OpError::Invalid)?;
    let (token, expires_at) =
        crate::commands::enroll_token::create(catalog, ca_cert_der, uses, expires).await?;
    let expires_at = crate::clock::rfc3339_ms(expires_at);
    audit(
        catalog,
        actor,
        "enroll_token.created",
        format!("enrolment token for {uses} device(s) created, valid until {expires_at}"),
    )
    .await;
    Ok(NewEnrollToken {
        token: token.to_string(),
        uses,
        expires_at,
    })
}

/// `1.5 GiB` and the like.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
