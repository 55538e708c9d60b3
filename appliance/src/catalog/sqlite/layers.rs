//! Reference machines and layers in SQLite (migration `20261126000006_layers.sql`).

use morgana_core::Id;
use morgana_core::plugin::types::LayerKind;
use morgana_core::varint;
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Row};

use super::{SqliteCatalog, device_from_row, id_col, q, u32_col, u64_col};
use crate::catalog::{CatalogError, Device, LayerRecord, NewLayer, Result};

const COLUMNS: &str = "seq, name, version, kind, notes, source_device, snapshot, \
                       before_snapshot, root, deletions, files, bytes, created, created_by";
const DEVICE_COLUMNS: &str = "id, hostname, cert_fingerprint, created, revoked";

fn kind_name(kind: LayerKind) -> &'static str {
    match kind {
        LayerKind::Base => "base",
        LayerKind::App => "app",
    }
}

/// A count, then each path length-prefixed: a cut anywhere shows.
fn encode_paths(paths: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    varint::put(&mut out, paths.len() as u64);
    for p in paths {
        varint::put_bytes(&mut out, p);
    }
    out
}

fn decode_paths(bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut r = varint::Reader::new(bytes);
    let count = r.varint("deleted path count").ok()?;
    let mut out = Vec::new();
    for _ in 0..count {
        out.push(r.bytes(usize::MAX, "deleted path").ok()?.to_vec());
    }
    r.is_empty().then_some(out)
}

fn layer_from_row(row: &SqliteRow) -> Result<LayerRecord> {
    let bad = |detail: String| CatalogError::Corrupt {
        what: "layer record",
        detail,
    };
    let kind: String = row.try_get("kind").map_err(q("reading a row"))?;
    let kind = match kind.as_str() {
        "base" => LayerKind::Base,
        "app" => LayerKind::App,
        other => return Err(bad(format!("kind {other:?}"))),
    };
    let deletions: Vec<u8> = row.try_get("deletions").map_err(q("reading a row"))?;
    Ok(LayerRecord {
        seq: row.try_get("seq").map_err(q("reading a row"))?,
        version: u32_col(row, "version", "layer record")?,
        layer: NewLayer {
            name: row.try_get("name").map_err(q("reading a row"))?,
            kind,
            notes: row.try_get("notes").map_err(q("reading a row"))?,
            source_device: row.try_get("source_device").map_err(q("reading a row"))?,
            snapshot: row.try_get("snapshot").map_err(q("reading a row"))?,
            before_snapshot: row.try_get("before_snapshot").map_err(q("reading a row"))?,
            root: id_col(row, "root", "layer record")?,
            deletions: decode_paths(&deletions)
                .ok_or_else(|| bad("its deletion list is truncated".into()))?,
            files: u64_col(row, "files")?,
            bytes: u64_col(row, "bytes")?,
            created: row.try_get("created").map_err(q("reading a row"))?,
            created_by: row.try_get("created_by").map_err(q("reading a row"))?,
        },
    })
}

impl SqliteCatalog {
    pub(super) async fn devices_set_reference(&self, id: &str, reference: bool) -> Result<bool> {
        const DOING: &str = "marking a reference machine";
        let mut tx = self.write_tx(DOING).await?;
        let done = sqlx::query("UPDATE devices SET reference = ? WHERE id = ?")
            .bind(i64::from(reference))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(q(DOING))?;
        tx.commit().await.map_err(q(DOING))?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn devices_references(&self) -> Result<Vec<Device>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE reference = 1 ORDER BY id"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing reference machines"))?;
        rows.iter().map(device_from_row).collect()
    }

    pub(super) async fn layers_insert(&self, layer: &NewLayer) -> Result<LayerRecord> {
        const DOING: &str = "recording a layer";
        // The write transaction serialises versions of one name.
        let mut tx = self.write_tx(DOING).await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO layers (name, version, kind, notes, source_device, snapshot, \
                                 before_snapshot, root, deletions, files, bytes, created, created_by) \
             VALUES (?1, (SELECT COALESCE(MAX(version), 0) + 1 FROM layers WHERE name = ?1), \
                     ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
             RETURNING {COLUMNS}"
        )))
        .bind(&layer.name)
        .bind(kind_name(layer.kind))
        .bind(&layer.notes)
        .bind(&layer.source_device)
        .bind(&layer.snapshot)
        .bind(&layer.before_snapshot)
        .bind(layer.root.0.to_vec())
        .bind(encode_paths(&layer.deletions))
        .bind(layer.files as i64)
        .bind(layer.bytes as i64)
        .bind(&layer.created)
        .bind(&layer.created_by)
        .fetch_one(&mut *tx)
        .await
        .map_err(q(DOING))?;
        let record = layer_from_row(&row)?;
        tx.commit().await.map_err(q(DOING))?;
        Ok(record)
    }

    pub(super) async fn layers_all(&self) -> Result<Vec<LayerRecord>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM layers ORDER BY name, version"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing layers"))?;
        rows.iter().map(layer_from_row).collect()
    }

    pub(super) async fn layers_one(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<LayerRecord>> {
        let row = self
            .versioned_row("layers", COLUMNS, name, version, "looking up a layer")
            .await?;
        row.as_ref().map(layer_from_row).transpose()
    }

    pub(super) async fn layers_roots_page(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<(i64, Id)>> {
        self.roots_page("layers", after_seq, limit, "layer record")
            .await
    }
}

/// Lookups shared by the tables of named, versioned roots (layers, driver sets): each has
/// `seq`, `name`, `version` and `root` columns.
impl SqliteCatalog {
    /// Version `version` of `name`, or its newest.
    pub(super) async fn versioned_row(
        &self,
        table: &'static str,
        columns: &'static str,
        name: &str,
        version: Option<u32>,
        doing: &'static str,
    ) -> Result<Option<SqliteRow>> {
        let query = match version {
            Some(_) => format!("SELECT {columns} FROM {table} WHERE name = ? AND version = ?"),
            None => {
                format!(
                    "SELECT {columns} FROM {table} WHERE name = ? ORDER BY version DESC LIMIT 1"
                )
            }
        };
        let mut query = sqlx::query(AssertSqlSafe(query)).bind(name.to_owned());
        if let Some(v) = version {
            query = query.bind(i64::from(v));
        }
        query.fetch_optional(&self.pool).await.map_err(q(doing))
    }

    /// `(seq, root)` of the rows with `seq > after_seq`, in seq order: GC roots.
    pub(super) async fn roots_page(
        &self,
        table: &'static str,
        after_seq: i64,
        limit: u32,
        what: &'static str,
    ) -> Result<Vec<(i64, Id)>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT seq, root FROM {table} WHERE seq > ? ORDER BY seq LIMIT ?"
        )))
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing gc roots"))?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("seq").map_err(q("reading a row"))?,
                    id_col(row, "root", what)?,
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletion_lists_round_trip() {
        let paths = vec![b"/usr/bin/old".to_vec(), vec![0xff, b'/', 0], Vec::new()];
        assert_eq!(decode_paths(&encode_paths(&paths)), Some(paths.clone()));
        let whole = encode_paths(&paths);
        for cut in 0..whole.len() {
            assert_eq!(decode_paths(&whole[..cut]), None, "cut at {cut}");
        }
        assert_eq!(decode_paths(&encode_paths(&[])), Some(Vec::new()));
    }
}
