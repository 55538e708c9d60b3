//! Plugins for administrators: the `/plugins` page and `/api/v1/plugins`. Both call
//! [`crate::plugins`], as `morgana plugin` does, so a component refused here is refused
//! there with the same words.

use askama::Template;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use morgana_core::plugin::Hook;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ops::{OpError, human_bytes};
use super::ui::{Layout, render};
use super::{Administer, Auth, WebState};
use crate::api::ApiError;
use crate::catalog::{CatalogError, PluginRecord};
use crate::plugins::PluginOpError;
use crate::rest::{Route, route};

/// Components bigger than this are not plugins we want to run (a JavaScript component,
/// which carries its engine, is about 10 MB).
const MAX_COMPONENT_BYTES: usize = 64 << 20;

impl From<PluginOpError> for OpError {
    fn from(e: PluginOpError) -> OpError {
        match e {
            PluginOpError::Refused(m) | PluginOpError::Invalid(m) => OpError::Invalid(m),
            PluginOpError::Catalog(e @ CatalogError::PluginUnknown(_)) => {
                OpError::NotFound(e.to_string())
            }
            PluginOpError::Catalog(e) => OpError::Catalog(e),
            PluginOpError::Internal(m) => OpError::Internal(m),
        }
    }
}

pub fn routes() -> Router<WebState> {
    Router::new()
        .route(
            "/plugins",
            get(view_plugins_get)
                .post(view_plugins_post)
                .layer(DefaultBodyLimit::max(MAX_COMPONENT_BYTES)),
        )
        .route("/plugins/{id}/enable", post(view_plugin_enable_post))
        .route("/plugins/{id}/disable", post(view_plugin_disable_post))
}

pub fn api() -> Vec<Route> {
    vec![
        route(Method::GET, "/api/v1/plugins", api_plugins),
        route(Method::POST, "/api/v1/plugins", api_plugin_add).body_limit(MAX_COMPONENT_BYTES),
        route(
            Method::POST,
            "/api/v1/plugins/{id}/enable",
            api_plugin_enable,
        ),
        route(
            Method::POST,
            "/api/v1/plugins/{id}/disable",
            api_plugin_disable,
        ),
    ]
}

fn plugin_json(p: &PluginRecord) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "hook": p.hook.name(),
        "version": p.version,
        "active": p.active,
        "size": p.size,
        "hash": p.hash.to_hex(),
        "added": p.added,
    })
}

fn parse_hook(hook: &str) -> Result<Hook, OpError> {
    hook.parse::<Hook>().map_err(|_| {
        OpError::Invalid(format!(
            "{hook:?} is not a hook: use one of {}",
            Hook::ALL.map(Hook::name).join(", ")
        ))
    })
}

// ---- API ----

async fn api_plugins(
    State(s): State<WebState>,
    _a: Auth<Administer>,
) -> Result<Response, ApiError> {
    let plugins = s
        .catalog()
        .plugins()
        .await
        .map_err(|e| OpError::from(e).into_api())?;
    Ok(Json(plugins.iter().map(plugin_json).collect::<Vec<_>>()).into_response())
}

#[derive(Deserialize)]
struct AddQuery {
    #[serde(default)]
    hook: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    enable: bool,
}

async fn api_plugin_add(
    State(s): State<WebState>,
    a: Auth<Administer>,
    q: Result<Query<AddQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Ok(Query(q)) = q else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "send ?hook=HOOK&name=NAME[&enable=true] with the component as the body",
        ));
    };
    let record = add(&s, &a, &q.hook, &q.name, body.to_vec(), q.enable)
        .await
        .map_err(OpError::into_api)?;
    Ok((StatusCode::CREATED, Json(plugin_json(&record))).into_response())
}

async fn api_plugin_enable(
    State(s): State<WebState>,
    a: Auth<Administer>,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    switch_api(&s, &a, id, true).await
}

async fn api_plugin_disable(
    State(s): State<WebState>,
    a: Auth<Administer>,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    switch_api(&s, &a, id, false).await
}

async fn switch_api(
    s: &WebState,
    a: &Auth<Administer>,
    id: i64,
    on: bool,
) -> Result<Response, ApiError> {
    let record = crate::plugins::set_enabled(s.catalog(), &s.0.data, &a.actor(), id, on)
        .await
        .map_err(|e| OpError::from(e).into_api())?;
    Ok(Json(plugin_json(&record)).into_response())
}

async fn add(
    s: &WebState,
    a: &Auth<Administer>,
    hook: &str,
    name: &str,
    bytes: Vec<u8>,
    enable: bool,
) -> Result<PluginRecord, OpError> {
    let hook = parse_hook(hook)?;
    if bytes.is_empty() {
        return Err(OpError::Invalid(
            "no component was sent: upload the .wasm file built for the hook".into(),
        ));
    }
    Ok(crate::plugins::add(
        s.catalog(),
        &s.0.data,
        &a.actor(),
        name,
        hook,
        bytes,
        enable,
    )
    .await?)
}

// ---- Page ----

pub struct PluginRow {
    pub id: i64,
    pub name: String,
    pub hook: &'static str,
    pub version: u32,
    pub active: bool,
    pub size: String,
    pub added: String,
}

#[derive(Template)]
#[template(path = "plugins/list.html")]
struct PluginsPage {
    l: Layout,
    plugins: Vec<PluginRow>,
    hooks: Vec<&'static str>,
    /// Hooks without an active plugin, which answer with the built-in.
    builtin: Vec<&'static str>,
    notice: String,
    error: String,
}

async fn page(
    s: &WebState,
    a: &Auth<Administer>,
    status: StatusCode,
    outcome: Result<String, String>,
) -> Response {
    let plugins = match s.catalog().plugins().await {
        Ok(p) => p,
        Err(e) => return OpError::from(e).into_page(),
    };
    let builtin = Hook::ALL
        .into_iter()
        .filter(|h| !plugins.iter().any(|p| p.active && p.hook == *h))
        .map(Hook::name)
        .collect();
    let (notice, error) = match outcome {
        Ok(n) => (n, String::new()),
        Err(e) => (String::new(), e),
    };
    let page = PluginsPage {
        l: Layout::of(a, "Plugins", "plugins"),
        plugins: plugins
            .iter()
            .map(|p| PluginRow {
                id: p.id,
                name: p.name.clone(),
                hook: p.hook.name(),
                version: p.version,
                active: p.active,
                size: human_bytes(p.size),
                added: p.added.clone(),
            })
            .collect(),
        hooks: Hook::ALL.map(Hook::name).to_vec(),
        builtin,
        notice,
        error,
    };
    (status, render(&page)).into_response()
}

async fn view_plugins_get(State(s): State<WebState>, a: Auth<Administer>) -> Response {
    page(&s, &a, StatusCode::OK, Ok(String::new())).await
}

/// The upload form's fields, read from its multipart body.
#[derive(Default)]
struct Upload {
    hook: String,
    name: String,
    enable: bool,
    file_name: String,
    bytes: Vec<u8>,
}

async fn read_upload(mut form: Multipart) -> Result<Upload, String> {
    let mut u = Upload::default();
    let unreadable = |e: axum::extract::multipart::MultipartError| {
        format!(
            "the upload could not be read ({}); send the form again",
            e.body_text()
        )
    };
    while let Some(field) = form.next_field().await.map_err(unreadable)? {
        match field.name().unwrap_or("") {
            "hook" => u.hook = field.text().await.map_err(unreadable)?,
            "name" => u.name = field.text().await.map_err(unreadable)?,
            "enable" => u.enable = !field.text().await.map_err(unreadable)?.is_empty(),
            "file" => {
                u.file_name = field.file_name().unwrap_or("").to_owned();
                u.bytes = field.bytes().await.map_err(unreadable)?.to_vec();
            }
            _ => {}
        }
    }
    Ok(u)
}

async fn view_plugins_post(
    State(s): State<WebState>,
    a: Auth<Administer>,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    let upload = match form {
        Ok(form) => read_upload(form).await,
        Err(e) => Err(format!(
            "the upload form was not sent as a file upload ({}); use the form on this page",
            e.body_text()
        )),
    };
    let mut u = match upload {
        Ok(u) => u,
        Err(e) => return page(&s, &a, StatusCode::BAD_REQUEST, Err(e)).await,
    };
    if u.name.trim().is_empty() {
        u.name = std::path::Path::new(&u.file_name)
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_owned();
    }
    let file = if u.file_name.is_empty() {
        "the uploaded component".to_owned()
    } else {
        u.file_name.clone()
    };
    match add(&s, &a, &u.hook, &u.name, u.bytes, u.enable).await {
        Ok(r) => {
            let state = if r.active {
                "active"
            } else {
                "inactive: enable it below"
            };
            let notice = format!(
                "Added plugin {} ({} v{}) for {}, {state}.",
                r.id, r.name, r.version, r.hook
            );
            page(&s, &a, StatusCode::OK, Ok(notice)).await
        }
        Err(e) => {
            let status = e.status();
            page(&s, &a, status, Err(format!("Refusing {file}: {e}"))).await
        }
    }
}

async fn view_plugin_enable_post(
    State(s): State<WebState>,
    a: Auth<Administer>,
    Path(id): Path<i64>,
) -> Response {
    switch_page(&s, &a, id, true).await
}

async fn view_plugin_disable_post(
    State(s): State<WebState>,
    a: Auth<Administer>,
    Path(id): Path<i64>,
) -> Response {
    switch_page(&s, &a, id, false).await
}

async fn switch_page(s: &WebState, a: &Auth<Administer>, id: i64, on: bool) -> Response {
    match crate::plugins::set_enabled(s.catalog(), &s.0.data, &a.actor(), id, on).await {
        Ok(r) => {
            let notice = if on {
                format!(
                    "Plugin {} ({} v{}) now answers {}.",
                    r.id, r.name, r.version, r.hook
                )
            } else {
                format!(
                    "Plugin {} ({} v{}) is off: {} uses the built-in unless another is enabled.",
                    r.id, r.name, r.version, r.hook
                )
            };
            page(s, a, StatusCode::OK, Ok(notice)).await
        }
        Err(e) => {
            let e = OpError::from(e);
            page(s, a, e.status(), Err(e.to_string())).await
        }
    }
}
