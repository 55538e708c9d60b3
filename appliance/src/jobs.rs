//! Jobs for agents: queuing one (CLI, web UI, API) and describing them to people. The
//! agent side of the protocol is in `api::control`; storage is the catalog's.

use morgana_core::control::{JobKind, RestoreJob, RestoreScope};
use morgana_core::policy::{Area, Standing};
use morgana_core::tree::{Content, Kind};
use tracing::warn;

use crate::catalog::{Catalog, JobRecord, Result};
use crate::events::{NewEvent, Severity};
use crate::store::{TreeLoadError, Visit, load_tree, walk_tree};

/// Entries a restore's totals count at most; a bigger restore shows progress without them.
const MAX_COUNTED: u64 = 5_000_000;

/// Stores a queued job for `device_id` and records who queued it. A running `serve` finds
/// it within a second (its sweeper wakes the device's waiting poll); `api::control::queue`
/// also wakes the poll at once when the job is queued inside the serving process.
pub async fn queue(
    catalog: &dyn Catalog,
    device_id: &str,
    kind: JobKind,
    created_by: &str,
) -> Result<JobRecord> {
    let mut job = JobRecord::queued(device_id, kind, created_by, crate::clock::now_ms());
    if let JobKind::Restore(r) = &job.kind {
        match restore_totals(catalog, device_id, r).await {
            Ok(Some((files, bytes))) => {
                job.progress.files_total = files;
                job.progress.bytes_total = bytes;
            }
            Ok(None) => {}
            // The agent reports the real trouble (a missing tree, say) when it runs the job.
            Err(e) => warn!(job = %job.id, "cannot count the restore's files: {e}"),
        }
    }
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

/// The regular files and their bytes a restore writes, read from the stored trees, so its
/// progress can say "n of m". `None` when there are more than [`MAX_COUNTED`] entries.
async fn restore_totals(
    catalog: &dyn Catalog,
    device_id: &str,
    r: &RestoreJob,
) -> std::result::Result<Option<(u64, u64)>, TotalsError> {
    let mut totals = Totals::default();
    match &r.scope {
        RestoreScope::Full => totals.walk(catalog, Vec::new(), r.root, None).await?,
        RestoreScope::SystemOnly => {
            let policy = catalog.device_policy(device_id).await?;
            let user_area = Area::compile(&policy.spec.user_area)?;
            totals
                .walk(catalog, Vec::new(), r.root, Some(&user_area))
                .await?
        }
        RestoreScope::Paths { paths } => {
            for path in paths {
                let Some(entry) = entry_at(catalog, r.root, path).await? else {
                    continue;
                };
                match (entry.kind, entry.content) {
                    (Some(Kind::Dir), Content::Tree(id)) => {
                        let at = path.trim_end_matches('/').as_bytes().to_vec();
                        totals.walk(catalog, at, id, None).await?
                    }
                    (Some(Kind::File), _) => totals.file(entry.size),
                    _ => {}
                }
            }
        }
    }
    Ok((totals.entries <= MAX_COUNTED).then_some((totals.files, totals.bytes)))
}

#[derive(Default)]
struct Totals {
    files: u64,
    bytes: u64,
    entries: u64,
}

impl Totals {
    fn file(&mut self, size: u64) {
        self.files += 1;
        self.bytes += size;
    }

    /// Counts the files below the tree `id` found at the absolute path `at` (`/` is empty),
    /// leaving out those in `skip`.
    async fn walk(
        &mut self,
        catalog: &dyn Catalog,
        at: Vec<u8>,
        id: morgana_core::Id,
        skip: Option<&Area>,
    ) -> std::result::Result<(), TotalsError> {
        let start = match skip {
            Some(area) if !at.is_empty() => area.standing(&at),
            _ => Standing::default(),
        };
        walk_tree(catalog, id, start, |parent, path, e| {
            self.entries += 1;
            if self.entries > MAX_COUNTED {
                return Visit::Stop;
            }
            let standing = skip.map_or(Standing::default(), |a| a.child(*parent, path));
            if standing.in_area() {
                return Visit::Skip;
            }
            match e.kind {
                Some(Kind::Dir) => return Visit::Enter(standing),
                Some(Kind::File) => self.file(e.size),
                _ => {}
            }
            Visit::Skip
        })
        .await?;
        Ok(())
    }
}

/// The entry at the absolute `path` of the tree `root`; `None` if there is none.
async fn entry_at(
    catalog: &dyn Catalog,
    root: morgana_core::Id,
    path: &str,
) -> std::result::Result<Option<morgana_core::tree::Entry>, TotalsError> {
    let mut names = path.split('/').filter(|c| !c.is_empty()).peekable();
    let mut tree = root;
    while let Some(name) = names.next() {
        let entries = load_tree(catalog, tree).await?.entries;
        let Some(e) = entries.into_iter().find(|e| e.name == name.as_bytes()) else {
            return Ok(None);
        };
        if names.peek().is_none() {
            return Ok(Some(e));
        }
        let Content::Tree(sub) = e.content else {
            return Ok(None);
        };
        tree = sub;
    }
    Ok(None)
}

#[derive(Debug, thiserror::Error)]
enum TotalsError {
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    Tree(#[from] TreeLoadError),
    #[error("the device's user area is unusable: {0}")]
    Area(#[from] morgana_core::policy::PolicyError),
}
