//! Chunks the device already holds, served from its own files: a layer update then
//! downloads only the chunks that changed.
//!
//! Trees carry chunk ids but not their lengths, so the device files that hold wanted
//! chunks (per the pre-layer-update snapshot) are chunked again, with the parameters the
//! scan uses, to find each wanted chunk's offset and length. Only wanted chunks are
//! indexed, so the index is as small as the update: for an update of 5 % of a 50,000-file
//! image, a few thousand entries of 48 bytes. Every chunk is read and checked against its
//! BLAKE3 id again when it is served (the file may have changed since it was indexed); one
//! that fails, or cannot be read, is fetched from the inner source instead.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use morgana_core::Id;
use morgana_core::chunker::{Chunker, ChunkerParams};
use morgana_core::image::Flat;
use morgana_core::pack::{BlobKind, Compression};
use morgana_core::tree::{Content, Kind};
use morgana_core::wire::BlobFrame;

use crate::restore::{BlobSource, IdMap, OnBlob, RestoreError};

/// Files kept open after indexing: a file the apply replaces is renamed over, and an open
/// descriptor still reads the old bytes, so a chunk one file shares with another file
/// written earlier is still found. Beyond this many, files are opened by path when read.
const OPEN_FILES: usize = 256;
/// Most local bytes held at once by one fetch: local chunks are read (and verified) before
/// the inner source is asked for the rest, so that a chunk that fails verification joins
/// that same request.
const HELD_BYTES: usize = 8 * 1024 * 1024;

/// Where a wanted chunk lies on the device.
#[derive(Clone, Copy, Debug)]
struct Loc {
    file: u32,
    offset: u64,
    len: u32,
}

struct LocalFile {
    path: PathBuf,
    open: Option<File>,
}

/// What the source served and from where, readable after the apply.
#[derive(Debug, Default)]
pub struct Counts {
    /// Chunks read from the device's own files, and their bytes.
    pub local_chunks: AtomicU64,
    pub local_bytes: AtomicU64,
    /// Chunks fetched from the inner source, as stored (compressed) and raw.
    pub remote_chunks: AtomicU64,
    pub remote_stored_bytes: AtomicU64,
    pub remote_raw_bytes: AtomicU64,
    /// Indexed chunks whose bytes no longer matched (or could not be read): fetched instead.
    pub stale: AtomicU64,
}

/// A [`BlobSource`] that serves wanted chunks from the device's files and asks `inner`
/// for everything else.
pub struct LocalChunks<'a> {
    inner: &'a dyn BlobSource,
    files: Vec<LocalFile>,
    index: IdMap<Loc>,
    pub counts: Counts,
}

/// What indexing found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Files chunked again, and their bytes read.
    pub files_read: u64,
    pub bytes_read: u64,
    /// Wanted chunks found, and their bytes.
    pub chunks: u64,
    pub bytes: u64,
}

impl<'a> LocalChunks<'a> {
    /// A source with nothing local: everything goes to `inner`.
    pub fn none(inner: &'a dyn BlobSource) -> LocalChunks<'a> {
        LocalChunks {
            inner,
            files: Vec::new(),
            index: IdMap::default(),
            counts: Counts::default(),
        }
    }

    /// Indexes the `wanted` chunks that the files of `device` (the device's snapshot, paths
    /// absolute from `root`) hold. Files at the paths in `first` (the ones the apply
    /// replaces) are read whatever they hold; another file only when wanted chunks are at
    /// least a quarter of it, so one shared chunk does not make a large file be read. A
    /// file is read only up to its last wanted chunk. Files that cannot be read are passed
    /// over: their chunks are fetched.
    pub fn index(
        inner: &'a dyn BlobSource,
        root: &Path,
        device: &Flat,
        first: &[&[u8]],
        wanted: &IdMap<()>,
    ) -> (LocalChunks<'a>, IndexStats) {
        let mut me = LocalChunks::none(inner);
        let mut stats = IndexStats::default();
        if wanted.is_empty() {
            return (me, stats);
        }
        let mut chunker =
            Chunker::new(ChunkerParams::default()).expect("default chunker params are valid");
        let chunks_of = |path: &[u8]| match device.get(path) {
            Some(e) if e.kind == Some(Kind::File) => match &e.content {
                Content::Chunks { chunks, .. } => Some(chunks.as_slice()),
                _ => None,
            },
            _ => None,
        };
        let others = device
            .keys()
            .map(|p| p.as_slice())
            .filter(|p| first.binary_search(p).is_err());
        for (pass, path) in first
            .iter()
            .copied()
            .map(|p| (0, p))
            .chain(others.map(|p| (1, p)))
        {
            let Some(chunks) = chunks_of(path) else {
                continue;
            };
            let mut useful: Vec<&Id> = chunks
                .iter()
                .filter(|c| wanted.contains_key(*c) && !me.index.contains_key(*c))
                .collect();
            useful.sort();
            useful.dedup();
            let useful = useful.len();
            if useful == 0 || (pass == 1 && useful * 4 < chunks.len()) {
                continue;
            }
            let rel = path.strip_prefix(b"/").unwrap_or(path);
            let full = root.join(std::ffi::OsStr::from_bytes(rel));
            let Some(file) = open(&full) else {
                continue;
            };
            let n = u32::try_from(me.files.len()).expect("fewer than 4 billion files");
            let mut left = useful;
            let mut offset = 0u64;
            let mut found = 0u64;
            let index = &mut me.index;
            // Stops reading once every wanted chunk of the file is found.
            let _ = chunker.chunk(&file, |id, bytes| -> Result<(), std::io::Error> {
                let len = bytes.len() as u32;
                if wanted.contains_key(&id) && !index.contains_key(&id) {
                    index.insert(
                        id,
                        Loc {
                            file: n,
                            offset,
                            len,
                        },
                    );
                    found += 1;
                    stats.chunks += 1;
                    stats.bytes += u64::from(len);
                    left = left.saturating_sub(1);
                }
                offset += u64::from(len);
                if left == 0 {
                    return Err(std::io::Error::other("done"));
                }
                Ok(())
            });
            stats.files_read += 1;
            stats.bytes_read += offset;
            if found > 0 {
                me.files.push(LocalFile {
                    path: full,
                    open: (me.files.len() < OPEN_FILES).then_some(file),
                });
            }
        }
        (me, stats)
    }

    /// The bytes of `id` from the device, if they are still there and still its.
    fn read(&self, id: &Id) -> Option<Vec<u8>> {
        let loc = self.index.get(id)?;
        let f = &self.files[loc.file as usize];
        let mut buf = vec![0u8; loc.len as usize];
        let ok = match &f.open {
            Some(file) => file.read_exact_at(&mut buf, loc.offset).is_ok(),
            None => {
                open(&f.path).is_some_and(|file| file.read_exact_at(&mut buf, loc.offset).is_ok())
            }
        };
        if ok && Id::of(&buf) == *id {
            Some(buf)
        } else {
            self.counts.stale.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Serves a prefix of `ids` in order, returning its length: local chunks are read up
    /// front (at most [`HELD_BYTES`]), the rest comes from `inner` in one request, and the
    /// two are merged back into request order.
    fn fetch_part(&self, ids: &[Id], each: &mut OnBlob<'_>) -> Result<usize, RestoreError> {
        let mut local: Vec<Option<Vec<u8>>> = Vec::with_capacity(ids.len());
        let mut held = 0;
        for id in ids {
            if held >= HELD_BYTES {
                break;
            }
            let got = self.read(id);
            held += got.as_ref().map_or(0, Vec::len);
            local.push(got);
        }
        let ids = &ids[..local.len()];
        let remote: Vec<Id> = ids
            .iter()
            .zip(&local)
            .filter(|(_, l)| l.is_none())
            .map(|(id, _)| *id)
            .collect();
        let mut next = 0;
        if !remote.is_empty() {
            self.remote(&remote, &mut |frame, stored| {
                // Local chunks before this remote one go first, as the request ordered them.
                self.emit_local(ids, &mut local, &mut next, each)?;
                next += 1;
                each(frame, stored)
            })?;
        }
        self.emit_local(ids, &mut local, &mut next, each)?;
        Ok(ids.len())
    }

    /// Passes on the local chunks from `next` up to the next remote one.
    fn emit_local(
        &self,
        ids: &[Id],
        local: &mut [Option<Vec<u8>>],
        next: &mut usize,
        each: &mut OnBlob<'_>,
    ) -> Result<(), RestoreError> {
        while let Some(raw) = local.get_mut(*next).and_then(Option::take) {
            self.counts.local_chunks.fetch_add(1, Ordering::Relaxed);
            self.counts
                .local_bytes
                .fetch_add(raw.len() as u64, Ordering::Relaxed);
            let frame = BlobFrame {
                id: ids[*next],
                kind: Some(BlobKind::Chunk),
                compression: Compression::None,
                raw_len: raw.len() as u32,
                stored_len: raw.len() as u32,
            };
            each(frame, &raw)?;
            *next += 1;
        }
        Ok(())
    }

    /// Fetches from `inner`, counting the chunks it sends.
    fn remote(&self, ids: &[Id], each: &mut OnBlob<'_>) -> Result<(), RestoreError> {
        self.inner.fetch(ids, &mut |frame, stored| {
            if frame.kind == Some(BlobKind::Chunk) {
                let c = &self.counts;
                c.remote_chunks.fetch_add(1, Ordering::Relaxed);
                c.remote_stored_bytes
                    .fetch_add(stored.len() as u64, Ordering::Relaxed);
                c.remote_raw_bytes
                    .fetch_add(u64::from(frame.raw_len), Ordering::Relaxed);
            }
            each(frame, stored)
        })
    }
}

/// Opens a regular file for reading, never through a symlink, and never blocking on what
/// may have become a fifo since the snapshot.
fn open(path: &Path) -> Option<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    file.metadata().ok()?.is_file().then_some(file)
}

impl BlobSource for LocalChunks<'_> {
    fn fetch(&self, ids: &[Id], each: &mut OnBlob<'_>) -> Result<(), RestoreError> {
        if self.index.is_empty() {
            return self.remote(ids, each);
        }
        let mut start = 0;
        while start < ids.len() {
            start += self.fetch_part(&ids[start..], each)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restore::testing::MemSource;
    use crate::restore::{Request, restore};
    use morgana_core::id::FileIdHasher;
    use morgana_core::pack::Codec;
    use morgana_core::testdata::noise;
    use morgana_core::tree::{Entry, Tree};
    use std::sync::atomic::Ordering::Relaxed;

    /// A file entry chunked as the scan chunks it, its chunks stored in `src`.
    fn file(src: &MemSource, name: &[u8], data: &[u8]) -> Entry {
        let mut chunker = Chunker::new(ChunkerParams::default()).unwrap();
        let chunked = chunker
            .chunk(data, |_, bytes| -> Result<(), std::io::Error> {
                src.put(BlobKind::Chunk, bytes);
                Ok(())
            })
            .unwrap();
        Entry {
            name: name.to_vec(),
            kind: Some(Kind::File),
            mode: 0o644,
            // SAFETY: no preconditions.
            uid: unsafe { libc::geteuid() },
            // SAFETY: no preconditions.
            gid: unsafe { libc::getegid() },
            mtime_ns: 1_700_000_000_000_000_000,
            size: data.len() as u64,
            content: Content::Chunks {
                file: FileIdHasher::of(&chunked.chunks),
                chunks: chunked.chunks,
            },
            ..Default::default()
        }
    }

    fn chunks(e: &Entry) -> &[Id] {
        match &e.content {
            Content::Chunks { chunks, .. } => chunks,
            _ => panic!("not chunked"),
        }
    }

    fn wanted(e: &Entry) -> IdMap<()> {
        chunks(e).iter().map(|c| (*c, ())).collect()
    }

    /// Fetches `ids`, checking order and content; returns the raw bytes.
    fn fetch_all(src: &dyn BlobSource, ids: &[Id]) -> Vec<Vec<u8>> {
        let mut codec = Codec::new(1);
        let mut out = Vec::new();
        src.fetch(ids, &mut |frame, stored| {
            assert_eq!(frame.id, ids[out.len()], "out of order");
            let raw = codec
                .open(frame.id, frame.compression, stored, frame.raw_len)
                .expect("verified");
            out.push(raw);
            Ok(())
        })
        .unwrap();
        assert_eq!(out.len(), ids.len());
        out
    }

    /// Version 1 on the device, version 2 (an edit in the middle, an append) wanted.
    fn versions() -> (Vec<u8>, Vec<u8>) {
        let v1 = noise(2_000_000, 1);
        let mut v2 = v1.clone();
        v2[1_000_000..1_000_100].copy_from_slice(&noise(100, 2));
        v2.extend(noise(50_000, 3));
        (v1, v2)
    }

    /// One file being updated: version 1 on the device as `/f`, version 2 on the appliance.
    struct Update {
        tmp: tempfile::TempDir,
        v1: Vec<u8>,
        v2: Vec<u8>,
        device: Flat,
        remote: MemSource,
        new: Entry,
    }

    fn update() -> Update {
        let (v1, v2) = versions();
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), &v1).unwrap();
        let old = MemSource::default();
        let device: Flat = [(b"/f".to_vec(), file(&old, b"f", &v1))].into();
        let remote = MemSource::default();
        let new = file(&remote, b"f", &v2);
        Update {
            tmp,
            v1,
            v2,
            device,
            remote,
            new,
        }
    }

    #[test]
    fn only_changed_chunks_are_fetched_in_request_order() {
        let Update {
            tmp,
            v2,
            device,
            remote,
            new,
            ..
        } = update();
        let (local, found) =
            LocalChunks::index(&remote, tmp.path(), &device, &[b"/f"], &wanted(&new));
        let changed: Vec<&Id> = chunks(&new)
            .iter()
            .filter(|c| !chunks(&device[&b"/f".to_vec()]).contains(c))
            .collect();
        assert!(!changed.is_empty() && changed.len() < chunks(&new).len() / 2);
        assert_eq!(found.chunks as usize, chunks(&new).len() - changed.len());
        let got = fetch_all(&local, chunks(&new));
        assert_eq!(got.concat(), v2);
        assert_eq!(
            remote.requested_ids.load(Relaxed),
            changed.len(),
            "only the changed chunks go to the appliance"
        );
        let c = &local.counts;
        assert_eq!(c.remote_chunks.load(Relaxed) as usize, changed.len());
        assert_eq!(c.local_bytes.load(Relaxed), found.bytes);
        assert_eq!(
            c.remote_raw_bytes.load(Relaxed) + c.local_bytes.load(Relaxed),
            v2.len() as u64
        );
        assert_eq!(c.stale.load(Relaxed), 0);
    }

    #[test]
    fn a_file_changed_since_indexing_is_fetched_instead() {
        let Update {
            tmp,
            v1,
            v2,
            device,
            remote,
            new,
        } = update();
        let path = tmp.path().join("f");
        let (local, found) =
            LocalChunks::index(&remote, tmp.path(), &device, &[b"/f"], &wanted(&new));
        assert!(found.chunks > 0);
        // Rewritten in place: the indexed ranges now hold other bytes.
        std::fs::write(&path, noise(v1.len(), 9)).unwrap();
        let got = fetch_all(&local, chunks(&new));
        assert_eq!(got.concat(), v2);
        assert_eq!(local.counts.stale.load(Relaxed), found.chunks);
        assert_eq!(local.counts.local_chunks.load(Relaxed), 0);
        assert_eq!(remote.requested_ids.load(Relaxed), chunks(&new).len());
    }

    #[test]
    fn chunks_of_other_files_are_found_and_small_shares_are_not_worth_a_read() {
        let (v1, _) = versions();
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("copy"), &v1).unwrap();
        let big = [v1[..300_000].to_vec(), noise(4_000_000, 7)].concat();
        std::fs::write(tmp.path().join("big"), &big).unwrap();
        let old = MemSource::default();
        let device: Flat = [
            (b"/big".to_vec(), file(&old, b"big", &big)),
            (b"/copy".to_vec(), file(&old, b"copy", &v1)),
        ]
        .into();
        let remote = MemSource::default();
        // A new file at another path with v1's content: all of it is on the device.
        let new = file(&remote, b"moved", &v1);
        let (local, found) = LocalChunks::index(&remote, tmp.path(), &device, &[], &wanted(&new));
        assert_eq!(found.chunks as usize, chunks(&new).len());
        assert_eq!(found.files_read, 1, "big shares too little to be read");
        assert_eq!(fetch_all(&local, chunks(&new)).concat(), v1);
        assert_eq!(remote.requested_ids.load(Relaxed), 0);
    }

    #[test]
    fn an_update_written_over_the_old_file_downloads_only_what_changed() {
        let Update {
            tmp,
            v2,
            device,
            remote,
            new,
            ..
        } = update();
        let root = remote.tree(Tree {
            entries: vec![new.clone()],
        });
        let (local, _) = LocalChunks::index(&remote, tmp.path(), &device, &[b"/f"], &wanted(&new));
        let stats = restore(
            &local,
            &Request::new("s".into(), root, Vec::new(), tmp.path().to_path_buf()),
        )
        .unwrap();
        assert_eq!(std::fs::read(tmp.path().join("f")).unwrap(), v2);
        assert_eq!(stats.files, 1);
        let changed = chunks(&new)
            .iter()
            .filter(|c| !chunks(&device[&b"/f".to_vec()]).contains(c))
            .count();
        // The tree, then the changed chunks.
        assert_eq!(remote.requested_ids.load(Relaxed), 1 + changed);
    }
}
