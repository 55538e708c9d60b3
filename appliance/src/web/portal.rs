//! The end-user file portal under `/portal`: the devices a user owns (staff too, for their
//! own devices only: they see the fleet on the other pages), every snapshot of them, a
//! file-name search across those snapshots, and downloads of a file or of a folder as a
//! ZIP, both streamed from the packs as they are read (nothing is staged on disk). The
//! endpoint need not be online.
//!
//! Isolation: every route finds the device through [`portal_device`], which answers "not
//! found" for any device the caller does not own, and the snapshot through the device's
//! own snapshot list; paths are walked from that snapshot's root by name, so no id or path
//! in a URL reaches anything else. Administrators turn the portal off per device; then
//! every route of that device answers 403 saying so. Every download is an audit event
//! (`portal.download`).

use std::collections::HashSet;
use std::sync::Arc;

use askama::Template;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use bytes::Bytes;
use morgana_core::Id;
use morgana_core::tree::{Content, Entry, Kind};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::browse::{self, BrowseError};
use super::ops::{self, DeviceParams, OpError, OpResult, human_bytes};
use super::ui::{Crumb, Layout, query_string, render, see_other};
use super::{Administer, Auth, OwnDevices, WebState};
use crate::catalog::{Catalog, DeviceSummary, User};
use crate::events::{NewEvent, Severity};
use crate::store::{PackStore, with_codec};
use crate::zip::ZipWriter;

/// Search reads at most this many trees (over all snapshots of all the user's devices)…
pub const SEARCH_MAX_TREES: usize = 2000;
/// …and lists at most this many matches.
pub const SEARCH_MAX_RESULTS: usize = 200;
/// Chunks located per catalog query while streaming.
const CHUNK_BATCH: usize = 64;
/// Bytes gathered before a send to the client.
const SEND_BYTES: usize = 256 * 1024;
/// Sends queued ahead of a slow client (memory per download ≈ this × [`SEND_BYTES`]).
const QUEUE: usize = 4;

pub fn routes() -> Router<WebState> {
    Router::new()
        .route("/devices/{id}/portal", post(view_device_portal_post))
        .route("/portal", get(view_portal_get))
        .route("/portal/search", get(view_portal_search_get))
        .route("/portal/devices/{id}", get(view_portal_device_get))
        .route(
            "/portal/devices/{id}/snapshots/{snapshot}/tree",
            get(view_portal_tree_get),
        )
        .route(
            "/portal/devices/{id}/snapshots/{snapshot}/file",
            get(view_portal_file_get),
        )
        .route(
            "/portal/devices/{id}/snapshots/{snapshot}/zip",
            get(view_portal_zip_get),
        )
}

// ---- Operations ----

/// A device the caller owns and may use the portal for.
pub async fn portal_device(
    catalog: &dyn Catalog,
    caller: &User,
    id: &str,
) -> OpResult<DeviceSummary> {
    let not_found = || {
        OpError::NotFound(format!(
            "there is no device {id:?} of yours: pick one from My files (/portal)"
        ))
    };
    let d = catalog.device_summary(id).await?.ok_or_else(not_found)?;
    if d.owner.as_deref() != Some(caller.name.as_str()) {
        return Err(not_found());
    }
    super::ops::require_portal(catalog, &d).await?;
    Ok(d)
}

/// The caller's own devices, with whether the portal is on for each.
pub async fn own_devices(
    catalog: &dyn Catalog,
    caller: &User,
) -> OpResult<Vec<(DeviceSummary, bool)>> {
    let mut query = ops::device_query(
        caller,
        &DeviceParams {
            limit: Some(ops::MAX_PER_PAGE),
            ..Default::default()
        },
    )?;
    // Staff included: the portal is about one's own devices.
    query.owner = Some(caller.name.clone());
    let mut out = Vec::new();
    for d in catalog.devices_page(&query).await? {
        let on = catalog.device_portal_enabled(&d.id).await?.unwrap_or(false);
        out.push((d, on));
    }
    Ok(out)
}

pub async fn set_enabled(
    catalog: &dyn Catalog,
    caller: &User,
    device_id: &str,
    enabled: bool,
) -> OpResult<DeviceSummary> {
    let d = ops::device(catalog, caller, device_id).await?;
    if !catalog.set_device_portal(&d.id, enabled).await? {
        return Err(OpError::NotFound(format!("device {} is gone", d.id)));
    }
    crate::events::record(
        catalog,
        NewEvent::system(
            if enabled {
                "portal.enabled"
            } else {
                "portal.disabled"
            },
            Severity::Info,
            format!(
                "file portal of {} turned {}",
                d.hostname,
                if enabled { "on" } else { "off" }
            ),
        )
        .for_device(&d.id)
        .by(format!("user:{}", caller.name)),
    )
    .await;
    Ok(d)
}

/// `/a/b` as components, refusing `..` (which would otherwise just not be found: say so).
fn components(path: &str) -> OpResult<Vec<&str>> {
    let parts = browse::split_path(path);
    if parts.contains(&"..") || path.contains('\0') {
        return Err(OpError::Invalid(format!(
            "{path:?} is not a path in a snapshot: use a path like /home/ann/docs, without `..`"
        )));
    }
    Ok(parts)
}

/// The entry at `path` in the snapshot rooted at `root`; `/` is the root folder itself.
async fn entry_at(catalog: &dyn Catalog, root: Id, path: &str) -> OpResult<(Entry, Vec<String>)> {
    let parts = components(path)?;
    let Some((last, parent)) = parts.split_last() else {
        let root_entry = Entry {
            name: Vec::new(),
            kind: Some(Kind::Dir),
            mode: 0o755,
            content: Content::Tree(root),
            ..Default::default()
        };
        return Ok((root_entry, Vec::new()));
    };
    let tree = browse::folder(catalog, root, &parent.join("/")).await?;
    let entry = tree
        .entries
        .into_iter()
        .find(|e| e.name == last.as_bytes())
        .ok_or_else(|| BrowseError::NoSuchPath {
            path: format!("/{}", parts.join("/")),
        })?;
    Ok((entry, parts.iter().map(|p| (*p).to_owned()).collect()))
}

async fn audit_download(
    catalog: &dyn Catalog,
    caller: &User,
    d: &DeviceSummary,
    snapshot: &str,
    path: &str,
    what: &str,
) {
    crate::events::record(
        catalog,
        NewEvent::system(
            "portal.download",
            Severity::Info,
            format!(
                "{} downloaded {what} {path} from snapshot {snapshot} of {}",
                caller.name, d.hostname
            ),
        )
        .for_device(&d.id)
        .by(format!("user:{}", caller.name)),
    )
    .await;
}

/// `attachment` with an ASCII fallback name and the exact name in RFC 5987 form.
fn content_disposition(name: &str) -> HeaderValue {
    let fallback: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&format!(
        "attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

type Tx = mpsc::Sender<Result<Bytes, std::io::Error>>;

fn body_of(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Body {
    Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// Why a stream stopped: the client left (nothing to say), or reading failed (said to the
/// client by breaking the response, and to the log).
enum Stop {
    Gone,
    Failed(String),
}

async fn send(tx: &Tx, buf: &mut Vec<u8>) -> Result<(), Stop> {
    if buf.is_empty() {
        return Ok(());
    }
    let bytes = Bytes::from(std::mem::take(buf));
    tx.send(Ok(bytes)).await.map_err(|_| Stop::Gone)
}

/// Reads a file's content, verifying every chunk, and hands it to `sink` piece by piece.
async fn read_content(
    catalog: &dyn Catalog,
    content: &Content,
    mut sink: impl AsyncSink,
) -> Result<(), Stop> {
    match content {
        Content::None | Content::Tree(_) => Ok(()),
        Content::Inline(data) => sink.put(data).await,
        Content::Chunks { file, chunks } => {
            if morgana_core::id::FileIdHasher::of(chunks) != *file {
                return Err(Stop::Failed(format!(
                    "file {file} does not match its chunk list; run `morgana check`"
                )));
            }
            for batch in chunks.chunks(CHUNK_BATCH) {
                let locations = catalog
                    .locate_blobs(batch)
                    .await
                    .map_err(|e| Stop::Failed(e.to_string()))?;
                let ids = batch.to_vec();
                let read = tokio::task::spawn_blocking(move || {
                    let mut out = Vec::with_capacity(ids.len());
                    for (id, loc) in ids.iter().zip(locations) {
                        let loc = loc.ok_or_else(|| {
                            format!("chunk {id} is not stored; run `morgana check`")
                        })?;
                        let data = with_codec(|codec| PackStore::read_blob(&loc, codec))
                            .map_err(|e| e.to_string())?;
                        out.push(data);
                    }
                    Ok::<_, String>(out)
                })
                .await
                .map_err(|e| Stop::Failed(e.to_string()))?
                .map_err(Stop::Failed)?;
                for data in read {
                    sink.put(&data).await?;
                }
            }
            Ok(())
        }
    }
}

/// Where [`read_content`] puts what it read.
trait AsyncSink {
    async fn put(&mut self, data: &[u8]) -> Result<(), Stop>;
}

/// Straight to the client, in sends of about [`SEND_BYTES`].
struct ToClient<'a> {
    tx: &'a Tx,
    buf: &'a mut Vec<u8>,
}

impl AsyncSink for ToClient<'_> {
    async fn put(&mut self, data: &[u8]) -> Result<(), Stop> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= SEND_BYTES {
            send(self.tx, self.buf).await?;
        }
        Ok(())
    }
}

/// Into the open entry of a ZIP, then to the client.
struct ToZip<'a> {
    zip: &'a mut ZipWriter,
    tx: &'a Tx,
    buf: &'a mut Vec<u8>,
}

impl AsyncSink for ToZip<'_> {
    async fn put(&mut self, data: &[u8]) -> Result<(), Stop> {
        self.zip.data(self.buf, data);
        if self.buf.len() >= SEND_BYTES {
            send(self.tx, self.buf).await?;
        }
        Ok(())
    }
}

fn stopped(tx: &Tx, what: &str, r: Result<(), Stop>) {
    if let Err(Stop::Failed(e)) = r {
        tracing::error!(error = %e, "portal download of {what} failed part-way");
        // An error item aborts the response, so the client sees it incomplete.
        let _ = tx.try_send(Err(std::io::Error::other(e)));
    }
}

fn stream_file(catalog: Arc<dyn Catalog>, entry: Entry) -> Body {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        let mut buf = Vec::with_capacity(SEND_BYTES);
        let r = async {
            read_content(
                catalog.as_ref(),
                &entry.content,
                ToClient {
                    tx: &tx,
                    buf: &mut buf,
                },
            )
            .await?;
            send(&tx, &mut buf).await
        }
        .await;
        stopped(&tx, "a file", r);
    });
    body_of(rx)
}

/// Unix file type bits for a ZIP's external attributes.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

fn stream_zip(catalog: Arc<dyn Catalog>, top: String, root: Id) -> Body {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        let mut buf = Vec::with_capacity(SEND_BYTES);
        let mut zip = ZipWriter::default();
        let r = async {
            // Explicit stack: memory follows depth and the widest folder.
            let mut stack = vec![(top, root)];
            while let Some((prefix, id)) = stack.pop() {
                let tree = browse::read_tree(catalog.as_ref(), id)
                    .await
                    .map_err(|e| Stop::Failed(e.to_string()))?;
                let mut deeper = Vec::new();
                for e in &tree.entries {
                    let mut name = prefix.as_bytes().to_vec();
                    name.extend_from_slice(&e.name);
                    let perm = e.mode & 0o7777;
                    match (&e.content, e.kind()) {
                        (Content::Tree(sub), _) => {
                            name.push(b'/');
                            zip.start(&mut buf, name.clone(), S_IFDIR | perm, e.mtime_ns);
                            zip.finish_entry(&mut buf);
                            deeper.push((String::from_utf8_lossy(&name).into_owned(), *sub));
                        }
                        (content, Kind::File) => {
                            zip.start(&mut buf, name, S_IFREG | perm, e.mtime_ns);
                            read_content(
                                catalog.as_ref(),
                                content,
                                ToZip {
                                    zip: &mut zip,
                                    tx: &tx,
                                    buf: &mut buf,
                                },
                            )
                            .await?;
                            zip.finish_entry(&mut buf);
                        }
                        (_, Kind::Symlink) => {
                            zip.start(&mut buf, name, S_IFLNK | 0o777, e.mtime_ns);
                            zip.data(&mut buf, &e.symlink_target);
                            zip.finish_entry(&mut buf);
                        }
                        // Devices, sockets and pipes have no content to download.
                        _ => {}
                    }
                    if buf.len() >= SEND_BYTES {
                        send(&tx, &mut buf).await?;
                    }
                }
                stack.extend(deeper.into_iter().rev());
            }
            zip.finish(&mut buf);
            send(&tx, &mut buf).await
        }
        .await;
        stopped(&tx, "a folder", r);
    });
    body_of(rx)
}

/// One search match.
pub struct Found {
    pub device_id: String,
    pub hostname: String,
    pub snapshot: String,
    pub created: String,
    pub path: String,
    pub folder: String,
    pub kind: &'static str,
    pub size: u64,
}

pub struct SearchResult {
    pub found: Vec<Found>,
    pub trees_read: usize,
    /// The tree or result cap was reached: there may be more.
    pub capped: bool,
}

/// File and folder names containing `q` (any case), in the snapshots of the caller's
/// devices with the portal on, newest snapshot first. A folder whose tree was already read
/// for this device is not read again: what it holds is listed once, for the newest
/// snapshot that has it.
/// At most `max_trees` trees are read and `max_results` matches listed.
pub async fn search(
    catalog: &dyn Catalog,
    caller: &User,
    q: &str,
    max_trees: usize,
    max_results: usize,
) -> OpResult<SearchResult> {
    let needle = q.trim().to_lowercase();
    if needle.is_empty() {
        return Err(OpError::Invalid(
            "type part of a file or folder name to search for".into(),
        ));
    }
    let mut out = SearchResult {
        found: Vec::new(),
        trees_read: 0,
        capped: false,
    };
    'devices: for (d, on) in own_devices(catalog, caller).await? {
        if !on {
            continue;
        }
        let mut seen = HashSet::new();
        for s in ops::snapshots(catalog, &d.id).await? {
            let mut stack = vec![(String::new(), s.root)];
            while let Some((prefix, id)) = stack.pop() {
                if !seen.insert(id) {
                    continue;
                }
                if out.trees_read >= max_trees {
                    out.capped = true;
                    break 'devices;
                }
                let tree = browse::read_tree(catalog, id).await?;
                out.trees_read += 1;
                for e in &tree.entries {
                    let name = String::from_utf8_lossy(&e.name);
                    let path = format!("{prefix}/{name}");
                    if name.to_lowercase().contains(&needle) {
                        if out.found.len() >= max_results {
                            out.capped = true;
                            break 'devices;
                        }
                        out.found.push(Found {
                            device_id: d.id.clone(),
                            hostname: d.hostname.clone(),
                            snapshot: s.id.clone(),
                            created: s.created.clone(),
                            folder: if prefix.is_empty() {
                                "/".into()
                            } else {
                                prefix.clone()
                            },
                            kind: browse::kind_name(e.kind()),
                            size: e.size,
                            path: path.clone(),
                        });
                    }
                    if let Content::Tree(sub) = e.content {
                        stack.push((path, sub));
                    }
                }
            }
        }
    }
    Ok(out)
}

// ---- Pages ----

pub struct PortalDevice {
    pub id: String,
    pub hostname: String,
    pub last_snapshot: String,
    pub enabled: bool,
}

#[derive(Template)]
#[template(path = "portal/index.html")]
struct IndexPage {
    l: Layout,
    devices: Vec<PortalDevice>,
}

async fn view_portal_get(State(state): State<WebState>, a: Auth<OwnDevices>) -> Response {
    match own_devices(state.catalog(), &a.user).await {
        Ok(list) => render(&IndexPage {
            l: Layout::of(&a, "My files", "portal"),
            devices: list
                .into_iter()
                .map(|(d, enabled)| PortalDevice {
                    id: d.id,
                    hostname: d.hostname,
                    last_snapshot: d.last_snapshot.unwrap_or_else(|| "never".into()),
                    enabled,
                })
                .collect(),
        }),
        Err(e) => e.into_page(),
    }
}

pub struct PortalSnapshot {
    pub id: String,
    pub created: String,
    pub reason: String,
    pub files: u64,
    pub size: String,
}

#[derive(Template)]
#[template(path = "portal/device.html")]
struct DevicePage {
    l: Layout,
    id: String,
    hostname: String,
    snapshots: Vec<PortalSnapshot>,
}

async fn view_portal_device_get(
    State(state): State<WebState>,
    a: Auth<OwnDevices>,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let d = portal_device(state.catalog(), &a.user, &id).await?;
        let snaps = ops::snapshots(state.catalog(), &d.id).await?;
        Ok::<_, OpError>((d, snaps))
    }
    .await;
    match result {
        Ok((d, snaps)) => render(&DevicePage {
            l: Layout::of(&a, &d.hostname, "portal"),
            id: d.id,
            hostname: d.hostname,
            snapshots: snaps
                .into_iter()
                .map(|s| PortalSnapshot {
                    id: s.id,
                    created: s.created,
                    reason: s.reason,
                    files: s.stats.files,
                    size: human_bytes(s.stats.bytes),
                })
                .collect(),
        }),
        Err(e) => e.into_page(),
    }
}

pub struct PortalRow {
    pub name: String,
    pub kind: &'static str,
    pub size: String,
    pub modified: String,
    /// Folder: its page; file: its download.
    pub href: String,
    /// Folder: its ZIP download.
    pub zip: String,
}

#[derive(Template)]
#[template(path = "portal/tree.html")]
struct TreePage {
    l: Layout,
    id: String,
    hostname: String,
    created: String,
    crumbs: Vec<Crumb>,
    rows: Vec<PortalRow>,
    zip: String,
    more: usize,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct PathQuery {
    path: String,
}

fn portal_href(device: &str, snapshot: &str, what: &str, path: &str) -> String {
    format!(
        "/portal/devices/{device}/snapshots/{snapshot}/{what}?{}",
        query_string(&[("path", path)])
    )
}

async fn view_portal_tree_get(
    State(state): State<WebState>,
    a: Auth<OwnDevices>,
    Path((id, snapshot)): Path<(String, String)>,
    Query(q): Query<PathQuery>,
) -> Response {
    let result = async {
        let d = portal_device(state.catalog(), &a.user, &id).await?;
        let s = ops::snapshot(state.catalog(), &d, &snapshot).await?;
        let parts: Vec<String> = components(&q.path)?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let tree = browse::folder(state.catalog(), s.root, &parts.join("/")).await?;
        Ok::<_, OpError>((d, s, parts, tree))
    }
    .await;
    let (d, s, parts, tree) = match result {
        Ok(r) => r,
        Err(e) => return e.into_page(),
    };
    let mut crumbs = vec![Crumb {
        name: d.hostname.clone(),
        href: portal_href(&d.id, &s.id, "tree", "/"),
    }];
    let mut walked = String::new();
    for p in &parts {
        walked.push('/');
        walked.push_str(p);
        crumbs.push(Crumb {
            name: p.clone(),
            href: portal_href(&d.id, &s.id, "tree", &walked),
        });
    }
    let rows = tree
        .entries
        .iter()
        .take(browse::MAX_LISTED)
        .map(|e| {
            let l = browse::listed(e);
            let path = format!("{walked}/{}", l.name);
            let (href, zip) = match l.kind {
                "folder" => (
                    portal_href(&d.id, &s.id, "tree", &path),
                    portal_href(&d.id, &s.id, "zip", &path),
                ),
                "file" => (portal_href(&d.id, &s.id, "file", &path), String::new()),
                // Symlinks and special files have nothing to download on their own.
                _ => (String::new(), String::new()),
            };
            PortalRow {
                size: if l.kind == "file" {
                    human_bytes(l.size)
                } else {
                    String::new()
                },
                name: l.name,
                kind: l.kind,
                modified: l.modified,
                href,
                zip,
            }
        })
        .collect();
    render(&TreePage {
        l: Layout::of(&a, &format!("{} · {}", d.hostname, s.created), "portal"),
        zip: portal_href(
            &d.id,
            &s.id,
            "zip",
            if walked.is_empty() { "/" } else { &walked },
        ),
        id: d.id,
        hostname: d.hostname,
        created: s.created,
        crumbs,
        rows,
        more: tree.entries.len().saturating_sub(browse::MAX_LISTED),
    })
}

async fn view_portal_file_get(
    State(state): State<WebState>,
    a: Auth<OwnDevices>,
    Path((id, snapshot)): Path<(String, String)>,
    Query(q): Query<PathQuery>,
) -> Response {
    let catalog = state.catalog();
    let result = async {
        let d = portal_device(catalog, &a.user, &id).await?;
        let s = ops::snapshot(catalog, &d, &snapshot).await?;
        let (entry, parts) = entry_at(catalog, s.root, &q.path).await?;
        if entry.kind() != Kind::File {
            return Err(OpError::Invalid(format!(
                "{:?} is a {}, not a file: download folders as a ZIP",
                q.path,
                browse::kind_name(entry.kind())
            )));
        }
        Ok((d, s, entry, parts))
    }
    .await;
    let (d, s, entry, parts) = match result {
        Ok(r) => r,
        Err(e) => return e.into_page(),
    };
    let path = format!("/{}", parts.join("/"));
    audit_download(catalog, &a.user, &d, &s.id, &path, "file").await;
    let name = parts.last().cloned().unwrap_or_default();
    let size = entry.size;
    let mut resp = stream_file(state.0.catalog.clone(), entry).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(header::CONTENT_DISPOSITION, content_disposition(&name));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn view_portal_zip_get(
    State(state): State<WebState>,
    a: Auth<OwnDevices>,
    Path((id, snapshot)): Path<(String, String)>,
    Query(q): Query<PathQuery>,
) -> Response {
    let catalog = state.catalog();
    let result = async {
        let d = portal_device(catalog, &a.user, &id).await?;
        let s = ops::snapshot(catalog, &d, &snapshot).await?;
        let (entry, parts) = entry_at(catalog, s.root, &q.path).await?;
        let Content::Tree(root) = entry.content else {
            return Err(OpError::Invalid(format!(
                "{:?} is not a folder: download files directly",
                q.path
            )));
        };
        Ok((d, s, root, parts))
    }
    .await;
    let (d, s, root, parts) = match result {
        Ok(r) => r,
        Err(e) => return e.into_page(),
    };
    let path = format!("/{}", parts.join("/"));
    audit_download(catalog, &a.user, &d, &s.id, &path, "folder").await;
    // Entries sit under the folder's own name, so unpacking makes one folder.
    let top = parts
        .last()
        .cloned()
        .unwrap_or_else(|| format!("{}-{}", d.hostname, s.id));
    let mut resp = stream_zip(state.0.catalog.clone(), format!("{top}/"), root).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zip"),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        content_disposition(&format!("{top}.zip")),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[derive(Template)]
#[template(path = "portal/search.html")]
struct SearchPage {
    l: Layout,
    q: String,
    rows: Vec<SearchRow>,
    trees_read: usize,
    capped: bool,
    max_trees: usize,
    max_results: usize,
}

pub struct SearchRow {
    pub f: Found,
    pub href: String,
    pub folder_href: String,
    pub size: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub struct SearchQuery {
    q: String,
}

async fn view_portal_search_get(
    State(state): State<WebState>,
    a: Auth<OwnDevices>,
    Query(q): Query<SearchQuery>,
) -> Response {
    let result = if q.q.trim().is_empty() {
        Ok(SearchResult {
            found: Vec::new(),
            trees_read: 0,
            capped: false,
        })
    } else {
        search(
            state.catalog(),
            &a.user,
            &q.q,
            SEARCH_MAX_TREES,
            SEARCH_MAX_RESULTS,
        )
        .await
    };
    let r = match result {
        Ok(r) => r,
        Err(e) => return e.into_page(),
    };
    render(&SearchPage {
        l: Layout::of(&a, "Search my files", "portal"),
        q: q.q,
        trees_read: r.trees_read,
        capped: r.capped,
        max_trees: SEARCH_MAX_TREES,
        max_results: SEARCH_MAX_RESULTS,
        rows: r
            .found
            .into_iter()
            .map(|f| SearchRow {
                href: match f.kind {
                    "file" => portal_href(&f.device_id, &f.snapshot, "file", &f.path),
                    "folder" => portal_href(&f.device_id, &f.snapshot, "tree", &f.path),
                    _ => String::new(),
                },
                folder_href: portal_href(&f.device_id, &f.snapshot, "tree", &f.folder),
                size: if f.kind == "file" {
                    human_bytes(f.size)
                } else {
                    String::new()
                },
                f,
            })
            .collect(),
    })
}

#[derive(Deserialize)]
pub struct PortalForm {
    enabled: String,
}

async fn view_device_portal_post(
    State(state): State<WebState>,
    a: Auth<Administer>,
    Path(id): Path<String>,
    Form(f): Form<PortalForm>,
) -> Response {
    let enabled = match f.enabled.as_str() {
        "true" | "on" => true,
        "false" | "off" => false,
        other => {
            return OpError::Invalid(format!(
                "{other:?} is not a portal setting: send enabled=true or enabled=false"
            ))
            .into_page();
        }
    };
    match set_enabled(state.catalog(), &a.user, &id, enabled).await {
        Ok(d) => see_other(&format!(
            "/devices/{}?ok={}",
            d.id,
            if enabled { "portal-on" } else { "portal-off" }
        )),
        Err(e) => e.into_page(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_names_survive_any_characters() {
        let v = content_disposition("report \"final\".pdf");
        assert_eq!(
            v.to_str().unwrap(),
            "attachment; filename=\"report _final_.pdf\"; \
             filename*=UTF-8''report%20%22final%22.pdf"
        );
        let v = content_disposition("ünï\r\n.txt");
        assert_eq!(
            v.to_str().unwrap(),
            "attachment; filename=\"_n___.txt\"; filename*=UTF-8''%C3%BCn%C3%AF%0D%0A.txt"
        );
    }
}
