-- Issue 3: what each device last told the appliance (heartbeats), and jobs for agents.

ALTER TABLE devices ADD COLUMN last_seen_ms INTEGER;
ALTER TABLE devices ADD COLUMN agent_version TEXT;
-- RFC 3339 UTC of the device's last successful snapshot, as the agent reported it.
ALTER TABLE devices ADD COLUMN last_snapshot TEXT;
-- The hardware inventory as JSON (`morgana_core::control::Inventory`) and its digest.
ALTER TABLE devices ADD COLUMN inventory TEXT;
ALTER TABLE devices ADD COLUMN inventory_digest BLOB;

-- A command for one agent. `kind` is `morgana_core::control::JobKind` as JSON. A job is
-- handed out once: `queued` → `running` when an agent takes it, then `succeeded` or
-- `failed`.
CREATE TABLE jobs (
    id          TEXT PRIMARY KEY NOT NULL,
    device_id   TEXT NOT NULL REFERENCES devices (id),
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
    files_done  INTEGER NOT NULL DEFAULT 0,
    files_total INTEGER NOT NULL DEFAULT 0,
    bytes_done  INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER NOT NULL DEFAULT 0,
    message     TEXT NOT NULL DEFAULT '',
    created_ms  INTEGER NOT NULL,
    started_ms  INTEGER,
    finished_ms INTEGER,
    created_by  TEXT NOT NULL
);

CREATE INDEX jobs_by_device ON jobs (device_id, state, created_ms);
CREATE INDEX jobs_by_state ON jobs (state);
