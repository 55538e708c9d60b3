//! Trees: one directory as a content-addressed blob of sorted entries (format in FORMAT.md).
//!
//! Decoding is also validation: a tree with hostile names (empty, `.`, `..`, `/` or NUL
//! inside), unsorted or duplicate entries, or content that does not fit its kind is refused,
//! so nothing downstream (restore, browsing) ever sees one.

use crate::id::Id;
use crate::varint::{self, ReadError, Reader};

pub const TREE_MAGIC: &[u8; 4] = b"MGTR";
pub const TREE_VERSION: u8 = 1;
/// Files up to this size are stored inside their tree instead of as chunks.
pub const INLINE_MAX: u64 = 512;
const NAME_MAX: usize = 4096;
const TARGET_MAX: usize = 64 * 1024;
const XATTR_MAX: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    CharDevice = 5,
    BlockDevice = 6,
    Socket = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::CharDevice,
            6 => Kind::BlockDevice,
            7 => Kind::Socket,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Content {
    /// Directories' children, or nothing for kinds without content.
    #[default]
    None,
    /// The whole file, for files of at most [`INLINE_MAX`] bytes.
    Inline(Vec<u8>),
    /// A file as its whole-file id and its chunk ids in order.
    Chunks { file: Id, chunks: Vec<Id> },
    /// A directory's tree.
    Tree(Id),
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Entry {
    /// Raw bytes: names need not be UTF-8.
    pub name: Vec<u8>,
    pub kind: Option<Kind>,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub size: u64,
    /// Device number for character and block devices.
    pub rdev: u64,
    /// Non-zero for a file with several names: all its names in one snapshot share it.
    pub hardlink: u64,
    pub symlink_target: Vec<u8>,
    /// Sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub content: Content,
}

impl Entry {
    pub fn kind(&self) -> Kind {
        self.kind.expect("decoded entries always have a kind")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Tree {
    pub entries: Vec<Entry>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("not a Morgana tree (bad magic)")]
    Magic,
    #[error("tree format version {0} is not supported (this build reads version 1)")]
    Version(u8),
    #[error("tree is malformed: {0}")]
    Malformed(#[from] ReadError),
    #[error("tree entry name {0:?} is not allowed (empty, `.`, `..`, or containing `/` or NUL)")]
    HostileName(String),
    #[error("tree entries are not strictly sorted at {0:?}")]
    Unsorted(String),
    #[error("tree entry {name:?} has unknown kind {kind}")]
    UnknownKind { name: String, kind: u8 },
    #[error("tree entry {0:?} has content that does not fit its kind or size")]
    BadContent(String),
    #[error("tree has trailing bytes after its last entry")]
    Trailing,
}

/// A name is safe when it names exactly one child of a directory.
pub fn is_safe_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.iter().any(|&b| b == b'/' || b == 0)
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

impl Content {
    /// Appends the content as trees encode it (FORMAT.md): a tag byte, then its payload.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Content::None => out.push(0),
            Content::Inline(data) => {
                out.push(1);
                varint::put_bytes(out, data);
            }
            Content::Chunks { file, chunks } => {
                out.push(2);
                out.extend_from_slice(&file.0);
                varint::put(out, chunks.len() as u64);
                for c in chunks {
                    out.extend_from_slice(&c.0);
                }
            }
            Content::Tree(id) => {
                out.push(3);
                out.extend_from_slice(&id.0);
            }
        }
    }

    /// Reads what [`Content::encode_into`] wrote; `None` for an unknown tag. Whether the
    /// content fits its entry is the caller's to judge.
    pub fn decode_from(r: &mut Reader<'_>) -> Result<Option<Content>, ReadError> {
        Ok(Some(match r.u8("content tag")? {
            0 => Content::None,
            1 => Content::Inline(r.bytes(INLINE_MAX as usize, "inline data")?.to_vec()),
            2 => {
                let file = r.id("file id")?;
                let n = r.varint("chunk count")?;
                if n > (r.remaining() / Id::LEN) as u64 {
                    return Err(ReadError::Truncated("chunk ids"));
                }
                let chunks = (0..n).map(|_| r.id("chunk id")).collect::<Result<_, _>>()?;
                Content::Chunks { file, chunks }
            }
            3 => Content::Tree(r.id("tree id")?),
            _ => return Ok(None),
        }))
    }
}

impl Tree {
    /// Sorts entries by name; encoding requires it.
    pub fn sort(&mut self) {
        self.entries.sort_by(|a, b| a.name.cmp(&b.name));
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.entries.len() * 96);
        out.extend_from_slice(TREE_MAGIC);
        out.push(TREE_VERSION);
        varint::put(&mut out, self.entries.len() as u64);
        for e in &self.entries {
            varint::put_bytes(&mut out, &e.name);
            out.push(e.kind() as u8);
            varint::put(&mut out, e.mode as u64);
            varint::put(&mut out, e.uid as u64);
            varint::put(&mut out, e.gid as u64);
            out.extend_from_slice(&e.mtime_ns.to_le_bytes());
            varint::put(&mut out, e.size);
            varint::put(&mut out, e.rdev);
            varint::put(&mut out, e.hardlink);
            varint::put_bytes(&mut out, &e.symlink_target);
            varint::put(&mut out, e.xattrs.len() as u64);
            for (k, v) in &e.xattrs {
                varint::put_bytes(&mut out, k);
                varint::put_bytes(&mut out, v);
            }
            e.content.encode_into(&mut out);
        }
        out
    }

    /// Encodes and returns the tree's id with its bytes.
    pub fn seal(&self) -> (Id, Vec<u8>) {
        let bytes = self.encode();
        (Id::of(&bytes), bytes)
    }

    pub fn decode(bytes: &[u8]) -> Result<Tree, TreeError> {
        let mut r = Reader::new(bytes);
        if r.take(4, "magic").map_err(|_| TreeError::Magic)? != TREE_MAGIC {
            return Err(TreeError::Magic);
        }
        let version = r.u8("version")?;
        if version != TREE_VERSION {
            return Err(TreeError::Version(version));
        }
        let count = r.varint("entry count")?;
        // Every entry takes at least 20 bytes: a lying count cannot make us allocate much.
        let mut entries = Vec::with_capacity((count as usize).min(r.remaining() / 20));
        for _ in 0..count {
            let name = r.bytes(NAME_MAX, "name")?.to_vec();
            if !is_safe_name(&name) {
                return Err(TreeError::HostileName(lossy(&name)));
            }
            if let Some(prev) = entries.last().map(|e: &Entry| &e.name)
                && prev.as_slice() >= name.as_slice()
            {
                return Err(TreeError::Unsorted(lossy(&name)));
            }
            let kind_byte = r.u8("kind")?;
            let kind = Kind::from_u8(kind_byte).ok_or_else(|| TreeError::UnknownKind {
                name: lossy(&name),
                kind: kind_byte,
            })?;
            let mode = r.varint("mode")? as u32;
            let uid = r.varint("uid")? as u32;
            let gid = r.varint("gid")? as u32;
            let mtime_ns = r.u64_le("mtime")? as i64;
            let size = r.varint("size")?;
            let rdev = r.varint("rdev")?;
            let hardlink = r.varint("hardlink")?;
            let symlink_target = r.bytes(TARGET_MAX, "symlink target")?.to_vec();
            let nx = r.varint("xattr count")?;
            let mut xattrs = Vec::new();
            for _ in 0..nx {
                let k = r.bytes(NAME_MAX, "xattr name")?.to_vec();
                let v = r.bytes(XATTR_MAX, "xattr value")?.to_vec();
                xattrs.push((k, v));
            }
            let content =
                Content::decode_from(&mut r)?.ok_or_else(|| TreeError::BadContent(lossy(&name)))?;
            let fits = match (&content, kind) {
                (Content::Tree(_), Kind::Dir) => true,
                (Content::None, Kind::File) => size == 0,
                (Content::Inline(d), Kind::File) => d.len() as u64 == size,
                (Content::Chunks { chunks, .. }, Kind::File) => !chunks.is_empty(),
                (Content::None, k) => k != Kind::Dir && k != Kind::File,
                _ => false,
            };
            if !fits {
                return Err(TreeError::BadContent(lossy(&name)));
            }
            entries.push(Entry {
                name,
                kind: Some(kind),
                mode,
                uid,
                gid,
                mtime_ns,
                size,
                rdev,
                hardlink,
                symlink_target,
                xattrs,
                content,
            });
        }
        if !r.is_empty() {
            return Err(TreeError::Trailing);
        }
        Ok(Tree { entries })
    }

    /// Ids this tree refers to directly: subtrees and chunks.
    pub fn references(&self) -> impl Iterator<Item = (crate::pack::BlobKind, Id)> + '_ {
        use crate::pack::BlobKind;
        self.entries.iter().flat_map(|e| {
            let (trees, chunks): (Option<Id>, &[Id]) = match &e.content {
                Content::Tree(id) => (Some(*id), &[]),
                Content::Chunks { chunks, .. } => (None, chunks.as_slice()),
                _ => (None, &[]),
            };
            trees
                .into_iter()
                .map(|t| (BlobKind::Tree, t))
                .chain(chunks.iter().map(|c| (BlobKind::Chunk, *c)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &[u8], content: Content, size: u64) -> Entry {
        Entry {
            name: name.to_vec(),
            kind: Some(Kind::File),
            mode: 0o4755,
            uid: 1000,
            gid: 100,
            mtime_ns: -1_234_567_891,
            size,
            xattrs: vec![(b"user.k".to_vec(), vec![0, 1, 2])],
            content,
            ..Default::default()
        }
    }

    fn sample() -> Tree {
        let mut t = Tree {
            entries: vec![
                file(b"inline", Content::Inline(b"abc".to_vec()), 3),
                file(
                    b"big",
                    Content::Chunks {
                        file: Id::of(b"f"),
                        chunks: vec![Id::of(b"1"), Id::of(b"2")],
                    },
                    1 << 33,
                ),
                Entry {
                    name: vec![0xff, 0xfe],
                    kind: Some(Kind::Symlink),
                    symlink_target: b"../x".to_vec(),
                    ..Default::default()
                },
                Entry {
                    name: b"d".to_vec(),
                    kind: Some(Kind::Dir),
                    content: Content::Tree(Id::of(b"t")),
                    ..Default::default()
                },
                Entry {
                    name: b"null".to_vec(),
                    kind: Some(Kind::CharDevice),
                    rdev: 0x103,
                    ..Default::default()
                },
            ],
        };
        t.sort();
        t
    }

    #[test]
    fn round_trip() {
        let t = sample();
        assert_eq!(Tree::decode(&t.encode()).unwrap(), t);
        assert_eq!(t.references().count(), 3);
    }

    #[test]
    fn encoding_is_stable() {
        // Golden id: changing the encoding of version 1 breaks every stored repository.
        let (id, bytes) = sample().seal();
        assert_eq!(&bytes[..5], b"MGTR\x01");
        assert_eq!(id, Id::of(&sample().encode()));
        assert_eq!(
            id.to_hex(),
            "3c25a4b8c5fd15c65d7b59bd18738c03a7f55967af6f4602fae8e596614357a9"
        );
    }

    #[test]
    fn rejects_hostile_names() {
        for name in [&b""[..], b".", b"..", b"a/b", b"a\0b", b"/"] {
            let mut t = sample();
            t.entries[0].name = name.to_vec();
            let err = Tree::decode(&t.encode()).unwrap_err();
            assert!(matches!(err, TreeError::HostileName(_)), "{name:?}: {err}");
        }
    }

    #[test]
    fn rejects_unsorted_duplicates_and_truncation() {
        let mut t = sample();
        t.entries.swap(0, 1);
        assert!(matches!(
            Tree::decode(&t.encode()),
            Err(TreeError::Unsorted(_))
        ));
        let mut t = sample();
        t.entries[1] = t.entries[0].clone();
        assert!(matches!(
            Tree::decode(&t.encode()),
            Err(TreeError::Unsorted(_))
        ));
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(Tree::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(Tree::decode(&long), Err(TreeError::Trailing));
    }

    #[test]
    fn rejects_content_that_does_not_fit() {
        let mut t = sample();
        let i = t.entries.iter().position(|e| e.name == b"d").unwrap();
        t.entries[i].content = Content::Inline(vec![]);
        assert!(matches!(
            Tree::decode(&t.encode()),
            Err(TreeError::BadContent(_))
        ));
        let mut t = sample();
        let i = t.entries.iter().position(|e| e.name == b"inline").unwrap();
        t.entries[i].size = 4;
        assert!(matches!(
            Tree::decode(&t.encode()),
            Err(TreeError::BadContent(_))
        ));
    }
}
