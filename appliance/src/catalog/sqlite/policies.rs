//! Upload policies, device assignments and open alerts in SQLite (migration
//! `20261126000004_policies.sql`).

use std::collections::HashMap;

use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Row};

use super::{SqliteCatalog, device_from_row, q};
use crate::catalog::{CatalogError, Device, DeviceProtection, OpenAlert, Result};
use crate::policy::{PolicySpec, PolicyVersion};

const COLUMNS: &str = "version, name, spec, created, actor";
/// The version in force of each policy: its newest.
const IN_FORCE: &str = "version IN (SELECT MAX(version) FROM policy_versions GROUP BY name)";
const DEVICE_COLUMNS: &str = "id, hostname, cert_fingerprint, created, revoked";

fn policy_from_row(row: &SqliteRow) -> Result<PolicyVersion> {
    let version: i64 = row.try_get("version").map_err(q("reading a row"))?;
    let name: String = row.try_get("name").map_err(q("reading a row"))?;
    let spec: String = row.try_get("spec").map_err(q("reading a row"))?;
    let spec: PolicySpec = serde_json::from_str(&spec).map_err(|e| CatalogError::Corrupt {
        what: "policy",
        detail: format!("{name} version {version}: {e}"),
    })?;
    Ok(PolicyVersion {
        name,
        version: u64::try_from(version).map_err(|_| CatalogError::Corrupt {
            what: "policy",
            detail: format!("version {version}"),
        })?,
        spec,
        created: row.try_get("created").map_err(q("reading a row"))?,
        actor: row.try_get("actor").map_err(q("reading a row"))?,
    })
}

fn alert_from_row(row: &SqliteRow) -> Result<OpenAlert> {
    Ok(OpenAlert {
        key: row.try_get("key").map_err(q("reading a row"))?,
        kind: row.try_get("kind").map_err(q("reading a row"))?,
        device_id: row.try_get("device_id").map_err(q("reading a row"))?,
        since_ms: row.try_get("since_ms").map_err(q("reading a row"))?,
        message: row.try_get("message").map_err(q("reading a row"))?,
    })
}

impl SqliteCatalog {
    pub(super) async fn policies_save(
        &self,
        name: &str,
        spec: &PolicySpec,
        created: &str,
        actor: &str,
    ) -> Result<PolicyVersion> {
        const DOING: &str = "saving a policy";
        let json = serde_json::to_string(spec).expect("a policy serializes");
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO policy_versions (name, spec, created, actor) VALUES (?, ?, ?, ?) \
             RETURNING {COLUMNS}"
        )))
        .bind(name)
        .bind(json)
        .bind(created)
        .bind(actor)
        .fetch_one(&self.writer)
        .await
        .map_err(q(DOING))?;
        policy_from_row(&row)
    }

    pub(super) async fn policies_get(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<Option<PolicyVersion>> {
        let row = match version {
            Some(v) => sqlx::query(AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM policy_versions WHERE name = ? AND version = ?"
            )))
            .bind(name)
            .bind(i64::try_from(v).unwrap_or(i64::MAX)),
            None => sqlx::query(AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM policy_versions WHERE name = ? ORDER BY version DESC LIMIT 1"
            )))
            .bind(name),
        }
        .fetch_optional(&self.pool)
        .await
        .map_err(q("reading a policy"))?;
        row.as_ref().map(policy_from_row).transpose()
    }

    pub(super) async fn policies_history(&self, name: &str) -> Result<Vec<PolicyVersion>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM policy_versions WHERE name = ? ORDER BY version"
        )))
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing a policy's versions"))?;
        rows.iter().map(policy_from_row).collect()
    }

    pub(super) async fn policies_in_force(&self) -> Result<Vec<(PolicyVersion, u64)>> {
        const DOING: &str = "listing policies";
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS}, (SELECT COUNT(*) FROM devices d WHERE d.policy = p.name) AS devices \
             FROM policy_versions p WHERE {IN_FORCE} ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(q(DOING))?;
        rows.iter()
            .map(|row| {
                let devices: i64 = row.try_get("devices").map_err(q(DOING))?;
                Ok((policy_from_row(row)?, devices as u64))
            })
            .collect()
    }

    pub(super) async fn policies_of_device(&self, device_id: &str) -> Result<PolicyVersion> {
        const DOING: &str = "reading a device's policy";
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT d.policy AS assigned, p.version, p.name, p.spec, p.created, p.actor \
             FROM devices d LEFT JOIN policy_versions p ON p.name = d.policy AND p.{IN_FORCE} \
             WHERE d.id = ?"
        )))
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q(DOING))?;
        let Some(row) = row else {
            return Err(CatalogError::DeviceUnknown(device_id.to_owned()));
        };
        let version: Option<i64> = row.try_get("version").map_err(q(DOING))?;
        if version.is_none() {
            let assigned: String = row.try_get("assigned").map_err(q(DOING))?;
            return Err(CatalogError::Corrupt {
                what: "device record",
                detail: format!(
                    "device {device_id} follows policy {assigned:?}, which has no version"
                ),
            });
        }
        policy_from_row(&row)
    }

    pub(super) async fn policies_find_devices(&self, id_or_hostname: &str) -> Result<Vec<Device>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1 OR hostname = ?1 ORDER BY id"
        )))
        .bind(id_or_hostname)
        .fetch_all(&self.pool)
        .await
        .map_err(q("looking up devices"))?;
        rows.iter().map(device_from_row).collect()
    }

    pub(super) async fn policies_assign(
        &self,
        name: &str,
        device_ids: &[String],
    ) -> Result<Vec<String>> {
        const DOING: &str = "assigning a policy";
        let mut tx = self.write_tx(DOING).await?;
        let exists = sqlx::query("SELECT 1 FROM policy_versions WHERE name = ? LIMIT 1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(q(DOING))?;
        if exists.is_none() {
            return Err(CatalogError::PolicyUnknown(name.to_owned()));
        }
        let mut before = Vec::with_capacity(device_ids.len());
        for id in device_ids {
            let row = sqlx::query("SELECT policy FROM devices WHERE id = ?")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(q(DOING))?;
            // Dropping the transaction rolls back the devices already moved.
            let Some(row) = row else {
                return Err(CatalogError::DeviceUnknown(id.clone()));
            };
            before.push(row.try_get("policy").map_err(q(DOING))?);
            sqlx::query("UPDATE devices SET policy = ? WHERE id = ?")
                .bind(name)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(q(DOING))?;
        }
        tx.commit().await.map_err(q(DOING))?;
        Ok(before)
    }

    pub(super) async fn policies_protection(&self) -> Result<Vec<DeviceProtection>> {
        const DOING: &str = "reading devices' protection";
        let policies: HashMap<String, PolicyVersion> = self
            .policies_in_force()
            .await?
            .into_iter()
            .map(|(p, _)| (p.name.clone(), p))
            .collect();
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEVICE_COLUMNS}, policy, \
             (SELECT MAX(s.created) FROM snapshots s WHERE s.device_id = d.id) AS newest \
             FROM devices d ORDER BY id"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(q(DOING))?;
        rows.iter()
            .map(|row| {
                let device = device_from_row(row)?;
                let name: String = row.try_get("policy").map_err(q(DOING))?;
                let policy = policies
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| CatalogError::Corrupt {
                        what: "device record",
                        detail: format!(
                            "device {} follows policy {name:?}, which has no version",
                            device.id
                        ),
                    })?;
                Ok(DeviceProtection {
                    device,
                    policy,
                    newest_snapshot: row.try_get("newest").map_err(q(DOING))?,
                })
            })
            .collect()
    }

    pub(super) async fn alerts_open(&self, alert: &OpenAlert) -> Result<bool> {
        let done = sqlx::query(
            "INSERT OR IGNORE INTO open_alerts (key, kind, device_id, since_ms, message) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&alert.key)
        .bind(&alert.kind)
        .bind(&alert.device_id)
        .bind(alert.since_ms)
        .bind(&alert.message)
        .execute(&self.writer)
        .await
        .map_err(q("opening an alert"))?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn alerts_close(&self, key: &str) -> Result<Option<OpenAlert>> {
        let row = sqlx::query(
            "DELETE FROM open_alerts WHERE key = ? \
             RETURNING key, kind, device_id, since_ms, message",
        )
        .bind(key)
        .fetch_optional(&self.writer)
        .await
        .map_err(q("closing an alert"))?;
        row.as_ref().map(alert_from_row).transpose()
    }

    pub(super) async fn alerts_all(&self) -> Result<Vec<OpenAlert>> {
        let rows = sqlx::query(
            "SELECT key, kind, device_id, since_ms, message FROM open_alerts ORDER BY since_ms, key",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing open alerts"))?;
        rows.iter().map(alert_from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use morgana_core::Id;

    use super::*;
    use crate::catalog::Catalog;
    use crate::policy::parse_toml;

    /// The built-in policy, from the migration.
    const DEFAULT_POLICY: &str = "default";

    async fn catalog_with_devices(dir: &tempfile::TempDir) -> SqliteCatalog {
        let cat = SqliteCatalog::open(&dir.path().join("catalog.sqlite"), true)
            .await
            .unwrap();
        cat.create_token(Id::of(b"t"), 3, i64::MAX).await.unwrap();
        for (id, host) in [("d1", "alpha"), ("d2", "beta"), ("d3", "beta")] {
            cat.enroll_device(
                Id::of(b"t"),
                0,
                &Device {
                    id: id.into(),
                    hostname: host.into(),
                    cert_fingerprint: Id::of(id.as_bytes()),
                    created: crate::clock::rfc3339_ms(0),
                    revoked: false,
                },
            )
            .await
            .unwrap();
        }
        cat
    }

    #[tokio::test]
    async fn saves_are_versions_and_devices_follow_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let cat = catalog_with_devices(&dir).await;
        // The built-in policy exists and every new device follows it.
        let default = cat.device_policy("d1").await.unwrap();
        assert_eq!(
            (default.name.as_str(), default.version),
            (DEFAULT_POLICY, 1)
        );
        assert_eq!(default.spec, PolicySpec::default());
        assert!(matches!(
            cat.device_policy("nope").await,
            Err(CatalogError::DeviceUnknown(_))
        ));

        let v1 = parse_toml(r#"unprotected = { rules = ["/data/big"] }"#).unwrap();
        let v2 = parse_toml("sync_interval = \"15m\"").unwrap();
        let a = cat.save_policy("office", &v1, "t1", "cli").await.unwrap();
        let other = cat
            .save_policy("lab", &PolicySpec::default(), "t2", "cli")
            .await
            .unwrap();
        let b = cat.save_policy("office", &v2, "t3", "cli").await.unwrap();
        // One appliance-wide sequence: no two saves share a number.
        assert!(a.version < other.version && other.version < b.version);
        assert_eq!(cat.policy("office", None).await.unwrap().unwrap(), b);
        assert_eq!(
            cat.policy("office", Some(a.version))
                .await
                .unwrap()
                .unwrap(),
            a
        );
        assert_eq!(
            cat.policy("office", Some(other.version)).await.unwrap(),
            None
        );
        assert_eq!(
            cat.policy_history("office").await.unwrap(),
            vec![a, b.clone()]
        );

        // Assignment is all or nothing.
        let err = cat
            .assign_policy("office", &["d1".into(), "ghost".into()])
            .await
            .unwrap_err();
        assert!(matches!(err, CatalogError::DeviceUnknown(ref d) if d == "ghost"));
        assert_eq!(cat.device_policy("d1").await.unwrap().name, DEFAULT_POLICY);
        assert!(matches!(
            cat.assign_policy("missing", &["d1".into()]).await,
            Err(CatalogError::PolicyUnknown(_))
        ));
        let before = cat
            .assign_policy("office", &["d1".into(), "d2".into()])
            .await
            .unwrap();
        assert_eq!(before, [DEFAULT_POLICY, DEFAULT_POLICY]);
        assert_eq!(cat.device_policy("d2").await.unwrap(), b);

        let listed: Vec<(String, u64, u64)> = cat
            .policies()
            .await
            .unwrap()
            .into_iter()
            .map(|(p, n)| (p.name, p.version, n))
            .collect();
        assert_eq!(
            listed,
            [
                (DEFAULT_POLICY.to_string(), 1, 1),
                ("lab".to_string(), other.version, 0),
                ("office".to_string(), b.version, 2)
            ]
        );
        let found: Vec<String> = cat
            .find_devices("beta")
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(found, ["d2", "d3"]);
        let protection = cat.device_protection().await.unwrap();
        assert_eq!(protection.len(), 3);
        assert_eq!(protection[0].policy.name, "office");
        assert_eq!(protection[0].newest_snapshot, None);
    }

    #[tokio::test]
    async fn an_alert_episode_opens_and_closes_once() {
        let dir = tempfile::tempdir().unwrap();
        let cat = catalog_with_devices(&dir).await;
        let alert = OpenAlert {
            key: "no-recent-snapshot:d1".into(),
            kind: "alert.no-recent-snapshot".into(),
            device_id: Some("d1".into()),
            since_ms: 5,
            message: "stale".into(),
        };
        assert!(cat.open_alert(&alert).await.unwrap());
        assert!(!cat.open_alert(&alert).await.unwrap());
        assert_eq!(cat.open_alerts().await.unwrap(), vec![alert.clone()]);
        assert_eq!(
            cat.close_alert(&alert.key).await.unwrap(),
            Some(alert.clone())
        );
        assert_eq!(cat.close_alert(&alert.key).await.unwrap(), None);
        assert!(cat.open_alerts().await.unwrap().is_empty());
    }
}
