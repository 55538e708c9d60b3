//! The event log in SQLite (migration `20261126000002_events.sql`).

use morgana_core::Id;
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, QueryBuilder, Row, Sqlite};

use super::{SqliteCatalog, id_col, q};
use crate::catalog::{CatalogError, Result};
use crate::events::{ChainAnchor, ChainCheck, Event, EventFilter, NewEvent, Severity};

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
        let mut tx = self.write_tx(DOING).await?;
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

    pub(super) async fn events_verify(
        &self,
        from: Option<ChainAnchor>,
    ) -> Result<(ChainCheck, Option<ChainAnchor>)> {
        const DOING: &str = "verifying the event chain";
        let (mut prev, mut after, mut checked) = (Id([0; 32]), 0i64, 0u64);
        if let Some(anchor) = from {
            let stored: Option<Vec<u8>> =
                sqlx::query_scalar("SELECT hash FROM events WHERE seq = ?")
                    .bind(anchor.seq)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(q(DOING))?;
            if stored.as_deref() != Some(&anchor.hash.0[..]) {
                // The chain up to the anchor was rewritten (or cut) since it was checked.
                return Ok((
                    ChainCheck::BrokenAt {
                        seq: anchor.seq,
                        events_before: anchor.events.saturating_sub(1),
                    },
                    None,
                ));
            }
            (prev, after, checked) = (anchor.hash, anchor.seq, anchor.events);
        }
        let anchor = |hash, seq, events| (events > 0).then_some(ChainAnchor { seq, hash, events });
        loop {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?"
            )))
            .bind(after)
            .bind(VERIFY_PAGE)
            .fetch_all(&self.pool)
            .await
            .map_err(q(DOING))?;
            if rows.is_empty() {
                return Ok((
                    ChainCheck::Intact { events: checked },
                    anchor(prev, after, checked),
                ));
            }
            for row in &rows {
                let event = event_from_row(row)?;
                if event.event.chain_hash(&prev) != event.hash {
                    return Ok((
                        ChainCheck::BrokenAt {
                            seq: event.seq,
                            events_before: checked,
                        },
                        None,
                    ));
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

        // A check from an anchor re-hashes only what came after it, and sees a rewrite of the
        // chain before it through the anchor's own hash.
        let (check, anchor) = cat.verify_events_from(None).await.unwrap();
        assert_eq!(check, ChainCheck::Intact { events: 10 });
        let anchor = anchor.unwrap();
        assert_eq!((anchor.seq, anchor.events), (10, 10));
        cat.record_event(&event(99, None, "gc.finished", Severity::Info))
            .await
            .unwrap();
        let (check, next) = cat.verify_events_from(Some(anchor)).await.unwrap();
        assert_eq!(check, ChainCheck::Intact { events: 11 });
        assert_eq!(next.unwrap().seq, 11);
        sqlx::query("UPDATE events SET hash = zeroblob(32) WHERE seq = 10")
            .execute(&cat.writer)
            .await
            .unwrap();
        assert_eq!(
            cat.verify_events_from(Some(anchor)).await.unwrap().0,
            ChainCheck::BrokenAt {
                seq: 10,
                events_before: 9
            }
        );

        sqlx::query("UPDATE events SET message = 'nothing happened' WHERE seq = 4")
            .execute(&cat.writer)
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
