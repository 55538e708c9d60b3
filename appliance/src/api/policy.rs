//! `GET /v1/policy`: the calling device's upload policy, as its agent applies it.

use axum::extract::State;
use morgana_core::control::AgentPolicy;

use super::{ApiError, AppState, AuthDevice};

pub(super) async fn device_policy(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
) -> Result<axum::Json<AgentPolicy>, ApiError> {
    let policy = state.0.catalog.device_policy(&device.id).await?;
    Ok(axum::Json(policy.agent_policy()))
}
