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
use morgana_core::pack::PackEntry;
use morgana_core::plugin::Hook;
use morgana_core::wire::SnapshotInfo;

use crate::events::{ChainCheck, Event, EventFilter, NewEvent};

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
    async fn verify_events(&self) -> Result<ChainCheck>;

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

    /// Fleet-wide figures; `protected_since` is RFC 3339 UTC.
    async fn fleet_stats(&self, protected_since: &str) -> Result<FleetStats>;
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
