//! Branch reflectors in SQLite (migration `20261126000011_reflectors.sql`).

use morgana_core::control::{ReflectorBeat, ReflectorRole};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use super::{SqliteCatalog, q, u64_col};
use crate::catalog::{CatalogError, ReflectorRecord, Result};

fn record_from_row(row: &SqliteRow) -> Result<ReflectorRecord> {
    let corrupt = |detail: String| CatalogError::Corrupt {
        what: "reflector record",
        detail,
    };
    let port: i64 = row.try_get("port").map_err(q("reading a row"))?;
    let in_flight: i64 = row.try_get("in_flight").map_err(q("reading a row"))?;
    let enabled: i64 = row.try_get("enabled").map_err(q("reading a row"))?;
    let load: f64 = row.try_get("load").map_err(q("reading a row"))?;
    Ok(ReflectorRecord {
        device_id: row.try_get("device_id").map_err(q("reading a row"))?,
        hostname: row.try_get("hostname").map_err(q("reading a row"))?,
        enabled: enabled != 0,
        port: u16::try_from(port).map_err(|_| corrupt(format!("port {port}")))?,
        site: row.try_get("site").map_err(q("reading a row"))?,
        changed: row.try_get("changed").map_err(q("reading a row"))?,
        changed_by: row.try_get("changed_by").map_err(q("reading a row"))?,
        address: row.try_get("address").map_err(q("reading a row"))?,
        subnet: row.try_get("subnet").map_err(q("reading a row"))?,
        in_flight: u32::try_from(in_flight)
            .map_err(|_| corrupt(format!("in_flight {in_flight}")))?,
        load: load as f32,
        cache_bytes: u64_col(row, "cache_bytes")?,
        cache_limit: u64_col(row, "cache_limit")?,
        bytes_served: u64_col(row, "bytes_served")?,
        last_seen_ms: row.try_get("last_seen_ms").map_err(q("reading a row"))?,
    })
}

impl SqliteCatalog {
    pub(super) async fn reflectors_set_role(
        &self,
        device_id: &str,
        role: Option<&ReflectorRole>,
        changed: &str,
        changed_by: &str,
    ) -> Result<bool> {
        const DOING: &str = "setting a device's reflector role";
        let known = sqlx::query("SELECT 1 FROM devices WHERE id = ?")
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q(DOING))?;
        if known.is_none() {
            return Ok(false);
        }
        let res =
            match role {
                Some(r) => sqlx::query(
                    "INSERT INTO reflectors (device_id, enabled, port, site, changed, changed_by) \
                     VALUES (?1, 1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT (device_id) DO UPDATE SET enabled = 1, port = ?2, site = ?3, \
                         changed = ?4, changed_by = ?5",
                )
                .bind(device_id)
                .bind(i64::from(r.port))
                .bind(r.site.as_deref())
                .bind(changed)
                .bind(changed_by)
                .execute(&self.writer)
                .await,
                None => {
                    sqlx::query(
                        "UPDATE reflectors SET enabled = 0, in_flight = 0, load = 0, changed = ?2, \
                         changed_by = ?3 \
                     WHERE device_id = ?1",
                    )
                    .bind(device_id)
                    .bind(changed)
                    .bind(changed_by)
                    .execute(&self.writer)
                    .await
                }
            };
        res.map_err(q(DOING))?;
        Ok(true)
    }

    pub(super) async fn reflectors_role(&self, device_id: &str) -> Result<Option<ReflectorRole>> {
        let row =
            sqlx::query("SELECT port, site FROM reflectors WHERE device_id = ? AND enabled <> 0")
                .bind(device_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(q("reading a device's reflector role"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let port: i64 = row.try_get("port").map_err(q("reading a row"))?;
        Ok(Some(ReflectorRole {
            port: u16::try_from(port).map_err(|_| CatalogError::Corrupt {
                what: "reflector record",
                detail: format!("port {port}"),
            })?,
            site: row.try_get("site").map_err(q("reading a row"))?,
        }))
    }

    pub(super) async fn reflectors_beat(
        &self,
        device_id: &str,
        beat: &ReflectorBeat,
        now_ms: i64,
    ) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE reflectors SET address = ?2, subnet = ?3, in_flight = ?4, load = ?5, \
                 cache_bytes = ?6, cache_limit = ?7, bytes_served = ?8, last_seen_ms = ?9 \
             WHERE device_id = ?1 AND enabled <> 0",
        )
        .bind(device_id)
        .bind(&beat.address)
        .bind(&beat.subnet)
        .bind(i64::from(beat.in_flight))
        .bind(f64::from(beat.load))
        .bind(beat.cache_bytes as i64)
        .bind(beat.cache_limit as i64)
        .bind(beat.bytes_served as i64)
        .bind(now_ms)
        .execute(&self.writer)
        .await
        .map_err(q("recording a reflector heartbeat"))?;
        Ok(res.rows_affected() > 0)
    }

    pub(super) async fn reflectors_list(&self) -> Result<Vec<ReflectorRecord>> {
        let rows = sqlx::query(
            "SELECT r.*, d.hostname FROM reflectors r JOIN devices d ON d.id = r.device_id \
             ORDER BY d.hostname, r.device_id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing reflectors"))?;
        rows.iter().map(record_from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use morgana_core::Id;

    use crate::catalog::sqlite::SqliteCatalog;
    use crate::catalog::{Catalog, Device};

    use super::*;

    #[tokio::test]
    async fn the_role_turns_on_and_off_and_beats_count_only_while_on() {
        let dir = tempfile::tempdir().unwrap();
        let c = SqliteCatalog::open(&dir.path().join("catalog.db"), true)
            .await
            .unwrap();
        c.create_token(Id::of(b"t"), 1, i64::MAX).await.unwrap();
        let device = Device {
            id: "d1".into(),
            hostname: "branch-pc".into(),
            cert_fingerprint: Id::of(b"cert"),
            created: "2026-01-01T00:00:00Z".into(),
            revoked: false,
        };
        c.enroll_device(Id::of(b"t"), 0, &device).await.unwrap();
        let role = ReflectorRole {
            port: 9000,
            site: Some("lyon".into()),
        };
        assert!(
            !c.set_reflector_role("nope", Some(&role), "t", "cli")
                .await
                .unwrap()
        );
        let beat = ReflectorBeat {
            address: "10.0.0.5".into(),
            port: 9000,
            subnet: "10.0.0.0/24".into(),
            bytes_served: 42,
            ..ReflectorBeat::default()
        };
        assert!(!c.record_reflector_beat("d1", &beat, 5).await.unwrap());
        assert!(
            c.set_reflector_role("d1", Some(&role), "t", "cli")
                .await
                .unwrap()
        );
        assert_eq!(c.reflector_role("d1").await.unwrap(), Some(role.clone()));
        assert!(c.record_reflector_beat("d1", &beat, 5).await.unwrap());
        let list = c.reflectors().await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].hostname, "branch-pc");
        assert_eq!(list[0].address.as_deref(), Some("10.0.0.5"));
        assert_eq!(list[0].bytes_served, 42);
        assert_eq!(list[0].last_seen_ms, Some(5));

        assert!(
            c.set_reflector_role("d1", None, "t2", "user:ann")
                .await
                .unwrap()
        );
        assert_eq!(c.reflector_role("d1").await.unwrap(), None);
        assert!(!c.record_reflector_beat("d1", &beat, 6).await.unwrap());
        let list = c.reflectors().await.unwrap();
        assert!(!list[0].enabled);
        assert_eq!(list[0].changed_by, "user:ann");
        assert_eq!(
            list[0].bytes_served, 42,
            "figures stay after the role is off"
        );
    }
}
