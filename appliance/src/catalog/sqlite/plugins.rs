//! Plugin metadata in SQLite (migration `20260201000005_plugins.sql`).

use morgana_core::plugin::Hook;
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Row};

use super::{SqliteCatalog, id_col, q, u64_col};
use crate::catalog::{CatalogError, NewPlugin, PluginRecord, Result};

const COLUMNS: &str = "id, name, hook, version, hash, size, added, active";

fn plugin_from_row(row: &SqliteRow) -> Result<PluginRecord> {
    let hook: String = row.try_get("hook").map_err(q("reading a row"))?;
    let hook = hook
        .parse::<Hook>()
        .map_err(|detail| CatalogError::Corrupt {
            what: "plugin record",
            detail,
        })?;
    let version: i64 = row.try_get("version").map_err(q("reading a row"))?;
    let active: i64 = row.try_get("active").map_err(q("reading a row"))?;
    Ok(PluginRecord {
        id: row.try_get("id").map_err(q("reading a row"))?,
        name: row.try_get("name").map_err(q("reading a row"))?,
        hook,
        version: u32::try_from(version).map_err(|_| CatalogError::Corrupt {
            what: "plugin record",
            detail: format!("version {version}"),
        })?,
        hash: id_col(row, "hash", "plugin record")?,
        size: u64_col(row, "size")?,
        added: row.try_get("added").map_err(q("reading a row"))?,
        active: active != 0,
    })
}

impl SqliteCatalog {
    pub(super) async fn plugins_add(&self, new: &NewPlugin) -> Result<PluginRecord> {
        const DOING: &str = "recording a plugin";
        // IMMEDIATE: two uploads of the same name must not both take the same version.
        let mut tx = self.write_tx(DOING).await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO plugins (name, hook, version, hash, size, added, active) \
             VALUES (?1, ?2, (SELECT COALESCE(MAX(version), 0) + 1 FROM plugins \
                              WHERE name = ?1 AND hook = ?2), ?3, ?4, ?5, 0) \
             RETURNING {COLUMNS}"
        )))
        .bind(&new.name)
        .bind(new.hook.name())
        .bind(new.hash.0.to_vec())
        .bind(new.size as i64)
        .bind(&new.added)
        .fetch_one(&mut *tx)
        .await
        .map_err(q(DOING))?;
        let record = plugin_from_row(&row)?;
        tx.commit().await.map_err(q(DOING))?;
        Ok(record)
    }

    pub(super) async fn plugins_all(&self) -> Result<Vec<PluginRecord>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM plugins ORDER BY hook, name, version"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing plugins"))?;
        rows.iter().map(plugin_from_row).collect()
    }

    pub(super) async fn plugins_by_id(&self, id: i64) -> Result<Option<PluginRecord>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM plugins WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("reading a plugin"))?;
        row.as_ref().map(plugin_from_row).transpose()
    }

    pub(super) async fn plugins_active(&self, hook: Hook) -> Result<Option<PluginRecord>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM plugins WHERE hook = ? AND active = 1"
        )))
        .bind(hook.name())
        .fetch_optional(&self.pool)
        .await
        .map_err(q("reading the active plugin"))?;
        row.as_ref().map(plugin_from_row).transpose()
    }

    pub(super) async fn plugins_set_active(&self, id: i64, active: bool) -> Result<PluginRecord> {
        const DOING: &str = "switching a plugin on or off";
        let mut tx = self.write_tx(DOING).await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM plugins WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(q(DOING))?;
        let Some(row) = row else {
            return Err(CatalogError::PluginUnknown(id));
        };
        let mut record = plugin_from_row(&row)?;
        if active {
            sqlx::query("UPDATE plugins SET active = 0 WHERE hook = ? AND id != ?")
                .bind(record.hook.name())
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(q(DOING))?;
        }
        sqlx::query("UPDATE plugins SET active = ? WHERE id = ?")
            .bind(active)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(q(DOING))?;
        tx.commit().await.map_err(q(DOING))?;
        record.active = active;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use morgana_core::Id;

    use super::*;
    use crate::catalog::Catalog;

    fn new(name: &str, hook: Hook, bytes: &[u8]) -> NewPlugin {
        NewPlugin {
            name: name.into(),
            hook,
            hash: Id::of(bytes),
            size: bytes.len() as u64,
            added: crate::clock::rfc3339_ms(0),
        }
    }

    #[tokio::test]
    async fn versions_count_per_name_and_hook_and_one_is_active_per_hook() {
        let dir = tempfile::tempdir().unwrap();
        let cat = SqliteCatalog::open(&dir.path().join("catalog.sqlite"), true)
            .await
            .unwrap();
        let a1 = cat
            .add_plugin(&new("acme", Hook::LayerRules, b"1"))
            .await
            .unwrap();
        let a2 = cat
            .add_plugin(&new("acme", Hook::LayerRules, b"2"))
            .await
            .unwrap();
        let d1 = cat
            .add_plugin(&new("acme", Hook::DriverMatcher, b"3"))
            .await
            .unwrap();
        let b1 = cat
            .add_plugin(&new("beta", Hook::LayerRules, b"4"))
            .await
            .unwrap();
        assert_eq!(
            (a1.version, a2.version, d1.version, b1.version),
            (1, 2, 1, 1)
        );
        assert!(!a2.active);
        assert_eq!(cat.active_plugin(Hook::LayerRules).await.unwrap(), None);

        cat.enable_plugin(a1.id).await.unwrap();
        cat.enable_plugin(d1.id).await.unwrap();
        let now = cat.enable_plugin(b1.id).await.unwrap();
        assert!(now.active);
        let active = cat.active_plugin(Hook::LayerRules).await.unwrap().unwrap();
        assert_eq!(active.id, b1.id);
        assert!(!cat.plugin(a1.id).await.unwrap().unwrap().active);
        assert!(
            cat.plugin(d1.id).await.unwrap().unwrap().active,
            "other hooks untouched"
        );

        cat.disable_plugin(b1.id).await.unwrap();
        assert_eq!(cat.active_plugin(Hook::LayerRules).await.unwrap(), None);
        assert!(matches!(
            cat.enable_plugin(999).await,
            Err(CatalogError::PluginUnknown(999))
        ));
        assert_eq!(cat.plugins().await.unwrap().len(), 4);
    }
}
