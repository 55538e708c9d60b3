//! Assigning layers to devices: what each device would get (the dry run), and the apply
//! job that makes it so.
//!
//! A device's target is base ⊕ apps (`morgana_core::image`), minus the do-not-override
//! paths. The dry run compares it with the device's newest snapshot and with what its last
//! apply put there; the job carries the layers themselves (the agent builds the same target
//! from the same trees) plus what the previous layers owned that the new ones lack.

use std::collections::{BTreeMap, HashSet};

use morgana_core::Id;
use morgana_core::control::{ApplyJob, JobKind, LayerRef, RestoreJob, RestoreScope};
use morgana_core::image::{self, Flat};
use morgana_core::plugin::types::LayerKind;
use morgana_core::tree::{Content, Kind};
use morgana_core::wire::SnapshotInfo;
use serde::Serialize;

use crate::catalog::{Assignment, Catalog, CatalogError, JobRecord, LayerPin, LayerRecord};
use crate::events::{self, NewEvent, Severity};
use crate::hooks::Hooks;
use crate::store::{PackStore, PackStoreError, TreeLoadError, load_tree, with_codec};

#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Tree(#[from] TreeLoadError),
    #[error(transparent)]
    Store(#[from] PackStoreError),
    #[error(
        "there is no layer {0}: the Images page and `morgana layer list` list them; nothing \
         was changed"
    )]
    NoLayer(String),
    #[error(
        "layer {name} is {is} layer, not {wanted} one: pass base layers with --base and app \
         layers with --app"
    )]
    WrongKind {
        name: String,
        is: &'static str,
        wanted: &'static str,
    },
    #[error("{0:?} is not an absolute path: do-not-override paths look like /etc/app.conf")]
    BadPath(String),
    #[error("reading the blob store failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot work out the device's driver sets: {0}")]
    Drivers(#[from] crate::drivers::DriverError),
    #[error(transparent)]
    Device(#[from] crate::policy::AssignError),
    #[error(
        "there is no device group {0:?}: the Images page and `morgana group list` list them; \
         nothing was changed"
    )]
    NoGroup(String),
    #[error(
        "no devices named: pick at least one device or a saved group to assign layers to; \
         nothing was changed"
    )]
    NoDevices,
    #[error(
        "group name {0:?} is not usable: 1 to 64 letters, digits, `-`, `_` or `.`; nothing \
         was changed"
    )]
    BadGroupName(String),
    #[error(
        "device {0} has no applied layers to roll back: only a device whose apply job \
         succeeded can go back; its jobs list shows what happened"
    )]
    NothingApplied(String),
    #[error(
        "device {0} has no pre-layer-update snapshot to return to: restore an older snapshot \
         with a system-only revert instead (device page, or `morgana job restore {0} \
         --snapshot S --scope system-only`)"
    )]
    NoPreUpdateSnapshot(String),
}

/// `NAME` or `NAME:VERSION`.
pub fn parse_pin(s: &str) -> Result<(String, Option<u32>), AssignError> {
    match s.rsplit_once(':') {
        Some((name, v)) => match v.parse() {
            Ok(v) => Ok((name.to_owned(), Some(v))),
            Err(_) => Err(AssignError::NoLayer(format!(
                "{s} (the version after `:` must be a number)"
            ))),
        },
        None => Ok((s.to_owned(), None)),
    }
}

/// Looks up one layer version and checks its kind.
pub async fn resolve(
    catalog: &dyn Catalog,
    name: &str,
    version: Option<u32>,
    kind: LayerKind,
) -> Result<LayerRecord, AssignError> {
    let shown = || match version {
        Some(v) => format!("{name} v{v}"),
        None => name.to_owned(),
    };
    let record = catalog
        .layer(name, version)
        .await?
        .ok_or_else(|| AssignError::NoLayer(shown()))?;
    let name_of = |k| match k {
        LayerKind::Base => "a base",
        LayerKind::App => "an app",
    };
    if record.layer.kind != kind {
        return Err(AssignError::WrongKind {
            name: shown(),
            is: name_of(record.layer.kind),
            wanted: name_of(kind),
        });
    }
    Ok(record)
}

/// The assignment's layers as records, base first.
pub async fn layers_of(
    catalog: &dyn Catalog,
    a: &Assignment,
) -> Result<(LayerRecord, Vec<LayerRecord>), AssignError> {
    let base = resolve(catalog, &a.base.name, Some(a.base.version), LayerKind::Base).await?;
    let mut apps = Vec::new();
    for p in &a.apps {
        apps.push(resolve(catalog, &p.name, Some(p.version), LayerKind::App).await?);
    }
    Ok((base, apps))
}

pub fn pin(r: &LayerRecord) -> LayerPin {
    LayerPin {
        name: r.layer.name.clone(),
        version: r.version,
    }
}

fn layer_ref(r: &LayerRecord) -> LayerRef {
    LayerRef {
        name: r.layer.name.clone(),
        version: r.version,
        root: r.layer.root,
        deletions: r.layer.deletions.clone(),
    }
}

pub fn check_paths(paths: &[String]) -> Result<(), AssignError> {
    for p in paths {
        if !p.starts_with('/') || p.contains('\0') || p.split('/').any(|c| c == "..") {
            return Err(AssignError::BadPath(p.clone()));
        }
    }
    Ok(())
}

/// The devices named (ids or hostnames) and the members of the named saved groups, each
/// once, in the order given.
pub async fn targets(
    catalog: &dyn Catalog,
    devices: &[String],
    groups: &[String],
) -> Result<Vec<String>, AssignError> {
    // Collected first: an iterator of closures held across `.await` is not `Send`.
    let devices: Vec<&str> = devices
        .iter()
        .map(|d| d.trim())
        .filter(|d| !d.is_empty())
        .collect();
    let groups: Vec<&str> = groups
        .iter()
        .map(|g| g.trim())
        .filter(|g| !g.is_empty())
        .collect();
    let mut ids: Vec<String> = Vec::new();
    for d in devices {
        let id = crate::policy::find_device(catalog, d).await?.id;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    let saved = catalog.groups().await?;
    for g in groups {
        let Some((_, members)) = saved.iter().find(|(n, _)| n == g) else {
            return Err(AssignError::NoGroup(g.to_owned()));
        };
        for id in members {
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
    }
    if ids.is_empty() {
        return Err(AssignError::NoDevices);
    }
    Ok(ids)
}

/// The assignment `base` (`NAME` or `NAME:VERSION`), `apps` (in order) and the
/// do-not-override paths describe, every layer looked up and of the right kind.
pub async fn assignment(
    catalog: &dyn Catalog,
    base: &str,
    apps: &[String],
    do_not_override: &[String],
) -> Result<Assignment, AssignError> {
    check_paths(do_not_override)?;
    let (name, version) = parse_pin(base.trim())?;
    let base = resolve(catalog, &name, version, LayerKind::Base).await?;
    let apps: Vec<&str> = apps
        .iter()
        .map(|a| a.trim())
        .filter(|a| !a.is_empty())
        .collect();
    let mut pins = Vec::new();
    for a in apps {
        let (name, version) = parse_pin(a)?;
        pins.push(pin(&resolve(catalog, &name, version, LayerKind::App).await?));
    }
    Ok(Assignment {
        base: pin(&base),
        apps: pins,
        do_not_override: do_not_override.to_vec(),
    })
}

/// The plan and dry run of `a` on each device; nothing is recorded.
pub async fn dry_runs(
    catalog: &dyn Catalog,
    ids: &[String],
    a: &Assignment,
) -> Result<Vec<(Plan, DryRun)>, AssignError> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let plan = plan(catalog, id, a).await?;
        let report = dry_run(catalog, id, &plan).await?;
        out.push((plan, report));
    }
    Ok(out)
}

/// Records `a` for the devices and queues an apply job per device (the plans from
/// [`dry_runs`]), with an audit event each.
pub async fn apply(
    catalog: &dyn Catalog,
    hooks: &Hooks,
    ids: &[String],
    a: &Assignment,
    plans: Vec<Plan>,
    actor: &str,
) -> Result<Vec<JobRecord>, AssignError> {
    let now = crate::clock::rfc3339_ms(crate::clock::now_ms());
    catalog.assign_layers(ids, a, &now, actor).await?;
    let mut jobs = Vec::with_capacity(ids.len());
    for (id, plan) in ids.iter().zip(plans) {
        events::record(
            catalog,
            NewEvent::system(
                "layer.assigned",
                Severity::Info,
                format!("layers assigned to {id}: {}", describe(a)),
            )
            .for_device(id)
            .by(actor),
        )
        .await;
        jobs.push(queue_apply(catalog, hooks, id, plan.job, actor).await?);
    }
    Ok(jobs)
}

/// `base debian v2 + app office v1, never overriding /etc/motd`.
pub fn describe(a: &Assignment) -> String {
    let mut s = format!("base {} v{}", a.base.name, a.base.version);
    for app in &a.apps {
        s.push_str(&format!(" + app {} v{}", app.name, app.version));
    }
    if !a.do_not_override.is_empty() {
        s.push_str(&format!(
            ", never overriding {}",
            a.do_not_override.join(", ")
        ));
    }
    s
}

/// Queues the job that returns `device_id` to its newest pre-layer-update snapshot's
/// system state (user data written since stays).
pub async fn rollback(
    catalog: &dyn Catalog,
    device_id: &str,
    actor: &str,
) -> Result<JobRecord, AssignError> {
    if catalog.applied_layers(device_id).await?.is_none() {
        return Err(AssignError::NothingApplied(device_id.to_owned()));
    }
    let Some(snapshot) = pre_update_snapshot(catalog, device_id).await? else {
        return Err(AssignError::NoPreUpdateSnapshot(device_id.to_owned()));
    };
    Ok(crate::jobs::queue(
        catalog,
        device_id,
        JobKind::RollbackLayers(RestoreJob {
            snapshot: snapshot.id.clone(),
            source_device: device_id.to_owned(),
            root: snapshot.root,
            scope: RestoreScope::SystemOnly,
            target: None,
            drivers: Vec::new(),
        }),
        actor,
    )
    .await?)
}

/// The snapshot a rollback returns to: the newest one an apply took first.
pub async fn pre_update_snapshot(
    catalog: &dyn Catalog,
    device_id: &str,
) -> Result<Option<SnapshotInfo>, AssignError> {
    Ok(catalog
        .device_snapshots(device_id)
        .await?
        .into_iter()
        .rev()
        .find(|s| s.reason == "pre-layer-update"))
}

/// Creates or replaces saved group `name` (device ids or hostnames, each once), with an
/// audit event. Returns the device ids.
pub async fn save_group(
    catalog: &dyn Catalog,
    name: &str,
    devices: &[String],
    actor: &str,
) -> Result<Vec<String>, AssignError> {
    let usable = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !usable {
        return Err(AssignError::BadGroupName(name.to_owned()));
    }
    let ids = targets(catalog, devices, &[]).await?;
    catalog
        .save_group(
            name,
            &ids,
            &crate::clock::rfc3339_ms(crate::clock::now_ms()),
            actor,
        )
        .await?;
    events::record(
        catalog,
        NewEvent::system(
            "group.saved",
            Severity::Info,
            format!("device group {name} saved: {}", ids.join(", ")),
        )
        .by(actor),
    )
    .await;
    Ok(ids)
}

/// Every entry below `root`, by absolute path.
pub async fn flatten(catalog: &dyn Catalog, root: Id) -> Result<Flat, AssignError> {
    let mut flat = Flat::new();
    let mut stack = vec![(root, Vec::new())];
    while let Some((id, dir)) = stack.pop() {
        for entry in load_tree(catalog, id).await?.entries {
            let path = image::child_path(&dir, &entry.name);
            if let (Some(Kind::Dir), Content::Tree(sub)) = (entry.kind, &entry.content) {
                stack.push((*sub, path.clone()));
            }
            flat.insert(path, entry);
        }
    }
    Ok(flat)
}

/// The image an apply job makes of the layers (the same steps the agent takes), and the
/// do-not-override paths the layers would have written.
pub async fn target_of(
    catalog: &dyn Catalog,
    job: &ApplyJob,
) -> Result<(Flat, Vec<Vec<u8>>), AssignError> {
    let base = flatten(catalog, job.base.root).await?;
    let mut apps = Vec::new();
    for app in &job.apps {
        apps.push((flatten(catalog, app.root).await?, app.deletions.as_slice()));
    }
    Ok(image::target(base, apps, &job.do_not_override))
}

/// An apply job with what the dry run compares.
pub struct Plan {
    pub job: ApplyJob,
    /// What the layers make of the device (do-not-override paths left out).
    pub target: Flat,
    /// What the previously applied layers made of it.
    pub previous: Option<Flat>,
    /// Do-not-override paths the layers have.
    pub kept: Vec<Vec<u8>>,
}

/// The apply job for a device: its assignment's layers, and what its previous layers own
/// that the new ones lack (or remove).
pub async fn plan(
    catalog: &dyn Catalog,
    device_id: &str,
    a: &Assignment,
) -> Result<Plan, AssignError> {
    let (base, apps) = layers_of(catalog, a).await?;
    let mut job = ApplyJob {
        base: layer_ref(&base),
        apps: apps.iter().map(layer_ref).collect(),
        do_not_override: a
            .do_not_override
            .iter()
            .map(|p| p.trim_end_matches('/').as_bytes().to_vec())
            .collect(),
        remove: Vec::new(),
        drivers: Vec::new(),
        hostname: String::new(),
    };
    let (target, kept) = target_of(catalog, &job).await?;
    let previous = match catalog.applied_layers(device_id).await? {
        Some(applied) => Some(target_of(catalog, &applied.applied).await?.0),
        None => None,
    };
    let protected = |p: &[u8]| job.do_not_override.iter().any(|d| image::is_within(p, d));
    let mut remove: Vec<Vec<u8>> = Vec::new();
    if let Some(old) = &previous {
        remove.extend(
            old.keys()
                .filter(|p| !target.contains_key(*p) && !protected(p))
                .cloned(),
        );
    }
    for app in &job.apps {
        remove.extend(
            app.deletions
                .iter()
                .filter(|p| !target.contains_key(*p) && !protected(p))
                .cloned(),
        );
    }
    remove.sort();
    remove.dedup();
    // A removed folder takes what is below it: listing those too is redundant.
    let mut top: Vec<Vec<u8>> = Vec::new();
    for p in remove {
        if !top.last().is_some_and(|t| image::is_within(&p, t)) {
            top.push(p);
        }
    }
    job.remove = top;
    Ok(Plan {
        job,
        target,
        previous,
        kept,
    })
}

/// Queues `job` (a [`plan`]'s) for `device_id`, with what only the queuing moment knows:
/// the device's matching driver sets (a base-layer update brings the drivers its hardware
/// needs, written in the same apply) and its enrolled hostname (for a device that has none
/// yet). Every path that queues an apply goes through here.
pub async fn queue_apply(
    catalog: &dyn Catalog,
    hooks: &Hooks,
    device_id: &str,
    mut job: ApplyJob,
    actor: &str,
) -> Result<JobRecord, AssignError> {
    job.drivers = crate::drivers::job_deliveries(catalog, hooks, device_id).await?;
    job.hostname = catalog
        .device_status(device_id)
        .await?
        .map(|s| s.device.hostname)
        .unwrap_or_default();
    Ok(crate::jobs::queue(
        catalog,
        device_id,
        morgana_core::control::JobKind::ApplyLayers(job),
        actor,
    )
    .await?)
}

/// What applying would do to one device.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DryRun {
    pub device: String,
    /// The snapshot compared with; `None` when the device has none (everything is added).
    pub snapshot: Option<String>,
    pub add: Vec<String>,
    pub replace: Vec<String>,
    pub remove: Vec<String>,
    /// Paths the layers would change that are on the do-not-override list.
    pub kept: Vec<String>,
    /// Raw bytes of chunks the device's snapshot does not hold.
    pub download_bytes: u64,
    pub conflicts: Vec<Conflict>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Conflict {
    pub path: String,
    /// `user-changed`, `older-file` or `package-downgrade`.
    pub kind: &'static str,
    pub detail: String,
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Compares the device's newest snapshot with the target of `job`.
pub async fn dry_run(
    catalog: &dyn Catalog,
    device_id: &str,
    plan: &Plan,
) -> Result<DryRun, AssignError> {
    let (job, target, previous) = (&plan.job, &plan.target, plan.previous.as_ref());
    let snapshot = catalog.device_snapshots(device_id).await?.pop();
    let device = match &snapshot {
        Some(s) => flatten(catalog, s.root).await?,
        None => Flat::new(),
    };
    let mut out = DryRun {
        device: device_id.to_owned(),
        snapshot: snapshot.map(|s| s.id),
        ..DryRun::default()
    };
    let held: HashSet<Id> = device
        .values()
        .filter_map(|e| match &e.content {
            Content::Chunks { chunks, .. } => Some(chunks.iter().copied()),
            _ => None,
        })
        .flatten()
        .collect();
    let mut wanted: Vec<Id> = Vec::new();
    let mut seen = HashSet::new();
    out.kept = plan.kept.iter().map(|p| show(p)).collect();
    for (path, entry) in target {
        if entry.kind == Some(Kind::Dir) {
            if !device.contains_key(path) {
                out.add.push(show(path));
            }
            continue;
        }
        let had = device.get(path);
        match had {
            None => out.add.push(show(path)),
            Some(h) if image::same_content(h, entry) => continue,
            Some(h) => {
                out.replace.push(show(path));
                let expected = previous.and_then(|p| p.get(path));
                let user_changed = match expected {
                    Some(e) => !image::same_content(e, h),
                    None => true,
                };
                if user_changed {
                    out.conflicts.push(Conflict {
                        path: show(path),
                        kind: "user-changed",
                        detail: match expected {
                            Some(_) => "differs from what the applied layers put there".into(),
                            None => "exists on the device with other content".into(),
                        },
                    });
                }
                if entry.kind == Some(Kind::File)
                    && h.kind == Some(Kind::File)
                    && entry.mtime_ns < h.mtime_ns
                    && path.as_slice() != morgana_core::dpkg::STATUS_PATH
                {
                    out.conflicts.push(Conflict {
                        path: show(path),
                        kind: "older-file",
                        detail: "the layer's copy is older than the device's".into(),
                    });
                }
            }
        }
        if let Content::Chunks { chunks, .. } = &entry.content {
            wanted.extend(
                chunks
                    .iter()
                    .filter(|c| !held.contains(*c) && seen.insert(**c)),
            );
        }
    }
    for chunk in wanted.chunks(500) {
        for loc in catalog.locate_blobs(chunk).await?.into_iter().flatten() {
            out.download_bytes += u64::from(loc.entry.raw_len);
        }
    }
    for p in &job.remove {
        if device.contains_key(p) {
            out.remove.push(show(p));
        }
    }
    let status = morgana_core::dpkg::STATUS_PATH.to_vec();
    if let (Some(layer), Some(dev)) = (target.get(&status), device.get(&status)) {
        let layer = morgana_core::dpkg::installed(&file_bytes(catalog, layer).await?);
        let dev = morgana_core::dpkg::installed(&file_bytes(catalog, dev).await?);
        out.conflicts.extend(downgrades(&layer, &dev));
    }
    Ok(out)
}

/// Packages the layer has in an older version than the device.
fn downgrades(
    layer: &BTreeMap<String, String>,
    device: &BTreeMap<String, String>,
) -> Vec<Conflict> {
    layer
        .iter()
        .filter_map(|(name, v)| {
            let have = device.get(name)?;
            (morgana_core::dpkg::compare_versions(v, have) == std::cmp::Ordering::Less).then(|| {
                Conflict {
                    path: show(morgana_core::dpkg::STATUS_PATH),
                    kind: "package-downgrade",
                    detail: format!("{name}: the device has {have}, the layer {v}"),
                }
            })
        })
        .collect()
}

/// A file's bytes from the blob store.
async fn file_bytes(
    catalog: &dyn Catalog,
    entry: &morgana_core::tree::Entry,
) -> Result<Vec<u8>, AssignError> {
    match &entry.content {
        Content::Inline(b) => Ok(b.clone()),
        Content::Chunks { chunks, .. } => {
            let mut out = Vec::with_capacity(entry.size as usize);
            for chunk in chunks {
                let Some(Some(loc)) = catalog.locate_blobs(&[*chunk]).await?.into_iter().next()
                else {
                    return Err(TreeLoadError::Missing { id: *chunk }.into());
                };
                let raw = tokio::task::spawn_blocking(move || {
                    with_codec(|codec| PackStore::read_blob(&loc, codec))
                })
                .await??;
                out.extend_from_slice(&raw);
            }
            Ok(out)
        }
        _ => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse() {
        assert_eq!(parse_pin("office").unwrap(), ("office".into(), None));
        assert_eq!(parse_pin("office:3").unwrap(), ("office".into(), Some(3)));
        assert!(parse_pin("office:x").is_err());
    }

    #[test]
    fn only_older_packages_are_downgrades() {
        let map = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        let layer = map(&[("curl", "7.88.1-10"), ("vim", "2:9.0-1"), ("new", "1")]);
        let device = map(&[("curl", "7.88.1-10+deb12u5"), ("vim", "2:8.2-1")]);
        let found = downgrades(&layer, &device);
        assert_eq!(found.len(), 1);
        assert!(found[0].detail.starts_with("curl:"), "{found:?}");
    }

    #[test]
    fn do_not_override_paths_must_be_absolute_and_plain() {
        assert!(check_paths(&["/etc/app.conf".into()]).is_ok());
        assert!(check_paths(&["etc/app.conf".into()]).is_err());
        assert!(check_paths(&["/etc/../x".into()]).is_err());
    }
}
