-- Branch reflectors: devices with the reflector role, as an administrator set it, and what
-- each last said about itself in its reflector heartbeat. Turning the role off keeps the
-- row (enabled = 0) so its figures stay readable; the device's row going away takes it.
CREATE TABLE reflectors (
    device_id    TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    enabled      INTEGER NOT NULL,
    port         INTEGER NOT NULL,
    site         TEXT,
    changed      TEXT NOT NULL,
    changed_by   TEXT NOT NULL,
    -- From the reflector's heartbeat; NULL until its first.
    address      TEXT,
    subnet       TEXT,
    in_flight    INTEGER NOT NULL DEFAULT 0,
    load         REAL NOT NULL DEFAULT 0,
    cache_bytes  INTEGER NOT NULL DEFAULT 0,
    cache_limit  INTEGER NOT NULL DEFAULT 0,
    bytes_served INTEGER NOT NULL DEFAULT 0,
    last_seen_ms INTEGER
);
