//! The writer: creates what the batches describe below `--to`.
//!
//! It keeps one open descriptor per directory from `--to` down to the current one and
//! creates every entry as (directory descriptor, name): nothing is ever looked up through
//! a path that a symlink could redirect. A chunked file is written under a temporary name
//! in its directory and renamed into place only after every chunk verified and the
//! whole-file id matched; on failure the temporary file is removed. In a directory this
//! restore created (or a target that was empty), no name can be taken, so files are
//! written under their own names: a rename is the costliest step of a small file.
//!
//! Metadata order matters: owner first (chown clears setuid/setgid and file
//! capabilities), then xattrs, then mode, then mtime last (everything before touches it);
//! a directory's metadata is set when it is left, after its children are written.

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use morgana_core::Id;
use morgana_core::id::FileIdHasher;
use morgana_core::tree::{Content, Entry, Kind};
use xattr::FileExt as _;

use super::fetch::{Batch, Blob, Item};
use super::plan::{Node, Op};
use super::sys::{self, Dir, Existing, cname};
use super::{IdMap, Keep, Progress, RestoreError, Stats, ZeroChunks, join, show};

/// Warnings printed one by one; the rest are only counted in the summary.
const WARNINGS_SHOWN: u64 = 20;

/// A chunked file being written.
struct OpenFile {
    node: Arc<Node>,
    file: File,
    /// Its name in its directory: a temporary one when `staged`, else its own.
    created: CString,
    staged: bool,
    /// Where the next chunk goes.
    offset: u64,
    /// End of the last bytes actually written: holes at the end need a `set_len`.
    written_end: u64,
    hasher: FileIdHasher,
}

/// Counters and warnings, apart from the directory stack so both can be borrowed at once.
struct Tally {
    stats: Stats,
    live: Option<Arc<Progress>>,
}

impl Tally {
    fn progress(&self, files: u64, bytes: u64) {
        if let Some(p) = &self.live {
            p.files.fetch_add(files, Ordering::Relaxed);
            p.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    fn warn(&mut self, message: String) {
        self.stats.warnings += 1;
        if self.stats.warnings <= WARNINGS_SHOWN {
            tracing::warn!("{message}");
        }
    }
}

pub(super) struct Writer<'a> {
    root: Dir,
    /// The target held nothing when the restore began.
    root_fresh: bool,
    /// Open directories from below `--to` to the current one.
    stack: Vec<OpenDir>,
    current: Option<OpenFile>,
    zeros: &'a ZeroChunks,
    as_root: bool,
    tally: Tally,
    tmp_seq: u64,
    prune: Option<Prune>,
}

struct OpenDir {
    dir: Dir,
    node: Arc<Node>,
    /// Created by this restore: it holds only what the restore wrote into it.
    fresh: bool,
}

/// Owner and mode of a file just created, as the kernel set them (umask, default ACLs and
/// setgid directories all play a part): metadata calls that would change nothing are
/// skipped, since each one dirties the inode in the journal.
#[derive(Clone, Copy)]
struct AsCreated {
    uid: u32,
    gid: u32,
    mode: u32,
}

impl AsCreated {
    fn of(f: &File) -> io::Result<AsCreated> {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata()?;
        Ok(AsCreated {
            uid: m.uid(),
            gid: m.gid(),
            mode: m.mode() & 0o7777,
        })
    }
}

/// The mode to create a file with: its own, unless it has setuid, setgid or sticky bits,
/// which must wait until the owner is set (chown clears them).
fn create_mode(e: &Entry) -> u32 {
    if e.mode & 0o7000 == 0 {
        e.mode & 0o777
    } else {
        0o600
    }
}

/// Pruning: directories at or below `from` end up holding exactly the snapshot's entries.
struct Prune {
    from: Vec<u8>,
    keep: Option<Keep>,
    /// Names written into each open directory: the target itself, then the stack's.
    written: Vec<HashSet<Vec<u8>>>,
}

/// How a [`Writer`] treats what it finds in the target.
pub(super) struct WriterOptions {
    /// Remove entries the snapshot lacks from directories at or below this path (relative
    /// to the target), except kept ones; `None`: remove nothing.
    pub prune_from: Option<Vec<u8>>,
    pub keep: Option<Keep>,
    pub progress: Option<Arc<Progress>>,
}

fn io_err(action: &'static str, path: &[u8]) -> impl FnOnce(io::Error) -> RestoreError {
    move |source| RestoreError::Io {
        action,
        path: show(path),
        source,
    }
}

fn is(e: &io::Error, errno: i32) -> bool {
    e.raw_os_error() == Some(errno)
}

/// Runs `create`; if the name is taken, removes what is there (a directory with its
/// contents, or a non-directory, symlinks not followed) and tries once more.
fn create_replacing<T>(
    dir: &Dir,
    name: &CStr,
    path: &[u8],
    action: &'static str,
    create: impl Fn() -> io::Result<T>,
) -> Result<T, RestoreError> {
    match create() {
        Err(e) if is(&e, libc::EEXIST) => {
            dir.remove_any(name)
                .map_err(io_err("remove what is in the way of", path))?;
            create().map_err(io_err(action, path))
        }
        other => other.map_err(io_err(action, path)),
    }
}

impl<'a> Writer<'a> {
    pub(super) fn new(root: Dir, zeros: &'a ZeroChunks, opts: WriterOptions) -> Writer<'a> {
        // Unreadable counts as not empty: files are then staged, which is always safe.
        let root_fresh = std::fs::read_dir(root.proc_path(c"."))
            .is_ok_and(|mut listing| listing.next().is_none());
        Writer {
            root,
            root_fresh,
            stack: Vec::new(),
            current: None,
            zeros,
            as_root: sys::is_root(),
            tally: Tally {
                stats: Stats::default(),
                live: opts.progress,
            },
            tmp_seq: 0,
            prune: opts.prune_from.map(|from| Prune {
                from,
                keep: opts.keep,
                written: vec![HashSet::new()],
            }),
        }
    }

    /// Notes that the current directory got `name`, so pruning leaves it.
    fn wrote_name(&mut self, name: &[u8]) {
        if let Some(p) = &mut self.prune {
            p.written
                .last_mut()
                .expect("the target's set is never popped")
                .insert(name.to_vec());
        }
    }

    /// Removes from `dir` (at `dir_path`) what the snapshot does not have there, if pruning
    /// covers it. `names` are the entries written into it.
    fn prune_dir(
        &mut self,
        dir: &Dir,
        dir_path: &[u8],
        names: &HashSet<Vec<u8>>,
    ) -> Result<(), RestoreError> {
        let Some(p) = &self.prune else {
            return Ok(());
        };
        let covered = p.from.is_empty()
            || dir_path == p.from.as_slice()
            || (dir_path.starts_with(&p.from) && dir_path.get(p.from.len()) == Some(&b'/'));
        if !covered {
            return Ok(());
        }
        let keep = p.keep.clone();
        let listing = std::fs::read_dir(dir.proc_path(c".")).map_err(io_err("list", dir_path))?;
        for entry in listing {
            let entry = entry.map_err(io_err("list", dir_path))?;
            let name = entry.file_name();
            let name = name.as_bytes();
            if names.contains(name) {
                continue;
            }
            let path = join(dir_path, name);
            if keep.as_ref().is_some_and(|k| k.keeps(&path)) {
                continue;
            }
            let c = cname(name).map_err(io_err("name", &path))?;
            dir.remove_any(&c)
                .map_err(io_err("remove (the snapshot does not have it)", &path))?;
            self.tally.stats.removed += 1;
        }
        Ok(())
    }

    pub(super) fn apply(&mut self, batch: Batch) -> Result<(), RestoreError> {
        self.tally.stats.fetched_bytes += batch.fetched_bytes;
        self.tally.stats.fetched_chunks += batch.fetched_chunks;
        for item in batch.items {
            match item {
                Item::Op(op) => self.op(op)?,
                Item::Chunks { node, range } => {
                    if let Err(e) = self.chunks(node, range, &batch.blobs) {
                        self.abandon_file();
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn finish(mut self) -> Result<Stats, RestoreError> {
        assert!(
            self.stack.is_empty() && self.current.is_none(),
            "the planner ends every directory and file it starts"
        );
        if let Some(names) = self.prune.as_mut().and_then(|p| p.written.pop()) {
            let root = self.root.open_child(c".").map_err(io_err("open", b""))?;
            self.prune_dir(&root, b"", &names)?;
        }
        let hidden = self.tally.stats.warnings.saturating_sub(WARNINGS_SHOWN);
        if hidden > 0 {
            tracing::warn!("{hidden} more warnings not shown");
        }
        Ok(std::mem::take(&mut self.tally.stats))
    }

    fn top(&self) -> &Dir {
        self.stack.last().map_or(&self.root, |d| &d.dir)
    }

    /// Whether the current directory was empty when the restore began.
    fn top_fresh(&self) -> bool {
        self.stack.last().map_or(self.root_fresh, |d| d.fresh)
    }

    fn op(&mut self, op: Op) -> Result<(), RestoreError> {
        match &op {
            Op::Enter(node) | Op::Leaf(node) | Op::Link { node, .. } => {
                self.wrote_name(&node.entry.name)
            }
            Op::Leave => {}
        }
        match op {
            Op::Enter(node) => {
                self.enter(node)?;
                if let Some(p) = &mut self.prune {
                    p.written.push(HashSet::new());
                }
                Ok(())
            }
            Op::Leave => {
                let OpenDir { dir, node, .. } = self.stack.pop().expect("Leave follows Enter");
                if let Some(names) = self.prune.as_mut().and_then(|p| p.written.pop()) {
                    self.prune_dir(&dir, &node.path, &names)?;
                }
                meta_fd(dir.file(), &node, None, self.as_root, &mut self.tally)?;
                self.tally.stats.dirs += 1;
                Ok(())
            }
            Op::Leaf(node) => self.leaf(&node),
            Op::Link { node, first } => self.link(&node, &first),
        }
    }

    fn enter(&mut self, node: Arc<Node>) -> Result<(), RestoreError> {
        let path = &node.path;
        let name = cname(&node.entry.name).map_err(io_err("name", path))?;
        let dir = self.top();
        // Owner-only until its metadata is set on the way out, so that its children can be
        // written whatever its final mode.
        let reused = match dir.mkdir(&name, 0o700) {
            Ok(()) => false,
            Err(e) if is(&e, libc::EEXIST) => {
                match dir
                    .existing(&name)
                    .map_err(io_err("look at what is at", path))?
                {
                    Some(Existing::Dir) => true,
                    _ => {
                        dir.remove_any(&name)
                            .map_err(io_err("remove what is in the way of", path))?;
                        dir.mkdir(&name, 0o700)
                            .map_err(io_err("create the directory", path))?;
                        false
                    }
                }
            }
            Err(e) => return Err(io_err("create the directory", path)(e)),
        };
        let child = dir
            .open_child(&name)
            .map_err(io_err("open the directory", path))?;
        if reused {
            sys::fchmod(child.file(), 0o700).map_err(io_err("make writable", path))?;
        }
        self.stack.push(OpenDir {
            dir: child,
            node,
            fresh: !reused,
        });
        Ok(())
    }

    fn leaf(&mut self, node: &Node) -> Result<(), RestoreError> {
        let e = &node.entry;
        let path = &node.path;
        let name = cname(&e.name).map_err(io_err("name", path))?;
        let dir = self.stack.last().map_or(&self.root, |d| &d.dir);
        match e.kind() {
            Kind::File => {
                let data: &[u8] = match &e.content {
                    Content::None => &[],
                    Content::Inline(d) => d,
                    _ => unreachable!("chunked files arrive as chunk items"),
                };
                // A name already taken (restoring over a tree, reverting) is replaced by a
                // staged copy renamed over it: readers see the old file or the new one.
                let mode = create_mode(e);
                let (mut f, staged) = match dir.create_file(&name, mode) {
                    Ok(f) => (f, None),
                    Err(e) if is(&e, libc::EEXIST) => {
                        let (f, tmp) = create_tmp(dir, &mut self.tmp_seq, path, mode)?;
                        (f, Some(tmp))
                    }
                    Err(e) => return Err(io_err("create the file", path)(e)),
                };
                let written = f
                    .write_all(data)
                    .map_err(io_err("write", path))
                    .and_then(|()| AsCreated::of(&f).map_err(io_err("look at", path)))
                    .and_then(|now| meta_fd(&f, node, Some(now), self.as_root, &mut self.tally));
                if let Err(e) = written {
                    if let Some(tmp) = &staged {
                        let _ = dir.unlink(tmp);
                    }
                    return Err(e);
                }
                if let Some(tmp) = &staged {
                    rename_into_place(dir, tmp, &name, path)?;
                }
                self.tally.stats.files += 1;
                self.tally.stats.bytes += data.len() as u64;
                self.tally.progress(1, data.len() as u64);
                Ok(())
            }
            Kind::Symlink => {
                let target =
                    cname(&e.symlink_target).map_err(io_err("read the target of", path))?;
                create_replacing(dir, &name, path, "create the symlink", || {
                    dir.symlink(&target, &name)
                })?;
                self.tally.stats.symlinks += 1;
                meta_at(dir, &name, node, true, self.as_root, &mut self.tally)
            }
            kind @ (Kind::Fifo | Kind::Socket | Kind::CharDevice | Kind::BlockDevice) => {
                let (fmt, what) = match kind {
                    Kind::Fifo => (libc::S_IFIFO, "fifo"),
                    Kind::Socket => (libc::S_IFSOCK, "socket"),
                    Kind::CharDevice => (libc::S_IFCHR, "character device"),
                    _ => (libc::S_IFBLK, "block device"),
                };
                let device = matches!(kind, Kind::CharDevice | Kind::BlockDevice);
                if device && !self.as_root {
                    self.tally.warn(format!(
                        "skipped {what} {}: only root can create device nodes",
                        show(path)
                    ));
                    return Ok(());
                }
                let rdev = if device { e.rdev } else { 0 };
                create_replacing(dir, &name, path, "create the node", || {
                    dir.mknod(&name, fmt | 0o600, rdev)
                })?;
                self.tally.stats.specials += 1;
                meta_at(dir, &name, node, false, self.as_root, &mut self.tally)
            }
            Kind::Dir => unreachable!("directories arrive as Enter"),
        }
    }

    fn link(&mut self, node: &Node, first: &[u8]) -> Result<(), RestoreError> {
        let path = &node.path;
        let name = cname(&node.entry.name).map_err(io_err("name", path))?;
        let (first_dir, first_name) = match first.iter().rposition(|&b| b == b'/') {
            Some(i) => (&first[..i], &first[i + 1..]),
            None => (&first[..0], first),
        };
        let first_cname = cname(first_name).map_err(io_err("name", first))?;
        let here = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => &path[..i],
            None => &path[..0],
        };
        let dir = self.top();
        // Most links share a directory with their first name; otherwise open the first
        // name's directory again, component by component, never following a symlink.
        let opened;
        let from = if first_dir == here {
            dir
        } else {
            opened = self.open_below_root(first_dir)?;
            &opened
        };
        let linked = create_replacing(dir, &name, path, "create the hard link", || {
            dir.link(from, &first_cname, &name)
        });
        match linked {
            Ok(()) => {
                self.tally.stats.hardlinks += 1;
                Ok(())
            }
            // The first name was skipped (a device node without root): so is this one.
            Err(RestoreError::Io { source, .. }) if is(&source, libc::ENOENT) => {
                self.tally.warn(format!(
                    "skipped {}: its hard link partner {} was not restored",
                    show(path),
                    show(first)
                ));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Opens a directory restore created earlier, by its path relative to `--to`.
    fn open_below_root(&self, rel: &[u8]) -> Result<Dir, RestoreError> {
        let mut components = rel.split(|&b| b == b'/').filter(|c| !c.is_empty());
        let Some(first) = components.next() else {
            // `.` names the directory itself and is never a symlink.
            return self.root.open_child(c".").map_err(io_err("open", rel));
        };
        let open = |d: &Dir, c: &[u8]| -> Result<Dir, RestoreError> {
            let n = cname(c).map_err(io_err("name", rel))?;
            d.open_child(&n).map_err(io_err("open the directory", rel))
        };
        let mut d = open(&self.root, first)?;
        for c in components {
            d = open(&d, c)?;
        }
        Ok(d)
    }

    /// Writes chunks `range` of a chunked file: opens it at the first, finishes it at the
    /// last. The caller removes the temporary file if this fails.
    fn chunks(
        &mut self,
        node: Arc<Node>,
        range: Range<usize>,
        blobs: &IdMap<Blob>,
    ) -> Result<(), RestoreError> {
        let Content::Chunks { chunks, .. } = &node.entry.content else {
            unreachable!("chunk items are for chunked files")
        };
        if range.start == 0 {
            self.open_file(node.clone())?;
        }
        let zeros = self.zeros;
        let f = self.current.as_mut().expect("a chunked file is open");
        debug_assert!(Arc::ptr_eq(&f.node, &node));
        let path = &node.path;
        for id in &chunks[range.clone()] {
            let damaged = |reason: String| RestoreError::DamagedChunk {
                chunk: *id,
                path: show(path),
                reason,
            };
            match blobs.get(id) {
                Some(Blob::Data(data)) => {
                    f.file
                        .write_all_at(data, f.offset)
                        .map_err(io_err("write", path))?;
                    f.offset += data.len() as u64;
                    f.written_end = f.offset;
                }
                // A hole: the file is new, so unwritten ranges read as zeros.
                Some(Blob::Zero(len)) => f.offset += *len as u64,
                Some(Blob::Bad(reason)) => return Err(damaged(reason.clone())),
                // Not in this batch because it was already known to be zeros.
                None => match zeros.get(id) {
                    Some(len) => f.offset += len as u64,
                    None => return Err(damaged("it was never fetched".into())),
                },
            }
            f.hasher.push(id);
        }
        if range.end == chunks.len() {
            self.finish_file()?;
        }
        Ok(())
    }

    fn open_file(&mut self, node: Arc<Node>) -> Result<(), RestoreError> {
        assert!(self.current.is_none(), "files are written one at a time");
        self.wrote_name(&node.entry.name);
        let fresh = self.top_fresh();
        let dir = self.stack.last().map_or(&self.root, |d| &d.dir);
        let path = &node.path;
        let mode = create_mode(&node.entry);
        let own = cname(&node.entry.name).map_err(io_err("name", path))?;
        let own_name = if fresh {
            match dir.create_file(&own, mode) {
                Ok(f) => Some(f),
                // Someone else put it there meanwhile: stage, as in any other directory.
                Err(e) if is(&e, libc::EEXIST) => None,
                Err(e) => return Err(io_err("create the file", path)(e)),
            }
        } else {
            None
        };
        let (file, created, staged) = match own_name {
            Some(f) => (f, own, false),
            None => {
                let (f, tmp) = create_tmp(dir, &mut self.tmp_seq, path, mode)?;
                (f, tmp, true)
            }
        };
        self.current = Some(OpenFile {
            node,
            file,
            created,
            staged,
            offset: 0,
            written_end: 0,
            hasher: FileIdHasher::default(),
        });
        Ok(())
    }

    fn finish_file(&mut self) -> Result<(), RestoreError> {
        let f = self.current.as_ref().expect("a chunked file is open");
        let node = &f.node;
        let path = &node.path;
        let e = &node.entry;
        let Content::Chunks { file: file_id, .. } = &e.content else {
            unreachable!()
        };
        let mismatch = |reason: String| RestoreError::FileMismatch {
            path: show(path),
            reason,
        };
        let actual: Id = f.hasher.finish();
        if actual != *file_id {
            return Err(mismatch(format!(
                "its chunks make file id {actual}, the snapshot says {file_id}"
            )));
        }
        if f.offset != e.size {
            return Err(mismatch(format!(
                "its chunks hold {} bytes, the snapshot says {}",
                f.offset, e.size
            )));
        }
        if f.written_end < f.offset {
            f.file
                .set_len(f.offset)
                .map_err(io_err("extend (sparse tail)", path))?;
        }
        let now = AsCreated::of(&f.file).map_err(io_err("look at", path))?;
        meta_fd(&f.file, node, Some(now), self.as_root, &mut self.tally)?;
        if f.staged {
            let name = cname(&e.name).map_err(io_err("name", path))?;
            rename_into_place(self.top(), &f.created, &name, path)?;
        }
        self.tally.stats.files += 1;
        self.tally.stats.bytes += e.size;
        self.tally.progress(1, e.size);
        self.current = None;
        Ok(())
    }

    /// Removes a file that could not be finished: it was created by this restore, under
    /// a temporary name or in a directory that did not have it.
    fn abandon_file(&mut self) {
        if let Some(f) = self.current.take() {
            drop(f.file);
            let _ = self.top().unlink(&f.created);
        }
    }
}

/// Creates a new temporary file in `dir` for the entry at `path`. O_EXCL: a name someone
/// else holds (or planted as a symlink) is skipped, not used.
fn create_tmp(
    dir: &Dir,
    seq: &mut u64,
    path: &[u8],
    mode: u32,
) -> Result<(File, CString), RestoreError> {
    let pid = std::process::id();
    loop {
        *seq += 1;
        let tmp = cname(format!(".morgana-restore.{pid}.{seq}").as_bytes())
            .expect("no NUL in a made-up name");
        match dir.create_file(&tmp, mode) {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if is(&e, libc::EEXIST) && *seq < u64::MAX => continue,
            Err(e) => return Err(io_err("create a temporary file for", path)(e)),
        }
    }
}

/// Renames a finished temporary file over `name`: atomic over a non-directory; a
/// directory in the way must go first.
fn rename_into_place(dir: &Dir, tmp: &CStr, name: &CStr, path: &[u8]) -> Result<(), RestoreError> {
    match dir.rename(tmp, name) {
        Err(err)
            if is(&err, libc::EISDIR) || is(&err, libc::ENOTEMPTY) || is(&err, libc::EEXIST) =>
        {
            dir.remove_any(name)
                .map_err(io_err("remove what is in the way of", path))?;
            dir.rename(tmp, name)
                .map_err(io_err("move into place", path))
        }
        other => other.map_err(io_err("move into place", path)),
    }
}

impl Drop for Writer<'_> {
    /// A restore that stops for any reason (a fetch failing mid-file too) leaves no
    /// partial file behind.
    fn drop(&mut self) {
        self.abandon_file();
    }
}

/// Sets owner, xattrs, mode and mtime through an open descriptor (files, directories).
/// `now`, when known, skips an owner or mode that is already right. Not the mode when the
/// entry has xattrs: an access ACL set among them rewrites the mode's group bits.
fn meta_fd(
    f: &File,
    node: &Node,
    now: Option<AsCreated>,
    as_root: bool,
    tally: &mut Tally,
) -> Result<(), RestoreError> {
    let e = &node.entry;
    let path = &node.path;
    let owned = now.is_some_and(|n| (n.uid, n.gid) == (e.uid, e.gid));
    if as_root
        && !owned
        && let Err(err) = sys::fchown(f, e.uid, e.gid)
    {
        tally.warn(owner_warning(e, path, &err));
    }
    for (k, v) in &e.xattrs {
        if let Err(err) = f.set_xattr(OsStr::from_bytes(k), v) {
            tally.warn(xattr_warning(k, path, &err));
        }
    }
    let mode_right = now.is_some_and(|n| n.mode == e.mode & 0o7777) && e.xattrs.is_empty();
    if !mode_right {
        sys::fchmod(f, e.mode & 0o7777).map_err(io_err("set the mode of", path))?;
    }
    sys::futimens(f, e.mtime_ns).map_err(io_err("set the mtime of", path))
}

/// The same for symlinks and special files, by name, never following a symlink.
fn meta_at(
    dir: &Dir,
    name: &CStr,
    node: &Node,
    symlink: bool,
    as_root: bool,
    tally: &mut Tally,
) -> Result<(), RestoreError> {
    let e = &node.entry;
    let path = &node.path;
    if as_root && let Err(err) = dir.lchown(name, e.uid, e.gid) {
        tally.warn(owner_warning(e, path, &err));
    }
    if !e.xattrs.is_empty() {
        // lsetxattr: acts on the symlink itself.
        let p = dir.proc_path(name);
        for (k, v) in &e.xattrs {
            if let Err(err) = xattr::set(&p, OsStr::from_bytes(k), v) {
                tally.warn(xattr_warning(k, path, &err));
            }
        }
    }
    // Symlinks have no mode of their own on Linux.
    if !symlink {
        dir.chmod(name, e.mode & 0o7777)
            .map_err(io_err("set the mode of", path))?;
    }
    dir.set_mtime(name, e.mtime_ns)
        .map_err(io_err("set the mtime of", path))
}

fn owner_warning(e: &Entry, path: &[u8], err: &io::Error) -> String {
    format!(
        "cannot set the owner of {} to {}:{}: {err}",
        show(path),
        e.uid,
        e.gid
    )
}

fn xattr_warning(name: &[u8], path: &[u8], err: &io::Error) -> String {
    format!(
        "cannot set extended attribute {} on {}: {err}",
        String::from_utf8_lossy(name),
        show(path)
    )
}
