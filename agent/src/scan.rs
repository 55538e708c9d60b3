//! Scanning: the walk of the protected root, the metadata of each entry, and reading files
//! into chunks.
//!
//! The walker goes depth first with children sorted by name bytes, never follows symlinks
//! and never crosses into another filesystem (a mount point is kept as an empty directory).
//! It leaves out the policy's unprotected area (paths as seen from the root: `/home/a/x`
//! for `<root>/home/a/x`), skipping a folder's whole subtree without reading it when no
//! exception can reach inside.
//!
//! It finishes directories in post-order: once a directory's subdirectories are done, it
//! looks the directory up in the files cache, sends the files that changed to the readers,
//! and hands the directory to the finaliser as a [`DirEvent`] whose file entries are either
//! complete or waiting on a reader's answer. The cache is keyed by folder path and file
//! name, so a policy change costs no reads of files still protected: folders left out are
//! simply not looked up, and folders taken back have no record, so only their files are
//! read.

use std::ffi::OsStr;
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Seek};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender};
use morgana_core::Chunker;
use morgana_core::pack::BlobKind;
use morgana_core::policy::{Area, Standing};
use morgana_core::tree::{Content, Entry, INLINE_MAX, Kind};
use serde::Serialize;

use crate::cache::{CacheReader, FileKey};
use crate::upload::{BlobSink, UploadError};

/// How often a file that changes while it is read is read again before it is kept as is.
pub const REREADS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot read the protected root {path}: {source}")]
    Root { path: PathBuf, source: io::Error },
    /// Another stage failed first; its error is the one to report.
    #[error("the scan was cancelled")]
    Cancelled,
}

/// An entry left out of the snapshot, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub path: String,
    pub error: String,
}

/// What the scan tells the user besides the snapshot itself.
#[derive(Default)]
pub struct Report {
    pub skipped: Mutex<Vec<Skipped>>,
    pub changed_while_reading: Mutex<Vec<String>>,
    /// Files actually read (cache misses).
    pub files_read: AtomicU64,
    pub bytes_read: AtomicU64,
}

impl Report {
    pub fn skip(&self, path: &Path, error: &dyn std::fmt::Display) {
        tracing::warn!(path = %path.display(), %error, "skipped");
        self.skipped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Skipped {
                path: path.display().to_string(),
                error: error.to_string(),
            });
    }
}

/// The parts of `lstat`/`fstat` a snapshot needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

fn ns(sec: i64, nsec: i64) -> i64 {
    sec.saturating_mul(1_000_000_000).saturating_add(nsec)
}

impl Stat {
    pub fn of(m: &Metadata) -> Stat {
        Stat {
            dev: m.dev(),
            ino: m.ino(),
            mode: m.mode(),
            nlink: m.nlink(),
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }

    pub fn kind(&self) -> Option<Kind> {
        Some(match self.mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            libc::S_IFSOCK => Kind::Socket,
            _ => return None,
        })
    }

    pub fn key(&self) -> FileKey {
        FileKey {
            size: self.size,
            mtime_ns: self.mtime_ns,
            ctime_ns: self.ctime_ns,
            ino: self.ino,
            dev: self.dev,
        }
    }

    /// Whether the file may have changed between two stats.
    fn same_content(&self, other: &Stat) -> bool {
        self.size == other.size
            && self.mtime_ns == other.mtime_ns
            && self.ctime_ns == other.ctime_ns
    }
}

/// Copies what a stat says into an entry (everything but content, target and xattrs).
pub fn apply_stat(e: &mut Entry, st: &Stat, kind: Kind) {
    e.kind = Some(kind);
    e.mode = st.mode & 0o7777;
    e.uid = st.uid;
    e.gid = st.gid;
    e.mtime_ns = st.mtime_ns;
    // Directory sizes are filesystem bookkeeping: recording them would only make trees
    // differ where nothing a restore can reproduce differs.
    e.size = match kind {
        Kind::File | Kind::Symlink => st.size,
        _ => 0,
    };
    e.rdev = match kind {
        Kind::CharDevice | Kind::BlockDevice => st.rdev,
        _ => 0,
    };
    // The inode number is unique within the one filesystem a snapshot covers; 0 means "no
    // hard link", so an inode 0 (never seen on Linux) is mapped away from it.
    e.hardlink = if kind == Kind::File && st.nlink > 1 {
        st.ino.max(1)
    } else {
        0
    };
}

/// An entry's metadata as the snapshot records it, without file content.
pub fn entry_of(name: &[u8], path: &Path, st: &Stat) -> io::Result<Entry> {
    let kind = st
        .kind()
        .ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "unknown file type"))?;
    let mut e = Entry {
        name: name.to_vec(),
        ..Default::default()
    };
    apply_stat(&mut e, st, kind);
    if kind == Kind::Symlink {
        e.symlink_target = fs::read_link(path)?.into_os_string().into_vec();
    }
    e.xattrs = xattrs_of(path);
    Ok(e)
}

/// Extended attributes of `path` itself (never of a symlink's target), sorted by name.
/// Filesystems without xattrs have none; other failures are logged and also give none,
/// because losing an attribute is better than losing the file.
pub fn xattrs_of(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) => {
            if !is_unsupported(&e) {
                tracing::warn!(path = %path.display(), error = %e, "cannot list extended attributes");
            }
            return Vec::new();
        }
    };
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = names
        .filter_map(|name| match xattr::get(path, &name) {
            Ok(Some(v)) => Some((name.into_vec(), v)),
            Ok(None) => None,
            Err(e) => {
                if !is_unsupported(&e) {
                    tracing::warn!(path = %path.display(), name = ?name, error = %e, "cannot read an extended attribute");
                }
                None
            }
        })
        .collect();
    out.sort();
    out
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::ENODATA))
        || e.kind() == io::ErrorKind::Unsupported
}

/// One child of a finished directory, as the finaliser receives it.
pub enum Pending {
    /// Complete; regular files carry the key the cache records for them.
    Ready(Entry, Option<FileKey>),
    /// A subdirectory: its tree id is the finaliser's to fill, from the directories it
    /// finished just before this one.
    Subdir(Entry),
    /// A file a reader is reading.
    Read(Entry, PathBuf, Receiver<ReadOutcome>),
}

/// A finished directory, in walk post-order.
pub struct DirEvent {
    /// Relative to the root, names joined by `/`; empty for the root.
    pub rel: Vec<u8>,
    /// Sorted by name.
    pub entries: Vec<Pending>,
    /// How many entries are [`Pending::Subdir`].
    pub subdirs: usize,
    /// The tree this directory had in the last committed snapshot.
    pub cached_tree: Option<morgana_core::Id>,
}

pub struct ReadJob {
    pub path: PathBuf,
    pub reply: Sender<ReadOutcome>,
}

pub struct FileRead {
    pub content: Content,
    /// Bytes actually read.
    pub size: u64,
    /// The file's stat just before the read that was kept.
    pub stat: Stat,
    /// The file kept changing: content and stat may disagree.
    pub changed: bool,
}

pub enum ReadFailure {
    /// Deleted between the walk and the read: left out without a word.
    Vanished,
    Unreadable(io::Error),
    Cancelled,
}

pub type ReadOutcome = Result<FileRead, ReadFailure>;

/// Walks the tree under `root` and emits every directory to `events`.
pub struct Walker<'a> {
    pub root: PathBuf,
    pub root_dev: u64,
    /// The agent's state directory (dev, inode), left out when it lies under the root,
    /// whatever the policy says.
    pub skip: Option<(u64, u64)>,
    /// What the policy leaves out.
    pub unprotected: Area,
    pub cache: Option<CacheReader>,
    pub jobs: Sender<ReadJob>,
    pub events: Sender<DirEvent>,
    pub report: &'a Report,
}

enum WalkError {
    /// This directory cannot be read: leave it out.
    Skip(io::Error),
    Cancelled,
}

impl Walker<'_> {
    pub fn run(mut self) -> Result<(), ScanError> {
        let mut abs = self.root.clone();
        let mut rel = Vec::new();
        match self.walk(&mut abs, &mut rel, Standing::default()) {
            Ok(()) => Ok(()),
            Err(WalkError::Cancelled) => Err(ScanError::Cancelled),
            Err(WalkError::Skip(source)) => Err(ScanError::Root {
                path: self.root.clone(),
                source,
            }),
        }
    }

    fn walk(
        &mut self,
        abs: &mut PathBuf,
        rel: &mut Vec<u8>,
        standing: Standing,
    ) -> Result<(), WalkError> {
        let mut children: Vec<(Vec<u8>, Stat)> = Vec::new();
        for de in fs::read_dir(&*abs).map_err(WalkError::Skip)? {
            let de = de.map_err(WalkError::Skip)?;
            let name = de.file_name().into_vec();
            // DirEntry::metadata is an fstatat relative to the open directory, without
            // following symlinks.
            match de.metadata() {
                Ok(m) => children.push((name, Stat::of(&m))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => self.report.skip(&abs.join(OsStr::from_bytes(&name)), &e),
            }
        }
        children.sort_unstable_by(|a, b| a.0.cmp(&b.0));

        let mut entries: Vec<(Entry, Stat, Standing)> = Vec::with_capacity(children.len());
        // The policy path of a child: `/` + rel + `/` + name.
        let mut policy_path = Vec::with_capacity(rel.len() + 64);
        policy_path.push(b'/');
        policy_path.extend_from_slice(rel);
        if !rel.is_empty() {
            policy_path.push(b'/');
        }
        let parent_len = policy_path.len();
        for (name, st) in children {
            let is_dir = st.kind() == Some(Kind::Dir);
            if is_dir && self.skip == Some((st.dev, st.ino)) {
                continue;
            }
            policy_path.truncate(parent_len);
            policy_path.extend_from_slice(&name);
            let child = self.unprotected.child(standing, &policy_path);
            if child.in_area() {
                // A folder in the area is still walked when an exception may match beneath
                // it: it is the way to what the exception keeps.
                if !is_dir || self.unprotected.covers_subtree(child, &policy_path) {
                    continue;
                }
            }
            abs.push(OsStr::from_bytes(&name));
            match entry_of(&name, abs, &st) {
                Ok(e) => entries.push((e, st, child)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => self.report.skip(abs, &e),
            }
            abs.pop();
        }

        // Subdirectories first: their trees must exist before this one's.
        let mut gone = Vec::new();
        for (i, (e, st, child)) in entries.iter().enumerate() {
            if e.kind() != Kind::Dir {
                continue;
            }
            let len = rel.len();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(&e.name);
            abs.push(OsStr::from_bytes(&e.name));
            let res = if st.dev != self.root_dev {
                // A mount point: kept as an empty directory, its filesystem is not ours.
                self.emit(rel, Vec::new(), 0)
            } else {
                self.walk(abs, rel, *child)
            };
            match res {
                Ok(()) => {}
                Err(WalkError::Skip(err)) => {
                    if err.kind() != io::ErrorKind::NotFound {
                        self.report.skip(abs, &err);
                    }
                    gone.push(i);
                }
                Err(WalkError::Cancelled) => return Err(WalkError::Cancelled),
            }
            abs.pop();
            rel.truncate(len);
        }
        for i in gone.into_iter().rev() {
            entries.remove(i);
        }

        let record = self.cache.as_mut().and_then(|c| c.lookup(rel));
        let mut pending = Vec::with_capacity(entries.len());
        let mut subdirs = 0;
        for (mut e, st, _) in entries {
            match e.kind() {
                Kind::Dir => {
                    subdirs += 1;
                    pending.push(Pending::Subdir(e));
                }
                Kind::File if st.size == 0 => {
                    // Nothing to read; the key still goes to the cache for consistency.
                    pending.push(Pending::Ready(e, Some(st.key())));
                }
                Kind::File => {
                    let key = st.key();
                    if let Some(content) = record.as_ref().and_then(|r| r.content(&e.name, &key)) {
                        e.content = content.clone();
                        pending.push(Pending::Ready(e, Some(key)));
                    } else {
                        let path = abs.join(OsStr::from_bytes(&e.name));
                        let (tx, rx) = crossbeam_channel::bounded(1);
                        self.jobs
                            .send(ReadJob {
                                path: path.clone(),
                                reply: tx,
                            })
                            .map_err(|_| WalkError::Cancelled)?;
                        pending.push(Pending::Read(e, path, rx));
                    }
                }
                _ => pending.push(Pending::Ready(e, None)),
            }
        }
        let cached_tree = record.map(|r| r.tree);
        self.events
            .send(DirEvent {
                rel: rel.clone(),
                entries: pending,
                subdirs,
                cached_tree,
            })
            .map_err(|_| WalkError::Cancelled)
    }

    fn emit(&mut self, rel: &[u8], entries: Vec<Pending>, subdirs: usize) -> Result<(), WalkError> {
        let cached_tree = self
            .cache
            .as_mut()
            .and_then(|c| c.lookup(rel))
            .map(|r| r.tree);
        self.events
            .send(DirEvent {
                rel: rel.to_vec(),
                entries,
                subdirs,
                cached_tree,
            })
            .map_err(|_| WalkError::Cancelled)
    }
}

/// Serves read jobs until the walker is done; run one per core.
pub fn reader(
    jobs: Receiver<ReadJob>,
    sink: BlobSink,
    report: &Report,
    progress: &indicatif::ProgressBar,
) -> Result<(), UploadError> {
    let mut chunker = Chunker::new(Default::default()).expect("default chunker params are valid");
    for job in jobs {
        if sink.is_cancelled() {
            return Err(UploadError::Cancelled);
        }
        let outcome = read_file(&job.path, &mut chunker, &sink);
        if let Ok(r) = &outcome {
            report.files_read.fetch_add(1, Ordering::Relaxed);
            report.bytes_read.fetch_add(r.size, Ordering::Relaxed);
            progress.inc(r.size);
        }
        let cancelled = matches!(outcome, Err(ReadFailure::Cancelled));
        // The finaliser may be gone after a failure elsewhere; nothing to tell it then.
        let _ = job.reply.send(outcome);
        if cancelled {
            return Err(UploadError::Cancelled);
        }
    }
    Ok(())
}

fn open_for_reading(path: &Path) -> io::Result<File> {
    // O_NOFOLLOW: the entry was a regular file when walked; if it has been swapped for a
    // symlink since, do not read through it. O_NONBLOCK: nor block on a swapped-in FIFO.
    let base = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    match fs::OpenOptions::new()
        .read(true)
        .custom_flags(base | libc::O_NOATIME)
        .open(path)
    {
        // O_NOATIME is refused on files we do not own (without CAP_FOWNER).
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => fs::OpenOptions::new()
            .read(true)
            .custom_flags(base)
            .open(path),
        other => other,
    }
}

enum ChunkFail {
    Io(io::Error),
    Cancelled,
}

impl From<io::Error> for ChunkFail {
    fn from(e: io::Error) -> Self {
        ChunkFail::Io(e)
    }
}

/// Reads one file into content, re-reading it when it changes underneath.
pub fn read_file(path: &Path, chunker: &mut Chunker, sink: &BlobSink) -> ReadOutcome {
    let fail = |e: io::Error| {
        if e.kind() == io::ErrorKind::NotFound {
            ReadFailure::Vanished
        } else {
            ReadFailure::Unreadable(e)
        }
    };
    let mut file = open_for_reading(path).map_err(fail)?;
    let mut attempt = 0;
    loop {
        let before = Stat::of(&file.metadata().map_err(fail)?);
        if before.kind() != Some(Kind::File) {
            return Err(ReadFailure::Unreadable(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no longer a regular file",
            )));
        }
        if attempt > 0 {
            file.rewind().map_err(fail)?;
        }
        let (content, size) = match read_content(&mut file, before.size, chunker, sink) {
            Ok(r) => r,
            Err(ChunkFail::Io(e)) => return Err(fail(e)),
            Err(ChunkFail::Cancelled) => return Err(ReadFailure::Cancelled),
        };
        let after = Stat::of(&file.metadata().map_err(fail)?);
        let changed = !before.same_content(&after) || size != before.size;
        if !changed || attempt == REREADS {
            return Ok(FileRead {
                content,
                size,
                stat: before,
                changed,
            });
        }
        attempt += 1;
    }
}

fn read_content(
    file: &mut File,
    expected: u64,
    chunker: &mut Chunker,
    sink: &BlobSink,
) -> Result<(Content, u64), ChunkFail> {
    // Never past the size the stat gave: a file that keeps growing (a busy log) must not
    // keep the reader forever. Growth shows in the stat after the read.
    let mut limited = file.by_ref().take(expected);
    if expected <= INLINE_MAX {
        let mut buf = Vec::with_capacity(expected as usize);
        limited.read_to_end(&mut buf)?;
        let size = buf.len() as u64;
        let content = if buf.is_empty() {
            Content::None
        } else {
            Content::Inline(buf)
        };
        return Ok((content, size));
    }
    // A file that shrank to inline size while being read still needs its bytes inline.
    let mut small: Option<Vec<u8>> = None;
    // Runs of one chunk (zeros in sparse or preallocated files) are offered once.
    let mut previous: Option<morgana_core::Id> = None;
    let chunked = chunker.chunk(limited, |id, bytes| {
        if bytes.len() as u64 <= INLINE_MAX {
            small = Some(bytes.to_vec());
        }
        if previous == Some(id) {
            return Ok(());
        }
        previous = Some(id);
        sink.send(id, BlobKind::Chunk, bytes.to_vec())
            .map_err(|_| ChunkFail::Cancelled)
    })?;
    let content = match chunked.size {
        0 => Content::None,
        n if n <= INLINE_MAX => Content::Inline(small.unwrap_or_default()),
        _ => Content::Chunks {
            file: chunked.file_id,
            chunks: chunked.chunks,
        },
    };
    Ok((content, chunked.size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn lstat(p: &Path) -> Stat {
        Stat::of(&fs::symlink_metadata(p).unwrap())
    }

    #[test]
    fn metadata_maps_to_entries() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let f = d.join("f");
        fs::write(&f, b"hello").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o4751)).unwrap();
        let e = entry_of(b"f", &f, &lstat(&f)).unwrap();
        assert_eq!(e.kind, Some(Kind::File));
        assert_eq!(e.mode, 0o4751);
        assert_eq!(e.size, 5);
        assert_eq!(e.hardlink, 0);
        let m = fs::metadata(&f).unwrap();
        assert_eq!(e.mtime_ns, m.mtime() * 1_000_000_000 + m.mtime_nsec());

        // Hard links share a non-zero id.
        fs::hard_link(&f, d.join("g")).unwrap();
        let a = entry_of(b"f", &f, &lstat(&f)).unwrap();
        let b = entry_of(b"g", &d.join("g"), &lstat(&d.join("g"))).unwrap();
        assert_ne!(a.hardlink, 0);
        assert_eq!(a.hardlink, b.hardlink);

        // Symlinks are never followed; their target is kept as bytes.
        let l = d.join("l");
        symlink(OsStr::from_bytes(b"../nowhere\xff"), &l).unwrap();
        let e = entry_of(b"l", &l, &lstat(&l)).unwrap();
        assert_eq!(e.kind, Some(Kind::Symlink));
        assert_eq!(e.symlink_target, b"../nowhere\xff");

        // FIFOs are recorded, not opened.
        let p = d.join("p");
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: c is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o640) }, 0);
        let e = entry_of(b"p", &p, &lstat(&p)).unwrap();
        assert_eq!((e.kind, e.mode), (Some(Kind::Fifo), 0o640));

        let sub = d.join("sub");
        fs::create_dir(&sub).unwrap();
        let e = entry_of(b"sub", &sub, &lstat(&sub)).unwrap();
        assert_eq!((e.kind, e.size), (Some(Kind::Dir), 0));
    }

    #[test]
    fn xattrs_are_read_sorted_when_supported() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        fs::write(&f, b"").unwrap();
        if xattr::set(&f, "user.zz", b"2").is_err() {
            eprintln!("no user xattrs on this filesystem; skipping");
            return;
        }
        xattr::set(&f, "user.aa", b"\x00\x01").unwrap();
        let got = xattrs_of(&f);
        let user: Vec<_> = got
            .iter()
            .filter(|(k, _)| k.starts_with(b"user."))
            .cloned()
            .collect();
        assert_eq!(
            user,
            vec![
                (b"user.aa".to_vec(), vec![0, 1]),
                (b"user.zz".to_vec(), b"2".to_vec())
            ]
        );
    }
}
