//! The embedded catalog: one SQLite file in WAL mode, so `morgana enroll-token` and
//! `morgana check` can work beside a running server.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use morgana_core::Id;
use morgana_core::pack::{BlobKind, Compression, PackEntry};
use morgana_core::wire::{SnapshotInfo, SnapshotStats};
use sqlx::sqlite::{
    Sqlite, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row};

use super::{
    ApiTokenRecord, BlobLocation, Catalog, CatalogError, Device, DeviceProtection, DeviceQuery,
    DeviceStatus, DeviceSummary, DriverProfileRecord, DriverSetRecord, EnrollTokenRecord, Fenced,
    FleetStats, GcHorizon, HeartbeatRecord, JobRecord, LayerRecord, NewDriverSet, NewLayer,
    NewPlugin, OpenAlert, PackRecord, PackUsage, PluginRecord, Result, User, UserChange,
};
use crate::events::{ChainAnchor, ChainCheck, Event, EventFilter, NewEvent};
use crate::policy::{PolicySpec, PolicyVersion};
use morgana_core::control::JobReport;
use morgana_core::plugin::Hook;

mod accounts;
mod assignments;
mod drivers;
mod events;
mod jobs;
mod layers;
mod plugins;
mod policies;
mod reflectors;

/// Ids per `IN (…)` lookup: far below SQLite's variable limit, large enough to amortise.
const BATCH: usize = 500;
/// Rows per multi-row INSERT of 7 columns: under SQLite's 32,766-variable limit.
const INSERT_ROWS: usize = 1000;

pub struct SqliteCatalog {
    /// Readers. In WAL mode a write by any other connection empties a connection's page
    /// cache, so these start cold after every write.
    pool: SqlitePool,
    /// The one connection every write goes through. No other connection of this process
    /// writes, so its page cache stays valid from one transaction to the next: a pack's
    /// blob rows land on index pages it already holds instead of pages re-read from the
    /// WAL. Writers wait their turn here rather than in SQLite's busy handler.
    writer: SqlitePool,
}

fn q(doing: &'static str) -> impl FnOnce(sqlx::Error) -> CatalogError {
    move |source| CatalogError::Query { doing, source }
}

fn placeholders(n: usize) -> String {
    let mut s = String::with_capacity(n * 2);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push('?');
    }
    s
}

fn id_col(row: &SqliteRow, col: &str, what: &'static str) -> Result<Id> {
    let bytes: Vec<u8> = row.try_get(col).map_err(q("reading a row"))?;
    Id::from_slice(&bytes).ok_or_else(|| CatalogError::Corrupt {
        what,
        detail: format!("column {col} holds {} bytes instead of 32", bytes.len()),
    })
}

fn u32_col(row: &SqliteRow, col: &str, what: &'static str) -> Result<u32> {
    let v: i64 = row.try_get(col).map_err(q("reading a row"))?;
    u32::try_from(v).map_err(|_| CatalogError::Corrupt {
        what,
        detail: format!("column {col} holds {v}"),
    })
}

fn u64_col(row: &SqliteRow, col: &str) -> Result<u64> {
    // Stored as the bit pattern of the u64 (SQLite integers are signed).
    let v: i64 = row.try_get(col).map_err(q("reading a row"))?;
    Ok(v as u64)
}

fn entry_from_row(row: &SqliteRow) -> Result<PackEntry> {
    let id = id_col(row, "id", "blob index entry")?;
    let bad = |detail: String| CatalogError::Corrupt {
        what: "blob index entry",
        detail,
    };
    let kind_byte: i64 = row.try_get("kind").map_err(q("reading a row"))?;
    let kind = u8::try_from(kind_byte)
        .ok()
        .and_then(BlobKind::from_u8)
        .ok_or_else(|| bad(format!("blob {id} has kind {kind_byte}")))?;
    let comp_byte: i64 = row.try_get("compression").map_err(q("reading a row"))?;
    let compression = u8::try_from(comp_byte)
        .ok()
        .and_then(Compression::from_u8)
        .ok_or_else(|| bad(format!("blob {id} has compression {comp_byte}")))?;
    let offset: i64 = row.try_get("offset").map_err(q("reading a row"))?;
    let offset =
        u64::try_from(offset).map_err(|_| bad(format!("blob {id} has offset {offset}")))?;
    Ok(PackEntry {
        id,
        kind,
        compression,
        offset,
        stored_len: u32_col(row, "stored_len", "blob index entry")?,
        raw_len: u32_col(row, "raw_len", "blob index entry")?,
    })
}

fn pack_from_row(row: &SqliteRow) -> Result<PackRecord> {
    let volume: String = row.try_get("volume").map_err(q("reading a row"))?;
    Ok(PackRecord {
        id: id_col(row, "id", "pack record")?,
        volume: PathBuf::from(volume),
        size: u64_col(row, "size")?,
        blob_count: u64_col(row, "blob_count")?,
        created: row.try_get("created").map_err(q("reading a row"))?,
    })
}

fn device_from_row(row: &SqliteRow) -> Result<Device> {
    let revoked: i64 = row.try_get("revoked").map_err(q("reading a row"))?;
    Ok(Device {
        id: row.try_get("id").map_err(q("reading a row"))?,
        hostname: row.try_get("hostname").map_err(q("reading a row"))?,
        cert_fingerprint: id_col(row, "cert_fingerprint", "device record")?,
        created: row.try_get("created").map_err(q("reading a row"))?,
        revoked: revoked != 0,
    })
}

fn snapshot_from_row(row: &SqliteRow) -> Result<SnapshotInfo> {
    Ok(SnapshotInfo {
        id: row.try_get("id").map_err(q("reading a row"))?,
        device_id: row.try_get("device_id").map_err(q("reading a row"))?,
        root: id_col(row, "root", "snapshot record")?,
        created: row.try_get("created").map_err(q("reading a row"))?,
        reason: row.try_get("reason").map_err(q("reading a row"))?,
        stats: SnapshotStats {
            files: u64_col(row, "files")?,
            dirs: u64_col(row, "dirs")?,
            bytes: u64_col(row, "bytes")?,
            bytes_sent: u64_col(row, "bytes_sent")?,
            new_chunks: u64_col(row, "new_chunks")?,
        },
        pinned: row.try_get("pinned").map_err(q("reading a row"))?,
    })
}

const SNAPSHOT_COLUMNS: &str =
    "id, device_id, root, created, reason, files, dirs, bytes, bytes_sent, new_chunks, pinned";

impl SqliteCatalog {
    /// Opens (and with `create`, creates) the catalog file and applies pending migrations.
    pub async fn open(path: &Path, create: bool) -> Result<SqliteCatalog> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(create)
            .journal_mode(SqliteJournalMode::Wal)
            // A committed snapshot must survive power loss, as its packs do.
            .synchronous(SqliteSynchronous::Full)
            // Other processes (`enroll-token`, `check`) write beside the server.
            .busy_timeout(Duration::from_secs(30))
            // Each write in WAL mode invalidates the other pooled connections' page caches;
            // reading through a shared mapping makes refilling them a page-table walk rather
            // than a copy per page. It is the OS page cache, so it does not pin memory.
            .pragma("mmap_size", "268435456")
            // Statement journals (a multi-row insert into a table with a foreign key keeps
            // one) stay in memory: as temp files they were a third of a first sync's
            // catalog writes.
            .pragma("temp_store", "memory")
            .foreign_keys(true);
        let open = |connections: u32, options: SqliteConnectOptions| async move {
            SqlitePoolOptions::new()
                .max_connections(connections)
                .connect_with(options)
                .await
                .map_err(|source| CatalogError::Open {
                    path: path.to_path_buf(),
                    source,
                })
        };
        // The writer's cache holds the upper levels of the blob index and the leaves
        // recent packs touched; 32 MiB, fixed, whatever the repository's size.
        let writer = open(1, options.clone().pragma("cache_size", "-32768")).await?;
        sqlx::migrate!("./migrations")
            .run(&writer)
            .await
            .map_err(|source| CatalogError::Migrate {
                path: path.to_path_buf(),
                source,
            })?;
        let pool = open(8, options).await?;
        Ok(SqliteCatalog { pool, writer })
    }

    async fn missing_in(
        &self,
        tables: &[&str],
        ids: &[Id],
        doing: &'static str,
    ) -> Result<Vec<Id>> {
        let mut conn = self.pool.acquire().await.map_err(q(doing))?;
        let (_, absent) = split_present(&mut conn, tables, ids, doing).await?;
        Ok(absent)
    }

    async fn write_tx(&self, doing: &'static str) -> Result<sqlx::Transaction<'_, Sqlite>> {
        self.writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(q(doing))
    }
}

/// The subset of `ids` present in the `id` column of any of `tables`, for one batch.
async fn present(
    conn: &mut SqliteConnection,
    tables: &[&str],
    ids: &[Id],
    doing: &'static str,
) -> Result<HashSet<Id>> {
    let marks = placeholders(ids.len());
    let sql = tables
        .iter()
        .map(|t| format!("SELECT id FROM {t} WHERE id IN ({marks})"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    // Only placeholders and fixed table names are spliced in; ids are bound.
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for _ in tables {
        for id in ids {
            query = query.bind(id.0.to_vec());
        }
    }
    let rows = query.fetch_all(&mut *conn).await.map_err(q(doing))?;
    rows.iter().map(|r| id_col(r, "id", "id")).collect()
}

/// `ids` split into those present in the `id` column of any of `tables` and those absent,
/// each in the order given, a batch per query.
async fn split_present(
    conn: &mut SqliteConnection,
    tables: &[&str],
    ids: &[Id],
    doing: &'static str,
) -> Result<(Vec<Id>, Vec<Id>)> {
    let (mut found, mut absent) = (Vec::new(), Vec::new());
    for batch in ids.chunks(BATCH) {
        let present = present(conn, tables, batch, doing).await?;
        for id in batch {
            if present.contains(id) {
                found.push(*id);
            } else {
                absent.push(*id);
            }
        }
    }
    Ok((found, absent))
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

/// Inserts `items` in multi-row statements of up to `INSERT_ROWS` rows: a statement per row
/// costs a round trip to sqlx's worker thread each, which dominated a first sync. `insert`
/// is the statement up to `VALUES`, `row` one row's placeholders, and `bind` binds one
/// item's values in their order. Returns how many rows went in.
async fn insert_rows<'q, T>(
    conn: &mut SqliteConnection,
    insert: &str,
    row: &str,
    items: &'q [T],
    bind: impl Fn(SqliteQuery<'q>, &'q T) -> SqliteQuery<'q>,
    doing: &'static str,
) -> Result<u64> {
    let mut inserted = 0;
    for rows in items.chunks(INSERT_ROWS) {
        let sql = format!("{insert} VALUES {}", vec![row; rows.len()].join(", "));
        // Only fixed statement text and placeholders are spliced in; values are bound.
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for item in rows {
            query = bind(query, item);
        }
        inserted += query
            .execute(&mut *conn)
            .await
            .map_err(q(doing))?
            .rows_affected();
    }
    Ok(inserted)
}

/// Inserts one-column id rows, `INSERT OR IGNORE`.
async fn insert_ids(
    conn: &mut SqliteConnection,
    table: &str,
    ids: &[Id],
    doing: &'static str,
) -> Result<u64> {
    let insert = format!("INSERT OR IGNORE INTO {table} (id)");
    insert_rows(
        conn,
        &insert,
        "(?)",
        ids,
        |q, id| q.bind(id.0.to_vec()),
        doing,
    )
    .await
}

async fn insert_holds(
    conn: &mut SqliteConnection,
    device_id: &str,
    ids: &[Id],
    now_ms: i64,
) -> Result<()> {
    insert_rows(
        conn,
        "INSERT INTO holds (device_id, id, held_at)",
        "(?, ?, ?)",
        ids,
        |q, id| {
            q.bind(device_id.to_owned())
                .bind(id.0.to_vec())
                .bind(now_ms)
        },
        "holding blobs for a sync",
    )
    .await?;
    Ok(())
}

async fn insert_pack_row(
    conn: &mut SqliteConnection,
    pack: &PackRecord,
    doing: &'static str,
) -> Result<()> {
    sqlx::query(
        "INSERT OR IGNORE INTO packs (id, volume, size, blob_count, created) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(pack.id.0.to_vec())
    .bind(pack.volume.to_string_lossy().into_owned())
    .bind(pack.size as i64)
    .bind(pack.blob_count as i64)
    .bind(&pack.created)
    .execute(&mut *conn)
    .await
    .map_err(q(doing))?;
    Ok(())
}

/// Moves a pack nothing points into from `packs` to `dead_packs`; false if something does.
async fn retire_if_unused(
    conn: &mut SqliteConnection,
    pack: Id,
    now_ms: i64,
    doing: &'static str,
) -> Result<bool> {
    let used = sqlx::query("SELECT 1 FROM blobs WHERE pack = ? LIMIT 1")
        .bind(pack.0.to_vec())
        .fetch_optional(&mut *conn)
        .await
        .map_err(q(doing))?;
    if used.is_some() {
        return Ok(false);
    }
    let done = sqlx::query(
        "INSERT OR IGNORE INTO dead_packs (id, volume, dead_since) \
         SELECT id, volume, ? FROM packs WHERE id = ?",
    )
    .bind(now_ms)
    .bind(pack.0.to_vec())
    .execute(&mut *conn)
    .await
    .map_err(q(doing))?;
    sqlx::query("DELETE FROM packs WHERE id = ?")
        .bind(pack.0.to_vec())
        .execute(&mut *conn)
        .await
        .map_err(q(doing))?;
    Ok(done.rows_affected() == 1)
}

/// The collector's fence: the horizon now, if it moved past `seen`.
async fn moved_horizon(conn: &mut SqliteConnection, seen: GcHorizon) -> Result<Option<GcHorizon>> {
    let now = horizon(conn).await?;
    Ok((now.snapshot_seq > seen.snapshot_seq
        || now.hold_seq > seen.hold_seq
        || now.layer_seq > seen.layer_seq
        || now.driver_seq > seen.driver_seq)
        .then_some(now))
}

async fn horizon(conn: &mut SqliteConnection) -> Result<GcHorizon> {
    const DOING: &str = "reading the newest snapshot and hold";
    let row = sqlx::query(
        "SELECT (SELECT COALESCE(MAX(seq), 0) FROM snapshots) AS s, \
                (SELECT COALESCE(MAX(seq), 0) FROM holds) AS h, \
                (SELECT COALESCE(MAX(seq), 0) FROM layers) AS l, \
                (SELECT COALESCE(MAX(seq), 0) FROM driver_sets) AS d",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(q(DOING))?;
    Ok(GcHorizon {
        snapshot_seq: row.try_get("s").map_err(q(DOING))?,
        hold_seq: row.try_get("h").map_err(q(DOING))?,
        layer_seq: row.try_get("l").map_err(q(DOING))?,
        driver_seq: row.try_get("d").map_err(q(DOING))?,
    })
}

#[async_trait]
impl Catalog for SqliteCatalog {
    async fn create_token(&self, secret_hash: Id, uses: u32, expires_at_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO enroll_tokens (secret_hash, uses_left, expires_at, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(secret_hash.0.to_vec())
        .bind(i64::from(uses))
        .bind(expires_at_ms)
        .bind(crate::clock::now_ms())
        .execute(&self.writer)
        .await
        .map_err(q("storing an enrolment token"))?;
        Ok(())
    }

    async fn enroll_device(&self, secret_hash: Id, now_ms: i64, device: &Device) -> Result<()> {
        const DOING: &str = "enrolling a device";
        // IMMEDIATE takes the write lock up front: no other enrolment can spend the same
        // last use between our check and our update.
        let mut tx = self.write_tx(DOING).await?;
        let row =
            sqlx::query("SELECT uses_left, expires_at FROM enroll_tokens WHERE secret_hash = ?")
                .bind(secret_hash.0.to_vec())
                .fetch_optional(&mut *tx)
                .await
                .map_err(q(DOING))?;
        let Some(row) = row else {
            return Err(CatalogError::TokenUnknown);
        };
        let uses_left: i64 = row.try_get("uses_left").map_err(q(DOING))?;
        let expires_at: i64 = row.try_get("expires_at").map_err(q(DOING))?;
        if expires_at <= now_ms {
            return Err(CatalogError::TokenExpired);
        }
        if uses_left <= 0 {
            return Err(CatalogError::TokenUsedUp);
        }
        sqlx::query("UPDATE enroll_tokens SET uses_left = uses_left - 1 WHERE secret_hash = ?")
            .bind(secret_hash.0.to_vec())
            .execute(&mut *tx)
            .await
            .map_err(q(DOING))?;
        sqlx::query(
            "INSERT INTO devices (id, hostname, cert_fingerprint, created, revoked) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&device.id)
        .bind(&device.hostname)
        .bind(device.cert_fingerprint.0.to_vec())
        .bind(&device.created)
        .bind(device.revoked)
        .execute(&mut *tx)
        .await
        .map_err(q(DOING))?;
        tx.commit().await.map_err(q(DOING))?;
        Ok(())
    }

    async fn device_by_fingerprint(&self, fingerprint: Id) -> Result<Option<Device>> {
        let row = sqlx::query(
            "SELECT id, hostname, cert_fingerprint, created, revoked FROM devices WHERE cert_fingerprint = ?",
        )
        .bind(fingerprint.0.to_vec())
        .fetch_optional(&self.pool)
        .await
        .map_err(q("looking up a device"))?;
        row.as_ref().map(device_from_row).transpose()
    }

    async fn missing_blobs(&self, ids: &[Id]) -> Result<Vec<Id>> {
        self.missing_in(&["blobs"], ids, "looking up blobs").await
    }

    async fn missing_objects_held(
        &self,
        device_id: &str,
        ids: &[Id],
        now_ms: i64,
    ) -> Result<Vec<Id>> {
        const DOING: &str = "looking up and holding chunks, trees and files";
        // A write transaction from the start: the collector deletes only in write
        // transactions, so what is found present here is held before it could go.
        let mut tx = self.write_tx(DOING).await?;
        let tables = ["chunks", "complete_trees", "files"];
        let (found, missing) = split_present(&mut tx, &tables, ids, DOING).await?;
        insert_holds(&mut tx, device_id, &found, now_ms).await?;
        tx.commit().await.map_err(q(DOING))?;
        Ok(missing)
    }

    async fn hold(&self, device_id: &str, ids: &[Id], now_ms: i64) -> Result<()> {
        const DOING: &str = "holding blobs for a sync";
        let mut tx = self.write_tx(DOING).await?;
        insert_holds(&mut tx, device_id, ids, now_ms).await?;
        tx.commit().await.map_err(q(DOING))
    }

    /// One write transaction on the writer, whose cache already holds the index pages
    /// the pack's rows will go to next.
    async fn hold_and_find_missing(
        &self,
        device_id: &str,
        ids: &[Id],
        now_ms: i64,
    ) -> Result<Vec<Id>> {
        const DOING: &str = "holding blobs and looking them up";
        let mut tx = self.write_tx(DOING).await?;
        insert_holds(&mut tx, device_id, ids, now_ms).await?;
        let (_, missing) = split_present(&mut tx, &["blobs"], ids, DOING).await?;
        tx.commit().await.map_err(q(DOING))?;
        Ok(missing)
    }

    async fn locate_blobs(&self, ids: &[Id]) -> Result<Vec<Option<BlobLocation>>> {
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(BATCH) {
            let sql = format!(
                "SELECT b.id, b.pack, b.kind, b.compression, b.offset, b.stored_len, b.raw_len, p.volume \
                 FROM blobs b JOIN packs p ON p.id = b.pack WHERE b.id IN ({})",
                placeholders(batch.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for id in batch {
                query = query.bind(id.0.to_vec());
            }
            let rows = query
                .fetch_all(&self.pool)
                .await
                .map_err(q("locating blobs"))?;
            let mut found = HashMap::with_capacity(rows.len());
            for row in &rows {
                let entry = entry_from_row(row)?;
                let volume: String = row.try_get("volume").map_err(q("locating blobs"))?;
                let pack = id_col(row, "pack", "blob index entry")?;
                found.insert(
                    entry.id,
                    BlobLocation {
                        pack,
                        volume: PathBuf::from(volume),
                        entry,
                    },
                );
            }
            out.extend(batch.iter().map(|id| found.get(id).cloned()));
        }
        Ok(out)
    }

    async fn insert_pack(&self, pack: &PackRecord, entries: &[PackEntry]) -> Result<()> {
        const DOING: &str = "recording a pack";
        let mut tx = self.write_tx(DOING).await?;
        insert_pack_row(&mut tx, pack, DOING).await?;
        // In key order, each row lands next to the last in the id index instead of on a
        // random page of it.
        let mut by_id = entries.to_vec();
        by_id.sort_unstable_by_key(|e| e.id);
        insert_rows(
            &mut tx,
            "INSERT OR IGNORE INTO blobs (id, pack, kind, compression, offset, stored_len, raw_len)",
            "(?, ?, ?, ?, ?, ?, ?)",
            &by_id,
            |q, e| {
                q.bind(e.id.0.to_vec())
                    .bind(pack.id.0.to_vec())
                    .bind(e.kind as i64)
                    .bind(e.compression as i64)
                    .bind(e.offset as i64)
                    .bind(i64::from(e.stored_len))
                    .bind(i64::from(e.raw_len))
            },
            DOING,
        )
        .await?;
        tx.commit().await.map_err(q(DOING))?;
        Ok(())
    }

    async fn packs_page(&self, after: Option<Id>, limit: u32) -> Result<Vec<PackRecord>> {
        let after = after.map(|a| a.0.to_vec()).unwrap_or_default();
        let rows = sqlx::query(
            "SELECT id, volume, size, blob_count, created FROM packs WHERE id > ? ORDER BY id LIMIT ?",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing packs"))?;
        rows.iter().map(pack_from_row).collect()
    }

    async fn pack_blobs_page(
        &self,
        pack: Id,
        after: Option<u64>,
        limit: u32,
    ) -> Result<Vec<PackEntry>> {
        let after = after.map_or(-1, |a| a as i64);
        let rows = sqlx::query(
            "SELECT id, kind, compression, offset, stored_len, raw_len FROM blobs \
             WHERE pack = ? AND offset > ? ORDER BY offset LIMIT ?",
        )
        .bind(pack.0.to_vec())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing a pack's blobs"))?;
        rows.iter().map(entry_from_row).collect()
    }

    async fn orphan_blobs_page(&self, after: Option<Id>, limit: u32) -> Result<Vec<(Id, Id)>> {
        let after = after.map(|a| a.0.to_vec()).unwrap_or_default();
        let rows = sqlx::query(
            "SELECT b.id, b.pack FROM blobs b LEFT JOIN packs p ON p.id = b.pack \
             WHERE p.id IS NULL AND b.id > ? ORDER BY b.id LIMIT ?",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(q("looking for blobs without a pack"))?;
        rows.iter()
            .map(|r| {
                Ok((
                    id_col(r, "id", "blob index entry")?,
                    id_col(r, "pack", "blob index entry")?,
                ))
            })
            .collect()
    }

    async fn tree_complete(&self, tree: Id) -> Result<bool> {
        let row = sqlx::query("SELECT 1 FROM complete_trees WHERE id = ?")
            .bind(tree.0.to_vec())
            .fetch_optional(&self.pool)
            .await
            .map_err(q("looking up a verified tree"))?;
        Ok(row.is_some())
    }

    async fn incomplete_trees(&self, trees: &[Id]) -> Result<Vec<Id>> {
        self.missing_in(&["complete_trees"], trees, "looking up verified trees")
            .await
    }

    async fn record_verified(&self, trees: &[Id], files: &[Id]) -> Result<()> {
        const DOING: &str = "recording verified trees and files";
        let mut tx = self.write_tx(DOING).await?;
        insert_ids(&mut tx, "complete_trees", trees, DOING).await?;
        insert_ids(&mut tx, "files", files, DOING).await?;
        tx.commit().await.map_err(q(DOING))?;
        Ok(())
    }

    async fn insert_snapshot(&self, s: &SnapshotInfo) -> Result<()> {
        const DOING: &str = "recording a snapshot";
        let mut tx = self.write_tx(DOING).await?;
        sqlx::query(
            "INSERT INTO snapshots (id, device_id, root, created, reason, files, dirs, bytes, bytes_sent, \
             new_chunks, pinned) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&s.id)
        .bind(&s.device_id)
        .bind(s.root.0.to_vec())
        .bind(&s.created)
        .bind(&s.reason)
        .bind(s.stats.files as i64)
        .bind(s.stats.dirs as i64)
        .bind(s.stats.bytes as i64)
        .bind(s.stats.bytes_sent as i64)
        .bind(s.stats.new_chunks as i64)
        .bind(&s.pinned)
        .execute(&mut *tx)
        .await
        .map_err(q(DOING))?;
        // The snapshot now keeps what the holds kept.
        sqlx::query("DELETE FROM holds WHERE device_id = ?")
            .bind(&s.device_id)
            .execute(&mut *tx)
            .await
            .map_err(q(DOING))?;
        tx.commit().await.map_err(q(DOING))
    }

    async fn snapshot_devices(&self) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT DISTINCT device_id FROM snapshots ORDER BY device_id")
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing devices with snapshots"))?;
        rows.iter()
            .map(|r| {
                r.try_get("device_id")
                    .map_err(q("listing devices with snapshots"))
            })
            .collect()
    }

    async fn delete_snapshots(&self, ids: &[String]) -> Result<u64> {
        const DOING: &str = "deleting snapshots";
        let mut tx = self.write_tx(DOING).await?;
        let mut deleted = 0;
        for batch in ids.chunks(BATCH) {
            let sql = format!(
                "DELETE FROM snapshots WHERE pinned IS NULL AND id IN ({})",
                placeholders(batch.len())
            );
            // Only placeholders are spliced in; ids are bound.
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for id in batch {
                query = query.bind(id);
            }
            deleted += query
                .execute(&mut *tx)
                .await
                .map_err(q(DOING))?
                .rows_affected();
        }
        tx.commit().await.map_err(q(DOING))?;
        Ok(deleted)
    }

    async fn pin_snapshot(&self, id: &str, reason: Option<&str>) -> Result<bool> {
        let done = sqlx::query("UPDATE snapshots SET pinned = ? WHERE id = ?")
            .bind(reason)
            .bind(id)
            .execute(&self.writer)
            .await
            .map_err(q("pinning a snapshot"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn device_snapshots(&self, device_id: &str) -> Result<Vec<SnapshotInfo>> {
        let sql =
            format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE device_id = ? ORDER BY seq");
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(device_id)
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing a device's snapshots"))?;
        rows.iter().map(snapshot_from_row).collect()
    }

    async fn gc_take_lease(
        &self,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<(String, i64)>> {
        const DOING: &str = "taking the collector's lease";
        let mut tx = self.write_tx(DOING).await?;
        let current = sqlx::query("SELECT holder, expires_at FROM gc_lease WHERE one = 1")
            .fetch_optional(&mut *tx)
            .await
            .map_err(q(DOING))?;
        if let Some(row) = current {
            let other: String = row.try_get("holder").map_err(q(DOING))?;
            let expires: i64 = row.try_get("expires_at").map_err(q(DOING))?;
            if other != holder && expires > now_ms {
                return Ok(Some((other, expires)));
            }
        }
        sqlx::query("INSERT OR REPLACE INTO gc_lease (one, holder, expires_at) VALUES (1, ?, ?)")
            .bind(holder)
            .bind(now_ms.saturating_add(ttl_ms))
            .execute(&mut *tx)
            .await
            .map_err(q(DOING))?;
        tx.commit().await.map_err(q(DOING))?;
        Ok(None)
    }

    async fn gc_release_lease(&self, holder: &str) -> Result<()> {
        sqlx::query("DELETE FROM gc_lease WHERE one = 1 AND holder = ?")
            .bind(holder)
            .execute(&self.writer)
            .await
            .map_err(q("releasing the collector's lease"))?;
        Ok(())
    }

    async fn gc_reset(&self, hold_cutoff_ms: i64) -> Result<()> {
        const DOING: &str = "starting a collection";
        let mut tx = self.write_tx(DOING).await?;
        sqlx::query("DELETE FROM gc_live")
            .execute(&mut *tx)
            .await
            .map_err(q(DOING))?;
        sqlx::query("DELETE FROM holds WHERE held_at < ?")
            .bind(hold_cutoff_ms)
            .execute(&mut *tx)
            .await
            .map_err(q(DOING))?;
        tx.commit().await.map_err(q(DOING))
    }

    async fn gc_horizon(&self) -> Result<GcHorizon> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(q("reading the newest snapshot and hold"))?;
        horizon(&mut conn).await
    }

    async fn snapshot_roots_page(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<(i64, String, Id)>> {
        const DOING: &str = "listing snapshot roots";
        let rows =
            sqlx::query("SELECT seq, id, root FROM snapshots WHERE seq > ? ORDER BY seq LIMIT ?")
                .bind(after_seq)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(q(DOING))?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.try_get("seq").map_err(q(DOING))?;
                let id: String = r.try_get("id").map_err(q(DOING))?;
                Ok((seq, id, id_col(r, "root", "snapshot record")?))
            })
            .collect()
    }

    async fn holds_page(
        &self,
        after_seq: i64,
        cutoff_ms: i64,
        limit: u32,
    ) -> Result<Vec<(i64, Id)>> {
        let rows = sqlx::query(
            "SELECT seq, id FROM holds WHERE seq > ? AND held_at >= ? ORDER BY seq LIMIT ?",
        )
        .bind(after_seq)
        .bind(cutoff_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing holds"))?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.try_get("seq").map_err(q("listing holds"))?;
                Ok((seq, id_col(r, "id", "hold")?))
            })
            .collect()
    }

    async fn gc_mark(&self, ids: &[Id]) -> Result<Vec<Id>> {
        const DOING: &str = "marking live blobs";
        let mut tx = self.write_tx(DOING).await?;
        let mut fresh = Vec::new();
        for batch in ids.chunks(BATCH) {
            let known = present(&mut tx, &["gc_live"], batch, DOING).await?;
            let mut seen = HashSet::new();
            fresh.extend(
                batch
                    .iter()
                    .filter(|id| !known.contains(*id) && seen.insert(**id)),
            );
        }
        insert_ids(&mut tx, "gc_live", &fresh, DOING).await?;
        tx.commit().await.map_err(q(DOING))?;
        Ok(fresh)
    }

    async fn gc_drop_unmarked_assertions(&self, seen: GcHorizon) -> Result<Fenced<()>> {
        const DOING: &str = "forgetting completeness of unreferenced trees and files";
        let mut tx = self.write_tx(DOING).await?;
        if let Some(now) = moved_horizon(&mut tx, seen).await? {
            return Ok(Fenced::NewRoots(now));
        }
        for table in ["complete_trees", "files"] {
            let sql = format!("DELETE FROM {table} WHERE id NOT IN (SELECT id FROM gc_live)");
            // Fixed table names only.
            sqlx::query(AssertSqlSafe(sql))
                .execute(&mut *tx)
                .await
                .map_err(q(DOING))?;
        }
        tx.commit().await.map_err(q(DOING))?;
        Ok(Fenced::Done(()))
    }

    async fn gc_unmarked_blobs_page(
        &self,
        after: Option<Id>,
        limit: u32,
    ) -> Result<Vec<(Id, u32)>> {
        const DOING: &str = "listing unreferenced blobs";
        let rows = sqlx::query(
            "SELECT id, stored_len FROM blobs WHERE id > ? \
             AND id NOT IN (SELECT id FROM gc_live) ORDER BY id LIMIT ?",
        )
        .bind(after.map(|a| a.0.to_vec()).unwrap_or_default())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(q(DOING))?;
        rows.iter()
            .map(|r| {
                Ok((
                    id_col(r, "id", "blob index entry")?,
                    u32_col(r, "stored_len", "blob index entry")?,
                ))
            })
            .collect()
    }

    async fn gc_delete_unmarked(&self, ids: &[Id], seen: GcHorizon) -> Result<Fenced<(u64, u64)>> {
        const DOING: &str = "deleting unreferenced blobs";
        let mut tx = self.write_tx(DOING).await?;
        if let Some(now) = moved_horizon(&mut tx, seen).await? {
            return Ok(Fenced::NewRoots(now));
        }
        let (mut blobs, mut bytes) = (0, 0);
        for batch in ids.chunks(BATCH) {
            let marks = placeholders(batch.len());
            let bind = |sql: String| {
                // Only placeholders are spliced in; ids are bound.
                let mut query = sqlx::query(AssertSqlSafe(sql));
                for id in batch {
                    query = query.bind(id.0.to_vec());
                }
                query
            };
            let row = bind(format!(
                "SELECT COUNT(*) AS n, COALESCE(SUM(stored_len), 0) AS b FROM blobs \
                 WHERE id IN ({marks}) AND id NOT IN (SELECT id FROM gc_live)"
            ))
            .fetch_one(&mut *tx)
            .await
            .map_err(q(DOING))?;
            blobs += u64_col(&row, "n")?;
            bytes += u64_col(&row, "b")?;
            bind(format!(
                "DELETE FROM blobs WHERE id IN ({marks}) AND id NOT IN (SELECT id FROM gc_live)"
            ))
            .execute(&mut *tx)
            .await
            .map_err(q(DOING))?;
            bind(format!(
                "DELETE FROM complete_trees WHERE id IN ({marks}) AND id NOT IN (SELECT id FROM gc_live)"
            ))
            .execute(&mut *tx)
            .await
            .map_err(q(DOING))?;
        }
        tx.commit().await.map_err(q(DOING))?;
        Ok(Fenced::Done((blobs, bytes)))
    }

    async fn pack_usage_page(&self, after: Option<Id>, limit: u32) -> Result<Vec<PackUsage>> {
        const DOING: &str = "measuring pack usage";
        let rows = sqlx::query(
            "SELECT p.id, p.volume, p.size, p.blob_count, p.created, \
             (SELECT COUNT(*) FROM blobs b WHERE b.pack = p.id) AS live_blobs, \
             (SELECT COALESCE(SUM(stored_len), 0) FROM blobs b WHERE b.pack = p.id) AS live_bytes \
             FROM packs p WHERE p.id > ? ORDER BY p.id LIMIT ?",
        )
        .bind(after.map(|a| a.0.to_vec()).unwrap_or_default())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(q(DOING))?;
        rows.iter()
            .map(|r| {
                Ok(PackUsage {
                    pack: pack_from_row(r)?,
                    live_blobs: u64_col(r, "live_blobs")?,
                    live_bytes: u64_col(r, "live_bytes")?,
                })
            })
            .collect()
    }

    async fn gc_move_blobs(
        &self,
        from: Id,
        to: &PackRecord,
        moved: &[PackEntry],
        now_ms: i64,
    ) -> Result<()> {
        const DOING: &str = "moving blobs to a new pack";
        let mut tx = self.write_tx(DOING).await?;
        insert_pack_row(&mut tx, to, DOING).await?;
        for e in moved {
            sqlx::query("UPDATE blobs SET pack = ?, offset = ? WHERE id = ? AND pack = ?")
                .bind(to.id.0.to_vec())
                .bind(e.offset as i64)
                .bind(e.id.0.to_vec())
                .bind(from.0.to_vec())
                .execute(&mut *tx)
                .await
                .map_err(q(DOING))?;
        }
        retire_if_unused(&mut tx, from, now_ms, DOING).await?;
        tx.commit().await.map_err(q(DOING))
    }

    async fn retire_pack(&self, pack: Id, now_ms: i64) -> Result<bool> {
        const DOING: &str = "retiring an empty pack";
        let mut tx = self.write_tx(DOING).await?;
        let retired = retire_if_unused(&mut tx, pack, now_ms, DOING).await?;
        tx.commit().await.map_err(q(DOING))?;
        Ok(retired)
    }

    async fn dead_packs_before(&self, before_ms: i64, limit: u32) -> Result<Vec<(Id, PathBuf)>> {
        const DOING: &str = "listing retired packs";
        let rows = sqlx::query(
            "SELECT id, volume FROM dead_packs WHERE dead_since <= ? ORDER BY id LIMIT ?",
        )
        .bind(before_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(q(DOING))?;
        rows.iter()
            .map(|r| {
                let volume: String = r.try_get("volume").map_err(q(DOING))?;
                Ok((id_col(r, "id", "retired pack")?, PathBuf::from(volume)))
            })
            .collect()
    }

    async fn forget_dead_pack(&self, pack: Id) -> Result<()> {
        sqlx::query("DELETE FROM dead_packs WHERE id = ?")
            .bind(pack.0.to_vec())
            .execute(&self.writer)
            .await
            .map_err(q("forgetting a retired pack"))?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
    }

    async fn snapshots_page(&self, after: Option<&str>, limit: u32) -> Result<Vec<SnapshotInfo>> {
        let sql =
            format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id > ? ORDER BY id LIMIT ?");
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(after.unwrap_or(""))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing snapshots"))?;
        rows.iter().map(snapshot_from_row).collect()
    }

    // ---- Plugins (issue 5): the SQL lives in sqlite/plugins.rs ----

    async fn add_plugin(&self, new: &NewPlugin) -> Result<PluginRecord> {
        self.plugins_add(new).await
    }

    async fn plugins(&self) -> Result<Vec<PluginRecord>> {
        self.plugins_all().await
    }

    async fn plugin(&self, id: i64) -> Result<Option<PluginRecord>> {
        self.plugins_by_id(id).await
    }

    async fn enable_plugin(&self, id: i64) -> Result<PluginRecord> {
        self.plugins_set_active(id, true).await
    }

    async fn disable_plugin(&self, id: i64) -> Result<PluginRecord> {
        self.plugins_set_active(id, false).await
    }

    async fn active_plugin(&self, hook: Hook) -> Result<Option<PluginRecord>> {
        self.plugins_active(hook).await
    }

    async fn record_event(&self, event: &NewEvent) -> Result<Event> {
        self.events_record(event).await
    }

    async fn events_page(
        &self,
        filter: &EventFilter,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Event>> {
        self.events_page_query(filter, before_seq, limit).await
    }

    async fn verify_events_from(
        &self,
        from: Option<ChainAnchor>,
    ) -> Result<(ChainCheck, Option<ChainAnchor>)> {
        self.events_verify(from).await
    }

    async fn set_reference(&self, device_id: &str, reference: bool) -> Result<bool> {
        self.devices_set_reference(device_id, reference).await
    }

    async fn reference_devices(&self) -> Result<Vec<Device>> {
        self.devices_references().await
    }

    async fn release_holds(&self, holder: &str) -> Result<()> {
        const DOING: &str = "releasing holds";
        let mut tx = self.write_tx(DOING).await?;
        sqlx::query("DELETE FROM holds WHERE device_id = ?")
            .bind(holder)
            .execute(&mut *tx)
            .await
            .map_err(q(DOING))?;
        tx.commit().await.map_err(q(DOING))
    }

    async fn insert_layer(&self, layer: &NewLayer) -> Result<LayerRecord> {
        self.layers_insert(layer).await
    }

    async fn layers(&self) -> Result<Vec<LayerRecord>> {
        self.layers_all().await
    }

    async fn layer(&self, name: &str, version: Option<u32>) -> Result<Option<LayerRecord>> {
        self.layers_one(name, version).await
    }

    async fn layer_roots_page(&self, after_seq: i64, limit: u32) -> Result<Vec<(i64, Id)>> {
        self.layers_roots_page(after_seq, limit).await
    }

    async fn save_group(&self, name: &str, devices: &[String], now: &str, by: &str) -> Result<()> {
        self.groups_save(name, devices, now, by).await
    }

    async fn groups(&self) -> Result<Vec<(String, Vec<String>)>> {
        self.groups_all().await
    }

    async fn assign_layers(
        &self,
        device_ids: &[String],
        assignment: &super::Assignment,
        now: &str,
        by: &str,
    ) -> Result<()> {
        self.assignments_set(device_ids, assignment, now, by).await
    }

    async fn layer_assignment(&self, device_id: &str) -> Result<Option<super::AssignmentRecord>> {
        self.assignments_one(device_id).await
    }

    async fn record_applied(
        &self,
        device_id: &str,
        job_id: &str,
        applied: &morgana_core::control::ApplyJob,
        now: &str,
    ) -> Result<()> {
        self.applied_record(device_id, job_id, applied, now).await
    }

    async fn save_apply_results(
        &self,
        job_id: &str,
        device_id: &str,
        results: &morgana_core::control::FileResults,
        now: &str,
    ) -> Result<()> {
        self.apply_results_save(job_id, device_id, results, now)
            .await
    }

    async fn apply_results(
        &self,
        job_id: &str,
    ) -> Result<Option<morgana_core::control::FileResults>> {
        self.apply_results_one(job_id).await
    }

    async fn applied_layers(&self, device_id: &str) -> Result<Option<super::AppliedRecord>> {
        self.applied_one(device_id).await
    }

    async fn roll_back_applied(&self, device_id: &str, job_id: &str, now: &str) -> Result<()> {
        self.applied_roll_back(device_id, job_id, now).await
    }

    async fn insert_driver_set(&self, set: &NewDriverSet) -> Result<DriverSetRecord> {
        self.driver_sets_insert(set).await
    }

    async fn driver_sets(&self) -> Result<Vec<DriverSetRecord>> {
        self.driver_sets_all().await
    }

    async fn driver_set(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<DriverSetRecord>> {
        self.driver_sets_one(name, version).await
    }

    async fn driver_set_roots_page(&self, after_seq: i64, limit: u32) -> Result<Vec<(i64, Id)>> {
        self.driver_sets_roots_page(after_seq, limit).await
    }

    async fn save_driver_profile(&self, profile: &DriverProfileRecord) -> Result<()> {
        self.driver_profiles_save(profile).await
    }

    async fn driver_profiles(&self) -> Result<Vec<DriverProfileRecord>> {
        self.driver_profiles_all().await
    }

    async fn save_policy(
        &self,
        name: &str,
        spec: &PolicySpec,
        created: &str,
        actor: &str,
    ) -> Result<PolicyVersion> {
        self.policies_save(name, spec, created, actor).await
    }

    async fn policy(&self, name: &str, version: Option<u64>) -> Result<Option<PolicyVersion>> {
        self.policies_get(name, version).await
    }

    async fn policy_history(&self, name: &str) -> Result<Vec<PolicyVersion>> {
        self.policies_history(name).await
    }

    async fn policies(&self) -> Result<Vec<(PolicyVersion, u64)>> {
        self.policies_in_force().await
    }

    async fn device_policy(&self, device_id: &str) -> Result<PolicyVersion> {
        self.policies_of_device(device_id).await
    }

    async fn find_devices(&self, id_or_hostname: &str) -> Result<Vec<Device>> {
        self.policies_find_devices(id_or_hostname).await
    }

    async fn assign_policy(&self, name: &str, device_ids: &[String]) -> Result<Vec<String>> {
        self.policies_assign(name, device_ids).await
    }

    async fn device_protection(&self) -> Result<Vec<DeviceProtection>> {
        self.policies_protection().await
    }

    async fn open_alert(&self, alert: &OpenAlert) -> Result<bool> {
        self.alerts_open(alert).await
    }

    async fn close_alert(&self, key: &str) -> Result<Option<OpenAlert>> {
        self.alerts_close(key).await
    }

    async fn open_alerts(&self) -> Result<Vec<OpenAlert>> {
        self.alerts_all().await
    }

    // ---- Control plane (issue 3): the SQL lives in sqlite/jobs.rs ----

    async fn devices(&self) -> Result<Vec<DeviceStatus>> {
        self.device_statuses(None).await
    }

    async fn device_status(&self, id: &str) -> Result<Option<DeviceStatus>> {
        Ok(self.device_statuses(Some(id)).await?.pop())
    }

    async fn record_heartbeat(&self, device_id: &str, beat: &HeartbeatRecord<'_>) -> Result<bool> {
        self.heartbeat_record(device_id, beat).await
    }

    async fn snapshot(&self, id: &str) -> Result<Option<SnapshotInfo>> {
        let sql = format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = ?");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("looking up a snapshot"))?;
        row.as_ref().map(snapshot_from_row).transpose()
    }

    async fn queue_job(&self, job: &JobRecord) -> Result<()> {
        self.jobs_insert(job).await
    }

    async fn take_next_job(&self, device_id: &str, now_ms: i64) -> Result<Option<JobRecord>> {
        self.jobs_take_next(device_id, now_ms).await
    }

    async fn report_job(
        &self,
        device_id: &str,
        report: &JobReport,
        now_ms: i64,
    ) -> Result<Option<JobRecord>> {
        self.jobs_report(device_id, report, now_ms).await
    }

    async fn fail_running_jobs(
        &self,
        device_id: &str,
        except: Option<&str>,
        started_before_ms: i64,
        message: &str,
        now_ms: i64,
    ) -> Result<Vec<JobRecord>> {
        self.jobs_fail_running(device_id, except, started_before_ms, message, now_ms)
            .await
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>> {
        self.jobs_by_id(id).await
    }

    async fn jobs(&self, device_id: Option<&str>, limit: u32) -> Result<Vec<JobRecord>> {
        self.jobs_list(device_id, limit).await
    }

    async fn devices_with_queued_jobs(&self) -> Result<Vec<String>> {
        self.jobs_queued_devices().await
    }

    // ---- Accounts and the web UI (issue 4): the SQL lives in sqlite/accounts.rs ----

    async fn user_count(&self) -> Result<u64> {
        self.accounts_user_count().await
    }

    async fn create_user(&self, user: &User) -> Result<()> {
        self.accounts_create_user(user).await
    }

    async fn user(&self, name: &str) -> Result<Option<User>> {
        self.accounts_user(name).await
    }

    async fn users(&self) -> Result<Vec<User>> {
        self.accounts_users().await
    }

    async fn update_user(&self, name: &str, change: &UserChange) -> Result<User> {
        self.accounts_update_user(name, change).await
    }

    async fn create_session(
        &self,
        secret_hash: Id,
        user: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<()> {
        self.accounts_create_session(secret_hash, user, now_ms, expires_at_ms)
            .await
    }

    async fn session_user(&self, secret_hash: Id, now_ms: i64) -> Result<Option<User>> {
        self.accounts_session_user(secret_hash, now_ms).await
    }

    async fn delete_session(&self, secret_hash: Id) -> Result<()> {
        self.accounts_delete_session(secret_hash).await
    }

    async fn create_api_token(
        &self,
        secret_hash: Id,
        user: &str,
        label: &str,
    ) -> Result<ApiTokenRecord> {
        self.accounts_create_api_token(secret_hash, user, label)
            .await
    }

    async fn api_tokens(&self) -> Result<Vec<ApiTokenRecord>> {
        self.accounts_api_tokens().await
    }

    async fn revoke_api_token(&self, id: i64) -> Result<bool> {
        self.accounts_revoke_api_token(id).await
    }

    async fn api_token_user(&self, secret_hash: Id) -> Result<Option<User>> {
        self.accounts_api_token_user(secret_hash).await
    }

    async fn enroll_tokens(&self, now_ms: i64) -> Result<Vec<EnrollTokenRecord>> {
        self.accounts_enroll_tokens(now_ms).await
    }

    async fn devices_page(&self, query: &DeviceQuery) -> Result<Vec<DeviceSummary>> {
        self.accounts_devices_page(query).await
    }

    async fn device_summary(&self, id: &str) -> Result<Option<DeviceSummary>> {
        self.accounts_device_summary(id).await
    }

    async fn set_device_owner(&self, id: &str, owner: Option<&str>) -> Result<bool> {
        self.accounts_set_device_owner(id, owner).await
    }

    async fn device_portal_enabled(&self, id: &str) -> Result<Option<bool>> {
        self.accounts_device_portal_enabled(id).await
    }

    async fn set_device_portal(&self, id: &str, enabled: bool) -> Result<bool> {
        self.accounts_set_device_portal(id, enabled).await
    }

    async fn fleet_stats(&self, protected_since: &str) -> Result<FleetStats> {
        self.accounts_fleet_stats(protected_since).await
    }

    async fn set_reflector_role(
        &self,
        device_id: &str,
        role: Option<&morgana_core::control::ReflectorRole>,
        changed: &str,
        changed_by: &str,
    ) -> Result<bool> {
        self.reflectors_set_role(device_id, role, changed, changed_by)
            .await
    }

    async fn reflector_role(
        &self,
        device_id: &str,
    ) -> Result<Option<morgana_core::control::ReflectorRole>> {
        self.reflectors_role(device_id).await
    }

    async fn record_reflector_beat(
        &self,
        device_id: &str,
        beat: &morgana_core::control::ReflectorBeat,
        now_ms: i64,
    ) -> Result<bool> {
        self.reflectors_beat(device_id, beat, now_ms).await
    }

    async fn reflectors(&self) -> Result<Vec<super::ReflectorRecord>> {
        self.reflectors_list().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(data: &[u8], offset: u64) -> PackEntry {
        PackEntry {
            id: Id::of(data),
            kind: BlobKind::Chunk,
            compression: Compression::None,
            offset,
            stored_len: data.len() as u32,
            raw_len: data.len() as u32,
        }
    }

    fn device(id: &str, fp: &[u8]) -> Device {
        Device {
            id: id.into(),
            hostname: "pc-1".into(),
            cert_fingerprint: Id::of(fp),
            created: crate::clock::rfc3339_ms(0),
            revoked: false,
        }
    }

    async fn open(dir: &tempfile::TempDir) -> SqliteCatalog {
        SqliteCatalog::open(&dir.path().join("catalog.sqlite"), true)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn tokens_are_spent_once_per_use_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let cat = open(&dir).await;
        let hash = Id::of(b"secret");
        cat.create_token(hash, 2, 10_000).await.unwrap();
        cat.enroll_device(hash, 5_000, &device("a", b"a"))
            .await
            .unwrap();
        cat.enroll_device(hash, 5_000, &device("b", b"b"))
            .await
            .unwrap();
        let used_up = cat.enroll_device(hash, 5_000, &device("c", b"c")).await;
        assert!(
            matches!(used_up, Err(CatalogError::TokenUsedUp)),
            "{used_up:?}"
        );
        assert!(matches!(
            cat.enroll_device(Id::of(b"other"), 5_000, &device("d", b"d"))
                .await,
            Err(CatalogError::TokenUnknown)
        ));
        cat.create_token(Id::of(b"old"), 5, 1_000).await.unwrap();
        assert!(matches!(
            cat.enroll_device(Id::of(b"old"), 5_000, &device("e", b"e"))
                .await,
            Err(CatalogError::TokenExpired)
        ));
        let found = cat
            .device_by_fingerprint(Id::of(b"b"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found, device("b", b"b"));
        assert!(
            cat.device_by_fingerprint(Id::of(b"c"))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn blob_index_packs_files_and_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let cat = open(&dir).await;
        // Enough ids to cross a lookup batch.
        let entries: Vec<PackEntry> = (0..1200u32)
            .map(|i| entry(&i.to_le_bytes(), 8 + u64::from(i) * 4))
            .collect();
        let pack = PackRecord {
            id: Id::of(b"pack"),
            volume: dir.path().join("vol"),
            size: 9999,
            blob_count: entries.len() as u64,
            created: crate::clock::rfc3339_ms(0),
        };
        cat.insert_pack(&pack, &entries).await.unwrap();
        // Inserting again (a concurrent upload of the same blobs) is harmless.
        cat.insert_pack(&pack, &entries[..10]).await.unwrap();

        let unknown = Id::of(b"unknown");
        let mut ask: Vec<Id> = entries.iter().map(|e| e.id).collect();
        ask.insert(700, unknown);
        assert_eq!(cat.missing_blobs(&ask).await.unwrap(), vec![unknown]);

        let file = Id::of(b"whole file");
        assert_eq!(
            cat.missing_objects_held("dev1", &[file, entries[3].id], 5)
                .await
                .unwrap(),
            vec![file]
        );
        cat.record_verified(&[], &[file]).await.unwrap();
        assert!(
            cat.missing_objects_held("dev1", &[file], 6)
                .await
                .unwrap()
                .is_empty()
        );
        // What was found present is held for the device, in order.
        let holds = cat.holds_page(0, 0, 10).await.unwrap();
        assert_eq!(
            holds.iter().map(|h| h.1).collect::<Vec<_>>(),
            vec![entries[3].id, file]
        );
        assert_eq!(cat.missing_blobs(&[file]).await.unwrap(), vec![file]);

        let located = cat
            .locate_blobs(&[entries[1000].id, unknown])
            .await
            .unwrap();
        let loc = located[0].as_ref().unwrap();
        assert_eq!(
            (loc.pack, &loc.volume, loc.entry),
            (pack.id, &pack.volume, entries[1000])
        );
        assert!(located[1].is_none());

        assert_eq!(cat.packs_page(None, 10).await.unwrap(), vec![pack.clone()]);
        assert!(cat.packs_page(Some(pack.id), 10).await.unwrap().is_empty());
        let mut seen = 0;
        let mut after = None;
        loop {
            let page = cat.pack_blobs_page(pack.id, after, 500).await.unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.offset);
            assert_eq!(page[0], entries[seen]);
            seen += page.len();
        }
        assert_eq!(seen, entries.len());
        assert!(cat.orphan_blobs_page(None, 10).await.unwrap().is_empty());

        let tree = Id::of(b"tree");
        assert!(!cat.tree_complete(tree).await.unwrap());
        cat.record_verified(&[tree], &[]).await.unwrap();
        cat.record_verified(&[tree], &[]).await.unwrap();
        assert!(cat.tree_complete(tree).await.unwrap());
        let other = Id::of(b"other tree");
        assert_eq!(
            cat.incomplete_trees(&[tree, other]).await.unwrap(),
            vec![other]
        );

        cat.create_token(Id::of(b"t"), 1, i64::MAX).await.unwrap();
        cat.enroll_device(Id::of(b"t"), 0, &device("dev1", b"fp"))
            .await
            .unwrap();
        let snap = |id: &str| SnapshotInfo {
            id: id.into(),
            device_id: "dev1".into(),
            root: tree,
            created: crate::clock::rfc3339_ms(1),
            reason: "manual".into(),
            stats: SnapshotStats {
                files: u64::MAX,
                dirs: 2,
                bytes: 3,
                bytes_sent: 4,
                new_chunks: 5,
            },
            pinned: None,
        };
        // Listing is in commit order even if ids were to sort differently.
        cat.insert_snapshot(&snap("b")).await.unwrap();
        cat.insert_snapshot(&snap("a")).await.unwrap();
        let listed = cat.device_snapshots("dev1").await.unwrap();
        assert_eq!(listed, vec![snap("b"), snap("a")]);
        assert!(cat.device_snapshots("nobody").await.unwrap().is_empty());
        assert_eq!(
            cat.snapshots_page(Some("a"), 10).await.unwrap(),
            vec![snap("b")]
        );
        // A snapshot of an unknown device is refused by the schema.
        let mut stray = snap("c");
        stray.device_id = "ghost".into();
        assert!(cat.insert_snapshot(&stray).await.is_err());
    }

    #[tokio::test]
    async fn a_second_process_can_open_the_same_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(&dir).await;
        let second = SqliteCatalog::open(&dir.path().join("catalog.sqlite"), false)
            .await
            .unwrap();
        second
            .create_token(Id::of(b"x"), 1, i64::MAX)
            .await
            .unwrap();
        first
            .enroll_device(Id::of(b"x"), 0, &device("d", b"d"))
            .await
            .unwrap();
        assert!(
            SqliteCatalog::open(&dir.path().join("absent.sqlite"), false)
                .await
                .is_err()
        );
    }
}
