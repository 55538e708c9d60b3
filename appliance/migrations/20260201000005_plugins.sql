-- WASM plugins (issue 5). The component bytes live in <data-dir>/plugins/<hash>.wasm; this
-- table holds what administrators see and which version of each hook is active.

CREATE TABLE plugins (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    name    TEXT NOT NULL,
    -- The WIT world: driver-matcher, layer-rules or reflector-selector.
    hook    TEXT NOT NULL,
    -- 1 for the first upload of a name on a hook, then one more per upload.
    version INTEGER NOT NULL,
    -- BLAKE3-256 of the component bytes.
    hash    BLOB NOT NULL,
    size    INTEGER NOT NULL,
    added   TEXT NOT NULL,
    active  INTEGER NOT NULL DEFAULT 0,
    UNIQUE (name, hook, version)
);

-- At most one active plugin per hook, whatever the callers do.
CREATE UNIQUE INDEX plugins_one_active_per_hook ON plugins (hook) WHERE active = 1;
