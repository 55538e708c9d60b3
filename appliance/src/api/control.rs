//! The control plane, appliance side (contract in `morgana_core::control`): heartbeats
//! with inventory, and jobs handed to agents over a long poll. The agent always calls out;
//! a poll waits until a job for its device is queued or its wait runs out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use morgana_core::control::{
    Heartbeat, HeartbeatReply, Job, JobKind, JobReport, JobState, MAX_FILE_RESULTS,
    MAX_JOB_WAIT_SECS, NextJob,
};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{ApiError, AppState, AuthDevice, read_json};
use crate::catalog::{Catalog, HeartbeatRecord, JobRecord};
use crate::events::{NewEvent, Severity};

/// Heartbeat interval told to agents unless `serve --heartbeat-every` says otherwise.
pub const DEFAULT_HEARTBEAT_SECS: u32 = 60;
/// How often the sweeper looks for jobs queued by another process (the CLI, another
/// appliance) for devices whose poll is waiting.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// A running job is declared abandoned by a heartbeat that does not name it only once it
/// has run this long: the job may have been handed out while that heartbeat was in flight.
const ABANDON_GRACE_MS: i64 = 10_000;
const MAX_AGENT_VERSION: usize = 64;
const MAX_REPORT_MESSAGE: usize = 16 * 1024;

/// Control-plane settings and the polls waiting for jobs, per device.
pub struct Control {
    heartbeat_secs: u32,
    waiting: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Default for Control {
    fn default() -> Control {
        Control {
            heartbeat_secs: DEFAULT_HEARTBEAT_SECS,
            waiting: Mutex::default(),
        }
    }
}

impl Control {
    pub fn with_heartbeat_secs(secs: u32) -> Control {
        Control {
            heartbeat_secs: secs.max(1),
            ..Control::default()
        }
    }

    fn waiter(&self, device_id: &str) -> Arc<Notify> {
        let mut m = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(device_id.to_owned()).or_default().clone()
    }

    /// Forgets the device's entry once no poll holds it any more.
    fn done_waiting(&self, device_id: &str, notify: Arc<Notify>) {
        let mut m = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        // The map's reference and ours.
        if Arc::strong_count(&notify) <= 2 {
            m.remove(device_id);
        }
    }

    /// Wakes the device's waiting poll, if any. Whoever queues a job inside the serving
    /// process (with `jobs::queue`) calls this so the agent gets it at once.
    pub fn wake(&self, device_id: &str) {
        let m = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get(device_id) {
            // A stored permit also covers a poll between two waits.
            n.notify_one();
        }
    }

    pub(crate) fn has_waiters(&self) -> bool {
        !self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

/// Wakes waiting polls for jobs queued by other processes, once a second, with one catalog
/// query whatever the number of devices.
pub fn spawn_sweeper(state: &AppState) {
    let state = state.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(SWEEP_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if !state.0.control.has_waiters() {
                continue;
            }
            match state.0.catalog.devices_with_queued_jobs().await {
                Ok(devices) => devices.iter().for_each(|d| state.0.control.wake(d)),
                Err(e) => warn!(error = %e, "looking for queued jobs failed; trying again"),
            }
        }
    });
}

pub(super) async fn heartbeat(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    body: Request,
) -> Result<axum::Json<HeartbeatReply>, ApiError> {
    let beat: Heartbeat = read_json(body, "heartbeat").await?;
    if beat.agent_version.len() > MAX_AGENT_VERSION
        || beat.agent_version.chars().any(char::is_control)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("agent_version must be at most {MAX_AGENT_VERSION} bytes of printable text"),
        ));
    }
    if let Some(t) = &beat.last_snapshot
        && crate::clock::parse_rfc3339_ms(t).is_none()
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("last_snapshot {t:?} is not an RFC 3339 time"),
        ));
    }
    let catalog = state.0.catalog.as_ref();
    let now = crate::clock::now_ms();
    let changed = catalog
        .record_heartbeat(
            &device.id,
            &HeartbeatRecord {
                at_ms: now,
                agent_version: &beat.agent_version,
                last_snapshot: beat.last_snapshot.as_deref(),
                inventory: beat.inventory.as_ref(),
            },
        )
        .await?;
    if changed && let Some(inv) = &beat.inventory {
        crate::events::record(
            catalog,
            NewEvent::system(
                "device.inventory-changed",
                Severity::Info,
                format!(
                    "inventory of {} recorded: {} {} (serial {:?}), {} × {}, {} MiB memory, {} \
                     disks, {}",
                    device.hostname,
                    inv.vendor,
                    inv.model,
                    inv.serial,
                    inv.cpu_count,
                    inv.cpu_model,
                    inv.memory_bytes >> 20,
                    inv.disks.len(),
                    inv.os_name
                ),
            )
            .for_device(&device.id)
            .by(format!("device:{}", device.id)),
        )
        .await;
    }
    let abandoned = catalog
        .fail_running_jobs(
            &device.id,
            beat.running_job.as_deref(),
            now - ABANDON_GRACE_MS,
            "the agent restarted while running it (or lost it); queue the job again",
            now,
        )
        .await?;
    for job in &abandoned {
        record_outcome(catalog, &device.hostname, job).await;
    }
    let status = catalog.device_status(&device.id).await?;
    let policy = catalog.device_policy(&device.id).await?;
    let reflector = catalog.reflector_role(&device.id).await?;
    Ok(axum::Json(HeartbeatReply {
        policy_version: policy.version,
        heartbeat_secs: state.0.control.heartbeat_secs,
        inventory_digest: status.and_then(|s| s.inventory_digest),
        reflector,
    }))
}

pub(super) async fn next_job(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    body: Request,
) -> Result<Response, ApiError> {
    let req: NextJob = read_json(body, "job poll").await?;
    let wait = Duration::from_secs(u64::from(req.wait_secs.min(MAX_JOB_WAIT_SECS)));
    let deadline = tokio::time::Instant::now() + wait;
    let control = &state.0.control;
    let notify = control.waiter(&device.id);
    let result = wait_for_job(&state, &device.id, &notify, deadline).await;
    control.done_waiting(&device.id, notify);
    result
}

/// Hands out the device's next job, waiting until `deadline` for one to be queued.
async fn wait_for_job(
    state: &AppState,
    device_id: &str,
    notify: &Notify,
    deadline: tokio::time::Instant,
) -> Result<Response, ApiError> {
    loop {
        // Registered before looking, so a job queued in between still wakes us.
        let woken = notify.notified();
        if let Some(job) = state
            .0
            .catalog
            .take_next_job(device_id, crate::clock::now_ms())
            .await?
        {
            info!(device = %device_id, job = %job.id, "job handed out");
            return Ok(axum::Json(Job {
                id: job.id,
                kind: job.kind,
            })
            .into_response());
        }
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep_until(deadline) => {
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
        }
    }
}

pub(super) async fn report_job(
    State(state): State<AppState>,
    AuthDevice(device): AuthDevice,
    body: Request,
) -> Result<StatusCode, ApiError> {
    let report: JobReport = read_json(body, "job report").await?;
    if report.state == JobState::Queued {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "a job report says running, succeeded or failed, never queued",
        ));
    }
    if report.message.len() > MAX_REPORT_MESSAGE {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the report message is longer than {MAX_REPORT_MESSAGE} bytes; shorten it"),
        ));
    }
    if report
        .files
        .as_ref()
        .is_some_and(|f| f.files.len() > MAX_FILE_RESULTS)
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the report lists more than {MAX_FILE_RESULTS} files; list at most that many and \
                 count the rest"
            ),
        ));
    }
    let catalog = state.0.catalog.as_ref();
    let Some(job) = catalog
        .report_job(&device.id, &report, crate::clock::now_ms())
        .await?
    else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "job {:?} is not running on this device (unknown, another device's, already \
                 finished, or failed as abandoned); stop working on it",
                report.job_id
            ),
        ));
    };
    if job.finished_ms.is_some() {
        if let (Some(files), JobKind::ApplyLayers(_)) = (&report.files, &job.kind) {
            let now = crate::clock::rfc3339_ms(crate::clock::now_ms());
            if let Err(e) = catalog
                .save_apply_results(&job.id, &device.id, files, &now)
                .await
            {
                // The outcome is stored; only the per-file detail is lost.
                warn!(job = %job.id, "recording the apply's per-file results failed: {e}");
            }
        }
        if job.state == JobState::Succeeded {
            record_layers(catalog, &job).await;
        }
        record_outcome(catalog, &device.hostname, &job).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// After a successful apply or rollback: which layers the device has now.
/// The job's outcome is stored already, so a failure here is logged, not answered: the
/// agent could do nothing about it.
async fn record_layers(catalog: &dyn Catalog, job: &JobRecord) {
    let now = crate::clock::rfc3339_ms(crate::clock::now_ms());
    let recorded = match &job.kind {
        JobKind::ApplyLayers(applied) => {
            catalog
                .record_applied(&job.device_id, &job.id, applied, &now)
                .await
        }
        JobKind::RollbackLayers(_) => {
            catalog
                .roll_back_applied(&job.device_id, &job.id, &now)
                .await
        }
        _ => Ok(()),
    };
    if let Err(e) = recorded {
        warn!(job = %job.id, "recording the device's layers failed: {e}");
        crate::events::record(
            catalog,
            NewEvent::system(
                "layer.record-failed",
                Severity::Error,
                format!(
                    "job {} succeeded but recording the device's layers failed: {e}; the next \
                     dry run compares against the layers recorded before",
                    job.id
                ),
            )
            .for_device(&job.device_id),
        )
        .await;
    }
}

/// `job.succeeded` (info) or `job.failed` (error, with the agent's message).
async fn record_outcome(catalog: &dyn Catalog, hostname: &str, job: &JobRecord) {
    let what = crate::jobs::describe(&job.kind);
    let (kind, severity, message) = match job.state {
        JobState::Succeeded => (
            "job.succeeded",
            Severity::Info,
            format!("job {} on {hostname} succeeded: {what}", job.id),
        ),
        _ => (
            "job.failed",
            Severity::Error,
            format!(
                "job {} on {hostname} failed: {what}: {}",
                job.id, job.message
            ),
        ),
    };
    info!(job = %job.id, device = %job.device_id, state = ?job.state, "job finished");
    crate::events::record(
        catalog,
        NewEvent::system(kind, severity, message)
            .for_device(&job.device_id)
            .by(format!("device:{}", job.device_id)),
    )
    .await;
}
