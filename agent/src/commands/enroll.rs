//! `morgana-agent enroll`: trade a token for a device identity and a client certificate.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use morgana_core::wire::{EnrollRequest, EnrollToken};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::client::Client;
use crate::state::{CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE, Device, State};

pub async fn run(
    state_dir: Option<PathBuf>,
    server: &str,
    token: &str,
    root: &Path,
) -> anyhow::Result<()> {
    let state = State::open(state_dir)?;
    if state.is_enrolled() {
        bail!(
            "{} already holds an enrolled device; use another --state-dir or remove it to enrol again",
            state.dir.display()
        );
    }
    let token: EnrollToken = token.parse()?;
    let root = std::fs::canonicalize(root).with_context(|| {
        format!(
            "the root to protect, {}, is not an existing directory",
            root.display()
        )
    })?;
    if !root.is_dir() {
        bail!(
            "the root to protect, {}, is not a directory",
            root.display()
        );
    }
    // The key is made here and never leaves the endpoint: the appliance signs a request.
    let key = rcgen::KeyPair::generate().context("cannot generate the device key")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .context("cannot build the certificate request")?;
    let hostname = hostname();
    let client = Client::for_enrolment(server, token.ca_pin)?;
    let resp = client
        .enroll(&EnrollRequest {
            token: token.to_string(),
            hostname,
            csr_pem: csr.pem()?,
        })
        .await?;
    let ca = CertificateDer::from_pem_slice(resp.ca_cert_pem.as_bytes())
        .context("the appliance sent a CA certificate that does not parse")?;
    if EnrollToken::pin_of(&ca) != token.ca_pin {
        bail!(
            "the appliance's CA does not match the token's pin: refusing to trust it (wrong server?)"
        );
    }
    state.create_dir()?;
    state.write(CLIENT_KEY_FILE, key.serialize_pem().as_bytes(), 0o600)?;
    state.write(CLIENT_CERT_FILE, resp.client_cert_pem.as_bytes(), 0o600)?;
    state.write(CA_CERT_FILE, resp.ca_cert_pem.as_bytes(), 0o600)?;
    state.save_device(&Device {
        server: server.to_string(),
        device_id: resp.device_id.clone(),
        root,
    })?;
    println!(
        "enrolled as device {} (state in {})",
        resp.device_id,
        state.dir.display()
    );
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
