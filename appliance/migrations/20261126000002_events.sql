-- The event and audit log: alerts, job outcomes, plugin failures and every changing action,
-- who did it and when. Each row's hash covers the previous row's hash, so editing or
-- deleting a row in the middle breaks the chain from there on (`morgana events --verify`).
CREATE TABLE events (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms     INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    severity  TEXT NOT NULL CHECK (severity IN ('info', 'warning', 'error')),
    actor     TEXT NOT NULL,
    device_id TEXT,
    message   TEXT NOT NULL,
    hash      BLOB NOT NULL
);

CREATE INDEX events_by_device ON events (device_id, seq);
CREATE INDEX events_by_kind ON events (kind, seq);
