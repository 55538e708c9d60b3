//! Jobs in the UI: sync now and restores from a device's pages (with a confirmation that
//! says what will happen), a job's page with live progress (htmx polls a fragment until
//! the job has finished), and the jobs list, per device and fleet-wide. The operations are
//! here once for the UI and `rest::jobs`; queuing itself is [`crate::jobs`], as for the CLI.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Form, Router};
use morgana_core::control::JobKind;
use serde::Deserialize;

use super::ops::{self, OpError, OpResult, human_bytes};
use super::ui::{Layout, render, see_other};
use super::{Auth, RunJobs, ViewFleet, WebState};
use crate::auth::Permission;
use crate::catalog::{Catalog, DeviceSummary, JobRecord, User};
use crate::jobs::{self as queue, JobRequestError};

/// Jobs a list shows.
const LISTED_JOBS: u32 = 100;

pub fn routes() -> Router<WebState> {
    Router::new()
        .route("/devices/{id}/sync", post(view_device_sync_post))
        .route(
            "/devices/{id}/restore",
            get(view_restore_get).post(view_restore_post),
        )
        .route("/jobs", get(view_jobs_get))
        .route("/jobs/{id}", get(view_job_get))
        .route("/jobs/{id}/progress", get(view_job_progress_get))
}

impl From<JobRequestError> for OpError {
    fn from(e: JobRequestError) -> OpError {
        match e {
            JobRequestError::Invalid(m) => OpError::Invalid(m),
            e @ JobRequestError::NoSuchSnapshot(_) => OpError::NotFound(e.to_string()),
            JobRequestError::Catalog(e) => OpError::Catalog(e),
        }
    }
}

// ---- Operations (UI and API) ----

/// What a caller asks to restore (the API's JSON body, the UI's form).
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct RestoreRequest {
    pub snapshot: String,
    /// `paths` (the default), `full` or `system-only`.
    pub scope: Option<String>,
    pub paths: Vec<String>,
    /// Absolute folder on the device to restore into; none or empty: the original place.
    pub to: Option<String>,
}

async fn job_device(catalog: &dyn Catalog, caller: &User, id: &str) -> OpResult<DeviceSummary> {
    let d = ops::device(catalog, caller, id).await?;
    if d.revoked {
        return Err(OpError::Conflict(format!(
            "device {} is revoked: it takes no jobs until it is enrolled again",
            d.hostname
        )));
    }
    Ok(d)
}

pub async fn start_sync(
    catalog: &dyn Catalog,
    caller: &User,
    device_id: &str,
) -> OpResult<JobRecord> {
    let d = job_device(catalog, caller, device_id).await?;
    Ok(queue::queue(catalog, &d.id, JobKind::Sync, &actor(caller)).await?)
}

/// The job a restore request describes, checked (paths, scope, the caller's role) but not
/// queued.
pub async fn restore_kind(
    catalog: &dyn Catalog,
    caller: &User,
    req: &RestoreRequest,
) -> OpResult<JobKind> {
    let to = req.to.clone().filter(|t| !t.trim().is_empty());
    let paths: Vec<String> = req
        .paths
        .iter()
        .filter(|p| !p.trim().is_empty())
        .cloned()
        .collect();
    let scope = queue::restore_scope(req.scope.as_deref(), paths, to.as_deref())?;
    if req.snapshot.trim().is_empty() {
        return Err(OpError::Invalid(
            "say which snapshot to restore from (its id, from the device's snapshot list)".into(),
        ));
    }
    let kind = queue::restore_kind(catalog, req.snapshot.trim(), scope, to).await?;
    if queue::is_revert(&kind) && !caller.role.allows(Permission::ManageProtection) {
        return Err(OpError::Forbidden(format!(
            "{} is signed in as {}, which may restore files and folders but not revert a whole \
             device; ask a protection manager or an administrator",
            caller.name,
            caller.role.label()
        )));
    }
    Ok(kind)
}

pub async fn start_restore(
    catalog: &dyn Catalog,
    hooks: &crate::hooks::Hooks,
    caller: &User,
    device_id: &str,
    req: &RestoreRequest,
) -> OpResult<JobRecord> {
    let d = job_device(catalog, caller, device_id).await?;
    let kind = restore_kind(catalog, caller, req).await?;
    let kind = crate::drivers::for_new_hardware(catalog, hooks, &d.id, kind)
        .await
        .map_err(|e| OpError::Internal(format!("working out the device's driver sets ({e})")))?;
    Ok(queue::queue(catalog, &d.id, kind, &actor(caller)).await?)
}

pub async fn job(catalog: &dyn Catalog, id: &str) -> OpResult<JobRecord> {
    catalog.job(id).await?.ok_or_else(|| {
        OpError::NotFound(format!(
            "there is no job {id:?}: pick one from the jobs list"
        ))
    })
}

/// Jobs newest first, of one device (checked to exist) or of all.
pub async fn jobs(
    catalog: &dyn Catalog,
    caller: &User,
    device: Option<&str>,
    limit: u32,
) -> OpResult<Vec<JobRecord>> {
    if let Some(d) = device {
        ops::device(catalog, caller, d).await?;
    }
    Ok(catalog
        .jobs(device, limit.clamp(1, ops::MAX_PER_PAGE))
        .await?)
}

fn actor(u: &User) -> String {
    format!("user:{}", u.name)
}

// ---- Pages ----

/// A job as its page and the lists show it.
pub struct JobView {
    pub id: String,
    pub device_id: String,
    pub what: String,
    pub state: &'static str,
    pub state_class: &'static str,
    pub finished: bool,
    pub created: String,
    pub created_by: String,
    pub started: String,
    pub ended: String,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: String,
    pub bytes_total: String,
    /// For `<progress>`: bytes when the agent counts them, files otherwise.
    pub progress_value: u64,
    pub progress_max: u64,
    pub message: String,
}

pub fn job_view(j: &JobRecord) -> JobView {
    let time = |t: Option<i64>| t.map_or_else(|| "–".into(), crate::clock::rfc3339_ms);
    let state = queue::state_name(j.state);
    let p = &j.progress;
    let (progress_value, progress_max) = if p.bytes_total > 0 {
        (p.bytes_done.min(p.bytes_total), p.bytes_total)
    } else {
        (p.files_done.min(p.files_total), p.files_total)
    };
    JobView {
        id: j.id.clone(),
        device_id: j.device_id.clone(),
        what: queue::describe(&j.kind),
        state,
        state_class: match state {
            "succeeded" => "ok",
            "failed" => "bad",
            "running" => "warn",
            _ => "muted",
        },
        finished: queue::is_finished(j.state),
        created: time(Some(j.created_ms)),
        created_by: j.created_by.clone(),
        started: time(j.started_ms),
        ended: time(j.finished_ms),
        files_done: p.files_done,
        files_total: p.files_total,
        bytes_done: human_bytes(p.bytes_done),
        bytes_total: human_bytes(p.bytes_total),
        progress_value,
        progress_max,
        message: j.message.clone(),
    }
}

async fn view_device_sync_post(
    State(state): State<WebState>,
    a: Auth<RunJobs>,
    Path(id): Path<String>,
) -> Response {
    match start_sync(state.catalog(), &a.user, &id).await {
        Ok(j) => see_other(&format!("/jobs/{}", j.id)),
        Err(e) => e.into_page(),
    }
}

#[derive(Template)]
#[template(path = "jobs/restore.html")]
struct RestorePage {
    l: Layout,
    device_id: String,
    hostname: String,
    snapshot: String,
    created: String,
    path: String,
    revert_allowed: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct RestoreQuery {
    snapshot: String,
    path: String,
}

async fn view_restore_get(
    State(state): State<WebState>,
    a: Auth<RunJobs>,
    Path(id): Path<String>,
    Query(q): Query<RestoreQuery>,
) -> Response {
    let result = async {
        let d = job_device(state.catalog(), &a.user, &id).await?;
        let s = ops::snapshot(state.catalog(), &d, &q.snapshot).await?;
        Ok::<_, OpError>((d, s))
    }
    .await;
    let (d, s) = match result {
        Ok(r) => r,
        Err(e) => return e.into_page(),
    };
    let path = if q.path.is_empty() {
        "/".to_owned()
    } else {
        q.path
    };
    render(&RestorePage {
        l: Layout::of(&a, &format!("Restore · {}", d.hostname), "devices"),
        device_id: d.id,
        hostname: d.hostname,
        snapshot: s.id,
        created: s.created,
        path,
        revert_allowed: a.user.role.allows(Permission::ManageProtection),
    })
}

/// The restore form: `confirmed` is set by the confirmation page's button only.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct RestoreForm {
    snapshot: String,
    scope: String,
    path: String,
    to: String,
    confirmed: String,
}

#[derive(Template)]
#[template(path = "jobs/confirm.html")]
struct ConfirmPage {
    l: Layout,
    device_id: String,
    hostname: String,
    snapshot: String,
    created: String,
    scope: String,
    path: String,
    to: String,
    what: String,
    consequences: Vec<String>,
    revert: bool,
}

async fn view_restore_post(
    State(state): State<WebState>,
    a: Auth<RunJobs>,
    Path(id): Path<String>,
    Form(f): Form<RestoreForm>,
) -> Response {
    let catalog = state.catalog();
    let scope = if f.scope.is_empty() {
        "paths".to_owned()
    } else {
        f.scope.clone()
    };
    let req = RestoreRequest {
        snapshot: f.snapshot.clone(),
        scope: Some(scope.clone()),
        paths: if scope == "paths" {
            vec![f.path.clone()]
        } else {
            Vec::new()
        },
        to: (scope == "paths").then(|| f.to.clone()),
    };
    if f.confirmed == "yes" {
        return match start_restore(catalog, state.hooks(), &a.user, &id, &req).await {
            Ok(j) => see_other(&format!("/jobs/{}", j.id)),
            Err(e) => e.into_page(),
        };
    }
    let result = async {
        let d = job_device(catalog, &a.user, &id).await?;
        // From the device's own pages only its own snapshots are offered.
        let s = ops::snapshot(catalog, &d, &f.snapshot).await?;
        let kind = restore_kind(catalog, &a.user, &req).await?;
        Ok::<_, OpError>((d, s, kind))
    }
    .await;
    let (d, s, kind) = match result {
        Ok(r) => r,
        Err(e) => return e.into_page(),
    };
    let revert = queue::is_revert(&kind);
    let consequences = match scope.as_str() {
        "full" => vec![
            format!(
                "{} takes a pre-revert snapshot first, so this can be undone.",
                d.hostname
            ),
            "Then every protected file becomes exactly as in the snapshot: files it lacks are \
             removed, changed files are put back, user data included."
                .into(),
            "The unprotected area (temporary files, caches, the policy's exclusions) and the \
             agent's own state stay as they are."
                .into(),
        ],
        "system-only" => vec![
            format!(
                "{} takes a pre-revert snapshot first, so this can be undone.",
                d.hostname
            ),
            "The system becomes exactly as in the snapshot: system files it lacks are \
             removed, changed ones put back."
                .into(),
            "The user area (the homes, by default) stays exactly as it is now.".into(),
        ],
        _ if f.to.trim().is_empty() => vec![
            format!(
                "{} on {} is put back as it was in the snapshot; files there now with the same \
                 names are overwritten.",
                f.path, d.hostname
            ),
            "Nothing outside it is touched.".into(),
        ],
        _ => vec![
            format!(
                "{} is copied from the snapshot into {} on {}.",
                f.path,
                f.to.trim(),
                d.hostname
            ),
            "The original place is not touched.".into(),
        ],
    };
    render(&ConfirmPage {
        l: Layout::of(&a, &format!("Confirm · {}", d.hostname), "devices"),
        device_id: d.id,
        hostname: d.hostname,
        snapshot: s.id,
        created: s.created,
        scope,
        path: f.path,
        to: f.to.trim().to_owned(),
        what: queue::describe(&kind),
        consequences,
        revert,
    })
}

#[derive(Template)]
#[template(path = "jobs/list.html")]
struct JobsPage {
    l: Layout,
    device: String,
    jobs: Vec<JobView>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct JobsQuery {
    pub device: String,
    pub limit: Option<u32>,
}

async fn view_jobs_get(
    State(state): State<WebState>,
    a: Auth<ViewFleet>,
    Query(q): Query<JobsQuery>,
) -> Response {
    let device = Some(q.device.trim()).filter(|d| !d.is_empty());
    match jobs(
        state.catalog(),
        &a.user,
        device,
        q.limit.unwrap_or(LISTED_JOBS),
    )
    .await
    {
        Ok(list) => render(&JobsPage {
            l: Layout::of(&a, "Jobs", "jobs"),
            device: device.unwrap_or_default().to_owned(),
            jobs: list.iter().map(job_view).collect(),
        }),
        Err(e) => e.into_page(),
    }
}

#[derive(Template)]
#[template(path = "jobs/detail.html")]
struct JobPage {
    l: Layout,
    j: JobView,
}

#[derive(Template)]
#[template(path = "jobs/progress_partial.html")]
struct ProgressPartial {
    j: JobView,
}

async fn view_job_get(
    State(state): State<WebState>,
    a: Auth<ViewFleet>,
    Path(id): Path<String>,
) -> Response {
    match job(state.catalog(), &id).await {
        Ok(j) => render(&JobPage {
            l: Layout::of(&a, &format!("Job {}", j.id), "jobs"),
            j: job_view(&j),
        }),
        Err(e) => e.into_page(),
    }
}

async fn view_job_progress_get(
    State(state): State<WebState>,
    _a: Auth<ViewFleet>,
    Path(id): Path<String>,
) -> Response {
    match job(state.catalog(), &id).await {
        Ok(j) => render(&ProgressPartial { j: job_view(&j) }),
        Err(e) => e.into_page(),
    }
}
