//! The management web UI (server-rendered askama templates, htmx) and the REST API under
//! `/api/v1`, on the same HTTPS listener as the agent API.
//!
//! Who may call what is decided by the extractor a handler takes ([`Auth`]), named after
//! the permission it needs: the UI authenticates by session cookie (and checks a CSRF token
//! on every changing request), the API by `Authorization: Bearer` tokens only, so a browser
//! cannot be tricked into making API calls with its cookie.
//!
//! Each area of the UI keeps its pages in a module of its own with a `routes()` that
//! [`router`] merges; API routes go to [`crate::rest::routes`].

pub mod assets;
pub mod browse;
pub mod deploy;
pub mod drivers;
pub mod images;
pub mod jobs;
pub mod nodes;
pub mod ops;
pub mod plugins;
pub mod policies;
pub mod portal;
pub mod reflectors;
pub mod ui;

use std::marker::PhantomData;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

use crate::auth::{self, LoginLimiter, Permission};
use crate::catalog::{Catalog, User};

/// Form bodies of the UI are small; anything bigger is not one of ours.
const MAX_FORM_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct WebState(pub(crate) Arc<WebInner>);

pub(crate) struct WebInner {
    pub catalog: Arc<dyn Catalog>,
    /// DER of the appliance CA: enrolment tokens carry its pin.
    pub ca_cert_der: Vec<u8>,
    pub logins: LoginLimiter,
    /// Where the last event-chain check of this process ended.
    pub chain_checked: std::sync::Mutex<Option<crate::events::ChainAnchor>>,
    /// Where plugins (and their compiled code) are stored.
    pub data: crate::config::DataDir,
    /// The volumes new packs go to, for the nodes and volumes page.
    pub volumes: Vec<std::path::PathBuf>,
    /// Where layer captures and driver imports write their trees and chunks.
    pub store: Arc<crate::store::PackStore>,
    /// The plugin hooks (layer rules, driver matcher) captures and previews run; the same
    /// instance as the agent API's, so both share one plugin cache and failure-event limit.
    pub hooks: Arc<crate::hooks::Hooks>,
}

impl WebState {
    pub fn new(
        catalog: Arc<dyn Catalog>,
        ca_cert_der: Vec<u8>,
        data: crate::config::DataDir,
        store: Arc<crate::store::PackStore>,
        hooks: Arc<crate::hooks::Hooks>,
    ) -> WebState {
        WebState(Arc::new(WebInner {
            hooks,
            catalog,
            ca_cert_der,
            logins: LoginLimiter::default(),
            chain_checked: std::sync::Mutex::new(None),
            data,
            volumes: store.volumes().to_vec(),
            store,
        }))
    }

    pub fn catalog(&self) -> &dyn Catalog {
        self.0.catalog.as_ref()
    }

    /// The plugin hooks, for decisions a job needs when it is queued (driver matching).
    pub fn hooks(&self) -> &crate::hooks::Hooks {
        &self.0.hooks
    }

    /// What layer captures need: the catalog, the blob store and the hooks.
    pub fn layer_env(&self) -> crate::layers::Env<'_> {
        crate::layers::Env {
            catalog: &self.0.catalog,
            store: &self.0.store,
            hooks: &self.0.hooks,
        }
    }
}

/// The UI and the REST API, to merge into the appliance's router.
pub fn router(state: WebState) -> Router {
    let ui = ui::routes()
        .merge(images::routes())
        .merge(deploy::routes())
        .merge(drivers::routes())
        .merge(jobs::routes())
        .merge(nodes::routes())
        .merge(policies::routes())
        .merge(portal::routes())
        .merge(plugins::routes())
        .merge(reflectors::routes())
        .layer(middleware::from_fn(require_csrf));
    Router::new()
        .merge(ui)
        .merge(crate::rest::routes())
        .route("/static/{file}", axum::routing::get(assets::serve))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    // Scripts and styles come from this binary only; inline handlers are not used.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:; \
             frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    resp
}

fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// Refuses a changing UI request unless it carries the session's CSRF token (header for
/// htmx, `csrf` form field otherwise). The login form has no session yet; it is refused
/// only when the browser says it was sent from another site.
async fn require_csrf(req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let cross_site = req
        .headers()
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site");
    // The login form is sent without a session (or with a stale one, which it replaces):
    // there, only the browser's own word that it came from another site refuses it.
    let session = auth::session_secret(req.headers()).filter(|_| req.uri().path() != "/login");
    // A file upload is multipart, which is not parsed here: its form puts the token in the
    // query string instead.
    let multipart_token = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"multipart/form-data"))
        .then(|| form_urlencoded_field(req.uri().query().unwrap_or("").as_bytes(), "csrf"));
    let Some(secret) = session else {
        if cross_site {
            return csrf_refused();
        }
        // No session: the handler's `Auth` answers with the login page.
        return next.run(req).await;
    };
    let expected = auth::csrf_token(&secret);
    if let Some(v) = req.headers().get(auth::CSRF_HEADER) {
        return if v.as_bytes() == expected.as_bytes() {
            next.run(req).await
        } else {
            csrf_refused()
        };
    }
    if let Some(token) = multipart_token {
        return if token.as_deref() == Some(expected.as_str()) {
            next.run(req).await
        } else {
            csrf_refused()
        };
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_FORM_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return ui::error_page(
                StatusCode::PAYLOAD_TOO_LARGE,
                "The form sent is larger than this appliance accepts; send less at once.",
            );
        }
    };
    let token = form_urlencoded_field(&bytes, "csrf");
    if token.as_deref() != Some(expected.as_str()) {
        return csrf_refused();
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn form_urlencoded_field(body: &[u8], name: &str) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).ok()?;
    pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

fn csrf_refused() -> Response {
    ui::error_page(
        StatusCode::FORBIDDEN,
        "This form has expired or was sent from another site, so nothing was changed. \
         Reload the page and try again.",
    )
}

/// A permission as a type, so a handler's signature states what it needs.
pub trait Need: Send + Sync {
    const PERMISSION: Permission;
}

pub struct SignedIn;
pub struct ViewFleet;
pub struct OwnDevices;
pub struct RunJobs;
pub struct ManageProtection;
pub struct ManageImages;
pub struct Administer;

impl Need for SignedIn {
    const PERMISSION: Permission = Permission::SignedIn;
}
impl Need for ViewFleet {
    const PERMISSION: Permission = Permission::ViewFleet;
}
impl Need for OwnDevices {
    const PERMISSION: Permission = Permission::OwnDevices;
}
impl Need for RunJobs {
    const PERMISSION: Permission = Permission::RunJobs;
}
impl Need for ManageProtection {
    const PERMISSION: Permission = Permission::ManageProtection;
}
impl Need for ManageImages {
    const PERMISSION: Permission = Permission::ManageImages;
}
impl Need for Administer {
    const PERMISSION: Permission = Permission::Administer;
}

/// The caller of a UI or API route, allowed what `N` needs.
pub struct Auth<N> {
    pub user: User,
    /// The session's CSRF token (UI only), for the forms a page renders.
    pub csrf: String,
    _need: PhantomData<N>,
}

impl<N> Auth<N> {
    /// The actor recorded in audit events.
    pub fn actor(&self) -> String {
        format!("user:{}", self.user.name)
    }
}

impl<N: Need> FromRequestParts<WebState> for Auth<N> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &WebState) -> Result<Self, Response> {
        let path = parts.uri.path().to_owned();
        let api = is_api(&path);
        let catalog = state.catalog();
        let looked_up = if api {
            match auth::bearer_token(&parts.headers) {
                Some(token) => catalog
                    .api_token_user(morgana_core::Id::of(token.as_bytes()))
                    .await
                    .map(|u| u.map(|u| (u, String::new()))),
                None => Ok(None),
            }
        } else {
            match auth::session_secret(&parts.headers) {
                Some(secret) => catalog
                    .session_user(
                        morgana_core::Id::of(secret.as_bytes()),
                        crate::clock::now_ms(),
                    )
                    .await
                    .map(|u| u.map(|u| (u, auth::csrf_token(&secret)))),
                None => Ok(None),
            }
        };
        let found = match looked_up {
            Ok(found) => found,
            Err(e) => {
                let e = ops::OpError::from(e);
                return Err(if api {
                    e.into_api().into_response()
                } else {
                    e.into_page()
                });
            }
        };
        let Some((user, csrf)) = found else {
            return Err(if api {
                crate::api::ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "this call needs an API token: send `Authorization: Bearer TOKEN`; an \
                     administrator issues tokens on the Users page or with POST /api/v1/api-tokens",
                )
                .into_response()
            } else {
                ui::to_login(parts)
            });
        };
        if !user.role.allows(N::PERMISSION) {
            let msg = format!(
                "{} is signed in as {}, which may not do this; ask an administrator if you need it",
                user.name,
                user.role.label()
            );
            return Err(if api {
                crate::api::ApiError::new(StatusCode::FORBIDDEN, msg).into_response()
            } else {
                ui::error_page(StatusCode::FORBIDDEN, &msg)
            });
        }
        // A generated password must be replaced before anything else in the UI.
        if !api && user.must_change && !path.starts_with("/account") && path != "/logout" {
            return Err(ui::see_other("/account?must_change=1"));
        }
        Ok(Auth {
            user,
            csrf,
            _need: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests;
