-- Image management: saved device groups, and which layers each device should have and has.

-- A named list of device ids, for assigning layers to many devices at once.
CREATE TABLE device_groups (
    name     TEXT PRIMARY KEY,
    devices  TEXT NOT NULL,  -- JSON array of device ids
    updated  TEXT NOT NULL,
    updated_by TEXT NOT NULL
);

-- What an Image Manager assigned to a device: JSON {base, apps, do_not_override} with layer
-- names and versions. The newest assignment per device is the one that counts.
CREATE TABLE layer_assignments (
    device_id   TEXT PRIMARY KEY,
    assignment  TEXT NOT NULL,
    assigned    TEXT NOT NULL,
    assigned_by TEXT NOT NULL
);

-- What the device's agent reported applied (the job's ApplyJob as JSON), and what it had
-- before, so a rollback knows what the device returns to.
CREATE TABLE applied_layers (
    device_id  TEXT PRIMARY KEY,
    applied    TEXT NOT NULL,
    previous   TEXT,
    job_id     TEXT NOT NULL,
    applied_at TEXT NOT NULL
);
