//! The Image Manager's pages: the overview (layers, reference machines, groups, driver
//! sets and profiles, and each device's deployment with its newest apply job), marking
//! reference machines, capturing base and app layers (a confirmation first, then the new
//! version), and saved device groups. Assigning and rolling back are in `deploy`, the
//! driver library in `drivers`; the work is [`crate::layers`] and [`crate::assign`], as
//! for `morgana reference|layer|group`.

use askama::Template;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use morgana_core::control::JobKind;
use morgana_core::plugin::types::LayerKind;
use morgana_core::wire::SnapshotInfo;
use serde::Deserialize;

use super::ops::{self, OpError, OpResult, human_bytes};
use super::ui::{Layout, render, see_other};
use super::{Auth, ManageImages, WebState};
use crate::catalog::{Catalog, Device, LayerPin, LayerRecord, User};
use crate::layers::{self, LayerError, Request};

/// Devices with an assignment listed at most.
const MAX_DEPLOYMENTS: usize = 500;

pub fn routes() -> Router<WebState> {
    Router::new()
        .route("/images", get(view_images_get))
        .route("/images/references", post(view_references_post))
        .route(
            "/images/capture",
            get(view_capture_get).post(view_capture_post),
        )
        .route("/images/groups", post(view_groups_post))
}

impl From<LayerError> for OpError {
    fn from(e: LayerError) -> OpError {
        match e {
            LayerError::Catalog(c) => OpError::Catalog(c),
            LayerError::NoDevice(_) | LayerError::NoSnapshot(_) => OpError::NotFound(e.to_string()),
            LayerError::NoChanges { .. } | LayerError::NoSnapshots(_) => {
                OpError::Conflict(e.to_string())
            }
            LayerError::Store(_)
            | LayerError::Tree(_)
            | LayerError::Rules(_)
            | LayerError::Task(_) => OpError::Internal(format!("capturing the layer ({e})")),
            _ => OpError::Invalid(e.to_string()),
        }
    }
}

// ---- Operations (UI and API) ----

fn actor(u: &User) -> String {
    format!("user:{}", u.name)
}

/// Marks (or unmarks) a device as a reference machine.
pub async fn set_reference(
    catalog: &dyn Catalog,
    caller: &User,
    device: &str,
    on: bool,
) -> OpResult<Device> {
    let d = crate::policy::find_device(catalog, device.trim()).await?;
    layers::set_reference(catalog, &d.id, on, &actor(caller)).await?;
    Ok(d)
}

/// What a caller asks to capture (the API's JSON body, the UI's form).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct CaptureRequest {
    /// `base` or `app`.
    pub kind: String,
    pub name: String,
    pub notes: String,
    /// The reference machine.
    pub device: String,
    /// Base: the snapshot (default: the newest).
    pub snapshot: String,
    /// App: the snapshots before and after (default after: the newest).
    pub before: String,
    pub after: String,
}

/// A checked capture: what will be read, and the version it will make.
pub struct CapturePlan {
    pub kind: LayerKind,
    pub device: Device,
    pub before: Option<SnapshotInfo>,
    pub snapshot: SnapshotInfo,
    pub next_version: u32,
}

fn some(s: &str) -> Option<&str> {
    Some(s.trim()).filter(|s| !s.is_empty())
}

pub async fn check_capture(catalog: &dyn Catalog, req: &CaptureRequest) -> OpResult<CapturePlan> {
    let kind = match req.kind.as_str() {
        "base" => LayerKind::Base,
        "app" => LayerKind::App,
        other => {
            return Err(OpError::Invalid(format!(
                "{other:?} is not a kind of layer: say `base` or `app`; nothing was captured"
            )));
        }
    };
    let name = layers::check_name(req.name.trim())?;
    let device = layers::reference_machine(catalog, req.device.trim()).await?;
    let (before, snapshot) = match kind {
        LayerKind::Base => (
            None,
            layers::device_snapshot(catalog, &device, some(&req.snapshot)).await?,
        ),
        LayerKind::App => {
            let Some(before) = some(&req.before) else {
                return Err(OpError::Invalid(
                    "pick the snapshot from before the applications were installed; nothing \
                     was captured"
                        .into(),
                ));
            };
            let before = layers::device_snapshot(catalog, &device, Some(before)).await?;
            let after = layers::device_snapshot(catalog, &device, some(&req.after)).await?;
            if before.id == after.id {
                return Err(LayerError::SameSnapshot(after.id).into());
            }
            (Some(before), after)
        }
    };
    if let Some(existing) = catalog.layer(name, None).await?
        && existing.layer.kind != kind
    {
        return Err(OpError::Conflict(format!(
            "layer {name} is {} layer already: pick another name; nothing was captured",
            match existing.layer.kind {
                LayerKind::Base => "a base",
                LayerKind::App => "an app",
            }
        )));
    }
    let next_version = catalog
        .layer(name, None)
        .await?
        .map_or(1, |r| r.version + 1);
    Ok(CapturePlan {
        kind,
        device,
        before,
        snapshot,
        next_version,
    })
}

pub async fn capture(
    state: &WebState,
    caller: &User,
    req: &CaptureRequest,
) -> OpResult<LayerRecord> {
    let plan = check_capture(state.catalog(), req).await?;
    let env = state.layer_env();
    let actor = actor(caller);
    let r = Request {
        name: req.name.trim(),
        notes: req.notes.trim(),
        actor: &actor,
        device: &plan.device,
    };
    Ok(match &plan.before {
        None => layers::capture_base(&env, &r, &plan.snapshot).await?,
        Some(before) => layers::capture_app(&env, &r, before, &plan.snapshot).await?,
    })
}

pub struct LayerRow {
    pub name: String,
    pub kind: &'static str,
    pub version: u32,
    pub source: String,
    pub snapshot: String,
    pub files: u64,
    pub size: String,
    pub notes: String,
}

pub struct DeploymentRow {
    pub device: String,
    pub href: String,
    pub assigned: String,
    pub applied: String,
    pub job: String,
    pub job_href: String,
    pub state: &'static str,
    pub progress: String,
    pub device_id: String,
}

#[derive(Template)]
#[template(path = "images/index.html")]
struct ImagesPage {
    l: Layout,
    notice: String,
    layers: Vec<LayerRow>,
    references: Vec<(String, String)>,
    /// Devices that could be marked: (id, hostname).
    others: Vec<(String, String)>,
    /// (name, member ids separated by spaces, member count).
    groups: Vec<(String, String, usize)>,
    driver_sets: Vec<(String, u32, u64, String)>,
    profiles: Vec<String>,
    deployments: Vec<DeploymentRow>,
    capped: bool,
}

fn pins(base: &LayerPin, apps: &[LayerPin]) -> String {
    std::iter::once(base)
        .chain(apps)
        .map(|p| format!("{} v{}", p.name, p.version))
        .collect::<Vec<_>>()
        .join(" + ")
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct NoticeQuery {
    ok: String,
}

async fn view_images_get(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Query(n): Query<NoticeQuery>,
) -> Response {
    let c = state.catalog();
    let page = async {
        let layers = c.layers().await?;
        let references = c.reference_devices().await?;
        let groups = c.groups().await?;
        let all = c.devices().await?;
        let others = all
            .iter()
            .filter(|d| !d.device.revoked && !references.iter().any(|r| r.id == d.device.id))
            .take(MAX_DEPLOYMENTS)
            .map(|d| (d.device.id.clone(), d.device.hostname.clone()))
            .collect();
        let sets = c.driver_sets().await?;
        let profiles = c.driver_profiles().await?;
        let mut deployments = Vec::new();
        let mut capped = false;
        for d in all {
            let Some(assigned) = c.layer_assignment(&d.device.id).await? else {
                continue;
            };
            if deployments.len() == MAX_DEPLOYMENTS {
                capped = true;
                break;
            }
            let applied = c.applied_layers(&d.device.id).await?;
            let newest_apply =
                c.jobs(Some(&d.device.id), 50).await?.into_iter().find(|j| {
                    matches!(j.kind, JobKind::ApplyLayers(_) | JobKind::RollbackLayers(_))
                });
            let p = newest_apply.as_ref().map(|j| &j.progress);
            deployments.push(DeploymentRow {
                device_id: d.device.id.clone(),
                device: format!("{} ({})", d.device.hostname, d.device.id),
                href: format!("/devices/{}", d.device.id),
                assigned: pins(&assigned.assignment.base, &assigned.assignment.apps),
                applied: applied
                    .map(|r| {
                        std::iter::once(&r.applied.base)
                            .chain(&r.applied.apps)
                            .map(|l| format!("{} v{}", l.name, l.version))
                            .collect::<Vec<_>>()
                            .join(" + ")
                    })
                    .unwrap_or_default(),
                job: newest_apply
                    .as_ref()
                    .map(|j| j.id.clone())
                    .unwrap_or_default(),
                job_href: newest_apply
                    .as_ref()
                    .map(|j| format!("/jobs/{}", j.id))
                    .unwrap_or_default(),
                state: newest_apply
                    .as_ref()
                    .map_or("", |j| crate::jobs::state_name(j.state)),
                progress: p
                    .map(|p| {
                        format!(
                            "{} of {} files, {} of {}",
                            p.files_done,
                            p.files_total,
                            human_bytes(p.bytes_done),
                            human_bytes(p.bytes_total)
                        )
                    })
                    .unwrap_or_default(),
            });
        }
        Ok::<_, OpError>(ImagesPage {
            l: Layout::of(&a, "Images", "images"),
            notice: match n.ok.as_str() {
                "marked" => "Marked as a reference machine: capture layers from it below.",
                "unmarked" => "No longer a reference machine; the layers captured from it stay.",
                "group" => "Group saved.",
                "imported" => "Driver set imported.",
                "profile" => "Driver profile saved.",
                _ => "",
            }
            .to_owned(),
            others,
            groups: groups
                .into_iter()
                .map(|(n, m)| (n, m.join(" "), m.len()))
                .collect(),
            layers: layers.iter().map(layer_row).collect(),
            references: references.into_iter().map(|d| (d.id, d.hostname)).collect(),
            driver_sets: sets
                .into_iter()
                .map(|s| (s.set.name, s.version, s.set.files, human_bytes(s.set.bytes)))
                .collect(),
            profiles: profiles.into_iter().map(|p| p.name).collect(),
            deployments,
            capped,
        })
    }
    .await;
    match page {
        Ok(p) => render(&p),
        Err(e) => e.into_page(),
    }
}

// ---- Reference machines ----

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ReferenceForm {
    device: String,
    /// `true` marks, anything else unmarks.
    on: String,
    /// `device` goes back to the device's page, otherwise the Images page.
    back: String,
}

async fn view_references_post(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Form(f): Form<ReferenceForm>,
) -> Response {
    let on = f.on == "true";
    match set_reference(state.catalog(), &a.user, &f.device, on).await {
        Ok(d) if f.back == "device" => see_other(&format!(
            "/devices/{}?ok={}",
            d.id,
            if on { "reference-on" } else { "reference-off" }
        )),
        Ok(_) => see_other(if on {
            "/images?ok=marked"
        } else {
            "/images?ok=unmarked"
        }),
        Err(e) => e.into_page(),
    }
}

// ---- Capture ----

#[derive(Template)]
#[template(path = "images/capture.html")]
struct CapturePage {
    l: Layout,
    error: String,
    device_id: String,
    hostname: String,
    kind: String,
    name: String,
    notes: String,
    /// (id, created, reason), newest first.
    snapshots: Vec<(String, String, String)>,
    snapshot: String,
    before: String,
    after: String,
}

async fn capture_page(
    state: &WebState,
    a: &Auth<ManageImages>,
    status: StatusCode,
    error: String,
    req: &CaptureRequest,
) -> Response {
    let c = state.catalog();
    let found = async {
        let d = layers::reference_machine(c, req.device.trim()).await?;
        let snaps = ops::snapshots(c, &d.id).await?;
        Ok::<_, OpError>((d, snaps))
    }
    .await;
    let (d, snaps) = match found {
        Ok(f) => f,
        Err(e) => return e.into_page(),
    };
    let page = CapturePage {
        l: Layout::of(a, &format!("Capture · {}", d.hostname), "images"),
        error,
        device_id: d.id,
        hostname: d.hostname,
        kind: if req.kind == "app" { "app" } else { "base" }.into(),
        name: req.name.clone(),
        notes: req.notes.clone(),
        snapshots: snaps
            .iter()
            .rev()
            .map(|s| (s.id.clone(), s.created.clone(), s.reason.clone()))
            .collect(),
        snapshot: req.snapshot.clone(),
        before: req.before.clone(),
        after: req.after.clone(),
    };
    (status, render(&page)).into_response()
}

async fn view_capture_get(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Query(req): Query<CaptureRequest>,
) -> Response {
    capture_page(&state, &a, StatusCode::OK, String::new(), &req).await
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct CaptureForm {
    #[serde(flatten)]
    req: CaptureRequest,
    confirmed: String,
}

#[derive(Template)]
#[template(path = "images/capture_confirm.html")]
struct CaptureConfirmPage {
    l: Layout,
    req: CaptureRequest,
    hostname: String,
    kind: &'static str,
    version: u32,
    snapshot: (String, String),
    before: Option<(String, String)>,
}

#[derive(Template)]
#[template(path = "images/captured.html")]
struct CapturedPage {
    l: Layout,
    r: LayerRow,
    removed: usize,
}

fn layer_row(r: &LayerRecord) -> LayerRow {
    LayerRow {
        name: r.layer.name.clone(),
        kind: match r.layer.kind {
            LayerKind::Base => "base",
            LayerKind::App => "app",
        },
        version: r.version,
        source: r.layer.source_device.clone(),
        snapshot: r.layer.snapshot.clone(),
        files: r.layer.files,
        size: human_bytes(r.layer.bytes),
        notes: r.layer.notes.clone(),
    }
}

async fn view_capture_post(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Form(f): Form<CaptureForm>,
) -> Response {
    if f.confirmed == "yes" {
        return match capture(&state, &a.user, &f.req).await {
            Ok(r) => render(&CapturedPage {
                l: Layout::of(&a, "Layer captured", "images"),
                removed: r.layer.deletions.len(),
                r: layer_row(&r),
            }),
            Err(e) => capture_failed(&state, &a, &f.req, e).await,
        };
    }
    match check_capture(state.catalog(), &f.req).await {
        Ok(plan) => render(&CaptureConfirmPage {
            l: Layout::of(&a, "Confirm capture", "images"),
            hostname: plan.device.hostname.clone(),
            kind: match plan.kind {
                LayerKind::Base => "base",
                LayerKind::App => "app",
            },
            version: plan.next_version,
            snapshot: (plan.snapshot.id.clone(), plan.snapshot.created.clone()),
            before: plan.before.map(|b| (b.id, b.created)),
            req: CaptureRequest {
                device: plan.device.id,
                snapshot: plan.snapshot.id,
                ..f.req.clone()
            },
        }),
        Err(e) => capture_failed(&state, &a, &f.req, e).await,
    }
}

/// A refused capture: the form again with the error, or the error page when there is no
/// form to show (no such reference machine, or the appliance failed).
async fn capture_failed(
    state: &WebState,
    a: &Auth<ManageImages>,
    req: &CaptureRequest,
    e: OpError,
) -> Response {
    let status = e.status();
    if status == StatusCode::INTERNAL_SERVER_ERROR || status == StatusCode::NOT_FOUND {
        return e.into_page();
    }
    capture_page(state, a, status, e.to_string(), req).await
}

// ---- Groups ----

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct GroupForm {
    name: String,
    /// Device ids or hostnames, separated by spaces or lines.
    devices: String,
}

async fn view_groups_post(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Form(f): Form<GroupForm>,
) -> Response {
    let devices: Vec<String> = f.devices.split_whitespace().map(str::to_owned).collect();
    match crate::assign::save_group(state.catalog(), f.name.trim(), &devices, &a.actor()).await {
        Ok(_) => see_other("/images?ok=group"),
        Err(e) => OpError::from(e).into_page(),
    }
}
