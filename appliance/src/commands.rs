//! The `morgana` subcommands, one module per verb.

pub mod alerts;
pub mod check;
pub mod device;
pub mod driver;
pub mod enroll_token;
pub mod events;
pub mod gc;
pub mod group;
pub mod job;
pub mod layer;
pub mod plugin;
pub mod policy;
pub mod reflector;
pub mod serve;
pub mod snapshot;
pub mod user;
