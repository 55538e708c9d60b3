//! The branch reflector role: while the appliance says this device has it (every heartbeat
//! reply names the role), `morgana-agent run` serves blobs to neighbouring devices over
//! HTTPS with mutual TLS, the same `POST /v1/blobs` framing the appliance answers.
//!
//! - Trust: the listener's certificate is issued by the appliance CA on request (a key of
//!   its own, a CSR), and a client must present a certificate from that same CA: only
//!   devices enrolled on this appliance fetch. Names are not checked on either side.
//! - Read-through: hits come from a bounded LRU cache in the state directory, misses from
//!   the appliance; every blob from the appliance is verified against its BLAKE3 id before
//!   it is cached or served. What the appliance lacks goes out as missing, and the
//!   neighbour asks the appliance itself.
//! - The reflector heartbeats its address, port, site and load to the appliance, which
//!   lists it for neighbours; with mDNS on it also advertises itself on the local network.

pub mod cache;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use morgana_core::Id;
use morgana_core::control::{ReflectorBeat, ReflectorRole};
use morgana_core::pack::{Codec, DEFAULT_ZSTD_LEVEL};
use morgana_core::wire::{self, BlobFrame};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use self::cache::BlobCache;
use crate::client::Client;
use crate::state::{CA_CERT_FILE, State};

/// The role as last heard, kept so one-shot commands know the device's site.
pub const ROLE_FILE: &str = "reflector-role.json";
const CACHE_DIR: &str = "reflector-cache";
/// Requests served at once before neighbours are turned away to the appliance (503):
/// a branch PC is not a server.
pub const MAX_IN_FLIGHT: u32 = 32;
/// Blobs looked up and fetched from the appliance per step of one answer.
const BATCH: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait before trying again to start a role that failed to start (port taken, no cert).
const RETRY_START: Duration = Duration::from_secs(10);
const DEFAULT_BEAT: Duration = Duration::from_secs(60);

/// How this device serves when it has the role (`run` flags).
#[derive(Clone, Debug)]
pub struct Settings {
    pub cache_limit: u64,
    /// The address neighbours reach this device at; default: the one it reaches the
    /// appliance from.
    pub advertise: Option<IpAddr>,
    /// Advertise over mDNS (multicast on every interface: off unless configured).
    pub mdns: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            cache_limit: cache::DEFAULT_LIMIT,
            advertise: None,
            mdns: false,
        }
    }
}

/// The handle the heartbeat loop tells about the role.
#[derive(Clone)]
pub struct RoleHandle {
    role: watch::Sender<Option<ReflectorRole>>,
    beat_every: Arc<AtomicU64>,
}

impl RoleHandle {
    /// What the latest heartbeat reply said; starts, moves or stops the listener.
    pub fn set(&self, state: &State, role: Option<ReflectorRole>, heartbeat: Duration) {
        self.beat_every
            .store(heartbeat.as_millis() as u64, Ordering::Relaxed);
        let changed = self.role.send_if_modified(|held| {
            let changed = *held != role;
            *held = role.clone();
            changed
        });
        if changed {
            let kept = match &role {
                Some(r) => state.write(
                    ROLE_FILE,
                    &serde_json::to_vec(r).expect("roles serialize"),
                    0o600,
                ),
                None => {
                    let path = state.path(ROLE_FILE);
                    match std::fs::remove_file(&path) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            Err(crate::state::StateError::Io { path, source: e })
                        }
                        _ => Ok(()),
                    }
                }
            };
            if let Err(e) = kept {
                warn!("cannot record the reflector role in the state directory: {e}");
            }
        }
    }
}

/// The role last heard (by the service) for this device.
pub fn held_role(state: &State) -> Option<ReflectorRole> {
    serde_json::from_slice(&std::fs::read(state.path(ROLE_FILE)).ok()?).ok()
}

/// Runs the role for as long as the service runs: the returned future is joined with the
/// service's other loops.
pub fn supervisor(
    state: State,
    control: Arc<Client>,
    settings: Settings,
    stop: watch::Receiver<bool>,
) -> (RoleHandle, impl std::future::Future<Output = ()>) {
    let (tx, rx) = watch::channel(None);
    let handle = RoleHandle {
        role: tx,
        beat_every: Arc::new(AtomicU64::new(DEFAULT_BEAT.as_millis() as u64)),
    };
    let beat_every = handle.beat_every.clone();
    (
        handle,
        supervise(state, control, settings, rx, beat_every, stop),
    )
}

async fn supervise(
    state: State,
    control: Arc<Client>,
    settings: Settings,
    mut role: watch::Receiver<Option<ReflectorRole>>,
    beat_every: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let current = role.borrow_and_update().clone();
        if let Some(r) = current {
            info!(port = r.port, site = ?r.site, "reflector role on: starting the listener");
            let serving = serve_role(&state, &control, &settings, &r, &beat_every);
            let ended = tokio::select! {
                result = serving => result,
                _ = role.changed() => {
                    info!("reflector role changed");
                    continue;
                }
                _ = stop.wait_for(|s| *s) => return,
            };
            if let Err(e) = ended {
                warn!("the branch reflector cannot run: {e:#}; trying again in {RETRY_START:?}");
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = role.changed() => {}
                _ = tokio::time::sleep(RETRY_START) => {}
            }
        } else {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                r = role.changed() => if r.is_err() { return },
            }
        }
    }
}

/// What the listener's requests share.
struct Server {
    cache: BlobCache,
    upstream: Arc<Client>,
    in_flight: AtomicU32,
    served: AtomicU64,
}

/// Serves until an error; dropping the future stops it (role off, service stopping).
async fn serve_role(
    state: &State,
    control: &Arc<Client>,
    settings: &Settings,
    role: &ReflectorRole,
    beat_every: &AtomicU64,
) -> anyhow::Result<()> {
    let device = state.device()?;
    let tls = Arc::new(server_tls(state, control).await?);
    // Both families where the host has IPv6 (Linux binds [::] dual-stack), IPv4 otherwise.
    let listener =
        match TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, role.port))).await {
            Ok(l) => Ok(l),
            Err(_) => TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], role.port))).await,
        }
        .with_context(|| {
            format!(
                "cannot listen on port {} (another program has it?); pick another with \
                 `morgana reflector enable {} --port N`",
                role.port, device.device_id
            )
        })?;
    let cache_dir = state.path(CACHE_DIR);
    let limit = settings.cache_limit;
    let cache = tokio::task::spawn_blocking(move || BlobCache::open(&cache_dir, limit))
        .await
        .context("opening the reflector cache stopped unexpectedly")??;
    let server = Arc::new(Server {
        cache,
        // Its own client: a long blob fetch must not queue behind the service's control calls.
        upstream: Arc::new(Client::for_device(state)?),
        in_flight: AtomicU32::new(0),
        served: AtomicU64::new(0),
    });
    let address = match settings.advertise {
        Some(a) => a,
        None => crate::reflectors::own_address(&device.server).await,
    };
    let subnet = crate::inventory::subnet_of(address).unwrap_or_default();
    info!(%address, port = role.port, %subnet, "branch reflector serving");
    let app = Router::new()
        .route(wire::PATH_BLOBS, axum::routing::post(fetch_blobs))
        .route(wire::PATH_HEALTH, axum::routing::get(|| async { "ok" }))
        .with_state(server.clone());
    let advertiser = if settings.mdns {
        match crate::mdns::Advertiser::start(state, &device.device_id, role, address, &subnet) {
            Ok(a) => Some(a),
            Err(e) => {
                warn!(
                    "cannot advertise the reflector over mDNS: {e:#}; neighbours still find it through the appliance"
                );
                None
            }
        }
    } else {
        None
    };
    let beats = async {
        loop {
            let beat = ReflectorBeat {
                address: address.to_string(),
                port: role.port,
                subnet: subnet.clone(),
                in_flight: server.in_flight.load(Ordering::Relaxed),
                load: (server.in_flight.load(Ordering::Relaxed) as f32 / MAX_IN_FLIGHT as f32)
                    .min(1.0),
                cache_bytes: server.cache.size(),
                cache_limit: server.cache.limit(),
                bytes_served: server.served.load(Ordering::Relaxed),
            };
            if let Err(e) = control.reflector_beat(&beat).await {
                warn!("reflector heartbeat failed: {e}");
            }
            if let Some(a) = &advertiser {
                a.update_load(beat.load);
            }
            let every = Duration::from_millis(beat_every.load(Ordering::Relaxed).max(1000));
            tokio::time::sleep(every).await;
        }
    };
    tokio::select! {
        () = accept_loop(listener, tls, app) => Ok(()),
        _ = beats => Ok(()),
    }
}

/// A fresh key and a certificate for it from the appliance CA; the chain sent is
/// [reflector, CA] like the appliance's own.
async fn server_tls(state: &State, control: &Client) -> anyhow::Result<rustls::ServerConfig> {
    let key = rcgen::KeyPair::generate().context("cannot generate the reflector's key")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .context("reflector CSR")?
        .serialize_request(&key)
        .context("cannot make the reflector's certificate request")?
        .pem()
        .context("reflector CSR")?;
    let cert_pem = control
        .reflector_certificate(csr)
        .await
        .context("the appliance did not issue the reflector's certificate")?;
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .context("the appliance's reflector certificate is not PEM")?;
    let ca = CertificateDer::from_pem_slice(&state.read(CA_CERT_FILE)?)
        .with_context(|| format!("{CA_CERT_FILE} is damaged; enrol again"))?;
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
        .context("the reflector key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .context("the reflector's client verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert, ca], key)
        .context("the reflector's certificate does not match its key")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

async fn accept_loop(listener: TcpListener, tls: Arc<rustls::ServerConfig>, app: Router) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    connections.spawn(connection(tcp, peer, acceptor.clone(), app.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "accepting a neighbour's connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
) {
    let _ = tcp.set_nodelay(true);
    // The verifier refuses clients without a certificate of the appliance CA here.
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "a neighbour's TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        tower::Service::call(&mut app.clone(), req)
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder.http2().timer(TokioTimer::new());
    if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
        debug!(%peer, error = %e, "a neighbour's connection ended with an error");
    }
}

/// Counts a request in flight for as long as its answer streams.
struct InFlight(Arc<Server>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn error(status: StatusCode, message: String) -> Response {
    let body = serde_json::to_vec(&wire::ErrorBody { error: message }).expect("serializes");
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn fetch_blobs(AxState(server): AxState<Arc<Server>>, req: Request) -> Response {
    const LIMIT: usize = wire::MAX_IDS_PER_REQUEST * Id::LEN;
    let body = match axum::body::to_bytes(req.into_body(), LIMIT).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("send at most {} ids per request", wire::MAX_IDS_PER_REQUEST),
            );
        }
    };
    let Some(ids) = Id::parse_list(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the body is not concatenated 32-byte ids".into(),
        );
    };
    // Like the appliance: first occurrences only, in request order.
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    let ids: Vec<Id> = ids.into_iter().filter(|id| seen.insert(*id)).collect();
    if server.in_flight.fetch_add(1, Ordering::Relaxed) >= MAX_IN_FLIGHT {
        server.in_flight.fetch_sub(1, Ordering::Relaxed);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this reflector is busy; fetch from the appliance".into(),
        );
    }
    let guard = InFlight(server.clone());
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let mut codec = Codec::new(DEFAULT_ZSTD_LEVEL);
        for batch in ids.chunks(BATCH) {
            let mut out = answer_batch(&server, &handle, &mut codec, batch);
            let dying = die_now(&mut out);
            server.served.fetch_add(out.served, Ordering::Relaxed);
            if tx.blocking_send(Ok(Bytes::from(out.frames))).is_err() {
                return;
            }
            if dying {
                // Let the frames before the cut reach the neighbour, then go like a killed
                // process: no goodbye on the connection.
                std::thread::sleep(Duration::from_millis(300));
                warn!("{DIE_ENV} reached: exiting in the middle of an answer");
                std::process::exit(137);
            }
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) });
    (
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

struct Answer {
    frames: Vec<u8>,
    /// Where each frame ends in `frames`.
    ends: Vec<usize>,
    /// Bytes of the blobs answered (missing ones not counted).
    served: u64,
}

/// Test hook: the process exits after sending this many blobs (counted from its start),
/// in the middle of an answer, so tests can kill a reflector mid-download exactly.
const DIE_ENV: &str = "MORGANA_AGENT_REFLECTOR_DIE_AFTER_BLOBS";
static SENT_BLOBS: AtomicU64 = AtomicU64::new(0);

/// Whether the test hook's count is reached within `out`; if so `out` is cut there.
fn die_now(out: &mut Answer) -> bool {
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let Some(limit) = *LIMIT.get_or_init(|| std::env::var(DIE_ENV).ok()?.parse().ok()) else {
        return false;
    };
    let n = out.ends.len() as u64;
    let before = SENT_BLOBS.fetch_add(n, Ordering::Relaxed);
    if before + n < limit {
        return false;
    }
    let keep = limit.saturating_sub(before) as usize;
    let cut = if keep == 0 { 0 } else { out.ends[keep - 1] };
    out.frames.truncate(cut);
    out.served = cut as u64;
    true
}

/// Frames for `ids` in order: from the cache, else from the appliance once verified
/// (and then cached), else missing.
fn answer_batch(
    server: &Server,
    handle: &tokio::runtime::Handle,
    codec: &mut Codec,
    ids: &[Id],
) -> Answer {
    let mut found: HashMap<Id, (BlobFrame, Vec<u8>)> = HashMap::with_capacity(ids.len());
    let mut misses = Vec::new();
    for id in ids {
        match server.cache.get(id) {
            Some(hit) => {
                found.insert(*id, hit);
            }
            None => misses.push(*id),
        }
    }
    if !misses.is_empty() {
        let fetched = handle.block_on(async {
            let mut stream = server.upstream.fetch_blobs(&misses).await?;
            while let Some((frame, stored)) = stream.next().await? {
                if frame.kind.is_none() || !misses.contains(&frame.id) {
                    continue;
                }
                if let Err(e) = codec.open(frame.id, frame.compression, &stored, frame.raw_len) {
                    warn!(blob = %frame.id, "the appliance sent a blob that does not verify ({e}); not cached, sent as missing");
                    continue;
                }
                if let Err(e) = server.cache.put(&frame, &stored) {
                    warn!("{e}; serving without caching");
                }
                found.insert(frame.id, (frame, stored.to_vec()));
            }
            Ok::<_, crate::client::ClientError>(())
        });
        if let Err(e) = fetched {
            warn!(
                "filling the reflector cache from the appliance failed: {e}; those blobs go out as missing and neighbours fetch them from the appliance"
            );
        }
    }
    let mut frames = Vec::new();
    let mut ends = Vec::with_capacity(ids.len());
    let mut served = 0;
    for id in ids {
        match found.get(id) {
            Some((frame, stored)) => {
                frames.extend_from_slice(&frame.header());
                frames.extend_from_slice(stored);
                served += (BlobFrame::HEADER_LEN + stored.len()) as u64;
            }
            None => frames.extend_from_slice(&BlobFrame::missing(*id).header()),
        }
        ends.push(frames.len());
    }
    Answer {
        frames,
        ends,
        served,
    }
}
