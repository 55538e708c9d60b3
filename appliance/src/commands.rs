//! The `morgana` subcommands, one module per verb.

pub mod check;
pub mod device;
pub mod enroll_token;
pub mod events;
pub mod gc;
pub mod job;
pub mod plugin;
pub mod serve;
pub mod snapshot;
