//! The driver library: **driver sets** (directory trees imported under a name, versioned)
//! and **driver profiles** (match rules over hardware inventory plus the sets they bring).
//!
//! A driver set is a tree in the blob store like a snapshot: files chunked with core's
//! chunker, packed with core's pack format, directories encoded as core trees. Its root is
//! a garbage-collection root (see `gc.rs`); while an import writes, it holds what it wrote
//! under a holder of its own, so a concurrent collection cannot take it before the set is
//! recorded.
//!
//! Which profiles apply to a device is the `driver-matcher` hook's decision (an active
//! plugin, or the built-in rules of `morgana_core::plugin::driver`); [`deliveries_for`]
//! turns that into the driver sets a device gets and where they go. A set is delivered with
//! the agent's restore-to-a-new-place job: its root is a tree like a snapshot's.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use morgana_core::Id;
use morgana_core::chunker::{Chunker, ChunkerParams};
use morgana_core::control::{DriverDelivery, Inventory, JobKind, RestoreJob, RestoreScope};
use morgana_core::pack::{BlobKind, PackBuilder, TARGET_PACK_BYTES};
use morgana_core::plugin::PluginError;
use morgana_core::plugin::types::{
    Condition, DriverProfile, HardwareInventory, InventoryField, MatchGroup, PciDevice,
};
use morgana_core::tree::{Content, Entry, INLINE_MAX, Kind, Tree};
use serde::{Deserialize, Serialize};

use crate::catalog::{
    Catalog, CatalogError, DriverProfileRecord, DriverSetRecord, JobRecord, NewDriverSet,
};
use crate::events::{self, NewEvent, Severity};
use crate::hooks::Hooks;
use crate::store::{PackStore, PackStoreError, with_codec};

/// Where a driver set lands on a device unless its profile says otherwise: each set in a
/// folder of its own name below it.
pub const DEFAULT_DRIVER_PATH: &str = "/opt/morgana/drivers";

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] PackStoreError),
    #[error("cannot read {path} for the driver set: {source}; check the path and its permissions")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0} is neither a file, a folder nor a symlink: a driver set holds only those; move it \
         out of the folder and import again"
    )]
    Unsupported(PathBuf),
    #[error("{0}")]
    Invalid(String),
    #[error("the driver-matcher hook could not run: {0}")]
    Matcher(#[from] PluginError),
    #[error("the import was interrupted: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Names of sets and profiles: they become folder names on devices.
pub fn check_name(what: &str, name: &str) -> Result<(), DriverError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(DriverError::Invalid(format!(
            "{what} name {name:?} is not usable: 1 to 64 letters, digits, `-`, `_` or `.`, not \
             starting with `.`, e.g. intel-nic"
        )))
    }
}

// ---- Import ----

/// Stores the tree at `dir` as the next version of driver set `name`.
pub async fn import(
    catalog: &Arc<dyn Catalog>,
    store: &Arc<PackStore>,
    name: &str,
    notes: &str,
    actor: &str,
    dir: &Path,
) -> Result<DriverSetRecord, DriverError> {
    check_name("driver set", name)?;
    let meta = std::fs::metadata(dir).map_err(|source| DriverError::Read {
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(DriverError::Invalid(format!(
            "{} is not a folder: import the folder that holds the drivers",
            dir.display()
        )));
    }
    let holder = format!("driver-import:{}", crate::random::hex(8));
    let mut importer = Importer {
        catalog: catalog.clone(),
        store: store.clone(),
        holder: holder.clone(),
        runtime: tokio::runtime::Handle::current(),
        pending: Vec::new(),
        pending_bytes: 0,
        written: HashSet::new(),
        files: 0,
        bytes: 0,
    };
    let dir = dir.to_owned();
    // Reading and chunking is blocking work; the importer reaches the catalog through the
    // runtime's handle from its blocking thread.
    let walked = tokio::task::spawn_blocking(move || {
        let mut chunker = Chunker::new(ChunkerParams::default())
            .map_err(|e| DriverError::Invalid(e.to_string()))?;
        let root = importer.walk(&dir, &mut chunker)?;
        importer.flush()?;
        Ok::<_, DriverError>((root, importer.files, importer.bytes))
    })
    .await;
    let recorded = match walked {
        Ok(Ok((root, files, bytes))) => catalog
            .insert_driver_set(&NewDriverSet {
                name: name.to_owned(),
                notes: notes.to_owned(),
                root,
                files,
                bytes,
                created: crate::clock::rfc3339_ms(crate::clock::now_ms()),
                created_by: actor.to_owned(),
            })
            .await
            .map_err(DriverError::from),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(e.into()),
    };
    // A recorded set is a root of its own now; a failed import leaves its blobs to the
    // next collection.
    catalog.release_holds(&holder).await?;
    let record = recorded?;
    events::record(
        catalog.as_ref(),
        NewEvent::system(
            "driver.imported",
            Severity::Info,
            format!(
                "driver set {} v{} imported: {} files, {} bytes",
                record.set.name, record.version, record.set.files, record.set.bytes
            ),
        )
        .by(actor),
    )
    .await;
    Ok(record)
}

/// A chunking step's failure: reading the file, or storing what it gave.
enum ChunkFail {
    Io(std::io::Error),
    Store(DriverError),
}

impl From<std::io::Error> for ChunkFail {
    fn from(e: std::io::Error) -> ChunkFail {
        ChunkFail::Io(e)
    }
}

struct Importer {
    catalog: Arc<dyn Catalog>,
    store: Arc<PackStore>,
    holder: String,
    runtime: tokio::runtime::Handle,
    pending: Vec<(Id, BlobKind, Vec<u8>)>,
    pending_bytes: usize,
    written: HashSet<Id>,
    files: u64,
    bytes: u64,
}

impl Importer {
    fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> DriverError + '_ {
        move |source| DriverError::Read {
            path: path.to_owned(),
            source,
        }
    }

    fn walk(&mut self, dir: &Path, chunker: &mut Chunker) -> Result<Id, DriverError> {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::MetadataExt;
        let mut tree = Tree::default();
        for item in std::fs::read_dir(dir).map_err(Self::read_err(dir))? {
            let item = item.map_err(Self::read_err(dir))?;
            let path = item.path();
            let meta = std::fs::symlink_metadata(&path).map_err(Self::read_err(&path))?;
            let mut entry = Entry {
                name: item.file_name().as_bytes().to_vec(),
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                ..Entry::default()
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                entry.kind = Some(Kind::Dir);
                entry.content = Content::Tree(self.walk(&path, chunker)?);
            } else if ft.is_symlink() {
                entry.kind = Some(Kind::Symlink);
                entry.symlink_target = std::fs::read_link(&path)
                    .map_err(Self::read_err(&path))?
                    .into_os_string()
                    .as_bytes()
                    .to_vec();
                entry.size = entry.symlink_target.len() as u64;
            } else if ft.is_file() {
                entry.kind = Some(Kind::File);
                let (content, size) = self.read_file(&path, chunker)?;
                entry.content = content;
                entry.size = size;
                self.files += 1;
                self.bytes += size;
            } else {
                return Err(DriverError::Unsupported(path));
            }
            tree.entries.push(entry);
        }
        tree.sort();
        let (id, raw) = tree.seal();
        self.add(id, BlobKind::Tree, raw)?;
        Ok(id)
    }

    fn read_file(
        &mut self,
        path: &Path,
        chunker: &mut Chunker,
    ) -> Result<(Content, u64), DriverError> {
        let file = std::fs::File::open(path).map_err(Self::read_err(path))?;
        let len = file.metadata().map_err(Self::read_err(path))?.len();
        if len <= INLINE_MAX {
            let data = std::fs::read(path).map_err(Self::read_err(path))?;
            let size = data.len() as u64;
            return Ok((
                if data.is_empty() {
                    Content::None
                } else {
                    Content::Inline(data)
                },
                size,
            ));
        }
        let chunked = chunker
            .chunk(file, |id, bytes| {
                self.add(id, BlobKind::Chunk, bytes.to_vec())
                    .map_err(ChunkFail::Store)
            })
            .map_err(|e| match e {
                ChunkFail::Io(source) => DriverError::Read {
                    path: path.to_owned(),
                    source,
                },
                ChunkFail::Store(e) => e,
            })?;
        Ok((
            Content::Chunks {
                file: chunked.file_id,
                chunks: chunked.chunks,
            },
            chunked.size,
        ))
    }

    fn add(&mut self, id: Id, kind: BlobKind, raw: Vec<u8>) -> Result<(), DriverError> {
        if self.written.insert(id) {
            self.pending_bytes += raw.len();
            self.pending.push((id, kind, raw));
            if self.pending_bytes >= TARGET_PACK_BYTES {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Holds, then stores, the pending blobs the store lacks.
    fn flush(&mut self) -> Result<(), DriverError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let ids: Vec<Id> = pending.iter().map(|(id, ..)| *id).collect();
        let catalog = self.catalog.clone();
        let missing: HashSet<Id> = self
            .runtime
            .block_on(catalog.hold_and_find_missing(&self.holder, &ids, crate::clock::now_ms()))?
            .into_iter()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut builder = PackBuilder::default();
        let mut stored = Vec::new();
        for (id, kind, raw) in pending.iter().filter(|(id, ..)| missing.contains(id)) {
            let compression = with_codec(|c| c.compress_into(raw, &mut stored));
            builder.add_stored(*id, *kind, compression, &stored, raw.len() as u32);
        }
        let (record, entries) = self.store.store(builder.finish())?;
        self.runtime
            .block_on(catalog.insert_pack(&record, &entries))?;
        Ok(())
    }
}

// ---- Uploaded archives ----

/// Largest driver set archive the appliance takes in one upload. The archive is held in
/// memory while it is unpacked, and a tar is never smaller than what it unpacks to, so
/// this also bounds the disk an upload uses.
pub const MAX_ARCHIVE_BYTES: usize = 256 << 20;

fn hostile(path: &str, why: &str) -> DriverError {
    DriverError::Invalid(format!(
        "the archive's entry {path:?} {why}; the archive is refused as a whole and nothing was \
         imported: pack the driver folder's contents with relative paths (`tar -cf set.tar -C \
         DIR .`)"
    ))
}

/// `path` as plain relative components: no absolute paths, no `..`.
fn relative_components(path: &str) -> Result<Vec<&str>, DriverError> {
    if path.starts_with('/') {
        return Err(hostile(path, "is an absolute path"));
    }
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(hostile(path, "climbs out of the tree with `..`")),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Unpacks a tar archive of a driver set's tree into `dir` (an empty folder): folders,
/// files (permission bits without setuid/setgid/sticky) and symlinks that stay inside the
/// tree. Absolute paths, `..`, links pointing out of the tree, hard links, devices and
/// writes through a symlink are refused, with the entry named. Returns the files written.
pub fn unpack_tar(bytes: &[u8], dir: &Path) -> Result<u64, DriverError> {
    let mut archive = tar::Archive::new(bytes);
    let unreadable = |e: std::io::Error| {
        DriverError::Invalid(format!(
            "the upload is not a readable tar archive ({e}): pack the driver folder with \
             `tar -cf set.tar -C DIR .` and upload that; nothing was imported"
        ))
    };
    let mut files = 0;
    for entry in archive.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let parts = relative_components(&raw)?;
        let Some((_, parents)) = parts.split_last() else {
            continue; // the archive's root folder itself
        };
        // Every folder on the way must be a real folder this archive made: a symlink there
        // would carry the write somewhere else.
        let mut at = dir.to_path_buf();
        for p in parents {
            at.push(p);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(hostile(&raw, "would be written through a symlink"));
                }
                Ok(m) if !m.is_dir() => {
                    return Err(hostile(&raw, "lies below something that is not a folder"));
                }
                Ok(_) => {}
                Err(_) => std::fs::create_dir(&at).map_err(|source| DriverError::Read {
                    path: at.clone(),
                    source,
                })?,
            }
        }
        let target = parts.iter().fold(dir.to_path_buf(), |p, c| p.join(c));
        let write_err = |source| DriverError::Read {
            path: target.clone(),
            source,
        };
        if std::fs::symlink_metadata(&target).is_ok_and(|m| !m.is_dir()) {
            return Err(hostile(&raw, "appears twice in the archive"));
        }
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Directory => {
                if !target.is_dir() {
                    std::fs::create_dir(&target).map_err(write_err)?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                use std::os::unix::fs::OpenOptionsExt;
                let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&target)
                    .map_err(write_err)?;
                std::io::copy(&mut entry, &mut out).map_err(unreadable)?;
                files += 1;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .map(|l| String::from_utf8_lossy(&l).into_owned())
                    .unwrap_or_default();
                if link.is_empty() || link.starts_with('/') {
                    return Err(hostile(
                        &raw,
                        &format!("is a symlink to {link:?}, outside the tree"),
                    ));
                }
                // Resolved from the link's folder, it must stay below the tree's root.
                let mut depth = parents.len() as i64;
                for c in link.split('/') {
                    match c {
                        "" | "." => {}
                        ".." => depth -= 1,
                        _ => depth += 1,
                    }
                    if depth < 0 {
                        return Err(hostile(
                            &raw,
                            &format!("is a symlink to {link:?}, outside the tree"),
                        ));
                    }
                }
                std::os::unix::fs::symlink(&link, &target).map_err(write_err)?;
            }
            tar::EntryType::Link => {
                return Err(hostile(
                    &raw,
                    "is a hard link; pack the file itself instead",
                ));
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(hostile(
                    &raw,
                    &format!(
                        "is a {other:?} entry; a driver set holds files, folders and symlinks"
                    ),
                ));
            }
        }
    }
    if files == 0 {
        return Err(DriverError::Invalid(
            "the upload holds no files (is it a tar archive of the driver folder?): pack it with \
             `tar -cf set.tar -C DIR .`; nothing was imported"
                .into(),
        ));
    }
    Ok(files)
}

/// Imports an uploaded tar of a driver set's tree as the next version of set `name`: it is
/// unpacked into a temporary folder below `scratch` (removed afterwards, whatever happens)
/// and stored by [`import`].
pub async fn import_tar(
    catalog: &Arc<dyn Catalog>,
    store: &Arc<PackStore>,
    scratch: &Path,
    name: &str,
    notes: &str,
    actor: &str,
    archive: Vec<u8>,
) -> Result<DriverSetRecord, DriverError> {
    check_name("driver set", name)?;
    if archive.len() > MAX_ARCHIVE_BYTES {
        return Err(DriverError::Invalid(format!(
            "the archive is {} bytes, more than the {MAX_ARCHIVE_BYTES} an upload may be: import \
             big driver sets with `morgana driver import NAME DIR` on the appliance",
            archive.len()
        )));
    }
    let tmp = tempfile::Builder::new()
        .prefix("driver-upload-")
        .tempdir_in(scratch)
        .map_err(|source| DriverError::Read {
            path: scratch.to_owned(),
            source,
        })?;
    let root = tmp.path().to_owned();
    let unpacked = tokio::task::spawn_blocking(move || unpack_tar(&archive, &root))
        .await
        .map_err(|e| DriverError::Invalid(format!("unpacking the archive failed: {e}")))?;
    unpacked?;
    import(catalog, store, name, notes, actor, tmp.path()).await
}

// ---- Profiles ----

/// A profile as its TOML file writes it (and as the catalog keeps it, in JSON):
///
/// ```toml
/// all = { vendor = "LENOVO" }                    # every condition here, and
/// any = [ { model = "ThinkPad T14*" },            # at least one of these groups
///         { pci = ["8086:15f3"], os_id = "debian" } ]
/// sets = ["intel-nic", { name = "nvidia", version = 3 }]
/// path = "/opt/morgana/drivers"                  # optional; each set in <path>/<set>
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<Rules>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub any: Vec<Rules>,
    pub sets: Vec<SetRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Conditions over one device's inventory, all of which must hold. Patterns are
/// case-insensitive globs where `*` matches anything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Against `ID VERSION_ID` of os-release, e.g. `debian 12`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// os-release `ID`, e.g. `debian`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_id: Option<String>,
    /// os-release `VERSION_ID`, e.g. `12`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    /// PCI `vendor:device` ids in hex (`8086:15f3`, `10de:*`); each must be present.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pci: Vec<String>,
}

/// A driver set a profile brings: by name (its newest version), or pinned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SetRef {
    Newest(String),
    Pinned {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
    },
}

impl SetRef {
    pub fn name(&self) -> &str {
        match self {
            SetRef::Newest(n) | SetRef::Pinned { name: n, .. } => n,
        }
    }

    pub fn version(&self) -> Option<u32> {
        match self {
            SetRef::Newest(_) => None,
            SetRef::Pinned { version, .. } => *version,
        }
    }
}

impl Rules {
    fn conditions(&self) -> Vec<Condition> {
        let c = |field, pattern: &str| Condition {
            field,
            pattern: pattern.to_owned(),
        };
        let mut out = Vec::new();
        if let Some(v) = &self.vendor {
            out.push(c(InventoryField::Vendor, v));
        }
        if let Some(m) = &self.model {
            out.push(c(InventoryField::Model, m));
        }
        if let Some(o) = &self.os {
            out.push(c(InventoryField::Os, o));
        }
        // The contract's `os` field is `ID VERSION_ID`: the two halves are globs over it.
        if self.os_id.is_some() || self.os_version.is_some() {
            let id = self.os_id.as_deref().unwrap_or("*");
            let version = self.os_version.as_deref().unwrap_or("*");
            out.push(c(InventoryField::Os, &format!("{id} {version}")));
        }
        for p in &self.pci {
            out.push(c(InventoryField::PciId, p));
        }
        out
    }
}

impl ProfileSpec {
    /// The match groups (OR of ANDs), `all` folded into each `any` group.
    pub fn groups(&self) -> Vec<MatchGroup> {
        let common = self.all.as_ref().map(Rules::conditions).unwrap_or_default();
        if self.any.is_empty() {
            return vec![MatchGroup { all: common }];
        }
        self.any
            .iter()
            .map(|g| MatchGroup {
                all: common.iter().cloned().chain(g.conditions()).collect(),
            })
            .collect()
    }

    /// The profile as the `driver-matcher` hook sees it.
    pub fn to_hook(&self, name: &str) -> DriverProfile {
        DriverProfile {
            id: name.to_owned(),
            name: name.to_owned(),
            any_of: self.groups(),
        }
    }

    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or(DEFAULT_DRIVER_PATH)
    }
}

/// Reads and checks a profile file; names what is wrong and where.
pub fn parse_profile(source: &str, text: &str) -> Result<ProfileSpec, DriverError> {
    let spec: ProfileSpec = toml::from_str(text).map_err(|e| {
        DriverError::Invalid(format!(
            "{source} is not a driver profile: {}",
            e.to_string().trim_end()
        ))
    })?;
    let groups = spec.groups();
    let empty_entry = spec
        .any
        .iter()
        .chain(&spec.all)
        .any(|r| r.conditions().is_empty());
    if empty_entry || groups.iter().any(|g| g.all.is_empty()) {
        return Err(DriverError::Invalid(format!(
            "{source}: a match group has no condition, so it would match every device; give \
             `all` or each `any` entry at least one of vendor, model, os, os_id, os_version, pci"
        )));
    }
    for g in &groups {
        for c in &g.all {
            if c.field == InventoryField::PciId && !pci_pattern_ok(&c.pattern) {
                return Err(DriverError::Invalid(format!(
                    "{source}: pci {:?} is not `vendor:device` in hex (wildcards `*` allowed), \
                     e.g. \"8086:15f3\" or \"10de:*\"",
                    c.pattern
                )));
            }
        }
    }
    if spec.sets.is_empty() {
        return Err(DriverError::Invalid(format!(
            "{source}: `sets` is empty: name the driver sets the profile brings, e.g. \
             sets = [\"intel-nic\"]"
        )));
    }
    for s in &spec.sets {
        check_name("driver set", s.name())?;
    }
    if let Some(p) = &spec.path {
        let bad =
            !p.starts_with('/') || p.contains('\0') || p.split('/').any(|c| c == ".." || c == ".");
        if bad {
            return Err(DriverError::Invalid(format!(
                "{source}: path {p:?} must be an absolute path without `.` or `..`, e.g. \
                 \"{DEFAULT_DRIVER_PATH}\""
            )));
        }
    }
    Ok(spec)
}

fn pci_pattern_ok(p: &str) -> bool {
    let Some((v, d)) = p.split_once(':') else {
        return false;
    };
    let part = |s: &str| {
        !s.is_empty() && s.len() <= 4 && s.chars().all(|c| c == '*' || c.is_ascii_hexdigit())
    };
    part(v) && part(d)
}

/// Saves profile `name` after checking that the sets it brings exist.
pub async fn save_profile(
    catalog: &dyn Catalog,
    name: &str,
    spec: &ProfileSpec,
    actor: &str,
) -> Result<(), DriverError> {
    check_name("profile", name)?;
    for s in &spec.sets {
        if catalog.driver_set(s.name(), s.version()).await?.is_none() {
            return Err(DriverError::Invalid(format!(
                "profile {name} brings driver set {}{}, which does not exist: import it with \
                 `morgana driver import {} DIR` first (list them with `morgana driver list`)",
                s.name(),
                s.version().map(|v| format!(" v{v}")).unwrap_or_default(),
                s.name()
            )));
        }
    }
    let json = serde_json::to_string(spec)
        .map_err(|e| DriverError::Invalid(format!("cannot encode the profile: {e}")))?;
    catalog
        .save_driver_profile(&DriverProfileRecord {
            name: name.to_owned(),
            spec: json,
            updated: crate::clock::rfc3339_ms(crate::clock::now_ms()),
            updated_by: actor.to_owned(),
        })
        .await?;
    events::record(
        catalog,
        NewEvent::system(
            "driver.profile-saved",
            Severity::Info,
            format!(
                "driver profile {name} saved: sets {}",
                spec.sets
                    .iter()
                    .map(|s| s.name().to_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .by(actor),
    )
    .await;
    Ok(())
}

/// Every stored profile with its spec.
pub async fn profiles(
    catalog: &dyn Catalog,
) -> Result<Vec<(DriverProfileRecord, ProfileSpec)>, DriverError> {
    catalog
        .driver_profiles()
        .await?
        .into_iter()
        .map(|r| {
            let spec = serde_json::from_str(&r.spec).map_err(|e| CatalogError::Corrupt {
                what: "driver profile",
                detail: format!("{}: {e}", r.name),
            })?;
            Ok((r, spec))
        })
        .collect()
}

// ---- Matching and delivery ----

/// The inventory as the `driver-matcher` contract carries it.
pub fn hook_inventory(inv: &Inventory) -> HardwareInventory {
    HardwareInventory {
        vendor: inv.vendor.clone(),
        model: inv.model.clone(),
        os: format!("{} {}", inv.os_id, inv.os_version),
        pci_devices: inv
            .pci
            .iter()
            .map(|p| PciDevice {
                vendor_id: p.vendor_id,
                device_id: p.device_id,
            })
            .collect(),
    }
}

/// One profile that applies to a device, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Matched {
    pub profile: String,
    pub reason: String,
}

/// One driver set version a device gets, and where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Delivery {
    pub profile: String,
    pub set: String,
    pub version: u32,
    #[serde(serialize_with = "hex")]
    pub root: Id,
    /// Absolute folder on the device the set's contents go to.
    pub target: String,
}

fn hex<S: serde::Serializer>(id: &Id, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&id.to_hex())
}

/// What the driver library gives one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceDrivers {
    pub device: String,
    pub hostname: String,
    /// False until the device's agent reported its inventory; nothing matches then.
    pub has_inventory: bool,
    pub matched: Vec<Matched>,
    pub deliveries: Vec<Delivery>,
}

/// The profiles that apply to `device_id` (through the `driver-matcher` hook: an active
/// plugin or the built-in rules) and the driver sets that follow: what an on-demand
/// delivery sends, and what base-layer updates and restores to new hardware will send.
/// `only` limits it to the named profiles. Two profiles bringing the same set to the same
/// place deliver it once (the first profile's version).
pub async fn deliveries_for(
    catalog: &dyn Catalog,
    hooks: &Hooks,
    device_id: &str,
    only: Option<&str>,
) -> Result<DeviceDrivers, DriverError> {
    let profiles: Vec<_> = profiles(catalog)
        .await?
        .into_iter()
        .filter(|(r, _)| only.is_none_or(|o| o == r.name))
        .collect();
    deliveries_with(catalog, hooks, device_id, &profiles).await
}

/// [`deliveries_for`] with the profiles given rather than the stored ones: the preview of
/// a profile before it is saved.
pub async fn deliveries_with(
    catalog: &dyn Catalog,
    hooks: &Hooks,
    device_id: &str,
    profiles: &[(DriverProfileRecord, ProfileSpec)],
) -> Result<DeviceDrivers, DriverError> {
    let Some(status) = catalog.device_status(device_id).await? else {
        return Err(DriverError::Invalid(format!(
            "there is no device {device_id:?}: list them with `morgana device list`"
        )));
    };
    let mut out = DeviceDrivers {
        device: status.device.id.clone(),
        hostname: status.device.hostname.clone(),
        has_inventory: status.inventory.is_some(),
        matched: Vec::new(),
        deliveries: Vec::new(),
    };
    let Some(inventory) = &status.inventory else {
        return Ok(out);
    };
    if profiles.is_empty() {
        return Ok(out);
    }
    let matches = hooks
        .match_profiles(
            hook_inventory(inventory),
            profiles.iter().map(|(r, s)| s.to_hook(&r.name)).collect(),
        )
        .await?;
    for m in matches {
        // A plugin may answer with ids it was never given: those bring nothing.
        let Some((record, spec)) = profiles.iter().find(|(r, _)| r.name == m.profile_id) else {
            continue;
        };
        for s in &spec.sets {
            let target = format!("{}/{}", spec.path().trim_end_matches('/'), s.name());
            if out.deliveries.iter().any(|d| d.target == target) {
                continue;
            }
            let Some(set) = catalog.driver_set(s.name(), s.version()).await? else {
                return Err(DriverError::Invalid(format!(
                    "profile {} brings driver set {}{}, which no longer exists: import it or \
                     change the profile",
                    record.name,
                    s.name(),
                    s.version().map(|v| format!(" v{v}")).unwrap_or_default()
                )));
            };
            out.deliveries.push(Delivery {
                profile: record.name.clone(),
                set: set.set.name.clone(),
                version: set.version,
                root: set.set.root,
                target,
            });
        }
        out.matched.push(Matched {
            profile: record.name.clone(),
            reason: m.reason,
        });
    }
    Ok(out)
}

/// Every folder driver sets are delivered into (the default and each profile's), so that
/// layer captures leave them out.
pub async fn driver_paths(catalog: &dyn Catalog) -> Result<Vec<String>, CatalogError> {
    let mut paths = vec![DEFAULT_DRIVER_PATH.to_owned()];
    for (_, spec) in profiles(catalog).await.map_err(|e| match e {
        DriverError::Catalog(e) => e,
        other => CatalogError::Corrupt {
            what: "driver profile",
            detail: other.to_string(),
        },
    })? {
        let p = spec.path().trim_end_matches('/').to_owned();
        if !paths.contains(&p) {
            paths.push(p);
        }
    }
    Ok(paths)
}

/// The driver sets `device_id` gets, as an apply or a restore job carries them (paths as
/// seen from the device's protected root, like every layer path).
pub async fn job_deliveries(
    catalog: &dyn Catalog,
    hooks: &Hooks,
    device_id: &str,
) -> Result<Vec<DriverDelivery>, DriverError> {
    Ok(deliveries_for(catalog, hooks, device_id, None)
        .await?
        .deliveries
        .into_iter()
        .map(|d| DriverDelivery {
            set: d.set,
            version: d.version,
            root: d.root,
            target: d.target,
        })
        .collect())
}

/// A whole-device revert onto another device than the snapshot's is a restore to new
/// hardware: it brings the new device's own driver sets. Any other job is returned as it is.
pub async fn for_new_hardware(
    catalog: &dyn Catalog,
    hooks: &Hooks,
    device_id: &str,
    mut kind: JobKind,
) -> Result<JobKind, DriverError> {
    if let JobKind::Restore(r) = &mut kind
        && matches!(r.scope, RestoreScope::Full | RestoreScope::SystemOnly)
        && r.source_device != device_id
    {
        r.drivers = job_deliveries(catalog, hooks, device_id).await?;
    }
    Ok(kind)
}

/// Per device (the one named, or every enrolled one not revoked), which of `profiles`
/// match and the driver sets that follow.
pub async fn preview(
    catalog: &dyn Catalog,
    hooks: &Hooks,
    profiles: &[(DriverProfileRecord, ProfileSpec)],
    device: Option<&str>,
) -> Result<Vec<DeviceDrivers>, DriverError> {
    let ids = match device {
        Some(d) => vec![d.to_owned()],
        None => catalog
            .devices()
            .await?
            .into_iter()
            .filter(|d| !d.device.revoked)
            .map(|d| d.device.id)
            .collect(),
    };
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(deliveries_with(catalog, hooks, &id, profiles).await?);
    }
    Ok(out)
}

/// Checks that delivering to `drivers.device` makes sense, then [`deliver`]s.
pub async fn deliver_now(
    catalog: &dyn Catalog,
    drivers: &DeviceDrivers,
    path: Option<&str>,
    actor: &str,
) -> Result<Vec<(Delivery, JobRecord)>, DriverError> {
    let id = &drivers.device;
    if let Some(p) = path
        && (!p.starts_with('/') || p.contains('\0') || p.split('/').any(|c| c == ".."))
    {
        return Err(DriverError::Invalid(format!(
            "the delivery path {p:?} must be an absolute path without `..`, e.g. \
             \"{DEFAULT_DRIVER_PATH}\"; nothing was queued"
        )));
    }
    if !drivers.has_inventory {
        return Err(DriverError::Invalid(format!(
            "device {id} has not reported its hardware inventory yet, so no profile can match: \
             start its agent service (`morgana-agent run`) and try again"
        )));
    }
    if drivers.deliveries.is_empty() {
        return Err(DriverError::Invalid(format!(
            "no driver profile matches device {id}, so there is nothing to deliver: see the \
             profiles' previews (or `morgana driver preview --device {id}`)"
        )));
    }
    deliver(catalog, drivers, path, actor).await
}

/// Queues one restore-to-a-new-place job per driver set `drivers` lists (the agent writes
/// the set's tree into the target folder, replacing what was there under that name).
/// `path` overrides every delivery's parent folder.
pub async fn deliver(
    catalog: &dyn Catalog,
    drivers: &DeviceDrivers,
    path: Option<&str>,
    actor: &str,
) -> Result<Vec<(Delivery, JobRecord)>, DriverError> {
    let mut out = Vec::new();
    for d in &drivers.deliveries {
        let mut d = d.clone();
        if let Some(p) = path {
            d.target = format!("{}/{}", p.trim_end_matches('/'), d.set);
        }
        let job = crate::jobs::queue(
            catalog,
            &drivers.device,
            JobKind::Restore(RestoreJob {
                snapshot: format!("driver-set:{}:v{}", d.set, d.version),
                source_device: String::new(),
                root: d.root,
                scope: RestoreScope::Paths {
                    paths: vec!["/".into()],
                },
                target: Some(d.target.clone()),
                drivers: Vec::new(),
            }),
            actor,
        )
        .await?;
        out.push((d, job));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use morgana_core::plugin::driver::match_profiles;

    fn inv(vendor: &str, model: &str, os: &str, pci: &[(u16, u16)]) -> HardwareInventory {
        HardwareInventory {
            vendor: vendor.into(),
            model: model.into(),
            os: os.into(),
            pci_devices: pci
                .iter()
                .map(|&(vendor_id, device_id)| PciDevice {
                    vendor_id,
                    device_id,
                })
                .collect(),
        }
    }

    #[test]
    fn profile_files_become_or_of_and_groups_for_the_builtin_matcher() {
        let spec = parse_profile(
            "p.toml",
            r#"
            all = { vendor = "LENOVO" }
            any = [ { model = "ThinkPad T14*" }, { pci = ["8086:15f3"], os_id = "debian" } ]
            sets = ["intel-nic", { name = "nvidia", version = 3 }]
            "#,
        )
        .unwrap();
        assert_eq!(spec.sets[1].version(), Some(3));
        assert_eq!(spec.path(), DEFAULT_DRIVER_PATH);
        let profile = spec.to_hook("lenovo");
        let t14 = inv("lenovo", "ThinkPad T14 Gen 3", "ubuntu 24.04", &[]);
        let x1 = inv("LENOVO", "X1", "debian 12", &[(0x8086, 0x15f3)]);
        let x1_other_os = inv("LENOVO", "X1", "fedora 40", &[(0x8086, 0x15f3)]);
        let dell = inv(
            "Dell Inc.",
            "ThinkPad T14",
            "debian 12",
            &[(0x8086, 0x15f3)],
        );
        let m = |i: &HardwareInventory| match_profiles(i, std::slice::from_ref(&profile));
        assert_eq!(
            m(&t14)[0].reason,
            "vendor matches \"LENOVO\" and model matches \"ThinkPad T14*\""
        );
        assert_eq!(
            m(&x1)[0].reason,
            "vendor matches \"LENOVO\" and os matches \"debian *\" and pci-id matches \"8086:15f3\""
        );
        assert!(m(&x1_other_os).is_empty());
        assert!(m(&dell).is_empty());
        // The stored JSON reads back as the same spec.
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<ProfileSpec>(&json).unwrap(), spec);
    }

    #[test]
    fn bad_profile_files_are_refused_naming_the_problem() {
        let cases = [
            ("sets = [\"a\"]", "has no condition"),
            ("all = { vendor = \"x\" }\nsets = []", "`sets` is empty"),
            (
                "all = { colour = \"x\" }\nsets = [\"a\"]",
                "unknown field `colour`",
            ),
            (
                "all = { pci = [\"8086\"] }\nsets = [\"a\"]",
                "is not `vendor:device`",
            ),
            (
                "any = [{}]\nall = { vendor = \"x\" }\nsets = [\"a\"]",
                "has no condition",
            ),
            (
                "all = { vendor = \"x\" }\nsets = [\"a\"]\npath = \"/opt/../etc\"",
                "absolute path",
            ),
            ("all = { vendor = \"x\" }\nsets = [\"../a\"]", "not usable"),
        ];
        for (text, want) in cases {
            let e = parse_profile("p.toml", text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
