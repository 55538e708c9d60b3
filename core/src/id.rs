//! Content ids: BLAKE3-256 of a chunk's or tree's plaintext.

use std::fmt;
use std::str::FromStr;

/// A BLAKE3-256 content id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id(pub [u8; 32]);

/// Context string for whole-file ids; never change it within format version 1.
const FILE_ID_CONTEXT: &str = "morgana 2026-11 whole-file id v1";

impl Id {
    pub const LEN: usize = 32;

    /// The id of a chunk or tree: BLAKE3-256 of its bytes.
    pub fn of(data: &[u8]) -> Id {
        Id(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from_digit((b >> 4) as u32, 16).unwrap());
            s.push(char::from_digit((b & 15) as u32, 16).unwrap());
        }
        s
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Id> {
        Some(Id(bytes.try_into().ok()?))
    }

    /// Splits a body of concatenated ids; `None` if its length is not a multiple of 32.
    pub fn parse_list(bytes: &[u8]) -> Option<Vec<Id>> {
        if !bytes.len().is_multiple_of(Id::LEN) {
            return None;
        }
        Some(
            bytes
                .chunks_exact(Id::LEN)
                .map(|c| Id(c.try_into().unwrap()))
                .collect(),
        )
    }

    pub fn concat(ids: &[Id]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * Id::LEN);
        for id in ids {
            out.extend_from_slice(&id.0);
        }
        out
    }
}

/// Builds a whole-file id from the file's chunk ids, in order. Hashing the ids rather than
/// the bytes a second time keeps scanning at the speed of one hash pass; chunking is
/// deterministic, so equal content always gives an equal file id.
#[derive(Clone)]
pub struct FileIdHasher(blake3::Hasher);

impl Default for FileIdHasher {
    fn default() -> Self {
        FileIdHasher(blake3::Hasher::new_derive_key(FILE_ID_CONTEXT))
    }
}

impl FileIdHasher {
    pub fn push(&mut self, chunk: &Id) {
        self.0.update(&chunk.0);
    }
    pub fn finish(&self) -> Id {
        Id(*self.0.finalize().as_bytes())
    }
    pub fn of(chunks: &[Id]) -> Id {
        let mut h = FileIdHasher::default();
        chunks.iter().for_each(|c| h.push(c));
        h.finish()
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", &self.to_hex()[..16])
    }
}

#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a content id: expected 64 hexadecimal digits")]
pub struct ParseIdError(String);

impl FromStr for Id {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Id, ParseIdError> {
        let bad = || ParseIdError(s.chars().take(80).collect());
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16).ok_or_else(bad)?;
            let lo = (pair[1] as char).to_digit(16).ok_or_else(bad)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Ok(Id(out))
    }
}

impl serde::Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Id, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = Id::of(b"morgana");
        assert_eq!(id.to_hex().parse::<Id>().unwrap(), id);
        assert!("zz".parse::<Id>().is_err());
        assert!("g".repeat(64).parse::<Id>().is_err());
    }

    #[test]
    fn file_id_depends_on_order() {
        let (a, b) = (Id::of(b"a"), Id::of(b"b"));
        assert_ne!(FileIdHasher::of(&[a, b]), FileIdHasher::of(&[b, a]));
        assert_ne!(FileIdHasher::of(&[a]), a);
    }
}
