//! Branch reflectors in the UI (Image Managers and administrators): every device with the
//! role and what it last reported (address, site, load, cache, bytes served, last seen),
//! and turning the role on or off per device, each confirmed on a page that says what will
//! happen. The work is [`crate::reflectors`], as for `morgana reflector …`.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::get;
use axum::{Form, Router};
use morgana_core::control::{DEFAULT_REFLECTOR_PORT, ReflectorRole};
use serde::Deserialize;

use super::ops::{OpError, OpResult, human_bytes};
use super::ui::{Layout, render, see_other};
use super::{Auth, ManageImages, WebState};
use crate::catalog::{Device, User};
use crate::reflectors::{self, ReflectorError, ReflectorView};

pub fn routes() -> Router<WebState> {
    Router::new()
        .route("/reflectors", get(view_list_get).post(view_enable_post))
        .route("/reflectors/confirm", get(view_confirm_get))
        .route(
            "/reflectors/{id}/disable",
            get(view_disable_get).post(view_disable_post),
        )
}

impl From<ReflectorError> for OpError {
    fn from(e: ReflectorError) -> OpError {
        match e {
            ReflectorError::Catalog(c) => OpError::Catalog(c),
            ReflectorError::NoDevice(_) => OpError::NotFound(e.to_string()),
            e => OpError::Invalid(e.to_string()),
        }
    }
}

// ---- Operations (UI and API) ----

fn actor(u: &User) -> String {
    format!("user:{}", u.name)
}

/// What a caller asks for (the API's JSON body, the UI's form).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RoleRequest {
    /// Device id or hostname (the UI's form; the API names it in the path).
    pub device: String,
    pub enabled: bool,
    /// Default: [`DEFAULT_REFLECTOR_PORT`].
    pub port: Option<u16>,
    /// Empty: no site.
    pub site: String,
}

impl RoleRequest {
    fn role(&self) -> ReflectorRole {
        let site = self.site.trim();
        ReflectorRole {
            port: self.port.unwrap_or(DEFAULT_REFLECTOR_PORT),
            site: (!site.is_empty()).then(|| site.to_owned()),
        }
    }
}

/// Turns the role on or off for `device` (id or hostname).
pub async fn set_role(
    catalog: &dyn crate::catalog::Catalog,
    caller: &User,
    device: &str,
    req: &RoleRequest,
) -> OpResult<(Device, Option<ReflectorRole>)> {
    let d = crate::policy::find_device(catalog, device.trim()).await?;
    let role = req.enabled.then(|| req.role());
    reflectors::set_role(catalog, &d.id, role.clone(), &actor(caller)).await?;
    Ok((d, role))
}

pub async fn list(catalog: &dyn crate::catalog::Catalog) -> OpResult<Vec<ReflectorView>> {
    Ok(reflectors::list(catalog, crate::clock::now_ms()).await?)
}

// ---- Pages ----

struct Row {
    device_id: String,
    hostname: String,
    enabled: bool,
    live: bool,
    address: String,
    port: u16,
    site: String,
    load: String,
    cache: String,
    served: String,
    last_seen: String,
}

#[derive(Template)]
#[template(path = "reflectors/list.html")]
struct ListPage {
    l: Layout,
    rows: Vec<Row>,
    notice: String,
    default_port: u16,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Notice {
    ok: String,
}

async fn view_list_get(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Query(n): Query<Notice>,
) -> Response {
    let all = match list(state.catalog()).await {
        Ok(all) => all,
        Err(e) => return e.into_page(),
    };
    let rows = all
        .into_iter()
        .map(|v| {
            let r = v.record;
            Row {
                address: r.address.unwrap_or_else(|| "not reported yet".into()),
                port: r.port,
                site: r.site.unwrap_or_default(),
                load: format!("{:.0} % ({} requests)", r.load * 100.0, r.in_flight),
                cache: format!(
                    "{} of {}",
                    human_bytes(r.cache_bytes),
                    human_bytes(r.cache_limit)
                ),
                served: human_bytes(r.bytes_served),
                last_seen: v.last_seen.unwrap_or_else(|| "never".into()),
                device_id: r.device_id,
                hostname: r.hostname,
                enabled: r.enabled,
                live: v.live,
            }
        })
        .collect();
    render(&ListPage {
        l: Layout::of(&a, "Reflectors", "reflectors"),
        rows,
        notice: match n.ok.as_str() {
            "enabled" => "Reflector role on: the device starts serving at its next heartbeat.",
            "disabled" => "Reflector role off: the device stops serving at its next heartbeat.",
            _ => "",
        }
        .to_owned(),
        default_port: DEFAULT_REFLECTOR_PORT,
    })
}

#[derive(Template)]
#[template(path = "reflectors/confirm.html")]
struct ConfirmPage {
    l: Layout,
    enable: bool,
    device_id: String,
    hostname: String,
    port: u16,
    site: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ConfirmQuery {
    device: String,
    port: String,
    site: String,
}

/// Checks the request and says what turning the role on will do; nothing changes yet.
async fn view_confirm_get(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Query(q): Query<ConfirmQuery>,
) -> Response {
    let checked = async {
        let port = match q.port.trim() {
            "" => DEFAULT_REFLECTOR_PORT,
            p => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                OpError::Invalid(format!(
                    "port {p:?} is not usable: give a TCP port from 1 to 65535"
                ))
            })?,
        };
        let site = q.site.trim().to_owned();
        if !site.is_empty() && !morgana_core::control::valid_site(&site) {
            return Err(ReflectorError::BadSite(site).into());
        }
        let d = crate::policy::find_device(state.catalog(), q.device.trim()).await?;
        Ok::<_, OpError>((d, port, site))
    }
    .await;
    match checked {
        Ok((d, port, site)) => render(&ConfirmPage {
            l: Layout::of(&a, &format!("Reflector · {}", d.hostname), "reflectors"),
            enable: true,
            device_id: d.id,
            hostname: d.hostname,
            port,
            site,
        }),
        Err(e) => e.into_page(),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct EnableForm {
    device: String,
    port: Option<u16>,
    site: String,
}

async fn view_enable_post(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Form(f): Form<EnableForm>,
) -> Response {
    let req = RoleRequest {
        device: f.device.clone(),
        enabled: true,
        port: f.port,
        site: f.site,
    };
    match set_role(state.catalog(), &a.user, &f.device, &req).await {
        Ok(_) => see_other("/reflectors?ok=enabled"),
        Err(e) => e.into_page(),
    }
}

async fn view_disable_get(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Path(id): Path<String>,
) -> Response {
    let d = match crate::policy::find_device(state.catalog(), &id).await {
        Ok(d) => d,
        Err(e) => return OpError::from(e).into_page(),
    };
    render(&ConfirmPage {
        l: Layout::of(&a, &format!("Reflector · {}", d.hostname), "reflectors"),
        enable: false,
        device_id: d.id,
        hostname: d.hostname,
        port: 0,
        site: String::new(),
    })
}

async fn view_disable_post(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Path(id): Path<String>,
) -> Response {
    let req = RoleRequest {
        device: id.clone(),
        ..RoleRequest::default()
    };
    match set_role(state.catalog(), &a.user, &id, &req).await {
        Ok(_) => see_other("/reflectors?ok=disabled"),
        Err(e) => e.into_page(),
    }
}
