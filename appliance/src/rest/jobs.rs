//! `/api/v1` routes for jobs (sync now, restores, reverts) and the per-device portal switch:
//! the same operations as the UI's (`web::jobs`, `web::portal`).

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiResult, Route, body, ok, op, route};
use crate::catalog::JobRecord;
use crate::web::jobs::{self, JobsQuery, RestoreRequest};
use crate::web::{Administer, Auth, RunJobs, ViewFleet, WebState, portal};

pub fn table() -> Vec<Route> {
    use Method as M;
    vec![
        route(M::POST, "/api/v1/devices/{id}/jobs", job_create),
        route(M::GET, "/api/v1/jobs", job_list),
        route(M::GET, "/api/v1/jobs/{id}", job_show),
        route(M::PUT, "/api/v1/devices/{id}/portal", device_portal),
    ]
}

pub fn job_json(j: &JobRecord) -> Value {
    let time = |t: Option<i64>| t.map(crate::clock::rfc3339_ms);
    json!({
        "id": j.id,
        "device_id": j.device_id,
        "kind": j.kind,
        "what": crate::jobs::describe(&j.kind),
        "state": crate::jobs::state_name(j.state),
        "progress": j.progress,
        "message": j.message,
        "created": time(Some(j.created_ms)),
        "started": time(j.started_ms),
        "finished": time(j.finished_ms),
        "created_by": j.created_by,
    })
}

/// `{"type": "sync"}` or `{"type": "restore", "snapshot": ..., "scope": ..., ...}`.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum NewJob {
    Sync,
    Restore {
        snapshot: String,
        #[serde(default)]
        scope: Option<String>,
        #[serde(default)]
        paths: Vec<String>,
        #[serde(default)]
        to: Option<String>,
    },
}

async fn job_create(
    State(s): State<WebState>,
    a: Auth<RunJobs>,
    Path(id): Path<String>,
    b: Result<Json<NewJob>, JsonRejection>,
) -> ApiResult {
    let job = match body(b)? {
        NewJob::Sync => op(jobs::start_sync(s.catalog(), &a.user, &id).await)?,
        NewJob::Restore {
            snapshot,
            scope,
            paths,
            to,
        } => {
            let req = RestoreRequest {
                snapshot,
                scope,
                paths,
                to,
            };
            op(jobs::start_restore(s.catalog(), s.hooks(), &a.user, &id, &req).await)?
        }
    };
    Ok((StatusCode::CREATED, Json(job_json(&job))).into_response())
}

async fn job_list(
    State(s): State<WebState>,
    a: Auth<ViewFleet>,
    Query(q): Query<JobsQuery>,
) -> ApiResult {
    let device = Some(q.device.trim()).filter(|d| !d.is_empty());
    let list = op(jobs::jobs(s.catalog(), &a.user, device, q.limit.unwrap_or(50)).await)?;
    ok(json!({ "jobs": list.iter().map(job_json).collect::<Vec<_>>() }))
}

async fn job_show(
    State(s): State<WebState>,
    _a: Auth<ViewFleet>,
    Path(id): Path<String>,
) -> ApiResult {
    let j = op(jobs::job(s.catalog(), &id).await)?;
    ok(job_json(&j))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortalBody {
    enabled: bool,
}

async fn device_portal(
    State(s): State<WebState>,
    a: Auth<Administer>,
    Path(id): Path<String>,
    b: Result<Json<PortalBody>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    op(portal::set_enabled(s.catalog(), &a.user, &id, b.enabled).await)?;
    ok(json!({ "device_id": id, "portal_enabled": b.enabled }))
}
