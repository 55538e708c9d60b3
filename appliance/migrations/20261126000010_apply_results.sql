-- What each layer apply did, file by file, as the agent reported it in the job's outcome:
-- JSON FileResults (counts cover every path, at most 1000 paths are listed). One row per
-- apply job; read and written whole.
CREATE TABLE apply_results (
    job_id    TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    results   TEXT NOT NULL,
    reported  TEXT NOT NULL
);
