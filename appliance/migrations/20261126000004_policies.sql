-- Upload policies (issue 3): what is protected, how often, how long snapshots are kept,
-- and when a device counts as unprotected.
--
-- Every save of a policy is a new row; the newest row of a name is the policy in force and
-- older ones stay for the record. Versions come from one appliance-wide sequence, so a
-- version number names exactly one saved policy and an agent notices any change to what it
-- must apply, including a move to another policy. `spec` is the policy as JSON
-- (`appliance/src/policy.rs`, `PolicySpec`); the factory rules are not stored, they are
-- merged in when a policy is handed to an agent.
CREATE TABLE policy_versions (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    name    TEXT NOT NULL,
    spec    TEXT NOT NULL,
    created TEXT NOT NULL,
    -- `system`, `cli`, `user:NAME`.
    actor   TEXT NOT NULL
);

CREATE INDEX policy_versions_by_name ON policy_versions (name, version);

-- The built-in policy: factory rules only, hourly syncs, the retention `serve` and `gc`
-- applied before policies existed, and an alert after a day without a snapshot.
INSERT INTO policy_versions (version, name, spec, created, actor) VALUES (
    1,
    'default',
    '{"unprotected":{"rules":[],"exceptions":[]},"user_area":{"rules":["%home%"],"exceptions":[]},"sync_interval_secs":3600,"alert_after_secs":86400,"retention":{"hourly":24,"daily":14,"weekly":8,"monthly":12}}',
    '2026-11-26T00:00:00.000Z',
    'system'
);

-- Every device has exactly one policy; enrolment leaves the default. (No REFERENCES: a
-- column added with a non-NULL default cannot carry one; the catalog checks the name.)
ALTER TABLE devices ADD COLUMN policy TEXT NOT NULL DEFAULT 'default';

-- Alerts raised and not yet recovered, one row per episode: a check raises an alert only
-- when it inserts the row, and records the recovery only when it deletes it, so two checks
-- running at once never report one episode twice.
CREATE TABLE open_alerts (
    -- What the alert is about, e.g. `no-recent-snapshot:<device>`, `volume-full:<path>`.
    key       TEXT PRIMARY KEY NOT NULL,
    kind      TEXT NOT NULL,
    device_id TEXT,
    since_ms  INTEGER NOT NULL,
    message   TEXT NOT NULL
) WITHOUT ROWID;
