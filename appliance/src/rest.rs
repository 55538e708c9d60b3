//! The REST API under `/api/v1`: everything the management UI does, for scripts. Callers
//! authenticate with API tokens an administrator issued (`Authorization: Bearer ...`); the
//! roles are the UI's. Described by `rest/openapi.json`, served at `/api/v1/openapi.json`
//! (a test keeps the description and [`table`] identical).

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::ApiError;
use crate::catalog::{ApiTokenRecord, DeviceSummary, User};
use crate::events::{ChainCheck, Event};
use crate::web::ops::{self, DeviceParams, EventParams, OpError};
use crate::web::ui::DiffQuery;
use crate::web::{Administer, Auth, OwnDevices, SignedIn, ViewFleet, WebState, browse};

mod images;
mod jobs;
mod policies;
mod reflectors;

pub const OPENAPI: &str = include_str!("rest/openapi.json");

/// One API route: method, path (axum syntax, which is OpenAPI's), handler.
pub struct Route {
    // Read by the test that compares this table with openapi.json.
    #[cfg_attr(not(test), allow(dead_code))]
    pub method: Method,
    pub path: &'static str,
    handler: MethodRouter<WebState>,
}

pub(crate) fn route<H, T>(method: Method, path: &'static str, handler: H) -> Route
where
    H: axum::handler::Handler<T, WebState>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("API routes use standard methods");
    Route {
        method,
        path,
        handler: on(filter, handler),
    }
}

/// Every API route. Later slices (jobs, policies, restores, layers, portal) add theirs here
/// and to `openapi.json`.
pub fn table() -> Vec<Route> {
    use Method as M;
    let mut routes = vec![
        route(M::GET, "/api/v1/openapi.json", openapi),
        route(M::GET, "/api/v1/me", me),
        route(M::PUT, "/api/v1/me/password", me_password),
        route(M::GET, "/api/v1/dashboard", dashboard),
        route(M::GET, "/api/v1/devices", devices),
        route(M::GET, "/api/v1/devices/{id}", device),
        route(M::PUT, "/api/v1/devices/{id}/owner", device_owner),
        route(M::GET, "/api/v1/devices/{id}/snapshots", snapshots),
        route(
            M::GET,
            "/api/v1/devices/{id}/snapshots/{snapshot}/tree",
            tree,
        ),
        route(M::GET, "/api/v1/devices/{id}/diff", diff),
        route(M::GET, "/api/v1/events", events),
        route(M::GET, "/api/v1/events/verify", events_verify),
        route(M::GET, "/api/v1/events/{seq}", event),
        route(M::GET, "/api/v1/users", users),
        route(M::POST, "/api/v1/users", user_create),
        route(M::PATCH, "/api/v1/users/{name}", user_update),
        route(M::POST, "/api/v1/users/{name}/password", user_password),
        route(M::GET, "/api/v1/api-tokens", api_tokens),
        route(M::POST, "/api/v1/api-tokens", api_token_create),
        route(M::DELETE, "/api/v1/api-tokens/{id}", api_token_revoke),
        route(M::GET, "/api/v1/enroll-tokens", enroll_tokens),
        route(M::POST, "/api/v1/enroll-tokens", enroll_token_create),
    ];
    routes.extend(jobs::table());
    routes.extend(policies::table());
    routes.extend(images::table());
    routes.extend(reflectors::table());
    routes.extend(crate::web::plugins::api());
    routes.extend(crate::web::nodes::api());
    routes
}

impl Route {
    /// Lets this route take bodies up to `bytes` (uploads), instead of axum's 2 MB.
    pub(crate) fn body_limit(mut self, bytes: usize) -> Route {
        self.handler = self
            .handler
            .layer(axum::extract::DefaultBodyLimit::max(bytes));
        self
    }
}

pub fn routes() -> Router<WebState> {
    table()
        .into_iter()
        .fold(Router::new(), |r, x| r.route(x.path, x.handler))
}

type ApiResult<T = Response> = Result<T, ApiError>;

fn op<T>(r: Result<T, OpError>) -> ApiResult<T> {
    r.map_err(OpError::into_api)
}

fn body<T>(r: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    r.map(|Json(t)| t).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the request body is not what this call takes ({}): see /api/v1/openapi.json",
                e.body_text()
            ),
        )
    })
}

fn ok(v: Value) -> ApiResult {
    Ok(Json(v).into_response())
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI,
    )
        .into_response()
}

// ---- JSON shapes ----

#[derive(Serialize)]
struct UserJson {
    name: String,
    role: &'static str,
    disabled: bool,
    must_change_password: bool,
    created: String,
}

fn user_json(u: &User) -> UserJson {
    UserJson {
        name: u.name.clone(),
        role: u.role.name(),
        disabled: u.disabled,
        must_change_password: u.must_change,
        created: u.created.clone(),
    }
}

#[derive(Serialize)]
struct DeviceJson {
    id: String,
    hostname: String,
    owner: Option<String>,
    created: String,
    revoked: bool,
    last_snapshot: Option<String>,
    last_snapshot_bytes: u64,
}

fn device_json(d: &DeviceSummary) -> DeviceJson {
    DeviceJson {
        id: d.id.clone(),
        hostname: d.hostname.clone(),
        owner: d.owner.clone(),
        created: d.created.clone(),
        revoked: d.revoked,
        last_snapshot: d.last_snapshot.clone(),
        last_snapshot_bytes: d.last_snapshot_bytes,
    }
}

fn event_json(e: &Event) -> Value {
    json!({
        "seq": e.seq,
        "at": crate::clock::rfc3339_ms(e.event.at_ms),
        "kind": e.event.kind,
        "severity": e.event.severity.name(),
        "actor": e.event.actor,
        "device_id": e.event.device_id,
        "message": e.event.message,
        "hash": e.hash.to_hex(),
    })
}

fn token_json(t: &ApiTokenRecord) -> Value {
    json!({
        "id": t.id,
        "user": t.user,
        "label": t.label,
        "created": t.created,
        "revoked": t.revoked,
    })
}

// ---- Handlers ----

async fn me(a: Auth<SignedIn>) -> ApiResult {
    ok(json!(user_json(&a.user)))
}

#[derive(Deserialize)]
struct OwnPassword {
    current: String,
    new: String,
}

async fn me_password(
    State(s): State<WebState>,
    a: Auth<SignedIn>,
    b: Result<Json<OwnPassword>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    op(ops::change_own_password(s.catalog(), &a.user, &b.current, &b.new, &b.new).await)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn dashboard(State(s): State<WebState>, _a: Auth<ViewFleet>) -> ApiResult {
    let d = op(ops::dashboard(s.catalog()).await)?;
    ok(json!({
        "devices": d.stats.devices,
        "revoked": d.stats.revoked,
        "protected_24h": d.stats.protected,
        "protected_percent": d.protected_percent,
        "snapshots": d.stats.snapshots,
        "logical_bytes": d.stats.logical_bytes,
        "stored_bytes": d.stats.stored_bytes,
        "dedup_ratio": d.dedup_ratio,
        "recent_events": d.recent.iter().map(event_json).collect::<Vec<_>>(),
    }))
}

async fn devices(
    State(s): State<WebState>,
    a: Auth<OwnDevices>,
    Query(p): Query<DeviceParams>,
) -> ApiResult {
    let page = op(ops::devices(s.catalog(), &a.user, &p).await)?;
    ok(json!({
        "devices": page.devices.iter().map(device_json).collect::<Vec<_>>(),
        "next": page.next,
    }))
}

async fn device(
    State(s): State<WebState>,
    a: Auth<OwnDevices>,
    Path(id): Path<String>,
) -> ApiResult {
    let d = op(ops::device(s.catalog(), &a.user, &id).await)?;
    ok(json!(device_json(&d)))
}

#[derive(Deserialize)]
struct OwnerBody {
    owner: Option<String>,
}

async fn device_owner(
    State(s): State<WebState>,
    a: Auth<Administer>,
    Path(id): Path<String>,
    b: Result<Json<OwnerBody>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let d = op(ops::device(s.catalog(), &a.user, &id).await)?;
    op(ops::set_owner(
        s.catalog(),
        &a.actor(),
        &d,
        b.owner.as_deref().unwrap_or(""),
    )
    .await)?;
    let d = op(ops::device(s.catalog(), &a.user, &id).await)?;
    ok(json!(device_json(&d)))
}

async fn snapshots(
    State(s): State<WebState>,
    a: Auth<OwnDevices>,
    Path(id): Path<String>,
) -> ApiResult {
    let d = op(ops::device(s.catalog(), &a.user, &id).await)?;
    let snaps = op(ops::snapshots(s.catalog(), &d.id).await)?;
    ok(json!({ "snapshots": snaps }))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PathQuery {
    path: String,
}

async fn tree(
    State(s): State<WebState>,
    a: Auth<OwnDevices>,
    Path((id, snapshot)): Path<(String, String)>,
    Query(q): Query<PathQuery>,
) -> ApiResult {
    let d = op(ops::device(s.catalog(), &a.user, &id).await)?;
    let snap = op(ops::snapshot(s.catalog(), &d, &snapshot).await)?;
    let tree = op(browse::folder(s.catalog(), snap.root, &q.path)
        .await
        .map_err(OpError::from))?;
    let path = format!("/{}", browse::split_path(&q.path).join("/"));
    ok(json!({
        "path": path,
        "entries": tree.entries.iter().map(browse::listed).collect::<Vec<_>>(),
    }))
}

async fn diff(
    State(s): State<WebState>,
    a: Auth<OwnDevices>,
    Path(id): Path<String>,
    Query(q): Query<DiffQuery>,
) -> ApiResult {
    let d = op(ops::device(s.catalog(), &a.user, &id).await)?;
    let from = op(ops::snapshot(s.catalog(), &d, &q.from).await)?;
    let to = op(ops::snapshot(s.catalog(), &d, &q.to).await)?;
    let diff = op(browse::diff(s.catalog(), from.root, to.root)
        .await
        .map_err(OpError::from))?;
    ok(json!(diff))
}

async fn events(
    State(s): State<WebState>,
    _a: Auth<ViewFleet>,
    Query(p): Query<EventParams>,
) -> ApiResult {
    let page = op(ops::events(s.catalog(), &p).await)?;
    ok(json!({
        "events": page.events.iter().map(event_json).collect::<Vec<_>>(),
        "older": page.older,
    }))
}

#[derive(Deserialize)]
struct VerifyQuery {
    #[serde(default)]
    full: bool,
}

async fn events_verify(
    State(s): State<WebState>,
    _a: Auth<ViewFleet>,
    Query(q): Query<VerifyQuery>,
) -> ApiResult {
    match op(ops::verify_events(s.catalog(), &s.0.chain_checked, q.full).await)? {
        ChainCheck::Intact { events } => ok(json!({ "intact": true, "events": events })),
        ChainCheck::BrokenAt { seq, events_before } => ok(json!({
            "intact": false,
            "events": events_before,
            "broken_at": seq,
        })),
    }
}

async fn event(State(s): State<WebState>, _a: Auth<ViewFleet>, Path(seq): Path<i64>) -> ApiResult {
    let e = op(ops::event(s.catalog(), seq).await)?;
    ok(event_json(&e))
}

async fn users(State(s): State<WebState>, _a: Auth<Administer>) -> ApiResult {
    let users = op(s.catalog().users().await.map_err(OpError::from))?;
    ok(json!({ "users": users.iter().map(user_json).collect::<Vec<_>>() }))
}

#[derive(Deserialize)]
struct NewUser {
    name: String,
    role: String,
    password: Option<String>,
}

async fn user_create(
    State(s): State<WebState>,
    a: Auth<Administer>,
    b: Result<Json<NewUser>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let (user, generated) = op(ops::create_user(
        s.catalog(),
        &a.actor(),
        &b.name,
        &b.role,
        b.password.as_deref(),
    )
    .await)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "user": user_json(&user), "password": generated })),
    )
        .into_response())
}

#[derive(Deserialize)]
struct UserPatch {
    role: Option<String>,
    disabled: Option<bool>,
}

async fn user_update(
    State(s): State<WebState>,
    a: Auth<Administer>,
    Path(name): Path<String>,
    b: Result<Json<UserPatch>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let mut user = None;
    if let Some(role) = &b.role {
        user = Some(op(
            ops::set_role(s.catalog(), &a.actor(), &name, role).await
        )?);
    }
    if let Some(disabled) = b.disabled {
        user = Some(op(ops::set_disabled(
            s.catalog(),
            &a.actor(),
            &name,
            disabled,
        )
        .await)?);
    }
    let user = match user {
        Some(u) => u,
        None => op(s
            .catalog()
            .user(&name)
            .await
            .map_err(OpError::from)
            .and_then(|u| {
                u.ok_or_else(|| {
                    OpError::from(crate::catalog::CatalogError::UserUnknown(name.clone()))
                })
            }))?,
    };
    ok(json!(user_json(&user)))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ResetPassword {
    password: Option<String>,
}

async fn user_password(
    State(s): State<WebState>,
    a: Auth<Administer>,
    Path(name): Path<String>,
    b: Result<Json<ResetPassword>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let generated =
        op(ops::reset_password(s.catalog(), &a.actor(), &name, b.password.as_deref()).await)?;
    ok(json!({ "password": generated }))
}

async fn api_tokens(State(s): State<WebState>, _a: Auth<Administer>) -> ApiResult {
    let tokens = op(s.catalog().api_tokens().await.map_err(OpError::from))?;
    ok(json!({ "api_tokens": tokens.iter().map(token_json).collect::<Vec<_>>() }))
}

#[derive(Deserialize)]
struct NewApiToken {
    user: String,
    label: String,
}

async fn api_token_create(
    State(s): State<WebState>,
    a: Auth<Administer>,
    b: Result<Json<NewApiToken>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let (record, secret) =
        op(ops::issue_api_token(s.catalog(), &a.actor(), &b.user, &b.label).await)?;
    let mut v = token_json(&record);
    v["token"] = json!(secret);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

async fn api_token_revoke(
    State(s): State<WebState>,
    a: Auth<Administer>,
    Path(id): Path<i64>,
) -> ApiResult {
    op(ops::revoke_api_token(s.catalog(), &a.actor(), id).await)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn enroll_tokens(State(s): State<WebState>, _a: Auth<Administer>) -> ApiResult {
    let tokens = op(s
        .catalog()
        .enroll_tokens(crate::clock::now_ms())
        .await
        .map_err(OpError::from))?;
    ok(json!({
        "enroll_tokens": tokens.iter().map(|t| json!({
            "hash_prefix": t.hash_prefix,
            "uses_left": t.uses_left,
            "expires": crate::clock::rfc3339_ms(t.expires_at_ms),
            "created": crate::clock::rfc3339_ms(t.created_at_ms),
        })).collect::<Vec<_>>(),
    }))
}

#[derive(Deserialize)]
struct NewEnrollToken {
    #[serde(default = "one")]
    uses: u32,
    #[serde(default = "day")]
    expires: String,
}

fn one() -> u32 {
    1
}

fn day() -> String {
    "24h".into()
}

async fn enroll_token_create(
    State(s): State<WebState>,
    a: Auth<Administer>,
    b: Result<Json<NewEnrollToken>, JsonRejection>,
) -> ApiResult {
    let b = body(b)?;
    let t = op(ops::create_enroll_token(
        s.catalog(),
        &s.0.ca_cert_der,
        &a.actor(),
        b.uses,
        &b.expires,
    )
    .await)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "token": t.token, "uses": t.uses, "expires": t.expires_at })),
    )
        .into_response())
}
