//! `morgana-agent run`: the endpoint service. Three loops share one process:
//!
//! - the **schedule** syncs when the last successful sync (recorded in the state directory,
//!   so restarts keep the schedule) is older than the interval;
//! - **heartbeats** tell the appliance the agent's version, last snapshot and running job,
//!   and the inventory whenever its digest differs from the one the appliance holds;
//! - **jobs** long-poll the appliance and run what it hands out, reporting progress every
//!   couple of seconds and then the outcome.
//!
//! Syncs and restores take the sync lock (a flock in the state directory), so they never
//! overlap with each other or with a manual `morgana-agent sync`. When the appliance is
//! unreachable each loop backs off (1 s doubling to 5 min, with jitter) and keeps trying:
//! the service never exits on its own. SIGTERM or SIGINT stop it: the current step is
//! abandoned (a sync commits nothing; a job is reported failed) and it exits 0.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::ProgressBar;
use morgana_core::Id;
use morgana_core::control::{Heartbeat, JobProgress, JobReport, JobState, MAX_JOB_WAIT_SECS};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::client::Client;
use crate::restore::Progress;
use crate::state::State;
use crate::sync::{self, last_sync, now_ms, sync_locked};

/// Sync interval when neither `--sync-every` nor a held policy sets one.
pub const DEFAULT_SYNC_EVERY: Duration = Duration::from_secs(60 * 60);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(60);
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// The schedule looks again at least this often (a manual sync or a new policy moves it).
const SCHEDULE_RECHECK: Duration = Duration::from_secs(60);
/// Longest job message sent; the appliance refuses longer ones.
const MAX_MESSAGE: usize = 8 * 1024;
/// Attempts to deliver a job's outcome before leaving it to the appliance to notice.
const REPORT_ATTEMPTS: u32 = 6;

pub struct Options {
    /// Overrides the policy's interval.
    pub sync_every: Option<Duration>,
    /// How to serve when the appliance gives this device the branch reflector role.
    pub reflector: crate::reflector::Settings,
}

/// What the loops share.
#[derive(Default)]
struct Shared {
    running_job: Mutex<Option<String>>,
}

impl Shared {
    fn running(&self) -> Option<String> {
        self.running_job
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_running(&self, job: Option<String>) {
        *self.running_job.lock().unwrap_or_else(|p| p.into_inner()) = job;
    }
}

/// Exponential backoff with jitter.
struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    fn new(cap: Duration) -> Backoff {
        Backoff {
            next: BACKOFF_FIRST,
            cap: cap.clamp(BACKOFF_FIRST, BACKOFF_MAX),
        }
    }

    /// The wait after one more failure: between half and all of the current step, so many
    /// agents that lost the appliance together do not return in lockstep.
    fn fail(&mut self) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(self.cap);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mix = u64::from(nanos ^ std::process::id().rotate_left(16))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let fraction = (mix >> 11) as f64 / (1u64 << 53) as f64;
        step.mul_f64(0.5 + 0.5 * fraction)
    }

    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }
}

/// Resolves once the service is told to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Sleeps `d`; true if the service was told to stop meanwhile.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = stopped(stop) => true,
        _ = tokio::time::sleep(d) => false,
    }
}

pub async fn run(state: State, opts: Options) -> anyhow::Result<()> {
    let device = state.device()?;
    // Two clients: the data client's byte counter measures what a sync sends, so control
    // traffic goes through its own.
    let data = Arc::new(Client::for_device(&state)?);
    let control = Arc::new(Client::for_device(&state)?);
    let shared = Arc::new(Shared::default());
    // An apply a kill interrupted is finished first; the heartbeat names it as running from
    // the start, so the appliance does not fail it as abandoned.
    let resume = crate::apply::pending(&state);
    if let Some(job) = &resume {
        warn!(job = %job.id, "resuming an interrupted layer apply");
        shared.set_running(Some(job.id.clone()));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let (role, reflector) = crate::reflector::supervisor(
        state.clone(),
        control.clone(),
        opts.reflector,
        stop_rx.clone(),
    );
    info!(device = %device.device_id, root = %device.root.display(), server = %device.server, "agent service started");
    // Joined, not spawned: the loops run on this task and stop together.
    tokio::join!(
        schedule(
            state.clone(),
            data.clone(),
            opts.sync_every,
            stop_rx.clone()
        ),
        heartbeats(
            state.clone(),
            control.clone(),
            shared.clone(),
            role,
            stop_rx.clone()
        ),
        reflector,
        jobs(state, data, control, shared, resume, stop_rx),
        async move {
            shutdown_signal().await;
            info!("stopping: abandoning the current step");
            let _ = stop_tx.send(true);
        },
    );
    info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot watch SIGTERM; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
    }
}

fn sync_every(state: &State, flag: Option<Duration>) -> Duration {
    flag.or_else(|| {
        crate::jobs::held_policy(state)
            .map(|p| Duration::from_secs(u64::from(p.sync_interval_secs.max(1))))
    })
    .unwrap_or(DEFAULT_SYNC_EVERY)
}

/// Scheduled syncs: whenever the last successful one is older than the interval.
async fn schedule(
    state: State,
    client: Arc<Client>,
    flag: Option<Duration>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(BACKOFF_MAX);
    let bar = ProgressBar::hidden();
    loop {
        let every = sync_every(&state, flag);
        backoff.cap = every.clamp(BACKOFF_FIRST, BACKOFF_MAX);
        let due_in = |state: &State| {
            let due =
                last_sync(state).map_or(0, |l| l.at_ms.saturating_add(every.as_millis() as i64));
            Duration::from_millis(due.saturating_sub(now_ms()).max(0) as u64)
        };
        let wait = due_in(&state);
        if !wait.is_zero() {
            if sleep_or_stop(&mut stop, wait.min(SCHEDULE_RECHECK)).await {
                return;
            }
            continue;
        }
        let lock = tokio::select! {
            _ = stopped(&mut stop) => return,
            l = sync::lock(&state, || info!("another sync is running; the scheduled sync waits")) => l,
        };
        let lock = match lock {
            Ok(l) => l,
            Err(e) => {
                let d = backoff.fail();
                warn!("cannot take the sync lock: {e:#}; retrying in {d:.1?}");
                if sleep_or_stop(&mut stop, d).await {
                    return;
                }
                continue;
            }
        };
        // The sync we waited for may have been the one due.
        if !due_in(&state).is_zero() {
            continue;
        }
        info!("scheduled sync starting");
        let result = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = sync_locked(&state, &client, "scheduled", &bar, &lock) => r,
        };
        drop(lock);
        match result {
            Ok(s) => {
                backoff.reset();
                info!(snapshot = %s.snapshot, files = s.files, bytes_sent = s.bytes_sent, "scheduled sync done; next in {every:?}");
            }
            Err(e) => {
                let d = backoff.fail();
                warn!("scheduled sync failed: {e:#}; retrying in {d:.1?}");
                if sleep_or_stop(&mut stop, d).await {
                    return;
                }
            }
        }
    }
}

async fn heartbeats(
    state: State,
    client: Arc<Client>,
    shared: Arc<Shared>,
    role: crate::reflector::RoleHandle,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(BACKOFF_MAX);
    // The inventory digest the appliance holds; unknown until the first reply.
    let mut held: Option<Id> = None;
    let mut every = DEFAULT_HEARTBEAT;
    loop {
        let inventory =
            tokio::task::spawn_blocking(|| crate::inventory::collect(&crate::inventory::root()))
                .await
                .unwrap_or_default();
        let changed = held != Some(inventory.digest());
        let beat = Heartbeat {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            inventory: changed.then_some(inventory),
            policy_version: crate::jobs::held_policy(&state).map(|p| p.version),
            running_job: shared.running(),
            last_snapshot: last_sync(&state).map(|l| l.created),
        };
        let result = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = client.heartbeat(&beat) => r,
        };
        let wait = match result {
            Ok(reply) => {
                if backoff.next > BACKOFF_FIRST {
                    info!("the appliance answers again");
                }
                backoff.reset();
                held = reply.inventory_digest;
                let held_policy = crate::jobs::held_policy(&state).map(|p| p.version);
                if held_policy != Some(reply.policy_version) {
                    // A new policy moves the schedule and the revert rules now, not only at
                    // the next sync.
                    match client.policy().await {
                        Ok(policy) => {
                            if let Err(e) = state.save_policy(&policy) {
                                warn!("cannot keep the new policy: {e}");
                            }
                        }
                        Err(e) => warn!(
                            "fetching the new policy failed: {e}; trying at the next heartbeat"
                        ),
                    }
                }
                every = Duration::from_secs(u64::from(reply.heartbeat_secs.max(1)));
                role.set(&state, reply.reflector, every);
                every
            }
            Err(e) => {
                let d = backoff.fail().min(every.max(BACKOFF_FIRST));
                warn!("heartbeat failed: {e}; retrying in {d:.1?}");
                d
            }
        };
        if sleep_or_stop(&mut stop, wait).await {
            return;
        }
    }
}

async fn jobs(
    state: State,
    data: Arc<Client>,
    control: Arc<Client>,
    shared: Arc<Shared>,
    resume: Option<morgana_core::control::Job>,
    mut stop: watch::Receiver<bool>,
) {
    if let Some(job) = resume
        && run_job(&state, &data, &control, &shared, job, &mut stop).await
    {
        return;
    }
    let mut backoff = Backoff::new(BACKOFF_MAX);
    loop {
        let polled = tokio::select! {
            _ = stopped(&mut stop) => return,
            r = control.next_job(MAX_JOB_WAIT_SECS) => r,
        };
        match polled {
            Ok(None) => backoff.reset(),
            Ok(Some(job)) => {
                backoff.reset();
                if run_job(&state, &data, &control, &shared, job, &mut stop).await {
                    return;
                }
            }
            Err(e) => {
                let d = backoff.fail();
                warn!("polling the appliance for jobs failed: {e}; retrying in {d:.1?}");
                if sleep_or_stop(&mut stop, d).await {
                    return;
                }
            }
        }
    }
}

/// Runs a job, reporting progress, then its outcome; true if the service was told to stop.
async fn run_job(
    state: &State,
    data: &Arc<Client>,
    control: &Arc<Client>,
    shared: &Shared,
    job: morgana_core::control::Job,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    info!(job = %job.id, kind = ?job.kind, "job started");
    shared.set_running(Some(job.id.clone()));
    let live = Arc::new(Progress::default());
    let bar = ProgressBar::hidden();
    let progress = |live: &Progress, bar: &ProgressBar| JobProgress {
        files_done: live.files.load(std::sync::atomic::Ordering::Relaxed),
        files_total: live.files_total.load(std::sync::atomic::Ordering::Relaxed),
        bytes_total: live.bytes_total.load(std::sync::atomic::Ordering::Relaxed),
        bytes_done: live
            .bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(bar.position()),
    };
    let outcome = {
        let work = crate::jobs::run(state, data, &job.id, &job.kind, &live, &bar);
        tokio::pin!(work);
        let mut ticks =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        loop {
            tokio::select! {
                r = &mut work => break Some(r),
                _ = stopped(stop) => break None,
                _ = ticks.tick() => {
                    let report = JobReport {
                        job_id: job.id.clone(),
                        state: JobState::Running,
                        progress: progress(&live, &bar),
                        message: String::new(),
                        files: None,
                    };
                    // Progress is best effort; the outcome is retried below.
                    if let Err(e) = control.report_job(&report).await {
                        warn!(job = %job.id, "cannot report progress: {e}");
                    }
                }
            }
        }
    };
    let stopping = outcome.is_none();
    let (job_state, mut message) = match outcome {
        Some(Ok(message)) => (JobState::Succeeded, message),
        Some(Err(e)) => (JobState::Failed, format!("{e:#}")),
        None => (
            JobState::Failed,
            "the agent service was stopped while running it; queue the job again".to_owned(),
        ),
    };
    match job_state {
        JobState::Succeeded => info!(job = %job.id, "job succeeded: {message}"),
        _ => warn!(job = %job.id, "job failed: {message}"),
    }
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    let report = JobReport {
        job_id: job.id.clone(),
        state: job_state,
        progress: progress(&live, &bar),
        message,
        files: live.results.lock().unwrap().take(),
    };
    let mut backoff = Backoff::new(Duration::from_secs(30));
    for attempt in 1..=REPORT_ATTEMPTS {
        match control.report_job(&report).await {
            Ok(()) => break,
            Err(e) if attempt == REPORT_ATTEMPTS || stopping => {
                warn!(job = %job.id, "cannot report the job's outcome: {e}; the appliance will mark it failed");
                break;
            }
            Err(e) => {
                let d = backoff.fail();
                warn!(job = %job.id, "cannot report the job's outcome: {e}; retrying in {d:.1?}");
                tokio::time::sleep(d).await;
            }
        }
    }
    // Only now: a heartbeat naming no job fails a running one.
    shared.set_running(None);
    stopping
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(8));
        let waits: Vec<Duration> = (0..6).map(|_| b.fail()).collect();
        for (w, step) in waits.iter().zip([1, 2, 4, 8, 8, 8]) {
            let step = Duration::from_secs(step);
            assert!(*w >= step / 2 && *w <= step, "{w:?} for step {step:?}");
        }
        b.reset();
        assert!(b.fail() <= BACKOFF_FIRST);
        // The cap never exceeds five minutes.
        assert_eq!(Backoff::new(Duration::from_secs(3600)).cap, BACKOFF_MAX);
    }
}
