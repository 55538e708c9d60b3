//! The management UI's pages: one `view_<page>_<method>` handler per route, one askama
//! template per page under `templates/<area>/`, `*_partial.html` for htmx fragments.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use super::assets::{ASSETS, url};
use super::browse::{self, Change, Listed};
use super::ops::{self, DeviceParams, EventParams, OpError, human_bytes};
use super::{Administer, Auth, SignedIn, ViewFleet, WebState};
use crate::auth::{self, Role};
use crate::catalog::{ApiTokenRecord, DeviceSummary, User};
use crate::events::{ChainCheck, Event};

/// The UI's route table. Later slices add theirs here (jobs, policies, restores, layers,
/// the portal under `/portal`).
pub fn routes() -> Router<WebState> {
    Router::new()
        .route("/login", get(view_login_get).post(view_login_post))
        .route("/logout", post(view_logout_post))
        .route("/", get(view_dashboard_get))
        .route("/devices", get(view_devices_get))
        .route("/devices/rows", get(view_device_rows_get))
        .route("/devices/{id}", get(view_device_get))
        .route("/devices/{id}/owner", post(view_device_owner_post))
        .route(
            "/devices/{id}/snapshots/{snapshot}/tree",
            get(view_tree_get),
        )
        .route("/devices/{id}/diff", get(view_diff_get))
        .route("/events", get(view_events_get))
        .route("/events/verify", get(view_events_verify_get))
        .route("/events/{seq}", get(view_event_get))
        .route("/users", get(view_users_get).post(view_users_post))
        .route("/users/{name}/role", post(view_user_role_post))
        .route("/users/{name}/disable", post(view_user_disable_post))
        .route("/users/{name}/enable", post(view_user_enable_post))
        .route("/users/{name}/password", post(view_user_password_post))
        .route("/users/{name}/api-tokens", post(view_user_api_tokens_post))
        .route("/api-tokens/{id}/revoke", post(view_api_token_revoke_post))
        .route(
            "/enroll-tokens",
            get(view_enroll_tokens_get).post(view_enroll_tokens_post),
        )
        .route("/account", get(view_account_get))
        .route("/account/password", post(view_account_password_post))
}

/// What every page's frame needs.
pub struct Layout {
    pub title: String,
    /// Empty when nobody is signed in (login and error pages).
    pub user: String,
    pub role: &'static str,
    pub staff: bool,
    /// May manage policies, retention and full restores.
    pub protection: bool,
    /// May manage layers, reference machines and drivers.
    pub images: bool,
    pub admin: bool,
    pub csrf: String,
    /// Which navigation entry is current.
    pub nav: &'static str,
    pub css: String,
    pub htmx: String,
    pub app_js: String,
}

impl Layout {
    pub(super) fn anonymous(title: &str) -> Layout {
        Layout {
            title: title.to_owned(),
            user: String::new(),
            role: "",
            staff: false,
            protection: false,
            images: false,
            admin: false,
            csrf: String::new(),
            nav: "",
            css: url(&ASSETS.css),
            htmx: url(&ASSETS.htmx),
            app_js: url(&ASSETS.app_js),
        }
    }

    pub(crate) fn of<N>(a: &Auth<N>, title: &str, nav: &'static str) -> Layout {
        Layout {
            user: a.user.name.clone(),
            role: a.user.role.label(),
            staff: a.user.role.sees_all_devices(),
            protection: a
                .user
                .role
                .allows(crate::auth::Permission::ManageProtection),
            images: a.user.role.allows(crate::auth::Permission::ManageImages),
            admin: a.user.role == Role::Administrator,
            csrf: a.csrf.clone(),
            nav,
            ..Layout::anonymous(title)
        }
    }
}

pub(crate) fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering a page failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the appliance failed to render this page; tell its administrator",
            )
                .into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    l: Layout,
    status: u16,
    message: String,
}

pub fn error_page(status: StatusCode, message: &str) -> Response {
    let page = ErrorPage {
        l: Layout::anonymous("Error"),
        status: status.as_u16(),
        message: message.to_owned(),
    };
    (status, render(&page)).into_response()
}

pub fn see_other(to: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Sends an anonymous caller to the login page, coming back here afterwards. htmx requests
/// get `HX-Redirect`, so the whole page goes rather than a fragment turning into a form.
pub fn to_login(parts: &Parts) -> Response {
    let back = if parts.method == axum::http::Method::GET {
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default()
    } else {
        String::new()
    };
    let to = if back.is_empty() || back == "/" {
        "/login".to_owned()
    } else {
        format!(
            "/login?{}",
            serde_urlencoded::to_string([("next", back.as_str())]).unwrap_or_default()
        )
    };
    if parts.headers.contains_key("hx-request") {
        let mut resp = StatusCode::UNAUTHORIZED.into_response();
        if let Ok(v) = HeaderValue::from_str(&to) {
            resp.headers_mut().insert("hx-redirect", v);
        }
        return resp;
    }
    see_other(&to)
}

/// Where to go after login: a local path only, never another site.
fn safe_next(next: &str) -> Option<&str> {
    (next.starts_with('/') && !next.starts_with("//") && !next.contains('\\')).then_some(next)
}

pub(super) fn query_string(p: &impl serde::Serialize) -> String {
    serde_urlencoded::to_string(p).unwrap_or_default()
}

// ---- Login ----

#[derive(Template)]
#[template(path = "auth/login.html")]
struct LoginPage {
    l: Layout,
    name: String,
    next: String,
    error: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct LoginQuery {
    next: String,
}

async fn view_login_get(Query(q): Query<LoginQuery>) -> Response {
    render(&LoginPage {
        l: Layout::anonymous("Sign in"),
        name: String::new(),
        next: q.next,
        error: String::new(),
    })
}

#[derive(Deserialize)]
pub struct LoginForm {
    name: String,
    password: String,
    #[serde(default)]
    next: String,
}

async fn view_login_post(State(state): State<WebState>, Form(f): Form<LoginForm>) -> Response {
    let name = f.name.trim().to_owned();
    let again = |status: StatusCode, error: String| {
        let page = LoginPage {
            l: Layout::anonymous("Sign in"),
            name: name.clone(),
            next: f.next.clone(),
            error,
        };
        (status, render(&page)).into_response()
    };
    if let Some(wait) = state.0.logins.blocked(&name) {
        let mut resp = again(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "Too many failed sign-ins for this name. Wait {} minutes, or ask an \
                 administrator to reset the password.",
                wait.as_secs().div_ceil(60)
            ),
        );
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(wait.as_secs().max(1)),
        );
        return resp;
    }
    let user = match auth::authenticate(state.catalog(), &name, &f.password).await {
        Ok(u) => u,
        Err(e) => return OpError::from(e).into_page(),
    };
    let Some(user) = user else {
        state.0.logins.failed(&name);
        crate::events::record(
            state.catalog(),
            crate::events::NewEvent::system(
                "user.login_failed",
                crate::events::Severity::Warning,
                format!(
                    "failed sign-in as {:?}",
                    name.chars().take(64).collect::<String>()
                ),
            ),
        )
        .await;
        return again(
            StatusCode::UNAUTHORIZED,
            "Wrong user name or password (or the account is disabled). Check both and try \
             again."
                .into(),
        );
    };
    state.0.logins.succeeded(&name);
    crate::events::record(
        state.catalog(),
        crate::events::NewEvent::system(
            "user.login",
            crate::events::Severity::Info,
            format!("{} signed in", user.name),
        )
        .by(format!("user:{}", user.name)),
    )
    .await;
    let to = if user.must_change {
        "/account?must_change=1"
    } else if let Some(next) = safe_next(&f.next) {
        next
    } else if user.role.sees_all_devices() {
        "/"
    } else {
        "/portal"
    };
    start_session(&state, &user, to).await
}

/// Starts a session for `user` and sends the browser to `to` with its cookie.
async fn start_session(state: &WebState, user: &User, to: &str) -> Response {
    let (secret, hash) = auth::new_secret("");
    let now = crate::clock::now_ms();
    let expires = now + auth::SESSION_LIFETIME.as_millis() as i64;
    if let Err(e) = state
        .catalog()
        .create_session(hash, &user.name, now, expires)
        .await
    {
        return OpError::from(e).into_page();
    }
    let mut resp = see_other(to);
    if let Ok(v) = HeaderValue::from_str(&auth::session_cookie(&secret)) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

async fn view_logout_post(
    State(state): State<WebState>,
    a: Auth<SignedIn>,
    headers: HeaderMap,
) -> Response {
    if let Some(secret) = auth::session_secret(&headers) {
        let _ = state
            .catalog()
            .delete_session(morgana_core::Id::of(secret.as_bytes()))
            .await;
    }
    crate::events::record(
        state.catalog(),
        crate::events::NewEvent::system(
            "user.logout",
            crate::events::Severity::Info,
            format!("{} signed out", a.user.name),
        )
        .by(a.actor()),
    )
    .await;
    let mut resp = see_other("/login");
    if let Ok(v) = HeaderValue::from_str(&auth::clear_session_cookie()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

// ---- Dashboard ----

/// An event as the tables show it.
pub struct EventRow {
    pub seq: i64,
    pub at: String,
    pub kind: String,
    pub severity: &'static str,
    pub actor: String,
    pub device: String,
    pub message: String,
}

impl From<&Event> for EventRow {
    fn from(e: &Event) -> EventRow {
        EventRow {
            seq: e.seq,
            at: crate::clock::rfc3339_ms(e.event.at_ms),
            kind: e.event.kind.clone(),
            severity: e.event.severity.name(),
            actor: e.event.actor.clone(),
            device: e.event.device_id.clone().unwrap_or_default(),
            message: e.event.message.clone(),
        }
    }
}

#[derive(Template)]
#[template(path = "dashboard/index.html")]
struct DashboardPage {
    l: Layout,
    devices: u64,
    protected: u64,
    active: u64,
    protected_percent: String,
    snapshots: u64,
    logical: String,
    stored: String,
    ratio: String,
    events: Vec<EventRow>,
}

async fn view_dashboard_get(State(state): State<WebState>, a: Auth<ViewFleet>) -> Response {
    let d = match ops::dashboard(state.catalog()).await {
        Ok(d) => d,
        Err(e) => return e.into_page(),
    };
    render(&DashboardPage {
        l: Layout::of(&a, "Dashboard", "dashboard"),
        devices: d.stats.devices,
        protected: d.stats.protected,
        active: d.stats.devices - d.stats.revoked,
        protected_percent: format!("{:.0} %", d.protected_percent),
        snapshots: d.stats.snapshots,
        logical: human_bytes(d.stats.logical_bytes),
        stored: human_bytes(d.stats.stored_bytes),
        ratio: d
            .dedup_ratio
            .map_or_else(|| "–".to_owned(), |r| format!("{r:.1}×")),
        events: d.recent.iter().map(EventRow::from).collect(),
    })
}

// ---- Devices ----

/// A device as the tables show it.
pub struct DeviceRow {
    pub id: String,
    pub hostname: String,
    pub owner: String,
    pub state: &'static str,
    pub state_class: &'static str,
    pub last_snapshot: String,
    pub size: String,
    pub created: String,
}

fn device_row(d: &DeviceSummary, since: &str) -> DeviceRow {
    let (state, state_class) = if d.revoked {
        ("revoked", "muted")
    } else {
        match &d.last_snapshot {
            None => ("never synced", "bad"),
            Some(t) if t.as_str() >= since => ("protected", "ok"),
            Some(_) => ("stale", "warn"),
        }
    };
    DeviceRow {
        id: d.id.clone(),
        hostname: d.hostname.clone(),
        owner: d.owner.clone().unwrap_or_default(),
        state,
        state_class,
        last_snapshot: d.last_snapshot.clone().unwrap_or_else(|| "–".into()),
        size: human_bytes(d.last_snapshot_bytes),
        created: d.created.clone(),
    }
}

#[derive(Template)]
#[template(path = "devices/list.html")]
struct DevicesPage {
    l: Layout,
    p: DeviceParams,
    rows: Vec<DeviceRow>,
    next: String,
    first: String,
    empty: String,
}

#[derive(Template)]
#[template(path = "devices/rows_partial.html")]
struct DeviceRowsPartial {
    rows: Vec<DeviceRow>,
    next: String,
    first: String,
    empty: String,
}

struct DeviceRows {
    rows: Vec<DeviceRow>,
    next: String,
    first: String,
    empty: String,
}

async fn device_rows(
    state: &WebState,
    user: &User,
    p: &DeviceParams,
) -> Result<DeviceRows, OpError> {
    let page = ops::devices(state.catalog(), user, p).await?;
    let since = ops::protected_since();
    let next = page
        .next
        .map(|after| query_string(&DeviceParams { after, ..p.clone() }))
        .unwrap_or_default();
    let first = if p.after.is_empty() {
        String::new()
    } else {
        query_string(&DeviceParams {
            after: String::new(),
            ..p.clone()
        })
    };
    let filtered = !p.q.trim().is_empty() || !matches!(p.state.as_str(), "" | "all");
    let empty = if !p.after.is_empty() {
        "No more devices.".to_owned()
    } else if filtered {
        "No device matches these filters. Clear the search or pick another state.".to_owned()
    } else {
        "No devices are enrolled yet. Create an enrolment token (Enrolment), then run \
         `morgana-agent enroll` on a machine."
            .to_owned()
    };
    Ok(DeviceRows {
        rows: page.devices.iter().map(|d| device_row(d, &since)).collect(),
        next,
        first,
        empty,
    })
}

async fn view_devices_get(
    State(state): State<WebState>,
    a: Auth<ViewFleet>,
    Query(p): Query<DeviceParams>,
) -> Response {
    let r = match device_rows(&state, &a.user, &p).await {
        Ok(r) => r,
        Err(e) => return e.into_page(),
    };
    render(&DevicesPage {
        l: Layout::of(&a, "Devices", "devices"),
        p,
        rows: r.rows,
        next: r.next,
        first: r.first,
        empty: r.empty,
    })
}

async fn view_device_rows_get(
    State(state): State<WebState>,
    a: Auth<ViewFleet>,
    Query(p): Query<DeviceParams>,
) -> Response {
    match device_rows(&state, &a.user, &p).await {
        Ok(r) => render(&DeviceRowsPartial {
            rows: r.rows,
            next: r.next,
            first: r.first,
            empty: r.empty,
        }),
        Err(e) => e.into_page(),
    }
}

pub struct SnapshotRow {
    pub id: String,
    pub created: String,
    pub reason: String,
    pub files: u64,
    pub size: String,
    pub sent: String,
    pub pinned: String,
}

#[derive(Template)]
#[template(path = "devices/detail.html")]
struct DevicePage {
    l: Layout,
    d: DeviceRow,
    revoked: bool,
    snapshots: Vec<SnapshotRow>,
    events: Vec<EventRow>,
    notice: String,
    run_jobs: bool,
    portal_enabled: bool,
    /// May manage layers, reference machines and drivers.
    images: bool,
    reference: bool,
    applied_layers: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct NoticeQuery {
    ok: String,
}

async fn view_device_get(
    State(state): State<WebState>,
    a: Auth<ViewFleet>,
    Path(id): Path<String>,
    Query(n): Query<NoticeQuery>,
) -> Response {
    let result = async {
        let d = ops::device(state.catalog(), &a.user, &id).await?;
        let snaps = ops::snapshots(state.catalog(), &d.id).await?;
        let portal = state
            .catalog()
            .device_portal_enabled(&d.id)
            .await?
            .unwrap_or(false);
        let events = ops::events(
            state.catalog(),
            &EventParams {
                device: d.id.clone(),
                limit: Some(10),
                ..Default::default()
            },
        )
        .await?;
        let reference = state
            .catalog()
            .reference_devices()
            .await?
            .iter()
            .any(|r| r.id == d.id);
        let applied = state.catalog().applied_layers(&d.id).await?.is_some();
        Ok::<_, OpError>((d, snaps, portal, events, reference, applied))
    }
    .await;
    let (d, snaps, portal_enabled, events, reference, applied_layers) = match result {
        Ok(r) => r,
        Err(e) => return e.into_page(),
    };
    render(&DevicePage {
        l: Layout::of(&a, &d.hostname, "devices"),
        d: device_row(&d, &ops::protected_since()),
        revoked: d.revoked,
        snapshots: snaps
            .iter()
            .map(|s| SnapshotRow {
                id: s.id.clone(),
                created: s.created.clone(),
                reason: s.reason.clone(),
                files: s.stats.files,
                size: human_bytes(s.stats.bytes),
                sent: human_bytes(s.stats.bytes_sent),
                pinned: s.pinned.clone().unwrap_or_default(),
            })
            .collect(),
        events: events.events.iter().map(EventRow::from).collect(),
        notice: match n.ok.as_str() {
            "owner" => "Owner saved.".into(),
            "portal-on" => "The file portal is on for this device.".into(),
            "portal-off" => {
                "The file portal is off for this device: its owner cannot browse or download."
                    .into()
            }
            "reference-on" => {
                "Marked as a reference machine: layers can be captured from it.".into()
            }
            "reference-off" => {
                "No longer a reference machine; the layers captured from it stay.".into()
            }
            _ => String::new(),
        },
        run_jobs: a.user.role.allows(auth::Permission::RunJobs),
        portal_enabled,
        images: a.user.role.allows(auth::Permission::ManageImages),
        reference,
        applied_layers,
    })
}

#[derive(Deserialize)]
pub struct OwnerForm {
    #[serde(default)]
    owner: String,
}

async fn view_device_owner_post(
    State(state): State<WebState>,
    a: Auth<Administer>,
    Path(id): Path<String>,
    Form(f): Form<OwnerForm>,
) -> Response {
    let result = async {
        let d = ops::device(state.catalog(), &a.user, &id).await?;
        ops::set_owner(state.catalog(), &a.actor(), &d, &f.owner).await?;
        Ok::<_, OpError>(d)
    }
    .await;
    match result {
        Ok(d) => see_other(&format!("/devices/{}?ok=owner", d.id)),
        Err(e) => e.into_page(),
    }
}

pub struct Crumb {
    pub name: String,
    pub href: String,
}

pub struct TreeRow {
    pub e: Listed,
    pub href: String,
    /// The entry's path in the snapshot, query-encoded (for restore links).
    pub path_query: String,
    pub size: String,
    /// Symlink target, or empty.
    pub target: String,
}

#[derive(Template)]
#[template(path = "devices/tree.html")]
struct TreePage {
    l: Layout,
    device_id: String,
    hostname: String,
    created: String,
    crumbs: Vec<Crumb>,
    rows: Vec<TreeRow>,
    more: usize,
    snapshot_id: String,
    folder_query: String,
    run_jobs: bool,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct PathQuery {
    path: String,
}

fn tree_href(device: &str, snapshot: &str, path: &str) -> String {
    format!(
        "/devices/{device}/snapshots/{snapshot}/tree?{}",
        query_string(&[("path", path)])
    )
}

async fn view_tree_get(
    State(state): State<WebState>,
    a: Auth<ViewFleet>,
    Path((id, snapshot_id)): Path<(String, String)>,
    Query(q): Query<PathQuery>,
) -> Response {
    let result = async {
        let d = ops::device(state.catalog(), &a.user, &id).await?;
        let s = ops::snapshot(state.catalog(), &d, &snapshot_id).await?;
        let tree = browse::folder(state.catalog(), s.root, &q.path).await?;
        Ok::<_, OpError>((d, s, tree))
    }
    .await;
    let (d, s, tree) = match result {
        Ok(r) => r,
        Err(e) => return e.into_page(),
    };
    let parts = browse::split_path(&q.path);
    let mut crumbs = vec![Crumb {
        name: d.hostname.clone(),
        href: tree_href(&d.id, &s.id, "/"),
    }];
    let mut walked = String::new();
    for p in &parts {
        walked.push('/');
        walked.push_str(p);
        crumbs.push(Crumb {
            name: (*p).to_owned(),
            href: tree_href(&d.id, &s.id, &walked),
        });
    }
    let total = tree.entries.len();
    let rows = tree
        .entries
        .iter()
        .take(browse::MAX_LISTED)
        .map(|e| {
            let listed = browse::listed(e);
            let href = if listed.kind == "folder" {
                tree_href(&d.id, &s.id, &format!("{walked}/{}", listed.name))
            } else {
                String::new()
            };
            TreeRow {
                path_query: query_string(&[("path", format!("{walked}/{}", listed.name))]),
                target: listed.target.clone().unwrap_or_default(),
                size: if listed.kind == "file" {
                    human_bytes(listed.size)
                } else {
                    String::new()
                },
                e: listed,
                href,
            }
        })
        .collect();
    render(&TreePage {
        l: Layout::of(&a, &format!("{} · {}", d.hostname, s.created), "devices"),
        device_id: d.id.clone(),
        hostname: d.hostname.clone(),
        created: s.created.clone(),
        crumbs,
        rows,
        more: total.saturating_sub(browse::MAX_LISTED),
        snapshot_id: s.id.clone(),
        folder_query: query_string(&[("path", if walked.is_empty() { "/" } else { &walked })]),
        run_jobs: a.user.role.allows(auth::Permission::RunJobs) && !d.revoked,
    })
}

#[derive(Template)]
#[template(path = "devices/diff.html")]
struct DiffPage {
    l: Layout,
    device_id: String,
    hostname: String,
    from: String,
    to: String,
    changes: Vec<Change>,
    truncated: bool,
    trees_read: u64,
    skipped: u64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct DiffQuery {
    pub from: String,
    pub to: String,
}

async fn view_diff_get(
    State(state): State<WebState>,
    a: Auth<ViewFleet>,
    Path(id): Path<String>,
    Query(q): Query<DiffQuery>,
) -> Response {
    let result = async {
        let d = ops::device(state.catalog(), &a.user, &id).await?;
        let from = ops::snapshot(state.catalog(), &d, &q.from).await?;
        let to = ops::snapshot(state.catalog(), &d, &q.to).await?;
        let diff = browse::diff(state.catalog(), from.root, to.root).await?;
        Ok::<_, OpError>((d, from, to, diff))
    }
    .await;
    let (d, from, to, diff) = match result {
        Ok(r) => r,
        Err(e) => return e.into_page(),
    };
    render(&DiffPage {
        l: Layout::of(&a, &format!("{} · changes", d.hostname), "devices"),
        device_id: d.id,
        hostname: d.hostname,
        from: from.created,
        to: to.created,
        changes: diff.changes,
        truncated: diff.truncated,
        trees_read: diff.trees_read,
        skipped: diff.subtrees_skipped,
    })
}

// ---- Events ----

#[derive(Template)]
#[template(path = "events/list.html")]
struct EventsPage {
    l: Layout,
    p: EventParams,
    events: Vec<EventRow>,
    older: String,
    newest: String,
}

async fn view_events_get(
    State(state): State<WebState>,
    a: Auth<ViewFleet>,
    Query(p): Query<EventParams>,
) -> Response {
    let page = match ops::events(state.catalog(), &p).await {
        Ok(page) => page,
        Err(e) => return e.into_page(),
    };
    let older = page
        .older
        .map(|before| {
            query_string(&EventParams {
                before: Some(before),
                ..p.clone()
            })
        })
        .unwrap_or_default();
    let newest = if p.before.is_some() {
        query_string(&EventParams {
            before: None,
            ..p.clone()
        })
    } else {
        String::new()
    };
    render(&EventsPage {
        l: Layout::of(&a, "Events", "events"),
        events: page.events.iter().map(EventRow::from).collect(),
        p,
        older,
        newest,
    })
}

#[derive(Template)]
#[template(path = "events/verify_partial.html")]
struct VerifyPartial {
    intact: bool,
    events: u64,
    broken_at: i64,
}

#[derive(Deserialize)]
struct VerifyParams {
    #[serde(default)]
    full: Option<String>,
}

async fn view_events_verify_get(
    State(state): State<WebState>,
    _a: Auth<ViewFleet>,
    Query(p): Query<VerifyParams>,
) -> Response {
    let full = p.full.is_some_and(|v| !v.is_empty() && v != "0");
    match ops::verify_events(state.catalog(), &state.0.chain_checked, full).await {
        Ok(ChainCheck::Intact { events }) => render(&VerifyPartial {
            intact: true,
            events,
            broken_at: 0,
        }),
        Ok(ChainCheck::BrokenAt { seq, events_before }) => render(&VerifyPartial {
            intact: false,
            events: events_before,
            broken_at: seq,
        }),
        Err(e) => e.into_page(),
    }
}

#[derive(Template)]
#[template(path = "events/detail.html")]
struct EventPage {
    l: Layout,
    e: EventRow,
    hash: String,
}

async fn view_event_get(
    State(state): State<WebState>,
    a: Auth<ViewFleet>,
    Path(seq): Path<i64>,
) -> Response {
    match ops::event(state.catalog(), seq).await {
        Ok(e) => render(&EventPage {
            l: Layout::of(&a, &format!("Event {seq}"), "events"),
            e: EventRow::from(&e),
            hash: e.hash.to_hex(),
        }),
        Err(e) => e.into_page(),
    }
}

// ---- Users and API tokens ----

pub struct UserRow {
    pub name: String,
    pub role: &'static str,
    pub disabled: bool,
    pub must_change: bool,
    pub created: String,
}

pub struct RoleOption {
    pub name: &'static str,
    pub label: &'static str,
}

#[derive(Template)]
#[template(path = "users/list.html")]
struct UsersPage {
    l: Layout,
    users: Vec<UserRow>,
    roles: Vec<RoleOption>,
    tokens: Vec<ApiTokenRecord>,
    notice: String,
    error: String,
    /// A secret shown once (generated password, API token): what it is, and the secret.
    secret_label: String,
    secret: String,
}

fn roles() -> Vec<RoleOption> {
    Role::ALL
        .into_iter()
        .map(|r| RoleOption {
            name: r.name(),
            label: r.label(),
        })
        .collect()
}

/// The users page with a notice, an error, or a secret to show once.
async fn users_page(
    state: &WebState,
    a: &Auth<Administer>,
    status: StatusCode,
    notice: String,
    error: String,
    secret: Option<(String, String)>,
) -> Response {
    let result = async {
        let users = state.catalog().users().await?;
        let tokens = state.catalog().api_tokens().await?;
        Ok::<_, OpError>((users, tokens))
    }
    .await;
    let (users, tokens) = match result {
        Ok(r) => r,
        Err(e) => return e.into_page(),
    };
    let (secret_label, secret) = secret.unwrap_or_default();
    let page = UsersPage {
        l: Layout::of(a, "Users", "users"),
        users: users
            .iter()
            .map(|u| UserRow {
                name: u.name.clone(),
                role: u.role.name(),
                disabled: u.disabled,
                must_change: u.must_change,
                created: u.created.clone(),
            })
            .collect(),
        roles: roles(),
        tokens,
        notice,
        error,
        secret_label,
        secret,
    };
    (status, render(&page)).into_response()
}

/// Answers a changing action on the users page: the page again, with what happened.
async fn users_outcome(
    state: &WebState,
    a: &Auth<Administer>,
    outcome: Result<(String, Option<(String, String)>), OpError>,
) -> Response {
    match outcome {
        Ok((notice, secret)) => {
            users_page(state, a, StatusCode::OK, notice, String::new(), secret).await
        }
        Err(e) => {
            let status = e.status();
            if status == StatusCode::INTERNAL_SERVER_ERROR {
                return e.into_page();
            }
            users_page(state, a, status, String::new(), e.to_string(), None).await
        }
    }
}

async fn view_users_get(State(state): State<WebState>, a: Auth<Administer>) -> Response {
    users_page(
        &state,
        &a,
        StatusCode::OK,
        String::new(),
        String::new(),
        None,
    )
    .await
}

#[derive(Deserialize)]
pub struct NewUserForm {
    name: String,
    role: String,
    #[serde(default)]
    password: String,
}

async fn view_users_post(
    State(state): State<WebState>,
    a: Auth<Administer>,
    Form(f): Form<NewUserForm>,
) -> Response {
    let outcome = ops::create_user(
        state.catalog(),
        &a.actor(),
        &f.name,
        &f.role,
        Some(f.password.as_str()),
    )
    .await
    .map(|(user, generated)| {
        (
            format!("User {} added as {}.", user.name, user.role.label()),
            generated.map(|p| {
                (
                    format!(
                        "One-time password for {} (shown once; they choose their own at first \
                         sign-in)",
                        user.name
                    ),
                    p,
                )
            }),
        )
    });
    users_outcome(&state, &a, outcome).await
}

#[derive(Deserialize)]
pub struct RoleForm {
    role: String,
}

async fn view_user_role_post(
    State(state): State<WebState>,
    a: Auth<Administer>,
    Path(name): Path<String>,
    Form(f): Form<RoleForm>,
) -> Response {
    let outcome = ops::set_role(state.catalog(), &a.actor(), &name, &f.role)
        .await
        .map(|u| (format!("{} is now {}.", u.name, u.role.label()), None));
    users_outcome(&state, &a, outcome).await
}

async fn view_user_disable_post(
    State(state): State<WebState>,
    a: Auth<Administer>,
    Path(name): Path<String>,
) -> Response {
    let outcome = ops::set_disabled(state.catalog(), &a.actor(), &name, true)
        .await
        .map(|u| (format!("{} is disabled and signed out.", u.name), None));
    users_outcome(&state, &a, outcome).await
}

async fn view_user_enable_post(
    State(state): State<WebState>,
    a: Auth<Administer>,
    Path(name): Path<String>,
) -> Response {
    let outcome = ops::set_disabled(state.catalog(), &a.actor(), &name, false)
        .await
        .map(|u| (format!("{} is enabled.", u.name), None));
    users_outcome(&state, &a, outcome).await
}

async fn view_user_password_post(
    State(state): State<WebState>,
    a: Auth<Administer>,
    Path(name): Path<String>,
) -> Response {
    let outcome = ops::reset_password(state.catalog(), &a.actor(), &name, None)
        .await
        .map(|p| {
            (
                format!("Password of {name} reset; their sessions ended."),
                p.map(|p| (format!("New one-time password for {name} (shown once)"), p)),
            )
        });
    users_outcome(&state, &a, outcome).await
}

#[derive(Deserialize)]
pub struct TokenForm {
    #[serde(default)]
    label: String,
}

async fn view_user_api_tokens_post(
    State(state): State<WebState>,
    a: Auth<Administer>,
    Path(name): Path<String>,
    Form(f): Form<TokenForm>,
) -> Response {
    let outcome = ops::issue_api_token(state.catalog(), &a.actor(), &name, &f.label)
        .await
        .map(|(record, secret)| {
            (
                format!("API token {} issued for {name}.", record.id),
                Some((
                    format!(
                        "API token for {name} ({}): shown once, store it now. Send it as \
                         `Authorization: Bearer TOKEN`.",
                        record.label
                    ),
                    secret,
                )),
            )
        });
    users_outcome(&state, &a, outcome).await
}

async fn view_api_token_revoke_post(
    State(state): State<WebState>,
    a: Auth<Administer>,
    Path(id): Path<i64>,
) -> Response {
    let outcome = ops::revoke_api_token(state.catalog(), &a.actor(), id)
        .await
        .map(|()| (format!("API token {id} revoked."), None));
    users_outcome(&state, &a, outcome).await
}

// ---- Enrolment tokens ----

pub struct EnrollTokenRow {
    pub hash_prefix: String,
    pub uses_left: u32,
    pub expires: String,
    pub created: String,
}

#[derive(Template)]
#[template(path = "tokens/list.html")]
struct EnrollTokensPage {
    l: Layout,
    tokens: Vec<EnrollTokenRow>,
    error: String,
    token: String,
    token_note: String,
}

async fn enroll_tokens_page(
    state: &WebState,
    a: &Auth<Administer>,
    status: StatusCode,
    error: String,
    token: String,
    token_note: String,
) -> Response {
    let tokens = match state.catalog().enroll_tokens(crate::clock::now_ms()).await {
        Ok(t) => t,
        Err(e) => return OpError::from(e).into_page(),
    };
    let page = EnrollTokensPage {
        l: Layout::of(a, "Enrolment tokens", "enroll"),
        tokens: tokens
            .iter()
            .map(|t| EnrollTokenRow {
                hash_prefix: t.hash_prefix.clone(),
                uses_left: t.uses_left,
                expires: crate::clock::rfc3339_ms(t.expires_at_ms),
                created: crate::clock::rfc3339_ms(t.created_at_ms),
            })
            .collect(),
        error,
        token,
        token_note,
    };
    (status, render(&page)).into_response()
}

async fn view_enroll_tokens_get(State(state): State<WebState>, a: Auth<Administer>) -> Response {
    enroll_tokens_page(
        &state,
        &a,
        StatusCode::OK,
        String::new(),
        String::new(),
        String::new(),
    )
    .await
}

#[derive(Deserialize)]
pub struct EnrollTokenForm {
    uses: String,
    expires: String,
}

async fn view_enroll_tokens_post(
    State(state): State<WebState>,
    a: Auth<Administer>,
    Form(f): Form<EnrollTokenForm>,
) -> Response {
    let outcome = match f.uses.trim().parse::<u32>() {
        Ok(uses) => {
            ops::create_enroll_token(
                state.catalog(),
                &state.0.ca_cert_der,
                &a.actor(),
                uses,
                &f.expires,
            )
            .await
        }
        Err(_) => Err(OpError::Invalid(format!(
            "{:?} is not a number of uses: write how many devices may enrol, e.g. 1 or 50",
            f.uses
        ))),
    };
    match outcome {
        Ok(t) => {
            let note = format!(
                "Token for {} device(s), valid until {}. Shown once: on each machine run \
                 `morgana-agent enroll --server https://THIS-APPLIANCE:8443 --token TOKEN`.",
                t.uses, t.expires_at
            );
            enroll_tokens_page(&state, &a, StatusCode::OK, String::new(), t.token, note).await
        }
        Err(e) if e.status() != StatusCode::INTERNAL_SERVER_ERROR => {
            let status = e.status();
            enroll_tokens_page(
                &state,
                &a,
                status,
                e.to_string(),
                String::new(),
                String::new(),
            )
            .await
        }
        Err(e) => e.into_page(),
    }
}

// ---- Own account ----

#[derive(Template)]
#[template(path = "account/password.html")]
struct AccountPage {
    l: Layout,
    must_change: bool,
    notice: String,
    error: String,
}

async fn view_account_get(a: Auth<SignedIn>, Query(n): Query<NoticeQuery>) -> Response {
    render(&AccountPage {
        l: Layout::of(&a, "Your account", "account"),
        must_change: a.user.must_change,
        notice: match n.ok.as_str() {
            "password" => "Password changed.".into(),
            _ => String::new(),
        },
        error: String::new(),
    })
}

#[derive(Deserialize)]
pub struct PasswordForm {
    current: String,
    new: String,
    confirm: String,
}

async fn view_account_password_post(
    State(state): State<WebState>,
    a: Auth<SignedIn>,
    Form(f): Form<PasswordForm>,
) -> Response {
    match ops::change_own_password(state.catalog(), &a.user, &f.current, &f.new, &f.confirm).await {
        // The change ended every session of the user (a stolen one too); this browser
        // gets a fresh one.
        Ok(()) => start_session(&state, &a.user, "/account?ok=password").await,
        Err(e) if e.status() != StatusCode::INTERNAL_SERVER_ERROR => {
            let page = AccountPage {
                l: Layout::of(&a, "Your account", "account"),
                must_change: a.user.must_change,
                notice: String::new(),
                error: e.to_string(),
            };
            (e.status(), render(&page)).into_response()
        }
        Err(e) => e.into_page(),
    }
}
