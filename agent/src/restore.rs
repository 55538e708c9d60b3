//! Restore: a snapshot, or one path inside it, written into a directory.
//!
//! Threads form a pipeline so the network, the CPU and the disk work at once, with memory
//! bounded whatever the snapshot's size:
//!
//! 1. the **planner** ([`plan`]) walks the snapshot's trees depth first (fetching sibling
//!    subtrees together) and emits one [`plan::Op`] per entry, in the order they must be
//!    written: a directory is entered, its children follow, then it is left (post-order,
//!    so a directory's mtime and mode are set after its children are written);
//! 2. the **batcher** ([`fetch`]) gathers the chunk ids of many consecutive files into one
//!    request (up to [`MAX_IDS_PER_REQUEST`] ids / [`BATCH_BYTES`]) and deals the batches
//!    round-robin to [`FETCH_WORKERS`] **fetch workers**, which fetch, decompress and verify
//!    them in parallel: while the writer works on batch *n*, batches *n + 1* and *n + 2*
//!    are already streaming in;
//! 3. the **writer** ([`write`]) creates everything below `--to` through directory file
//!    descriptors (never following a symlink), writes files chunk by chunk into temporary
//!    names and renames them into place only once every chunk and the whole-file id
//!    checked out.
//!
//! Blobs come from a [`BlobSource`]: the appliance in production, a map in the tests.

mod fetch;
mod plan;
mod sys;
mod write;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};

use morgana_core::Id;
use morgana_core::tree::is_safe_name;
use morgana_core::wire::BlobFrame;
#[cfg(doc)]
use morgana_core::wire::MAX_IDS_PER_REQUEST;

/// Most estimated raw bytes of chunks in one fetch. `FETCH_WORKERS + 1` batches are alive
/// at once (one being written, the others being fetched), which keeps restore well under
/// 128 MiB RSS.
pub const BATCH_BYTES: u64 = 16 * 1024 * 1024;
/// Most items (files, directories, …) in one batch, so that trees of millions of empty
/// files or directories do not pile up between the threads either.
const BATCH_ITEMS: usize = 32 * 1024;
/// Planner ops queued ahead of the batcher.
const OP_QUEUE: usize = 4096;
/// Batches fetched (and verified) at once, besides the one being written: keeps the
/// appliance streaming while the writer works and spreads decompression and hashing over
/// cores.
const FETCH_WORKERS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "snapshot {snapshot} has a hostile entry name in {path}: {reason}; nothing outside \
         --to was written"
    )]
    HostileName {
        snapshot: String,
        path: String,
        reason: String,
    },
    #[error(
        "the tree of {path} (tree {id}) is damaged ({reason}); nothing of it was restored; run \
         `morgana check` on the appliance"
    )]
    DamagedTree {
        id: Id,
        path: String,
        reason: String,
    },
    #[error(
        "chunk {chunk} of {path} is damaged ({reason}); the restored file was removed; run \
         `morgana check` on the appliance"
    )]
    DamagedChunk {
        chunk: Id,
        path: String,
        reason: String,
    },
    #[error(
        "{path} does not match the snapshot ({reason}); the restored file was removed; run \
         `morgana check` on the appliance"
    )]
    FileMismatch { path: String, reason: String },
    #[error(
        "snapshot {snapshot} has no {path} (--path is relative to the protected root, e.g. \
         home/alice/docs)"
    )]
    NoSuchPath { snapshot: String, path: String },
    #[error("--path {0:?} must be a relative path without `..` (e.g. home/alice/docs)")]
    BadSubpath(String),
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("fetching blobs from the appliance failed: {0}")]
    Fetch(Box<dyn std::error::Error + Send + Sync>),
    #[error("the appliance answered a blob fetch wrongly: {0}")]
    Protocol(String),
}

impl RestoreError {
    /// The file or folder the error is about, as the snapshot names it, if it names one.
    pub fn path(&self) -> Option<&str> {
        match self {
            RestoreError::HostileName { path, .. }
            | RestoreError::DamagedTree { path, .. }
            | RestoreError::DamagedChunk { path, .. }
            | RestoreError::FileMismatch { path, .. }
            | RestoreError::NoSuchPath { path, .. }
            | RestoreError::Io { path, .. } => Some(path),
            _ => None,
        }
    }
}

/// Receives one fetched frame and its stored bytes.
pub type OnBlob<'a> = dyn FnMut(BlobFrame, &[u8]) -> Result<(), RestoreError> + 'a;

/// Where blobs come from.
pub trait BlobSource: Sync {
    /// Fetches `ids` (at most [`MAX_IDS_PER_REQUEST`]) and calls `each` with every frame and
    /// its stored bytes, in request order; a frame with `kind: None` is a blob the source
    /// does not have. Bytes are not verified here: the caller opens them with
    /// `pack::Codec::open`. An error from `each` stops the fetch and is returned.
    fn fetch(&self, ids: &[Id], each: &mut OnBlob<'_>) -> Result<(), RestoreError>;
}

/// Fetches `ids` from `source` and calls `each` with every frame, checking that the answer
/// holds exactly those blobs, in order. `what` names them in errors ("chunk", "tree").
pub(crate) fn fetch_in_order(
    source: &dyn BlobSource,
    ids: &[Id],
    what: &str,
    each: &mut OnBlob<'_>,
) -> Result<(), RestoreError> {
    const NEXT: &str = "retry; if it repeats, run the same Morgana version on the agent and the \
                        appliance (and its reflectors)";
    let mut i = 0;
    source.fetch(ids, &mut |frame, stored| {
        let wrong = match ids.get(i) {
            Some(&expected) if expected == frame.id => None,
            Some(expected) => Some(format!(
                "asked for {what} {expected}, got blob {}",
                frame.id
            )),
            None => Some(format!("asked for {} {what}s, got more", ids.len())),
        };
        if let Some(wrong) = wrong {
            return Err(RestoreError::Protocol(format!("{wrong}; {NEXT}")));
        }
        i += 1;
        each(frame, stored)
    })?;
    if i != ids.len() {
        return Err(RestoreError::Protocol(format!(
            "asked for {} {what}s, the answer ended after {i}; {NEXT}",
            ids.len()
        )));
    }
    Ok(())
}

/// What to restore and where.
#[derive(Clone, Debug)]
pub struct Request {
    /// Named in error messages.
    pub snapshot: String,
    pub root: Id,
    /// Components of `--path` (checked by [`parse_subpath`]); empty for everything.
    pub subpath: Vec<Vec<u8>>,
    /// An existing directory; emptiness and `--overwrite` are the caller's business.
    pub to: PathBuf,
    /// Make the restored directories (the subpath and everything below it) hold exactly
    /// what the snapshot's do: entries the snapshot lacks are removed, except kept ones.
    /// Used to revert in place.
    pub prune: bool,
    /// Paths (relative to the snapshot root, so to `to`) left exactly as they are: not
    /// written, and not removed by `prune`.
    pub keep: Option<Keep>,
    /// Counts files as they are written, for progress reports.
    pub progress: Option<Arc<Progress>>,
}

impl Request {
    /// Restores `subpath` of the snapshot into `to`, adding to or replacing what is there.
    pub fn new(snapshot: String, root: Id, subpath: Vec<Vec<u8>>, to: PathBuf) -> Request {
        Request {
            snapshot,
            root,
            subpath,
            to,
            prune: false,
            keep: None,
            progress: None,
        }
    }

    fn keeps(&self, path: &[u8]) -> bool {
        self.keep.as_ref().is_some_and(|k| k.keeps(path))
    }
}

/// Which paths (relative to the snapshot root, without a leading `/`) a restore leaves
/// alone.
#[derive(Clone)]
pub struct Keep(pub Arc<KeepFn>);

/// Whether a path is kept.
pub type KeepFn = dyn Fn(&[u8]) -> bool + Send + Sync;

impl Keep {
    pub fn keeps(&self, path: &[u8]) -> bool {
        (self.0)(path)
    }
}

impl std::fmt::Debug for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keep(..)")
    }
}

/// Files and bytes written so far, readable while the restore runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    /// What the job will write in all, when the job knows it up front (a layer apply).
    pub files_total: AtomicU64,
    pub bytes_total: AtomicU64,
    /// A layer apply's per-file results, left here for the job's final report.
    pub results: Mutex<Option<morgana_core::control::FileResults>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Fifos, sockets and device nodes.
    pub specials: u64,
    /// Names that are further hard links to a file restored earlier.
    pub hardlinks: u64,
    /// Logical bytes of regular files (holes included).
    pub bytes: u64,
    /// Chunk bytes received as stored (compressed) and verified.
    pub fetched_bytes: u64,
    pub fetched_chunks: u64,
    pub warnings: u64,
    /// Entries removed because the snapshot does not have them (`prune`).
    pub removed: u64,
}

impl Stats {
    /// Adds another restore's counts, for jobs made of several.
    pub fn add(&mut self, s: &Stats) {
        self.files += s.files;
        self.dirs += s.dirs;
        self.symlinks += s.symlinks;
        self.specials += s.specials;
        self.hardlinks += s.hardlinks;
        self.bytes += s.bytes;
        self.fetched_bytes += s.fetched_bytes;
        self.fetched_chunks += s.fetched_chunks;
        self.removed += s.removed;
        self.warnings += s.warnings;
    }
}

/// Splits `--path` into tree names, refusing anything that could leave the snapshot root:
/// absolute paths and `..`. `.` components and a trailing `/` are harmless and dropped.
pub fn parse_subpath(path: &Path) -> Result<Vec<Vec<u8>>, RestoreError> {
    use std::os::unix::ffi::OsStrExt;
    let bad = || RestoreError::BadSubpath(path.to_string_lossy().into_owned());
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => {
                let n = n.as_bytes();
                if !is_safe_name(n) {
                    return Err(bad());
                }
                out.push(n.to_vec());
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => return Err(bad()),
        }
    }
    Ok(out)
}

/// A path relative to the snapshot root, for messages (lossy for names that are not UTF-8).
pub(crate) fn show(path: &[u8]) -> String {
    if path.is_empty() {
        "the snapshot root".into()
    } else {
        String::from_utf8_lossy(path).into_owned()
    }
}

/// `dir/name` as bytes.
pub(crate) fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    if !dir.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Ids are BLAKE3 output: their first eight bytes are already a good hash, so maps keyed
/// by them skip SipHash.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut x = [0u8; 8];
        let n = bytes.len().min(8);
        x[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(x);
    }
}

pub(crate) type IdMap<V> = HashMap<Id, V, BuildHasherDefault<IdHasher>>;

/// Chunks known to be all zero bytes, with their lengths. Sparse files (disk images, VM
/// disks) repeat the same few zero chunks thousands of times: once one is fetched and
/// verified, later uses are neither fetched nor written, only skipped over as holes.
#[derive(Default)]
pub(crate) struct ZeroChunks(Mutex<IdMap<u32>>);

impl ZeroChunks {
    /// Different chunk lengths of zeros are few; the cap only guards against oddities.
    const MAX: usize = 4096;

    pub(crate) fn get(&self, id: &Id) -> Option<u32> {
        self.0.lock().unwrap().get(id).copied()
    }

    pub(crate) fn insert(&self, id: Id, len: u32) {
        let mut m = self.0.lock().unwrap();
        if m.len() < Self::MAX {
            m.insert(id, len);
        }
    }
}

pub(crate) fn is_zero(data: &[u8]) -> bool {
    // Real data almost always fails on the first byte; zero runs are checked in blocks
    // that the compiler vectorizes (an early-exit loop per byte would not be).
    data.first().is_none_or(|&b| b == 0)
        && data
            .chunks(4096)
            .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Restores `req` from `source`. The first failure stops the restore; a file being
/// written when it happens is removed, never left with wrong bytes.
pub fn restore(source: &dyn BlobSource, req: &Request) -> Result<Stats, RestoreError> {
    sys::raise_fd_limit();
    let root = sys::Dir::open_path(&req.to).map_err(|source| RestoreError::Io {
        action: "open the restore target",
        path: req.to.display().to_string(),
        source,
    })?;
    let zeros = ZeroChunks::default();
    std::thread::scope(|s| {
        let zeros = &zeros;
        let (op_tx, op_rx) = sync_channel(OP_QUEUE);
        // Recursion depth follows directory depth; the stack is only reserved, not used.
        std::thread::Builder::new()
            .name("restore-plan".into())
            .stack_size(256 << 20)
            .spawn_scoped(s, || plan::run(source, req, op_tx))
            .expect("spawn the restore planner");
        let mut jobs = Vec::new();
        let mut results = Vec::new();
        for i in 0..FETCH_WORKERS {
            // Rendezvous channels: a worker holds at most the batch it fetches.
            let (job_tx, job_rx) = sync_channel(0);
            let (batch_tx, batch_rx) = sync_channel(0);
            std::thread::Builder::new()
                .name(format!("restore-fetch-{i}"))
                .spawn_scoped(s, move || fetch::work(source, zeros, job_rx, batch_tx))
                .expect("spawn a restore fetch worker");
            jobs.push(job_tx);
            results.push(batch_rx);
        }
        std::thread::Builder::new()
            .name("restore-batch".into())
            .spawn_scoped(s, move || fetch::batch(zeros, op_rx, jobs))
            .expect("spawn the restore batcher");
        let opts = write::WriterOptions {
            prune_from: req.prune.then(|| req.subpath.join(&b'/')),
            keep: req.keep.clone(),
            progress: req.progress.clone(),
        };
        let mut writer = write::Writer::new(root, zeros, opts);
        // Batches were dealt round-robin: taking them in the same order keeps them in
        // order. A worker with no more batches means there are none after it either.
        // Returning drops the receivers: workers, batcher and planner stop at their next
        // hand-over.
        for rx in results.iter().cycle() {
            let Ok(batch) = rx.recv() else { break };
            writer.apply(batch?)?;
        }
        writer.finish()
    })
}

#[cfg(test)]
pub(crate) mod testing {
    //! An in-memory blob source and helpers to build snapshots for the engine's tests.

    use super::*;
    use morgana_core::id::FileIdHasher;
    use morgana_core::pack::{BlobKind, Codec, Compression};
    use morgana_core::tree::{Content, Entry, Kind, Tree};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Kind, compression, stored bytes, raw length.
    type Stored = (BlobKind, Compression, Vec<u8>, u32);

    #[derive(Default)]
    pub struct MemSource {
        pub blobs: Mutex<IdMap<Stored>>,
        pub requests: AtomicUsize,
        pub requested_ids: AtomicUsize,
    }

    impl MemSource {
        pub fn put(&self, kind: BlobKind, raw: &[u8]) -> Id {
            let id = Id::of(raw);
            let mut out = Vec::new();
            let c = Codec::new(1).compress_into(raw, &mut out);
            self.blobs
                .lock()
                .unwrap()
                .insert(id, (kind, c, out, raw.len() as u32));
            id
        }

        pub fn tree(&self, mut t: Tree) -> Id {
            t.sort();
            self.put(BlobKind::Tree, &t.encode())
        }

        /// Flips a byte of a stored blob.
        pub fn damage(&self, id: Id) {
            let mut m = self.blobs.lock().unwrap();
            let stored = &mut m.get_mut(&id).unwrap().2;
            let i = stored.len() / 2;
            stored[i] ^= 1;
        }

        pub fn forget(&self, id: Id) {
            self.blobs.lock().unwrap().remove(&id);
        }

        /// A file entry whose content is split into `piece`-byte chunks.
        pub fn file(&self, name: &[u8], data: &[u8], piece: usize) -> Entry {
            let content = if data.is_empty() {
                Content::None
            } else if data.len() <= 512 {
                Content::Inline(data.to_vec())
            } else {
                let chunks: Vec<Id> = data
                    .chunks(piece)
                    .map(|c| self.put(BlobKind::Chunk, c))
                    .collect();
                Content::Chunks {
                    file: FileIdHasher::of(&chunks),
                    chunks,
                }
            };
            Entry {
                name: name.to_vec(),
                kind: Some(Kind::File),
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime_ns: 1_700_000_000_123_456_789,
                size: data.len() as u64,
                content,
                ..Default::default()
            }
        }

        pub fn dir(&self, name: &[u8], entries: Vec<Entry>) -> Entry {
            Entry {
                name: name.to_vec(),
                kind: Some(Kind::Dir),
                mode: 0o755,
                mtime_ns: 1_600_000_000_000_000_007,
                content: Content::Tree(self.tree(Tree { entries })),
                ..Default::default()
            }
        }
    }

    impl BlobSource for MemSource {
        fn fetch(&self, ids: &[Id], each: &mut OnBlob<'_>) -> Result<(), RestoreError> {
            assert!(ids.len() <= morgana_core::wire::MAX_IDS_PER_REQUEST);
            self.requests.fetch_add(1, Ordering::Relaxed);
            self.requested_ids.fetch_add(ids.len(), Ordering::Relaxed);
            for id in ids {
                let blob = self.blobs.lock().unwrap().get(id).cloned();
                match blob {
                    None => each(BlobFrame::missing(*id), &[])?,
                    Some((kind, compression, stored, raw_len)) => each(
                        BlobFrame {
                            id: *id,
                            kind: Some(kind),
                            compression,
                            raw_len,
                            stored_len: stored.len() as u32,
                        },
                        &stored,
                    )?,
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::MemSource;
    use super::*;
    use morgana_core::tree::{Content, Entry, Kind, Tree};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn request(src: &MemSource, entries: Vec<Entry>, to: &Path, subpath: &str) -> Request {
        Request::new(
            "s1".into(),
            src.tree(Tree { entries }),
            parse_subpath(Path::new(subpath)).unwrap(),
            to.to_path_buf(),
        )
    }

    use morgana_core::testdata::noise;

    #[test]
    fn subpaths_cannot_escape() {
        assert_eq!(
            parse_subpath(Path::new("home/./a/")).unwrap(),
            vec![b"home".to_vec(), b"a".to_vec()]
        );
        assert!(parse_subpath(Path::new("")).unwrap().is_empty());
        for bad in ["/etc", "a/../b", "..", "../x"] {
            assert!(parse_subpath(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn prune_makes_folders_equal_except_kept_paths() {
        let src = MemSource::default();
        let entries = vec![
            src.file(b"f", b"new", 1),
            src.dir(b"d", vec![src.file(b"a", &noise(3000, 1), 1000)]),
            src.dir(b"keep", vec![src.file(b"from-snapshot", b"x", 1)]),
        ];
        let tmp = tempfile::tempdir().unwrap();
        let to = tmp.path();
        std::fs::write(to.join("f"), b"old").unwrap();
        std::fs::write(to.join("x"), b"extra").unwrap();
        std::fs::create_dir_all(to.join("d/y/z")).unwrap();
        std::fs::write(to.join("d/a"), b"stale").unwrap();
        std::fs::create_dir(to.join("keep")).unwrap();
        std::fs::write(to.join("keep/mine"), b"kept").unwrap();
        std::os::unix::fs::symlink("/etc", to.join("link")).unwrap();
        let mut req = request(&src, entries, to, "");
        req.prune = true;
        req.keep = Some(Keep(Arc::new(|p: &[u8]| {
            p == b"keep" || p.starts_with(b"keep/")
        })));
        let progress = Arc::new(Progress::default());
        req.progress = Some(progress.clone());
        let stats = restore(&src, &req).unwrap();
        assert_eq!(std::fs::read(to.join("f")).unwrap(), b"new");
        assert_eq!(std::fs::read(to.join("d/a")).unwrap(), noise(3000, 1));
        assert_eq!(std::fs::read(to.join("keep/mine")).unwrap(), b"kept");
        assert!(!to.join("keep/from-snapshot").exists());
        let mut names: Vec<_> = std::fs::read_dir(to)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["d", "f", "keep"],
            "extra entries and temp names are gone"
        );
        assert!(!to.join("d/y").exists());
        assert_eq!(stats.removed, 3, "x, link and d/y");
        assert_eq!(progress.files.load(std::sync::atomic::Ordering::Relaxed), 2);
        // The symlink was removed, not followed.
        assert!(std::path::Path::new("/etc").is_dir());
    }

    #[test]
    fn prune_stays_inside_the_subpath() {
        let src = MemSource::default();
        let docs = src.dir(b"docs", vec![src.file(b"r.txt", b"report", 1)]);
        let a = src.dir(b"a", vec![docs, src.file(b"other", b"o", 1)]);
        let tmp = tempfile::tempdir().unwrap();
        let to = tmp.path();
        std::fs::create_dir_all(to.join("a/docs")).unwrap();
        std::fs::write(to.join("a/docs/r.txt"), b"edited").unwrap();
        std::fs::write(to.join("a/docs/extra"), b"added").unwrap();
        std::fs::write(to.join("a/unrelated"), b"stays").unwrap();
        std::fs::write(to.join("top"), b"stays").unwrap();
        let mut req = request(&src, vec![a], to, "a/docs");
        req.prune = true;
        let stats = restore(&src, &req).unwrap();
        assert_eq!(std::fs::read(to.join("a/docs/r.txt")).unwrap(), b"report");
        assert!(!to.join("a/docs/extra").exists());
        assert_eq!(std::fs::read(to.join("a/unrelated")).unwrap(), b"stays");
        assert_eq!(std::fs::read(to.join("top")).unwrap(), b"stays");
        assert!(!to.join("a/other").exists(), "only the subpath is restored");
        assert_eq!(stats.removed, 1);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&vec![0; 100_000]));
        let mut v = vec![0; 100_000];
        v[99_999] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn restores_files_dirs_links_and_metadata() {
        let src = MemSource::default();
        let big = noise(300_000, 5);
        let mut link = Entry {
            name: b"link".to_vec(),
            kind: Some(Kind::Symlink),
            mode: 0o777,
            mtime_ns: 1_500_000_000_000_000_001,
            symlink_target: b"../nowhere/\xff".to_vec(),
            ..Default::default()
        };
        link.uid = sys_uid();
        let mut fifo = Entry {
            name: b"pipe".to_vec(),
            kind: Some(Kind::Fifo),
            mode: 0o640,
            mtime_ns: 5,
            ..Default::default()
        };
        fifo.uid = sys_uid();
        let mut files = vec![
            src.file(b"empty", b"", 1),
            src.file(b"inline", b"hello", 1),
            src.file(b"big", &big, 70_000),
            src.file(b"\xe9t\xe9", b"latin1", 1),
            link,
            fifo,
        ];
        files[1].mode = 0o4755;
        files[1].xattrs = vec![(b"user.k".to_vec(), b"v\0x".to_vec())];
        let mut sub = src.dir(b"ro", vec![src.file(b"inner", &noise(2000, 1), 700)]);
        sub.mode = 0o555;
        files.push(sub);
        for e in &mut files {
            e.uid = sys_uid();
            e.gid = sys_gid();
        }
        let tmp = tempfile::tempdir().unwrap();
        let stats = restore(&src, &request(&src, files, tmp.path(), "")).unwrap();
        let p = tmp.path();
        assert_eq!(std::fs::read(p.join("big")).unwrap(), big);
        assert_eq!(std::fs::read(p.join("inline")).unwrap(), b"hello");
        assert_eq!(std::fs::read(p.join("empty")).unwrap(), b"");
        assert_eq!(std::fs::read(p.join("ro/inner")).unwrap(), noise(2000, 1));
        let m = std::fs::symlink_metadata(p.join("inline")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o4755);
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_700_000_000, 123_456_789));
        assert_eq!(
            xattr::get(p.join("inline"), "user.k").unwrap(),
            Some(b"v\0x".to_vec())
        );
        let ro = std::fs::symlink_metadata(p.join("ro")).unwrap();
        assert_eq!(ro.permissions().mode() & 0o7777, 0o555);
        assert_eq!((ro.mtime(), ro.mtime_nsec()), (1_600_000_000, 7));
        let l = std::fs::symlink_metadata(p.join("link")).unwrap();
        assert!(l.file_type().is_symlink());
        assert_eq!((l.mtime(), l.mtime_nsec()), (1_500_000_000, 1));
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(
            std::fs::read_link(p.join("link"))
                .unwrap()
                .as_os_str()
                .as_bytes(),
            b"../nowhere/\xff"
        );
        use std::os::unix::fs::FileTypeExt;
        assert!(
            std::fs::symlink_metadata(p.join("pipe"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        assert_eq!(
            std::fs::read(p.join(std::ffi::OsStr::from_bytes(b"\xe9t\xe9"))).unwrap(),
            b"latin1"
        );
        assert_eq!(stats.files, 5);
        assert_eq!(stats.dirs, 1);
        assert_eq!(stats.symlinks, 1);
        assert_eq!(stats.specials, 1);
        // No temporary names are left behind.
        let names: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 7, "{names:?}");
        // Let the tempdir clean up a read-only directory.
        std::fs::set_permissions(p.join("ro"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn sys_uid() -> u32 {
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() }
    }
    fn sys_gid() -> u32 {
        // SAFETY: no preconditions.
        unsafe { libc::getegid() }
    }

    #[test]
    fn zero_chunks_become_holes_and_are_fetched_once() {
        let src = MemSource::default();
        let piece = 64 * 1024;
        let mut data = noise(piece, 3);
        data.extend(vec![0u8; 200 * piece]);
        data.extend(noise(100, 4));
        let mut e = src.file(b"sparse", &data, piece);
        e.uid = sys_uid();
        e.gid = sys_gid();
        let tmp = tempfile::tempdir().unwrap();
        let stats = restore(&src, &request(&src, vec![e], tmp.path(), "")).unwrap();
        let f = tmp.path().join("sparse");
        assert_eq!(std::fs::read(&f).unwrap(), data);
        let m = std::fs::metadata(&f).unwrap();
        assert!(
            m.blocks() * 512 < 1 << 20,
            "restored dense: {} blocks",
            m.blocks()
        );
        // Three distinct chunks: noise, zeros, the tail.
        assert_eq!(stats.fetched_chunks, 3);
    }

    #[test]
    fn trailing_zero_chunk_keeps_the_size() {
        let src = MemSource::default();
        let mut data = noise(1000, 3);
        data.extend(vec![0u8; 5000]);
        let mut e = src.file(b"f", &data, 1000);
        e.uid = sys_uid();
        e.gid = sys_gid();
        let tmp = tempfile::tempdir().unwrap();
        restore(&src, &request(&src, vec![e], tmp.path(), "")).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("f")).unwrap(), data);
    }

    #[test]
    fn hardlinks_are_linked_not_copied() {
        let src = MemSource::default();
        let data = noise(5000, 9);
        let mut a = src.file(b"a", &data, 1000);
        a.hardlink = 7;
        let mut b = a.clone();
        b.name = b"b".to_vec();
        let mut c = src.file(b"c", b"different", 1);
        c.hardlink = 8;
        let d = src.dir(b"d", vec![b.clone()]);
        let entries = vec![a, c, d];
        let tmp = tempfile::tempdir().unwrap();
        let stats = restore(&src, &request(&src, entries, tmp.path(), "")).unwrap();
        let ma = std::fs::metadata(tmp.path().join("a")).unwrap();
        let mb = std::fs::metadata(tmp.path().join("d/b")).unwrap();
        assert_eq!(ma.ino(), mb.ino());
        assert_eq!(ma.nlink(), 2);
        assert_eq!(std::fs::metadata(tmp.path().join("c")).unwrap().nlink(), 1);
        assert_eq!(stats.hardlinks, 1);
        // Restoring only the directory: its file is the first of its group there.
        let part = tempfile::tempdir().unwrap();
        restore(&src, &request(&src, vec![], part.path(), "")).unwrap();
        let src2 = MemSource::default();
        let mut a2 = src2.file(b"a", &data, 1000);
        a2.hardlink = 7;
        let mut b2 = a2.clone();
        b2.name = b"b".to_vec();
        let d2 = src2.dir(b"d", vec![b2]);
        let req = request(&src2, vec![a2, d2], part.path(), "d");
        restore(&src2, &req).unwrap();
        assert_eq!(std::fs::read(part.path().join("d/b")).unwrap(), data);
        assert!(!part.path().join("a").exists());
    }

    #[test]
    fn subpath_restores_at_its_relative_place() {
        let src = MemSource::default();
        let docs = src.dir(b"docs", vec![src.file(b"r.txt", b"report", 1)]);
        let a = src.dir(b"a", vec![docs, src.file(b"other", b"o", 1)]);
        let home = src.dir(b"home", vec![a]);
        let tmp = tempfile::tempdir().unwrap();
        let req = request(
            &src,
            vec![home.clone(), src.file(b"top", b"t", 1)],
            tmp.path(),
            "home/a/docs",
        );
        restore(&src, &req).unwrap();
        assert_eq!(
            std::fs::read(tmp.path().join("home/a/docs/r.txt")).unwrap(),
            b"report"
        );
        assert!(!tmp.path().join("home/a/other").exists());
        assert!(!tmp.path().join("top").exists());
        // A single file.
        let one = tempfile::tempdir().unwrap();
        let req = request(&src, vec![home.clone()], one.path(), "home/a/other");
        restore(&src, &req).unwrap();
        assert_eq!(
            std::fs::read(one.path().join("home/a/other")).unwrap(),
            b"o"
        );
        // Unknown paths, and paths through a file: nothing is written.
        for missing in ["home/b", "home/a/other/x"] {
            let none = tempfile::tempdir().unwrap();
            let req = request(&src, vec![home.clone()], none.path(), missing);
            let err = restore(&src, &req).unwrap_err();
            assert!(
                matches!(err, RestoreError::NoSuchPath { .. }),
                "{missing}: {err}"
            );
            assert!(err.to_string().contains(missing), "{err}");
            assert!(std::fs::read_dir(none.path()).unwrap().next().is_none());
        }
    }

    #[test]
    fn a_damaged_chunk_fails_naming_file_and_chunk_and_leaves_nothing() {
        let src = MemSource::default();
        let data = noise(10_000, 2);
        let e = src.file(b"thesis.pdf", &data, 3000);
        let Content::Chunks { chunks, .. } = &e.content else {
            unreachable!()
        };
        let bad = chunks[2];
        src.damage(bad);
        let docs = src.dir(b"docs", vec![e]);
        let tmp = tempfile::tempdir().unwrap();
        let err = restore(&src, &request(&src, vec![docs], tmp.path(), "")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("docs/thesis.pdf"), "{msg}");
        assert!(msg.contains(&bad.to_hex()), "{msg}");
        let left: Vec<_> = std::fs::read_dir(tmp.path().join("docs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    #[test]
    fn a_missing_chunk_fails_too() {
        let src = MemSource::default();
        let e = src.file(b"f", &noise(4000, 2), 1000);
        let Content::Chunks { chunks, .. } = &e.content else {
            unreachable!()
        };
        src.forget(chunks[3]);
        let tmp = tempfile::tempdir().unwrap();
        let err = restore(&src, &request(&src, vec![e], tmp.path(), "")).unwrap_err();
        assert!(matches!(err, RestoreError::DamagedChunk { .. }), "{err}");
        assert!(!tmp.path().join("f").exists());
    }

    #[test]
    fn a_wrong_whole_file_id_is_caught() {
        let src = MemSource::default();
        let mut e = src.file(b"f", &noise(4000, 2), 1000);
        if let Content::Chunks { file, .. } = &mut e.content {
            *file = Id::of(b"not this");
        }
        let tmp = tempfile::tempdir().unwrap();
        let err = restore(&src, &request(&src, vec![e], tmp.path(), "")).unwrap_err();
        assert!(matches!(err, RestoreError::FileMismatch { .. }), "{err}");
        assert!(!tmp.path().join("f").exists());
    }

    #[test]
    fn hostile_names_are_refused_with_the_directory() {
        let src = MemSource::default();
        let mut evil = src.file(b"x", b"pwned", 1);
        evil.name = b"../../etc/passwd".to_vec();
        // Build the hostile tree by hand: Tree::decode would refuse it, encode does not.
        let bad = src.put(
            morgana_core::pack::BlobKind::Tree,
            &Tree {
                entries: vec![evil],
            }
            .encode(),
        );
        let dir = Entry {
            name: b"inner".to_vec(),
            kind: Some(Kind::Dir),
            mode: 0o755,
            content: Content::Tree(bad),
            ..Default::default()
        };
        let outer = src.dir(b"outer", vec![dir]);
        let tmp = tempfile::tempdir().unwrap();
        let to = tmp.path().join("to");
        std::fs::create_dir(&to).unwrap();
        let err = restore(&src, &request(&src, vec![outer], &to, "")).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, RestoreError::HostileName { .. }), "{msg}");
        assert!(msg.contains("outer/inner"), "{msg}");
        assert!(!tmp.path().join("etc").exists());
    }

    #[test]
    fn overwrite_replaces_conflicts_without_following_symlinks() {
        let src = MemSource::default();
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let to = tmp.path().join("to");
        std::fs::create_dir(&to).unwrap();
        // The target has: a symlink where a directory goes, a symlink where a file goes,
        // a directory where a file goes, a file where a directory goes.
        std::os::unix::fs::symlink(&outside, to.join("d")).unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), to.join("f")).unwrap();
        std::fs::create_dir_all(to.join("g/sub")).unwrap();
        std::fs::write(to.join("h"), b"old").unwrap();
        std::fs::write(to.join("keep"), b"unrelated").unwrap();
        let entries = vec![
            src.dir(b"d", vec![src.file(b"inside", &noise(3000, 1), 1000)]),
            src.file(b"f", &noise(3000, 2), 1000),
            src.file(b"g", b"small", 1),
            src.dir(b"h", vec![]),
        ];
        restore(&src, &request(&src, entries, &to, "")).unwrap();
        assert!(
            std::fs::read_dir(&outside).unwrap().next().is_none(),
            "wrote outside --to"
        );
        assert_eq!(std::fs::read(to.join("d/inside")).unwrap(), noise(3000, 1));
        assert!(std::fs::symlink_metadata(to.join("d")).unwrap().is_dir());
        assert_eq!(std::fs::read(to.join("f")).unwrap(), noise(3000, 2));
        assert_eq!(std::fs::read(to.join("g")).unwrap(), b"small");
        assert!(std::fs::symlink_metadata(to.join("h")).unwrap().is_dir());
        assert_eq!(std::fs::read(to.join("keep")).unwrap(), b"unrelated");
    }

    #[test]
    fn an_answer_out_of_order_or_short_is_refused() {
        /// Answers with the blobs asked for, reversed and without the last one.
        struct Muddled(MemSource);
        impl BlobSource for Muddled {
            fn fetch(&self, ids: &[Id], each: &mut OnBlob<'_>) -> Result<(), RestoreError> {
                let mut reversed = ids.to_vec();
                reversed.reverse();
                self.0.fetch(&reversed[..ids.len() - 1], each)
            }
        }
        let src = Muddled(MemSource::default());
        let a = src.0.put(morgana_core::pack::BlobKind::Chunk, b"a");
        let b = src.0.put(morgana_core::pack::BlobKind::Chunk, b"b");
        let err = fetch_in_order(&src, &[a, b], "chunk", &mut |_, _| Ok(())).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("asked for chunk {a}, got blob {b}")),
            "{msg}"
        );
        assert!(msg.contains("same Morgana version"), "{msg}");
        let err = fetch_in_order(&src, &[a, a], "chunk", &mut |_, _| Ok(())).unwrap_err();
        assert!(
            err.to_string()
                .contains("asked for 2 chunks, the answer ended after 1")
        );
    }

    #[test]
    fn wide_and_deep_trees_are_read_ahead_in_few_requests() {
        // 600 directories one level down (more than one read-ahead request takes), their
        // entries together past the read-ahead's budget, identical empty directories
        // sharing one tree, and a kept directory whose trees are never fetched.
        let src = MemSource::default();
        let empty = src.dir(b"e", Vec::new());
        let leaf = |i: usize, j: usize| {
            let mut files: Vec<Entry> = (0..60)
                .map(|k| {
                    src.file(
                        format!("f{k}").as_bytes(),
                        format!("{i}/{j}/{k}").as_bytes(),
                        1,
                    )
                })
                .collect();
            files.push(empty.clone());
            src.dir(format!("d{j:03}").as_bytes(), files)
        };
        let mut top: Vec<Entry> = (0..6)
            .map(|i| {
                src.dir(
                    format!("t{i}").as_bytes(),
                    (0..100).map(|j| leaf(i, j)).collect(),
                )
            })
            .collect();
        let kept_tree = src.dir(b"kept", vec![src.dir(b"below", Vec::new())]);
        let Content::Tree(kept_id) = kept_tree.content else {
            unreachable!()
        };
        top.push(kept_tree);
        let tmp = tempfile::tempdir().unwrap();
        let mut req = request(&src, top, tmp.path(), "");
        req.keep = Some(Keep(Arc::new(|p: &[u8]| p.starts_with(b"kept"))));
        let stats = restore(&src, &req).unwrap();
        assert_eq!(stats.files, 6 * 100 * 60);
        assert_eq!(
            std::fs::read(tmp.path().join("t5/d099/f59")).unwrap(),
            b"5/99/59"
        );
        assert!(tmp.path().join("t0/d000/e").is_dir());
        assert!(!tmp.path().join("kept").exists());
        // The walk before the read-ahead made a request per directory with subdirectories
        // (over 600 here); inline files need none. The 600 leaves' 37k entries are more than
        // the read-ahead holds at once, so they come in a few requests.
        let requests = src.requests.load(std::sync::atomic::Ordering::Relaxed);
        assert!(requests <= 10, "{requests} requests");
        src.forget(kept_id);
        let again = tempfile::tempdir().unwrap();
        req.to = again.path().to_path_buf();
        restore(&src, &req).expect("the kept directory's tree is not needed");
    }

    #[test]
    fn many_small_files_share_few_requests() {
        let src = MemSource::default();
        let files: Vec<Entry> = (0..3000)
            .map(|i| {
                src.file(
                    format!("f{i:05}").as_bytes(),
                    &noise(600 + i, i as u64),
                    4096,
                )
            })
            .collect();
        let dirs: Vec<Entry> = (0..50)
            .map(|i| {
                src.dir(
                    format!("d{i}").as_bytes(),
                    vec![src.file(b"x", &noise(900, 7), 4096)],
                )
            })
            .collect();
        let mut entries = files;
        entries.extend(dirs);
        let tmp = tempfile::tempdir().unwrap();
        let stats = restore(&src, &request(&src, entries, tmp.path(), "")).unwrap();
        assert_eq!(stats.files, 3050);
        // The 50 identical files in 50 directories are one chunk; the 50 subtrees are
        // fetched together.
        let requests = src.requests.load(std::sync::atomic::Ordering::Relaxed);
        assert!(requests <= 8, "{requests} requests");
        assert_eq!(
            std::fs::read(tmp.path().join("f02999")).unwrap(),
            noise(3599, 2999)
        );
    }
}
