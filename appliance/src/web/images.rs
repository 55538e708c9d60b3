//! The Image Manager's overview: layers, reference machines, driver sets and profiles, and
//! the deployment of assigned layers per device with its newest apply job. Capturing,
//! assigning and importing are done with `morgana layer …` / `morgana driver …` for now.

use askama::Template;
use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use morgana_core::control::JobKind;
use morgana_core::plugin::types::LayerKind;

use super::ops::{OpError, human_bytes};
use super::ui::{Layout, render};
use super::{Auth, ManageImages, WebState};
use crate::catalog::LayerPin;

/// Devices with an assignment listed at most.
const MAX_DEPLOYMENTS: usize = 500;

pub fn routes() -> Router<WebState> {
    Router::new().route("/images", get(view_images_get))
}

pub struct LayerRow {
    pub name: String,
    pub kind: &'static str,
    pub version: u32,
    pub source: String,
    pub snapshot: String,
    pub files: u64,
    pub size: String,
    pub notes: String,
}

pub struct DeploymentRow {
    pub device: String,
    pub href: String,
    pub assigned: String,
    pub applied: String,
    pub job: String,
    pub job_href: String,
    pub state: &'static str,
    pub progress: String,
}

#[derive(Template)]
#[template(path = "images/index.html")]
struct ImagesPage {
    l: Layout,
    layers: Vec<LayerRow>,
    references: Vec<(String, String)>,
    driver_sets: Vec<(String, u32, u64, String)>,
    profiles: Vec<String>,
    deployments: Vec<DeploymentRow>,
    capped: bool,
}

fn pins(base: &LayerPin, apps: &[LayerPin]) -> String {
    std::iter::once(base)
        .chain(apps)
        .map(|p| format!("{} v{}", p.name, p.version))
        .collect::<Vec<_>>()
        .join(" + ")
}

async fn view_images_get(State(state): State<WebState>, a: Auth<ManageImages>) -> Response {
    let c = state.catalog();
    let page = async {
        let layers = c.layers().await?;
        let references = c.reference_devices().await?;
        let sets = c.driver_sets().await?;
        let profiles = c.driver_profiles().await?;
        let mut deployments = Vec::new();
        let mut capped = false;
        for d in c.devices().await? {
            let Some(assigned) = c.layer_assignment(&d.device.id).await? else {
                continue;
            };
            if deployments.len() == MAX_DEPLOYMENTS {
                capped = true;
                break;
            }
            let applied = c.applied_layers(&d.device.id).await?;
            let newest_apply =
                c.jobs(Some(&d.device.id), 50).await?.into_iter().find(|j| {
                    matches!(j.kind, JobKind::ApplyLayers(_) | JobKind::RollbackLayers(_))
                });
            let p = newest_apply.as_ref().map(|j| &j.progress);
            deployments.push(DeploymentRow {
                device: format!("{} ({})", d.device.hostname, d.device.id),
                href: format!("/devices/{}", d.device.id),
                assigned: pins(&assigned.assignment.base, &assigned.assignment.apps),
                applied: applied
                    .map(|r| {
                        std::iter::once(&r.applied.base)
                            .chain(&r.applied.apps)
                            .map(|l| format!("{} v{}", l.name, l.version))
                            .collect::<Vec<_>>()
                            .join(" + ")
                    })
                    .unwrap_or_default(),
                job: newest_apply
                    .as_ref()
                    .map(|j| j.id.clone())
                    .unwrap_or_default(),
                job_href: newest_apply
                    .as_ref()
                    .map(|j| format!("/jobs/{}", j.id))
                    .unwrap_or_default(),
                state: newest_apply
                    .as_ref()
                    .map_or("", |j| crate::jobs::state_name(j.state)),
                progress: p
                    .map(|p| {
                        format!(
                            "{} of {} files, {} of {}",
                            p.files_done,
                            p.files_total,
                            human_bytes(p.bytes_done),
                            human_bytes(p.bytes_total)
                        )
                    })
                    .unwrap_or_default(),
            });
        }
        Ok::<_, OpError>(ImagesPage {
            l: Layout::of(&a, "Images", "images"),
            layers: layers
                .iter()
                .map(|r| LayerRow {
                    name: r.layer.name.clone(),
                    kind: match r.layer.kind {
                        LayerKind::Base => "base",
                        LayerKind::App => "app",
                    },
                    version: r.version,
                    source: r.layer.source_device.clone(),
                    snapshot: r.layer.snapshot.clone(),
                    files: r.layer.files,
                    size: human_bytes(r.layer.bytes),
                    notes: r.layer.notes.clone(),
                })
                .collect(),
            references: references.into_iter().map(|d| (d.id, d.hostname)).collect(),
            driver_sets: sets
                .into_iter()
                .map(|s| (s.set.name, s.version, s.set.files, human_bytes(s.set.bytes)))
                .collect(),
            profiles: profiles.into_iter().map(|p| p.name).collect(),
            deployments,
            capped,
        })
    }
    .await;
    match page {
        Ok(p) => render(&p),
        Err(e) => e.into_page(),
    }
}
