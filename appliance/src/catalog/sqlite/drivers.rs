//! The driver library in SQLite (migration `20261126000007_drivers.sql`).

use morgana_core::Id;
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Row};

use super::{SqliteCatalog, id_col, q, u32_col, u64_col};
use crate::catalog::{DriverProfileRecord, DriverSetRecord, NewDriverSet, Result};

const COLUMNS: &str = "seq, name, version, notes, root, files, bytes, created, created_by";

fn set_from_row(row: &SqliteRow) -> Result<DriverSetRecord> {
    Ok(DriverSetRecord {
        seq: row.try_get("seq").map_err(q("reading a row"))?,
        version: u32_col(row, "version", "driver set record")?,
        set: NewDriverSet {
            name: row.try_get("name").map_err(q("reading a row"))?,
            notes: row.try_get("notes").map_err(q("reading a row"))?,
            root: id_col(row, "root", "driver set record")?,
            files: u64_col(row, "files")?,
            bytes: u64_col(row, "bytes")?,
            created: row.try_get("created").map_err(q("reading a row"))?,
            created_by: row.try_get("created_by").map_err(q("reading a row"))?,
        },
    })
}

fn profile_from_row(row: &SqliteRow) -> Result<DriverProfileRecord> {
    Ok(DriverProfileRecord {
        name: row.try_get("name").map_err(q("reading a row"))?,
        spec: row.try_get("spec").map_err(q("reading a row"))?,
        updated: row.try_get("updated").map_err(q("reading a row"))?,
        updated_by: row.try_get("updated_by").map_err(q("reading a row"))?,
    })
}

impl SqliteCatalog {
    pub(super) async fn driver_sets_insert(&self, set: &NewDriverSet) -> Result<DriverSetRecord> {
        const DOING: &str = "recording a driver set";
        // The write transaction serialises versions of one name.
        let mut tx = self.write_tx(DOING).await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO driver_sets (name, version, notes, root, files, bytes, created, created_by) \
             VALUES (?1, (SELECT COALESCE(MAX(version), 0) + 1 FROM driver_sets WHERE name = ?1), \
                     ?2, ?3, ?4, ?5, ?6, ?7) \
             RETURNING {COLUMNS}"
        )))
        .bind(&set.name)
        .bind(&set.notes)
        .bind(set.root.0.to_vec())
        .bind(set.files as i64)
        .bind(set.bytes as i64)
        .bind(&set.created)
        .bind(&set.created_by)
        .fetch_one(&mut *tx)
        .await
        .map_err(q(DOING))?;
        let record = set_from_row(&row)?;
        tx.commit().await.map_err(q(DOING))?;
        Ok(record)
    }

    pub(super) async fn driver_sets_all(&self) -> Result<Vec<DriverSetRecord>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM driver_sets ORDER BY name, version"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing driver sets"))?;
        rows.iter().map(set_from_row).collect()
    }

    pub(super) async fn driver_sets_one(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<DriverSetRecord>> {
        let row = self
            .versioned_row(
                "driver_sets",
                COLUMNS,
                name,
                version,
                "looking up a driver set",
            )
            .await?;
        row.as_ref().map(set_from_row).transpose()
    }

    pub(super) async fn driver_sets_roots_page(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<(i64, Id)>> {
        self.roots_page("driver_sets", after_seq, limit, "driver set record")
            .await
    }

    pub(super) async fn driver_profiles_save(&self, p: &DriverProfileRecord) -> Result<()> {
        const DOING: &str = "saving a driver profile";
        let mut tx = self.write_tx(DOING).await?;
        sqlx::query(
            "INSERT INTO driver_profiles (name, spec, updated, updated_by) VALUES (?, ?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated = excluded.updated, \
             updated_by = excluded.updated_by",
        )
        .bind(&p.name)
        .bind(&p.spec)
        .bind(&p.updated)
        .bind(&p.updated_by)
        .execute(&mut *tx)
        .await
        .map_err(q(DOING))?;
        tx.commit().await.map_err(q(DOING))?;
        Ok(())
    }

    pub(super) async fn driver_profiles_all(&self) -> Result<Vec<DriverProfileRecord>> {
        let rows = sqlx::query(
            "SELECT name, spec, updated, updated_by FROM driver_profiles ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing driver profiles"))?;
        rows.iter().map(profile_from_row).collect()
    }
}
