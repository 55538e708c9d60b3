//! The appliance's own PKI and its HTTPS front: a CA made on first start, a server
//! certificate signed by it, device certificates issued at enrolment, and the TLS accept loop
//! that hands each connection (with its client certificate, if any) to the router.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::config::DataDir;

/// Device certificates outlive any realistic hardware; revocation is by catalog flag.
const DEVICE_CERT_DAYS: i64 = 3650;
const CA_CERT_DAYS: i64 = 30 * 365;
const SERVER_CERT_DAYS: i64 = 825;
/// A reflector asks for a fresh certificate whenever its role starts, so a short life
/// bounds how long a device whose role was taken away keeps a usable one.
const REFLECTOR_CERT_DAYS: i64 = 30;
/// A server certificate closer than this to expiry is replaced at start.
const SERVER_RENEW_DAYS: i64 = 60;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a stopping server lets requests in flight finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a valid PEM {what}: {reason}; restore it from a backup", path.display())]
    BadPem {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error(
        "{} exists but {} does not: refusing to make a new CA over half of an old one \
         (enrolled devices trust the old one); restore the missing file from a backup",
        present.display(), absent.display()
    )]
    HalfCa { present: PathBuf, absent: PathBuf },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate signing request is not acceptable: {0}")]
    Csr(rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS client verifier configuration failed: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The client certificate a connection presented (DER), if any; every request on that
/// connection carries it as an extension.
#[derive(Clone, Debug, Default)]
pub struct PeerCertificate(pub Option<Arc<[u8]>>);

/// The appliance CA (able to issue) and the server certificate it signed.
pub struct Pki {
    pub ca_cert_der: CertificateDer<'static>,
    pub ca_cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    server_cert_der: CertificateDer<'static>,
    server_key_der: PrivatePkcs8KeyDer<'static>,
}

impl Pki {
    /// Loads the PKI of a data directory, creating the CA and server certificate on first
    /// start and renewing a server certificate close to expiry.
    pub fn ensure(data: &DataDir) -> Result<Pki, TlsError> {
        let dir = data.tls_dir();
        std::fs::create_dir_all(&dir).map_err(|source| TlsError::Write {
            path: dir.clone(),
            source,
        })?;
        // Private keys live here: only the service account may list or read them.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| TlsError::Write {
                path: dir.clone(),
                source,
            },
        )?;

        let (ca_cert, ca_key) = (data.ca_cert(), data.ca_key());
        match (ca_cert.exists(), ca_key.exists()) {
            (false, false) => {
                let (cert_pem, key_pem) = generate_ca()?;
                write_file(&ca_key, key_pem.as_bytes(), 0o600)?;
                write_file(&ca_cert, cert_pem.as_bytes(), 0o644)?;
                info!(path = %ca_cert.display(), "created the appliance CA");
            }
            (true, false) => {
                return Err(TlsError::HalfCa {
                    present: ca_cert,
                    absent: ca_key,
                });
            }
            (false, true) => {
                return Err(TlsError::HalfCa {
                    present: ca_key,
                    absent: ca_cert,
                });
            }
            (true, true) => {}
        }
        let (ca_der, ca_pem, ca_keypair) = load_ca(data)?;
        let issuer = Issuer::from_ca_cert_der(&ca_der, ca_keypair)?;

        let (srv_cert, srv_key) = (data.server_cert(), data.server_key());
        if !server_cert_usable(&srv_cert, &srv_key, &ca_der) {
            let key = KeyPair::generate()?;
            let cert = server_params(&hostname())?.signed_by(&key, &issuer)?;
            write_file(&srv_key, key.serialize_pem().as_bytes(), 0o600)?;
            write_file(&srv_cert, cert.pem().as_bytes(), 0o644)?;
            info!(path = %srv_cert.display(), "created the server certificate");
        }
        let server_cert_der = read_cert(&srv_cert)?;
        let key_text = read(&srv_key)?;
        let server_key_der =
            PrivatePkcs8KeyDer::from_pem_slice(&key_text).map_err(|e| TlsError::BadPem {
                path: srv_key.clone(),
                what: "PKCS#8 private key",
                reason: e.to_string(),
            })?;
        Ok(Pki {
            ca_cert_der: ca_der,
            ca_cert_pem: ca_pem,
            issuer,
            server_cert_der,
            server_key_der,
        })
    }

    /// The rustls configuration of the HTTPS front: chain [server, CA], optional client
    /// certificates (enrolment and health checks come without one), h2 and http/1.1.
    pub fn server_config(&self) -> Result<ServerConfig, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_cert_der.clone())?;
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
            .allow_unauthenticated()
            .build()?;
        let chain = vec![self.server_cert_der.clone(), self.ca_cert_der.clone()];
        let key = PrivateKeyDer::Pkcs8(self.server_key_der.clone_key());
        let mut config = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Issues a device's client certificate for the public key in its CSR. Only the key is
    /// taken from the request: names, extensions and CA flags a device asks for are ignored.
    pub fn issue_device_cert(
        &self,
        csr_pem: &str,
        device_id: &str,
    ) -> Result<(String, Vec<u8>), TlsError> {
        self.issue_for_device(
            csr_pem,
            device_id,
            "Morgana device",
            ExtendedKeyUsagePurpose::ClientAuth,
            DEVICE_CERT_DAYS,
        )
    }

    /// Issues the server certificate of a device's branch reflector listener, for the
    /// public key in its CSR (a key of the listener's own, not the device key). Neighbours
    /// check it against the appliance CA they pin; names are not checked (a branch reaches
    /// its reflector under whatever address it has), so the certificate names the device.
    pub fn issue_reflector_cert(
        &self,
        csr_pem: &str,
        device_id: &str,
    ) -> Result<(String, Vec<u8>), TlsError> {
        self.issue_for_device(
            csr_pem,
            device_id,
            "Morgana branch reflector",
            ExtendedKeyUsagePurpose::ServerAuth,
            REFLECTOR_CERT_DAYS,
        )
    }

    /// Only the key is taken from the request: names, extensions and CA flags a device asks
    /// for are ignored.
    fn issue_for_device(
        &self,
        csr_pem: &str,
        device_id: &str,
        organization: &str,
        usage: ExtendedKeyUsagePurpose,
        days: i64,
    ) -> Result<(String, Vec<u8>), TlsError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(TlsError::Csr)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, device_id);
        dn.push(DnType::OrganizationName, organization);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, days);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok((cert.pem(), cert.der().to_vec()))
    }
}

/// The CA certificate (DER) of an initialised data directory, for commands that only need
/// its pin.
pub fn load_ca_cert(data: &DataDir) -> Result<CertificateDer<'static>, TlsError> {
    read_cert(&data.ca_cert())
}

fn load_ca(data: &DataDir) -> Result<(CertificateDer<'static>, String, KeyPair), TlsError> {
    let path = data.ca_cert();
    let der = read_cert(&path)?;
    let pem = String::from_utf8(read(&path)?).map_err(|e| TlsError::BadPem {
        path: path.clone(),
        what: "certificate",
        reason: e.to_string(),
    })?;
    let key_path = data.ca_key();
    let key_text = String::from_utf8(read(&key_path)?).map_err(|e| TlsError::BadPem {
        path: key_path.clone(),
        what: "private key",
        reason: e.to_string(),
    })?;
    let key = KeyPair::from_pem(&key_text).map_err(|e| TlsError::BadPem {
        path: key_path,
        what: "private key",
        reason: e.to_string(),
    })?;
    Ok((der, pem, key))
}

fn generate_ca() -> Result<(String, String), TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("Morgana appliance CA ({})", hostname()),
    );
    dn.push(DnType::OrganizationName, "Morgana");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_CERT_DAYS);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn server_params(host: &str) -> Result<CertificateParams, TlsError> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    // A hostname that is not a plain DNS label sequence would make the certificate invalid.
    let usable = !host.is_empty()
        && host != "localhost"
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if usable {
        names.push(host.to_string());
    }
    let mut params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, if usable { host } else { "localhost" });
    dn.push(DnType::OrganizationName, "Morgana");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, SERVER_CERT_DAYS);
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// Whether the stored server certificate can be kept: present, parseable, issued by this
/// CA, naming this host, and not close to expiry.
fn server_cert_usable(cert: &Path, key: &Path, ca_der: &[u8]) -> bool {
    if !key.is_file() {
        return false;
    }
    let Ok(der) = read_cert(cert) else {
        return false;
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    let Ok((_, ca)) = x509_parser::parse_x509_certificate(ca_der) else {
        return false;
    };
    if parsed.issuer() != ca.subject() {
        return false;
    }
    let host = hostname();
    let names_host = host.is_empty()
        || host == "localhost"
        || parsed.subject_alternative_name().ok().flatten().is_some_and(|san| {
            san.value.general_names.iter().any(
                |n| matches!(n, x509_parser::extensions::GeneralName::DNSName(d) if d.eq_ignore_ascii_case(&host)),
            )
        })
        || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    let renew_at = OffsetDateTime::now_utc() + time::Duration::days(SERVER_RENEW_DAYS);
    names_host && parsed.validity().not_after.timestamp() > renew_at.unix_timestamp()
}

fn set_validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // Clocks of devices and appliance disagree a little; do not start the validity "now".
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    crate::random::fill(&mut bytes);
    // Positive and without a leading zero byte: DER INTEGER rules.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// The machine's hostname, empty if it cannot be read.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes at most that many
    // bytes and we look only up to the first NUL (or the end).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end])
        .trim()
        .to_ascii_lowercase()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    let text = read(path)?;
    CertificateDer::from_pem_slice(&text).map_err(|e| TlsError::BadPem {
        path: path.to_path_buf(),
        what: "certificate",
        reason: e.to_string(),
    })
}

/// Writes a file whole or not at all (temp + fsync + rename), created with `mode` so a key
/// is never readable by others even for a moment.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

/// Accepts TLS connections until `shutdown` resolves, then lets requests in flight finish
/// (up to [`DRAIN_TIMEOUT`]). Handshakes run in their own tasks so a slow or silent client
/// never holds up accepting others.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    connections.spawn(connection(tcp, peer, acceptor.clone(), app.clone(), stop_rx.clone()));
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    info!(
        connections = connections.len(),
        "stopping: no new connections, draining requests in flight"
    );
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = connections.len(),
            "requests still running after the drain timeout; closing them"
        );
        connections.abort_all();
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
    mut stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| Arc::<[u8]>::from(c.as_ref()));
    let peer_cert = PeerCertificate(cert);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer_cert.clone());
        tower::Service::call(&mut app.clone(), req)
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    // Packs are up to 160 MB: larger windows keep one upload from crawling over latency.
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .max_concurrent_streams(64);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_ca_and_server_cert_once_and_issues_device_certs() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let pki = Pki::ensure(&data).unwrap();
        let mode = std::fs::metadata(data.ca_key())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        pki.server_config().unwrap();

        // Second start keeps the same CA (devices pinned it) and server certificate.
        let again = Pki::ensure(&data).unwrap();
        assert_eq!(again.ca_cert_der, pki.ca_cert_der);
        assert_eq!(again.server_cert_der, pki.server_cert_der);

        let (_, server) = x509_parser::parse_x509_certificate(&pki.server_cert_der).unwrap();
        let san = server.subject_alternative_name().unwrap().unwrap();
        let names = format!("{:?}", san.value.general_names);
        assert!(
            names.contains("\"localhost\"") && names.contains("[127, 0, 0, 1]"),
            "{names}"
        );

        let device_key = KeyPair::generate().unwrap();
        let mut req = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        req.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = req.serialize_request(&device_key).unwrap().pem().unwrap();
        let (_, der) = pki.issue_device_cert(&csr, "0123456789abcdef").unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(
            !cert.is_ca(),
            "a device must not get a CA certificate by asking"
        );
        assert!(cert.subject().to_string().contains("0123456789abcdef"));
        assert!(
            cert.extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .client_auth
        );
        assert!(pki.issue_device_cert("not a csr", "x").is_err());

        let (_, der) = pki.issue_reflector_cert(&csr, "0123456789abcdef").unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth, "{eku:?}");
        assert!(pki.issue_reflector_cert("not a csr", "x").is_err());
    }

    #[test]
    fn refuses_half_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        std::fs::create_dir_all(data.tls_dir()).unwrap();
        std::fs::write(data.ca_cert(), "x").unwrap();
        assert!(matches!(Pki::ensure(&data), Err(TlsError::HalfCa { .. })));
    }
}
