-- Garbage collection without repository locks (appliance/src/gc.rs explains the protocol).

-- Ids a device's sync in progress relies on: those `missing` answered as present, and those
-- it sent in packs. Released when the device commits a snapshot; ignored (and purged) once
-- older than the hold lifetime, which is how an abandoned sync lets go. `seq` only grows,
-- so a collector can tell which holds appeared after it looked.
CREATE TABLE holds (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    id        BLOB NOT NULL,
    held_at   INTEGER NOT NULL
);

CREATE INDEX holds_by_device ON holds (device_id);

-- Why a snapshot is exempt from retention (pre-layer-update, pre-revert, legal hold), or
-- NULL.
ALTER TABLE snapshots ADD COLUMN pinned TEXT;

-- The collector's mark set: everything a retained snapshot or a live hold reaches.
CREATE TABLE gc_live (
    id BLOB PRIMARY KEY NOT NULL
) WITHOUT ROWID;

-- The one collector at work, if any. A lease, not a lock: it expires unless renewed, so a
-- collector that died leaves nothing behind that needs clearing by hand.
CREATE TABLE gc_lease (
    one         INTEGER PRIMARY KEY CHECK (one = 1),
    holder      TEXT NOT NULL,
    expires_at  INTEGER NOT NULL
);

-- Packs no blob points to any more. Their files are deleted only after a grace period, so
-- a restore that located a blob just before it moved can still read it.
CREATE TABLE dead_packs (
    id         BLOB PRIMARY KEY NOT NULL,
    volume     TEXT NOT NULL,
    dead_since INTEGER NOT NULL
) WITHOUT ROWID;

-- The chunks among the blobs: what `missing` may answer as present without more checks.
CREATE VIEW chunks AS SELECT id FROM blobs WHERE kind = 0;
