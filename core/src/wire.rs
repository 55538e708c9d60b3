//! The agent protocol: paths, JSON bodies, and the binary framings of the hot paths.
//!
//! Control messages are JSON. Id lists travel as raw concatenated 32-byte ids
//! (`application/octet-stream`), packs as their own bytes, and fetched blobs as a stream of
//! frames (see [`BlobFrame`]). Every agent request carries [`PROTOCOL_HEADER`]; the appliance
//! refuses versions it does not speak with 426 and a message saying which to upgrade.

use serde::{Deserialize, Serialize};

use crate::id::Id;
use crate::pack::{BlobKind, Compression};

pub const PROTOCOL_VERSION: u32 = 1;
pub const PROTOCOL_HEADER: &str = "x-morgana-protocol";

pub const PATH_HEALTH: &str = "/healthz";
/// `POST` [`EnrollRequest`] → [`EnrollResponse`]; the only agent call without a client
/// certificate.
pub const PATH_ENROLL: &str = "/v1/enroll";
/// `POST` ids → the subset the appliance does not have (chunk, tree or whole-file ids).
pub const PATH_MISSING: &str = "/v1/missing";
/// `POST` pack bytes → [`PackAccepted`].
pub const PATH_PACKS: &str = "/v1/packs";
/// `POST` [`CommitRequest`] → [`SnapshotInfo`], or 409 with [`CommitRefused`];
/// `GET` → `Vec<SnapshotInfo>` of the calling device.
pub const PATH_SNAPSHOTS: &str = "/v1/snapshots";
/// `POST` ids → a stream of [`BlobFrame`]s in request order.
pub const PATH_BLOBS: &str = "/v1/blobs";

/// Most ids in one missing or fetch request.
pub const MAX_IDS_PER_REQUEST: usize = 16 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The whole token as printed by `morgana enroll-token`.
    pub token: String,
    pub hostname: String,
    /// PEM certificate signing request for the device's own key; the key never leaves it.
    pub csr_pem: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub device_id: String,
    pub client_cert_pem: String,
    pub ca_cert_pem: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PackAccepted {
    /// The pack as stored (absent when every blob was already present).
    pub pack: Option<Id>,
    pub new_blobs: u64,
    pub duplicate_blobs: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotStats {
    pub files: u64,
    pub dirs: u64,
    /// Logical bytes of all regular files.
    pub bytes: u64,
    pub bytes_sent: u64,
    pub new_chunks: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitRequest {
    pub root: Id,
    pub stats: SnapshotStats,
    /// Why the snapshot was taken: `manual`, `scheduled`, … ([`PINNED_REASONS`] are kept
    /// until someone unpins them).
    pub reason: String,
}

/// Commit reasons the appliance pins on arrival: the state a device had before a revert or
/// a layer update must outlive retention, or the change could not be undone.
pub const PINNED_REASONS: &[&str] = &["pre-revert", "pre-layer-update"];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitRefused {
    pub error: String,
    /// Ids the snapshot references that the appliance does not hold (a sample).
    pub missing: Vec<Id>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub device_id: String,
    pub root: Id,
    /// RFC 3339, UTC.
    pub created: String,
    pub reason: String,
    #[serde(flatten)]
    pub stats: SnapshotStats,
    /// Why the snapshot is exempt from retention, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
}

/// Error body of every non-2xx answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// One fetched blob: `id[32] kind[1] compression[1] raw_len[u32 LE] stored_len[u32 LE]
/// stored[stored_len]`. A blob the appliance cannot serve has kind 0xFF and no payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobFrame {
    pub id: Id,
    pub kind: Option<BlobKind>,
    pub compression: Compression,
    pub raw_len: u32,
    pub stored_len: u32,
}

impl BlobFrame {
    pub const HEADER_LEN: usize = 32 + 1 + 1 + 4 + 4;
    const MISSING: u8 = 0xff;

    pub fn missing(id: Id) -> BlobFrame {
        BlobFrame {
            id,
            kind: None,
            compression: Compression::None,
            raw_len: 0,
            stored_len: 0,
        }
    }

    pub fn header(&self) -> [u8; Self::HEADER_LEN] {
        let mut h = [0u8; Self::HEADER_LEN];
        h[..32].copy_from_slice(&self.id.0);
        h[32] = self.kind.map_or(Self::MISSING, |k| k as u8);
        h[33] = self.compression as u8;
        h[34..38].copy_from_slice(&self.raw_len.to_le_bytes());
        h[38..42].copy_from_slice(&self.stored_len.to_le_bytes());
        h
    }

    pub fn parse_header(h: &[u8; Self::HEADER_LEN]) -> Option<BlobFrame> {
        let id = Id(h[..32].try_into().unwrap());
        let kind = match h[32] {
            Self::MISSING => None,
            k => Some(BlobKind::from_u8(k)?),
        };
        let frame = BlobFrame {
            id,
            kind,
            compression: Compression::from_u8(h[33])?,
            raw_len: u32::from_le_bytes(h[34..38].try_into().unwrap()),
            stored_len: u32::from_le_bytes(h[38..42].try_into().unwrap()),
        };
        let sane = frame.stored_len as usize <= crate::pack::MAX_BLOB_BYTES + 1024
            && frame.raw_len as usize <= crate::pack::MAX_BLOB_BYTES;
        sane.then_some(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_header_round_trip() {
        let f = BlobFrame {
            id: Id::of(b"x"),
            kind: Some(BlobKind::Tree),
            compression: Compression::Zstd,
            raw_len: 77,
            stored_len: 55,
        };
        assert_eq!(BlobFrame::parse_header(&f.header()), Some(f));
        let m = BlobFrame::missing(Id::of(b"y"));
        assert_eq!(BlobFrame::parse_header(&m.header()), Some(m));
    }

    #[test]
    fn snapshot_info_json_is_flat() {
        let s = SnapshotInfo {
            id: "s1".into(),
            device_id: "d1".into(),
            root: Id::of(b"r"),
            created: "2026-11-25T00:00:00Z".into(),
            reason: "manual".into(),
            stats: SnapshotStats {
                files: 3,
                bytes: 10,
                ..Default::default()
            },
            pinned: None,
        };
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(v["files"], 3);
        assert_eq!(v["bytes"], 10);
        assert!(v.get("pinned").is_none());
    }
}

/// What `morgana enroll-token` prints: `mgn1.<secret>.<ca pin>`. The pin is the hex id
/// (BLAKE3-256) of the appliance CA's DER certificate, so an agent given only a URL and a
/// token can authenticate the appliance before it sends the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollToken {
    /// 32 lowercase hex digits of randomness.
    pub secret: String,
    pub ca_pin: Id,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "not an enrolment token: expected mgn1.<secret>.<pin> as printed by `morgana enroll-token`"
)]
pub struct ParseTokenError;

impl EnrollToken {
    pub const PREFIX: &'static str = "mgn1";

    /// The pin of a CA certificate, given as DER.
    pub fn pin_of(ca_der: &[u8]) -> Id {
        Id::of(ca_der)
    }

    /// What the appliance stores instead of the secret.
    pub fn secret_hash(&self) -> Id {
        Id::of(self.secret.as_bytes())
    }
}

impl std::fmt::Display for EnrollToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", Self::PREFIX, self.secret, self.ca_pin)
    }
}

impl std::str::FromStr for EnrollToken {
    type Err = ParseTokenError;
    fn from_str(s: &str) -> Result<Self, ParseTokenError> {
        let mut parts = s.trim().split('.');
        let (Some(Self::PREFIX), Some(secret), Some(pin), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ParseTokenError);
        };
        let secret_ok = secret.len() == 32 && secret.bytes().all(|b| b.is_ascii_hexdigit());
        if !secret_ok {
            return Err(ParseTokenError);
        }
        Ok(EnrollToken {
            secret: secret.to_string(),
            ca_pin: pin.parse().map_err(|_| ParseTokenError)?,
        })
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn token_round_trip() {
        let t = EnrollToken {
            secret: "0123456789abcdef0123456789abcdef".into(),
            ca_pin: Id::of(b"ca"),
        };
        assert_eq!(t.to_string().parse::<EnrollToken>().unwrap(), t);
        assert!("mgn1.xyz.abc".parse::<EnrollToken>().is_err());
        assert!(format!("{t}.extra").parse::<EnrollToken>().is_err());
    }
}
