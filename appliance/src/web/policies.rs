//! Policies in the UI (Protection Managers and administrators): the list, one policy's
//! rules as the TOML file `morgana policy set` reads, a dry run of an edit on the devices
//! that follow it, saving a new version, and assigning devices.

use askama::Template;
use axum::Form;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use morgana_core::policy::FACTORY_UNPROTECTED;
use serde::Deserialize;

use super::ops::{OpError, human_bytes};
use super::ui::{Layout, render, see_other};
use super::{Auth, ManageProtection, WebState};
use crate::policy::{self, AssignError, DryRun, DryRunError, PolicyVersion, format_duration};

pub fn routes() -> Router<WebState> {
    Router::new()
        .route("/policies", get(view_policies_get).post(view_policies_post))
        .route(
            "/policies/{name}",
            get(view_policy_get).post(view_policy_post),
        )
        .route("/policies/{name}/dry-run", post(view_policy_dry_run_post))
        .route("/policies/{name}/devices", post(view_policy_devices_post))
}

impl From<policy::PolicyError> for OpError {
    fn from(e: policy::PolicyError) -> OpError {
        OpError::Invalid(e.to_string())
    }
}

impl From<AssignError> for OpError {
    fn from(e: AssignError) -> OpError {
        match e {
            AssignError::Catalog(c) => OpError::Catalog(c),
            AssignError::NoSuchPolicy(_) => OpError::NotFound(e.to_string()),
            _ => OpError::Invalid(e.to_string()),
        }
    }
}

impl From<DryRunError> for OpError {
    fn from(e: DryRunError) -> OpError {
        match e {
            DryRunError::Catalog(c) => OpError::Catalog(c),
            DryRunError::Device(d) => d.into(),
            DryRunError::Policy(p) => p.into(),
            DryRunError::Tree(t) => OpError::Internal(format!("reading a snapshot ({t})")),
        }
    }
}

/// Checks a policy's name and file; nothing is saved.
pub fn parse(name: &str, toml: &str) -> Result<policy::PolicySpec, OpError> {
    policy::check_name(name)?;
    Ok(policy::parse_toml(toml)?)
}

pub struct PolicyRow {
    pub name: String,
    pub version: u64,
    pub devices: u64,
    pub sync: String,
    pub alert: String,
    pub retention: String,
}

fn row(p: &PolicyVersion, devices: u64) -> PolicyRow {
    let r = &p.spec.retention;
    PolicyRow {
        name: p.name.clone(),
        version: p.version,
        devices,
        sync: format_duration(u64::from(p.spec.sync_interval_secs)),
        alert: format_duration(p.spec.alert_after_secs),
        retention: format!("{}/{}/{}/{}", r.hourly, r.daily, r.weekly, r.monthly),
    }
}

#[derive(Template)]
#[template(path = "policies/list.html")]
struct ListPage {
    l: Layout,
    policies: Vec<PolicyRow>,
    error: String,
    name: String,
    toml: String,
}

#[derive(Deserialize, Default)]
pub struct NoticeQuery {
    #[serde(default)]
    ok: String,
}

async fn list_page(
    state: &WebState,
    a: &Auth<ManageProtection>,
    status: StatusCode,
    error: String,
    name: String,
    toml: String,
) -> Response {
    let policies = match state.catalog().policies().await {
        Ok(p) => p,
        Err(e) => return OpError::from(e).into_page(),
    };
    let page = ListPage {
        l: Layout::of(a, "Policies", "policies"),
        policies: policies.iter().map(|(p, n)| row(p, *n)).collect(),
        error,
        name,
        toml: if toml.is_empty() {
            policy::to_toml(&policy::PolicySpec::default())
        } else {
            toml
        },
    };
    (status, render(&page)).into_response()
}

async fn view_policies_get(State(state): State<WebState>, a: Auth<ManageProtection>) -> Response {
    list_page(
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
pub struct PolicyForm {
    #[serde(default)]
    name: String,
    toml: String,
}

async fn view_policies_post(
    State(state): State<WebState>,
    a: Auth<ManageProtection>,
    Form(f): Form<PolicyForm>,
) -> Response {
    let name = f.name.trim().to_owned();
    let outcome = async {
        let spec = parse(&name, &f.toml)?;
        if state.catalog().policy(&name, None).await?.is_some() {
            return Err(OpError::Conflict(format!(
                "a policy {name} exists already: open it to save a new version"
            )));
        }
        Ok(policy::save(state.catalog(), &name, &spec, &a.actor())
            .await?
            .1)
    }
    .await;
    match outcome {
        Ok(_) => see_other(&format!("/policies/{name}?ok=created")),
        Err(e) if e.status() == StatusCode::INTERNAL_SERVER_ERROR => e.into_page(),
        Err(e) => list_page(&state, &a, e.status(), e.to_string(), name, f.toml).await,
    }
}

#[derive(Template)]
#[template(path = "policies/detail.html")]
struct DetailPage {
    l: Layout,
    p: PolicyRow,
    created: String,
    actor: String,
    toml: String,
    factory: String,
    versions: Vec<(u64, String, String)>,
    notice: String,
    error: String,
}

async fn detail_page(
    state: &WebState,
    a: &Auth<ManageProtection>,
    name: &str,
    status: StatusCode,
    notice: String,
    error: String,
    edited: Option<String>,
) -> Response {
    let found = async {
        let all = state.catalog().policies().await?;
        let history = state.catalog().policy_history(name).await?;
        Ok::<_, OpError>((all, history))
    }
    .await;
    let (all, history) = match found {
        Ok(f) => f,
        Err(e) => return e.into_page(),
    };
    let Some((p, devices)) = all.into_iter().find(|(p, _)| p.name == name) else {
        return OpError::NotFound(format!(
            "there is no policy {name:?}: the Policies page lists them"
        ))
        .into_page();
    };
    let page = DetailPage {
        l: Layout::of(a, &format!("Policy {name}"), "policies"),
        p: row(&p, devices),
        created: p.created.clone(),
        actor: p.actor.clone(),
        toml: edited.unwrap_or_else(|| policy::to_toml(&p.spec)),
        factory: FACTORY_UNPROTECTED.join("  "),
        versions: history
            .iter()
            .rev()
            .map(|v| (v.version, v.created.clone(), v.actor.clone()))
            .collect(),
        notice,
        error,
    };
    (status, render(&page)).into_response()
}

async fn view_policy_get(
    State(state): State<WebState>,
    a: Auth<ManageProtection>,
    Path(name): Path<String>,
    Query(q): Query<NoticeQuery>,
) -> Response {
    let notice = match q.ok.as_str() {
        "created" => "Policy created. Assign devices to it below.",
        "saved" => "Saved as a new version: its devices get it at their next heartbeat.",
        "assigned" => "Devices assigned: they get this policy at their next heartbeat.",
        _ => "",
    };
    detail_page(
        &state,
        &a,
        &name,
        StatusCode::OK,
        notice.into(),
        String::new(),
        None,
    )
    .await
}

async fn view_policy_post(
    State(state): State<WebState>,
    a: Auth<ManageProtection>,
    Path(name): Path<String>,
    Form(f): Form<PolicyForm>,
) -> Response {
    let outcome = async {
        let spec = parse(&name, &f.toml)?;
        if state.catalog().policy(&name, None).await?.is_none() {
            return Err(OpError::NotFound(format!("there is no policy {name:?}")));
        }
        Ok(policy::save(state.catalog(), &name, &spec, &a.actor())
            .await?
            .1)
    }
    .await;
    match outcome {
        Ok(_) => see_other(&format!("/policies/{name}?ok=saved")),
        Err(e) if e.status() == StatusCode::INTERNAL_SERVER_ERROR => e.into_page(),
        Err(e) => {
            let status = e.status();
            detail_page(
                &state,
                &a,
                &name,
                status,
                String::new(),
                e.to_string(),
                Some(f.toml),
            )
            .await
        }
    }
}

pub struct DryRunRow {
    pub device: String,
    pub href: String,
    pub snapshot: String,
    pub dropped: String,
    pub into_user: String,
    pub out_of_user: String,
    pub capped: bool,
}

fn count(c: policy::Count) -> String {
    format!("{} files, {}", c.files, human_bytes(c.bytes))
}

#[derive(Template)]
#[template(path = "policies/dry_run_partial.html")]
struct DryRunPartial {
    rows: Vec<DryRunRow>,
    uploaded_again: String,
    error: String,
}

async fn view_policy_dry_run_post(
    State(state): State<WebState>,
    _a: Auth<ManageProtection>,
    Path(name): Path<String>,
    Form(f): Form<PolicyForm>,
) -> Response {
    let outcome = async {
        let spec = parse(&name, &f.toml)?;
        Ok::<_, OpError>(policy::dry_run_devices(state.catalog(), &name, &spec, &[]).await?)
    }
    .await;
    let page = match outcome {
        Ok(runs) => DryRunPartial {
            uploaded_again: runs
                .first()
                .map(|r| r.uploaded_again.join("  "))
                .unwrap_or_default(),
            rows: runs.iter().map(dry_run_row).collect(),
            error: String::new(),
        },
        Err(e) => DryRunPartial {
            rows: Vec::new(),
            uploaded_again: String::new(),
            error: e.to_string(),
        },
    };
    render(&page)
}

fn dry_run_row(r: &DryRun) -> DryRunRow {
    DryRunRow {
        device: format!("{} ({})", r.hostname, r.device_id),
        href: format!("/devices/{}", r.device_id),
        snapshot: r.snapshot.clone().unwrap_or_default(),
        dropped: count(r.dropped),
        into_user: count(r.into_user_area),
        out_of_user: count(r.out_of_user_area),
        capped: r.capped,
    }
}

#[derive(Deserialize)]
pub struct DevicesForm {
    devices: String,
}

async fn view_policy_devices_post(
    State(state): State<WebState>,
    a: Auth<ManageProtection>,
    Path(name): Path<String>,
    Form(f): Form<DevicesForm>,
) -> Response {
    let wanted: Vec<String> = f.devices.split_whitespace().map(str::to_owned).collect();
    if wanted.is_empty() {
        return detail_page(
            &state,
            &a,
            &name,
            StatusCode::BAD_REQUEST,
            String::new(),
            "name at least one device (id or hostname) to assign".into(),
            None,
        )
        .await;
    }
    match policy::assign(state.catalog(), &name, &wanted, &a.actor()).await {
        Ok(_) => see_other(&format!("/policies/{name}?ok=assigned")),
        Err(e) => {
            let e = OpError::from(e);
            let status = e.status();
            if status == StatusCode::INTERNAL_SERVER_ERROR {
                return e.into_page();
            }
            detail_page(
                &state,
                &a,
                &name,
                status,
                String::new(),
                e.to_string(),
                None,
            )
            .await
        }
    }
}
