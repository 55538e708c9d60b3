//! Branch reflectors in the REST API (Image Managers and administrators): the list with
//! each reflector's last report, and the role per device. The same operations as the
//! Reflectors page (`web::reflectors`).

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::Method;
use serde_json::{Value, json};

use super::{ApiResult, Route, body, ok, op, route};
use crate::reflectors::ReflectorView;
use crate::web::reflectors::{self, RoleRequest};
use crate::web::{Auth, ManageImages, WebState};

pub(super) fn table() -> Vec<Route> {
    use Method as M;
    vec![
        route(M::GET, "/api/v1/reflectors", list),
        route(M::PUT, "/api/v1/devices/{id}/reflector", set_role),
    ]
}

fn reflector_json(v: &ReflectorView) -> Value {
    let r = &v.record;
    json!({
        "device": r.device_id,
        "hostname": r.hostname,
        "enabled": r.enabled,
        "live": v.live,
        "address": r.address,
        "port": r.port,
        "subnet": r.subnet,
        "site": r.site,
        "in_flight": r.in_flight,
        "load": r.load,
        "cache_bytes": r.cache_bytes,
        "cache_limit": r.cache_limit,
        "bytes_served": r.bytes_served,
        "last_seen": v.last_seen,
        "changed": r.changed,
        "changed_by": r.changed_by,
    })
}

async fn list(State(s): State<WebState>, _a: Auth<ManageImages>) -> ApiResult {
    let all = op(reflectors::list(s.catalog()).await)?;
    ok(json!({ "reflectors": all.iter().map(reflector_json).collect::<Vec<_>>() }))
}

async fn set_role(
    State(s): State<WebState>,
    a: Auth<ManageImages>,
    Path(id): Path<String>,
    b: Result<Json<RoleRequest>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let (d, role) = op(reflectors::set_role(s.catalog(), &a.user, &id, &b).await)?;
    ok(json!({
        "device": d.id,
        "enabled": role.is_some(),
        "port": role.as_ref().map(|r| r.port),
        "site": role.and_then(|r| r.site),
    }))
}
