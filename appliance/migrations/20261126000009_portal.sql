-- The end-user file portal (issue 4): administrators turn it off per device. Off is the
-- exception, so the column says so and every existing device keeps its portal.
ALTER TABLE devices ADD COLUMN portal_disabled INTEGER NOT NULL DEFAULT 0;
