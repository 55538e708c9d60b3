//! Users, sessions, API tokens, the devices page and the dashboard's figures in SQLite
//! (migration `20261126000005_accounts.sql`).

use morgana_core::Id;
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, QueryBuilder, Row, Sqlite};

use super::{SqliteCatalog, q, u64_col};
use crate::auth::Role;
use crate::catalog::{
    ApiTokenRecord, CatalogError, DeviceQuery, DeviceSort, DeviceState, DeviceSummary,
    EnrollTokenRecord, FleetStats, Result, User, UserChange,
};

const USER_COLUMNS: &str = "name, role, password_hash, must_change, disabled, created";
const DEVICE_COLUMNS: &str =
    "id, hostname, owner, created, revoked, last_snapshot_at, last_snapshot_bytes";
const TOKEN_COLUMNS: &str = "id, user_name, label, created, revoked";

fn user_from_row(row: &SqliteRow) -> Result<User> {
    let role: String = row.try_get("role").map_err(q("reading a row"))?;
    let role = Role::parse(&role).ok_or_else(|| CatalogError::Corrupt {
        what: "user record",
        detail: format!("unknown role {role:?}"),
    })?;
    let must_change: i64 = row.try_get("must_change").map_err(q("reading a row"))?;
    let disabled: i64 = row.try_get("disabled").map_err(q("reading a row"))?;
    Ok(User {
        name: row.try_get("name").map_err(q("reading a row"))?,
        role,
        password_hash: row.try_get("password_hash").map_err(q("reading a row"))?,
        must_change: must_change != 0,
        disabled: disabled != 0,
        created: row.try_get("created").map_err(q("reading a row"))?,
    })
}

fn device_from_row(row: &SqliteRow) -> Result<DeviceSummary> {
    let revoked: i64 = row.try_get("revoked").map_err(q("reading a row"))?;
    let last: String = row
        .try_get("last_snapshot_at")
        .map_err(q("reading a row"))?;
    Ok(DeviceSummary {
        id: row.try_get("id").map_err(q("reading a row"))?,
        hostname: row.try_get("hostname").map_err(q("reading a row"))?,
        owner: row.try_get("owner").map_err(q("reading a row"))?,
        created: row.try_get("created").map_err(q("reading a row"))?,
        revoked: revoked != 0,
        last_snapshot: (!last.is_empty()).then_some(last),
        last_snapshot_bytes: u64_col(row, "last_snapshot_bytes")?,
    })
}

fn token_from_row(row: &SqliteRow) -> Result<ApiTokenRecord> {
    let revoked: i64 = row.try_get("revoked").map_err(q("reading a row"))?;
    Ok(ApiTokenRecord {
        id: row.try_get("id").map_err(q("reading a row"))?,
        user: row.try_get("user_name").map_err(q("reading a row"))?,
        label: row.try_get("label").map_err(q("reading a row"))?,
        created: row.try_get("created").map_err(q("reading a row"))?,
        revoked: revoked != 0,
    })
}

/// The column a sort order reads, as indexed by the migration.
fn sort_column(sort: DeviceSort) -> &'static str {
    match sort {
        DeviceSort::Hostname => "hostname",
        DeviceSort::Created => "created",
        DeviceSort::LastSnapshot => "last_snapshot_at",
    }
}

/// `LIKE` pattern matching `s` anywhere, with the wildcards in `s` taken literally.
fn contains_pattern(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('%');
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

impl SqliteCatalog {
    pub(super) async fn accounts_user_count(&self) -> Result<u64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM users")
            .fetch_one(&self.pool)
            .await
            .map_err(q("counting users"))?;
        u64_col(&row, "n")
    }

    pub(super) async fn accounts_create_user(&self, user: &User) -> Result<()> {
        let res = sqlx::query(
            "INSERT INTO users (name, role, password_hash, must_change, disabled, created) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&user.name)
        .bind(user.role.name())
        .bind(&user.password_hash)
        .bind(user.must_change)
        .bind(user.disabled)
        .bind(&user.created)
        .execute(&self.writer)
        .await
        .map_err(q("adding a user"))?;
        if res.rows_affected() == 0 {
            return Err(CatalogError::UserExists(user.name.clone()));
        }
        Ok(())
    }

    pub(super) async fn accounts_user(&self, name: &str) -> Result<Option<User>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users WHERE name = ?"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("looking up a user"))?;
        row.as_ref().map(user_from_row).transpose()
    }

    pub(super) async fn accounts_users(&self) -> Result<Vec<User>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing users"))?;
        rows.iter().map(user_from_row).collect()
    }

    pub(super) async fn accounts_update_user(
        &self,
        name: &str,
        change: &UserChange,
    ) -> Result<User> {
        const DOING: &str = "changing a user";
        let mut tx = self.write_tx(DOING).await?;
        let mut query: QueryBuilder<Sqlite> = QueryBuilder::new("UPDATE users SET name = name");
        if let Some(role) = change.role {
            query.push(", role = ").push_bind(role.name());
        }
        if let Some(disabled) = change.disabled {
            query.push(", disabled = ").push_bind(disabled);
        }
        if let Some((hash, must_change)) = &change.password {
            query
                .push(", password_hash = ")
                .push_bind(hash.clone())
                .push(", must_change = ")
                .push_bind(*must_change);
        }
        query
            .push(" WHERE name = ")
            .push_bind(name.to_owned())
            .push(format!(" RETURNING {USER_COLUMNS}"));
        let Some(row) = query
            .build()
            .fetch_optional(&mut *tx)
            .await
            .map_err(q(DOING))?
        else {
            return Err(CatalogError::UserUnknown(name.to_owned()));
        };
        let user = user_from_row(&row)?;
        if change.disabled == Some(true) || change.password.is_some() {
            sqlx::query("DELETE FROM sessions WHERE user_name = ?")
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(q(DOING))?;
        }
        tx.commit().await.map_err(q(DOING))?;
        Ok(user)
    }

    pub(super) async fn accounts_create_session(
        &self,
        secret_hash: Id,
        user: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<()> {
        const DOING: &str = "starting a session";
        let mut tx = self.write_tx(DOING).await?;
        // Expired sessions go whenever a new one starts: the table stays the size of the
        // live sessions without a sweeper task.
        sqlx::query("DELETE FROM sessions WHERE expires_at <= ?")
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(q(DOING))?;
        sqlx::query(
            "INSERT INTO sessions (secret_hash, user_name, created_at, expires_at) VALUES (?, ?, ?, ?)",
        )
        .bind(secret_hash.0.to_vec())
        .bind(user)
        .bind(now_ms)
        .bind(expires_at_ms)
        .execute(&mut *tx)
        .await
        .map_err(q(DOING))?;
        tx.commit().await.map_err(q(DOING))?;
        Ok(())
    }

    pub(super) async fn accounts_session_user(
        &self,
        secret_hash: Id,
        now_ms: i64,
    ) -> Result<Option<User>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {} FROM sessions s JOIN users u ON u.name = s.user_name \
             WHERE s.secret_hash = ? AND s.expires_at > ? AND u.disabled = 0",
            USER_COLUMNS
                .split(", ")
                .map(|c| format!("u.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
        .bind(secret_hash.0.to_vec())
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("looking up a session"))?;
        row.as_ref().map(user_from_row).transpose()
    }

    pub(super) async fn accounts_delete_session(&self, secret_hash: Id) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE secret_hash = ?")
            .bind(secret_hash.0.to_vec())
            .execute(&self.writer)
            .await
            .map_err(q("ending a session"))?;
        Ok(())
    }

    pub(super) async fn accounts_create_api_token(
        &self,
        secret_hash: Id,
        user: &str,
        label: &str,
    ) -> Result<ApiTokenRecord> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO api_tokens (secret_hash, user_name, label, created) \
             SELECT ?, name, ?, ? FROM users WHERE name = ? RETURNING {TOKEN_COLUMNS}"
        )))
        .bind(secret_hash.0.to_vec())
        .bind(label)
        .bind(crate::clock::rfc3339_ms(crate::clock::now_ms()))
        .bind(user)
        .fetch_optional(&self.writer)
        .await
        .map_err(q("issuing an API token"))?;
        match row {
            Some(row) => token_from_row(&row),
            None => Err(CatalogError::UserUnknown(user.to_owned())),
        }
    }

    pub(super) async fn accounts_api_tokens(&self) -> Result<Vec<ApiTokenRecord>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY id DESC"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing API tokens"))?;
        rows.iter().map(token_from_row).collect()
    }

    pub(super) async fn accounts_revoke_api_token(&self, id: i64) -> Result<bool> {
        let res = sqlx::query("UPDATE api_tokens SET revoked = 1 WHERE id = ?")
            .bind(id)
            .execute(&self.writer)
            .await
            .map_err(q("revoking an API token"))?;
        Ok(res.rows_affected() > 0)
    }

    pub(super) async fn accounts_api_token_user(&self, secret_hash: Id) -> Result<Option<User>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {} FROM api_tokens t JOIN users u ON u.name = t.user_name \
             WHERE t.secret_hash = ? AND t.revoked = 0 AND u.disabled = 0",
            USER_COLUMNS
                .split(", ")
                .map(|c| format!("u.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
        .bind(secret_hash.0.to_vec())
        .fetch_optional(&self.pool)
        .await
        .map_err(q("looking up an API token"))?;
        row.as_ref().map(user_from_row).transpose()
    }

    pub(super) async fn accounts_enroll_tokens(
        &self,
        now_ms: i64,
    ) -> Result<Vec<EnrollTokenRecord>> {
        let rows = sqlx::query(
            "SELECT secret_hash, uses_left, expires_at, created_at FROM enroll_tokens \
             WHERE expires_at > ? AND uses_left > 0 ORDER BY created_at DESC LIMIT 500",
        )
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing enrolment tokens"))?;
        rows.iter()
            .map(|row| {
                let hash: Vec<u8> = row.try_get("secret_hash").map_err(q("reading a row"))?;
                let uses_left: i64 = row.try_get("uses_left").map_err(q("reading a row"))?;
                Ok(EnrollTokenRecord {
                    hash_prefix: crate::random::to_hex(&hash[..hash.len().min(6)]),
                    uses_left: u32::try_from(uses_left).unwrap_or(0),
                    expires_at_ms: row.try_get("expires_at").map_err(q("reading a row"))?,
                    created_at_ms: row.try_get("created_at").map_err(q("reading a row"))?,
                })
            })
            .collect()
    }

    pub(super) async fn accounts_devices_page(
        &self,
        query: &DeviceQuery,
    ) -> Result<Vec<DeviceSummary>> {
        let column = sort_column(query.sort);
        let mut sql: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
            "SELECT {DEVICE_COLUMNS} FROM devices INDEXED BY devices_by_{} WHERE 1 = 1",
            match query.sort {
                DeviceSort::Hostname => "hostname",
                DeviceSort::Created => "created",
                DeviceSort::LastSnapshot => "last_snapshot",
            }
        ));
        if let Some(search) = query.search.as_deref().filter(|s| !s.is_empty()) {
            let pattern = contains_pattern(search);
            sql.push(" AND (hostname LIKE ")
                .push_bind(pattern.clone())
                .push(" ESCAPE '\\' OR id LIKE ")
                .push_bind(pattern)
                .push(" ESCAPE '\\')");
        }
        if let Some(owner) = &query.owner {
            sql.push(" AND owner = ").push_bind(owner.clone());
        }
        match query.state {
            None => {}
            Some(DeviceState::Revoked) => {
                sql.push(" AND revoked = 1");
            }
            Some(DeviceState::Never) => {
                sql.push(" AND revoked = 0 AND last_snapshot_at = ''");
            }
            Some(DeviceState::Protected) => {
                sql.push(" AND revoked = 0 AND last_snapshot_at >= ")
                    .push_bind(query.protected_since.clone());
            }
            Some(DeviceState::Stale) => {
                sql.push(" AND revoked = 0 AND last_snapshot_at <> '' AND last_snapshot_at < ")
                    .push_bind(query.protected_since.clone());
            }
        }
        let (cmp, order) = if query.descending {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        if let Some((key, id)) = &query.after {
            sql.push(format!(" AND ({column}, id) {cmp} ("))
                .push_bind(key.clone())
                .push(", ")
                .push_bind(id.clone())
                .push(")");
        }
        sql.push(format!(" ORDER BY {column} {order}, id {order} LIMIT "))
            .push_bind(i64::from(query.limit));
        let rows = sql
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing devices"))?;
        rows.iter().map(device_from_row).collect()
    }

    pub(super) async fn accounts_device_summary(&self, id: &str) -> Result<Option<DeviceSummary>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(q("looking up a device"))?;
        row.as_ref().map(device_from_row).transpose()
    }

    pub(super) async fn accounts_set_device_owner(
        &self,
        id: &str,
        owner: Option<&str>,
    ) -> Result<bool> {
        let res = sqlx::query("UPDATE devices SET owner = ? WHERE id = ?")
            .bind(owner)
            .bind(id)
            .execute(&self.writer)
            .await
            .map_err(q("setting a device's owner"))?;
        Ok(res.rows_affected() > 0)
    }

    pub(super) async fn accounts_device_portal_enabled(&self, id: &str) -> Result<Option<bool>> {
        let row = sqlx::query("SELECT portal_disabled FROM devices WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("looking up a device's portal setting"))?;
        row.map(|r| {
            r.try_get::<i64, _>("portal_disabled")
                .map(|d| d == 0)
                .map_err(q("reading a row"))
        })
        .transpose()
    }

    pub(super) async fn accounts_set_device_portal(&self, id: &str, enabled: bool) -> Result<bool> {
        let res = sqlx::query("UPDATE devices SET portal_disabled = ? WHERE id = ?")
            .bind(i64::from(!enabled))
            .bind(id)
            .execute(&self.writer)
            .await
            .map_err(q("setting a device's portal"))?;
        Ok(res.rows_affected() > 0)
    }

    pub(super) async fn accounts_fleet_stats(&self, protected_since: &str) -> Result<FleetStats> {
        const DOING: &str = "computing the dashboard's figures";
        let devices = sqlx::query(
            "SELECT COUNT(*) AS devices, \
                    COALESCE(SUM(revoked <> 0), 0) AS revoked, \
                    COALESCE(SUM(revoked = 0 AND last_snapshot_at >= ?), 0) AS protected \
             FROM devices",
        )
        .bind(protected_since)
        .fetch_one(&self.pool)
        .await
        .map_err(q(DOING))?;
        let snapshots =
            sqlx::query("SELECT COUNT(*) AS n, COALESCE(SUM(bytes), 0) AS bytes FROM snapshots")
                .fetch_one(&self.pool)
                .await
                .map_err(q(DOING))?;
        let packs = sqlx::query("SELECT COALESCE(SUM(size), 0) AS bytes FROM packs")
            .fetch_one(&self.pool)
            .await
            .map_err(q(DOING))?;
        Ok(FleetStats {
            devices: u64_col(&devices, "devices")?,
            revoked: u64_col(&devices, "revoked")?,
            protected: u64_col(&devices, "protected")?,
            snapshots: u64_col(&snapshots, "n")?,
            logical_bytes: u64_col(&snapshots, "bytes")?,
            stored_bytes: u64_col(&packs, "bytes")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;

    async fn open(dir: &tempfile::TempDir) -> SqliteCatalog {
        SqliteCatalog::open(&dir.path().join("catalog.sqlite"), true)
            .await
            .unwrap()
    }

    async fn add_device(cat: &SqliteCatalog, id: &str, hostname: &str) {
        sqlx::query(
            "INSERT INTO devices (id, hostname, cert_fingerprint, created) VALUES (?, ?, ?, ?)",
        )
        .bind(id)
        .bind(hostname)
        .bind(Id::of(id.as_bytes()).0.to_vec())
        .bind(format!("2026-01-01T00:00:00.{:0>3}Z", id.len()))
        .execute(&cat.writer)
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn devices_page_walks_every_device_once_in_each_order() {
        let dir = tempfile::tempdir().unwrap();
        let cat = open(&dir).await;
        // Duplicate hostnames: the id must break ties or pages would skip or repeat rows.
        for i in 0..25 {
            add_device(&cat, &format!("{i:016x}"), &format!("pc-{}", i % 7)).await;
        }
        cat.set_device_owner(&format!("{:016x}", 3), Some("ann"))
            .await
            .unwrap();
        for sort in [
            DeviceSort::Hostname,
            DeviceSort::Created,
            DeviceSort::LastSnapshot,
        ] {
            for descending in [false, true] {
                let mut seen = Vec::new();
                let mut query = DeviceQuery {
                    sort,
                    descending,
                    limit: 4,
                    ..Default::default()
                };
                loop {
                    let page = cat.devices_page(&query).await.unwrap();
                    let Some(last) = page.last() else { break };
                    query.after = Some((last.sort_key(sort), last.id.clone()));
                    seen.extend(page.into_iter().map(|d| d.id));
                }
                let mut unique = seen.clone();
                unique.sort();
                unique.dedup();
                assert_eq!(
                    (seen.len(), unique.len()),
                    (25, 25),
                    "{sort:?} {descending}"
                );
            }
        }
        let found = cat
            .devices_page(&DeviceQuery {
                search: Some("PC-3".into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            found.len(),
            4,
            "pc-3 is every 7th of 25, found case-insensitively"
        );
        let owned = cat
            .devices_page(&DeviceQuery {
                owner: Some("ann".into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(owned.len(), 1);
        assert_eq!(owned[0].owner.as_deref(), Some("ann"));
        // `_` in a search is a character, not a wildcard.
        let none = cat
            .devices_page(&DeviceQuery {
                search: Some("pc_".into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(none.is_empty());
        // The snapshot triggers keep the last snapshot columns.
        let snap = morgana_core::wire::SnapshotInfo {
            id: "s1".into(),
            device_id: format!("{:016x}", 5),
            root: Id::of(b"root"),
            created: "2026-11-26T00:00:00.000Z".into(),
            reason: "manual".into(),
            stats: morgana_core::wire::SnapshotStats {
                bytes: 1234,
                ..Default::default()
            },
            pinned: None,
        };
        cat.insert_snapshot(&snap).await.unwrap();
        let d = cat.device_summary(&snap.device_id).await.unwrap().unwrap();
        assert_eq!(
            (d.last_snapshot.as_deref(), d.last_snapshot_bytes),
            (Some("2026-11-26T00:00:00.000Z"), 1234)
        );
        let stats = cat.fleet_stats("2026-11-25T00:00:00.000Z").await.unwrap();
        assert_eq!(
            (stats.devices, stats.protected, stats.logical_bytes),
            (25, 1, 1234)
        );
        assert_eq!(cat.delete_snapshots(&["s1".into()]).await.unwrap(), 1);
        let d = cat.device_summary(&snap.device_id).await.unwrap().unwrap();
        assert_eq!(d.last_snapshot, None);
    }

    #[tokio::test]
    async fn users_sessions_and_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let cat = open(&dir).await;
        let user = User {
            name: "ann".into(),
            role: Role::Helpdesk,
            password_hash: "h".into(),
            must_change: false,
            disabled: false,
            created: "2026-01-01T00:00:00.000Z".into(),
        };
        cat.create_user(&user).await.unwrap();
        assert!(matches!(
            cat.create_user(&user).await,
            Err(CatalogError::UserExists(_))
        ));
        let secret = Id::of(b"session");
        cat.create_session(secret, "ann", 100, 200).await.unwrap();
        assert_eq!(
            cat.session_user(secret, 150).await.unwrap(),
            Some(user.clone())
        );
        assert_eq!(
            cat.session_user(secret, 200).await.unwrap(),
            None,
            "expired"
        );
        let token = cat
            .create_api_token(Id::of(b"token"), "ann", "ci")
            .await
            .unwrap();
        assert!(
            cat.api_token_user(Id::of(b"token"))
                .await
                .unwrap()
                .is_some()
        );
        assert!(matches!(
            cat.create_api_token(Id::of(b"t2"), "nobody", "x").await,
            Err(CatalogError::UserUnknown(_))
        ));
        // Disabling ends sessions and shuts out tokens.
        let changed = cat
            .update_user(
                "ann",
                &UserChange {
                    disabled: Some(true),
                    role: Some(Role::Administrator),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(changed.disabled && changed.role == Role::Administrator);
        assert!(
            cat.api_token_user(Id::of(b"token"))
                .await
                .unwrap()
                .is_none()
        );
        cat.update_user(
            "ann",
            &UserChange {
                disabled: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(cat.session_user(secret, 150).await.unwrap(), None);
        assert!(
            cat.api_token_user(Id::of(b"token"))
                .await
                .unwrap()
                .is_some()
        );
        assert!(cat.revoke_api_token(token.id).await.unwrap());
        assert!(
            cat.api_token_user(Id::of(b"token"))
                .await
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            cat.update_user("nobody", &UserChange::default()).await,
            Err(CatalogError::UserUnknown(_))
        ));
    }
}
