//! Layers: what an Image Manager captures from reference machines.
//!
//! A **base layer** is a reference machine's snapshot filtered down to what the layer rules
//! (the `layer-rules` plugin, or the built-in Linux rules) assign to the layer, leaving out
//! the user area, machine identity and the unprotected area. An **app layer** is the
//! difference between a snapshot before and one after installing applications, filtered the
//! same way: a tree of the added and changed files, plus the paths removed.
//!
//! Both are trees in the blob store like snapshots, so they cost only the directories that
//! filtering changed: every untouched subtree keeps its id and its chunks are shared. Their
//! roots are garbage-collection roots (see `gc.rs`). While a capture writes new trees it
//! holds them, and the source snapshots' roots, under a holder of its own, so a concurrent
//! collection cannot take them before the layer is recorded.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use morgana_core::Id;
use morgana_core::pack::{BlobKind, PackBuilder};
use morgana_core::plugin::PluginError;
use morgana_core::plugin::types::{DispositionKind, FileEntry, FileKind, LayerContext, LayerKind};
use morgana_core::policy::{Area, PolicyError, Standing};
use morgana_core::tree::{Content, Entry, Kind, Tree};
use morgana_core::wire::SnapshotInfo;

use crate::catalog::{Catalog, CatalogError, Device, LayerRecord, NewLayer};
use crate::events::{self, NewEvent, Severity};
use crate::hooks::Hooks;
use crate::store::{PackStore, PackStoreError, TreeLoadError, load_tree, with_codec};

/// Entries classified per hook call.
const CLASSIFY_BATCH: usize = 1024;
/// Raw bytes of new trees gathered before they are packed and stored.
const FLUSH_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] PackStoreError),
    #[error(transparent)]
    Tree(#[from] TreeLoadError),
    #[error("the layer rules could not run: {0}")]
    Rules(#[from] PluginError),
    #[error("the user area rules are not usable: {0}")]
    Area(#[from] PolicyError),
    #[error("storing the layer's trees was interrupted: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(
        "snapshots {before} and {after} do not differ in what the layer rules assign to a \
         layer: install the applications on the reference machine and sync it, then capture \
         again"
    )]
    NoChanges { before: String, after: String },
    #[error(
        "layer name {0:?} is not usable: 1 to 64 letters, digits, `-`, `_` or `.`, e.g. \
         debian-12-base"
    )]
    BadName(String),
    #[error(
        "there is no device {0}: enrol the reference machine with `morgana-agent enroll`; the \
         devices page lists the enrolled ones"
    )]
    NoDevice(String),
    #[error(
        "device {id} ({hostname}) is not a reference machine: mark it first (its device page, \
         the Images page, or `morgana reference mark {id}`); layers are captured from \
         reference machines only"
    )]
    NotReference { id: String, hostname: String },
    #[error(
        "there is no snapshot {0}: the device page lists its snapshots (or `morgana-agent \
         snapshots`)"
    )]
    NoSnapshot(String),
    #[error("snapshot {snapshot} belongs to another device than {device}")]
    ForeignSnapshot { snapshot: String, device: String },
    #[error(
        "device {0} has no snapshot yet: sync it (`morgana-agent sync`, or Sync now on its \
         page), then capture"
    )]
    NoSnapshots(String),
    #[error(
        "the snapshots before and after are the same ({0}): sync the reference machine after \
         installing the applications, then capture again"
    )]
    SameSnapshot(String),
}

/// Checks a layer name (`-`, `_`, `.`, letters and digits, at most 64).
pub fn check_name(name: &str) -> Result<&str, LayerError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        return Err(LayerError::BadName(name.to_owned()));
    }
    Ok(name)
}

/// The device `id`, which must be a reference machine.
pub async fn reference_machine(catalog: &dyn Catalog, id: &str) -> Result<Device, LayerError> {
    let Some(device) = catalog.device_status(id).await?.map(|s| s.device) else {
        return Err(LayerError::NoDevice(id.to_owned()));
    };
    let references = catalog.reference_devices().await?;
    if !references.iter().any(|d| d.id == device.id) {
        return Err(LayerError::NotReference {
            id: device.id,
            hostname: device.hostname,
        });
    }
    Ok(device)
}

/// The device's snapshot `id`, or its newest with `None`.
pub async fn device_snapshot(
    catalog: &dyn Catalog,
    device: &Device,
    id: Option<&str>,
) -> Result<SnapshotInfo, LayerError> {
    match id {
        Some(id) => match catalog.snapshot(id).await? {
            Some(s) if s.device_id == device.id => Ok(s),
            Some(_) => Err(LayerError::ForeignSnapshot {
                snapshot: id.to_owned(),
                device: device.id.clone(),
            }),
            None => Err(LayerError::NoSnapshot(id.to_owned())),
        },
        None => catalog
            .device_snapshots(&device.id)
            .await?
            .pop()
            .ok_or_else(|| LayerError::NoSnapshots(device.id.clone())),
    }
}

/// Marks (or unmarks) device `id` as a reference machine, with an audit event.
pub async fn set_reference(
    catalog: &dyn Catalog,
    id: &str,
    on: bool,
    actor: &str,
) -> Result<(), LayerError> {
    if !catalog.set_reference(id, on).await? {
        return Err(LayerError::NoDevice(id.to_owned()));
    }
    let verb = if on { "marked" } else { "unmarked" };
    events::record(
        catalog,
        NewEvent::system(
            if on {
                "device.reference-marked"
            } else {
                "device.reference-unmarked"
            },
            Severity::Info,
            format!("device {id} {verb} as a reference machine"),
        )
        .for_device(id)
        .by(actor),
    )
    .await;
    Ok(())
}

/// What capturing needs from the appliance.
pub struct Env<'a> {
    pub catalog: &'a Arc<dyn Catalog>,
    pub store: &'a Arc<PackStore>,
    pub hooks: &'a Hooks,
}

/// Who asked and why, recorded with the layer.
pub struct Request<'a> {
    pub name: &'a str,
    pub notes: &'a str,
    pub actor: &'a str,
    pub device: &'a Device,
}

/// Captures a base layer from `snapshot`.
pub async fn capture_base(
    env: &Env<'_>,
    req: &Request<'_>,
    snapshot: &SnapshotInfo,
) -> Result<LayerRecord, LayerError> {
    let mut capture = Capture::start(env, req, LayerKind::Base, &[snapshot.root]).await?;
    let result = capture
        .filter_tree(snapshot.root, Vec::new(), Standings::default())
        .await;
    let layer = |root, c: &Capture| NewLayer {
        name: req.name.to_owned(),
        kind: LayerKind::Base,
        notes: req.notes.to_owned(),
        source_device: req.device.id.clone(),
        snapshot: snapshot.id.clone(),
        before_snapshot: None,
        root,
        deletions: Vec::new(),
        files: c.files,
        bytes: c.bytes,
        created: crate::clock::rfc3339_ms(crate::clock::now_ms()),
        created_by: req.actor.to_owned(),
    };
    let layer = result.map(|root| layer(root, &capture));
    capture.finish(layer).await
}

/// Captures an app layer: what changed between `before` and `after`.
pub async fn capture_app(
    env: &Env<'_>,
    req: &Request<'_>,
    before: &SnapshotInfo,
    after: &SnapshotInfo,
) -> Result<LayerRecord, LayerError> {
    if before.id == after.id {
        return Err(LayerError::SameSnapshot(after.id.clone()));
    }
    let mut capture = Capture::start(env, req, LayerKind::App, &[before.root, after.root]).await?;
    let result = capture
        .diff_tree(
            Some(before.root),
            after.root,
            Vec::new(),
            Standings::default(),
        )
        .await;
    let result = match result {
        Ok(Some(root)) => Ok(NewLayer {
            name: req.name.to_owned(),
            kind: LayerKind::App,
            notes: req.notes.to_owned(),
            source_device: req.device.id.clone(),
            snapshot: after.id.clone(),
            before_snapshot: Some(before.id.clone()),
            root,
            deletions: std::mem::take(&mut capture.deletions),
            files: capture.files,
            bytes: capture.bytes,
            created: crate::clock::rfc3339_ms(crate::clock::now_ms()),
            created_by: req.actor.to_owned(),
        }),
        Ok(None) if !capture.deletions.is_empty() => {
            // Only removals: the overlay is an empty tree.
            match capture.write_tree(Tree::default()).await {
                Ok(root) => Ok(NewLayer {
                    name: req.name.to_owned(),
                    kind: LayerKind::App,
                    notes: req.notes.to_owned(),
                    source_device: req.device.id.clone(),
                    snapshot: after.id.clone(),
                    before_snapshot: Some(before.id.clone()),
                    root,
                    deletions: std::mem::take(&mut capture.deletions),
                    files: 0,
                    bytes: 0,
                    created: crate::clock::rfc3339_ms(crate::clock::now_ms()),
                    created_by: req.actor.to_owned(),
                }),
                Err(e) => Err(e),
            }
        }
        Ok(None) => Err(LayerError::NoChanges {
            before: before.id.clone(),
            after: after.id.clone(),
        }),
        Err(e) => Err(e),
    };
    capture.finish(result).await
}

/// A path's standing in the two areas a layer never takes from.
#[derive(Clone, Copy, Default)]
struct Standings {
    unprotected: Standing,
    user: Standing,
}

struct Capture<'a> {
    env: &'a Env<'a>,
    holder: String,
    context: LayerContext,
    unprotected: Area,
    user_area: Area,
    files: u64,
    bytes: u64,
    deletions: Vec<Vec<u8>>,
    pending: Vec<(Id, Vec<u8>)>,
    pending_bytes: usize,
    written: HashSet<Id>,
}

type Step<'f, T> = Pin<Box<dyn Future<Output = Result<T, LayerError>> + Send + 'f>>;

impl<'a> Capture<'a> {
    async fn start(
        env: &'a Env<'a>,
        req: &Request<'_>,
        kind: LayerKind,
        sources: &[Id],
    ) -> Result<Capture<'a>, LayerError> {
        // The reference machine's own policy says what is user data and what was never
        // uploaded; neither belongs in a layer.
        let policy = env.catalog.device_policy(&req.device.id).await?;
        // Delivered drivers follow each device's hardware, not the reference machine's: a
        // layer that carried them would put the reference's drivers on every target.
        let mut unprotected = policy.spec.unprotected.clone();
        unprotected
            .rules
            .extend(crate::drivers::driver_paths(env.catalog.as_ref()).await?);
        let unprotected = Area::unprotected(&unprotected)?;
        let user_area = Area::compile(&policy.spec.user_area)?;
        let holder = format!("layer-capture:{}", crate::random::hex(8));
        // Held first: the source snapshots may be pruned while the capture reads them.
        env.catalog
            .hold(&holder, sources, crate::clock::now_ms())
            .await?;
        Ok(Capture {
            env,
            holder,
            context: LayerContext {
                layer_name: req.name.to_owned(),
                kind,
                os: String::new(),
            },
            unprotected,
            user_area,
            files: 0,
            bytes: 0,
            deletions: Vec::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            written: HashSet::new(),
        })
    }

    /// Stores what is pending, records the layer, and lets go of the holds either way.
    async fn finish(
        mut self,
        layer: Result<NewLayer, LayerError>,
    ) -> Result<LayerRecord, LayerError> {
        let recorded = match layer {
            Ok(layer) => match self.flush().await {
                Ok(()) => self
                    .env
                    .catalog
                    .insert_layer(&layer)
                    .await
                    .map_err(LayerError::from),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        // Recorded layers are roots of their own now; a failed capture leaves its new trees
        // to the next collection.
        self.env.catalog.release_holds(&self.holder).await?;
        let record = recorded?;
        let l = &record.layer;
        events::record(
            self.env.catalog.as_ref(),
            NewEvent::system(
                "layer.captured",
                Severity::Info,
                format!(
                    "{} layer {} v{} captured from snapshot {}: {} files, {} bytes{}",
                    match l.kind {
                        LayerKind::Base => "base",
                        LayerKind::App => "app",
                    },
                    l.name,
                    record.version,
                    l.snapshot,
                    l.files,
                    l.bytes,
                    if l.deletions.is_empty() {
                        String::new()
                    } else {
                        format!(", {} removed paths", l.deletions.len())
                    }
                ),
            )
            .for_device(&l.source_device)
            .by(l.created_by.clone()),
        )
        .await;
        Ok(record)
    }

    /// Which of `entries` (children of `dir`) the layer takes, with their standings.
    async fn select(
        &self,
        dir: &[u8],
        entries: &[Entry],
        parent: Standings,
    ) -> Result<Vec<Option<Standings>>, LayerError> {
        let paths: Vec<Vec<u8>> = entries.iter().map(|e| child_path(dir, &e.name)).collect();
        let mut dispositions = Vec::with_capacity(entries.len());
        for (batch, batch_paths) in entries
            .chunks(CLASSIFY_BATCH)
            .zip(paths.chunks(CLASSIFY_BATCH))
        {
            let files = batch
                .iter()
                .zip(batch_paths)
                .map(|(e, p)| file_entry(e, p))
                .collect();
            dispositions.extend(self.env.hooks.classify(self.context.clone(), files).await?);
        }
        Ok(paths
            .iter()
            .zip(dispositions)
            .map(|(path, d)| {
                let s = Standings {
                    unprotected: self.unprotected.child(parent.unprotected, path),
                    user: self.user_area.child(parent.user, path),
                };
                let taken = d.kind == DispositionKind::Layer
                    && !s.unprotected.in_area()
                    && !s.user.in_area();
                taken.then_some(s)
            })
            .collect())
    }

    /// The tree `id` (the directory at `dir`) with everything the layer does not take left
    /// out; `id` itself when nothing is.
    fn filter_tree(&mut self, id: Id, dir: Vec<u8>, standings: Standings) -> Step<'_, Id> {
        Box::pin(async move {
            let tree = self.load(id).await?;
            let selected = self.select(&dir, &tree.entries, standings).await?;
            let mut changed = false;
            let mut kept = Vec::with_capacity(tree.entries.len());
            for (mut entry, selected) in tree.entries.into_iter().zip(selected) {
                let Some(s) = selected else {
                    changed = true;
                    continue;
                };
                if let Content::Tree(sub) = entry.content {
                    let filtered = self
                        .filter_tree(sub, child_path(&dir, &entry.name), s)
                        .await?;
                    if filtered != sub {
                        entry.content = Content::Tree(filtered);
                        changed = true;
                    }
                } else if entry.kind == Some(Kind::File) {
                    self.files += 1;
                    self.bytes += entry.size;
                }
                kept.push(entry);
            }
            if !changed {
                return Ok(id);
            }
            self.write_tree(Tree { entries: kept }).await
        })
    }

    /// The overlay of what changed from `before` to `after` (the directory at `dir`), or
    /// `None` when nothing the layer takes changed; removed paths go to `deletions`.
    fn diff_tree(
        &mut self,
        before: Option<Id>,
        after: Id,
        dir: Vec<u8>,
        standings: Standings,
    ) -> Step<'_, Option<Id>> {
        Box::pin(async move {
            if before == Some(after) {
                return Ok(None);
            }
            let old = match before {
                Some(b) => self.load(b).await?.entries,
                None => Vec::new(),
            };
            let new = self.load(after).await?.entries;
            let selected_new = self.select(&dir, &new, standings).await?;
            let gone: Vec<Entry> = old
                .iter()
                .filter(|o| new.binary_search_by(|n| n.name.cmp(&o.name)).is_err())
                .cloned()
                .collect();
            for (entry, selected) in gone.iter().zip(self.select(&dir, &gone, standings).await?) {
                if selected.is_some() {
                    self.deletions.push(child_path(&dir, &entry.name));
                }
            }
            let mut overlay = Vec::new();
            for (mut entry, selected) in new.into_iter().zip(selected_new) {
                let Some(s) = selected else { continue };
                let path = child_path(&dir, &entry.name);
                let previous = old
                    .binary_search_by(|o| o.name.cmp(&entry.name))
                    .ok()
                    .map(|i| &old[i]);
                if previous == Some(&entry) {
                    continue;
                }
                match (&entry.content, previous.map(|p| (&p.content, p.kind))) {
                    (Content::Tree(sub), Some((Content::Tree(prev), _))) => {
                        let (sub, prev) = (*sub, *prev);
                        match self.diff_tree(Some(prev), sub, path, s).await? {
                            Some(o) => entry.content = Content::Tree(o),
                            None => continue,
                        }
                    }
                    (Content::Tree(sub), previous) => {
                        let sub = *sub;
                        if previous.is_some() {
                            // A file became a directory: it goes before the new one comes.
                            self.deletions.push(path.clone());
                        }
                        entry.content = Content::Tree(self.filter_tree(sub, path, s).await?);
                    }
                    (_, previous) => {
                        if previous.is_some_and(|(_, kind)| kind != entry.kind) {
                            self.deletions.push(path);
                        }
                        if entry.kind == Some(Kind::File) {
                            self.files += 1;
                            self.bytes += entry.size;
                        }
                    }
                }
                overlay.push(entry);
            }
            if overlay.is_empty() {
                return Ok(None);
            }
            self.write_tree(Tree { entries: overlay }).await.map(Some)
        })
    }

    async fn load(&self, id: Id) -> Result<Tree, LayerError> {
        Ok(load_tree(self.env.catalog.as_ref(), id).await?)
    }

    /// Queues a new tree for storing and returns its id.
    async fn write_tree(&mut self, tree: Tree) -> Result<Id, LayerError> {
        let (id, raw) = tree.seal();
        if self.written.insert(id) {
            self.pending_bytes += raw.len();
            self.pending.push((id, raw));
            if self.pending_bytes >= FLUSH_BYTES {
                self.flush().await?;
            }
        }
        Ok(id)
    }

    /// Holds, then stores, the pending trees the store lacks.
    async fn flush(&mut self) -> Result<(), LayerError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let ids: Vec<Id> = pending.iter().map(|(id, _)| *id).collect();
        let catalog = self.env.catalog;
        let missing: HashSet<Id> = catalog
            .hold_and_find_missing(&self.holder, &ids, crate::clock::now_ms())
            .await?
            .into_iter()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let store = self.env.store.clone();
        let (record, entries) = tokio::task::spawn_blocking(move || {
            let mut builder = PackBuilder::default();
            let mut stored = Vec::new();
            for (id, raw) in pending.iter().filter(|(id, _)| missing.contains(id)) {
                let compression = with_codec(|c| c.compress_into(raw, &mut stored));
                builder.add_stored(*id, BlobKind::Tree, compression, &stored, raw.len() as u32);
            }
            store.store(builder.finish())
        })
        .await??;
        catalog.insert_pack(&record, &entries).await?;
        Ok(())
    }
}

fn child_path(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

fn file_entry(e: &Entry, path: &[u8]) -> FileEntry {
    FileEntry {
        path: String::from_utf8_lossy(path).into_owned(),
        kind: match e.kind {
            Some(Kind::File) => FileKind::File,
            Some(Kind::Dir) => FileKind::Directory,
            Some(Kind::Symlink) => FileKind::Symlink,
            _ => FileKind::Other,
        },
        size: e.size,
        mode: e.mode,
    }
}
