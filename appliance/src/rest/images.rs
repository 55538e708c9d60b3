//! Image management in the REST API (Image Managers and administrators): reference
//! machines, layer capture, assignments with their dry run, rollback, device groups and the
//! driver library. The same operations as the Images pages (`web::images`, `web::deploy`,
//! `web::drivers`).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::jobs::job_json;
use super::{ApiResult, Route, body, ok, op, route};
use crate::api::ApiError;
use crate::catalog::LayerRecord;
use crate::drivers::MAX_ARCHIVE_BYTES;
use crate::web::deploy::{self, AssignRequest};
use crate::web::images::{self, CaptureRequest};
use crate::web::ops::OpError;
use crate::web::{Auth, ManageImages, WebState, drivers};

pub(super) fn table() -> Vec<Route> {
    use Method as M;
    vec![
        route(M::PUT, "/api/v1/devices/{id}/reference", reference),
        route(M::GET, "/api/v1/layers", layers),
        route(M::POST, "/api/v1/layers", capture),
        route(M::POST, "/api/v1/assignments/dry-run", assign_dry_run),
        route(M::POST, "/api/v1/assignments", assign),
        route(M::POST, "/api/v1/devices/{id}/rollback", rollback),
        route(M::GET, "/api/v1/groups", groups),
        route(M::PUT, "/api/v1/groups/{name}", group_put),
        route(M::GET, "/api/v1/driver-profiles", profiles),
        route(M::PUT, "/api/v1/driver-profiles/{name}", profile_put),
        route(
            M::POST,
            "/api/v1/driver-profiles/{name}/preview",
            profile_preview,
        ),
        route(M::POST, "/api/v1/driver-sets", driver_set_import).body_limit(MAX_ARCHIVE_BYTES),
        route(M::POST, "/api/v1/devices/{id}/drivers", deliver),
    ]
}

fn created(v: Value) -> ApiResult {
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

#[derive(Deserialize)]
struct ReferenceBody {
    reference: bool,
}

async fn reference(
    State(s): State<WebState>,
    a: Auth<ManageImages>,
    Path(id): Path<String>,
    b: Result<Json<ReferenceBody>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let d = op(images::set_reference(s.catalog(), &a.user, &id, b.reference).await)?;
    ok(json!({ "device": d.id, "reference": b.reference }))
}

fn layer_json(r: &LayerRecord) -> Value {
    let l = &r.layer;
    json!({
        "name": l.name,
        "version": r.version,
        "kind": match l.kind {
            morgana_core::plugin::types::LayerKind::Base => "base",
            morgana_core::plugin::types::LayerKind::App => "app",
        },
        "notes": l.notes,
        "source_device": l.source_device,
        "snapshot": l.snapshot,
        "before_snapshot": l.before_snapshot,
        "files": l.files,
        "bytes": l.bytes,
        "removed": l.deletions.len(),
        "created": l.created,
        "created_by": l.created_by,
    })
}

async fn layers(State(s): State<WebState>, _a: Auth<ManageImages>) -> ApiResult {
    let all = op(s.catalog().layers().await.map_err(OpError::from))?;
    ok(json!({ "layers": all.iter().map(layer_json).collect::<Vec<_>>() }))
}

async fn capture(
    State(s): State<WebState>,
    a: Auth<ManageImages>,
    b: Result<Json<CaptureRequest>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let r = op(images::capture(&s, &a.user, &b).await)?;
    created(layer_json(&r))
}

fn assignment_json(a: &crate::catalog::Assignment) -> Value {
    json!({
        "base": format!("{}:{}", a.base.name, a.base.version),
        "apps": a.apps.iter().map(|p| format!("{}:{}", p.name, p.version)).collect::<Vec<_>>(),
        "do_not_override": a.do_not_override,
        "description": crate::assign::describe(a),
    })
}

async fn assign_dry_run(
    State(s): State<WebState>,
    _a: Auth<ManageImages>,
    b: Result<Json<AssignRequest>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let checked = op(deploy::dry_run(s.catalog(), &b).await)?;
    let devices: Vec<_> = checked.runs.iter().map(|(_, r)| r).collect();
    ok(json!({
        "assignment": assignment_json(&checked.assignment),
        "devices": devices,
    }))
}

async fn assign(
    State(s): State<WebState>,
    a: Auth<ManageImages>,
    b: Result<Json<AssignRequest>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let (assignment, queued) = op(deploy::apply(s.catalog(), s.hooks(), &a.user, &b).await)?;
    let devices: Vec<Value> = queued
        .iter()
        .map(|(r, j)| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["job"] = job_json(j);
            v
        })
        .collect();
    created(json!({
        "assignment": assignment_json(&assignment),
        "devices": devices,
    }))
}

async fn rollback(
    State(s): State<WebState>,
    a: Auth<ManageImages>,
    Path(id): Path<String>,
) -> ApiResult {
    let j = op(deploy::rollback(s.catalog(), &a.user, &id).await)?;
    created(job_json(&j))
}

async fn groups(State(s): State<WebState>, _a: Auth<ManageImages>) -> ApiResult {
    let all = op(s.catalog().groups().await.map_err(OpError::from))?;
    let list: Vec<Value> = all
        .iter()
        .map(|(n, d)| json!({ "name": n, "devices": d }))
        .collect();
    ok(json!({ "groups": list }))
}

#[derive(Deserialize)]
struct GroupBody {
    devices: Vec<String>,
}

async fn group_put(
    State(s): State<WebState>,
    a: Auth<ManageImages>,
    Path(name): Path<String>,
    b: Result<Json<GroupBody>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let ids = op(
        crate::assign::save_group(s.catalog(), &name, &b.devices, &a.actor())
            .await
            .map_err(OpError::from),
    )?;
    ok(json!({ "name": name, "devices": ids }))
}

async fn profiles(State(s): State<WebState>, _a: Auth<ManageImages>) -> ApiResult {
    let all = op(crate::drivers::profiles(s.catalog())
        .await
        .map_err(OpError::from))?;
    let list: Vec<Value> = all
        .iter()
        .map(|(r, spec)| {
            json!({
                "name": r.name,
                "rules": spec,
                "toml": toml::to_string(spec).unwrap_or_default(),
                "updated": r.updated,
                "updated_by": r.updated_by,
            })
        })
        .collect();
    ok(json!({ "profiles": list }))
}

#[derive(Deserialize)]
struct ProfileBody {
    /// The profile file, as `morgana driver profile set` reads it.
    toml: String,
}

async fn profile_put(
    State(s): State<WebState>,
    a: Auth<ManageImages>,
    Path(name): Path<String>,
    b: Result<Json<ProfileBody>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let spec = op(drivers::save_profile(&s, &a.user, &name, &b.toml).await)?;
    ok(json!({ "name": name, "rules": spec }))
}

async fn profile_preview(
    State(s): State<WebState>,
    _a: Auth<ManageImages>,
    Path(name): Path<String>,
    b: Result<Json<ProfileBody>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let all = op(drivers::preview_profile(&s, &name, &b.toml).await)?;
    ok(json!({ "devices": all }))
}

#[derive(Deserialize)]
struct ImportQuery {
    name: String,
    #[serde(default)]
    notes: String,
}

async fn driver_set_import(
    State(s): State<WebState>,
    a: Auth<ManageImages>,
    q: Result<Query<ImportQuery>, QueryRejection>,
    archive: Bytes,
) -> Result<Response, ApiError> {
    let Ok(Query(q)) = q else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "name the driver set: POST /api/v1/driver-sets?name=NAME[&notes=TEXT] with the \
             .tar of its folder as the body",
        ));
    };
    let r = op(drivers::import(&s, &a.user, &q.name, &q.notes, archive.to_vec()).await)?;
    created(json!({
        "name": r.set.name,
        "version": r.version,
        "files": r.set.files,
        "bytes": r.set.bytes,
        "notes": r.set.notes,
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeliverBody {
    /// Parent folder on the device for every set (default: each profile's path).
    #[serde(default)]
    path: Option<String>,
}

async fn deliver(
    State(s): State<WebState>,
    a: Auth<ManageImages>,
    Path(id): Path<String>,
    b: Bytes,
) -> ApiResult {
    // No body at all is fine: each profile's own path.
    let b: DeliverBody = if b.iter().all(u8::is_ascii_whitespace) {
        DeliverBody::default()
    } else {
        serde_json::from_slice(&b).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "the request body is not what this call takes ({e}): send nothing or \
                     {{\"path\": \"/opt/morgana/drivers\"}}; nothing was queued"
                ),
            )
        })?
    };
    let queued = op(drivers::deliver(&s, &a.user, &id, b.path.as_deref()).await)?;
    let list: Vec<Value> = queued
        .iter()
        .map(|(d, j)| json!({ "delivery": d, "job": job_json(j) }))
        .collect();
    created(json!({ "deliveries": list }))
}
