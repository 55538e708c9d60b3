//! The agent's HTTPS client: trust pinned to the appliance's CA, mTLS with the device key,
//! and one method per call of the agent protocol (`morgana_core::wire`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::StreamExt;
use morgana_core::Id;
use morgana_core::control::{self, AgentPolicy};
use morgana_core::wire::{self, BlobFrame, EnrollToken};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::state::{CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE, State, StateError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the appliance at {url}: {reason}. Is `morgana serve` running there?")]
    Unreachable { url: String, reason: String },
    #[error("the appliance refused {call}: {status}: {message}")]
    Refused {
        call: &'static str,
        status: u16,
        message: String,
    },
    #[error("the appliance answered {call} with something this agent cannot read: {reason}")]
    Protocol { call: &'static str, reason: String },
    #[error("{0}")]
    State(#[from] StateError),
    #[error("the agent's credential files are damaged: {0}; enrol again")]
    Credential(String),
    #[error("the server URL {0:?} is not an https:// URL")]
    BadUrl(String),
}

/// Trusts exactly one CA: the appliance's own, identified by its pin. Names are not
/// checked: the CA is private to the appliance, and endpoints reach it under whatever
/// address the site uses.
#[derive(Debug)]
struct PinnedCa {
    pin: Id,
    /// Known after enrolment; during enrolment the CA is taken from the presented chain.
    ca: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedCa {
    fn verifier_for(
        ca: &CertificateDer<'_>,
        provider: &Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let inner = match &self.ca {
            Some(v) => v.clone(),
            None => {
                let ca = intermediates
                    .iter()
                    .find(|c| EnrollToken::pin_of(c) == self.pin)
                    .ok_or_else(|| {
                        rustls::Error::General(
                            "the server did not present the CA pinned in the token: wrong server \
                             URL or token"
                                .into(),
                        )
                    })?;
                Self::verifier_for(ca, &self.provider)?
            }
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A neighbour's reflector that does not accept a connection this fast is skipped.
const REFLECTOR_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// A reflector that goes silent this long mid-answer is dropped for the appliance.
const REFLECTOR_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// Longest a control call (heartbeat, report) may take beyond any wait it asks for.
const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub struct Client {
    http: reqwest::Client,
    base: String,
    sent: AtomicU64,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn http_client(tls: rustls::ClientConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .pool_max_idle_per_host(8)
        .build()
        .expect("reqwest client with a preconfigured rustls config")
}

/// HTTP/1.1 only, one connection per request in flight. Over HTTP/2 every 16 KiB frame of
/// a pack or a fetch went through hyper's stream bookkeeping, flow control and a hand-off
/// between tasks: alternating runs on one endpoint gave a restore 0.6 s (8 %) and a first
/// sync 0.6-0.9 s faster over HTTP/1.1, with less CPU on both sides. An agent has a few
/// requests in flight at most, so multiplexing buys nothing.
fn with_alpn(mut tls: rustls::ClientConfig) -> rustls::ClientConfig {
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls
}

fn base_url(server: &str) -> Result<String, ClientError> {
    let base = server.trim_end_matches('/');
    if !base.starts_with("https://") {
        return Err(ClientError::BadUrl(server.to_string()));
    }
    Ok(base.to_string())
}

/// Which plugin version an answer is about.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PluginMeta {
    pub id: Id,
    pub name: String,
    pub version: u32,
}

pub enum PluginFetch {
    /// No plugin is active: the built-in decides.
    NoneActive,
    /// The held component is still the active one.
    Unchanged(PluginMeta),
    /// A component other than the held one is active (its bytes hash to its id).
    New(PluginMeta, Vec<u8>),
}

impl Client {
    /// A client that trusts whichever CA the token pins, without a device credential.
    pub fn for_enrolment(server: &str, pin: Id) -> Result<Client, ClientError> {
        let verifier = PinnedCa {
            pin,
            ca: None,
            provider: provider(),
        };
        let tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(Client {
            http: http_client(with_alpn(tls)),
            base: base_url(server)?,
            sent: AtomicU64::new(0),
        })
    }

    /// A client for an enrolled device: pinned CA, device certificate.
    pub fn for_device(state: &State) -> Result<Client, ClientError> {
        let device = state.device()?;
        let tls = Self::device_tls(state)?;
        Ok(Client {
            http: http_client(with_alpn(tls)),
            base: base_url(&device.server)?,
            sent: AtomicU64::new(0),
        })
    }

    /// A client for a neighbour's branch reflector at `address` (`HOST:PORT`): the same
    /// identity and trust as toward the appliance (a reflector's certificate comes from the
    /// appliance CA), but short waits, because the appliance is always there to fall back on.
    pub fn for_reflector(state: &State, address: &str) -> Result<Client, ClientError> {
        let tls = Self::device_tls(state)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(with_alpn(tls))
            .pool_max_idle_per_host(2)
            .connect_timeout(REFLECTOR_CONNECT_TIMEOUT)
            .read_timeout(REFLECTOR_READ_TIMEOUT)
            .build()
            .expect("reqwest client with a preconfigured rustls config");
        Ok(Client {
            http,
            base: base_url(&format!("https://{address}"))?,
            sent: AtomicU64::new(0),
        })
    }

    /// The device's TLS client configuration: the pinned appliance CA, the device key.
    fn device_tls(state: &State) -> Result<rustls::ClientConfig, ClientError> {
        let ca = CertificateDer::from_pem_slice(&state.read(CA_CERT_FILE)?)
            .map_err(|e| ClientError::Credential(format!("{CA_CERT_FILE}: {e}")))?;
        let certs = CertificateDer::pem_slice_iter(&state.read(CLIENT_CERT_FILE)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::Credential(format!("{CLIENT_CERT_FILE}: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&state.read(CLIENT_KEY_FILE)?)
            .map_err(|e| ClientError::Credential(format!("{CLIENT_KEY_FILE}: {e}")))?;
        let provider = provider();
        let inner = PinnedCa::verifier_for(&ca, &provider)
            .map_err(|e| ClientError::Credential(format!("{CA_CERT_FILE}: {e}")))?;
        let verifier = PinnedCa {
            pin: EnrollToken::pin_of(&ca),
            ca: Some(inner),
            provider: provider.clone(),
        };
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(certs, key)
            .map_err(|e| ClientError::Credential(format!("{CLIENT_KEY_FILE}: {e}")))?;
        Ok(tls)
    }

    /// Request body bytes sent so far (the payload on the wire, before TLS framing).
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn send(
        &self,
        call: &'static str,
        req: reqwest::RequestBuilder,
        body_len: usize,
    ) -> Result<reqwest::Response, ClientError> {
        self.sent.fetch_add(body_len as u64, Ordering::Relaxed);
        let resp = req
            .header(wire::PROTOCOL_HEADER, wire::PROTOCOL_VERSION.to_string())
            .send()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: self.base.clone(),
                reason: error_chain(&e),
            })?;
        let status = resp.status();
        // 304 answers only a conditional request, whose caller handles it.
        if status.is_success() || status == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<wire::ErrorBody>(&text)
            .map(|b| b.error)
            .unwrap_or(text);
        Err(ClientError::Refused {
            call,
            status: status.as_u16(),
            message,
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        call: &'static str,
        resp: reqwest::Response,
    ) -> Result<T, ClientError> {
        let bytes = resp.bytes().await.map_err(|e| ClientError::Protocol {
            call,
            reason: error_chain(&e),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            call,
            reason: e.to_string(),
        })
    }

    /// Checks that the appliance answers over the device's TLS identity, so that a sync
    /// fails at once, not after scanning, when it is unreachable.
    pub async fn health(&self) -> Result<(), ClientError> {
        let rb = self.http.get(self.url(wire::PATH_HEALTH));
        self.send("health check", rb, 0).await.map(|_| ())
    }

    pub async fn enroll(
        &self,
        req: &wire::EnrollRequest,
    ) -> Result<wire::EnrollResponse, ClientError> {
        let body = serde_json::to_vec(req).expect("serializes");
        let len = body.len();
        let rb = self
            .http
            .post(self.url(wire::PATH_ENROLL))
            .header("content-type", "application/json")
            .body(body);
        Self::json("enrol", self.send("enrol", rb, len).await?).await
    }

    /// Which of `ids` the appliance lacks, in request order.
    pub async fn missing(&self, ids: &[Id]) -> Result<Vec<Id>, ClientError> {
        let mut out = Vec::new();
        for batch in ids.chunks(wire::MAX_IDS_PER_REQUEST) {
            let body = Id::concat(batch);
            let len = body.len();
            let rb = self.http.post(self.url(wire::PATH_MISSING)).body(body);
            let resp = self.send("missing", rb, len).await?;
            let bytes = resp.bytes().await.map_err(|e| ClientError::Protocol {
                call: "missing",
                reason: error_chain(&e),
            })?;
            out.extend(Id::parse_list(&bytes).ok_or_else(|| ClientError::Protocol {
                call: "missing",
                reason: "body is not a list of ids".into(),
            })?);
        }
        Ok(out)
    }

    pub async fn upload_pack(&self, pack: bytes::Bytes) -> Result<wire::PackAccepted, ClientError> {
        let len = pack.len();
        let rb = self.http.post(self.url(wire::PATH_PACKS)).body(pack);
        Self::json("upload pack", self.send("upload pack", rb, len).await?).await
    }

    /// Commits a snapshot; `Ok(Err(_))` when the appliance lacks something it references.
    pub async fn commit(
        &self,
        req: &wire::CommitRequest,
    ) -> Result<Result<wire::SnapshotInfo, wire::CommitRefused>, ClientError> {
        let body = serde_json::to_vec(req).expect("serializes");
        let len = body.len();
        self.sent.fetch_add(len as u64, Ordering::Relaxed);
        let resp = self
            .http
            .post(self.url(wire::PATH_SNAPSHOTS))
            .header("content-type", "application/json")
            .header(wire::PROTOCOL_HEADER, wire::PROTOCOL_VERSION.to_string())
            .body(body)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: self.base.clone(),
                reason: error_chain(&e),
            })?;
        if resp.status() == reqwest::StatusCode::CONFLICT {
            return Ok(Err(Self::json("commit", resp).await?));
        }
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<wire::ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or(text);
            return Err(ClientError::Refused {
                call: "commit",
                status,
                message,
            });
        }
        Ok(Ok(Self::json("commit", resp).await?))
    }

    /// The device's upload policy as the appliance holds it now.
    pub async fn policy(&self) -> Result<AgentPolicy, ClientError> {
        let rb = self.http.get(self.url(control::PATH_POLICY));
        Self::json("policy", self.send("policy", rb, 0).await?).await
    }

    pub async fn snapshots(&self) -> Result<Vec<wire::SnapshotInfo>, ClientError> {
        let rb = self.http.get(self.url(wire::PATH_SNAPSHOTS));
        Self::json("list snapshots", self.send("list snapshots", rb, 0).await?).await
    }

    async fn post_json(
        &self,
        call: &'static str,
        path: &str,
        body: &impl serde::Serialize,
        timeout: Option<std::time::Duration>,
    ) -> Result<reqwest::Response, ClientError> {
        let body = serde_json::to_vec(body).expect("serializes");
        let len = body.len();
        let mut rb = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = timeout {
            rb = rb.timeout(t);
        }
        self.send(call, rb, len).await
    }

    /// Control plane: status (and inventory when it changed) → heartbeat interval, policy
    /// version, the inventory digest the appliance holds.
    pub async fn heartbeat(
        &self,
        beat: &control::Heartbeat,
    ) -> Result<control::HeartbeatReply, ClientError> {
        let resp = self
            .post_json(
                "heartbeat",
                control::PATH_HEARTBEAT,
                beat,
                Some(CONTROL_TIMEOUT),
            )
            .await?;
        Self::json("heartbeat", resp).await
    }

    /// Long-polls for the next job: `None` when none came within `wait_secs`.
    pub async fn next_job(&self, wait_secs: u32) -> Result<Option<control::Job>, ClientError> {
        let req = control::NextJob { wait_secs };
        // The appliance answers by `wait_secs` (capped lower); past that it is gone.
        let timeout = std::time::Duration::from_secs(u64::from(wait_secs)) + CONTROL_TIMEOUT;
        let resp = self
            .post_json("job poll", control::PATH_JOBS_NEXT, &req, Some(timeout))
            .await?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        Self::json("job poll", resp).await.map(Some)
    }

    /// Progress of a running job, or its outcome.
    pub async fn report_job(&self, report: &control::JobReport) -> Result<(), ClientError> {
        self.post_json(
            "job report",
            control::PATH_JOB_REPORT,
            report,
            Some(CONTROL_TIMEOUT),
        )
        .await
        .map(drop)
    }

    /// The appliance's active `reflector-selector` component, unless it is `held` (the id
    /// of the one kept from last time).
    pub async fn reflector_selector(&self, held: Option<Id>) -> Result<PluginFetch, ClientError> {
        const CALL: &str = "reflector-selector plugin";
        let mut rb = self.http.get(self.url(control::PATH_REFLECTOR_SELECTOR));
        if let Some(id) = held {
            rb = rb.header("if-none-match", format!("\"{}\"", id.to_hex()));
        }
        let resp = self.send(CALL, rb, 0).await?;
        let status = resp.status();
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(PluginFetch::NoneActive);
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let protocol = |reason: String| ClientError::Protocol { call: CALL, reason };
        let id: Id = header("etag")
            .and_then(|e| e.trim_matches('"').parse().ok())
            .ok_or_else(|| protocol("the answer has no usable ETag".into()))?;
        let meta = PluginMeta {
            id,
            name: header(control::PLUGIN_NAME_HEADER).unwrap_or_default(),
            version: header(control::PLUGIN_VERSION_HEADER)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        };
        if status == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(PluginFetch::Unchanged(meta));
        }
        let bytes = resp.bytes().await.map_err(|e| protocol(error_chain(&e)))?;
        if Id::of(&bytes) != meta.id {
            return Err(protocol(format!(
                "the component does not hash to its ETag {}",
                meta.id
            )));
        }
        Ok(PluginFetch::New(meta, bytes.to_vec()))
    }

    /// Tells the appliance that an agent-side plugin failed here.
    pub async fn report_plugin_failure(
        &self,
        report: &control::PluginFailureReport,
    ) -> Result<(), ClientError> {
        self.post_json(
            "plugin failure report",
            control::PATH_PLUGIN_FAILURES,
            report,
            Some(CONTROL_TIMEOUT),
        )
        .await
        .map(drop)
    }

    /// A server certificate for this device's reflector listener (PEM), for the key of
    /// `csr_pem`.
    pub async fn reflector_certificate(&self, csr_pem: String) -> Result<String, ClientError> {
        const CALL: &str = "reflector certificate";
        let req = control::ReflectorCertRequest { csr_pem };
        let resp = self
            .post_json(
                CALL,
                control::PATH_REFLECTOR_CERT,
                &req,
                Some(CONTROL_TIMEOUT),
            )
            .await?;
        Self::json::<control::ReflectorCertReply>(CALL, resp)
            .await
            .map(|r| r.cert_pem)
    }

    /// The reflector's heartbeat.
    pub async fn reflector_beat(&self, beat: &control::ReflectorBeat) -> Result<(), ClientError> {
        self.post_json(
            "reflector heartbeat",
            control::PATH_REFLECTOR_BEAT,
            beat,
            Some(CONTROL_TIMEOUT),
        )
        .await
        .map(drop)
    }

    /// Live reflectors other than this device, as the appliance knows them.
    pub async fn reflectors(&self) -> Result<Vec<control::ReflectorInfo>, ClientError> {
        const CALL: &str = "list reflectors";
        let rb = self
            .http
            .get(self.url(control::PATH_REFLECTORS))
            .timeout(CONTROL_TIMEOUT);
        Self::json(CALL, self.send(CALL, rb, 0).await?).await
    }

    /// Streams the stored form of `ids` (at most `MAX_IDS_PER_REQUEST`), in order.
    pub async fn fetch_blobs(&self, ids: &[Id]) -> Result<BlobStream, ClientError> {
        assert!(
            ids.len() <= wire::MAX_IDS_PER_REQUEST,
            "caller batches fetches"
        );
        let body = Id::concat(ids);
        let len = body.len();
        let rb = self.http.post(self.url(wire::PATH_BLOBS)).body(body);
        let resp = self.send("fetch blobs", rb, len).await?;
        Ok(BlobStream {
            body: Box::pin(resp.bytes_stream()),
            buf: BytesMut::new(),
        })
    }
}

type ByteStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Frames of a `fetch_blobs` answer.
pub struct BlobStream {
    body: ByteStream,
    buf: BytesMut,
}

impl BlobStream {
    /// The next blob: its frame and stored bytes (not yet verified: open with
    /// `pack::Codec::open`). `None` at the end of the answer.
    pub async fn next(&mut self) -> Result<Option<(BlobFrame, Bytes)>, ClientError> {
        let proto = |reason: String| ClientError::Protocol {
            call: "fetch blobs",
            reason,
        };
        loop {
            if self.buf.len() >= BlobFrame::HEADER_LEN {
                let header: &[u8; BlobFrame::HEADER_LEN] =
                    self.buf[..BlobFrame::HEADER_LEN].try_into().unwrap();
                let frame = BlobFrame::parse_header(header)
                    .ok_or_else(|| proto("bad frame header".into()))?;
                let total = BlobFrame::HEADER_LEN + frame.stored_len as usize;
                if self.buf.len() >= total {
                    self.buf.advance(BlobFrame::HEADER_LEN);
                    let stored = self.buf.split_to(frame.stored_len as usize).freeze();
                    return Ok(Some((frame, stored)));
                }
                self.buf.reserve(total - self.buf.len());
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(proto(error_chain(&e))),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(proto("answer ends inside a frame".into())),
            }
        }
    }
}

/// reqwest hides the useful part (TLS or connect failure) in the source chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
