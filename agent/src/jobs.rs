//! Jobs from the appliance, as the `run` service executes them: sync now, and the restore
//! kinds (paths to a new place or to their original place, full and system-only revert),
//! all built on the restore engine.
//!
//! Restores into the protected root hold the sync lock, so no snapshot sees a half-restored
//! tree. Files are replaced by staged copies renamed over them, never by emptying the root
//! first; a revert removes what the snapshot lacks only after its folder's entries are in
//! place, and never touches the unprotected area or the agent's own state.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use morgana_core::control::{AgentPolicy, JobKind, RestoreJob, RestoreScope, RuleSet};
use morgana_core::policy::{Area, HOME_MACRO};

use crate::client::Client;
use crate::commands::restore::{ClientSource, human};
use crate::restore::{self, Keep, Progress, Request, Stats};
use crate::state::{State, SyncLock};
use crate::sync::{self, sync_locked};

/// The policy this agent holds, if any; `None` means the built-in defaults (factory
/// unprotected rules, `%home%` as the user area, the default schedule). The one place that
/// knows where the policy lives.
pub fn held_policy(state: &State) -> Option<AgentPolicy> {
    state.policy().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "the held policy is unreadable; using the defaults");
        None
    })
}

/// Runs one job to its end; the message says what was done, for the appliance's log.
pub async fn run(
    state: &State,
    client: &Arc<Client>,
    job_id: &str,
    kind: &JobKind,
    live: &Arc<Progress>,
    bar: &ProgressBar,
) -> anyhow::Result<String> {
    match kind {
        JobKind::Sync => {
            let lock = sync::lock(state, || {
                tracing::info!("a sync is already running; the sync job waits for it")
            })
            .await?;
            let s = sync_locked(state, client, "manual", bar, &lock).await?;
            Ok(format!(
                "snapshot {}: {} files, {} scanned, {} sent",
                s.snapshot,
                s.files,
                human(s.bytes_scanned),
                human(s.bytes_sent)
            ))
        }
        JobKind::ApplyLayers(a) => {
            let lock = sync::lock(state, || {
                tracing::info!("a sync is running; the layer apply waits for it to finish")
            })
            .await?;
            crate::apply::run(state, client, job_id, a, live, bar, &lock).await
        }
        // A rollback is a system-only revert to the pre-layer-update snapshot.
        JobKind::Restore(r) | JobKind::RollbackLayers(r) => {
            let lock = sync::lock(state, || {
                tracing::info!("a sync is running; the restore waits for it to finish")
            })
            .await?;
            let job = RestoreRun {
                state,
                client,
                job_id,
                r,
                live,
            };
            job.run(&lock, bar).await
        }
    }
}

struct RestoreRun<'a> {
    state: &'a State,
    client: &'a Arc<Client>,
    job_id: &'a str,
    r: &'a RestoreJob,
    live: &'a Arc<Progress>,
}

impl RestoreRun<'_> {
    async fn run(&self, lock: &SyncLock, bar: &ProgressBar) -> anyhow::Result<String> {
        let root = self.state.device()?.root;
        match (&self.r.scope, &self.r.target) {
            (RestoreScope::Paths { paths }, Some(target)) => self.to_new_place(paths, target).await,
            (RestoreScope::Paths { paths }, None) => self.in_place(paths, &root).await,
            (_, Some(t)) => bail!(
                "a full or system-only revert always targets the original place, not {t}; \
                 queue it without --to"
            ),
            (scope, None) => self.revert(scope, &root, lock, bar).await,
        }
    }

    fn request(&self, subpath: Vec<Vec<u8>>, to: PathBuf) -> Request {
        let mut req = Request::new(self.r.snapshot.clone(), self.r.root, subpath, to);
        req.progress = Some(self.live.clone());
        req
    }

    async fn engine(&self, req: Request) -> anyhow::Result<Stats> {
        let to = req.to.clone();
        let client = self.client.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            // Restores carry a user's own data: straight from the appliance, never through
            // a branch reflector, whose cache would keep it on another user's machine.
            let source = ClientSource {
                client,
                handle,
                reflectors: None,
            };
            restore::restore(&source, &req)
        })
        .await
        .context("the restore thread stopped unexpectedly")?
        .with_context(|| {
            format!(
                "restoring snapshot {} into {} failed",
                self.r.snapshot,
                to.display()
            )
        })
    }

    /// Each path into `target` under its own name (`/home/a/docs` → `target/docs`); `/`
    /// puts the whole snapshot into `target`. Each path is restored into a staging folder
    /// inside `target` first, then renamed over what `target` holds under that name.
    async fn to_new_place(&self, paths: &[String], target: &str) -> anyhow::Result<String> {
        let target = Path::new(target);
        if !target.is_absolute() {
            bail!("the restore target {target:?} must be an absolute path");
        }
        let mut names = Vec::new();
        for p in paths {
            let sub = subpath(p)?;
            let name = sub.last().cloned();
            if names.contains(&name) {
                bail!(
                    "two paths end in the same name ({p}); restore them in separate jobs or to \
                     separate targets"
                );
            }
            names.push(name);
        }
        std::fs::create_dir_all(target).with_context(|| {
            format!(
                "cannot create the restore target {}: choose a writable directory",
                target.display()
            )
        })?;
        let mut total = Stats::default();
        for p in paths {
            let sub = subpath(p)?;
            let Some(name) = sub.last().cloned() else {
                total.add(&self.engine(self.request(sub, target.into())).await?);
                continue;
            };
            let staging = target.join(format!(".morgana-job-{}", self.job_id));
            remove_any(&staging)?;
            std::fs::create_dir(&staging).with_context(|| {
                format!(
                    "cannot create a staging folder in the restore target {}: choose a writable \
                     directory",
                    target.display()
                )
            })?;
            let restored = self
                .engine(self.request(sub.clone(), staging.clone()))
                .await
                .and_then(|stats| {
                    let from = sub.iter().fold(staging.clone(), |d, c| {
                        d.join(std::ffi::OsStr::from_bytes(c))
                    });
                    let to = target.join(std::ffi::OsStr::from_bytes(&name));
                    remove_any(&to)?;
                    std::fs::rename(&from, &to).with_context(|| {
                        format!(
                            "cannot move {} into place at {}",
                            from.display(),
                            to.display()
                        )
                    })?;
                    Ok(stats)
                });
            let cleaned = remove_any(&staging);
            total.add(&restored?);
            cleaned?;
        }
        Ok(format!(
            "restored {} from snapshot {} into {}: {}",
            paths.join(", "),
            self.r.snapshot,
            target.display(),
            summary(&total)
        ))
    }

    /// Each path back at its place in the protected root: a file replaced, a folder made
    /// equal to the snapshot's (what it lacks is removed).
    async fn in_place(&self, paths: &[String], root: &Path) -> anyhow::Result<String> {
        let keep = self.state_keep(root);
        let mut total = Stats::default();
        for p in paths {
            let sub = subpath(p)?;
            if sub.is_empty() {
                bail!(
                    "restoring / in place would replace the whole device: queue a revert \
                     (--scope full or system-only) instead"
                );
            }
            let mut req = self.request(sub, root.to_path_buf());
            req.prune = true;
            req.keep = keep.clone();
            total.add(&self.engine(req).await?);
        }
        Ok(format!(
            "restored {} from snapshot {} in place: {}",
            paths.join(", "),
            self.r.snapshot,
            summary(&total)
        ))
    }

    /// The protected root becomes the snapshot, except the unprotected area, the agent's
    /// state and (system-only) the user area, which stay exactly as they are.
    async fn revert(
        &self,
        scope: &RestoreScope,
        root: &Path,
        lock: &SyncLock,
        bar: &ProgressBar,
    ) -> anyhow::Result<String> {
        let policy = held_policy(self.state);
        let unprotected = Area::unprotected(
            policy
                .as_ref()
                .map_or(&RuleSet::default(), |p| &p.unprotected),
        )
        .context("the held policy's unprotected area is unusable")?;
        let user = match scope {
            RestoreScope::SystemOnly => {
                let default_user = RuleSet {
                    rules: vec![HOME_MACRO.to_owned()],
                    exceptions: vec![],
                };
                let set = policy.as_ref().map_or(&default_user, |p| &p.user_area);
                Some(Area::compile(set).context("the held policy's user area is unusable")?)
            }
            _ => None,
        };
        // The state being reverted is never lost: it is a snapshot first.
        let before = sync_locked(self.state, self.client, "pre-revert", bar, lock)
            .await
            .context("the pre-revert snapshot failed, so nothing was reverted")?;
        let state_keep = self.state_keep(root);
        // Onto new hardware, the folders drivers are delivered into stay the device's own:
        // the snapshot's machine's drivers would not fit it.
        let driver_dirs: Vec<Vec<u8>> = self
            .r
            .drivers
            .iter()
            .filter_map(|d| Path::new(&d.target).parent())
            .map(|p| p.as_os_str().as_bytes().to_vec())
            .filter(|p| p.len() > 1)
            .collect();
        let keep = Keep(Arc::new(move |rel: &[u8]| {
            if state_keep.as_ref().is_some_and(|k| k.keeps(rel)) {
                return true;
            }
            let mut abs = Vec::with_capacity(rel.len() + 1);
            abs.push(b'/');
            abs.extend_from_slice(rel);
            unprotected.contains(&abs)
                || user.as_ref().is_some_and(|u| u.contains(&abs))
                || driver_dirs
                    .iter()
                    .any(|d| morgana_core::image::is_within(&abs, d))
        }));
        let mut req = self.request(Vec::new(), root.to_path_buf());
        req.prune = true;
        req.keep = Some(keep);
        let mut stats = self.engine(req).await?;
        // Onto new hardware: the device's own drivers, not the snapshot's machine's.
        let mut in_place = 0;
        if !self.r.drivers.is_empty() {
            let (client, handle) = (self.client.clone(), tokio::runtime::Handle::current());
            let (root, drivers, job_id, state) = (
                root.to_path_buf(),
                self.r.drivers.clone(),
                self.job_id.to_owned(),
                self.state.clone(),
            );
            let (delivered, placed) = tokio::task::spawn_blocking(move || {
                let mut results = morgana_core::control::FileResults::default();
                crate::apply::deliver_drivers(
                    &ClientSource {
                        client,
                        handle,
                        reflectors: None,
                    },
                    &state,
                    &root,
                    &drivers,
                    &job_id,
                    &mut results,
                )
                .map(|stats| (stats, results.unchanged))
                .map_err(|f| {
                    f.error
                        .context(format!("delivering drivers into {}", f.path))
                })
            })
            .await
            .context("the driver delivery thread stopped unexpectedly")??;
            stats.add(&delivered);
            in_place = placed;
        }
        let what = match scope {
            RestoreScope::SystemOnly => "system-only revert (user data kept)",
            _ => "full revert",
        };
        Ok(format!(
            "{what} to snapshot {} done (the state before is snapshot {}): {}{}",
            self.r.snapshot,
            before.snapshot,
            summary(&stats),
            if self.r.drivers.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} driver sets delivered ({} already in place)",
                    self.r.drivers.len() as u64 - in_place,
                    in_place
                )
            }
        ))
    }

    /// Keeps the agent's state directory when it lies inside the protected root.
    fn state_keep(&self, root: &Path) -> Option<Keep> {
        let root = root.canonicalize().ok()?;
        let dir = self.state.dir.canonicalize().ok()?;
        let rel = dir
            .strip_prefix(&root)
            .ok()?
            .as_os_str()
            .as_bytes()
            .to_vec();
        Some(Keep(Arc::new(move |path: &[u8]| {
            path.starts_with(&rel) && (path.len() == rel.len() || path[rel.len()] == b'/')
        })))
    }
}

/// An absolute endpoint path as tree names (`/` → none).
fn subpath(p: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let Some(rel) = p.strip_prefix('/') else {
        bail!("the path {p:?} must be absolute, as seen from the protected root (e.g. /home/a)");
    };
    Ok(restore::parse_subpath(Path::new(rel))?)
}

/// Removes a file, symlink or folder (not following symlinks); true if something was there,
/// and nothing there is fine.
pub(crate) fn remove_any(p: &Path) -> anyhow::Result<bool> {
    let removed = match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
    };
    removed.with_context(|| format!("cannot remove {} to make room", p.display()))?;
    Ok(true)
}

fn summary(s: &Stats) -> String {
    let mut out = format!(
        "{} files ({}), {} folders written, {} entries removed, {} fetched",
        s.files,
        human(s.bytes),
        s.dirs,
        s.removed,
        human(s.fetched_bytes)
    );
    if s.warnings > 0 {
        out.push_str(&format!(
            ", {} warnings (attributes or special files not restored; see the agent's log)",
            s.warnings
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::POLICY_FILE;

    #[test]
    fn paths_become_tree_names() {
        assert!(subpath("/").unwrap().is_empty());
        assert_eq!(
            subpath("/home/a/docs/").unwrap(),
            vec![b"home".to_vec(), b"a".to_vec(), b"docs".to_vec()]
        );
        assert!(subpath("home/a").is_err());
        assert!(subpath("/home/../etc").is_err());
    }

    #[test]
    fn the_policy_is_read_from_the_state_dir_or_defaults() {
        let tmp = tempfile::tempdir().unwrap();
        let state = State {
            dir: tmp.path().to_path_buf(),
        };
        assert!(held_policy(&state).is_none());
        let p = AgentPolicy {
            name: "p".into(),
            version: 3,
            unprotected: RuleSet::default(),
            user_area: RuleSet {
                rules: vec!["/data".into()],
                exceptions: vec![],
            },
            sync_interval_secs: 600,
            reflectors: Default::default(),
        };
        std::fs::write(
            tmp.path().join(POLICY_FILE),
            serde_json::to_vec(&p).unwrap(),
        )
        .unwrap();
        assert_eq!(held_policy(&state), Some(p));
        std::fs::write(tmp.path().join(POLICY_FILE), b"{").unwrap();
        assert!(held_policy(&state).is_none());
    }
}
