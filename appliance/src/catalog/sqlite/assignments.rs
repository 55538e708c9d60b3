//! Device groups, layer assignments, applied layers and apply results in SQLite
//! (migrations `20261126000008_assignments.sql`, `20261126000010_apply_results.sql`). Structured values are stored as JSON: they are read
//! and written whole, never queried inside.

use morgana_core::control::{ApplyJob, FileResults};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use super::{SqliteCatalog, q};
use crate::catalog::{AppliedRecord, Assignment, AssignmentRecord, CatalogError, Result};

fn json_col<T: serde::de::DeserializeOwned>(
    row: &SqliteRow,
    col: &str,
    what: &'static str,
) -> Result<T> {
    let text: String = row.try_get(col).map_err(q("reading a row"))?;
    serde_json::from_str(&text).map_err(|e| CatalogError::Corrupt {
        what,
        detail: format!("{col}: {e}"),
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("catalog records serialize")
}

impl SqliteCatalog {
    pub(super) async fn apply_results_save(
        &self,
        job_id: &str,
        device_id: &str,
        results: &FileResults,
        now: &str,
    ) -> Result<()> {
        const DOING: &str = "recording an apply's per-file results";
        let mut tx = self.write_tx(DOING).await?;
        sqlx::query(
            "INSERT INTO apply_results (job_id, device_id, results, reported) VALUES (?, ?, ?, ?) \
             ON CONFLICT (job_id) DO UPDATE SET results = excluded.results, \
             reported = excluded.reported",
        )
        .bind(job_id)
        .bind(device_id)
        .bind(to_json(results))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(q(DOING))?;
        tx.commit().await.map_err(q(DOING))
    }

    pub(super) async fn apply_results_one(&self, job_id: &str) -> Result<Option<FileResults>> {
        let row = sqlx::query("SELECT results FROM apply_results WHERE job_id = ?")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("looking up an apply's results"))?;
        row.map(|row| json_col(&row, "results", "apply results"))
            .transpose()
    }

    pub(super) async fn groups_save(
        &self,
        name: &str,
        devices: &[String],
        now: &str,
        by: &str,
    ) -> Result<()> {
        const DOING: &str = "saving a device group";
        let mut tx = self.write_tx(DOING).await?;
        sqlx::query(
            "INSERT INTO device_groups (name, devices, updated, updated_by) VALUES (?, ?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET devices = excluded.devices, \
             updated = excluded.updated, updated_by = excluded.updated_by",
        )
        .bind(name)
        .bind(to_json(&devices))
        .bind(now)
        .bind(by)
        .execute(&mut *tx)
        .await
        .map_err(q(DOING))?;
        tx.commit().await.map_err(q(DOING))
    }

    pub(super) async fn groups_all(&self) -> Result<Vec<(String, Vec<String>)>> {
        let rows = sqlx::query("SELECT name, devices FROM device_groups ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing device groups"))?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("name").map_err(q("reading a row"))?,
                    json_col(row, "devices", "device group")?,
                ))
            })
            .collect()
    }

    pub(super) async fn assignments_set(
        &self,
        device_ids: &[String],
        assignment: &Assignment,
        now: &str,
        by: &str,
    ) -> Result<()> {
        const DOING: &str = "recording a layer assignment";
        let json = to_json(assignment);
        // One transaction: a group is assigned all at once or not at all.
        let mut tx = self.write_tx(DOING).await?;
        for id in device_ids {
            sqlx::query(
                "INSERT INTO layer_assignments (device_id, assignment, assigned, assigned_by) \
                 VALUES (?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET \
                 assignment = excluded.assignment, assigned = excluded.assigned, \
                 assigned_by = excluded.assigned_by",
            )
            .bind(id)
            .bind(&json)
            .bind(now)
            .bind(by)
            .execute(&mut *tx)
            .await
            .map_err(q(DOING))?;
        }
        tx.commit().await.map_err(q(DOING))
    }

    pub(super) async fn assignments_one(
        &self,
        device_id: &str,
    ) -> Result<Option<AssignmentRecord>> {
        let row = sqlx::query(
            "SELECT device_id, assignment, assigned, assigned_by FROM layer_assignments \
             WHERE device_id = ?",
        )
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("looking up a layer assignment"))?;
        row.map(|row| {
            Ok(AssignmentRecord {
                device_id: row.try_get("device_id").map_err(q("reading a row"))?,
                assignment: json_col(&row, "assignment", "layer assignment")?,
                assigned: row.try_get("assigned").map_err(q("reading a row"))?,
                assigned_by: row.try_get("assigned_by").map_err(q("reading a row"))?,
            })
        })
        .transpose()
    }

    pub(super) async fn applied_record(
        &self,
        device_id: &str,
        job_id: &str,
        applied: &ApplyJob,
        now: &str,
    ) -> Result<()> {
        const DOING: &str = "recording applied layers";
        let mut tx = self.write_tx(DOING).await?;
        sqlx::query(
            "INSERT INTO applied_layers (device_id, applied, previous, job_id, applied_at) \
             VALUES (?1, ?2, NULL, ?3, ?4) ON CONFLICT (device_id) DO UPDATE SET \
             previous = applied_layers.applied, applied = excluded.applied, \
             job_id = excluded.job_id, applied_at = excluded.applied_at",
        )
        .bind(device_id)
        .bind(to_json(applied))
        .bind(job_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(q(DOING))?;
        tx.commit().await.map_err(q(DOING))
    }

    pub(super) async fn applied_one(&self, device_id: &str) -> Result<Option<AppliedRecord>> {
        let row = sqlx::query(
            "SELECT device_id, applied, previous, job_id, applied_at FROM applied_layers \
             WHERE device_id = ?",
        )
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("looking up applied layers"))?;
        row.map(|row| {
            let previous: Option<String> = row.try_get("previous").map_err(q("reading a row"))?;
            Ok(AppliedRecord {
                device_id: row.try_get("device_id").map_err(q("reading a row"))?,
                applied: json_col(&row, "applied", "applied layers")?,
                previous: previous
                    .map(|p| {
                        serde_json::from_str(&p).map_err(|e| CatalogError::Corrupt {
                            what: "applied layers",
                            detail: format!("previous: {e}"),
                        })
                    })
                    .transpose()?,
                job_id: row.try_get("job_id").map_err(q("reading a row"))?,
                applied_at: row.try_get("applied_at").map_err(q("reading a row"))?,
            })
        })
        .transpose()
    }

    pub(super) async fn applied_roll_back(
        &self,
        device_id: &str,
        job_id: &str,
        now: &str,
    ) -> Result<()> {
        const DOING: &str = "rolling back applied layers";
        let mut tx = self.write_tx(DOING).await?;
        // What the device had before the last apply is what it has again; with nothing
        // before, it has no layers.
        sqlx::query("DELETE FROM applied_layers WHERE device_id = ? AND previous IS NULL")
            .bind(device_id)
            .execute(&mut *tx)
            .await
            .map_err(q(DOING))?;
        sqlx::query(
            "UPDATE applied_layers SET applied = previous, previous = NULL, job_id = ?, \
             applied_at = ? WHERE device_id = ?",
        )
        .bind(job_id)
        .bind(now)
        .bind(device_id)
        .execute(&mut *tx)
        .await
        .map_err(q(DOING))?;
        tx.commit().await.map_err(q(DOING))
    }
}
