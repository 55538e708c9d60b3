//! The agent API (paths and bodies in `morgana_core::wire`): enrolment, the dedup query,
//! pack upload, snapshot commit and listing, blob fetch. Every error is a JSON
//! `ErrorBody { error }` a person can act on.

pub mod control;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use morgana_core::Id;
use morgana_core::control::{PATH_HEARTBEAT, PATH_JOB_REPORT, PATH_JOBS_NEXT};
use morgana_core::pack::{self, BlobKind, Pack, PackBuilder, PackEntry};
use morgana_core::tree::Tree;
use morgana_core::wire::{
    self, BlobFrame, CommitRefused, CommitRequest, EnrollRequest, EnrollResponse, EnrollToken,
    ErrorBody, PackAccepted, SnapshotInfo,
};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tracing::{error, info, warn};

use crate::catalog::{BlobLocation, Catalog, CatalogError, Device};

mod plugins;
mod policy;
mod reflectors;
use crate::events::{NewEvent, Severity};
use crate::snapshot::{self, Closure, ClosureError};
use crate::store::{PackStore, PackStoreError, with_codec};
use crate::tls::{PeerCertificate, Pki};

/// JSON control messages are small; anything bigger is not one of ours.
const MAX_JSON_BYTES: usize = 256 * 1024;
const MAX_ID_LIST_BYTES: usize = wire::MAX_IDS_PER_REQUEST * Id::LEN;
/// Blob locations looked up per catalog query while streaming a fetch.
const FETCH_BATCH: usize = 512;
/// Frames are sent to the network in runs of about this many bytes: a send per blob cost
/// a thread wake-up per blob.
const FETCH_SEND_BYTES: usize = 1024 * 1024;
/// Sends buffered between the disk reader and the network per fetch request.
const FETCH_QUEUE: usize = 4;
const MAX_HOSTNAME: usize = 253;
const MAX_REASON: usize = 256;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    catalog: Arc<dyn Catalog>,
    store: Arc<PackStore>,
    pki: Arc<Pki>,
    /// Bounds memory: each pack being processed holds up to two copies of 160 MB.
    pack_permits: Semaphore,
    control: control::Control,
    /// Serves the agent-side plugins; without it agents rank with the built-in.
    hooks: Option<Arc<crate::hooks::Hooks>>,
}

impl AppState {
    pub fn new(catalog: Arc<dyn Catalog>, store: Arc<PackStore>, pki: Arc<Pki>) -> AppState {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        AppState(Arc::new(Inner {
            catalog,
            store,
            pki,
            pack_permits: Semaphore::new(cores.max(2)),
            control: control::Control::default(),
            hooks: None,
        }))
    }

    /// Serves the active agent-side plugin and records its failures (`serve`).
    pub fn with_hooks(mut self, hooks: Arc<crate::hooks::Hooks>) -> AppState {
        Arc::get_mut(&mut self.0)
            .expect("configured before the state is shared")
            .hooks = Some(hooks);
        self
    }

    /// Tells agents to send a heartbeat this often (`serve --heartbeat-every`).
    pub fn heartbeat_every(mut self, every: std::time::Duration) -> AppState {
        let secs = u32::try_from(every.as_secs()).unwrap_or(u32::MAX);
        Arc::get_mut(&mut self.0)
            .expect("configured before the state is shared")
            .control = control::Control::with_heartbeat_secs(secs);
        self
    }
}

pub fn router(state: AppState) -> Router {
    let agent = Router::new()
        .route(wire::PATH_ENROLL, post(enroll))
        .route(wire::PATH_MISSING, post(missing))
        .route(wire::PATH_PACKS, post(upload_pack))
        .route(
            wire::PATH_SNAPSHOTS,
            post(commit_snapshot).get(list_snapshots),
        )
        .route(wire::PATH_BLOBS, post(fetch_blobs))
        .route(
            morgana_core::control::PATH_POLICY,
            get(policy::device_policy),
        )
        .route(PATH_HEARTBEAT, post(control::heartbeat))
        .route(PATH_JOBS_NEXT, post(control::next_job))
        .route(PATH_JOB_REPORT, post(control::report_job))
        .route(
            morgana_core::control::PATH_REFLECTOR_SELECTOR,
            get(plugins::reflector_selector),
        )
        .route(
            morgana_core::control::PATH_PLUGIN_FAILURES,
            post(plugins::plugin_failed),
        )
        .route(
            morgana_core::control::PATH_REFLECTOR_CERT,
            post(reflectors::certificate),
        )
        .route(
            morgana_core::control::PATH_REFLECTOR_BEAT,
            post(reflectors::beat),
        )
        .route(
            morgana_core::control::PATH_REFLECTORS,
            get(reflectors::list),
        )
        .layer(middleware::from_fn(require_protocol));
    Router::new()
        .route(wire::PATH_HEALTH, get(|| async { "ok" }))
        .merge(agent)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such API path") })
        .with_state(state)
}

/// An error answer: status plus a JSON body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorPayload,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum ErrorPayload {
    Plain(ErrorBody),
    Refused(CommitRefused),
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorPayload::Plain(ErrorBody {
                error: error.into(),
            }),
        }
    }

    /// A failure on our side: logged in full, reported without internals to guess at.
    fn internal(doing: &str, e: impl std::fmt::Display) -> ApiError {
        error!(error = %e, "{doing} failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "the appliance failed while {doing}: {e}; retry later, and tell its administrator if it persists"
            ),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> ApiError {
        ApiError::internal("using its catalog", e)
    }
}

async fn require_protocol(req: Request, next: Next) -> Response {
    let version = req
        .headers()
        .get(wire::PROTOCOL_HEADER)
        .map(HeaderValue::as_bytes);
    let expected = wire::PROTOCOL_VERSION.to_string();
    if version == Some(expected.as_bytes()) {
        return next.run(req).await;
    }
    let got = match version {
        None => "none".to_string(),
        Some(v) => String::from_utf8_lossy(v).chars().take(20).collect(),
    };
    ApiError::new(
        StatusCode::UPGRADE_REQUIRED,
        format!(
            "this appliance speaks agent protocol version {expected} only (header {}), the request \
             said {got}: install the `morgana-agent` that matches this appliance",
            wire::PROTOCOL_HEADER
        ),
    )
    .into_response()
}

/// The enrolled device making a request, known by its client certificate.
pub struct AuthDevice(pub Device);

impl FromRequestParts<AppState> for AuthDevice {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(der) = parts
            .extensions
            .get::<PeerCertificate>()
            .and_then(|p| p.0.clone())
        else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this call needs the device certificate issued at enrolment; enrol with `morgana-agent enroll`",
            ));
        };
        match state.0.catalog.device_by_fingerprint(Id::of(&der)).await? {
            None => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "this device certificate is not registered on this appliance (was the device removed, \
                 or the catalog restored from an older backup?); enrol again with `morgana-agent enroll`",
            )),
            Some(d) if d.revoked => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "device {} ({}) has been revoked on this appliance; ask its administrator, then enrol \
                     again with `morgana-agent enroll`",
                    d.id, d.hostname
                ),
            )),
            Some(d) => Ok(AuthDevice(d)),
        }
    }
}

fn too_large(what: &str, limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the {what} is larger than the {limit}-byte limit; send it in smaller parts"),
    )
}

/// Refuses a body whose declared length is over `limit` before reading any of it.
/// The declared body length, refused above `limit`.
fn check_declared_length(
    req: &Request,
    limit: usize,
    what: &str,
) -> Result<Option<usize>, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => Err(too_large(what, limit)),
        n => Ok(n.map(|n| n as usize)),
    }
}

/// Reads a request body of at most `limit` bytes.
async fn read_body(req: Request, limit: usize, what: &str) -> Result<Vec<u8>, ApiError> {
    let declared = check_declared_length(&req, limit, what)?;
    let too_large = || too_large(what, limit);
    // Growing a 16 MiB pack by doubling copied it several times over.
    let mut out = Vec::with_capacity(declared.unwrap_or(0));
    let mut stream = req.into_body().into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("reading the {what} from the request failed: {e}"),
            )
        })?;
        if out.len() + chunk.len() > limit {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn read_json<T: serde::de::DeserializeOwned>(
    body: Request,
    what: &str,
) -> Result<T, ApiError> {
    let bytes = read_body(body, MAX_JSON_BYTES, what).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the request body is not a valid {what}: {e}"),
        )
    })
}

/// An id list body: concatenated 32-byte ids, at most `MAX_IDS_PER_REQUEST`, deduplicated
/// keeping first occurrences.
async fn read_ids(body: Request) -> Result<Vec<Id>, ApiError> {
    let bytes = read_body(body, MAX_ID_LIST_BYTES, "id list").await?;
    let ids = Id::parse_list(&bytes).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the id list is {} bytes, not a multiple of {}: send concatenated 32-byte ids",
                bytes.len(),
                Id::LEN
            ),
        )
    })?;
    let mut seen = HashSet::with_capacity(ids.len());
    Ok(ids.into_iter().filter(|id| seen.insert(*id)).collect())
}

fn octets(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
}

async fn enroll(
    State(state): State<AppState>,
    body: Request,
) -> Result<axum::Json<EnrollResponse>, ApiError> {
    let req: EnrollRequest = read_json(body, "enrolment request").await?;
    let forbidden = |msg: String| ApiError::new(StatusCode::FORBIDDEN, msg);
    let token: EnrollToken = req
        .token
        .parse()
        .map_err(|e: wire::ParseTokenError| forbidden(e.to_string()))?;
    if token.ca_pin != EnrollToken::pin_of(&state.0.pki.ca_cert_der) {
        return Err(forbidden(
            "this enrolment token was made by another appliance (its CA pin does not match this one); \
             create a token here with `morgana enroll-token`"
                .into(),
        ));
    }
    let hostname = req.hostname.trim();
    let hostname_ok = !hostname.is_empty()
        && hostname.len() <= MAX_HOSTNAME
        && !hostname.chars().any(char::is_control);
    if !hostname_ok {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("hostname must be 1 to {MAX_HOSTNAME} printable characters"),
        ));
    }
    let device_id = crate::random::hex(8);
    let (cert_pem, cert_der) = state
        .0
        .pki
        .issue_device_cert(&req.csr_pem, &device_id)
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{e}; send a PEM CSR made from the device's own key"),
            )
        })?;
    let device = Device {
        id: device_id.clone(),
        hostname: hostname.to_string(),
        cert_fingerprint: Id::of(&cert_der),
        created: crate::clock::rfc3339_ms(crate::clock::now_ms()),
        revoked: false,
    };
    match state
        .0
        .catalog
        .enroll_device(token.secret_hash(), crate::clock::now_ms(), &device)
        .await
    {
        Ok(()) => {}
        Err(
            e @ (CatalogError::TokenUnknown
            | CatalogError::TokenExpired
            | CatalogError::TokenUsedUp),
        ) => {
            return Err(forbidden(e.to_string()));
        }
        Err(e) => return Err(e.into()),
    }
    info!(device = %device_id, hostname = %device.hostname, "device enrolled");
    crate::events::record(
        state.0.catalog.as_ref(),
        NewEvent::system(
            "device.enrolled",
            Severity::Info,
            format!("device {} enrolled", device.hostname),
        )
        .for_device(&device_id)
        .by(format!("device:{device_id}")),
    )
    .await;
    Ok(axum::Json(EnrollResponse {
        device_id,
        client_cert_pem: cert_pem,
        ca_cert_pem: state.0.pki.ca_cert_pem.clone(),
    }))
}

async fn missing(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    body: Request,
) -> Result<Response, ApiError> {
    let ids = read_ids(body).await?;
    let absent = state
        .0
        .catalog
        .missing_objects_held(&device.id, &ids, crate::clock::now_ms())
        .await?;
    Ok(octets(Id::concat(&absent)))
}

fn refuse_pack(reason: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        format!("the pack is refused and nothing from it was stored: {reason}"),
    )
}

/// Checks a whole uploaded pack: framing and checksum, every blob against its id, every
/// tree's encoding. One bad blob refuses the pack: a device must not place wrong bytes
/// under an id other devices will deduplicate against.
fn validate_pack(bytes: &[u8]) -> Result<(Id, Vec<PackEntry>), ApiError> {
    let (pack_id, entries) = pack::parse(bytes).map_err(refuse_pack)?;
    with_codec(|codec| {
        for e in &entries {
            let raw = codec
                .open(e.id, e.compression, pack::stored(bytes, e), e.raw_len)
                .map_err(refuse_pack)?;
            if e.kind == BlobKind::Tree {
                Tree::decode(&raw).map_err(|err| refuse_pack(format!("tree {}: {err}", e.id)))?;
            }
        }
        Ok((pack_id, entries))
    })
}

async fn upload_pack(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    body: Request,
) -> Result<axum::Json<PackAccepted>, ApiError> {
    check_declared_length(&body, pack::MAX_PACK_BYTES, "pack")?;
    // Taken before reading the body: the permit is what bounds the memory packs occupy.
    let _permit = state
        .0
        .pack_permits
        .acquire()
        .await
        .map_err(|e| ApiError::internal("waiting to process a pack", e))?;
    let bytes = read_body(body, pack::MAX_PACK_BYTES, "pack").await?;
    let bytes = Arc::new(bytes);
    let (uploaded_id, entries) = {
        let bytes = bytes.clone();
        tokio::task::spawn_blocking(move || validate_pack(&bytes))
            .await
            .map_err(|e| ApiError::internal("checking a pack", e))??
    };
    let ids: Vec<Id> = entries.iter().map(|e| e.id).collect();
    // Held as it is deduplicated against what is stored: a blob found present here must
    // not be collected before the snapshot that uses it is committed.
    let new: HashSet<Id> = state
        .0
        .catalog
        .hold_and_find_missing(&device.id, &ids, crate::clock::now_ms())
        .await?
        .into_iter()
        .collect();
    if new.is_empty() {
        return Ok(axum::Json(PackAccepted {
            pack: None,
            new_blobs: 0,
            duplicate_blobs: entries.len() as u64,
        }));
    }
    let store = state.0.store.clone();
    let (record, stored_entries) =
        tokio::task::spawn_blocking(move || -> Result<_, PackStoreError> {
            // The usual first-sync case: every blob is new and appears once, so the upload
            // is stored as it came, without copying and re-hashing it.
            let packed = if new.len() == entries.len() {
                Pack {
                    id: uploaded_id,
                    bytes: Arc::unwrap_or_clone(bytes),
                    entries,
                }
            } else {
                let mut builder = PackBuilder::default();
                let mut added = HashSet::with_capacity(new.len());
                for e in entries
                    .iter()
                    .filter(|e| new.contains(&e.id) && added.insert(e.id))
                {
                    builder.add_stored(
                        e.id,
                        e.kind,
                        e.compression,
                        pack::stored(&bytes, e),
                        e.raw_len,
                    );
                }
                builder.finish()
            };
            store.store(packed)
        })
        .await
        .map_err(|e| ApiError::internal("storing a pack", e))?
        .map_err(|e| match e {
            PackStoreError::Full { .. } => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
            }
            e => ApiError::internal("storing a pack", e),
        })?;
    state
        .0
        .catalog
        .insert_pack(&record, &stored_entries)
        .await?;
    let new_blobs = stored_entries.len() as u64;
    info!(device = %device.id, pack = %record.id, new_blobs, size = record.size, "pack stored");
    Ok(axum::Json(PackAccepted {
        pack: Some(record.id),
        new_blobs,
        duplicate_blobs: ids.len() as u64 - new_blobs,
    }))
}

async fn commit_snapshot(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    body: Request,
) -> Result<axum::Json<SnapshotInfo>, ApiError> {
    let req: CommitRequest = read_json(body, "snapshot commit request").await?;
    if req.reason.len() > MAX_REASON || req.reason.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("reason must be at most {MAX_REASON} bytes of printable text"),
        ));
    }
    match snapshot::verify_closure(&state.0.catalog, req.root).await {
        Ok(Closure::Complete) => {}
        Ok(Closure::Missing(missing)) => {
            return Err(ApiError {
                status: StatusCode::CONFLICT,
                body: ErrorPayload::Refused(CommitRefused {
                    error: format!(
                        "snapshot of tree {} refused: it references objects this appliance does not \
                         hold ({} listed{}); upload them, then commit again",
                        req.root,
                        missing.len(),
                        if missing.len() >= snapshot::MAX_REPORTED_MISSING {
                            ", there may be more"
                        } else {
                            ""
                        }
                    ),
                    missing,
                }),
            });
        }
        Err(e @ ClosureError::BadTree { .. }) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("snapshot refused: {e}"),
            ));
        }
        Err(e) => return Err(ApiError::internal("verifying a snapshot", e)),
    }
    let now = crate::clock::now_ms();
    let info = SnapshotInfo {
        // Time first, so ids sort in commit order across devices and appliances.
        id: format!("{:012x}{}", now, crate::random::hex(4)),
        device_id: device.id.clone(),
        root: req.root,
        created: crate::clock::rfc3339_ms(now),
        pinned: morgana_core::wire::PINNED_REASONS
            .contains(&req.reason.as_str())
            .then(|| req.reason.clone()),
        reason: req.reason,
        stats: req.stats,
    };
    state.0.catalog.insert_snapshot(&info).await?;
    info!(device = %device.id, snapshot = %info.id, root = %info.root, "snapshot committed");
    Ok(axum::Json(info))
}

async fn list_snapshots(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
) -> Result<axum::Json<Vec<SnapshotInfo>>, ApiError> {
    Ok(axum::Json(
        state.0.catalog.device_snapshots(&device.id).await?,
    ))
}

/// Streams stored blobs as frames in request order. Blobs are sent as stored, neither
/// decompressed nor verified: the agent verifies each one, which is also how damage is
/// noticed at restore time.
async fn fetch_blobs(
    State(state): State<AppState>,
    _device: AuthDevice,
    body: Request,
) -> Result<Response, ApiError> {
    let ids = read_ids(body).await?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(FETCH_QUEUE);
    let catalog = state.0.catalog.clone();
    tokio::spawn(async move {
        for batch in ids.chunks(FETCH_BATCH) {
            let locations = match catalog.locate_blobs(batch).await {
                Ok(l) => l,
                Err(e) => {
                    error!(error = %e, "locating blobs for a fetch failed; ending the stream early");
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            };
            let tx = tx.clone();
            let batch = batch.to_vec();
            let sent =
                tokio::task::spawn_blocking(move || send_frames(&batch, locations, &tx)).await;
            if !matches!(sent, Ok(true)) {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Reads one batch's frames and queues them in sends of about `FETCH_SEND_BYTES`; false
/// once the client has gone.
fn send_frames(
    ids: &[Id],
    locations: Vec<Option<BlobLocation>>,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> bool {
    // One open file per pack in the batch: consecutive blobs usually share packs.
    let mut files: HashMap<Id, Option<(std::fs::File, std::path::PathBuf)>> = HashMap::new();
    let mut out = Vec::with_capacity(FETCH_SEND_BYTES);
    for (id, loc) in ids.iter().zip(locations) {
        let Some(loc) = loc else {
            out.extend_from_slice(&BlobFrame::missing(*id).header());
            continue;
        };
        let file = files.entry(loc.pack).or_insert_with(|| {
            let path = PackStore::pack_path(&loc.volume, loc.pack);
            match std::fs::File::open(&path) {
                Ok(f) => Some((f, path)),
                Err(e) => {
                    warn!(
                        pack = %path.display(),
                        error = %e,
                        "pack file unreadable; its blobs are sent as missing"
                    );
                    None
                }
            }
        });
        let header = BlobFrame {
            id: *id,
            kind: Some(loc.entry.kind),
            compression: loc.entry.compression,
            raw_len: loc.entry.raw_len,
            stored_len: loc.entry.stored_len,
        }
        .header();
        let frame_start = out.len();
        out.extend_from_slice(&header);
        let read = match file {
            Some((f, path)) => crate::store::read_range_into(
                f,
                path,
                loc.entry.offset,
                loc.entry.stored_len,
                &mut out,
            )
            .map_err(|e| warn!(blob = %id, error = %e, "blob unreadable; sent as missing")),
            None => Err(()),
        };
        if read.is_err() {
            out.truncate(frame_start);
            out.extend_from_slice(&BlobFrame::missing(*id).header());
        }
        if out.len() >= FETCH_SEND_BYTES && !send(tx, &mut out) {
            return false;
        }
    }
    out.is_empty() || send(tx, &mut out)
}

/// Queues what `out` holds and empties it; false once the client has gone.
fn send(tx: &mpsc::Sender<Result<Bytes, std::io::Error>>, out: &mut Vec<u8>) -> bool {
    let full = std::mem::replace(out, Vec::with_capacity(out.capacity()));
    tx.blocking_send(Ok(Bytes::from(full))).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use morgana_core::pack::{Codec, Compression};
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    fn pack_of(blobs: &[(BlobKind, &[u8])]) -> Vec<u8> {
        let mut codec = Codec::new(3);
        let mut b = PackBuilder::default();
        let mut out = Vec::new();
        for (kind, raw) in blobs {
            let c = codec.compress_into(raw, &mut out);
            b.add_stored(Id::of(raw), *kind, c, &out, raw.len() as u32);
        }
        b.finish().bytes
    }

    #[test]
    fn a_forged_pack_is_refused() {
        // Wrong bytes under a popular id, with a valid pack checksum.
        let mut b = PackBuilder::default();
        b.add_stored(
            Id::of(b"popular"),
            BlobKind::Chunk,
            Compression::None,
            b"evil!!!",
            7,
        );
        let forged = b.finish().bytes;
        let err = validate_pack(&forged).unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            format!("{err:?}").contains(&Id::of(b"popular").to_hex()),
            "{err:?}"
        );

        // A hostile tree is refused with the tree error's text.
        let mut bad_tree = Tree::default().encode();
        bad_tree[5] = 1; // one entry, but none follows
        let err = validate_pack(&pack_of(&[(BlobKind::Tree, &bad_tree)])).unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);

        // A flipped byte breaks the checksum.
        let mut good = pack_of(&[(BlobKind::Chunk, b"hello world")]);
        assert_eq!(validate_pack(&good).unwrap().1.len(), 1);
        good[10] ^= 1;
        assert_eq!(
            validate_pack(&good).unwrap_err().status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }

    use crate::catalog::SqliteCatalog;
    use crate::config::DataDir;
    use morgana_core::id::FileIdHasher;
    use morgana_core::tree::{Content, Entry, Kind};
    use tower::ServiceExt;

    struct Harness {
        _dir: tempfile::TempDir,
        data: DataDir,
        app: Router,
        catalog: Arc<dyn Catalog>,
        state: AppState,
    }

    async fn harness() -> Harness {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let pki = Arc::new(Pki::ensure(&data).unwrap());
        let catalog: Arc<dyn Catalog> =
            Arc::new(SqliteCatalog::open(&data.catalog(), true).await.unwrap());
        let store = Arc::new(PackStore::open(&[data.default_volume()]).unwrap());
        let state = AppState::new(catalog.clone(), store, pki);
        let app = router(state.clone());
        Harness {
            _dir: dir,
            data,
            app,
            catalog,
            state,
        }
    }

    impl Harness {
        async fn call(
            &self,
            method: &str,
            path: &str,
            cert: Option<&[u8]>,
            body: Vec<u8>,
        ) -> (StatusCode, Vec<u8>) {
            let mut req = axum::http::Request::builder()
                .method(method)
                .uri(path)
                .header(wire::PROTOCOL_HEADER, "1")
                .body(Body::from(body))
                .unwrap();
            req.extensions_mut()
                .insert(PeerCertificate(cert.map(Arc::from)));
            let resp = self.app.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            (status, bytes.to_vec())
        }
    }

    fn file_entry(name: &str, content: Content, size: u64) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            kind: Some(Kind::File),
            mode: 0o644,
            size,
            content,
            ..Default::default()
        }
    }

    fn frames(mut body: &[u8]) -> Vec<(BlobFrame, Vec<u8>)> {
        let mut out = Vec::new();
        while !body.is_empty() {
            let header: &[u8; BlobFrame::HEADER_LEN] =
                body[..BlobFrame::HEADER_LEN].try_into().unwrap();
            let frame = BlobFrame::parse_header(header).unwrap();
            let end = BlobFrame::HEADER_LEN + frame.stored_len as usize;
            out.push((frame, body[BlobFrame::HEADER_LEN..end].to_vec()));
            body = &body[end..];
        }
        out
    }

    #[tokio::test]
    async fn enrol_upload_commit_list_fetch_and_check() {
        let h = harness().await;

        // Enrolment.
        let token = EnrollToken {
            secret: crate::random::hex(16),
            ca_pin: EnrollToken::pin_of(&crate::tls::load_ca_cert(&h.data).unwrap()),
        };
        h.catalog
            .create_token(token.secret_hash(), 1, i64::MAX)
            .await
            .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let req = EnrollRequest {
            token: token.to_string(),
            hostname: "pc-1".into(),
            csr_pem: csr,
        };
        let body = serde_json::to_vec(&req).unwrap();
        let (status, resp) = h.call("POST", wire::PATH_ENROLL, None, body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
        let enrolled: EnrollResponse = serde_json::from_slice(&resp).unwrap();
        assert_eq!(enrolled.device_id.len(), 16);
        let (status, _) = h.call("POST", wire::PATH_ENROLL, None, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "a one-use token works once");
        let cert = CertificateDer::from_pem_slice(enrolled.client_cert_pem.as_bytes()).unwrap();
        let cert = Some(cert.as_ref());

        // Authentication.
        let (status, _) = h.call("GET", wire::PATH_SNAPSHOTS, None, vec![]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = h
            .call("GET", wire::PATH_SNAPSHOTS, Some(b"stranger"), vec![])
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);

        // A snapshot: root { a: 2-chunk file, sub/ { b: inline } }.
        let (c1, c2) = (vec![1u8; 3000], b"second chunk".to_vec());
        let chunk_ids = vec![Id::of(&c1), Id::of(&c2)];
        let file = FileIdHasher::of(&chunk_ids);
        let sub = Tree {
            entries: vec![file_entry("b", Content::Inline(b"hi".to_vec()), 2)],
        };
        let (sub_id, sub_bytes) = sub.seal();
        let root = Tree {
            entries: vec![
                file_entry(
                    "a",
                    Content::Chunks {
                        file,
                        chunks: chunk_ids.clone(),
                    },
                    3012,
                ),
                Entry {
                    name: b"sub".to_vec(),
                    kind: Some(Kind::Dir),
                    mode: 0o755,
                    content: Content::Tree(sub_id),
                    ..Default::default()
                },
            ],
        };
        let (root_id, root_bytes) = root.seal();
        let all = [chunk_ids[0], chunk_ids[1], sub_id, root_id, file];

        let (status, resp) = h
            .call("POST", wire::PATH_MISSING, cert, Id::concat(&all))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(Id::parse_list(&resp).unwrap(), all);

        let commit = serde_json::to_vec(&CommitRequest {
            root: root_id,
            stats: Default::default(),
            reason: "manual".into(),
        })
        .unwrap();
        let (status, resp) = h
            .call("POST", wire::PATH_SNAPSHOTS, cert, commit.clone())
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        let refused: CommitRefused = serde_json::from_slice(&resp).unwrap();
        assert_eq!(refused.missing, vec![root_id]);

        // Upload the trees first: the commit must then name exactly the absent chunks.
        let trees = pack_of(&[(BlobKind::Tree, &sub_bytes), (BlobKind::Tree, &root_bytes)]);
        let (status, resp) = h.call("POST", wire::PATH_PACKS, cert, trees.clone()).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
        // All new and each once: stored exactly as uploaded.
        let accepted: PackAccepted = serde_json::from_slice(&resp).unwrap();
        assert_eq!(accepted.pack, Some(pack::parse(&trees).unwrap().0));
        let (status, resp) = h
            .call("POST", wire::PATH_SNAPSHOTS, cert, commit.clone())
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        let refused: CommitRefused = serde_json::from_slice(&resp).unwrap();
        assert_eq!(refused.missing, chunk_ids);

        // A pack mixing a known tree and the chunks: only the new blobs are stored.
        let mixed = pack_of(&[
            (BlobKind::Chunk, &c1),
            (BlobKind::Tree, &sub_bytes),
            (BlobKind::Chunk, &c2),
        ]);
        let (status, resp) = h.call("POST", wire::PATH_PACKS, cert, mixed.clone()).await;
        assert_eq!(status, StatusCode::OK);
        let accepted: PackAccepted = serde_json::from_slice(&resp).unwrap();
        assert_eq!((accepted.new_blobs, accepted.duplicate_blobs), (2, 1));
        // Re-packed without the known tree.
        let stored = accepted.pack.unwrap();
        assert_ne!(stored, pack::parse(&mixed).unwrap().0);
        let stored_bytes =
            std::fs::read(PackStore::pack_path(&h.data.default_volume(), stored)).unwrap();
        assert_eq!(pack::parse(&stored_bytes).unwrap().1.len(), 2);
        let (_, resp) = h.call("POST", wire::PATH_PACKS, cert, mixed).await;
        let again: PackAccepted = serde_json::from_slice(&resp).unwrap();
        assert_eq!(
            (again.pack, again.new_blobs, again.duplicate_blobs),
            (None, 0, 3)
        );

        // Chunks are present now; the whole file is not known yet, and a stored tree counts
        // as present only once a commit has verified everything below it.
        let (_, resp) = h
            .call("POST", wire::PATH_MISSING, cert, Id::concat(&all))
            .await;
        let absent = Id::parse_list(&resp).unwrap();
        assert!(absent.contains(&file), "{absent:?}");
        assert!(absent.iter().all(|id| [sub_id, root_id, file].contains(id)));

        let (status, resp) = h.call("POST", wire::PATH_SNAPSHOTS, cert, commit).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&resp));
        let info: SnapshotInfo = serde_json::from_slice(&resp).unwrap();
        assert_eq!((info.root, &info.device_id), (root_id, &enrolled.device_id));
        // The whole file is now known by its one id.
        let (_, resp) = h
            .call("POST", wire::PATH_MISSING, cert, Id::concat(&all))
            .await;
        assert!(resp.is_empty());

        let (_, resp) = h.call("GET", wire::PATH_SNAPSHOTS, cert, vec![]).await;
        let listed: Vec<SnapshotInfo> = serde_json::from_slice(&resp).unwrap();
        assert_eq!(listed, vec![info]);

        // Fetch: request order, unknown ids as missing frames, bytes as stored.
        let unknown = Id::of(b"nowhere");
        let (status, resp) = h
            .call(
                "POST",
                wire::PATH_BLOBS,
                cert,
                Id::concat(&[chunk_ids[1], unknown, root_id]),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let got = frames(&resp);
        assert_eq!(got.len(), 3);
        assert_eq!((got[1].0.id, got[1].0.kind), (unknown, None));
        let mut codec = Codec::new(1);
        for ((frame, stored), raw) in [&got[0], &got[2]].into_iter().zip([&c2, &root_bytes]) {
            let opened = codec
                .open(frame.id, frame.compression, stored, frame.raw_len)
                .unwrap();
            assert_eq!(&opened, raw);
        }

        // Bad input changes nothing.
        let mut forged = PackBuilder::default();
        forged.add_stored(
            Id::of(b"popular"),
            BlobKind::Chunk,
            Compression::None,
            b"evil",
            4,
        );
        let (status, _) = h
            .call("POST", wire::PATH_PACKS, cert, forged.finish().bytes)
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        let (_, resp) = h
            .call(
                "POST",
                wire::PATH_MISSING,
                cert,
                Id::of(b"popular").0.to_vec(),
            )
            .await;
        assert_eq!(resp.len(), 32);

        // check: clean, then a flipped byte inside a chunk is found.
        assert_eq!(crate::commands::check::check(&h.data).await.unwrap(), 0);
        let loc = h.catalog.locate_blobs(&[chunk_ids[0]]).await.unwrap()[0]
            .clone()
            .unwrap();
        let path = PackStore::pack_path(&loc.volume, loc.pack);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[loc.entry.offset as usize + 2] ^= 0x20;
        std::fs::write(&path, bytes).unwrap();
        // Pack checksum, the damaged chunk, and the snapshot that needs it.
        assert_eq!(crate::commands::check::check(&h.data).await.unwrap(), 3);
    }

    #[tokio::test]
    async fn heartbeats_and_jobs_over_the_control_plane() {
        use morgana_core::control::{
            Heartbeat, HeartbeatReply, Inventory, Job, JobKind, JobProgress, JobReport, JobState,
            NextJob, PATH_HEARTBEAT, PATH_JOB_REPORT, PATH_JOBS_NEXT,
        };
        let h = harness().await;
        let token = Id::of(b"token");
        h.catalog.create_token(token, 1, i64::MAX).await.unwrap();
        let device = Device {
            id: "d1".into(),
            hostname: "pc-1".into(),
            cert_fingerprint: Id::of(b"device cert"),
            created: crate::clock::rfc3339_ms(0),
            revoked: false,
        };
        h.catalog.enroll_device(token, 1, &device).await.unwrap();
        let cert = Some(&b"device cert"[..]);
        fn json(v: &impl Serialize) -> Vec<u8> {
            serde_json::to_vec(v).unwrap()
        }

        // A heartbeat with inventory: recorded once, acknowledged by digest.
        let inventory = Inventory {
            hostname: "pc-1".into(),
            cpu_count: 8,
            ..Default::default()
        };
        let beat = Heartbeat {
            agent_version: "0.1.0".into(),
            inventory: Some(inventory.clone()),
            ..Default::default()
        };
        let (status, body) = h.call("POST", PATH_HEARTBEAT, cert, json(&beat)).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let reply: HeartbeatReply = serde_json::from_slice(&body).unwrap();
        assert_eq!(reply.heartbeat_secs, control::DEFAULT_HEARTBEAT_SECS);
        assert_eq!(reply.inventory_digest, Some(inventory.digest()));
        let (status, _) = h.call("POST", PATH_HEARTBEAT, cert, json(&beat)).await;
        assert_eq!(status, StatusCode::OK);
        let filter = crate::events::EventFilter {
            kind_prefix: Some("device.inventory".into()),
            ..Default::default()
        };
        let changed = h.catalog.events_page(&filter, None, 10).await.unwrap();
        assert_eq!(changed.len(), 1, "recorded once: {changed:?}");
        let (status, _) = h.call("POST", PATH_HEARTBEAT, None, json(&beat)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);

        // No job: 204 once the wait is over.
        let poll = |secs| json(&NextJob { wait_secs: secs });
        let (status, _) = h.call("POST", PATH_JOBS_NEXT, cert, poll(0)).await;
        assert_eq!(status, StatusCode::NO_CONTENT);

        // A waiting poll gets a job queued meanwhile (woken, well before its 50 s).
        let app = h.app.clone();
        let waiting = tokio::spawn(async move {
            let mut req = axum::http::Request::builder()
                .method("POST")
                .uri(PATH_JOBS_NEXT)
                .header(wire::PROTOCOL_HEADER, "1")
                .body(Body::from(
                    serde_json::to_vec(&NextJob { wait_secs: 50 }).unwrap(),
                ))
                .unwrap();
            req.extensions_mut()
                .insert(PeerCertificate(Some(Arc::from(&b"device cert"[..]))));
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            (status, body)
        });
        while !h.state.0.control.has_waiters() {
            tokio::task::yield_now().await;
        }
        let job = crate::jobs::queue(h.catalog.as_ref(), "d1", JobKind::Sync, "cli")
            .await
            .unwrap();
        h.state.0.control.wake("d1");
        let (status, body) = waiting.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let got: Job = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (got.id.as_str(), got.kind),
            (job.id.as_str(), JobKind::Sync)
        );
        // Handed out once.
        let (status, _) = h.call("POST", PATH_JOBS_NEXT, cert, poll(0)).await;
        assert_eq!(status, StatusCode::NO_CONTENT);

        // Reports: progress, then the outcome, then nothing more.
        let report = |state, message: &str| {
            json(&JobReport {
                job_id: job.id.clone(),
                state,
                progress: JobProgress {
                    files_done: 1,
                    ..Default::default()
                },
                message: message.into(),
                files: None,
            })
        };
        let (status, _) = h
            .call("POST", PATH_JOB_REPORT, cert, report(JobState::Queued, ""))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) = h
            .call("POST", PATH_JOB_REPORT, cert, report(JobState::Running, ""))
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _) = h
            .call(
                "POST",
                PATH_JOB_REPORT,
                cert,
                report(JobState::Failed, "disk full"),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _) = h
            .call(
                "POST",
                PATH_JOB_REPORT,
                cert,
                report(JobState::Succeeded, ""),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        let stored = h.catalog.job(&job.id).await.unwrap().unwrap();
        assert_eq!(
            (stored.state, stored.message.as_str()),
            (JobState::Failed, "disk full")
        );
        let filter = crate::events::EventFilter {
            kind_prefix: Some("job.failed".into()),
            ..Default::default()
        };
        let failed = h.catalog.events_page(&filter, None, 10).await.unwrap();
        assert_eq!(failed.len(), 1);
        assert!(failed[0].event.message.contains("disk full"), "{failed:?}");
        assert_eq!(failed[0].event.severity, crate::events::Severity::Error);
    }
}
