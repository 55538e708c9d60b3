//! The reflector's blob cache: one file per blob (its wire frame header, then its stored
//! bytes) under the state directory, bounded in bytes, least recently used out first.
//! Only blobs whose BLAKE3 id was verified go in (the caller's job); the index lives in
//! memory and is rebuilt from the files at start, oldest modification first, and a hit
//! touches its file so the order survives restarts.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use morgana_core::Id;
use morgana_core::wire::BlobFrame;

/// The cache a reflector keeps unless told otherwise (`run --reflector-cache-size`).
pub const DEFAULT_LIMIT: u64 = 4 << 30;
const TMP_SUFFIX: &str = ".tmp";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot use the reflector cache {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct BlobCache {
    dir: PathBuf,
    limit: u64,
    index: Mutex<Index>,
}

#[derive(Default)]
struct Index {
    /// Blob → (bytes on disk, last use).
    entries: HashMap<Id, (u64, u64)>,
    /// Last use → blob: the front is evicted first.
    by_use: BTreeMap<u64, Id>,
    total: u64,
    clock: u64,
}

impl Index {
    fn touch(&mut self, id: Id) {
        self.clock += 1;
        let now = self.clock;
        if let Some((_, used)) = self.entries.get_mut(&id) {
            self.by_use.remove(used);
            *used = now;
            self.by_use.insert(now, id);
        }
    }

    fn insert(&mut self, id: Id, size: u64) {
        self.remove(&id);
        self.clock += 1;
        self.entries.insert(id, (size, self.clock));
        self.by_use.insert(self.clock, id);
        self.total += size;
    }

    fn remove(&mut self, id: &Id) -> bool {
        match self.entries.remove(id) {
            Some((size, used)) => {
                self.by_use.remove(&used);
                self.total -= size;
                true
            }
            None => false,
        }
    }

    /// Least recently used blobs to drop until `limit` holds.
    fn evict_to(&mut self, limit: u64) -> Vec<Id> {
        let mut out = Vec::new();
        while self.total > limit {
            let Some((_, id)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((size, _)) = self.entries.remove(&id) {
                self.total -= size;
            }
            out.push(id);
        }
        out
    }
}

impl BlobCache {
    /// Opens (creating) the cache in `dir`, holding at most `limit` bytes.
    pub fn open(dir: &Path, limit: u64) -> Result<BlobCache, CacheError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut found: Vec<(SystemTime, Id, u64)> = Vec::new();
        for sub in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
            if !sub.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            for f in std::fs::read_dir(sub.path())
                .map_err(io(&sub.path()))?
                .flatten()
            {
                let name = f.file_name();
                let name = name.to_string_lossy();
                match name.parse::<Id>() {
                    Ok(id) => {
                        let Ok(meta) = f.metadata() else { continue };
                        let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        found.push((used, id, meta.len()));
                    }
                    // A write a crash interrupted.
                    Err(_) if name.ends_with(TMP_SUFFIX) => {
                        let _ = std::fs::remove_file(f.path());
                    }
                    Err(_) => {}
                }
            }
        }
        found.sort();
        let mut index = Index::default();
        for (_, id, size) in found {
            index.insert(id, size);
        }
        let cache = BlobCache {
            dir: dir.to_path_buf(),
            limit,
            index: Mutex::new(index),
        };
        let evicted = cache.lock().evict_to(limit);
        cache.delete(&evicted);
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, id: &Id) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    fn delete(&self, ids: &[Id]) {
        for id in ids {
            let _ = std::fs::remove_file(self.path(id));
        }
    }

    /// Bytes held now.
    pub fn size(&self) -> u64 {
        self.lock().total
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn contains(&self, id: &Id) -> bool {
        self.lock().entries.contains_key(id)
    }

    /// The cached frame and stored bytes of `id`, as written (not verified again: the
    /// neighbour verifies every blob it gets). A file that went missing or does not hold
    /// what its name says is dropped and reads as a miss.
    pub fn get(&self, id: &Id) -> Option<(BlobFrame, Vec<u8>)> {
        if !self.contains(id) {
            return None;
        }
        let path = self.path(id);
        let parsed = std::fs::read(&path).ok().and_then(|bytes| {
            let header: &[u8; BlobFrame::HEADER_LEN] =
                bytes.get(..BlobFrame::HEADER_LEN)?.try_into().ok()?;
            let frame = BlobFrame::parse_header(header)?;
            let whole = bytes.len() == BlobFrame::HEADER_LEN + frame.stored_len as usize;
            (frame.id == *id && frame.kind.is_some() && whole)
                .then(|| (frame, bytes[BlobFrame::HEADER_LEN..].to_vec()))
        });
        match parsed {
            Some(hit) => {
                self.lock().touch(*id);
                if let Ok(f) = std::fs::File::options().write(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Some(hit)
            }
            None => {
                self.lock().remove(id);
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Keeps a verified blob, evicting the least recently used ones beyond the limit. A
    /// blob bigger than the whole cache is not kept.
    pub fn put(&self, frame: &BlobFrame, stored: &[u8]) -> Result<(), CacheError> {
        let size = (BlobFrame::HEADER_LEN + stored.len()) as u64;
        if size > self.limit || frame.kind.is_none() {
            return Ok(());
        }
        let path = self.path(&frame.id);
        let parent = path.parent().expect("cache paths have a folder");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io { path, source }
        };
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        let tmp = path.with_extension(&TMP_SUFFIX[1..]);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&frame.header())?;
            f.write_all(stored)?;
            // No fsync: a cache lost to a power cut is refilled from the appliance.
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&path)(e));
        }
        let evicted = {
            let mut index = self.lock();
            index.insert(frame.id, size);
            index.evict_to(self.limit)
        };
        self.delete(&evicted);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use morgana_core::pack::{BlobKind, Compression};

    use super::*;

    fn blob(n: u8, len: usize) -> (BlobFrame, Vec<u8>) {
        let data = vec![n; len];
        let frame = BlobFrame {
            id: Id::of(&data),
            kind: Some(BlobKind::Chunk),
            compression: Compression::None,
            raw_len: len as u32,
            stored_len: len as u32,
        };
        (frame, data)
    }

    const ENTRY: u64 = BlobFrame::HEADER_LEN as u64 + 1000;

    #[test]
    fn the_least_recently_used_blob_goes_first_and_the_limit_holds() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path(), 3 * ENTRY).unwrap();
        let (a, b, c, d) = (blob(1, 1000), blob(2, 1000), blob(3, 1000), blob(4, 1000));
        for (f, s) in [&a, &b, &c] {
            cache.put(f, s).unwrap();
        }
        assert_eq!(cache.size(), 3 * ENTRY);
        // a is used, so b is now the least recently used.
        assert_eq!(cache.get(&a.0.id).unwrap().1, a.1);
        cache.put(&d.0, &d.1).unwrap();
        assert_eq!(cache.size(), 3 * ENTRY);
        assert!(cache.get(&b.0.id).is_none(), "b should have been evicted");
        for (f, s) in [&a, &c, &d] {
            let (frame, stored) = cache.get(&f.id).unwrap();
            assert_eq!((frame, &stored), (*f, s));
        }
        let files = walk(dir.path());
        assert_eq!(files, 3, "evicted blobs leave the disk too");

        // Too big for the whole cache: served, not kept.
        let big = blob(5, 4 * 1000);
        cache.put(&big.0, &big.1).unwrap();
        assert!(cache.get(&big.0.id).is_none());
        assert_eq!(cache.size(), 3 * ENTRY);
    }

    #[test]
    fn a_reopened_cache_keeps_its_blobs_and_shrinks_to_a_smaller_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (blob(1, 1000), blob(2, 1000));
        {
            let cache = BlobCache::open(dir.path(), 10 * ENTRY).unwrap();
            cache.put(&a.0, &a.1).unwrap();
            cache.put(&b.0, &b.1).unwrap();
            std::fs::write(dir.path().join("zz.tmp"), b"x").unwrap();
        }
        // b written last: at one blob's room, a (the older) goes.
        let old = SystemTime::now() - std::time::Duration::from_secs(60);
        let f = std::fs::File::options()
            .write(true)
            .open(dir.path().join(&a.0.id.to_hex()[..2]).join(a.0.id.to_hex()))
            .unwrap();
        f.set_modified(old).unwrap();
        let cache = BlobCache::open(dir.path(), ENTRY).unwrap();
        assert!(cache.get(&a.0.id).is_none());
        assert_eq!(cache.get(&b.0.id).unwrap().1, b.1);
        assert_eq!(cache.size(), ENTRY);
    }

    #[test]
    fn a_damaged_or_misnamed_file_reads_as_a_miss_and_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path(), 10 * ENTRY).unwrap();
        let (a, b) = (blob(1, 1000), blob(2, 1000));
        cache.put(&a.0, &a.1).unwrap();
        cache.put(&b.0, &b.1).unwrap();
        let path_a = dir.path().join(&a.0.id.to_hex()[..2]).join(a.0.id.to_hex());
        let path_b = dir.path().join(&b.0.id.to_hex()[..2]).join(b.0.id.to_hex());
        // Truncated.
        let bytes = std::fs::read(&path_a).unwrap();
        std::fs::write(&path_a, &bytes[..bytes.len() - 1]).unwrap();
        assert!(cache.get(&a.0.id).is_none());
        assert!(!path_a.exists());
        // Another blob's frame under this name.
        std::fs::copy(&path_b, &path_a).unwrap();
        cache.put(&a.0, &a.1).unwrap();
        std::fs::write(&path_a, std::fs::read(&path_b).unwrap()).unwrap();
        assert!(cache.get(&a.0.id).is_none());
        assert_eq!(cache.size(), ENTRY);
    }

    fn walk(dir: &Path) -> usize {
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                n += walk(&e.path());
            } else {
                n += 1;
            }
        }
        n
    }
}
