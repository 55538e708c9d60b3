//! Policies in the REST API: the same operations as the Policies page.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use morgana_core::policy::FACTORY_UNPROTECTED;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiResult, Route, body, ok, op, route};
use crate::policy::{self, PolicyVersion};
use crate::web::ops::OpError;
use crate::web::{Auth, ManageProtection, WebState, policies::parse};

pub(super) fn table() -> Vec<Route> {
    use Method as M;
    vec![
        route(M::GET, "/api/v1/policies", list),
        route(M::GET, "/api/v1/policies/{name}", show),
        route(M::PUT, "/api/v1/policies/{name}", put),
        route(M::POST, "/api/v1/policies/{name}/dry-run", dry_run),
        route(M::POST, "/api/v1/policies/{name}/devices", assign),
    ]
}

fn policy_json(p: &PolicyVersion) -> Value {
    json!({
        "name": p.name,
        "version": p.version,
        "created": p.created,
        "actor": p.actor,
        "spec": p.spec,
        "toml": policy::to_toml(&p.spec),
        "factory_unprotected": FACTORY_UNPROTECTED,
    })
}

async fn list(State(s): State<WebState>, _a: Auth<ManageProtection>) -> ApiResult {
    let all = op(s.catalog().policies().await.map_err(OpError::from))?;
    let list: Vec<Value> = all
        .iter()
        .map(|(p, devices)| {
            let mut v = policy_json(p);
            v["devices"] = json!(devices);
            v
        })
        .collect();
    ok(json!({ "policies": list }))
}

async fn show(
    State(s): State<WebState>,
    _a: Auth<ManageProtection>,
    Path(name): Path<String>,
) -> ApiResult {
    let found = op(s.catalog().policy(&name, None).await.map_err(OpError::from))?;
    let p = op(found.ok_or_else(|| {
        OpError::NotFound(format!(
            "there is no policy {name:?}: GET /api/v1/policies lists them"
        ))
    }))?;
    ok(policy_json(&p))
}

#[derive(Deserialize)]
struct PolicyBody {
    /// The policy file, as `morgana policy set` reads it.
    toml: String,
    /// Dry run only: devices to judge (ids or hostnames); default those following it.
    #[serde(default)]
    devices: Vec<String>,
}

/// Creates the policy or saves a new version of it.
async fn put(
    State(s): State<WebState>,
    a: Auth<ManageProtection>,
    Path(name): Path<String>,
    b: Result<Json<PolicyBody>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let spec = op(parse(&name, &b.toml))?;
    let (saved, message) = op(policy::save(s.catalog(), &name, &spec, &a.actor())
        .await
        .map_err(OpError::from))?;
    let mut v = policy_json(&saved);
    v["message"] = json!(message);
    Ok((StatusCode::OK, Json(v)).into_response())
}

async fn dry_run(
    State(s): State<WebState>,
    _a: Auth<ManageProtection>,
    Path(name): Path<String>,
    b: Result<Json<PolicyBody>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let spec = op(parse(&name, &b.toml))?;
    let runs = op(
        policy::dry_run_devices(s.catalog(), &name, &spec, &b.devices)
            .await
            .map_err(OpError::from),
    )?;
    ok(json!({ "devices": runs }))
}

#[derive(Deserialize)]
struct DevicesBody {
    devices: Vec<String>,
}

async fn assign(
    State(s): State<WebState>,
    a: Auth<ManageProtection>,
    Path(name): Path<String>,
    b: Result<Json<DevicesBody>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let lines = op(policy::assign(s.catalog(), &name, &b.devices, &a.actor())
        .await
        .map_err(OpError::from))?;
    ok(json!({ "assigned": lines }))
}
