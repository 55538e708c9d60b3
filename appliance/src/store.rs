//! Pack files on volumes: `<volume>/packs/<2 hex>/<pack id hex>.pack`. A pack appears whole
//! or not at all (temp file, fsync, rename, fsync of the directory), so a crash never leaves
//! a half pack under a real name; reads are byte ranges the catalog points at.

use std::cell::RefCell;
use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use morgana_core::Id;
use morgana_core::pack::{Codec, DEFAULT_ZSTD_LEVEL, Pack, PackEntry, PackError};

use crate::catalog::{BlobLocation, PackRecord};

#[derive(Debug, thiserror::Error)]
pub enum PackStoreError {
    #[error("cannot use volume {}: {source}; check that it exists and is writable", path.display())]
    Volume {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no volume has room for a {size}-byte pack (the emptiest has {free} bytes free): free \
         space or add a volume with `--volume DIR`"
    )]
    Full { size: usize, free: u64 },
    #[error("cannot write pack {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot delete pack {}: {source}; check the volume's permissions", path.display())]
    Delete {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read pack {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("blob {id} in pack {} is damaged: {source}; run `morgana check`", path.display())]
    Damaged {
        id: Id,
        path: PathBuf,
        source: Box<PackError>,
    },
}

pub type Result<T, E = PackStoreError> = std::result::Result<T, E>;

thread_local! {
    // zstd contexts are worth reusing; blocking-pool threads live long.
    static CODEC: RefCell<Codec> = RefCell::new(Codec::new(DEFAULT_ZSTD_LEVEL));
}

/// Runs `f` with this thread's codec.
pub fn with_codec<R>(f: impl FnOnce(&mut Codec) -> R) -> R {
    CODEC.with(|c| f(&mut c.borrow_mut()))
}

/// The volumes new packs go to. Reading needs no volume list: the catalog records each
/// pack's volume, and any server can read any volume.
#[derive(Debug)]
pub struct PackStore {
    volumes: Vec<PathBuf>,
}

impl PackStore {
    /// Creates the volumes' directories as needed and remembers their absolute paths (the
    /// catalog stores them, so they must not depend on the working directory).
    pub fn open(volumes: &[PathBuf]) -> Result<PackStore> {
        let mut out = Vec::with_capacity(volumes.len());
        for v in volumes {
            let err = |source| PackStoreError::Volume {
                path: v.clone(),
                source,
            };
            std::fs::create_dir_all(v.join("packs")).map_err(err)?;
            out.push(std::fs::canonicalize(v).map_err(err)?);
        }
        Ok(PackStore { volumes: out })
    }

    pub fn volumes(&self) -> &[PathBuf] {
        &self.volumes
    }

    pub fn pack_path(volume: &Path, pack: Id) -> PathBuf {
        let hex = pack.to_hex();
        volume
            .join("packs")
            .join(&hex[..2])
            .join(format!("{hex}.pack"))
    }

    /// Writes a finished pack to the volume with the most free space; returns that volume.
    pub fn write_pack(&self, pack: Id, bytes: &[u8]) -> Result<PathBuf> {
        let (volume, free) = self
            .volumes
            .iter()
            .map(|v| (v, free_bytes(v).unwrap_or(0)))
            .max_by_key(|(_, free)| *free)
            .ok_or(PackStoreError::Full {
                size: bytes.len(),
                free: 0,
            })?;
        // Keep a margin so the catalog's own disk (often the same) never fills to the brim.
        let needed = bytes.len() as u64 + 16 * 1024 * 1024;
        if free < needed {
            return Err(PackStoreError::Full {
                size: bytes.len(),
                free,
            });
        }
        write_atomically(&Self::pack_path(volume, pack), bytes)?;
        Ok(volume.clone())
    }

    /// Writes a finished pack atomically and describes it for the catalog.
    pub fn store(&self, packed: Pack) -> Result<(PackRecord, Vec<PackEntry>)> {
        let volume = self.write_pack(packed.id, &packed.bytes)?;
        let record = PackRecord {
            id: packed.id,
            volume,
            size: packed.bytes.len() as u64,
            blob_count: packed.entries.len() as u64,
            created: crate::clock::rfc3339_ms(crate::clock::now_ms()),
        };
        Ok((record, packed.entries))
    }

    /// Reads `len` stored bytes at `offset` of a pack file.
    pub fn read_range(path: &Path, offset: u64, len: u32) -> Result<Vec<u8>> {
        let file = std::fs::File::open(path).map_err(|source| PackStoreError::Read {
            path: path.into(),
            source,
        })?;
        let mut buf = Vec::new();
        read_range_into(&file, path, offset, len, &mut buf)?;
        Ok(buf)
    }

    /// Reads a blob and opens it (decompress + verify against its id).
    pub fn read_blob(loc: &BlobLocation, codec: &mut Codec) -> Result<Vec<u8>> {
        let path = Self::pack_path(&loc.volume, loc.pack);
        let stored = Self::read_range(&path, loc.entry.offset, loc.entry.stored_len)?;
        codec
            .open(
                loc.entry.id,
                loc.entry.compression,
                &stored,
                loc.entry.raw_len,
            )
            .map_err(|source| PackStoreError::Damaged {
                id: loc.entry.id,
                path,
                source: Box::new(source),
            })
    }
}

/// Appends `len` bytes read at `offset` of an open pack file to `out`; on error `out` is
/// left as it was.
pub fn read_range_into(
    file: &std::fs::File,
    path: &Path,
    offset: u64,
    len: u32,
    out: &mut Vec<u8>,
) -> Result<()> {
    let start = out.len();
    out.resize(start + len as usize, 0);
    file.read_exact_at(&mut out[start..], offset)
        .map_err(|source| {
            out.truncate(start);
            PackStoreError::Read {
                path: path.into(),
                source,
            }
        })
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let err = |source| PackStoreError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .ok_or_else(|| err(std::io::Error::other("pack path has no directory")))?;
    std::fs::create_dir_all(dir).map_err(err)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per writer: two uploads of the same pack may race here.
    let tmp = dir.join(format!(".{name}.{}.tmp", crate::random::hex(8)));
    let result = (|| {
        let f = write_new_file(&tmp, bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the directory entry is.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Alignment of memory, file offsets and lengths for `O_DIRECT`: a page, which is also a
/// multiple of every block size Linux filesystems use.
const DIRECT_ALIGN: usize = 4096;
/// How much of a pack one direct write carries. 1 MiB writes ran at 2.1 GB/s on this
/// appliance's disk, larger ones no faster.
const DIRECT_CHUNK: usize = 1 << 20;

/// Creates `path` (a name unique to this writer) and writes `bytes` into it, bypassing the
/// page cache where the filesystem allows. A pack is not read back soon after it is
/// written, and copying it into the page cache was the largest single cost of storing one
/// (a third of the appliance's CPU in a first sync, most of it faulting in fresh cache
/// pages); the direct path instead copies through a small aligned buffer that stays in the
/// CPU cache.
fn write_new_file(path: &Path, bytes: &[u8]) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let direct = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    let mut file = match direct {
        Ok(file) => match write_direct(&file, bytes) {
            Ok(()) => return Ok(file),
            // The filesystem took the flag but refuses direct writes: start over buffered.
            Err(e) if refuses_direct(&e) => {
                clear_direct(&file)?;
                file.set_len(0)?;
                file
            }
            Err(e) => return Err(e),
        },
        // Filesystems without direct I/O (tmpfs before 6.6) refuse it at open, which may
        // already have created the file: open it again without `create_new`.
        Err(e) if refuses_direct(&e) => std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?,
        Err(e) => return Err(e),
    };
    // The direct attempt wrote with `pwrite`, so the cursor is still at 0.
    file.write_all(bytes)?;
    Ok(file)
}

/// Writes `bytes` from offset 0 of a file opened with `O_DIRECT`, in aligned chunks; the
/// last chunk is padded with zeros to the alignment and the padding cut off afterwards.
fn write_direct(file: &std::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    let mut buffer =
        AlignedBuffer::new(DIRECT_CHUNK.min(bytes.len().next_multiple_of(DIRECT_ALIGN)));
    let mut offset = 0;
    for piece in bytes.chunks(DIRECT_CHUNK) {
        let padded = piece.len().next_multiple_of(DIRECT_ALIGN);
        let out = &mut buffer.as_mut_slice()[..padded];
        out[..piece.len()].copy_from_slice(piece);
        out[piece.len()..].fill(0);
        file.write_all_at(out, offset)?;
        offset += padded as u64;
    }
    if offset != bytes.len() as u64 {
        file.set_len(bytes.len() as u64)?;
    }
    Ok(())
}

/// Linux answers `EINVAL` where a filesystem has no direct I/O; some FUSE and network
/// filesystems answer `EOPNOTSUPP`.
fn refuses_direct(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
}

fn clear_direct(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL on a descriptor borrowed for the call; no memory is
    // passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Zeroed heap memory aligned to `DIRECT_ALIGN`, which a `Vec<u8>` cannot promise.
struct AlignedBuffer {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuffer {
    fn new(len: usize) -> AlignedBuffer {
        let layout = std::alloc::Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN)
            .expect("a pack-sized buffer has a valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuffer { ptr, layout }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised (zeroed) bytes this buffer owns,
        // and `&mut self` makes this the only reference to them.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout and not freed since.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` points to writable memory of the right
    // type; statvfs fills it completely when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms; on Linux both are already u64.
    #[allow(clippy::useless_conversion)]
    let free = u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize));
    Some(free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_packs_atomically_under_their_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = PackStore::open(&[dir.path().join("v1")]).unwrap();
        let id = Id::of(b"pack");
        let volume = store.write_pack(id, b"pack bytes").unwrap();
        assert_eq!(volume, store.volumes()[0]);
        let path = PackStore::pack_path(&volume, id);
        assert!(path.starts_with(volume.join("packs").join(&id.to_hex()[..2])));
        assert_eq!(std::fs::read(&path).unwrap(), b"pack bytes");
        // Writing the same pack again (a retried upload) replaces it in one step.
        store.write_pack(id, b"pack bytes").unwrap();
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");

        assert_eq!(PackStore::read_range(&path, 5, 5).unwrap(), b"bytes");
        assert!(matches!(
            PackStore::read_range(&path, 8, 5),
            Err(PackStoreError::Read { .. })
        ));
    }

    #[test]
    fn writes_any_length_exactly() {
        let dir = tempfile::tempdir().unwrap();
        // Lengths around the alignment and the chunk size, where padding and the final cut
        // could go wrong.
        for len in [
            0,
            1,
            DIRECT_ALIGN - 1,
            DIRECT_ALIGN,
            DIRECT_ALIGN + 1,
            DIRECT_CHUNK,
            2 * DIRECT_CHUNK + 3,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
            let path = dir.path().join(format!("f{len}"));
            write_new_file(&path, &bytes).unwrap().sync_all().unwrap();
            assert!(
                std::fs::read(&path).unwrap() == bytes,
                "length {len} read back differs"
            );
            // The direct path opens with `create_new`: an existing file is an error. (The
            // buffered fallback, for filesystems without direct I/O, is not reached here.)
            assert!(write_new_file(&path, b"other").is_err());
        }
    }

    #[test]
    fn a_failed_write_leaves_nothing_under_the_real_name() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("packs");
        // A file where a directory must go makes the write fail part-way.
        let path = blocker.join("ab").join("x.pack");
        std::fs::write(&blocker, b"").unwrap();
        assert!(write_atomically(&path, b"data").is_err());
        assert!(!path.exists());
    }

    #[test]
    fn reads_and_verifies_blobs() {
        use morgana_core::pack::{BlobKind, Compression, PackEntry};
        let dir = tempfile::tempdir().unwrap();
        let store = PackStore::open(&[dir.path().to_path_buf()]).unwrap();
        let pack = Id::of(b"p");
        let volume = store.write_pack(pack, b"hdr-hello").unwrap();
        let mut loc = BlobLocation {
            pack,
            volume,
            entry: PackEntry {
                id: Id::of(b"hello"),
                kind: BlobKind::Chunk,
                compression: Compression::None,
                offset: 4,
                stored_len: 5,
                raw_len: 5,
            },
        };
        let mut codec = Codec::new(1);
        assert_eq!(PackStore::read_blob(&loc, &mut codec).unwrap(), b"hello");
        loc.entry.offset = 3;
        assert!(matches!(
            PackStore::read_blob(&loc, &mut codec),
            Err(PackStoreError::Damaged { .. })
        ));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TreeLoadError {
    #[error("tree {id} is not in the blob index; run `morgana check`")]
    Missing { id: Id },
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Store(#[from] PackStoreError),
    #[error("tree {id} does not decode ({source}); run `morgana check`")]
    Bad {
        id: Id,
        source: morgana_core::tree::TreeError,
    },
    #[error("reading a stored tree was interrupted: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Reads, verifies and decodes the stored tree `id`.
pub async fn load_tree(
    catalog: &dyn crate::catalog::Catalog,
    id: Id,
) -> std::result::Result<morgana_core::tree::Tree, TreeLoadError> {
    let Some(Some(loc)) = catalog.locate_blobs(&[id]).await?.into_iter().next() else {
        return Err(TreeLoadError::Missing { id });
    };
    tokio::task::spawn_blocking(move || {
        let raw = with_codec(|codec| PackStore::read_blob(&loc, codec))?;
        morgana_core::tree::Tree::decode(&raw).map_err(|source| TreeLoadError::Bad { id, source })
    })
    .await?
}

/// What [`walk_tree`] does after visiting an entry.
pub enum Visit<S> {
    /// Go into this directory; its entries are visited with this state.
    Enter(S),
    /// Do not go into it (or it is not a directory).
    Skip,
    /// End the walk.
    Stop,
}

/// Walks the stored trees below `root` depth first, calling `visit` with each entry's
/// parent state, its absolute path (`/etc/hosts`) and the entry. Memory is the stack of
/// directories not yet read, never the whole snapshot.
pub async fn walk_tree<S>(
    catalog: &dyn crate::catalog::Catalog,
    root: Id,
    root_state: S,
    mut visit: impl FnMut(&S, &[u8], &morgana_core::tree::Entry) -> Visit<S>,
) -> std::result::Result<(), TreeLoadError> {
    let mut stack = vec![(Vec::new(), root, root_state)];
    while let Some((dir, id, state)) = stack.pop() {
        for e in load_tree(catalog, id).await?.entries {
            let mut path = Vec::with_capacity(dir.len() + 1 + e.name.len());
            path.extend_from_slice(&dir);
            path.push(b'/');
            path.extend_from_slice(&e.name);
            match (visit(&state, &path, &e), &e.content) {
                (Visit::Stop, _) => return Ok(()),
                (Visit::Enter(sub), morgana_core::tree::Content::Tree(sub_id)) => {
                    stack.push((path, *sub_id, sub))
                }
                _ => {}
            }
        }
    }
    Ok(())
}
