//! The driver library in the UI (Image Managers and administrators): a profile's rules as
//! the TOML file `morgana driver profile set` reads, with a preview of which devices the
//! edit matches and which sets they would get before it is saved; importing a driver set
//! from an uploaded tar of its tree; delivering a device's drivers now. The work is
//! [`crate::drivers`], as for `morgana driver …`.

use askama::Template;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use super::ops::{self, OpError, OpResult};
use super::ui::{Layout, render, see_other};
use super::{Auth, ManageImages, WebState};
use crate::catalog::{DriverProfileRecord, DriverSetRecord, JobRecord, User};
use crate::drivers::{self, Delivery, DeviceDrivers, DriverError, MAX_ARCHIVE_BYTES, ProfileSpec};

/// A new profile's editor starts from this.
const EXAMPLE_PROFILE: &str = "all = { vendor = \"LENOVO\" }\n\
                               any = [ { model = \"ThinkPad*\" } ]\n\
                               sets = [\"intel-nic\"]\n";

pub fn routes() -> Router<WebState> {
    Router::new()
        .route(
            "/images/driver-profiles",
            get(view_profile_get).post(view_profile_post),
        )
        .route(
            "/images/driver-profiles/preview",
            post(view_profile_preview_post),
        )
        .route(
            "/images/driver-sets",
            // The multipart body is more than a form: room for the archive and its fields.
            post(view_driver_set_post).layer(DefaultBodyLimit::max(MAX_ARCHIVE_BYTES + (1 << 20))),
        )
        .route("/devices/{id}/drivers", post(view_deliver_post))
}

impl From<DriverError> for OpError {
    fn from(e: DriverError) -> OpError {
        match e {
            DriverError::Catalog(c) => OpError::Catalog(c),
            DriverError::Invalid(m) => OpError::Invalid(m),
            DriverError::Store(_) | DriverError::Matcher(_) => {
                OpError::Internal(format!("working on the driver library ({e})"))
            }
            e => OpError::Invalid(e.to_string()),
        }
    }
}

// ---- Operations (UI and API) ----

fn actor(u: &User) -> String {
    format!("user:{}", u.name)
}

/// Checks a profile's name and file; nothing is saved.
pub fn parse(name: &str, toml: &str) -> OpResult<ProfileSpec> {
    drivers::check_name("profile", name)?;
    Ok(drivers::parse_profile(&format!("profile {name}"), toml)?)
}

pub async fn save_profile(
    state: &WebState,
    caller: &User,
    name: &str,
    toml: &str,
) -> OpResult<ProfileSpec> {
    let spec = parse(name, toml)?;
    drivers::save_profile(state.catalog(), name, &spec, &actor(caller)).await?;
    Ok(spec)
}

/// Which devices the profile `toml` would match, alone, and the sets they would get.
pub async fn preview_profile(
    state: &WebState,
    name: &str,
    toml: &str,
) -> OpResult<Vec<DeviceDrivers>> {
    let spec = parse(name, toml)?;
    let record = DriverProfileRecord {
        name: name.to_owned(),
        spec: String::new(),
        updated: String::new(),
        updated_by: String::new(),
    };
    Ok(drivers::preview(state.catalog(), &state.0.hooks, &[(record, spec)], None).await?)
}

pub async fn deliver(
    state: &WebState,
    caller: &User,
    device: &str,
    path: Option<&str>,
) -> OpResult<Vec<(Delivery, JobRecord)>> {
    let d = ops::device(state.catalog(), caller, device).await?;
    let found = drivers::deliveries_for(state.catalog(), &state.0.hooks, &d.id, None).await?;
    Ok(drivers::deliver_now(state.catalog(), &found, path, &actor(caller)).await?)
}

pub async fn import(
    state: &WebState,
    caller: &User,
    name: &str,
    notes: &str,
    archive: Vec<u8>,
) -> OpResult<DriverSetRecord> {
    Ok(drivers::import_tar(
        &state.0.catalog,
        &state.0.store,
        state.0.data.root(),
        name.trim(),
        notes.trim(),
        &actor(caller),
        archive,
    )
    .await?)
}

// ---- Profile editor ----

#[derive(Template)]
#[template(path = "images/driver_profile.html")]
struct ProfilePage {
    l: Layout,
    name: String,
    exists: bool,
    toml: String,
    updated: String,
    notice: String,
    error: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ProfileQuery {
    name: String,
    ok: String,
}

async fn profile_page(
    state: &WebState,
    a: &Auth<ManageImages>,
    name: &str,
    status: StatusCode,
    notice: String,
    error: String,
    edited: Option<String>,
) -> Response {
    let stored = match drivers::profiles(state.catalog()).await {
        Ok(all) => all.into_iter().find(|(r, _)| r.name == name),
        Err(e) => return OpError::from(e).into_page(),
    };
    let toml = match (&edited, &stored) {
        (Some(t), _) => t.clone(),
        (None, Some((_, spec))) => toml::to_string(spec).unwrap_or_default(),
        (None, None) => EXAMPLE_PROFILE.to_owned(),
    };
    let page = ProfilePage {
        l: Layout::of(a, &format!("Driver profile {name}"), "images"),
        name: name.to_owned(),
        exists: stored.is_some(),
        updated: stored
            .as_ref()
            .map(|(r, _)| format!("{} by {}", r.updated, r.updated_by))
            .unwrap_or_default(),
        toml,
        notice,
        error,
    };
    (status, render(&page)).into_response()
}

async fn view_profile_get(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Query(q): Query<ProfileQuery>,
) -> Response {
    let name = q.name.trim();
    if let Err(e) = drivers::check_name("profile", name) {
        return OpError::from(e).into_page();
    }
    let notice = if q.ok == "saved" {
        "Saved: deliveries and base-layer updates use it from now on."
    } else {
        ""
    };
    profile_page(
        &state,
        &a,
        name,
        StatusCode::OK,
        notice.into(),
        String::new(),
        None,
    )
    .await
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct ProfileForm {
    name: String,
    toml: String,
}

async fn view_profile_post(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Form(f): Form<ProfileForm>,
) -> Response {
    let name = f.name.trim();
    match save_profile(&state, &a.user, name, &f.toml).await {
        Ok(_) => see_other(&format!("/images/driver-profiles?name={name}&ok=saved")),
        Err(e) if e.status() == StatusCode::INTERNAL_SERVER_ERROR => e.into_page(),
        Err(e) => {
            if drivers::check_name("profile", name).is_err() {
                return e.into_page();
            }
            let status = e.status();
            profile_page(
                &state,
                &a,
                name,
                status,
                String::new(),
                e.to_string(),
                Some(f.toml),
            )
            .await
        }
    }
}

pub struct PreviewRow {
    pub device: String,
    pub href: String,
    pub state: String,
    pub sets: Vec<String>,
}

#[derive(Template)]
#[template(path = "images/driver_preview_partial.html")]
struct PreviewPartial {
    rows: Vec<PreviewRow>,
    matching: usize,
    error: String,
}

async fn view_profile_preview_post(
    State(state): State<WebState>,
    _a: Auth<ManageImages>,
    Form(f): Form<ProfileForm>,
) -> Response {
    let page = match preview_profile(&state, f.name.trim(), &f.toml).await {
        Ok(all) => PreviewPartial {
            matching: all.iter().filter(|d| !d.matched.is_empty()).count(),
            rows: all
                .iter()
                .map(|d| PreviewRow {
                    device: format!("{} ({})", d.hostname, d.device),
                    href: format!("/devices/{}", d.device),
                    state: if !d.has_inventory {
                        "no inventory reported yet".into()
                    } else if let Some(m) = d.matched.first() {
                        format!("matches: {}", m.reason)
                    } else {
                        "does not match".into()
                    },
                    sets: d
                        .deliveries
                        .iter()
                        .map(|x| format!("{} v{} into {}", x.set, x.version, x.target))
                        .collect(),
                })
                .collect(),
            error: String::new(),
        },
        Err(e) => PreviewPartial {
            rows: Vec::new(),
            matching: 0,
            error: e.to_string(),
        },
    };
    render(&page)
}

// ---- Import and delivery ----

async fn view_driver_set_post(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    let mut form = match form {
        Ok(f) => f,
        Err(e) => {
            return OpError::Invalid(format!(
                "the import was not sent as a file upload ({}); use the form on the Images page",
                e.body_text()
            ))
            .into_page();
        }
    };
    let (mut name, mut notes, mut archive) = (String::new(), String::new(), Vec::new());
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return OpError::Invalid(format!(
                    "the upload could not be read ({}); an archive may be at most {} MiB; \
                     nothing was imported",
                    e.body_text(),
                    MAX_ARCHIVE_BYTES >> 20
                ))
                .into_page();
            }
        };
        let read = match field.name().unwrap_or("") {
            "name" => field.text().await.map(|t| name = t),
            "notes" => field.text().await.map(|t| notes = t),
            "file" => field.bytes().await.map(|b| archive = b.to_vec()),
            _ => Ok(()),
        };
        if let Err(e) = read {
            return OpError::Invalid(format!(
                "the upload could not be read ({}); nothing was imported",
                e.body_text()
            ))
            .into_page();
        }
    }
    if archive.is_empty() {
        return OpError::Invalid(
            "choose the .tar of the driver folder to upload; nothing was imported".into(),
        )
        .into_page();
    }
    match import(&state, &a.user, &name, &notes, archive).await {
        Ok(_) => see_other("/images?ok=imported"),
        Err(e) => e.into_page(),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct DeliverForm {
    path: String,
}

async fn view_deliver_post(
    State(state): State<WebState>,
    a: Auth<ManageImages>,
    Path(id): Path<String>,
    Form(f): Form<DeliverForm>,
) -> Response {
    let path = Some(f.path.trim()).filter(|p| !p.is_empty());
    match deliver(&state, &a.user, &id, path).await {
        Ok(_) => see_other(&format!("/jobs?device={id}")),
        Err(e) => e.into_page(),
    }
}
