//! `morgana-agent run`: the endpoint service (see `service`).

use std::path::PathBuf;
use std::time::Duration;

use crate::service::{self, Options};
use crate::state::State;

pub async fn run(
    state_dir: Option<PathBuf>,
    sync_every: Option<Duration>,
    reflector: crate::reflector::Settings,
) -> anyhow::Result<()> {
    let state = State::open(state_dir)?;
    // Fail at once, with the enrolment hint, rather than inside a loop.
    state.device()?;
    crate::distribution::enable_mdns(reflector.mdns);
    service::run(
        state,
        Options {
            sync_every,
            reflector,
        },
    )
    .await
}
