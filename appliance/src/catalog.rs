//! The catalog: every piece of metadata the appliance keeps (enrolment tokens, devices, the
//! blob index, packs, snapshots). Callers see this trait only, never SQL, so the clustered
//! MongoDB implementation can slot in behind it.
//!
//! The blob index lives here and nowhere else: no caller holds the set of stored ids in
//! memory, so the appliance's memory does not grow with the repository. Lookups take
//! slices of ids and implementations batch them; listings are pages keyed by the last item
//! seen, so a caller walking everything holds one page at a time.

pub mod accounts;
pub mod sqlite;

use std::path::PathBuf;

use async_trait::async_trait;
use morgana_core::Id;
use morgana_core::control::{
    ApplyJob, FileResults, Inventory, JobKind, JobProgress, JobReport, JobState,
};
use morgana_core::control::{ReflectorBeat, ReflectorRole};
use morgana_core::pack::PackEntry;
use morgana_core::plugin::Hook;
use morgana_core::plugin::types::LayerKind;
use morgana_core::wire::SnapshotInfo;

use crate::events::{ChainAnchor, ChainCheck, Event, EventFilter, NewEvent};
use crate::policy::{PolicySpec, PolicyVersion};

pub use accounts::{
    ApiTokenRecord, DeviceQuery, DeviceSort, DeviceState, DeviceSummary, EnrollTokenRecord,
    FleetStats, User, UserChange,
};
pub use sqlite::SqliteCatalog;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot open the catalog {}: {source}", path.display())]
    Open { path: PathBuf, source: sqlx::Error },
    #[error(
        "cannot bring the catalog {} up to date: {source} (was it written by a newer \
         `morgana`? run the newest version, or restore the catalog from a backup)",
        path.display()
    )]
    Migrate {
        path: PathBuf,
        source: sqlx::migrate::MigrateError,
    },
    #[error("catalog query failed while {doing}: {source}")]
    Query {
        doing: &'static str,
        source: sqlx::Error,
    },
    #[error("the catalog holds a malformed {what}: {detail}; run `morgana check`")]
    Corrupt { what: &'static str, detail: String },
    #[error("this enrolment token is unknown: create one with `morgana enroll-token`")]
    TokenUnknown,
    #[error("this enrolment token has expired: create a new one with `morgana enroll-token`")]
    TokenExpired,
    #[error(
        "this enrolment token has been used as many times as it allows: create a new one \
         with `morgana enroll-token --uses N`"
    )]
    TokenUsedUp,
    #[error("there is no plugin with id {0}: list them with `morgana plugin list`")]
    PluginUnknown(i64),
    #[error(
        "there is no policy {0:?}: list them with `morgana policy list`, create one with \
         `morgana policy set NAME --file POLICY.toml`"
    )]
    PolicyUnknown(String),
    #[error("there is no device {0:?} (by id or hostname); nothing was changed")]
    DeviceUnknown(String),
    #[error("a user named {0:?} exists already: pick another name, or change that user")]
    UserExists(String),
    #[error("there is no user named {0:?}: list the users, or add one with `morgana user add`")]
    UserUnknown(String),
}

pub type Result<T, E = CatalogError> = std::result::Result<T, E>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// 16 lowercase hex digits.
    pub id: String,
    pub hostname: String,
    /// Id (BLAKE3) of the device certificate's DER.
    pub cert_fingerprint: Id,
    /// RFC 3339 UTC.
    pub created: String,
    pub revoked: bool,
}

/// A stored pack file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackRecord {
    pub id: Id,
    /// The volume directory holding it; the file's place inside follows from the id.
    pub volume: PathBuf,
    pub size: u64,
    pub blob_count: u64,
    pub created: String,
}

/// Where a blob is stored: its pack (and the pack's volume) and its place in the pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: Id,
    pub volume: PathBuf,
    pub entry: PackEntry,
}

/// How far the collector has looked: the newest snapshot and hold it has marked from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcHorizon {
    pub snapshot_seq: i64,
    pub hold_seq: i64,
    pub layer_seq: i64,
    pub driver_seq: i64,
}

/// A step of the collector that runs only if no root appeared beyond what it marked.
#[derive(Debug, PartialEq, Eq)]
pub enum Fenced<T> {
    Done(T),
    /// Nothing changed: mark from the roots up to this horizon, then try again.
    NewRoots(GcHorizon),
}

/// A pack and how much of it the index still points to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackUsage {
    pub pack: PackRecord,
    pub live_blobs: u64,
    pub live_bytes: u64,
}

#[async_trait]
pub trait Catalog: Send + Sync {
    /// Stores a new enrolment token by the hash of its secret.
    async fn create_token(&self, secret_hash: Id, uses: u32, expires_at_ms: i64) -> Result<()>;

    /// Uses one enrolment of the token and records the device, both or neither. Fails with
    /// `TokenUnknown`, `TokenExpired` or `TokenUsedUp` and changes nothing then.
    async fn enroll_device(&self, secret_hash: Id, now_ms: i64, device: &Device) -> Result<()>;

    async fn device_by_fingerprint(&self, fingerprint: Id) -> Result<Option<Device>>;

    /// The ids, in the order given, that the blob index does not hold.
    async fn missing_blobs(&self, ids: &[Id]) -> Result<Vec<Id>>;

    /// The ids, in the order given, that are neither indexed chunks, complete trees nor
    /// recorded whole files; those present are held for the device in the same step (see
    /// `hold`). A tree whose closure is not known to be complete counts as missing: a
    /// device told a tree exists relies on everything below it.
    async fn missing_objects_held(
        &self,
        device_id: &str,
        ids: &[Id],
        now_ms: i64,
    ) -> Result<Vec<Id>>;

    /// Holds ids for a device's sync in progress: the collector keeps them (and what they
    /// reach) until the device commits a snapshot or the hold expires.
    async fn hold(&self, device_id: &str, ids: &[Id], now_ms: i64) -> Result<()>;

    /// Holds ids (see `hold`) and returns, in the order given, those the blob index does
    /// not hold: what a pack about to be stored must carry. Held first, so nothing found
    /// present can be collected before the device commits.
    async fn hold_and_find_missing(
        &self,
        device_id: &str,
        ids: &[Id],
        now_ms: i64,
    ) -> Result<Vec<Id>> {
        self.hold(device_id, ids, now_ms).await?;
        self.missing_blobs(ids).await
    }

    /// Locations of the ids, aligned with the input (`None` for ids not indexed).
    async fn locate_blobs(&self, ids: &[Id]) -> Result<Vec<Option<BlobLocation>>>;

    /// Records a written pack and indexes its blobs in one step. Blobs some other pack
    /// indexed meanwhile keep their first location.
    async fn insert_pack(&self, pack: &PackRecord, entries: &[PackEntry]) -> Result<()>;

    /// Packs ordered by id, starting after `after`.
    async fn packs_page(&self, after: Option<Id>, limit: u32) -> Result<Vec<PackRecord>>;

    /// The index entries pointing into `pack`, ordered by offset, after offset `after`.
    async fn pack_blobs_page(
        &self,
        pack: Id,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<PackEntry>>;

    /// Indexed blobs whose pack the catalog does not list, ordered by id, after `after`:
    /// `(blob, pack)`. Empty in a healthy catalog.
    async fn orphan_blobs_page(&self, after: Option<Id>, limit: u32) -> Result<Vec<(Id, Id)>>;

    /// Whether a tree's whole closure was verified present before.
    async fn tree_complete(&self, tree: Id) -> Result<bool>;

    /// The trees, in the order given, not recorded as complete.
    async fn incomplete_trees(&self, trees: &[Id]) -> Result<Vec<Id>>;
    /// Records, in one step, trees whose whole closure was verified and whole-file ids of
    /// multi-chunk files whose chunks are all indexed.
    async fn record_verified(&self, trees: &[Id], files: &[Id]) -> Result<()>;

    /// Records a snapshot and releases its device's holds, both or neither.
    async fn insert_snapshot(&self, snapshot: &SnapshotInfo) -> Result<()>;

    /// Devices that have snapshots.
    async fn snapshot_devices(&self) -> Result<Vec<String>>;

    /// Deletes snapshots by id, never a pinned one; returns how many went.
    async fn delete_snapshots(&self, ids: &[String]) -> Result<u64>;

    /// Pins a snapshot with a reason, or unpins it with `None`; false if it does not exist.
    async fn pin_snapshot(&self, id: &str, reason: Option<&str>) -> Result<bool>;

    /// A device's snapshots, oldest first.
    async fn device_snapshots(&self, device_id: &str) -> Result<Vec<SnapshotInfo>>;

    /// All snapshots ordered by id, after `after`.
    async fn snapshots_page(&self, after: Option<&str>, limit: u32) -> Result<Vec<SnapshotInfo>>;

    // ---- garbage collection (protocol in gc.rs) ----

    /// Takes or renews the collector's lease for `holder` until `now_ms + ttl_ms`. Returns
    /// the other holder and its expiry when someone else holds an unexpired lease.
    async fn gc_take_lease(
        &self,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<(String, i64)>>;

    async fn gc_release_lease(&self, holder: &str) -> Result<()>;

    /// Empties the mark set and purges holds taken before `hold_cutoff_ms`.
    async fn gc_reset(&self, hold_cutoff_ms: i64) -> Result<()>;

    /// The newest snapshot and hold sequence numbers now.
    async fn gc_horizon(&self) -> Result<GcHorizon>;

    /// `(seq, snapshot id, root)` of snapshots after `after_seq`, in sequence order.
    async fn snapshot_roots_page(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<(i64, String, Id)>>;

    /// `(seq, id)` of holds after `after_seq` taken at or after `cutoff_ms`.
    async fn holds_page(
        &self,
        after_seq: i64,
        cutoff_ms: i64,
        limit: u32,
    ) -> Result<Vec<(i64, Id)>>;

    /// Adds ids to the mark set; returns those not marked before, in the order given.
    async fn gc_mark(&self, ids: &[Id]) -> Result<Vec<Id>>;

    /// Forgets completeness of unmarked trees and unmarked whole files, unless a snapshot
    /// or hold newer than `seen` exists.
    async fn gc_drop_unmarked_assertions(&self, seen: GcHorizon) -> Result<Fenced<()>>;

    /// Unmarked blobs after `after`, ordered by id: `(id, stored_len)`.
    async fn gc_unmarked_blobs_page(&self, after: Option<Id>, limit: u32)
    -> Result<Vec<(Id, u32)>>;

    /// Deletes those of `ids` that are unmarked from the blob index, unless a snapshot or
    /// hold newer than `seen` exists. Returns `(blobs, stored bytes)` deleted.
    async fn gc_delete_unmarked(&self, ids: &[Id], seen: GcHorizon) -> Result<Fenced<(u64, u64)>>;

    /// Packs after `after`, ordered by id, with what of them the index still points to.
    async fn pack_usage_page(&self, after: Option<Id>, limit: u32) -> Result<Vec<PackUsage>>;

    /// Points the index entries `moved` (written into the new pack `to`) away from `from`,
    /// records `to`, and retires `from` if nothing points into it any more.
    async fn gc_move_blobs(
        &self,
        from: Id,
        to: &PackRecord,
        moved: &[PackEntry],
        now_ms: i64,
    ) -> Result<()>;

    /// Retires a pack nothing points into; false (and nothing changes) if something does.
    async fn retire_pack(&self, pack: Id, now_ms: i64) -> Result<bool>;

    /// Retired packs whose grace period ended: `(pack, volume)`.
    async fn dead_packs_before(&self, before_ms: i64, limit: u32) -> Result<Vec<(Id, PathBuf)>>;

    /// Forgets a retired pack once its file is gone.
    async fn forget_dead_pack(&self, pack: Id) -> Result<()>;

    /// Finishes outstanding work and closes connections; call before the process exits.
    async fn close(&self);

    // ---- Plugins (issue 5) ----

    /// Records an uploaded component as the next version of `name` on `hook` (1 for a new
    /// name), inactive.
    async fn add_plugin(&self, new: &NewPlugin) -> Result<PluginRecord>;

    /// Every plugin version, by hook, name, then version.
    async fn plugins(&self) -> Result<Vec<PluginRecord>>;

    async fn plugin(&self, id: i64) -> Result<Option<PluginRecord>>;

    /// Activates the plugin and deactivates whichever was active on its hook, in one step.
    /// Fails with `PluginUnknown` and changes nothing then.
    async fn enable_plugin(&self, id: i64) -> Result<PluginRecord>;

    /// Deactivates the plugin; its hook falls back to the built-in.
    async fn disable_plugin(&self, id: i64) -> Result<PluginRecord>;

    /// The plugin active on `hook`, if any.
    async fn active_plugin(&self, hook: Hook) -> Result<Option<PluginRecord>>;

    // ---- Events and audit log ----

    /// Appends an event, chained to the one before it.
    async fn record_event(&self, event: &NewEvent) -> Result<Event>;

    /// Events matching `filter`, newest first, older than `before_seq` when given.
    async fn events_page(
        &self,
        filter: &EventFilter,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Event>>;

    /// Re-hashes the whole chain, oldest first, one page at a time.
    async fn verify_events(&self) -> Result<ChainCheck> {
        Ok(self.verify_events_from(None).await?.0)
    }

    /// Re-hashes the chain after `from` (all of it without one), after checking that the
    /// anchor's event still carries the anchor's hash; returns the newest event reached,
    /// to start the next check from.
    async fn verify_events_from(
        &self,
        from: Option<ChainAnchor>,
    ) -> Result<(ChainCheck, Option<ChainAnchor>)>;

    // ---- Image management ----

    /// Marks or unmarks a device as a reference machine; false if there is no such device.
    async fn set_reference(&self, device_id: &str, reference: bool) -> Result<bool>;

    /// Reference machines, by id.
    async fn reference_devices(&self) -> Result<Vec<Device>>;

    /// Drops every hold of `holder` (a capture that finished or gave up).
    async fn release_holds(&self, holder: &str) -> Result<()>;

    /// Records the next version of `layer.name` (1 for a new name).
    async fn insert_layer(&self, layer: &NewLayer) -> Result<LayerRecord>;

    /// Every version of every layer, by name then version.
    async fn layers(&self) -> Result<Vec<LayerRecord>>;

    /// One version of a layer, or its newest with `version: None`.
    async fn layer(&self, name: &str, version: Option<u32>) -> Result<Option<LayerRecord>>;

    /// `(seq, root)` of layers with `seq > after_seq`, in seq order.
    async fn layer_roots_page(&self, after_seq: i64, limit: u32) -> Result<Vec<(i64, Id)>>;

    /// Creates or replaces a saved device group.
    async fn save_group(&self, name: &str, devices: &[String], now: &str, by: &str) -> Result<()>;

    /// Every device group with its device ids, by name.
    async fn groups(&self) -> Result<Vec<(String, Vec<String>)>>;

    /// Records `assignment` for every device in one transaction, replacing earlier ones.
    async fn assign_layers(
        &self,
        device_ids: &[String],
        assignment: &Assignment,
        now: &str,
        by: &str,
    ) -> Result<()>;

    /// The layers assigned to a device, if any.
    async fn layer_assignment(&self, device_id: &str) -> Result<Option<AssignmentRecord>>;

    /// Records what a successful apply job put on the device; the layers it had before
    /// become the ones a rollback returns to.
    async fn record_applied(
        &self,
        device_id: &str,
        job_id: &str,
        applied: &ApplyJob,
        now: &str,
    ) -> Result<()>;

    /// The layers the device has, as its last successful apply left them.
    async fn applied_layers(&self, device_id: &str) -> Result<Option<AppliedRecord>>;

    /// After a rollback job succeeded: the device has the layers it had before again.
    async fn roll_back_applied(&self, device_id: &str, job_id: &str, now: &str) -> Result<()>;

    /// Stores what an apply job did, file by file (replacing an earlier report of it).
    async fn save_apply_results(
        &self,
        job_id: &str,
        device_id: &str,
        results: &FileResults,
        now: &str,
    ) -> Result<()>;

    /// What apply job `job_id` did, if its agent reported it.
    async fn apply_results(&self, job_id: &str) -> Result<Option<FileResults>>;

    // ---- Driver library (issue 6) ----

    /// Records the next version of `set.name` (1 for a new name).
    async fn insert_driver_set(&self, set: &NewDriverSet) -> Result<DriverSetRecord>;

    /// Every version of every driver set, by name then version.
    async fn driver_sets(&self) -> Result<Vec<DriverSetRecord>>;

    /// One version of a driver set, or its newest with `version: None`.
    async fn driver_set(&self, name: &str, version: Option<u32>)
    -> Result<Option<DriverSetRecord>>;

    /// `(seq, root)` of driver sets with `seq > after_seq`, in seq order.
    async fn driver_set_roots_page(&self, after_seq: i64, limit: u32) -> Result<Vec<(i64, Id)>>;

    /// Creates or replaces driver profile `profile.name`.
    async fn save_driver_profile(&self, profile: &DriverProfileRecord) -> Result<()>;

    /// Every driver profile, by name.
    async fn driver_profiles(&self) -> Result<Vec<DriverProfileRecord>>;

    // ---- Upload policies and alerts (issue 3) ----

    /// Saves `spec` as the next version of policy `name` (creating it), which is then the
    /// one in force for its devices.
    async fn save_policy(
        &self,
        name: &str,
        spec: &PolicySpec,
        created: &str,
        actor: &str,
    ) -> Result<PolicyVersion>;

    /// One version of a policy, or the one in force with `None`.
    async fn policy(&self, name: &str, version: Option<u64>) -> Result<Option<PolicyVersion>>;

    /// Every saved version of a policy, oldest first.
    async fn policy_history(&self, name: &str) -> Result<Vec<PolicyVersion>>;

    /// The version in force of every policy, by name, with how many devices follow it.
    async fn policies(&self) -> Result<Vec<(PolicyVersion, u64)>>;

    /// The version in force of the device's policy. Fails with `DeviceUnknown`.
    async fn device_policy(&self, device_id: &str) -> Result<PolicyVersion>;

    /// Devices whose id or hostname is `id_or_hostname`.
    async fn find_devices(&self, id_or_hostname: &str) -> Result<Vec<Device>>;

    /// Moves devices to policy `name`, all or none; returns the policy each had before.
    /// Fails with `PolicyUnknown` or `DeviceUnknown` and changes nothing then.
    async fn assign_policy(&self, name: &str, device_ids: &[String]) -> Result<Vec<String>>;

    /// Every device with its policy in force and its newest snapshot, by id.
    async fn device_protection(&self) -> Result<Vec<DeviceProtection>>;

    /// Opens an alert episode; false (and nothing changes) if one is open under its key.
    async fn open_alert(&self, alert: &OpenAlert) -> Result<bool>;

    /// Closes the episode open under `key`, returning it; `None` if none was open.
    async fn close_alert(&self, key: &str) -> Result<Option<OpenAlert>>;

    /// The open alert episodes, oldest first.
    async fn open_alerts(&self) -> Result<Vec<OpenAlert>>;

    // ---- Control plane: device status and jobs (issue 3) ----

    /// Every enrolled device with what it last reported, by id.
    async fn devices(&self) -> Result<Vec<DeviceStatus>>;

    async fn device_status(&self, id: &str) -> Result<Option<DeviceStatus>>;

    /// Records a heartbeat. With an inventory, stores it and its digest; returns whether
    /// that digest differs from the one held before (true for a device's first inventory).
    async fn record_heartbeat(&self, device_id: &str, beat: &HeartbeatRecord<'_>) -> Result<bool>;

    async fn snapshot(&self, id: &str) -> Result<Option<SnapshotInfo>>;

    /// Stores a new job (state `queued`).
    async fn queue_job(&self, job: &JobRecord) -> Result<()>;

    /// Takes the device's oldest queued job and marks it running, in one step: two polls
    /// never get the same job.
    async fn take_next_job(&self, device_id: &str, now_ms: i64) -> Result<Option<JobRecord>>;

    /// Applies an agent's report to its job: progress while running, then the outcome
    /// (`finished_ms` set). Totals only grow: the appliance counts a restore's totals when
    /// queuing it, and an agent that reports none must not erase them. `None`, and nothing changes, unless `report.job_id` is a job of
    /// `device_id` that is running.
    async fn report_job(
        &self,
        device_id: &str,
        report: &JobReport,
        now_ms: i64,
    ) -> Result<Option<JobRecord>>;

    /// Marks failed, with `message`, the device's running jobs other than `except` that
    /// started before `started_before_ms`; returns them.
    async fn fail_running_jobs(
        &self,
        device_id: &str,
        except: Option<&str>,
        started_before_ms: i64,
        message: &str,
        now_ms: i64,
    ) -> Result<Vec<JobRecord>>;

    async fn job(&self, id: &str) -> Result<Option<JobRecord>>;

    /// Jobs newest first, of one device or all, at most `limit`.
    async fn jobs(&self, device_id: Option<&str>, limit: u32) -> Result<Vec<JobRecord>>;

    /// Devices that have queued jobs (to wake their waiting polls).
    async fn devices_with_queued_jobs(&self) -> Result<Vec<String>>;

    // ---- Accounts, sessions, API tokens, devices page (issue 4) ----

    async fn user_count(&self) -> Result<u64>;

    /// Fails with `UserExists` and changes nothing if the name is taken.
    async fn create_user(&self, user: &User) -> Result<()>;

    async fn user(&self, name: &str) -> Result<Option<User>>;

    /// Every user, by name.
    async fn users(&self) -> Result<Vec<User>>;

    /// Applies `change`; fails with `UserUnknown`. Disabling a user or setting a password
    /// ends the user's sessions in the same step.
    async fn update_user(&self, name: &str, change: &UserChange) -> Result<User>;

    async fn create_session(
        &self,
        secret_hash: Id,
        user: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<()>;

    /// The enabled user an unexpired session belongs to.
    async fn session_user(&self, secret_hash: Id, now_ms: i64) -> Result<Option<User>>;

    async fn delete_session(&self, secret_hash: Id) -> Result<()>;

    /// Stores an API token for `user` by the hash of its secret.
    async fn create_api_token(
        &self,
        secret_hash: Id,
        user: &str,
        label: &str,
    ) -> Result<ApiTokenRecord>;

    /// Every API token, newest first.
    async fn api_tokens(&self) -> Result<Vec<ApiTokenRecord>>;

    /// Revokes a token; false if there is none with that id.
    async fn revoke_api_token(&self, id: i64) -> Result<bool>;

    /// The enabled user an unrevoked API token belongs to.
    async fn api_token_user(&self, secret_hash: Id) -> Result<Option<User>>;

    /// Enrolment tokens not yet expired nor used up, newest first.
    async fn enroll_tokens(&self, now_ms: i64) -> Result<Vec<EnrollTokenRecord>>;

    /// One page of devices, by an index: cost follows the page, not the fleet.
    async fn devices_page(&self, query: &DeviceQuery) -> Result<Vec<DeviceSummary>>;

    async fn device_summary(&self, id: &str) -> Result<Option<DeviceSummary>>;

    /// Sets or clears a device's owner; false if there is no such device.
    async fn set_device_owner(&self, id: &str, owner: Option<&str>) -> Result<bool>;

    /// Whether the device's owner may use the file portal; `None` if there is no such device.
    async fn device_portal_enabled(&self, id: &str) -> Result<Option<bool>>;

    /// Turns the file portal on or off for a device; false if there is no such device.
    async fn set_device_portal(&self, id: &str, enabled: bool) -> Result<bool>;

    /// Fleet-wide figures; `protected_since` is RFC 3339 UTC.
    async fn fleet_stats(&self, protected_since: &str) -> Result<FleetStats>;

    /// Turns the reflector role on (with its port and site) or off for a device; false if
    /// there is no such device. Turning it off keeps the reflector's last figures.
    async fn set_reflector_role(
        &self,
        device_id: &str,
        role: Option<&ReflectorRole>,
        changed: &str,
        changed_by: &str,
    ) -> Result<bool>;

    /// The device's reflector role, when it is on.
    async fn reflector_role(&self, device_id: &str) -> Result<Option<ReflectorRole>>;

    /// Records a reflector heartbeat; false (nothing recorded) when the role is off.
    async fn record_reflector_beat(
        &self,
        device_id: &str,
        beat: &ReflectorBeat,
        now_ms: i64,
    ) -> Result<bool>;

    /// Every device that has or had the reflector role, by hostname.
    async fn reflectors(&self) -> Result<Vec<ReflectorRecord>>;
}

/// A device with (or once with) the reflector role, and its last heartbeat's figures.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ReflectorRecord {
    pub device_id: String,
    pub hostname: String,
    pub enabled: bool,
    pub port: u16,
    pub site: Option<String>,
    /// RFC 3339 UTC of the last role change, and who made it.
    pub changed: String,
    pub changed_by: String,
    /// `None` until the reflector's first heartbeat.
    pub address: Option<String>,
    pub subnet: Option<String>,
    pub in_flight: u32,
    pub load: f32,
    pub cache_bytes: u64,
    pub cache_limit: u64,
    pub bytes_served: u64,
    pub last_seen_ms: Option<i64>,
}

/// A layer version about to be recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewLayer {
    pub name: String,
    pub kind: LayerKind,
    pub notes: String,
    pub source_device: String,
    /// The snapshot captured (for an app layer, the one after installing).
    pub snapshot: String,
    /// App layers: the snapshot before installing.
    pub before_snapshot: Option<String>,
    pub root: Id,
    /// App layers: paths (from the root, starting with `/`) the installation removed.
    pub deletions: Vec<Vec<u8>>,
    /// Regular files and their logical bytes in `root`.
    pub files: u64,
    pub bytes: u64,
    /// RFC 3339 UTC.
    pub created: String,
    /// `cli`, `user:NAME`, …
    pub created_by: String,
}

/// A layer named by name and version.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerPin {
    pub name: String,
    pub version: u32,
}

/// What an Image Manager wants a device to have.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Assignment {
    pub base: LayerPin,
    /// In order: a later layer wins.
    pub apps: Vec<LayerPin>,
    /// Absolute paths the layers never replace or remove.
    pub do_not_override: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AssignmentRecord {
    pub device_id: String,
    pub assignment: Assignment,
    /// RFC 3339 UTC.
    pub assigned: String,
    pub assigned_by: String,
}

/// What the last successful apply put on a device, and what it replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedRecord {
    pub device_id: String,
    pub applied: ApplyJob,
    pub previous: Option<ApplyJob>,
    pub job_id: String,
    pub applied_at: String,
}

/// One recorded layer version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerRecord {
    pub seq: i64,
    pub version: u32,
    pub layer: NewLayer,
}

/// A driver set version about to be recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewDriverSet {
    pub name: String,
    pub notes: String,
    pub root: Id,
    /// Regular files and their logical bytes in `root`.
    pub files: u64,
    pub bytes: u64,
    /// RFC 3339 UTC.
    pub created: String,
    pub created_by: String,
}

/// One recorded driver set version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverSetRecord {
    pub seq: i64,
    pub version: u32,
    pub set: NewDriverSet,
}

/// A driver profile as stored: its spec is `drivers::ProfileSpec` as JSON, which the
/// catalog does not interpret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverProfileRecord {
    pub name: String,
    pub spec: String,
    pub updated: String,
    pub updated_by: String,
}

/// A device as the stale-device alert sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceProtection {
    pub device: Device,
    pub policy: PolicyVersion,
    /// RFC 3339 UTC of its newest snapshot.
    pub newest_snapshot: Option<String>,
}

/// An alert raised and not yet recovered.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OpenAlert {
    /// What it is about, e.g. `no-recent-snapshot:<device>`: one open episode per key.
    pub key: String,
    /// The event kind that raised it.
    pub kind: String,
    pub device_id: Option<String>,
    pub since_ms: i64,
    pub message: String,
}

/// A device as the control plane sees it: enrolment plus what its agent last reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceStatus {
    pub device: Device,
    pub last_seen_ms: Option<i64>,
    pub agent_version: Option<String>,
    /// RFC 3339 UTC, as the agent reported it.
    pub last_snapshot: Option<String>,
    pub inventory: Option<Inventory>,
    pub inventory_digest: Option<Id>,
}

/// One heartbeat, as stored.
#[derive(Clone, Copy, Debug)]
pub struct HeartbeatRecord<'a> {
    pub at_ms: i64,
    pub agent_version: &'a str,
    pub last_snapshot: Option<&'a str>,
    pub inventory: Option<&'a Inventory>,
}

/// A job for one agent.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct JobRecord {
    pub id: String,
    pub device_id: String,
    pub kind: JobKind,
    pub state: JobState,
    pub progress: JobProgress,
    pub message: String,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    /// `cli`, `user:NAME`, `system`.
    pub created_by: String,
}

impl JobRecord {
    /// A new queued job; its id starts with the time, so ids sort in creation order.
    pub fn queued(device_id: &str, kind: JobKind, created_by: &str, now_ms: i64) -> JobRecord {
        JobRecord {
            id: format!("j{:012x}{}", now_ms, crate::random::hex(4)),
            device_id: device_id.to_owned(),
            kind,
            state: JobState::Queued,
            progress: JobProgress::default(),
            message: String::new(),
            created_ms: now_ms,
            started_ms: None,
            finished_ms: None,
            created_by: created_by.to_owned(),
        }
    }
}

/// A plugin about to be recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPlugin {
    pub name: String,
    pub hook: Hook,
    /// BLAKE3 of the component bytes (also its file name under the plugins directory).
    pub hash: Id,
    pub size: u64,
    /// RFC 3339 UTC.
    pub added: String,
}

/// One version of one plugin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginRecord {
    pub id: i64,
    pub name: String,
    pub hook: Hook,
    pub version: u32,
    pub hash: Id,
    pub size: u64,
    pub added: String,
    pub active: bool,
}
