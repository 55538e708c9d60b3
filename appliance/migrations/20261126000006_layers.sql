-- Image management: reference machines and the layers captured from them.

ALTER TABLE devices ADD COLUMN reference INTEGER NOT NULL DEFAULT 0;

-- One version of one layer. `root` is a tree in the blob store like a snapshot's root: the
-- layer's files for a base layer, the added and changed files for an app layer (whose
-- removed paths are in `deletions`: a varint count, then each path as a varint length and its bytes). Layers are
-- garbage-collection roots: `seq` only grows, so a collector can tell which layers appeared
-- after it looked.
CREATE TABLE layers (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT NOT NULL,
    version         INTEGER NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('base', 'app')),
    notes           TEXT NOT NULL,
    source_device   TEXT NOT NULL,
    snapshot        TEXT NOT NULL,
    before_snapshot TEXT,
    root            BLOB NOT NULL,
    deletions       BLOB NOT NULL,
    files           INTEGER NOT NULL,
    bytes           INTEGER NOT NULL,
    created         TEXT NOT NULL,
    created_by      TEXT NOT NULL,
    UNIQUE (name, version)
);
