//! Jobs for agents: queuing one (CLI, web UI, API) and describing them to people. The
//! agent side of the protocol is in `api::control`; storage is the catalog's.

use morgana_core::control::{JobKind, RestoreScope};

use crate::catalog::{Catalog, JobRecord, Result};
use crate::events::{NewEvent, Severity};

/// Stores a queued job for `device_id` and records who queued it. A running `serve` finds
/// it within a second (its sweeper wakes the device's waiting poll); `api::control::queue`
/// also wakes the poll at once when the job is queued inside the serving process.
pub async fn queue(
    catalog: &dyn Catalog,
    device_id: &str,
    kind: JobKind,
    created_by: &str,
) -> Result<JobRecord> {
    let job = JobRecord::queued(device_id, kind, created_by, crate::clock::now_ms());
    catalog.queue_job(&job).await?;
    crate::events::record(
        catalog,
        NewEvent::system(
            "job.queued",
            Severity::Info,
            format!("job {} queued: {}", job.id, describe(&job.kind)),
        )
        .for_device(device_id)
        .by(created_by),
    )
    .await;
    Ok(job)
}

/// One line for a person: `sync`, `restore of /home/a from snapshot S to /srv/x`, …
pub fn describe(kind: &JobKind) -> String {
    match kind {
        JobKind::Sync => "sync now".into(),
        JobKind::Restore(r) => {
            let from = if r.source_device.is_empty() {
                format!("snapshot {}", r.snapshot)
            } else {
                format!("snapshot {} of device {}", r.snapshot, r.source_device)
            };
            let to = match &r.target {
                Some(t) => format!(" into {t}"),
                None => " in place".into(),
            };
            match &r.scope {
                RestoreScope::Full => format!("full revert to {from}"),
                RestoreScope::SystemOnly => {
                    format!("system-only revert to {from} (user data kept)")
                }
                RestoreScope::Paths { paths } => {
                    format!("restore of {} from {from}{to}", paths.join(", "))
                }
            }
        }
        JobKind::ApplyLayers(a) => {
            let mut layers = format!("{} v{}", a.base.name, a.base.version);
            for app in &a.apps {
                layers.push_str(&format!(" + {} v{}", app.name, app.version));
            }
            format!("apply layers {layers}")
        }
        JobKind::RollbackLayers(r) => {
            format!("layer rollback to snapshot {} (user data kept)", r.snapshot)
        }
    }
}
