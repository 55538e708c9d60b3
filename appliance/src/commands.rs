//! The `morgana` subcommands, one module per verb.

pub mod check;
pub mod enroll_token;
pub mod events;
pub mod gc;
pub mod plugin;
pub mod serve;
pub mod snapshot;
pub mod user;
