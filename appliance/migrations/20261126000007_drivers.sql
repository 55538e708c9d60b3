-- Driver library: driver sets (directory trees imported under a name, versioned) and the
-- profiles that say which devices get which sets.

-- One version of one driver set. `root` is a tree in the blob store like a snapshot's root.
-- Driver sets are garbage-collection roots: `seq` only grows, so a collector can tell which
-- sets appeared after it looked.
CREATE TABLE driver_sets (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL,
    version    INTEGER NOT NULL,
    notes      TEXT NOT NULL,
    root       BLOB NOT NULL,
    files      INTEGER NOT NULL,
    bytes      INTEGER NOT NULL,
    created    TEXT NOT NULL,
    created_by TEXT NOT NULL,
    UNIQUE (name, version)
);

-- A driver profile: match rules over inventory and the driver sets it brings, as the JSON
-- of `drivers::ProfileSpec` (the TOML file `morgana driver profile set` read, checked).
CREATE TABLE driver_profiles (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    updated    TEXT NOT NULL,
    updated_by TEXT NOT NULL
);
