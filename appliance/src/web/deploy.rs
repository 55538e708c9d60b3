//! Deploying layers from the UI (Image Managers and administrators): pick devices or a
//! saved group, a base layer and ordered app layers, and paths never to override; the dry
//! run comes first and is the confirmation page; confirming records the assignment and
//! queues an apply job per device, whose progress the deployment page follows (htmx polls
//! a fragment until every job has ended). Rolling a device back has its own confirmation.
//! The work is [`crate::assign`], as for `morgana layer assign|rollback`.

use askama::Template;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use morgana_core::plugin::types::LayerKind;
use serde::Deserialize;

use super::jobs::{JobView, job_view};
use super::ops::{self, OpError, OpResult, human_bytes};
use super::ui::{Layout, render, see_other};
use super::{Auth, ManageImages, WebState};
use crate::assign::{self, AssignError, DryRun, Plan};
use crate::catalog::{Assignment, Catalog, JobRecord, User};

/// Devices offered as checkboxes, and jobs one deployment page follows, at most.
const MAX_DEVICES: usize = 500;
/// App layers one assignment stacks from the form.
const APP_SLOTS: usize = 4;
/// Paths per list the dry run page shows (the counts are always whole).
const LISTED_PATHS: usize = 50;

pub fn routes() -> Router<WebState> {
    Router::new()
        .route(
            "/images/assign",
            get(view_assign_get).post(view_assign_post),
        )
        .route("/images/deployment", get(view_deployment_get))
        .route(
            "/images/deployment/progress",
            get(view_deployment_progress_get),
        )
        .route(
            "/devices/{id}/rollback",
            get(view_rollback_get).post(view_rollback_post),
        )
}

impl From<AssignError> for OpError {
    fn from(e: AssignError) -> OpError {
        match e {
            AssignError::Catalog(c) => OpError::Catalog(c),
            AssignError::Device(d) => d.into(),
            AssignError::NoLayer(_) | AssignError::NoGroup(_) => OpError::NotFound(e.to_string()),
            AssignError::NothingApplied(_) | AssignError::NoPreUpdateSnapshot(_) => {
                OpError::Conflict(e.to_string())
            }
            AssignError::Tree(_) | AssignError::Store(_) | AssignError::Task(_) => {
                OpError::Internal(format!("reading layers and snapshots ({e})"))
            }
            _ => OpError::Invalid(e.to_string()),
        }
    }
}

// ---- Operations (UI and API) ----

/// What a caller asks to assign (the API's JSON body, the UI's form).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct AssignRequest {
    /// Device ids or hostnames.
    pub devices: Vec<String>,
    /// Saved groups.
    pub groups: Vec<String>,
    /// `NAME` or `NAME:VERSION`.
    pub base: String,
    /// `NAME` or `NAME:VERSION`, in order: a later layer wins.
    pub apps: Vec<String>,
    pub do_not_override: Vec<String>,
}

/// The checked request: its devices, its assignment, and each device's plan and dry run.
pub struct Checked {
    pub ids: Vec<String>,
    pub assignment: Assignment,
    pub runs: Vec<(Plan, DryRun)>,
}

pub async fn dry_run(catalog: &dyn Catalog, req: &AssignRequest) -> OpResult<Checked> {
    if req.base.trim().is_empty() {
        return Err(OpError::Invalid(
            "pick a base layer: every assignment starts from one; nothing was changed".into(),
        ));
    }
    let ids = assign::targets(catalog, &req.devices, &req.groups).await?;
    if ids.len() > MAX_DEVICES {
        return Err(OpError::Invalid(format!(
            "{} devices at once is more than one assignment takes ({MAX_DEVICES}); split them \
             into groups; nothing was changed",
            ids.len()
        )));
    }
    let paths: Vec<String> = req
        .do_not_override
        .iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    let assignment = assign::assignment(catalog, &req.base, &req.apps, &paths).await?;
    let runs = assign::dry_runs(catalog, &ids, &assignment).await?;
    Ok(Checked {
        ids,
        assignment,
        runs,
    })
}

/// Checks the request again (the layers or devices may have changed since its dry run),
/// records it and queues the apply jobs.
pub async fn apply(
    catalog: &dyn Catalog,
    hooks: &crate::hooks::Hooks,
    caller: &User,
    req: &AssignRequest,
) -> OpResult<(Assignment, Vec<(DryRun, JobRecord)>)> {
    let checked = dry_run(catalog, req).await?;
    let (plans, reports): (Vec<Plan>, Vec<DryRun>) = checked.runs.into_iter().unzip();
    let jobs = assign::apply(
        catalog,
        hooks,
        &checked.ids,
        &checked.assignment,
        plans,
        &actor(caller),
    )
    .await?;
    Ok((checked.assignment, reports.into_iter().zip(jobs).collect()))
}

pub async fn rollback(catalog: &dyn Catalog, caller: &User, device: &str) -> OpResult<JobRecord> {
    let d = ops::device(catalog, caller, device).await?;
    Ok(assign::rollback(catalog, &d.id, &actor(caller)).await?)
}

fn actor(u: &User) -> String {
    format!("user:{}", u.name)
}

// ---- The assign form and its dry run ----

/// A layer version offered in a picker.
pub struct LayerOption {
    pub value: String,
    pub label: String,
    pub selected: bool,
}

pub struct DeviceOption {
    pub id: String,
    pub hostname: String,
    pub checked: bool,
}

#[derive(Template)]
#[template(path = "images/assign.html")]
struct AssignPage {
    l: Layout,
    error: String,
    devices: Vec<DeviceOption>,
    groups: Vec<(String, usize, bool)>,
    bases: Vec<LayerOption>,
    app_slots: Vec<Vec<LayerOption>>,
    do_not_override: String,
}

/// The form's fields: `devices` repeats (checkboxes), `app` once per slot.
fn parse_form(body: &[u8]) -> (AssignRequest, bool) {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).unwrap_or_default();
    let mut req = AssignRequest::default();
    let mut confirmed = false;
    for (k, v) in pairs {
        match k.as_str() {
            "devices" => req.devices.push(v),
            "group" if !v.trim().is_empty() => req.groups.push(v),
            "base" => req.base = v,
            "app" if !v.trim().is_empty() => req.apps.push(v),
            "do_not_override" => req.do_not_override.extend(
                v.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned),
            ),
            "confirmed" => confirmed = v == "yes",
            _ => {}
        }
    }
    (req, confirmed)
}

async fn assign_page(
    state: &WebState,
    a: &Auth<ManageImages>,
    status: StatusCode,
    error: String,
    req: &AssignRequest,
) -> Response {
    let c = state.catalog();
    let found =
        async { Ok::<_, OpError>((c.devices().await?, c.groups().await?, c.layers().await?)) }
            .await;
    let (devices, groups, layers) = match found {
        Ok(f) => f,
        Err(e) => return e.into_page(),
    };
    let options = |kind: LayerKind, chosen: &str| -> Vec<LayerOption> {
        layers
            .iter()
            .rev()
            .filter(|r| r.layer.kind == kind)
            .map(|r| {
                let value = format!("{}:{}", r.layer.name, r.version);
                LayerOption {
                    selected: value == chosen,
                    label: format!(
                        "{} v{} ({} files, {})",
                        r.layer.name,
                        r.version,
                        r.layer.files,
                        human_bytes(r.layer.bytes)
                    ),
                    value,
                }
            })
            .collect()
    };
    let page = AssignPage {
        l: Layout::of(a, "Assign layers", "images"),
        error,
        devices: devices
            .iter()
            .filter(|d| !d.device.revoked)
            .take(MAX_DEVICES)
            .map(|d| DeviceOption {
                checked: req.devices.contains(&d.device.id),
                id: d.device.id.clone(),
                hostname: d.device.hostname.clone(),
            })
            .collect(),
        groups: groups
            .iter()
            .map(|(n, m)| (n.clone(), m.len(), req.groups.contains(n)))
            .collect(),
        bases: options(LayerKind::Base, &req.base),
        app_slots: (0..APP_SLOTS)
            .map(|i| options(LayerKind::App, req.apps.get(i).map_or("", String::as_str)))
            .collect(),
        do_not_override: req.do_not_override.join("\n"),
    };
    (status, render(&page)).into_response()
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct AssignQuery {
    device: String,
}

async fn view_assign_get(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Query(q): Query<AssignQuery>,
) -> Response {
    let req = AssignRequest {
        devices: vec![q.device],
        ..Default::default()
    };
    assign_page(&state, &a, StatusCode::OK, String::new(), &req).await
}

pub struct DryRunRow {
    pub device: String,
    pub href: String,
    pub snapshot: String,
    pub add: usize,
    pub replace: usize,
    pub remove: usize,
    pub kept: usize,
    pub download: String,
    pub conflicts: Vec<(String, &'static str, String)>,
    pub lists: Vec<(&'static str, Vec<String>, usize)>,
}

#[derive(Template)]
#[template(path = "images/dry_run.html")]
struct DryRunPage {
    l: Layout,
    what: String,
    rows: Vec<DryRunRow>,
    conflicts: usize,
    /// The request again, as hidden fields of the confirming form.
    fields: Vec<(&'static str, String)>,
}

fn listed(paths: &[String]) -> (Vec<String>, usize) {
    (
        paths.iter().take(LISTED_PATHS).cloned().collect(),
        paths.len().saturating_sub(LISTED_PATHS),
    )
}

async fn dry_run_row(catalog: &dyn Catalog, r: &DryRun) -> DryRunRow {
    let hostname = match catalog.device_status(&r.device).await {
        Ok(Some(s)) => s.device.hostname,
        _ => String::new(),
    };
    let lists = [
        ("Added", &r.add),
        ("Replaced", &r.replace),
        ("Removed", &r.remove),
    ]
    .into_iter()
    .filter(|(_, p)| !p.is_empty())
    .map(|(what, p)| {
        let (shown, more) = listed(p);
        (what, shown, more)
    })
    .collect();
    DryRunRow {
        device: format!("{hostname} ({})", r.device),
        href: format!("/devices/{}", r.device),
        snapshot: r.snapshot.clone().unwrap_or_default(),
        add: r.add.len(),
        replace: r.replace.len(),
        remove: r.remove.len(),
        kept: r.kept.len(),
        download: human_bytes(r.download_bytes),
        conflicts: r
            .conflicts
            .iter()
            .map(|c| (c.path.clone(), c.kind, c.detail.clone()))
            .collect(),
        lists,
    }
}

async fn view_assign_post(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    body: Bytes,
) -> Response {
    let (req, confirmed) = parse_form(&body);
    let catalog = state.catalog();
    if confirmed {
        return match apply(catalog, state.hooks(), &a.user, &req).await {
            Ok((_, queued)) => {
                let ids: Vec<&str> = queued.iter().map(|(_, j)| j.id.as_str()).collect();
                see_other(&format!("/images/deployment?jobs={}", ids.join(",")))
            }
            Err(e) if e.status() == StatusCode::INTERNAL_SERVER_ERROR => e.into_page(),
            Err(e) => assign_page(&state, &a, e.status(), e.to_string(), &req).await,
        };
    }
    let checked = match dry_run(catalog, &req).await {
        Ok(c) => c,
        Err(e) if e.status() == StatusCode::INTERNAL_SERVER_ERROR => return e.into_page(),
        Err(e) => return assign_page(&state, &a, e.status(), e.to_string(), &req).await,
    };
    let mut rows = Vec::with_capacity(checked.runs.len());
    for (_, r) in &checked.runs {
        rows.push(dry_run_row(catalog, r).await);
    }
    // The devices as resolved, so confirming queues for exactly these.
    let mut fields: Vec<(&'static str, String)> =
        checked.ids.iter().map(|d| ("devices", d.clone())).collect();
    let pins = &checked.assignment;
    fields.push(("base", format!("{}:{}", pins.base.name, pins.base.version)));
    fields.extend(
        pins.apps
            .iter()
            .map(|p| ("app", format!("{}:{}", p.name, p.version))),
    );
    if !pins.do_not_override.is_empty() {
        fields.push(("do_not_override", pins.do_not_override.join("\n")));
    }
    render(&DryRunPage {
        l: Layout::of(&a, "Dry run", "images"),
        what: assign::describe(&checked.assignment),
        conflicts: rows.iter().map(|r| r.conflicts.len()).sum(),
        rows,
        fields,
    })
}

// ---- Deployment progress ----

pub struct DeploymentRow {
    pub device: String,
    pub href: String,
    pub j: JobView,
}

#[derive(Template)]
#[template(path = "images/deployment.html")]
struct DeploymentPage {
    l: Layout,
    p: Progress,
}

#[derive(Template)]
#[template(path = "images/deployment_partial.html")]
struct ProgressPartial {
    p: Progress,
}

pub struct Progress {
    query: String,
    rows: Vec<DeploymentRow>,
    finished: bool,
    succeeded: usize,
    failed: usize,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct DeploymentQuery {
    jobs: String,
}

async fn progress(catalog: &dyn Catalog, q: &DeploymentQuery) -> OpResult<Progress> {
    let ids: Vec<&str> = q
        .jobs
        .split(',')
        .map(str::trim)
        .filter(|j| !j.is_empty())
        .take(MAX_DEVICES)
        .collect();
    if ids.is_empty() {
        return Err(OpError::Invalid(
            "name the jobs to follow (?jobs=ID,ID); assigning layers leads here with them".into(),
        ));
    }
    let mut rows = Vec::with_capacity(ids.len());
    for id in &ids {
        let j = super::jobs::job(catalog, id).await?;
        let hostname = match catalog.device_status(&j.device_id).await? {
            Some(s) => s.device.hostname,
            None => j.device_id.clone(),
        };
        rows.push(DeploymentRow {
            device: hostname,
            href: format!("/devices/{}", j.device_id),
            j: job_view(&j),
        });
    }
    Ok(Progress {
        query: ids.join(","),
        finished: rows.iter().all(|r| r.j.finished),
        succeeded: rows.iter().filter(|r| r.j.state == "succeeded").count(),
        failed: rows.iter().filter(|r| r.j.state == "failed").count(),
        rows,
    })
}

async fn view_deployment_get(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Query(q): Query<DeploymentQuery>,
) -> Response {
    match progress(state.catalog(), &q).await {
        Ok(p) => render(&DeploymentPage {
            l: Layout::of(&a, "Deployment", "images"),
            p,
        }),
        Err(e) => e.into_page(),
    }
}

async fn view_deployment_progress_get(
    State(state): State<WebState>,
    _a: Auth<ManageImages>,
    Query(q): Query<DeploymentQuery>,
) -> Response {
    match progress(state.catalog(), &q).await {
        Ok(p) => render(&ProgressPartial { p }),
        Err(e) => e.into_page(),
    }
}

// ---- Rollback ----

#[derive(Template)]
#[template(path = "images/rollback.html")]
struct RollbackPage {
    l: Layout,
    device_id: String,
    hostname: String,
    applied: String,
    snapshot: String,
    created: String,
}

async fn view_rollback_get(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Path(id): Path<String>,
) -> Response {
    let catalog = state.catalog();
    let found = async {
        let d = ops::device(catalog, &a.user, &id).await?;
        let Some(applied) = catalog.applied_layers(&d.id).await? else {
            return Err(AssignError::NothingApplied(d.id.clone()).into());
        };
        let Some(snapshot) = assign::pre_update_snapshot(catalog, &d.id).await? else {
            return Err(AssignError::NoPreUpdateSnapshot(d.id.clone()).into());
        };
        Ok::<_, OpError>((d, applied, snapshot))
    }
    .await;
    let (d, applied, snapshot) = match found {
        Ok(f) => f,
        Err(e) => return e.into_page(),
    };
    render(&RollbackPage {
        l: Layout::of(&a, &format!("Roll back · {}", d.hostname), "images"),
        applied: std::iter::once(&applied.applied.base)
            .chain(&applied.applied.apps)
            .map(|l| format!("{} v{}", l.name, l.version))
            .collect::<Vec<_>>()
            .join(" + "),
        device_id: d.id,
        hostname: d.hostname,
        snapshot: snapshot.id,
        created: snapshot.created,
    })
}

async fn view_rollback_post(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Path(id): Path<String>,
) -> Response {
    match rollback(state.catalog(), &a.user, &id).await {
        Ok(j) => see_other(&format!("/jobs/{}", j.id)),
        Err(e) => e.into_page(),
    }
}
