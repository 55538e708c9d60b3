//! Packs: many compressed blobs in one file, an index at the end, a BLAKE3 checksum over
//! everything (format in FORMAT.md). A pack's id is that checksum.

use crate::id::Id;
use crate::varint::{self, ReadError, Reader};

pub const PACK_MAGIC: &[u8; 4] = b"MGPK";
pub const PACK_END_MAGIC: &[u8; 8] = b"MGPK-END";
pub const PACK_VERSION: u8 = 1;
const HEADER_LEN: usize = 8;
pub const FOOTER_LEN: usize = 8 + 8 + 32 + 8;
/// Largest pack the appliance accepts in one upload.
pub const MAX_PACK_BYTES: usize = 160 * 1024 * 1024;
/// Largest blob: chunks stay far below it, but a tree listing a huge file's chunk ids can
/// be large.
pub const MAX_BLOB_BYTES: usize = 128 * 1024 * 1024;
/// Packs are closed once they pass this size; small enough to retry cheaply.
pub const TARGET_PACK_BYTES: usize = 16 * 1024 * 1024;
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlobKind {
    Chunk = 0,
    Tree = 1,
}

impl BlobKind {
    pub fn from_u8(v: u8) -> Option<BlobKind> {
        match v {
            0 => Some(BlobKind::Chunk),
            1 => Some(BlobKind::Tree),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            BlobKind::Chunk => "chunk",
            BlobKind::Tree => "tree",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

impl Compression {
    pub fn from_u8(v: u8) -> Option<Compression> {
        match v {
            0 => Some(Compression::None),
            1 => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// Where one blob sits inside a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub id: Id,
    pub kind: BlobKind,
    pub compression: Compression,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("pack is {0} bytes, more than the {MAX_PACK_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("not a Morgana pack (bad magic or footer)")]
    Magic,
    #[error("pack format version {0} is not supported (this build reads version 1)")]
    Version(u8),
    #[error("pack checksum mismatch: the file is damaged or truncated")]
    Checksum,
    #[error("pack index is malformed: {0}")]
    Index(#[from] ReadError),
    #[error("pack index entry {0} has an unknown kind or compression")]
    BadEntry(Id),
    #[error("pack index entry {0} points outside the pack's data")]
    OutOfBounds(Id),
    #[error("blob {id} does not decompress: {reason}")]
    Decompress { id: Id, reason: String },
    #[error("blob {id} is damaged: its bytes hash to {actual}")]
    HashMismatch { id: Id, actual: Id },
}

/// Compression and decompression contexts, reused across blobs.
pub struct Codec {
    compressor: zstd::bulk::Compressor<'static>,
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl Codec {
    pub fn new(level: i32) -> Codec {
        Codec {
            compressor: zstd::bulk::Compressor::new(level).expect("zstd level is valid"),
            decompressor: zstd::bulk::Decompressor::new().expect("zstd context"),
        }
    }

    /// Compresses `raw` into `out` (cleared first); stores it raw when that is smaller.
    pub fn compress_into(&mut self, raw: &[u8], out: &mut Vec<u8>) -> Compression {
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        match self.compressor.compress_to_buffer(raw, out) {
            Ok(n) if n < raw.len() => Compression::Zstd,
            _ => {
                out.clear();
                out.extend_from_slice(raw);
                Compression::None
            }
        }
    }

    /// Decompresses a stored blob and checks it against its id: the only way blob bytes
    /// leave a pack.
    pub fn open(
        &mut self,
        id: Id,
        compression: Compression,
        stored: &[u8],
        raw_len: u32,
    ) -> Result<Vec<u8>, PackError> {
        let raw = match compression {
            Compression::None => stored.to_vec(),
            Compression::Zstd => {
                let mut out = Vec::with_capacity(raw_len as usize);
                self.decompressor
                    .decompress_to_buffer(stored, &mut out)
                    .map_err(|e| PackError::Decompress {
                        id,
                        reason: e.to_string(),
                    })?;
                out
            }
        };
        if raw.len() != raw_len as usize {
            return Err(PackError::Decompress {
                id,
                reason: format!("expected {raw_len} bytes, got {}", raw.len()),
            });
        }
        let actual = Id::of(&raw);
        if actual != id {
            return Err(PackError::HashMismatch { id, actual });
        }
        Ok(raw)
    }
}

/// Builds a pack in memory.
pub struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl Default for PackBuilder {
    fn default() -> Self {
        PackBuilder::with_buffer(Vec::new())
    }
}

/// A finished pack: its bytes, its id (the checksum), and its index.
pub struct Pack {
    pub id: Id,
    pub bytes: Vec<u8>,
    pub entries: Vec<PackEntry>,
}

impl PackBuilder {
    /// A builder that writes into `buf`, cleared first, so that a pack's memory can serve
    /// the next one.
    pub fn with_buffer(mut buf: Vec<u8>) -> Self {
        buf.clear();
        buf.reserve(TARGET_PACK_BYTES + 1024 * 1024);
        buf.extend_from_slice(PACK_MAGIC);
        buf.extend_from_slice(&[PACK_VERSION, 0, 0, 0]);
        PackBuilder {
            buf,
            entries: Vec::new(),
        }
    }

    /// Appends an already compressed blob.
    pub fn add_stored(
        &mut self,
        id: Id,
        kind: BlobKind,
        compression: Compression,
        stored: &[u8],
        raw_len: u32,
    ) {
        let offset = self.buf.len() as u64;
        self.buf.extend_from_slice(stored);
        self.entries.push(PackEntry {
            id,
            kind,
            compression,
            offset,
            stored_len: stored.len() as u32,
            raw_len,
        });
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn blob_count(&self) -> usize {
        self.entries.len()
    }

    pub fn finish(mut self) -> Pack {
        let index_offset = self.buf.len() as u64;
        varint::put(&mut self.buf, self.entries.len() as u64);
        for e in &self.entries {
            self.buf.extend_from_slice(&e.id.0);
            self.buf.push(e.kind as u8);
            self.buf.push(e.compression as u8);
            varint::put(&mut self.buf, e.offset);
            varint::put(&mut self.buf, e.stored_len as u64);
            varint::put(&mut self.buf, e.raw_len as u64);
        }
        let index_len = self.buf.len() as u64 - index_offset;
        let checksum = Id::of(&self.buf);
        self.buf.extend_from_slice(&index_offset.to_le_bytes());
        self.buf.extend_from_slice(&index_len.to_le_bytes());
        self.buf.extend_from_slice(&checksum.0);
        self.buf.extend_from_slice(PACK_END_MAGIC);
        Pack {
            id: checksum,
            bytes: self.buf,
            entries: self.entries,
        }
    }
}

/// Verifies a whole pack's framing and checksum and returns its id and index. Blob bytes
/// are not opened here: callers open each blob with [`Codec::open`].
pub fn parse(bytes: &[u8]) -> Result<(Id, Vec<PackEntry>), PackError> {
    if bytes.len() > MAX_PACK_BYTES {
        return Err(PackError::TooLarge(bytes.len()));
    }
    if bytes.len() < HEADER_LEN + FOOTER_LEN || &bytes[..4] != PACK_MAGIC {
        return Err(PackError::Magic);
    }
    if bytes[4] != PACK_VERSION {
        return Err(PackError::Version(bytes[4]));
    }
    let footer = &bytes[bytes.len() - FOOTER_LEN..];
    if &footer[48..] != PACK_END_MAGIC {
        return Err(PackError::Magic);
    }
    let body = &bytes[..bytes.len() - FOOTER_LEN];
    let index_offset = u64::from_le_bytes(footer[..8].try_into().unwrap());
    let index_len = u64::from_le_bytes(footer[8..16].try_into().unwrap());
    let checksum = Id(footer[16..48].try_into().unwrap());
    if Id::of(body) != checksum {
        return Err(PackError::Checksum);
    }
    if index_offset < HEADER_LEN as u64
        || index_offset.checked_add(index_len) != Some(body.len() as u64)
    {
        return Err(PackError::Magic);
    }
    let mut r = Reader::new(&body[index_offset as usize..]);
    let count = r.varint("blob count")?;
    let mut entries = Vec::with_capacity((count as usize).min(r.remaining() / 37));
    for _ in 0..count {
        let id = r.id("blob id")?;
        let kind = BlobKind::from_u8(r.u8("kind")?).ok_or(PackError::BadEntry(id))?;
        let compression =
            Compression::from_u8(r.u8("compression")?).ok_or(PackError::BadEntry(id))?;
        let offset = r.varint("offset")?;
        let stored_len = r.varint("stored length")?;
        let raw_len = r.varint("raw length")?;
        let in_bounds = offset >= HEADER_LEN as u64
            && offset
                .checked_add(stored_len)
                .is_some_and(|end| end <= index_offset)
            && raw_len <= MAX_BLOB_BYTES as u64;
        if !in_bounds {
            return Err(PackError::OutOfBounds(id));
        }
        entries.push(PackEntry {
            id,
            kind,
            compression,
            offset,
            stored_len: stored_len as u32,
            raw_len: raw_len as u32,
        });
    }
    if !r.is_empty() {
        return Err(ReadError::Truncated("index end").into());
    }
    Ok((checksum, entries))
}

/// The stored bytes of one entry of a parsed pack.
pub fn stored<'a>(pack: &'a [u8], e: &PackEntry) -> &'a [u8] {
    &pack[e.offset as usize..(e.offset + e.stored_len as u64) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(blobs: &[&[u8]]) -> Pack {
        fill(PackBuilder::default(), blobs)
    }

    fn fill(mut b: PackBuilder, blobs: &[&[u8]]) -> Pack {
        let mut codec = Codec::new(DEFAULT_ZSTD_LEVEL);
        let mut out = Vec::new();
        for raw in blobs {
            let c = codec.compress_into(raw, &mut out);
            b.add_stored(Id::of(raw), BlobKind::Chunk, c, &out, raw.len() as u32);
        }
        b.finish()
    }

    #[test]
    fn a_reused_buffer_builds_the_same_pack() {
        let first = build(&[&[1u8; 5000], b"first"]);
        let reused = fill(
            PackBuilder::with_buffer(first.bytes),
            &[&[2u8; 3000], b"second"],
        );
        let fresh = build(&[&[2u8; 3000], b"second"]);
        assert_eq!(reused.bytes, fresh.bytes);
        assert_eq!(reused.id, fresh.id);
    }

    #[test]
    fn round_trip_and_verify() {
        let a = vec![7u8; 100_000];
        let b = b"incompressible? no, short".to_vec();
        let pack = build(&[&a, &b]);
        let (id, entries) = parse(&pack.bytes).unwrap();
        assert_eq!(id, pack.id);
        assert_eq!(entries, pack.entries);
        assert_eq!(entries[0].compression, Compression::Zstd);
        assert_eq!(entries[1].compression, Compression::None);
        let mut codec = Codec::new(1);
        for (e, raw) in entries.iter().zip([&a, &b]) {
            let got = codec
                .open(e.id, e.compression, stored(&pack.bytes, e), e.raw_len)
                .unwrap();
            assert_eq!(&got, raw);
        }
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let pack = build(&[&[1u8; 5000], b"xyz"]);
        for i in 0..pack.bytes.len() {
            let mut bad = pack.bytes.clone();
            bad[i] ^= 0x40;
            assert!(parse(&bad).is_err(), "flip at {i} went unnoticed");
        }
        for cut in 0..pack.bytes.len() {
            assert!(parse(&pack.bytes[..cut]).is_err());
        }
    }

    #[test]
    fn open_rejects_wrong_bytes_under_an_id() {
        let mut codec = Codec::new(1);
        let err = codec
            .open(Id::of(b"popular"), Compression::None, b"evil", 4)
            .unwrap_err();
        assert!(matches!(err, PackError::HashMismatch { .. }));
    }
}
