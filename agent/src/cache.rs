//! The files cache: what the last committed snapshot knew about each directory, so that
//! unchanged files are not read again and unchanged trees are not offered again.
//!
//! One record per directory, holding the directory's tree id and, for each regular file in
//! it, the stat key it had when read (size, mtime, ctime, inode, device) with its content.
//! Records are written in the order the walker finishes directories: a depth-first
//! post-order over names sorted as bytes. The walker looks records up in that same order,
//! so a lookup is a merge with a sequential reader: memory is one record, whatever the size
//! of the tree, and no index is needed.
//!
//! A sync writes the new cache beside the old one and renames it over only after the
//! snapshot is committed, so a killed sync leaves the previous, committed cache in place
//! (its tree ids are known to be on the appliance). Every record carries its own BLAKE3 id:
//! a damaged file is noticed and the rest of it is ignored (the sync then reads the files
//! again), never trusted.

use std::cmp::Ordering;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use morgana_core::Id;
use morgana_core::tree::{Content, Entry};
use morgana_core::varint::{self, ReadError, Reader};

const MAGIC: &[u8; 8] = b"MGFCACH1";
pub const FILE_NAME: &str = "files-cache.bin";
const STAGED_NAME: &str = "files-cache.bin.new";
/// A record larger than this is treated as damage rather than allocated.
const RECORD_MAX: usize = 512 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot write the files cache {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// What decides whether a file may be taken from the cache: any change to the file's
/// bytes changes its ctime, and a replaced file has another inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileKey {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedFile {
    pub name: Vec<u8>,
    pub key: FileKey,
    pub content: Content,
}

/// One directory's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirRecord {
    pub path: Vec<u8>,
    /// The directory's tree in the committed snapshot.
    pub tree: Id,
    /// Sorted by name.
    pub files: Vec<CachedFile>,
}

impl DirRecord {
    /// The cached content of `name`, if its key still matches.
    pub fn content(&self, name: &[u8], key: &FileKey) -> Option<&Content> {
        let i = self
            .files
            .binary_search_by(|f| f.name.as_slice().cmp(name))
            .ok()?;
        let f = &self.files[i];
        (f.key == *key).then_some(&f.content)
    }
}

/// Orders relative directory paths (`/`-joined names, `""` for the root) as a depth-first
/// walk with children sorted by name bytes finishes them: descendants before their
/// ancestors, siblings by name.
pub fn post_order(a: &[u8], b: &[u8]) -> Ordering {
    fn parts(p: &[u8]) -> Vec<&[u8]> {
        p.split(|&c| c == b'/').filter(|c| !c.is_empty()).collect()
    }
    let (a, b) = (parts(a), parts(b));
    for (x, y) in a.iter().zip(&b) {
        match x.cmp(y) {
            Ordering::Equal => {}
            other => return other,
        }
    }
    // One is an ancestor of the other (or they are equal): the deeper one finishes first.
    b.len().cmp(&a.len())
}

/// Reads the committed cache in walk order.
pub struct CacheReader {
    input: Option<BufReader<File>>,
    peeked: Option<DirRecord>,
    buf: Vec<u8>,
}

impl CacheReader {
    /// Opens the committed cache of `state_dir` for `root`; `None` when there is none or it
    /// belongs to another root.
    pub fn open(state_dir: &Path, root: &Path) -> Option<CacheReader> {
        let path = state_dir.join(FILE_NAME);
        let mut input = BufReader::with_capacity(256 * 1024, File::open(&path).ok()?);
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic).ok()?;
        if &magic != MAGIC {
            tracing::warn!(path = %path.display(), "files cache has an unknown format; ignoring it");
            return None;
        }
        let mut buf = Vec::new();
        let header = read_frame(&mut input, &mut buf).ok().flatten()?;
        if header != root.as_os_str().as_encoded_bytes() {
            return None;
        }
        Some(CacheReader {
            input: Some(input),
            peeked: None,
            buf,
        })
    }

    /// The record of `path`, if the cache has one. Calls must come in walk order
    /// ([`post_order`]); records before `path` are passed over for good.
    pub fn lookup(&mut self, path: &[u8]) -> Option<DirRecord> {
        loop {
            if self.peeked.is_none() {
                self.peeked = self.next_record();
            }
            let rec = self.peeked.as_ref()?;
            match post_order(&rec.path, path) {
                Ordering::Less => self.peeked = None,
                Ordering::Equal => return self.peeked.take(),
                Ordering::Greater => return None,
            }
        }
    }

    fn next_record(&mut self) -> Option<DirRecord> {
        let input = self.input.as_mut()?;
        let parsed = match read_frame(input, &mut self.buf) {
            Ok(Some(body)) => decode_record(body).map_err(|e| e.to_string()),
            Ok(None) => {
                self.input = None;
                return None;
            }
            Err(e) => Err(e.to_string()),
        };
        match parsed {
            Ok(rec) => Some(rec),
            Err(reason) => {
                tracing::warn!(%reason, "files cache is damaged; files after this point are read again");
                self.input = None;
                None
            }
        }
    }
}

/// Reads one `len body id` frame; `None` at a clean end of file.
fn read_frame<'b>(input: &mut impl Read, buf: &'b mut Vec<u8>) -> io::Result<Option<&'b [u8]>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > RECORD_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "record too large",
        ));
    }
    buf.clear();
    buf.resize(len + Id::LEN, 0);
    input.read_exact(buf)?;
    let (body, sum) = buf.split_at(len);
    if Id::of(body).0 != sum {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "record checksum mismatch",
        ));
    }
    Ok(Some(&buf[..len]))
}

fn decode_record(body: &[u8]) -> Result<DirRecord, ReadError> {
    let mut r = Reader::new(body);
    let path = r.bytes(RECORD_MAX, "path")?.to_vec();
    let tree = r.id("tree id")?;
    let n = r.varint("file count")?;
    let mut files = Vec::with_capacity((n as usize).min(r.remaining() / 8));
    for _ in 0..n {
        let name = r.bytes(RECORD_MAX, "name")?.to_vec();
        let key = FileKey {
            size: r.varint("size")?,
            mtime_ns: r.u64_le("mtime")? as i64,
            ctime_ns: r.u64_le("ctime")? as i64,
            ino: r.varint("inode")?,
            dev: r.varint("device")?,
        };
        // Only regular files are recorded, and a chunked one has at least one chunk.
        let content = match Content::decode_from(&mut r)? {
            Some(Content::Chunks { chunks, .. }) if chunks.is_empty() => {
                return Err(ReadError::Truncated("chunk ids"));
            }
            Some(c @ (Content::None | Content::Inline(_) | Content::Chunks { .. })) => c,
            Some(Content::Tree(_)) | None => return Err(ReadError::Truncated("content")),
        };
        files.push(CachedFile { name, key, content });
    }
    if !r.is_empty() {
        return Err(ReadError::Truncated("record end"));
    }
    Ok(DirRecord { path, tree, files })
}

/// Writes the next cache during a sync; [`CacheWriter::finish`] stages it and
/// [`StagedCache::install`] makes it the committed one.
pub struct CacheWriter {
    out: BufWriter<File>,
    path: PathBuf,
    dir: PathBuf,
    buf: Vec<u8>,
}

/// A fully written cache waiting for its snapshot's commit.
pub struct StagedCache {
    staged: PathBuf,
    dir: PathBuf,
}

impl CacheWriter {
    pub fn create(state_dir: &Path, root: &Path) -> Result<CacheWriter, CacheError> {
        let path = state_dir.join(STAGED_NAME);
        let err = |source| CacheError::Write {
            path: path.clone(),
            source,
        };
        let file = File::create(&path).map_err(err)?;
        let mut w = CacheWriter {
            out: BufWriter::with_capacity(256 * 1024, file),
            path: path.clone(),
            dir: state_dir.to_path_buf(),
            buf: Vec::new(),
        };
        w.out.write_all(MAGIC).map_err(err)?;
        w.frame(root.as_os_str().as_encoded_bytes().to_vec())?;
        Ok(w)
    }

    fn frame(&mut self, body: Vec<u8>) -> Result<(), CacheError> {
        let len = u32::try_from(body.len()).map_err(|_| CacheError::Write {
            path: self.path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "directory record too large"),
        })?;
        let sum = Id::of(&body);
        let res = self
            .out
            .write_all(&len.to_le_bytes())
            .and_then(|_| self.out.write_all(&body))
            .and_then(|_| self.out.write_all(&sum.0));
        self.buf = body;
        res.map_err(|source| CacheError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// Records one directory: its tree id and those of its regular files that have a key
    /// (`keys` runs alongside `entries`; files whose content may be stale have none).
    pub fn write_dir(
        &mut self,
        path: &[u8],
        tree: Id,
        entries: &[Entry],
        keys: &[Option<FileKey>],
    ) -> Result<(), CacheError> {
        let mut b = std::mem::take(&mut self.buf);
        b.clear();
        varint::put_bytes(&mut b, path);
        b.extend_from_slice(&tree.0);
        let n = keys.iter().filter(|k| k.is_some()).count();
        varint::put(&mut b, n as u64);
        for (e, key) in entries.iter().zip(keys) {
            let Some(key) = key else { continue };
            varint::put_bytes(&mut b, &e.name);
            varint::put(&mut b, key.size);
            b.extend_from_slice(&key.mtime_ns.to_le_bytes());
            b.extend_from_slice(&key.ctime_ns.to_le_bytes());
            varint::put(&mut b, key.ino);
            varint::put(&mut b, key.dev);
            e.content.encode_into(&mut b);
        }
        self.frame(b)
    }

    /// Flushes and syncs the new cache; it is not used until installed.
    pub fn finish(self) -> Result<StagedCache, CacheError> {
        let path = self.path.clone();
        let err = |source| CacheError::Write {
            path: path.clone(),
            source,
        };
        let file = self.out.into_inner().map_err(|e| err(e.into_error()))?;
        file.sync_all().map_err(err)?;
        Ok(StagedCache {
            staged: self.path,
            dir: self.dir,
        })
    }
}

impl StagedCache {
    /// Makes the staged cache the committed one; call only after the snapshot it describes
    /// is committed.
    pub fn install(self) -> Result<(), CacheError> {
        let target = self.dir.join(FILE_NAME);
        fs::rename(&self.staged, &target).map_err(|source| CacheError::Write {
            path: target,
            source,
        })
    }
}

/// Forgets the committed cache: the next sync reads every file and offers every tree.
pub fn clear(state_dir: &Path) -> Result<(), CacheError> {
    let path = state_dir.join(FILE_NAME);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CacheError::Write { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use morgana_core::tree::Kind;

    fn key(n: u64) -> FileKey {
        FileKey {
            size: n,
            mtime_ns: -5,
            ctime_ns: 1 << 40,
            ino: 77 + n,
            dev: 3,
        }
    }

    fn file(name: &[u8], content: Content) -> Entry {
        Entry {
            name: name.to_vec(),
            kind: Some(Kind::File),
            content,
            ..Default::default()
        }
    }

    #[test]
    fn post_order_puts_descendants_first_and_compares_by_component() {
        let mut paths: Vec<&[u8]> = vec![b"", b"a", b"a/b", b"a/b/c", b"a.b", b"a/c", b"b"];
        paths.sort_by(|a, b| post_order(a, b));
        let want: Vec<&[u8]> = vec![b"a/b/c", b"a/b", b"a/c", b"a", b"a.b", b"b", b""];
        assert_eq!(paths, want);
        assert_eq!(post_order(b"x/y", b"x/y"), Ordering::Equal);
    }

    #[test]
    fn written_records_are_found_in_walk_order_and_keys_must_match() {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new("/some/root");
        let chunks = Content::Chunks {
            file: Id::of(b"f"),
            chunks: vec![Id::of(b"1"), Id::of(b"2")],
        };
        let entries = vec![
            file(b"big", chunks.clone()),
            file(b"empty", Content::None),
            file(b"small", Content::Inline(b"hi".to_vec())),
            file(b"stale", Content::Inline(b"x".to_vec())),
        ];
        let keys = vec![Some(key(1)), Some(key(0)), Some(key(2)), None];
        let mut w = CacheWriter::create(dir.path(), root).unwrap();
        w.write_dir(b"a/b", Id::of(b"t1"), &entries, &keys).unwrap();
        w.write_dir(b"a/\xff", Id::of(b"t2"), &[], &[]).unwrap();
        w.write_dir(b"a", Id::of(b"t3"), &entries[..1], &keys[..1])
            .unwrap();
        w.write_dir(b"", Id::of(b"t4"), &[], &[]).unwrap();
        // Not visible before installation.
        assert!(CacheReader::open(dir.path(), root).is_none());
        w.finish().unwrap().install().unwrap();

        assert!(CacheReader::open(dir.path(), Path::new("/other")).is_none());
        let mut r = CacheReader::open(dir.path(), root).unwrap();
        let ab = r.lookup(b"a/b").unwrap();
        assert_eq!(ab.tree, Id::of(b"t1"));
        assert_eq!(ab.files.len(), 3);
        assert_eq!(ab.content(b"big", &key(1)), Some(&chunks));
        assert_eq!(ab.content(b"big", &key(2)), None, "key mismatch");
        assert_eq!(
            ab.content(b"small", &key(2)),
            Some(&Content::Inline(b"hi".to_vec()))
        );
        assert_eq!(
            ab.content(b"stale", &key(0)),
            None,
            "keyless files are not cached"
        );
        // A directory that is new this time has no record, and does not disturb later ones.
        assert!(r.lookup(b"a/new").is_none());
        // A directory that is gone is passed over.
        assert_eq!(r.lookup(b"a").unwrap().tree, Id::of(b"t3"));
        assert!(r.lookup(b"a.z").is_none());
        assert_eq!(r.lookup(b"").unwrap().tree, Id::of(b"t4"));
        assert!(r.lookup(b"").is_none());

        clear(dir.path()).unwrap();
        assert!(CacheReader::open(dir.path(), root).is_none());
    }

    #[test]
    fn a_damaged_record_ends_the_cache_instead_of_lying() {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new("/r");
        let mut w = CacheWriter::create(dir.path(), root).unwrap();
        w.write_dir(b"a", Id::of(b"t1"), &[], &[]).unwrap();
        w.write_dir(b"b", Id::of(b"t2"), &[], &[]).unwrap();
        w.finish().unwrap().install().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 40;
        bytes[last] ^= 1;
        fs::write(&path, bytes).unwrap();
        let mut r = CacheReader::open(dir.path(), root).unwrap();
        assert!(r.lookup(b"a").is_some());
        assert!(r.lookup(b"b").is_none());
    }
}
