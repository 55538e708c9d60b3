//! What branch reflectors and their neighbours need of the appliance: a server certificate
//! for the reflector's listener, its heartbeat, and the list of live reflectors.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use morgana_core::control::{
    ReflectorBeat, ReflectorCertReply, ReflectorCertRequest, ReflectorInfo, valid_site,
};

use super::{ApiError, AppState, AuthDevice, read_json};

/// Most requests a reflector reports in flight; more is not a branch office's load.
const MAX_IN_FLIGHT: u32 = 1 << 20;

pub(super) async fn certificate(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    body: Request,
) -> Result<axum::Json<ReflectorCertReply>, ApiError> {
    let req: ReflectorCertRequest = read_json(body, "reflector certificate request").await?;
    if state.0.catalog.reflector_role(&device.id).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "device {} ({}) does not have the reflector role; turn it on with `morgana \
                 reflector enable {}` or on the Reflectors page",
                device.id, device.hostname, device.id
            ),
        ));
    }
    let (cert_pem, _) = state
        .0
        .pki
        .issue_reflector_cert(&req.csr_pem, &device.id)
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{e}; send a PEM CSR made from the reflector's own key"),
            )
        })?;
    tracing::info!(device = %device.id, "reflector certificate issued");
    Ok(axum::Json(ReflectorCertReply { cert_pem }))
}

pub(super) async fn beat(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    body: Request,
) -> Result<StatusCode, ApiError> {
    let beat: ReflectorBeat = read_json(body, "reflector heartbeat").await?;
    let bad = |what: String| ApiError::new(StatusCode::BAD_REQUEST, what);
    if beat.address.parse::<std::net::IpAddr>().is_err() {
        return Err(bad(format!(
            "address {:?} is not an IP address",
            beat.address
        )));
    }
    if !beat.subnet.is_empty()
        && morgana_core::plugin::reflector::parse_cidr(&beat.subnet).is_none()
    {
        return Err(bad(format!(
            "subnet {:?} is not a CIDR network",
            beat.subnet
        )));
    }
    if !(0.0..=1.0).contains(&beat.load) || beat.in_flight > MAX_IN_FLIGHT || beat.port == 0 {
        return Err(bad(
            "load must be 0 to 1, in_flight a request count and port not 0".into(),
        ));
    }
    let now = crate::clock::now_ms();
    if !state
        .0
        .catalog
        .record_reflector_beat(&device.id, &beat, now)
        .await?
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "device {} does not have the reflector role (any more); stop serving",
                device.id
            ),
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn list(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
) -> Result<axum::Json<Vec<ReflectorInfo>>, ApiError> {
    let records = state.0.catalog.reflectors().await?;
    let mut out = crate::reflectors::candidates(&records, &device.id, crate::clock::now_ms());
    // Sites are checked when set; one that is not a site now is not passed on.
    for c in &mut out {
        c.site = c.site.take().filter(|s| valid_site(s));
    }
    Ok(axum::Json(out))
}
