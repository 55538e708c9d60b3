-- Ids (content ids, pack ids, hashes, fingerprints) are 32-byte BLOBs. Times that are only
-- compared are unix milliseconds; times people read are RFC 3339 UTC text.

CREATE TABLE enroll_tokens (
    secret_hash BLOB PRIMARY KEY NOT NULL,
    uses_left   INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE devices (
    id               TEXT PRIMARY KEY NOT NULL,
    hostname         TEXT NOT NULL,
    cert_fingerprint BLOB NOT NULL UNIQUE,
    created          TEXT NOT NULL,
    revoked          INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE packs (
    id         BLOB PRIMARY KEY NOT NULL,
    volume     TEXT NOT NULL,
    size       INTEGER NOT NULL,
    blob_count INTEGER NOT NULL,
    created    TEXT NOT NULL
) WITHOUT ROWID;

-- The blob index: one row per stored chunk or tree, first location wins.
CREATE TABLE blobs (
    id          BLOB PRIMARY KEY NOT NULL,
    pack        BLOB NOT NULL REFERENCES packs (id),
    kind        INTEGER NOT NULL,
    compression INTEGER NOT NULL,
    offset      INTEGER NOT NULL,
    stored_len  INTEGER NOT NULL,
    raw_len     INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX blobs_by_pack ON blobs (pack, offset);

CREATE TABLE snapshots (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    device_id  TEXT NOT NULL REFERENCES devices (id),
    root       BLOB NOT NULL,
    created    TEXT NOT NULL,
    reason     TEXT NOT NULL,
    files      INTEGER NOT NULL,
    dirs       INTEGER NOT NULL,
    bytes      INTEGER NOT NULL,
    bytes_sent INTEGER NOT NULL,
    new_chunks INTEGER NOT NULL
);

CREATE INDEX snapshots_by_device ON snapshots (device_id, seq);

-- Trees whose whole closure (subtrees and chunks) was verified present once; commits skip
-- them.
CREATE TABLE complete_trees (
    id BLOB PRIMARY KEY NOT NULL
) WITHOUT ROWID;

-- Whole-file ids of multi-chunk files whose chunks are all indexed, so `missing` can answer
-- for a whole file in one id.
CREATE TABLE files (
    id BLOB PRIMARY KEY NOT NULL
) WITHOUT ROWID;
