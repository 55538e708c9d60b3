//! The event log in SQLite (migration `20261126000002_events.sql`).

use morgana_core::Id;
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, QueryBuilder, Row, Sqlite};

use super::{SqliteCatalog, id_col, q};
use crate::catalog::{CatalogError, Result};
use crate::events::{ChainCheck, Event, EventFilter, NewEvent, Severity};

const COLUMNS: &str = "seq, at_ms, kind, severity, actor, device_id, message, hash";
/// Events re-hashed per query while verifying.
const VERIFY_PAGE: i64 = 2000;

fn event_from_row(row: &SqliteRow) -> Result<Event> {
    let severity: String = row.try_get("severity").map_err(q("reading a row"))?;
    let severity = severity
        .parse::<Severity>()
        .map_err(|detail| CatalogError::Corrupt {
            what: "event",
            detail,
        })?;
    Ok(Event {
        seq: row.try_get("seq").map_err(q("reading a row"))?,
        event: NewEvent {
            at_ms: row.try_get("at_ms").map_err(q("reading a row"))?,
            kind: row.try_get("kind").map_err(q("reading a row"))?,
            severity,
            actor: row.try_get("actor").map_err(q("reading a row"))?,
            device_id: row.try_get("device_id").map_err(q("reading a row"))?,
            message: row.try_get("message").map_err(q("reading a row"))?,
        },
        hash: id_col(row, "hash", "event")?,
    })
}

impl SqliteCatalog {
    pub(super) async fn events_record(&self, event: &NewEvent) -> Result<Event> {
        const DOING: &str = "recording an event";
        // IMMEDIATE: two writers must not chain from the same predecessor.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(q(DOING))?;
        let prev = sqlx::query("SELECT hash FROM events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *tx)
            .await
            .map_err(q(DOING))?;
        let prev = match prev {
            Some(row) => id_col(&row, "hash", "event")?,
            None => Id([0; 32]),
        };
        let hash = event.chain_hash(&prev);
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO events (at_ms, kind, severity, actor, device_id, message, hash) \
             VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {COLUMNS}"
        )))
        .bind(event.at_ms)
        .bind(&event.kind)
        .bind(event.severity.name())
        .bind(&event.actor)
        .bind(&event.device_id)
        .bind(&event.message)
        .bind(hash.0.to_vec())
        .fetch_one(&mut *tx)
        .await
        .map_err(q(DOING))?;
        let recorded = event_from_row(&row)?;
        tx.commit().await.map_err(q(DOING))?;
        Ok(recorded)
    }

    pub(super) async fn events_page_query(
        &self,
        filter: &EventFilter,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Event>> {
        let mut query: QueryBuilder<Sqlite> =
            QueryBuilder::new(format!("SELECT {COLUMNS} FROM events WHERE 1 = 1"));
        if let Some(device) = &filter.device_id {
            query.push(" AND device_id = ").push_bind(device.clone());
        }
        if let Some(prefix) = &filter.kind_prefix {
            // substr instead of LIKE: kinds may hold `_` or `%`.
            query
                .push(" AND substr(kind, 1, ")
                .push_bind(prefix.len() as i64)
                .push(") = ")
                .push_bind(prefix.clone());
        }
        if let Some(min) = filter.min_severity {
            let allowed: &[&str] = match min {
                Severity::Info => &["info", "warning", "error"],
                Severity::Warning => &["warning", "error"],
                Severity::Error => &["error"],
            };
            query.push(" AND severity IN (");
            let mut list = query.separated(", ");
            for s in allowed {
                list.push_bind(*s);
            }
            query.push(")");
        }
        if let Some(before) = before_seq {
            query.push(" AND seq < ").push_bind(before);
        }
        query
            .push(" ORDER BY seq DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows = query
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(q("listing events"))?;
        rows.iter().map(event_from_row).collect()
    }

    pub(super) async fn events_verify(&self) -> Result<ChainCheck> {
        let mut prev = Id([0; 32]);
        let mut after = 0i64;
        let mut checked = 0u64;
        loop {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?"
            )))
            .bind(after)
            .bind(VERIFY_PAGE)
            .fetch_all(&self.pool)
            .await
            .map_err(q("verifying the event chain"))?;
            if rows.is_empty() {
                return Ok(ChainCheck::Intact { events: checked });
            }
            for row in &rows {
                let event = event_from_row(row)?;
                if event.event.chain_hash(&prev) != event.hash {
                    return Ok(ChainCheck::BrokenAt {
                        seq: event.seq,
                        events_before: checked,
                    });
                }
                prev = event.hash;
                after = event.seq;
                checked += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;

    fn event(i: i64, device: Option<&str>, kind: &str, severity: Severity) -> NewEvent {
        NewEvent {
            at_ms: 1_000 + i,
            kind: kind.into(),
            severity,
            actor: "system".into(),
            device_id: device.map(str::to_owned),
            message: format!("event {i}"),
        }
    }

    #[tokio::test]
    async fn events_filter_page_and_show_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let cat = SqliteCatalog::open(&dir.path().join("catalog.sqlite"), true)
            .await
            .unwrap();
        for i in 0..5 {
            cat.record_event(&event(i, Some("d1"), "job.failed", Severity::Error))
                .await
                .unwrap();
            cat.record_event(&event(i, None, "gc.finished", Severity::Info))
                .await
                .unwrap();
        }
        assert_eq!(
            cat.verify_events().await.unwrap(),
            ChainCheck::Intact { events: 10 }
        );
        let filter = EventFilter {
            device_id: Some("d1".into()),
            ..Default::default()
        };
        let first = cat.events_page(&filter, None, 3).await.unwrap();
        assert_eq!(first.len(), 3);
        assert!(first.windows(2).all(|w| w[0].seq > w[1].seq));
        let rest = cat
            .events_page(&filter, Some(first[2].seq), 10)
            .await
            .unwrap();
        assert_eq!(rest.len(), 2);
        let errors = EventFilter {
            min_severity: Some(Severity::Warning),
            ..Default::default()
        };
        assert_eq!(cat.events_page(&errors, None, 100).await.unwrap().len(), 5);
        let gc = EventFilter {
            kind_prefix: Some("gc.".into()),
            ..Default::default()
        };
        assert_eq!(cat.events_page(&gc, None, 100).await.unwrap().len(), 5);

        sqlx::query("UPDATE events SET message = 'nothing happened' WHERE seq = 4")
            .execute(&cat.pool)
            .await
            .unwrap();
        assert_eq!(
            cat.verify_events().await.unwrap(),
            ChainCheck::BrokenAt {
                seq: 4,
                events_before: 3
            }
        );
    }
}
