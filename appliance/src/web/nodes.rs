//! Nodes and volumes (administrators): this appliance node, and for each volume new packs
//! go to its space, the packs it holds, and whether it is healthy.

use std::path::{Path, PathBuf};

use askama::Template;
use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use serde::Serialize;

use super::ops::{OpError, OpResult, human_bytes};
use super::ui::{Layout, render};
use super::{Administer, Auth, WebState};
use crate::alerts::{VOLUME_FULL_PERCENT, space};
use crate::catalog::Catalog;

pub fn routes() -> Router<WebState> {
    Router::new().route("/nodes", get(view_nodes_get))
}

#[derive(Serialize)]
pub struct NodeInfo {
    pub hostname: String,
    pub version: &'static str,
    pub data_dir: String,
    pub catalog: &'static str,
    pub volumes: Vec<VolumeInfo>,
    /// Packs recorded on volumes this node no longer writes to (removed from `--volume`).
    pub packs_elsewhere: u64,
}

#[derive(Serialize)]
pub struct VolumeInfo {
    pub path: String,
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub used_percent: f64,
    pub packs: u64,
    pub pack_bytes: u64,
    /// `ok`, or what is wrong and what to do.
    pub health: String,
}

/// Reads every pack record once (paged), so the cost follows the number of packs, not of
/// chunks.
pub async fn node_info(
    catalog: &dyn Catalog,
    data_dir: &Path,
    volumes: &[PathBuf],
) -> OpResult<NodeInfo> {
    let mut counts = vec![(0u64, 0u64); volumes.len()];
    let mut elsewhere = 0;
    let mut after = None;
    loop {
        let page = catalog.packs_page(after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for p in &page {
            match volumes.iter().position(|v| *v == p.volume) {
                Some(i) => {
                    counts[i].0 += 1;
                    counts[i].1 += p.size;
                }
                None => elsewhere += 1,
            }
        }
    }
    let volumes = volumes
        .iter()
        .zip(counts)
        .map(|(v, (packs, pack_bytes))| {
            let (used, available, used_percent, health) = match space(v) {
                Ok(s) => {
                    let pct = s.used_percent();
                    let health = if !writable(v) {
                        "not writable by the appliance: fix the folder's owner or mode".into()
                    } else if pct > VOLUME_FULL_PERCENT {
                        format!(
                            "over {VOLUME_FULL_PERCENT} % full: add a volume (`serve --volume \
                             DIR`), free space, or shorten retention"
                        )
                    } else {
                        "ok".into()
                    };
                    (s.used, s.available, pct, health)
                }
                Err(e) => (0, 0, 0.0, format!("cannot be read ({e}): is it mounted?")),
            };
            VolumeInfo {
                path: v.display().to_string(),
                used_bytes: used,
                available_bytes: available,
                used_percent: (used_percent * 10.0).round() / 10.0,
                packs,
                pack_bytes,
                health,
            }
        })
        .collect();
    Ok(NodeInfo {
        hostname: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
        version: env!("CARGO_PKG_VERSION"),
        data_dir: data_dir.display().to_string(),
        catalog: "SQLite (embedded)",
        volumes,
        packs_elsewhere: elsewhere,
    })
}

fn writable(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

pub struct VolumeRow {
    pub path: String,
    pub used: String,
    pub available: String,
    pub percent: String,
    pub packs: u64,
    pub pack_bytes: String,
    pub health: String,
    pub ok: bool,
}

#[derive(Template)]
#[template(path = "nodes/index.html")]
struct NodesPage {
    l: Layout,
    node: NodeInfo,
    rows: Vec<VolumeRow>,
}

async fn view_nodes_get(State(state): State<WebState>, a: Auth<Administer>) -> Response {
    let info = node_info(state.catalog(), state.0.data.root(), &state.0.volumes).await;
    let node = match info {
        Ok(n) => n,
        Err(e) => return OpError::into_page(e),
    };
    let rows = node
        .volumes
        .iter()
        .map(|v| VolumeRow {
            path: v.path.clone(),
            used: human_bytes(v.used_bytes),
            available: human_bytes(v.available_bytes),
            percent: format!("{:.1} %", v.used_percent),
            packs: v.packs,
            pack_bytes: human_bytes(v.pack_bytes),
            health: v.health.clone(),
            ok: v.health == "ok",
        })
        .collect();
    render(&NodesPage {
        l: Layout::of(&a, "Nodes and volumes", "nodes"),
        node,
        rows,
    })
}

/// `GET /api/v1/nodes`: the same as the page, as JSON.
pub fn api() -> Vec<crate::rest::Route> {
    vec![crate::rest::route(
        axum::http::Method::GET,
        "/api/v1/nodes",
        api_nodes,
    )]
}

async fn api_nodes(
    State(state): State<WebState>,
    _a: Auth<Administer>,
) -> Result<axum::Json<NodeInfo>, crate::api::ApiError> {
    node_info(state.catalog(), state.0.data.root(), &state.0.volumes)
        .await
        .map(axum::Json)
        .map_err(OpError::into_api)
}
