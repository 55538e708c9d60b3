//! Garbage collection that never stops a backup or a restore.
//!
//! There is no repository lock. Agents keep uploading, committing and restoring while the
//! collector works; correctness rests on four rules the catalog enforces:
//!
//! 1. **Holds.** Whatever `missing` answers as present, and whatever a device uploads, is
//!    held for that device in the same write transaction, until the device commits a
//!    snapshot (the commit releases its holds in the transaction that records the snapshot)
//!    or the hold expires (an abandoned sync). A held tree keeps everything below it.
//! 2. **Roots.** The collector marks everything reachable from every retained snapshot,
//!    every layer, every driver set and every live hold into a mark set kept in the catalog (not in memory).
//! 3. **Fence.** Every deleting step runs in one write transaction that first checks that
//!    no snapshot, layer or hold newer than what was marked exists; if one does, it changes
//!    nothing, the collector marks from the new roots and retries. So nothing a committed
//!    snapshot or a hold needs is ever deleted, however the steps interleave.
//! 4. **Assertions go first.** "This tree's closure is complete" and "this whole file is
//!    stored" are dropped for everything unmarked before any blob is deleted, so a later
//!    commit re-verifies instead of trusting a closure the collector is taking apart, and
//!    `missing` stops answering such trees as present.
//!
//! Only one collector works at a time, under a lease that expires unless renewed: a
//! collector that dies leaves nothing to clear by hand. Pack files that lose all their
//! blobs, or that were rewritten because they were mostly garbage, are deleted only after a
//! grace period, so a restore that located a blob just before it moved still reads it.
//!
//! Memory: one page of ids, one pack being rewritten, and the tree walk's stack (depth ×
//! width of the widest directories), whatever the repository's size.

use std::sync::Arc;
use std::time::Instant;

use morgana_core::Id;
use morgana_core::pack::{BlobKind, PackBuilder};
use morgana_core::tree::{Content, Tree, TreeError};
use serde::Serialize;
use tracing::{info, warn};

use crate::catalog::{Catalog, CatalogError, Fenced, GcHorizon, PackUsage};
use crate::clock;
use crate::events::{self, NewEvent, Severity};
use crate::retention::{self, Dated, RetentionOverride};
use crate::store::{PackStore, PackStoreError, TreeLoadError, with_codec};

const PAGE: u32 = 1000;
/// Ids marked per catalog call.
const MARK_BATCH: usize = 2000;
const HOUR_MS: i64 = 3_600_000;

#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Report what would be pruned and freed; delete nothing.
    pub dry_run: bool,
    /// Over each device's policy retention.
    pub retention_override: RetentionOverride,
    /// The time taken as now for hold expiry and the pack grace period (wall clock when
    /// `None`). Retention itself depends only on the snapshots' times.
    pub now_ms: Option<i64>,
    /// A hold older than this is an abandoned sync and keeps nothing.
    pub hold_ttl_ms: i64,
    /// Retired pack files are deleted this long after they were retired.
    pub pack_grace_ms: i64,
    /// Packs with less than this share of their bytes still referenced are rewritten.
    pub repack_below: f64,
    /// The lease's lifetime; renewed at every page of work.
    pub lease_ttl_ms: i64,
}

impl GcOptions {
    fn now(&self) -> i64 {
        self.now_ms.unwrap_or_else(clock::now_ms)
    }
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            dry_run: false,
            retention_override: RetentionOverride::default(),
            now_ms: None,
            hold_ttl_ms: 7 * 24 * HOUR_MS,
            pack_grace_ms: HOUR_MS,
            repack_below: 0.5,
            lease_ttl_ms: 10 * 60_000,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct GcReport {
    pub dry_run: bool,
    pub snapshots_kept: u64,
    pub snapshots_pruned: u64,
    pub trees_marked: u64,
    pub blobs_marked: u64,
    /// Unreferenced blobs deleted from the index (or found, in a dry run).
    pub blobs_freed: u64,
    pub bytes_freed: u64,
    pub packs_rewritten: u64,
    pub packs_retired: u64,
    /// Pack files deleted after their grace period.
    pub pack_files_deleted: u64,
    pub pack_bytes_deleted: u64,
    /// Times a fenced step found new snapshots or holds and marked again.
    pub fence_retries: u64,
    pub duration_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] PackStoreError),
    #[error(
        "another garbage collection ({holder}) holds the lease until {until}; wait for it to \
         finish, or for the lease to expire if it died"
    )]
    Busy { holder: String, until: String },
    #[error("the lease was lost to {holder} mid-run; this run stopped, nothing is inconsistent")]
    LeaseLost { holder: String },
    #[error("tree {id} cannot be read while marking: {source}; run `morgana check`")]
    BadTree { id: Id, source: TreeError },
    #[error("tree {id} is referenced but not stored; run `morgana check`")]
    MissingTree { id: Id },
    #[error("a collection task stopped unexpectedly: {0}")]
    Task(#[from] tokio::task::JoinError),
}

struct Collector<'a> {
    catalog: &'a Arc<dyn Catalog>,
    store: &'a Arc<PackStore>,
    opts: &'a GcOptions,
    holder: String,
    /// Roots marked so far.
    seen: GcHorizon,
    hold_cutoff_ms: i64,
    /// In a dry run: the snapshots retention would prune, left out of the marking so the
    /// report says what a real run would free.
    would_prune: std::collections::HashSet<String>,
    report: GcReport,
}

/// Runs one collection: retention, mark, sweep, repack, and deletion of pack files past
/// their grace period.
pub async fn run(
    catalog: &Arc<dyn Catalog>,
    store: &Arc<PackStore>,
    opts: &GcOptions,
) -> Result<GcReport, GcError> {
    let started = Instant::now();
    let holder = format!(
        "pid {} on {}, started {}",
        std::process::id(),
        hostname(),
        clock::rfc3339_ms(clock::now_ms())
    );
    let mut c = Collector {
        catalog,
        store,
        opts,
        holder,
        seen: GcHorizon::default(),
        hold_cutoff_ms: opts.now() - opts.hold_ttl_ms,
        would_prune: Default::default(),
        report: GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        },
    };
    c.renew_lease().await?;
    let result = c.collect().await;
    if let Err(e) = catalog.gc_release_lease(&c.holder).await {
        warn!(error = %e, "releasing the collector's lease failed; it expires by itself");
    }
    if let Err(e) = result {
        events::record(
            catalog.as_ref(),
            NewEvent::system(
                "gc.failed",
                Severity::Error,
                format!("garbage collection stopped: {e}"),
            ),
        )
        .await;
        return Err(e);
    }
    c.report.duration_ms = started.elapsed().as_millis() as u64;
    info!(report = ?c.report, "garbage collection finished");
    if !opts.dry_run {
        let r = &c.report;
        events::record(
            catalog.as_ref(),
            NewEvent::system(
                "gc.finished",
                Severity::Info,
                format!(
                    "garbage collection pruned {} snapshots, freed {} blobs ({} bytes), \
                     rewrote {} packs and deleted {} pack files ({} bytes) in {} ms",
                    r.snapshots_pruned,
                    r.blobs_freed,
                    r.bytes_freed,
                    r.packs_rewritten,
                    r.pack_files_deleted,
                    r.pack_bytes_deleted,
                    r.duration_ms
                ),
            ),
        )
        .await;
    }
    Ok(c.report)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "this host".into())
}

impl Collector<'_> {
    async fn collect(&mut self) -> Result<(), GcError> {
        self.prune().await?;
        self.catalog.gc_reset(self.hold_cutoff_ms).await?;
        let target = self.catalog.gc_horizon().await?;
        self.mark_up_to(target).await?;
        if self.opts.dry_run {
            return self.count_garbage().await;
        }
        loop {
            self.renew_lease().await?;
            match self.catalog.gc_drop_unmarked_assertions(self.seen).await? {
                Fenced::Done(()) => break,
                Fenced::NewRoots(now) => self.catch_up(now).await?,
            }
        }
        self.sweep().await?;
        self.repack().await?;
        self.delete_dead_packs().await
    }

    async fn renew_lease(&self) -> Result<(), GcError> {
        let now = clock::now_ms();
        match self
            .catalog
            .gc_take_lease(&self.holder, now, self.opts.lease_ttl_ms)
            .await?
        {
            None => Ok(()),
            Some((holder, until)) if self.seen == GcHorizon::default() => Err(GcError::Busy {
                holder,
                until: clock::rfc3339_ms(until),
            }),
            Some((holder, _)) => Err(GcError::LeaseLost { holder }),
        }
    }

    /// Applies each device's policy retention (with the overrides) to its snapshots.
    async fn prune(&mut self) -> Result<(), GcError> {
        for device in self.catalog.snapshot_devices().await? {
            let policy = self.catalog.device_policy(&device).await?;
            let rules = self.opts.retention_override.apply(policy.spec.retention);
            let snapshots = self.catalog.device_snapshots(&device).await?;
            let dated: Vec<Dated> = snapshots
                .iter()
                .map(|s| Dated {
                    id: s.id.clone(),
                    created_ms: clock::parse_rfc3339_ms(&s.created).unwrap_or(i64::MAX),
                    pinned: s.pinned.is_some(),
                })
                .collect();
            let keep = retention::keep(&dated, &rules);
            let drop: Vec<String> = dated
                .into_iter()
                .filter(|s| !keep.contains(&s.id))
                .map(|s| s.id)
                .collect();
            self.report.snapshots_kept += keep.len() as u64;
            if self.opts.dry_run {
                self.report.snapshots_pruned += drop.len() as u64;
                self.would_prune.extend(drop);
            } else if !drop.is_empty() {
                self.report.snapshots_pruned += self.catalog.delete_snapshots(&drop).await?;
                info!(device, policy = %policy.name, version = policy.version, ?rules, pruned = drop.len(), "retention applied");
            }
        }
        Ok(())
    }

    /// Marks from every snapshot and live hold up to `target`.
    async fn mark_up_to(&mut self, target: GcHorizon) -> Result<(), GcError> {
        while self.seen.snapshot_seq < target.snapshot_seq {
            let page = self
                .catalog
                .snapshot_roots_page(self.seen.snapshot_seq, PAGE)
                .await?;
            let Some(&(last, _, _)) = page.last() else {
                break;
            };
            for (seq, id, root) in page {
                if seq > target.snapshot_seq {
                    break;
                }
                if !self.would_prune.contains(&id) {
                    self.mark_trees(vec![root]).await?;
                }
                self.seen.snapshot_seq = seq;
            }
            if last >= target.snapshot_seq {
                break;
            }
            self.renew_lease().await?;
        }
        self.seen.snapshot_seq = self.seen.snapshot_seq.max(target.snapshot_seq);
        while self.seen.hold_seq < target.hold_seq {
            let page = self
                .catalog
                .holds_page(self.seen.hold_seq, self.hold_cutoff_ms, PAGE)
                .await?;
            let Some(&(last, _)) = page.last() else { break };
            let ids: Vec<Id> = page
                .iter()
                .filter(|(seq, _)| *seq <= target.hold_seq)
                .map(|(_, id)| *id)
                .collect();
            self.mark_held(&ids).await?;
            self.seen.hold_seq = last.min(target.hold_seq);
            if last >= target.hold_seq {
                break;
            }
            self.renew_lease().await?;
        }
        self.seen.hold_seq = self.seen.hold_seq.max(target.hold_seq);
        // Layers are roots for as long as they exist; there are few, one page usually.
        while self.seen.layer_seq < target.layer_seq {
            let page = self
                .catalog
                .layer_roots_page(self.seen.layer_seq, PAGE)
                .await?;
            let Some(&(last, _)) = page.last() else { break };
            let roots: Vec<Id> = page
                .iter()
                .filter(|(seq, _)| *seq <= target.layer_seq)
                .map(|(_, root)| *root)
                .collect();
            self.mark_trees(roots).await?;
            self.seen.layer_seq = last.min(target.layer_seq);
            if last >= target.layer_seq {
                break;
            }
            self.renew_lease().await?;
        }
        self.seen.layer_seq = self.seen.layer_seq.max(target.layer_seq);
        // Driver sets likewise, for as long as they exist.
        while self.seen.driver_seq < target.driver_seq {
            let page = self
                .catalog
                .driver_set_roots_page(self.seen.driver_seq, PAGE)
                .await?;
            let Some(&(last, _)) = page.last() else { break };
            let roots: Vec<Id> = page
                .iter()
                .filter(|(seq, _)| *seq <= target.driver_seq)
                .map(|(_, root)| *root)
                .collect();
            self.mark_trees(roots).await?;
            self.seen.driver_seq = last.min(target.driver_seq);
            if last >= target.driver_seq {
                break;
            }
            self.renew_lease().await?;
        }
        self.seen.driver_seq = self.seen.driver_seq.max(target.driver_seq);
        Ok(())
    }

    async fn catch_up(&mut self, now: GcHorizon) -> Result<(), GcError> {
        self.report.fence_retries += 1;
        self.mark_up_to(now).await
    }

    /// Held ids of any kind: chunks and whole files are marked as they are, trees with
    /// everything below them.
    async fn mark_held(&mut self, ids: &[Id]) -> Result<(), GcError> {
        let fresh = self.catalog.gc_mark(ids).await?;
        self.report.blobs_marked += fresh.len() as u64;
        let locations = self.catalog.locate_blobs(&fresh).await?;
        let trees: Vec<Id> = fresh
            .iter()
            .zip(locations)
            .filter(|(_, loc)| loc.as_ref().is_some_and(|l| l.entry.kind == BlobKind::Tree))
            .map(|(id, _)| *id)
            .collect();
        // Already marked above; walk below them.
        for tree in trees {
            self.walk_below(tree).await?;
        }
        Ok(())
    }

    /// Marks trees not marked yet, and everything below them.
    async fn mark_trees(&mut self, roots: Vec<Id>) -> Result<(), GcError> {
        for tree in self.catalog.gc_mark(&roots).await? {
            self.report.blobs_marked += 1;
            self.walk_below(tree).await?;
        }
        Ok(())
    }

    /// Depth first with an explicit stack of trees whose own mark is set but whose
    /// entries are not yet marked: a subtree already marked was walked before (in this
    /// run), so shared directories are walked once.
    async fn walk_below(&mut self, tree: Id) -> Result<(), GcError> {
        let mut stack = vec![tree];
        while let Some(id) = stack.pop() {
            self.report.trees_marked += 1;
            let tree = self.read_tree(id).await?;
            let mut subtrees = Vec::new();
            let mut leaves = Vec::new();
            for entry in &tree.entries {
                match &entry.content {
                    Content::Tree(t) => subtrees.push(*t),
                    Content::Chunks { file, chunks } => {
                        // Only multi-chunk files are recorded by whole-file id.
                        if chunks.len() > 1 {
                            leaves.push(*file);
                        }
                        leaves.extend_from_slice(chunks);
                    }
                    _ => {}
                }
                if leaves.len() >= MARK_BATCH {
                    self.report.blobs_marked += self.catalog.gc_mark(&leaves).await?.len() as u64;
                    leaves.clear();
                }
            }
            self.report.blobs_marked += self.catalog.gc_mark(&leaves).await?.len() as u64;
            let fresh = self.catalog.gc_mark(&subtrees).await?;
            self.report.blobs_marked += fresh.len() as u64;
            stack.extend(fresh);
        }
        Ok(())
    }

    async fn read_tree(&self, id: Id) -> Result<Tree, GcError> {
        crate::store::load_tree(self.catalog.as_ref(), id)
            .await
            .map_err(|e| match e {
                TreeLoadError::Missing { id } => GcError::MissingTree { id },
                TreeLoadError::Bad { id, source } => GcError::BadTree { id, source },
                TreeLoadError::Catalog(e) => GcError::Catalog(e),
                TreeLoadError::Store(e) => GcError::Store(e),
                TreeLoadError::Task(e) => GcError::Task(e),
            })
    }

    async fn count_garbage(&mut self) -> Result<(), GcError> {
        let mut after = None;
        loop {
            let page = self.catalog.gc_unmarked_blobs_page(after, PAGE).await?;
            let Some(&(last, _)) = page.last() else { break };
            after = Some(last);
            self.report.blobs_freed += page.len() as u64;
            self.report.bytes_freed += page.iter().map(|(_, len)| u64::from(*len)).sum::<u64>();
        }
        Ok(())
    }

    /// Deletes unmarked blobs from the index, a page at a time, each page fenced.
    async fn sweep(&mut self) -> Result<(), GcError> {
        let mut after = None;
        loop {
            self.renew_lease().await?;
            let page = self.catalog.gc_unmarked_blobs_page(after, PAGE).await?;
            let Some(&(last, _)) = page.last() else { break };
            after = Some(last);
            let ids: Vec<Id> = page.iter().map(|(id, _)| *id).collect();
            loop {
                match self.catalog.gc_delete_unmarked(&ids, self.seen).await? {
                    Fenced::Done((blobs, bytes)) => {
                        self.report.blobs_freed += blobs;
                        self.report.bytes_freed += bytes;
                        break;
                    }
                    Fenced::NewRoots(now) => self.catch_up(now).await?,
                }
            }
        }
        Ok(())
    }

    /// Retires packs nothing points into and rewrites packs that are mostly garbage.
    async fn repack(&mut self) -> Result<(), GcError> {
        let mut after = None;
        loop {
            self.renew_lease().await?;
            let page = self.catalog.pack_usage_page(after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.pack.id);
            for usage in page {
                if usage.live_blobs == 0 {
                    if self
                        .catalog
                        .retire_pack(usage.pack.id, self.opts.now())
                        .await?
                    {
                        self.report.packs_retired += 1;
                    }
                } else if (usage.live_bytes as f64)
                    < usage.pack.size as f64 * self.opts.repack_below
                {
                    self.rewrite(usage).await?;
                }
            }
        }
        Ok(())
    }

    /// Copies a pack's referenced blobs, verified, into a new pack and points the index at
    /// it; the old pack is retired once nothing points into it.
    async fn rewrite(&mut self, usage: PackUsage) -> Result<(), GcError> {
        let old = usage.pack;
        let mut entries = Vec::new();
        let mut after = None;
        loop {
            let page = self.catalog.pack_blobs_page(old.id, after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.offset);
            entries.extend(page);
        }
        let store = self.store.clone();
        let old_path = PackStore::pack_path(&old.volume, old.id);
        let (record, moved) = tokio::task::spawn_blocking(move || -> Result<_, GcError> {
            let file = std::fs::File::open(&old_path).map_err(|source| PackStoreError::Read {
                path: old_path.clone(),
                source,
            })?;
            let mut builder = PackBuilder::default();
            let mut stored = Vec::new();
            for e in &entries {
                stored.clear();
                crate::store::read_range_into(
                    &file,
                    &old_path,
                    e.offset,
                    e.stored_len,
                    &mut stored,
                )?;
                // Damage must not be copied into a pack that looks fresh.
                with_codec(|codec| codec.open(e.id, e.compression, &stored, e.raw_len)).map_err(
                    |source| PackStoreError::Damaged {
                        id: e.id,
                        path: old_path.clone(),
                        source: Box::new(source),
                    },
                )?;
                builder.add_stored(e.id, e.kind, e.compression, &stored, e.raw_len);
            }
            Ok(store.store(builder.finish())?)
        })
        .await??;
        self.catalog
            .gc_move_blobs(old.id, &record, &moved, self.opts.now())
            .await?;
        self.report.packs_rewritten += 1;
        info!(old = %old.id, new = %record.id, blobs = moved.len(), "pack rewritten");
        Ok(())
    }

    async fn delete_dead_packs(&mut self) -> Result<(), GcError> {
        let before = self.opts.now() - self.opts.pack_grace_ms;
        loop {
            let page = self.catalog.dead_packs_before(before, PAGE).await?;
            if page.is_empty() {
                break;
            }
            for (pack, volume) in page {
                let path = PackStore::pack_path(&volume, pack);
                let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        self.report.pack_files_deleted += 1;
                        self.report.pack_bytes_deleted += size;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(PackStoreError::Delete { path, source }.into()),
                }
                self.catalog.forget_dead_pack(pack).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::catalog::{Device, SqliteCatalog};
    use crate::policy::PolicySpec;
    use crate::retention::Retention;
    use morgana_core::pack::Codec;
    use morgana_core::tree::{Entry, Kind};
    use morgana_core::wire::{SnapshotInfo, SnapshotStats};

    pub(crate) struct Repo {
        _dir: tempfile::TempDir,
        pub(crate) catalog: Arc<dyn Catalog>,
        pub(crate) store: Arc<PackStore>,
    }

    pub(crate) async fn repo() -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteCatalog::open(&dir.path().join("catalog.sqlite"), true)
            .await
            .unwrap();
        sqlite
            .create_token(Id::of(b"t"), 2, i64::MAX)
            .await
            .unwrap();
        for (id, fp) in [("d1", b"fp1"), ("d2", b"fp2")] {
            sqlite
                .enroll_device(
                    Id::of(b"t"),
                    0,
                    &Device {
                        id: id.into(),
                        hostname: id.into(),
                        cert_fingerprint: Id::of(fp),
                        created: clock::rfc3339_ms(0),
                        revoked: false,
                    },
                )
                .await
                .unwrap();
        }
        let store = Arc::new(PackStore::open(&[dir.path().join("volume")]).unwrap());
        Repo {
            _dir: dir,
            catalog: Arc::new(sqlite),
            store,
        }
    }

    pub(crate) fn chunk(tag: &str) -> (Id, Vec<u8>) {
        let data = morgana_core::testdata::noise(
            70_000,
            tag.len() as u64 * 7919 + tag.as_bytes()[0] as u64,
        );
        (Id::of(&data), data)
    }

    fn tree(files: &[(&str, Id)]) -> (Id, Vec<u8>) {
        let mut t = Tree {
            entries: files
                .iter()
                .map(|(name, c)| Entry {
                    name: name.as_bytes().to_vec(),
                    kind: Some(Kind::File),
                    mode: 0o644,
                    size: 70_000,
                    content: Content::Chunks {
                        file: Id::of(name.as_bytes()),
                        chunks: vec![*c],
                    },
                    ..Default::default()
                })
                .collect(),
        };
        t.sort();
        let bytes = t.encode();
        (Id::of(&bytes), bytes)
    }

    pub(crate) async fn store_pack(r: &Repo, blobs: &[(BlobKind, &(Id, Vec<u8>))]) -> Id {
        let mut codec = Codec::new(3);
        let mut builder = PackBuilder::default();
        let mut stored = Vec::new();
        for (kind, (id, raw)) in blobs {
            let compression = codec.compress_into(raw, &mut stored);
            builder.add_stored(*id, *kind, compression, &stored, raw.len() as u32);
        }
        let (record, entries) = r.store.store(builder.finish()).unwrap();
        r.catalog.insert_pack(&record, &entries).await.unwrap();
        record.id
    }

    async fn snapshot(r: &Repo, id: &str, device: &str, root: Id, created: &str) {
        r.catalog
            .insert_snapshot(&SnapshotInfo {
                id: id.into(),
                device_id: device.into(),
                root,
                created: created.into(),
                reason: "test".into(),
                stats: SnapshotStats::default(),
                pinned: None,
            })
            .await
            .unwrap();
    }

    fn only_newest() -> GcOptions {
        GcOptions {
            retention_override: RetentionOverride::all(Retention {
                hourly: 0,
                daily: 1,
                weekly: 0,
                monthly: 0,
            }),
            pack_grace_ms: 0,
            ..GcOptions::default()
        }
    }

    #[tokio::test]
    async fn frees_what_nothing_retained_or_held_reaches_and_keeps_the_rest_readable() {
        let r = repo().await;
        let [a, b, c, d, e] = ["a", "bb", "ccc", "dddd", "eeeee"].map(chunk);
        let old = tree(&[("a", a.0), ("b", b.0)]);
        let new = tree(&[("a", a.0), ("c", c.0)]);
        let pack1 = store_pack(
            &r,
            &[
                (BlobKind::Chunk, &a),
                (BlobKind::Chunk, &b),
                (BlobKind::Chunk, &e),
                (BlobKind::Tree, &old),
            ],
        )
        .await;
        store_pack(
            &r,
            &[
                (BlobKind::Chunk, &c),
                (BlobKind::Chunk, &d),
                (BlobKind::Tree, &new),
            ],
        )
        .await;
        snapshot(&r, "s-old", "d1", old.0, "2026-10-01T00:00:00.000Z").await;
        snapshot(&r, "s-new", "d1", new.0, "2026-11-20T00:00:00.000Z").await;
        // d2's sync in progress was told d exists; nothing committed references it yet.
        assert!(
            r.catalog
                .missing_objects_held("d2", &[d.0], clock::now_ms())
                .await
                .unwrap()
                .is_empty()
        );

        let dry = run(
            &r.catalog,
            &r.store,
            &GcOptions {
                dry_run: true,
                ..only_newest()
            },
        )
        .await
        .unwrap();
        assert_eq!((dry.snapshots_pruned, dry.blobs_freed), (1, 3));
        assert_eq!(r.catalog.device_snapshots("d1").await.unwrap().len(), 2);

        let report = run(&r.catalog, &r.store, &only_newest()).await.unwrap();
        assert_eq!(report.snapshots_pruned, 1);
        // b, e and the old tree; d is held, a is shared with the new snapshot.
        assert_eq!(report.blobs_freed, 3);
        assert_eq!(report.packs_rewritten, 1);
        assert_eq!(report.pack_files_deleted, 1);
        assert!(!PackStore::pack_path(&r.store.volumes()[0], pack1).exists());

        let gone = r
            .catalog
            .missing_blobs(&[a.0, b.0, c.0, d.0, e.0, old.0, new.0])
            .await
            .unwrap();
        assert_eq!(gone, vec![b.0, e.0, old.0]);
        // a moved to a new pack and still reads back verified.
        let loc = r.catalog.locate_blobs(&[a.0]).await.unwrap()[0]
            .clone()
            .unwrap();
        assert_ne!(loc.pack, pack1);
        assert_eq!(
            with_codec(|codec| PackStore::read_blob(&loc, codec)).unwrap(),
            a.1
        );
        // The kept snapshot's closure is whole.
        assert!(matches!(
            crate::snapshot::verify_closure(&r.catalog, new.0)
                .await
                .unwrap(),
            crate::snapshot::Closure::Complete
        ));

        // Once d2 commits without d, its hold is released and the next run frees d.
        snapshot(&r, "s-d2", "d2", new.0, "2026-11-21T00:00:00.000Z").await;
        let again = run(&r.catalog, &r.store, &only_newest()).await.unwrap();
        assert_eq!((again.snapshots_pruned, again.blobs_freed), (0, 1));
        assert_eq!(r.catalog.missing_blobs(&[d.0]).await.unwrap(), vec![d.0]);
    }

    #[tokio::test]
    async fn a_pinned_snapshot_outlives_retention_until_unpinned() {
        let r = repo().await;
        let b = chunk("bb");
        let old = tree(&[("b", b.0)]);
        let new = tree(&[]);
        store_pack(
            &r,
            &[
                (BlobKind::Chunk, &b),
                (BlobKind::Tree, &old),
                (BlobKind::Tree, &new),
            ],
        )
        .await;
        snapshot(&r, "s-old", "d1", old.0, "2026-10-01T00:00:00.000Z").await;
        snapshot(&r, "s-new", "d1", new.0, "2026-11-20T00:00:00.000Z").await;
        assert!(
            r.catalog
                .pin_snapshot("s-old", Some("legal-hold"))
                .await
                .unwrap()
        );
        let report = run(&r.catalog, &r.store, &only_newest()).await.unwrap();
        assert_eq!((report.snapshots_pruned, report.blobs_freed), (0, 0));
        assert!(r.catalog.pin_snapshot("s-old", None).await.unwrap());
        let report = run(&r.catalog, &r.store, &only_newest()).await.unwrap();
        assert_eq!((report.snapshots_pruned, report.blobs_freed), (1, 2));
    }

    #[tokio::test]
    async fn a_second_collector_is_refused_while_the_lease_is_live() {
        let r = repo().await;
        assert!(
            r.catalog
                .gc_take_lease("someone else", clock::now_ms(), 60_000)
                .await
                .unwrap()
                .is_none()
        );
        let err = run(&r.catalog, &r.store, &GcOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, GcError::Busy { .. }), "{err}");
        assert!(err.to_string().contains("someone else"));
        // An expired lease is taken over.
        r.catalog.gc_take_lease("someone else", 0, 1).await.unwrap();
        run(&r.catalog, &r.store, &GcOptions::default())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn deleting_steps_change_nothing_once_new_roots_appear() {
        let r = repo().await;
        let e = chunk("eeeee");
        store_pack(&r, &[(BlobKind::Chunk, &e)]).await;
        r.catalog.gc_reset(0).await.unwrap();
        let seen = r.catalog.gc_horizon().await.unwrap();
        // A device is told e exists after the collector looked.
        r.catalog
            .missing_objects_held("d1", &[e.0], clock::now_ms())
            .await
            .unwrap();
        let now = r.catalog.gc_horizon().await.unwrap();
        assert_eq!(
            r.catalog.gc_delete_unmarked(&[e.0], seen).await.unwrap(),
            Fenced::NewRoots(now)
        );
        assert_eq!(
            r.catalog.gc_drop_unmarked_assertions(seen).await.unwrap(),
            Fenced::NewRoots(now)
        );
        assert!(r.catalog.missing_blobs(&[e.0]).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn each_device_keeps_what_its_policy_says_unless_overridden() {
        let r = repo().await;
        let t = tree(&[]);
        store_pack(&r, &[(BlobKind::Tree, &t)]).await;
        for device in ["d1", "d2"] {
            for day in 1..=4 {
                let created = format!("2026-10-{day:02}T12:00:00.000Z");
                snapshot(&r, &format!("{device}-{day}"), device, t.0, &created).await;
            }
        }
        let daily = |n| PolicySpec {
            retention: Retention {
                hourly: 0,
                daily: n,
                weekly: 0,
                monthly: 0,
            },
            ..PolicySpec::default()
        };
        r.catalog
            .save_policy("one-a-day", &daily(3), "t", "cli")
            .await
            .unwrap();
        r.catalog
            .save_policy("newest", &daily(1), "t", "cli")
            .await
            .unwrap();
        r.catalog
            .assign_policy("one-a-day", &["d1".into()])
            .await
            .unwrap();
        r.catalog
            .assign_policy("newest", &["d2".into()])
            .await
            .unwrap();
        let ids = |device: &'static str| {
            let catalog = r.catalog.clone();
            async move {
                let mut v: Vec<String> = catalog
                    .device_snapshots(device)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|s| s.id)
                    .collect();
                v.sort();
                v
            }
        };
        let overridden = GcOptions {
            retention_override: RetentionOverride {
                daily: Some(2),
                ..Default::default()
            },
            ..GcOptions::default()
        };
        // An override of one tier applies to every device, over both policies.
        let dry = run(
            &r.catalog,
            &r.store,
            &GcOptions {
                dry_run: true,
                ..overridden
            },
        )
        .await
        .unwrap();
        assert_eq!(dry.snapshots_pruned, 4);
        let report = run(&r.catalog, &r.store, &GcOptions::default())
            .await
            .unwrap();
        assert_eq!((report.snapshots_kept, report.snapshots_pruned), (4, 4));
        assert_eq!(ids("d1").await, ["d1-2", "d1-3", "d1-4"]);
        assert_eq!(ids("d2").await, ["d2-4"]);
    }
}
