//! What agents need of the plugins: the active `reflector-selector` component (each agent
//! ranks its reflectors itself, so the component goes to the agent and runs there), and a
//! way to say that it failed there.

use axum::extract::{Request, State};
use axum::http::header::{CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use morgana_core::Id;
use morgana_core::control::{
    MAX_PLUGIN_FAILURE_MESSAGE, PLUGIN_NAME_HEADER, PLUGIN_VERSION_HEADER, PluginFailureReport,
};
use morgana_core::plugin::{Hook, PluginFailure};

use super::{ApiError, AppState, AuthDevice, read_json};
use crate::hooks::stored_path;

fn etag_of(hash: &Id) -> String {
    format!("\"{}\"", hash.to_hex())
}

pub(super) async fn reflector_selector(
    State(state): State<AppState>,
    AuthDevice(_device): AuthDevice,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Some(hooks) = &state.0.hooks else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let Some(record) = state
        .0
        .catalog
        .active_plugin(Hook::ReflectorSelector)
        .await?
    else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let etag = etag_of(&record.hash);
    let meta = [
        (ETAG, etag.clone()),
        (
            PLUGIN_NAME_HEADER.parse().expect("header name"),
            record.name.clone(),
        ),
        (
            PLUGIN_VERSION_HEADER.parse().expect("header name"),
            record.version.to_string(),
        ),
    ];
    if headers
        .get(IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return Ok((StatusCode::NOT_MODIFIED, meta).into_response());
    }
    let path = stored_path(hooks.data(), &record);
    let bytes = tokio::fs::read(&path).await.map_err(|e| {
        ApiError::internal(
            &format!(
                "reading plugin {} v{} from {} (add the component again with `morgana plugin add`)",
                record.name,
                record.version,
                path.display()
            ),
            e,
        )
    })?;
    if Id::of(&bytes) != record.hash {
        return Err(ApiError::internal(
            "serving the reflector-selector plugin",
            format!(
                "{} no longer holds plugin {} v{}: add the component again with `morgana plugin add`",
                path.display(),
                record.name,
                record.version
            ),
        ));
    }
    let mut response = (StatusCode::OK, meta, bytes).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/wasm"),
    );
    Ok(response)
}

pub(super) async fn plugin_failed(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    body: Request,
) -> Result<StatusCode, ApiError> {
    let report: PluginFailureReport = read_json(body, "plugin failure report").await?;
    let Some(hooks) = &state.0.hooks else {
        return Ok(StatusCode::NO_CONTENT);
    };
    // Only the agent-side hook runs on devices; a report naming anything else is not ours.
    let record = state
        .0
        .catalog
        .plugins()
        .await?
        .into_iter()
        .find(|p| p.hook == Hook::ReflectorSelector && p.hash == report.plugin)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no reflector-selector plugin on this appliance has id {}",
                    report.plugin
                ),
            )
        })?;
    let message: String = report
        .message
        .chars()
        .take(MAX_PLUGIN_FAILURE_MESSAGE)
        .collect();
    let failure = PluginFailure {
        hook: Hook::ReflectorSelector,
        plugin: record.name.clone(),
        message,
    };
    hooks
        .record_failure(
            &record,
            &failure,
            &format!("device {} ({})", device.id, device.hostname),
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}
