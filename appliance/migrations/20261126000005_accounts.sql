-- Accounts for the web UI and REST API (issue 4): users with roles, browser sessions, API
-- tokens, and what the devices page needs to stay fast with thousands of devices.

CREATE TABLE users (
    name          TEXT PRIMARY KEY NOT NULL,
    -- administrator, image-manager, protection-manager, helpdesk or end-user.
    role          TEXT NOT NULL,
    -- argon2id, PHC string.
    password_hash TEXT NOT NULL,
    -- Set for generated passwords (first start, resets): the user must pick their own.
    must_change   INTEGER NOT NULL DEFAULT 0,
    disabled      INTEGER NOT NULL DEFAULT 0,
    created       TEXT NOT NULL
) WITHOUT ROWID;

-- Browser sessions, by the BLAKE3 hash of the cookie's secret: a copy of this table does
-- not let anyone in.
CREATE TABLE sessions (
    secret_hash BLOB PRIMARY KEY NOT NULL,
    user_name   TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX sessions_by_user ON sessions (user_name);

-- REST API tokens an administrator issued for a user, by the BLAKE3 hash of the secret.
CREATE TABLE api_tokens (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    secret_hash BLOB NOT NULL UNIQUE,
    user_name   TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
    label       TEXT NOT NULL,
    created     TEXT NOT NULL,
    revoked     INTEGER NOT NULL DEFAULT 0
);

-- The user a device belongs to (end users reach only their own devices).
ALTER TABLE devices ADD COLUMN owner TEXT;
-- The newest snapshot of each device, kept by the triggers below, so that the devices page
-- sorts and filters on indexed columns instead of aggregating snapshots per request. ''
-- when the device has none.
ALTER TABLE devices ADD COLUMN last_snapshot_at TEXT NOT NULL DEFAULT '';
ALTER TABLE devices ADD COLUMN last_snapshot_bytes INTEGER NOT NULL DEFAULT 0;

UPDATE devices SET
    last_snapshot_at = COALESCE((SELECT s.created FROM snapshots s WHERE s.device_id = devices.id
                                 ORDER BY s.seq DESC LIMIT 1), ''),
    last_snapshot_bytes = COALESCE((SELECT s.bytes FROM snapshots s WHERE s.device_id = devices.id
                                    ORDER BY s.seq DESC LIMIT 1), 0);

CREATE TRIGGER devices_last_snapshot_insert AFTER INSERT ON snapshots BEGIN
    UPDATE devices SET last_snapshot_at = NEW.created, last_snapshot_bytes = NEW.bytes
    WHERE id = NEW.device_id;
END;

CREATE TRIGGER devices_last_snapshot_delete AFTER DELETE ON snapshots BEGIN
    UPDATE devices SET
        last_snapshot_at = COALESCE((SELECT s.created FROM snapshots s WHERE s.device_id = OLD.device_id
                                     ORDER BY s.seq DESC LIMIT 1), ''),
        last_snapshot_bytes = COALESCE((SELECT s.bytes FROM snapshots s WHERE s.device_id = OLD.device_id
                                        ORDER BY s.seq DESC LIMIT 1), 0)
    WHERE id = OLD.device_id;
END;

-- Keyset pagination: one index per sort order, ending in the id that breaks ties.
CREATE INDEX devices_by_hostname ON devices (hostname, id);
CREATE INDEX devices_by_created ON devices (created, id);
CREATE INDEX devices_by_last_snapshot ON devices (last_snapshot_at, id);
CREATE INDEX devices_by_owner ON devices (owner, hostname, id);
