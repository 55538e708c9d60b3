//! Device status from heartbeats, and jobs for agents, in SQLite (migration
//! `20261126000003_jobs.sql`).

use morgana_core::Id;
use morgana_core::control::{Inventory, JobKind, JobProgress, JobReport, JobState};
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Row};

use super::{SqliteCatalog, device_from_row, q, u64_col};
use crate::catalog::{CatalogError, DeviceStatus, HeartbeatRecord, JobRecord, Result};

const JOB_COLUMNS: &str = "id, device_id, kind, state, files_done, files_total, bytes_done, \
                           bytes_total, message, created_ms, started_ms, finished_ms, created_by";

fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
    }
}

fn job_from_row(row: &SqliteRow) -> Result<JobRecord> {
    let get = |col: &str| -> Result<String> { row.try_get(col).map_err(q("reading a row")) };
    let corrupt = |detail: String| CatalogError::Corrupt {
        what: "job record",
        detail,
    };
    let id = get("id")?;
    let kind: JobKind = serde_json::from_str(&get("kind")?)
        .map_err(|e| corrupt(format!("job {id} has an unreadable kind: {e}")))?;
    let state = match get("state")?.as_str() {
        "queued" => JobState::Queued,
        "running" => JobState::Running,
        "succeeded" => JobState::Succeeded,
        "failed" => JobState::Failed,
        other => return Err(corrupt(format!("job {id} has state {other:?}"))),
    };
    Ok(JobRecord {
        device_id: get("device_id")?,
        kind,
        state,
        progress: JobProgress {
            files_done: u64_col(row, "files_done")?,
            files_total: u64_col(row, "files_total")?,
            bytes_done: u64_col(row, "bytes_done")?,
            bytes_total: u64_col(row, "bytes_total")?,
        },
        message: get("message")?,
        created_ms: row.try_get("created_ms").map_err(q("reading a row"))?,
        started_ms: row.try_get("started_ms").map_err(q("reading a row"))?,
        finished_ms: row.try_get("finished_ms").map_err(q("reading a row"))?,
        created_by: get("created_by")?,
        id,
    })
}

fn status_from_row(row: &SqliteRow) -> Result<DeviceStatus> {
    let device = device_from_row(row)?;
    let inventory: Option<String> = row.try_get("inventory").map_err(q("reading a row"))?;
    let inventory = inventory
        .map(|json| serde_json::from_str::<Inventory>(&json))
        .transpose()
        .map_err(|e| CatalogError::Corrupt {
            what: "device inventory",
            detail: format!("device {}: {e}", device.id),
        })?;
    let digest: Option<Vec<u8>> = row
        .try_get("inventory_digest")
        .map_err(q("reading a row"))?;
    Ok(DeviceStatus {
        last_seen_ms: row.try_get("last_seen_ms").map_err(q("reading a row"))?,
        agent_version: row.try_get("agent_version").map_err(q("reading a row"))?,
        last_snapshot: row.try_get("last_snapshot").map_err(q("reading a row"))?,
        inventory,
        inventory_digest: digest.as_deref().and_then(Id::from_slice),
        device,
    })
}

impl SqliteCatalog {
    /// All devices by id, or the one named.
    pub(super) async fn device_statuses(&self, id: Option<&str>) -> Result<Vec<DeviceStatus>> {
        let rows = sqlx::query(
            "SELECT id, hostname, cert_fingerprint, created, revoked, last_seen_ms, agent_version, \
                    last_snapshot, inventory, inventory_digest \
             FROM devices WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing devices"))?;
        rows.iter().map(status_from_row).collect()
    }

    pub(super) async fn heartbeat_record(
        &self,
        device_id: &str,
        beat: &HeartbeatRecord<'_>,
    ) -> Result<bool> {
        const DOING: &str = "recording a heartbeat";
        sqlx::query(
            "UPDATE devices SET last_seen_ms = ?, agent_version = ?, \
                    last_snapshot = COALESCE(?, last_snapshot) WHERE id = ?",
        )
        .bind(beat.at_ms)
        .bind(beat.agent_version)
        .bind(beat.last_snapshot)
        .bind(device_id)
        .execute(&self.writer)
        .await
        .map_err(q(DOING))?;
        let Some(inventory) = beat.inventory else {
            return Ok(false);
        };
        let digest = inventory.digest();
        let json = serde_json::to_string(inventory).expect("inventory serializes");
        // Only a different digest writes: the row is left alone when nothing changed.
        let changed = sqlx::query(
            "UPDATE devices SET inventory = ?, inventory_digest = ? \
             WHERE id = ? AND (inventory_digest IS NULL OR inventory_digest != ?)",
        )
        .bind(json)
        .bind(digest.0.to_vec())
        .bind(device_id)
        .bind(digest.0.to_vec())
        .execute(&self.writer)
        .await
        .map_err(q(DOING))?
        .rows_affected();
        Ok(changed > 0)
    }

    pub(super) async fn jobs_insert(&self, job: &JobRecord) -> Result<()> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO jobs ({JOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )))
        .bind(&job.id)
        .bind(&job.device_id)
        .bind(serde_json::to_string(&job.kind).expect("job kind serializes"))
        .bind(state_name(job.state))
        .bind(job.progress.files_done as i64)
        .bind(job.progress.files_total as i64)
        .bind(job.progress.bytes_done as i64)
        .bind(job.progress.bytes_total as i64)
        .bind(&job.message)
        .bind(job.created_ms)
        .bind(job.started_ms)
        .bind(job.finished_ms)
        .bind(&job.created_by)
        .execute(&self.writer)
        .await
        .map_err(q("queuing a job"))?;
        Ok(())
    }

    pub(super) async fn jobs_take_next(
        &self,
        device_id: &str,
        now_ms: i64,
    ) -> Result<Option<JobRecord>> {
        // One statement: SQLite runs it under one write lock, so a job goes to one poll.
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE jobs SET state = 'running', started_ms = ?1 \
             WHERE id = (SELECT id FROM jobs WHERE device_id = ?2 AND state = 'queued' \
                         ORDER BY created_ms, id LIMIT 1) \
             RETURNING {JOB_COLUMNS}"
        )))
        .bind(now_ms)
        .bind(device_id)
        .fetch_optional(&self.writer)
        .await
        .map_err(q("taking the next job"))?;
        row.as_ref().map(job_from_row).transpose()
    }

    pub(super) async fn jobs_report(
        &self,
        device_id: &str,
        report: &JobReport,
        now_ms: i64,
    ) -> Result<Option<JobRecord>> {
        let finished = matches!(report.state, JobState::Succeeded | JobState::Failed);
        let p = &report.progress;
        let row = sqlx::query(AssertSqlSafe(format!(
            "UPDATE jobs SET state = ?, files_done = ?, files_total = MAX(files_total, ?), \
                    bytes_done = ?, bytes_total = MAX(bytes_total, ?), message = ?, \
                    finished_ms = ? \
             WHERE id = ? AND device_id = ? AND state = 'running' \
             RETURNING {JOB_COLUMNS}"
        )))
        .bind(state_name(report.state))
        .bind(p.files_done as i64)
        .bind(p.files_total as i64)
        .bind(p.bytes_done as i64)
        .bind(p.bytes_total as i64)
        .bind(&report.message)
        .bind(finished.then_some(now_ms))
        .bind(&report.job_id)
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("recording a job report"))?;
        row.as_ref().map(job_from_row).transpose()
    }

    pub(super) async fn jobs_fail_running(
        &self,
        device_id: &str,
        except: Option<&str>,
        started_before_ms: i64,
        message: &str,
        now_ms: i64,
    ) -> Result<Vec<JobRecord>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "UPDATE jobs SET state = 'failed', message = ?, finished_ms = ? \
             WHERE device_id = ? AND state = 'running' AND id IS NOT ? AND started_ms < ? \
             RETURNING {JOB_COLUMNS}"
        )))
        .bind(message)
        .bind(now_ms)
        .bind(device_id)
        .bind(except)
        .bind(started_before_ms)
        .fetch_all(&self.writer)
        .await
        .map_err(q("failing abandoned jobs"))?;
        rows.iter().map(job_from_row).collect()
    }

    pub(super) async fn jobs_by_id(&self, id: &str) -> Result<Option<JobRecord>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("looking up a job"))?;
        row.as_ref().map(job_from_row).transpose()
    }

    pub(super) async fn jobs_list(
        &self,
        device_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<JobRecord>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ?1 IS NULL OR device_id = ?1 \
             ORDER BY created_ms DESC, id DESC LIMIT ?2"
        )))
        .bind(device_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing jobs"))?;
        rows.iter().map(job_from_row).collect()
    }

    pub(super) async fn jobs_queued_devices(&self) -> Result<Vec<String>> {
        sqlx::query_scalar("SELECT DISTINCT device_id FROM jobs WHERE state = 'queued'")
            .fetch_all(&self.pool)
            .await
            .map_err(q("looking for queued jobs"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, Device, HeartbeatRecord, SqliteCatalog};
    use morgana_core::control::{RestoreJob, RestoreScope};

    async fn catalog_with(devices: &[&str]) -> (tempfile::TempDir, SqliteCatalog) {
        let dir = tempfile::tempdir().unwrap();
        let cat = SqliteCatalog::open(&dir.path().join("c.db"), true)
            .await
            .unwrap();
        let token = Id::of(b"t");
        cat.create_token(token, 10, i64::MAX).await.unwrap();
        for d in devices {
            let device = Device {
                id: d.to_string(),
                hostname: format!("host-{d}"),
                cert_fingerprint: Id::of(d.as_bytes()),
                created: crate::clock::rfc3339_ms(0),
                revoked: false,
            };
            cat.enroll_device(token, 1, &device).await.unwrap();
        }
        (dir, cat)
    }

    fn report(id: &str, state: JobState, message: &str) -> JobReport {
        JobReport {
            job_id: id.into(),
            state,
            progress: JobProgress {
                files_done: 3,
                files_total: 10,
                bytes_done: 30,
                bytes_total: 100,
            },
            message: message.into(),
            files: None,
        }
    }

    #[tokio::test]
    async fn jobs_are_handed_out_once_oldest_first_and_only_to_their_device() {
        let (_dir, cat) = catalog_with(&["a", "b"]).await;
        let first = JobRecord::queued("a", JobKind::Sync, "cli", 100);
        let restore = JobKind::Restore(RestoreJob {
            snapshot: "s1".into(),
            source_device: "b".into(),
            root: Id::of(b"root"),
            scope: RestoreScope::Paths {
                paths: vec!["/etc".into()],
            },
            target: Some("/tmp/x".into()),
            drivers: Vec::new(),
        });
        let second = JobRecord::queued("a", restore.clone(), "cli", 200);
        cat.queue_job(&second).await.unwrap();
        cat.queue_job(&first).await.unwrap();
        assert_eq!(cat.devices_with_queued_jobs().await.unwrap(), vec!["a"]);
        assert!(cat.take_next_job("b", 300).await.unwrap().is_none());

        let got = cat.take_next_job("a", 300).await.unwrap().unwrap();
        assert_eq!(got.id, first.id);
        assert_eq!((got.state, got.started_ms), (JobState::Running, Some(300)));
        let got2 = cat.take_next_job("a", 301).await.unwrap().unwrap();
        assert_eq!(
            (got2.id.as_str(), &got2.kind),
            (second.id.as_str(), &restore)
        );
        assert!(cat.take_next_job("a", 302).await.unwrap().is_none());
        assert!(cat.devices_with_queued_jobs().await.unwrap().is_empty());

        // Another device cannot report on it; a running report keeps it running.
        assert!(
            cat.report_job("b", &report(&first.id, JobState::Failed, "x"), 400)
                .await
                .unwrap()
                .is_none()
        );
        let running = cat
            .report_job("a", &report(&first.id, JobState::Running, ""), 400)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(running.progress.files_done, 3);
        assert_eq!(running.finished_ms, None);
        let done = cat
            .report_job("a", &report(&first.id, JobState::Succeeded, "ok"), 500)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (done.state, done.finished_ms),
            (JobState::Succeeded, Some(500))
        );
        // A finished job takes no more reports.
        assert!(
            cat.report_job("a", &report(&first.id, JobState::Failed, "late"), 600)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(cat.job(&first.id).await.unwrap().unwrap(), done);

        // The second is abandoned: failed unless named as running or started too recently.
        assert!(
            cat.fail_running_jobs("a", Some(&second.id), 10_000, "gone", 700)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            cat.fail_running_jobs("a", None, 301, "gone", 700)
                .await
                .unwrap()
                .is_empty()
        );
        let failed = cat
            .fail_running_jobs("a", None, 10_000, "gone", 700)
            .await
            .unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(
            (failed[0].state, failed[0].message.as_str()),
            (JobState::Failed, "gone")
        );

        let all = cat.jobs(None, 10).await.unwrap();
        assert_eq!(
            all.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
            vec![second.id.as_str(), first.id.as_str()]
        );
        assert!(cat.jobs(Some("b"), 10).await.unwrap().is_empty());
        assert_eq!(cat.jobs(Some("a"), 1).await.unwrap().len(), 1);
        assert!(cat.job("nope").await.unwrap().is_none());
    }

    fn beat<'a>(
        inventory: Option<&'a Inventory>,
        last_snapshot: Option<&'a str>,
    ) -> HeartbeatRecord<'a> {
        HeartbeatRecord {
            at_ms: 1000,
            agent_version: "0.1.0",
            last_snapshot,
            inventory,
        }
    }

    #[tokio::test]
    async fn heartbeats_record_status_and_inventory_changes() {
        let (_dir, cat) = catalog_with(&["a", "b"]).await;
        let before = cat.device_status("a").await.unwrap().unwrap();
        assert_eq!(before.last_seen_ms, None);
        assert_eq!(before.inventory, None);
        let mut inv = Inventory {
            hostname: "pc".into(),
            cpu_count: 4,
            ..Default::default()
        };
        assert!(
            cat.record_heartbeat("a", &beat(Some(&inv), None))
                .await
                .unwrap()
        );
        assert!(
            !cat.record_heartbeat("a", &beat(Some(&inv), None))
                .await
                .unwrap()
        );
        assert!(
            !cat.record_heartbeat("a", &beat(None, Some("2026-01-01T00:00:00.000Z")))
                .await
                .unwrap()
        );
        inv.cpu_count = 8;
        assert!(
            cat.record_heartbeat("a", &beat(Some(&inv), None))
                .await
                .unwrap()
        );
        let after = cat.device_status("a").await.unwrap().unwrap();
        assert_eq!(after.last_seen_ms, Some(1000));
        assert_eq!(after.agent_version.as_deref(), Some("0.1.0"));
        // A heartbeat without a last snapshot keeps the one known.
        assert_eq!(
            after.last_snapshot.as_deref(),
            Some("2026-01-01T00:00:00.000Z")
        );
        assert_eq!(after.inventory_digest, Some(inv.digest()));
        assert_eq!(after.inventory, Some(inv));
        let all = cat.devices().await.unwrap();
        assert_eq!(
            all.iter().map(|d| d.device.id.as_str()).collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        assert_eq!(all[1].last_seen_ms, None);
        assert!(cat.device_status("zz").await.unwrap().is_none());
    }
}
