//! Applying layers: the device becomes base ⊕ apps, keeping its user area, unprotected
//! area, machine identity (never in a layer) and the files its users installed (in no
//! layer, so neither written nor removed).
//!
//! 1. A journal in the state directory names the job before anything happens; then a
//!    `pre-layer-update` snapshot (the appliance pins it) is taken and its id journaled.
//! 2. The target is built from the layers' trees exactly as the appliance's dry run builds
//!    it (`morgana_core::image`); its new directory trees live in memory and are served to
//!    the restore engine beside the appliance's blobs.
//! 3. The restore engine writes every file under a temporary name in its own folder (same
//!    filesystem) and renames it into place, file by file; then the paths the previous
//!    layers owned and the new ones lack are removed.
//!    Files the device already holds as the layers want them (the pre-layer-update
//!    snapshot and the file's stat agree, and so do content, owner, mode and mtime) are
//!    neither fetched nor written, so an update costs what changed.
//! 4. The device's matching driver sets (carried in the job) are delivered into their
//!    folders, each replacing what was there; a device with no machine identity (an empty
//!    one being provisioned) is given its own.
//! 5. The journal goes last. If the agent dies before, `run` finds the journal on its next
//!    start and applies the same job again: every step converges on the same target, so a
//!    device never stays half-applied.

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use indicatif::ProgressBar;
use morgana_core::Id;
use morgana_core::control::{ApplyJob, DriverDelivery, FileOutcome, FileResults, Job, RuleSet};
use morgana_core::image::{self, Flat};
use morgana_core::pack::{BlobKind, Codec, Compression, DEFAULT_ZSTD_LEVEL};
use morgana_core::plugin::layer::{MACHINE_IDENTITY, is_machine_identity};
use morgana_core::policy::{Area, HOME_MACRO};
use morgana_core::tree::{Content, Kind, Tree};
use morgana_core::wire::BlobFrame;
use serde::{Deserialize, Serialize};

use crate::cache::{self, CacheReader, DirRecord, FileKey};
use crate::client::Client;
use crate::commands::restore::{ClientSource, human};
use crate::delivered::Delivered;
use crate::jobs::remove_any;
use crate::restore::{self, BlobSource, IdMap, Keep, OnBlob, Progress, Request, RestoreError};
use crate::reuse::LocalChunks;
use crate::state::{State, SyncLock};
use crate::sync::sync_locked;

/// The apply in progress, in the state directory.
pub const JOURNAL_FILE: &str = "apply-journal.json";
/// Test hook: milliseconds to wait between writing the layers' files and removing stale
/// ones, so a test can kill the agent in the middle of an apply.
const DELAY_ENV: &str = "MORGANA_AGENT_APPLY_DELAY_MS";
/// The restore engine's temporary names; what a killed apply leaves behind.
const TMP_PREFIX: &[u8] = b".morgana-restore.";

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Journal {
    job: Job,
    /// Set once the pre-layer-update snapshot is committed.
    pre_snapshot: Option<String>,
}

/// The apply job a killed agent left unfinished, if any.
pub fn pending(state: &State) -> Option<Job> {
    let bytes = std::fs::read(state.path(JOURNAL_FILE)).ok()?;
    match serde_json::from_slice::<Journal>(&bytes) {
        Ok(j) => Some(j.job),
        Err(e) => {
            tracing::error!(
                "the apply journal {} is unreadable ({e}); the device may be half-applied: \
                 queue the apply again or roll back with `morgana layer rollback`",
                state.path(JOURNAL_FILE).display()
            );
            None
        }
    }
}

fn save(state: &State, journal: &Journal) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec(journal).expect("journals serialize");
    state
        .write(JOURNAL_FILE, &bytes, 0o600)
        .context("cannot write the apply journal, so nothing was applied")
}

/// Runs (or resumes) the apply job `job_id`.
pub async fn run(
    state: &State,
    client: &Arc<Client>,
    job_id: &str,
    job: &ApplyJob,
    live: &Arc<Progress>,
    bar: &ProgressBar,
    lock: &SyncLock,
) -> anyhow::Result<String> {
    let resumed = std::fs::read(state.path(JOURNAL_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Journal>(&b).ok())
        .filter(|j| j.job.id == job_id);
    let mut journal = match resumed.clone() {
        Some(j) => j,
        None => {
            let j = Journal {
                job: Job {
                    id: job_id.to_owned(),
                    kind: morgana_core::control::JobKind::ApplyLayers(job.clone()),
                },
                pre_snapshot: None,
            };
            save(state, &j)?;
            j
        }
    };
    if journal.pre_snapshot.is_none() {
        let before = sync_locked(state, client, "pre-layer-update", bar, lock)
            .await
            .context("the pre-layer-update snapshot failed, so nothing was applied")?;
        journal.pre_snapshot = Some(before.snapshot.clone());
        save(state, &journal)?;
    }
    let root = state.device()?.root;
    let pre = journal.pre_snapshot.clone().unwrap_or_default();
    let pre_root = client
        .snapshots()
        .await
        .context("cannot list the device's snapshots to compare with the layers")?
        .into_iter()
        .find(|s| s.id == pre)
        .map(|s| s.root);
    let kept = Arc::new(Kept::new(state, &root, job)?);
    let client2 = client.clone();
    let handle = tokio::runtime::Handle::current();
    let job2 = job.clone();
    let live2 = live.clone();
    let root2 = root.clone();
    let kept2 = kept.clone();
    let resuming = resumed.is_some();
    let job_id2 = job_id.to_owned();
    let reflectors = crate::distribution::discover(state, client).await;
    let state2 = state.clone();
    let written = tokio::task::spawn_blocking(move || {
        let source = ClientSource {
            client: client2,
            handle,
            reflectors,
        };
        let mut w = write_target(
            &source,
            &job2,
            &root2,
            &state2.dir,
            &kept2,
            pre_root,
            live2,
            resuming,
        )?;
        let before = w.results.unchanged;
        // Counts what the drivers fetch beside what the layers did.
        let counted = LocalChunks::none(&source);
        let stats = deliver_drivers(
            &counted,
            &state2,
            &root2,
            &job2.drivers,
            &job_id2,
            &mut w.results,
        )?;
        w.stats.add(&stats);
        w.fetched_raw_bytes += counted.counts.remote_raw_bytes.load(Ordering::Relaxed);
        w.drivers_in_place = w.results.unchanged - before;
        Ok::<_, Failure>(w)
    })
    .await
    .context("the apply thread stopped unexpectedly")?;
    let mut done = match written {
        Ok(w) => w,
        Err(f) => {
            let mut results = *f.results;
            results.push(f.path, FileOutcome::Failed, format!("{:#}", f.error));
            results.bound();
            *live.results.lock().unwrap() = Some(results);
            return Err(f.error);
        }
    };
    if let Some(ms) = std::env::var(DELAY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let mut removed = 0u64;
    for p in &job.remove {
        let rel = p.strip_prefix(b"/").unwrap_or(p);
        if rel.is_empty() {
            continue;
        }
        if let Some(why) = kept.reason(rel) {
            done.results
                .push(restore::show(p), FileOutcome::Kept, why.to_owned());
            continue;
        }
        if restore::parse_subpath(Path::new(std::ffi::OsStr::from_bytes(rel))).is_err() {
            tracing::warn!(
                "skipping a hostile path in the removal list: {}",
                restore::show(p)
            );
            continue;
        }
        let path = root.join(std::ffi::OsStr::from_bytes(rel));
        match remove_any(&path) {
            Ok(true) => {
                tracing::info!(path = %path.display(), "removed: the new layers do not have it");
                done.results
                    .push(restore::show(p), FileOutcome::Removed, String::new());
                removed += 1;
            }
            Ok(false) => {}
            Err(e) => {
                done.results
                    .push(restore::show(p), FileOutcome::Failed, format!("{e:#}"));
                done.results.bound();
                *live.results.lock().unwrap() = Some(done.results);
                return Err(e);
            }
        }
    }
    let identity = provide_identity(&root, &job.hostname)?;
    for (path, what) in &identity {
        done.results
            .push((*path).to_owned(), FileOutcome::Added, (*what).to_owned());
    }
    std::fs::remove_file(state.path(JOURNAL_FILE))
        .context("the layers are applied but the apply journal could not be removed")?;
    done.results.fetched_bytes = done.stats.fetched_bytes;
    done.results.reused_bytes = done.reused_bytes;
    done.results.fetched_raw_bytes = done.fetched_raw_bytes;
    done.results.written_bytes = done.stats.bytes;
    let r = &done.results;
    let message = format!(
        "{}layers applied (the state before is snapshot {}): {} added, {} replaced, {} \
         removed, {} kept, {} unchanged; {} files ({}) written, {} folders, {} fetched, {} \
         taken from the device's own files, {} driver sets delivered ({} already in \
         place){}, {} leftovers of an interrupted apply cleaned",
        if resuming {
            "interrupted apply resumed: "
        } else {
            ""
        },
        journal.pre_snapshot.unwrap_or_default(),
        r.added,
        r.replaced,
        removed,
        r.kept,
        r.unchanged,
        done.stats.files,
        human(done.stats.bytes),
        done.stats.dirs,
        human(done.stats.fetched_bytes),
        human(done.reused_bytes),
        job.drivers.len() as u64 - done.drivers_in_place,
        done.drivers_in_place,
        if identity.is_empty() {
            String::new()
        } else {
            ", own identity given (SSH host keys are left to sshd at first boot)".to_owned()
        },
        done.cleaned
    );
    done.results.bound();
    *live.results.lock().unwrap() = Some(done.results);
    Ok(message)
}

/// Machine identity a device needs and layers never carry (the paths are the layer rules'
/// `MACHINE_IDENTITY`): a fresh `/etc/machine-id` (in systemd's format, a random v4 UUID
/// as 32 hex digits), `/var/lib/dbus/machine-id` holding the same id (D-Bus requires the
/// two to agree; written only where D-Bus is installed, i.e. `/var/lib/dbus` exists) and
/// `/etc/hostname` (the enrolled hostname), each written only when the device has none, so
/// a provisioned empty device gets its own and an existing one keeps its own. SSH host keys
/// are not made here: sshd's first start (`ssh-keygen -A` in Debian's unit) generates them
/// on the device itself.
fn provide_identity(
    root: &Path,
    hostname: &str,
) -> anyhow::Result<Vec<(&'static str, &'static str)>> {
    let mut given = Vec::new();
    let missing = |rel: &str| matches!(std::fs::symlink_metadata(root.join(rel)), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    let write = |rel: &str, data: &[u8], mode: u32| -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = root.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("cannot create {} for the device's identity", dir.display())
            })?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .with_context(|| {
                format!("cannot create {} for the device's identity", path.display())
            })?;
        f.write_all(data)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", path.display()))
    };
    for &path in MACHINE_IDENTITY {
        let rel = path.trim_start_matches('/');
        if !missing(rel) {
            continue;
        }
        match path {
            "/etc/machine-id" => {
                write(rel, machine_id().as_bytes(), 0o444)?;
                given.push((path, "the device's own identity: a fresh machine id"));
            }
            "/var/lib/dbus/machine-id" => {
                if !root.join("var/lib/dbus").is_dir() {
                    continue;
                }
                // The list puts /etc/machine-id first: it exists by now.
                let id = std::fs::read(root.join("etc/machine-id"))
                    .context("cannot read /etc/machine-id to give D-Bus the same id")?;
                write(rel, &id, 0o444)?;
                given.push((path, "the device's own identity: its machine id, for D-Bus"));
            }
            "/etc/hostname" if !hostname.is_empty() => {
                write(rel, format!("{hostname}\n").as_bytes(), 0o644)?;
                given.push((path, "the device's own identity: its enrolled hostname"));
            }
            _ => {}
        }
    }
    Ok(given)
}

/// A random machine id as systemd writes one: 128 bits with the UUID v4 version and
/// variant bits set, 32 lowercase hex digits and a newline.
fn machine_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the operating system's random number generator failed");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s: String = b.iter().map(|x| format!("{x:02x}")).collect();
    s.push('\n');
    s
}

/// Each driver set into its folder (as seen from the protected root): restored into a
/// staging folder beside it, then renamed over what the folder held (blocking). A folder
/// that holds its set exactly as this agent delivered it is left alone.
pub(crate) fn deliver_drivers(
    source: &dyn BlobSource,
    state: &State,
    root: &Path,
    drivers: &[DriverDelivery],
    job_id: &str,
    results: &mut FileResults,
) -> Result<restore::Stats, Failure> {
    let mut total = restore::Stats::default();
    let mut delivered = Delivered::load(state);
    for d in drivers {
        let fail = |error: anyhow::Error| Failure {
            path: d.target.clone(),
            error,
            results: Box::default(),
        };
        let rel = d.target.trim_start_matches('/');
        let parts = restore::parse_subpath(Path::new(rel)).map_err(|e| {
            fail(anyhow::anyhow!(
                "driver set {} has an unusable target: {e}",
                d.set
            ))
        })?;
        if parts.is_empty() {
            return Err(fail(anyhow::anyhow!(
                "driver set {} would replace the whole protected root; fix the profile's path",
                d.set
            )));
        }
        let dest = root.join(rel);
        if delivered.holds(&d.target, &d.root, &dest) {
            results.unchanged += 1;
            continue;
        }
        let parent = dest.parent().unwrap_or(root).to_path_buf();
        let staging = parent.join(format!(".morgana-job-{job_id}-{}", d.set));
        let placed = (|| -> anyhow::Result<(restore::Stats, bool)> {
            std::fs::create_dir_all(&parent)
                .with_context(|| format!("cannot create the driver folder {}", parent.display()))?;
            remove_any(&staging)?;
            std::fs::create_dir(&staging)
                .with_context(|| format!("cannot create {}", staging.display()))?;
            let req = Request::new(
                format!("driver set {} v{}", d.set, d.version),
                d.root,
                Vec::new(),
                staging.clone(),
            );
            let stats = restore::restore(source, &req)
                .with_context(|| format!("writing driver set {} v{} failed", d.set, d.version))?;
            let had = remove_any(&dest)?;
            std::fs::rename(&staging, &dest).with_context(|| {
                format!(
                    "cannot move driver set {} into place at {}",
                    d.set,
                    dest.display()
                )
            })?;
            Ok((stats, had))
        })();
        let (stats, had) = match placed {
            Ok(p) => p,
            Err(e) => {
                let _ = remove_any(&staging);
                return Err(fail(e));
            }
        };
        total.add(&stats);
        delivered.record(&d.target, &d.set, d.version, &d.root, &dest);
        delivered.save(state).map_err(fail)?;
        results.push(
            d.target.clone(),
            if had {
                FileOutcome::Replaced
            } else {
                FileOutcome::Added
            },
            format!("driver set {} v{}", d.set, d.version),
        );
    }
    Ok(total)
}

/// An apply step that failed: on what, why, and what was decided before it.
pub(crate) struct Failure {
    pub path: String,
    pub error: anyhow::Error,
    /// Boxed: failures are rare, and the `Ok` path should not pay for their size.
    pub results: Box<FileResults>,
}

/// Paths an apply never writes or removes, and why: the agent's state, the unprotected
/// area, the user area, the do-not-override list and the delivered driver sets' folders.
struct Kept {
    state_rel: Option<Vec<u8>>,
    unprotected: Area,
    user: Area,
    do_not_override: Vec<Vec<u8>>,
    drivers: Vec<Vec<u8>>,
}

impl Kept {
    fn new(state: &State, root: &Path, job: &ApplyJob) -> anyhow::Result<Kept> {
        let policy = crate::jobs::held_policy(state);
        let unprotected = Area::unprotected(
            policy
                .as_ref()
                .map_or(&RuleSet::default(), |p| &p.unprotected),
        )
        .context("the held policy's unprotected area is unusable")?;
        let default_user = RuleSet {
            rules: vec![HOME_MACRO.to_owned()],
            exceptions: vec![],
        };
        let user = Area::compile(policy.as_ref().map_or(&default_user, |p| &p.user_area))
            .context("the held policy's user area is unusable")?;
        let state_rel = root.canonicalize().ok().and_then(|root| {
            let dir = state.dir.canonicalize().ok()?;
            Some(
                dir.strip_prefix(&root)
                    .ok()?
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        });
        Ok(Kept {
            state_rel,
            unprotected,
            user,
            do_not_override: job.do_not_override.clone(),
            drivers: job
                .drivers
                .iter()
                .map(|d| d.target.trim_end_matches('/').as_bytes().to_vec())
                .collect(),
        })
    }

    /// Why the apply leaves `rel` (relative to the root) alone, if it does.
    fn reason(&self, rel: &[u8]) -> Option<&'static str> {
        if self
            .state_rel
            .as_ref()
            .is_some_and(|s| image::is_within(rel, s))
        {
            return Some("the agent's own state");
        }
        let mut abs = Vec::with_capacity(rel.len() + 1);
        abs.push(b'/');
        abs.extend_from_slice(rel);
        if std::str::from_utf8(&abs).is_ok_and(is_machine_identity) {
            return Some("the device's machine identity");
        }
        if self
            .do_not_override
            .iter()
            .any(|d| image::is_within(&abs, d))
        {
            Some("on the do-not-override list")
        } else if self.drivers.iter().any(|d| image::is_within(&abs, d)) {
            Some("a delivered driver set's folder")
        } else if self.user.contains(&abs) {
            Some("in the device's user area")
        } else if self.unprotected.contains(&abs) {
            Some("in the device's unprotected area")
        } else {
            None
        }
    }
}

struct Written {
    stats: restore::Stats,
    cleaned: u64,
    results: FileResults,
    /// Chunk bytes read from the device's own files instead of fetched.
    reused_bytes: u64,
    /// Raw (decompressed) bytes of the chunks fetched.
    fetched_raw_bytes: u64,
    /// Driver sets whose folders already held them.
    drivers_in_place: u64,
}

/// Builds the target and writes what differs from the device over the root (blocking).
#[allow(clippy::too_many_arguments)] // one call site, each argument a different thing
fn write_target(
    source: &dyn BlobSource,
    job: &ApplyJob,
    root: &Path,
    state_dir: &Path,
    kept: &Arc<Kept>,
    pre_root: Option<Id>,
    live: Arc<Progress>,
    resuming: bool,
) -> Result<Written, Failure> {
    let fail = |error: anyhow::Error| Failure {
        path: "/".into(),
        error,
        results: Box::default(),
    };
    let mut codec = Codec::new(DEFAULT_ZSTD_LEVEL);
    let base = flatten(source, &mut codec, job.base.root).map_err(fail)?;
    let mut apps = Vec::new();
    for app in &job.apps {
        apps.push((
            flatten(source, &mut codec, app.root).map_err(fail)?,
            app.deletions.as_slice(),
        ));
    }
    let (target, dno) = image::target(base, apps, &job.do_not_override);
    let device = match pre_root {
        Some(r) => flatten(source, &mut codec, r).map_err(fail)?,
        None => Flat::new(),
    };
    let mut results = FileResults::default();
    for p in &dno {
        results.push(
            restore::show(p),
            FileOutcome::Kept,
            "on the do-not-override list".into(),
        );
    }
    let unchanged = classify(
        root,
        &target,
        &device,
        kept,
        CacheReader::open(state_dir, root),
        &mut results,
    );
    // The restore engine counts each regular file it writes; these are the ones it will.
    let (mut files_total, mut bytes_total) = (0u64, 0u64);
    let mut wanted = IdMap::default();
    let mut replaced = Vec::new();
    for (path, e) in &target {
        let rel = path.strip_prefix(b"/").unwrap_or(path);
        if e.kind != Some(Kind::File) || unchanged.contains(rel) || kept.reason(rel).is_some() {
            continue;
        }
        files_total += 1;
        bytes_total += e.size;
        if let Content::Chunks { chunks, .. } = &e.content {
            wanted.extend(chunks.iter().map(|c| (*c, ())));
        }
        if device.contains_key(path) {
            replaced.push(path.as_slice());
        }
    }
    live.files_total.store(files_total, Ordering::Relaxed);
    live.bytes_total.store(bytes_total, Ordering::Relaxed);
    let (local, found) = LocalChunks::index(source, root, &device, &replaced, &wanted);
    tracing::info!(
        files_read = found.files_read,
        bytes_read = found.bytes_read,
        "{} of {} chunks to write are on the device already ({} bytes)",
        found.chunks,
        wanted.len(),
        found.bytes
    );
    drop((wanted, replaced, device));
    let (tree_root, trees) = image::build(&target);
    let source = WithTrees {
        trees: trees.into_iter().map(|(id, t)| (id, t.encode())).collect(),
        inner: &local,
    };
    let mut req = Request::new(
        format!("layers {} + {} app layers", job.base.name, job.apps.len()),
        tree_root,
        Vec::new(),
        root.to_path_buf(),
    );
    let kept2 = kept.clone();
    req.keep = Some(Keep(Arc::new(move |rel: &[u8]| {
        unchanged.contains(rel) || kept2.reason(rel).is_some()
    })));
    req.progress = Some(live);
    let mut stats = match restore::restore(&source, &req) {
        Ok(s) => s,
        Err(e) => {
            let path = e.path().map_or_else(
                || "/".to_owned(),
                |p| format!("/{}", p.trim_start_matches('/')),
            );
            // What was planned is not claimed as done: only the failure is listed.
            let kept_only = FileResults {
                files: results
                    .files
                    .into_iter()
                    .filter(|f| f.outcome == FileOutcome::Kept)
                    .collect(),
                kept: results.kept,
                ..FileResults::default()
            };
            return Err(Failure {
                path,
                error: anyhow::Error::new(e).context("writing the layers' files failed"),
                results: Box::new(kept_only),
            });
        }
    };
    // The engine counted local chunks as fetched: only what came over the network is.
    stats.fetched_bytes = local.counts.remote_stored_bytes.load(Ordering::Relaxed);
    let reused_bytes = local.counts.local_bytes.load(Ordering::Relaxed);
    let fetched_raw_bytes = local.counts.remote_raw_bytes.load(Ordering::Relaxed);
    let cleaned = if resuming {
        clean_leftovers(root, &target).map_err(fail)?
    } else {
        0
    };
    Ok(Written {
        stats,
        cleaned,
        results,
        reused_bytes,
        fetched_raw_bytes,
        drivers_in_place: 0,
    })
}

/// A file awaiting the files cache's word: (folder, name, stat key now, path).
type Vouch<'a> = (&'a [u8], &'a [u8], FileKey, &'a Vec<u8>);

/// Sorts every non-directory path of `target` into added, replaced, kept or unchanged;
/// returns the unchanged ones (relative to the root), which the write leaves alone. A path
/// is unchanged when the pre-layer-update snapshot (`device`) holds the layers' content,
/// owner, mode and mtime there and the device still holds what the snapshot saw: a symlink
/// its target, a file the stat key (size, mtime, ctime, inode, device) the files cache
/// recorded with that content. Size and mtime alone are not enough (a file rewritten in
/// place and given its old mtime back keeps both, but not its ctime); a file the cache
/// cannot vouch for is written again, which costs little since its unchanged chunks are
/// read from the device.
fn classify(
    root: &Path,
    target: &Flat,
    device: &Flat,
    kept: &Kept,
    cache: Option<CacheReader>,
    results: &mut FileResults,
) -> HashSet<Vec<u8>> {
    use std::os::unix::fs::MetadataExt;
    let mut unchanged = HashSet::new();
    // Files the snapshot says are as the layers want them, until the cache vouches for
    // them.
    let mut vouch: Vec<Vouch<'_>> = Vec::new();
    for (path, entry) in target {
        if entry.kind == Some(Kind::Dir) {
            continue;
        }
        let rel = path.strip_prefix(b"/").unwrap_or(path);
        if let Some(why) = kept.reason(rel) {
            results.push(restore::show(path), FileOutcome::Kept, why.to_owned());
            continue;
        }
        let full = root.join(std::ffi::OsStr::from_bytes(rel));
        let Ok(meta) = std::fs::symlink_metadata(&full) else {
            results.push(restore::show(path), FileOutcome::Added, String::new());
            continue;
        };
        let same = device.get(path).is_some_and(|had| {
            let kind_on_disk = if meta.file_type().is_symlink() {
                Some(Kind::Symlink)
            } else if meta.is_file() {
                Some(Kind::File)
            } else {
                None
            };
            image::same_content(had, entry)
                && had.mtime_ns == entry.mtime_ns
                && kind_on_disk == had.kind
                && (had.kind == Some(Kind::Symlink)
                    || (meta.size() == had.size
                        && meta.mtime() * 1_000_000_000 + meta.mtime_nsec() == had.mtime_ns))
        });
        if same && entry.kind == Some(Kind::Symlink) {
            if std::fs::read_link(&full)
                .is_ok_and(|t| t.as_os_str().as_bytes() == entry.symlink_target.as_slice())
            {
                results.unchanged += 1;
                unchanged.insert(rel.to_vec());
                continue;
            }
        } else if same && entry.kind == Some(Kind::File) {
            let (dir, name) = match rel.iter().rposition(|&c| c == b'/') {
                Some(i) => (&rel[..i], &rel[i + 1..]),
                None => (&b""[..], rel),
            };
            vouch.push((dir, name, crate::scan::Stat::of(&meta).key(), path));
            continue;
        } else if same {
            results.unchanged += 1;
            unchanged.insert(rel.to_vec());
            continue;
        }
        results.push(restore::show(path), FileOutcome::Replaced, String::new());
    }
    // The cache is read in walk order: one folder's record at a time.
    vouch.sort_by(|a, b| cache::post_order(a.0, b.0).then_with(|| a.1.cmp(b.1)));
    let mut cache = cache;
    let mut record: Option<(&[u8], Option<DirRecord>)> = None;
    for (dir, name, key, path) in vouch {
        if record.as_ref().is_none_or(|(d, _)| *d != dir) {
            record = Some((dir, cache.as_mut().and_then(|c| c.lookup(dir))));
        }
        let cached = record
            .as_ref()
            .and_then(|(_, r)| r.as_ref())
            .and_then(|r| r.content(name, &key));
        if cached.is_some_and(|c| device.get(path).is_some_and(|had| had.content == *c)) {
            results.unchanged += 1;
            unchanged.insert(path.strip_prefix(b"/").unwrap_or(path).to_vec());
        } else {
            results.push(restore::show(path), FileOutcome::Replaced, String::new());
        }
    }
    unchanged
}

/// Removes temporary files a killed apply left in the layers' folders.
fn clean_leftovers(root: &Path, target: &Flat) -> anyhow::Result<u64> {
    let mut cleaned = 0;
    let dirs = std::iter::once(&b""[..]).chain(
        target
            .iter()
            .filter(|(_, e)| e.kind == Some(Kind::Dir))
            .map(|(p, _)| p.as_slice()),
    );
    for dir in dirs {
        let rel = dir.strip_prefix(b"/").unwrap_or(dir);
        let path = root.join(std::ffi::OsStr::from_bytes(rel));
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_name().as_bytes().starts_with(TMP_PREFIX) {
                remove_any(&entry.path())?;
                cleaned += 1;
            }
        }
    }
    Ok(cleaned)
}

/// Every entry below the tree `root`, by absolute path. Trees are fetched a level at a
/// time, many per request: a round trip per folder would dominate an update's time.
fn flatten(source: &dyn BlobSource, codec: &mut Codec, root: Id) -> anyhow::Result<Flat> {
    const TREES_PER_REQUEST: usize = 1024;
    let mut flat = Flat::new();
    let mut level = vec![(root, Vec::new())];
    while !level.is_empty() {
        let mut next = Vec::new();
        for batch in level.chunks(TREES_PER_REQUEST) {
            let ids: Vec<Id> = batch.iter().map(|(id, _)| *id).collect();
            let trees = load_trees(source, codec, &ids)?;
            for (id, dir) in batch {
                for entry in trees[id].entries.iter().cloned() {
                    let path = image::child_path(dir, &entry.name);
                    if let (Some(Kind::Dir), Content::Tree(sub)) = (entry.kind, &entry.content) {
                        next.push((*sub, path.clone()));
                    }
                    flat.insert(path, entry);
                }
            }
        }
        level = next;
    }
    Ok(flat)
}

/// The trees `ids` (the same tree may appear at several places: the appliance answers
/// each id once).
fn load_trees(
    source: &dyn BlobSource,
    codec: &mut Codec,
    ids: &[Id],
) -> anyhow::Result<HashMap<Id, Tree>> {
    let mut unique = ids.to_vec();
    unique.sort();
    unique.dedup();
    let mut trees = HashMap::new();
    source.fetch(&unique, &mut |frame, stored| {
        if frame.kind.is_none() {
            return Ok(());
        }
        let id = frame.id;
        let raw = codec
            .open(frame.id, frame.compression, stored, frame.raw_len)
            .map_err(|e| RestoreError::Protocol(format!("layer tree {id}: {e}")))?;
        let tree = Tree::decode(&raw)
            .map_err(|e| RestoreError::Protocol(format!("layer tree {id}: {e}")))?;
        trees.insert(id, tree);
        Ok(())
    })?;
    if let Some(id) = unique.iter().find(|id| !trees.contains_key(*id)) {
        anyhow::bail!("the appliance does not have layer tree {id}; run `morgana check` there");
    }
    Ok(trees)
}

/// The appliance's blobs, plus the target's directory trees built here.
struct WithTrees<'a> {
    trees: HashMap<Id, Vec<u8>>,
    inner: &'a dyn BlobSource,
}

impl BlobSource for WithTrees<'_> {
    fn fetch(&self, ids: &[Id], each: &mut OnBlob<'_>) -> Result<(), RestoreError> {
        // Frames go out in request order: runs of remote ids are fetched together.
        let mut start = 0;
        while start < ids.len() {
            if let Some(raw) = self.trees.get(&ids[start]) {
                let frame = BlobFrame {
                    id: ids[start],
                    kind: Some(BlobKind::Tree),
                    compression: Compression::None,
                    raw_len: raw.len() as u32,
                    stored_len: raw.len() as u32,
                };
                each(frame, raw)?;
                start += 1;
                continue;
            }
            let end = ids[start..]
                .iter()
                .position(|id| self.trees.contains_key(id))
                .map_or(ids.len(), |n| start + n);
            self.inner.fetch(&ids[start..end], each)?;
            start = end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use morgana_core::testdata::noise;
    use morgana_core::tree::Entry;
    use std::os::unix::fs::{FileExt, MetadataExt};

    fn kept() -> Kept {
        Kept {
            state_rel: None,
            unprotected: Area::unprotected(&RuleSet::default()).unwrap(),
            user: Area::compile(&RuleSet::default()).unwrap(),
            do_not_override: Vec::new(),
            drivers: Vec::new(),
        }
    }

    /// The entry a scan of `path` would make now, with `data`'s content.
    fn scanned(path: &Path, data: &[u8]) -> Entry {
        let m = std::fs::symlink_metadata(path).unwrap();
        let id = Id::of(data);
        Entry {
            name: path.file_name().unwrap().as_bytes().to_vec(),
            kind: Some(Kind::File),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            size: m.size(),
            content: Content::Chunks {
                file: id,
                chunks: vec![id],
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_file_rewritten_in_place_with_its_size_and_mtime_kept_is_not_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, state) = (tmp.path().join("root"), tmp.path().join("state"));
        std::fs::create_dir_all(root.join("usr")).unwrap();
        std::fs::create_dir(&state).unwrap();
        let (a, b) = (noise(5000, 1), noise(5000, 2));
        std::fs::write(root.join("usr/a"), &a).unwrap();
        std::fs::write(root.join("usr/b"), &b).unwrap();
        let ea = scanned(&root.join("usr/a"), &a);
        let eb = scanned(&root.join("usr/b"), &b);
        // The pre-layer-update snapshot saw both, and its files cache recorded their keys.
        let key = |p: &str| {
            crate::scan::Stat::of(&std::fs::symlink_metadata(root.join(p)).unwrap()).key()
        };
        let mut w = cache::CacheWriter::create(&state, &root).unwrap();
        let (ka, kb) = (key("usr/a"), key("usr/b"));
        w.write_dir(
            b"usr",
            Id::of(b"tree"),
            &[ea.clone(), eb.clone()],
            &[Some(ka), Some(kb)],
        )
        .unwrap();
        w.finish().unwrap().install().unwrap();
        let usr = Entry {
            name: b"usr".to_vec(),
            kind: Some(Kind::Dir),
            mode: 0o755,
            ..Default::default()
        };
        let device: Flat = [
            (b"/usr".to_vec(), usr),
            (b"/usr/a".to_vec(), ea.clone()),
            (b"/usr/b".to_vec(), eb.clone()),
        ]
        .into();
        // The layers want exactly what the snapshot saw.
        let target = device.clone();
        let unchanged = |cache| {
            let mut results = FileResults::default();
            let u = classify(&root, &target, &device, &kept(), cache, &mut results);
            let mut u: Vec<_> = u.into_iter().collect();
            u.sort();
            (u, results)
        };
        let (u, r) = unchanged(CacheReader::open(&state, &root));
        assert_eq!(u, [b"usr/a".to_vec(), b"usr/b".to_vec()]);
        assert_eq!((r.unchanged, r.replaced), (2, 0));

        // `a` is rewritten in place after the snapshot, same size, its mtime put back.
        // File times advance by clock ticks: let one pass so the rewrite gets another ctime.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(root.join("usr/a"))
            .unwrap();
        f.write_all_at(&noise(5000, 3), 0).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ea.mtime_ns as u64))
            .unwrap();
        let f = std::fs::File::open(root.join("usr/a")).unwrap();
        let m = f.metadata().unwrap();
        assert_eq!(
            (m.size(), m.mtime() * 1_000_000_000 + m.mtime_nsec()),
            (ea.size, ea.mtime_ns),
            "size and mtime look unchanged"
        );
        let (u, r) = unchanged(CacheReader::open(&state, &root));
        assert_eq!(
            u,
            [b"usr/b".to_vec()],
            "the rewritten file is written again"
        );
        assert_eq!((r.unchanged, r.replaced), (1, 1));

        // Without a files cache nothing vouches for the files: both are written again.
        let (u, _) = unchanged(None);
        assert!(u.is_empty(), "{u:?}");
    }
}
