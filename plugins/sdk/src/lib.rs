//! The Morgana plugin SDK: implement one trait, call one macro, build for `wasm32-wasip2`.
//!
//! ```ignore
//! use morgana_plugin_sdk::layer_rules::*;
//!
//! struct Mine;
//! impl LayerRules for Mine {
//!     fn classify(_: &LayerContext, entry: &FileEntry) -> Result<Disposition, String> {
//!         Ok(if entry.path.starts_with("/srv/") { Disposition::user_area() } else { Disposition::layer() })
//!     }
//! }
//! morgana_plugin_sdk::export_layer_rules!(Mine);
//! ```
//!
//! Enable exactly one of the features `driver-matcher`, `layer-rules`,
//! `reflector-selector`: a component implements one hook.

#[cfg(any(
    all(feature = "driver-matcher", feature = "layer-rules"),
    all(feature = "driver-matcher", feature = "reflector-selector"),
    all(feature = "layer-rules", feature = "reflector-selector"),
))]
compile_error!(
    "enable one hook feature of morgana-plugin-sdk per plugin crate (a component implements \
     one world); if several crates build together, build them with separate `cargo build -p`"
);

#[cfg(not(any(
    feature = "driver-matcher",
    feature = "layer-rules",
    feature = "reflector-selector"
)))]
compile_error!(
    "enable the hook your plugin implements: features = [\"driver-matcher\"], \
     [\"layer-rules\"] or [\"reflector-selector\"]"
);

#[cfg(feature = "driver-matcher")]
pub mod driver_matcher;
#[cfg(feature = "layer-rules")]
pub mod layer_rules;
#[cfg(feature = "reflector-selector")]
pub mod reflector_selector;

/// Messages into Morgana's log for the current call (shown by `morgana plugin test`).
pub mod log {
    #[cfg(feature = "driver-matcher")]
    use crate::driver_matcher::bindings::morgana::plugins::log as raw;
    #[cfg(all(feature = "layer-rules", not(feature = "driver-matcher")))]
    use crate::layer_rules::bindings::morgana::plugins::log as raw;
    #[cfg(all(
        feature = "reflector-selector",
        not(any(feature = "driver-matcher", feature = "layer-rules"))
    ))]
    use crate::reflector_selector::bindings::morgana::plugins::log as raw;

    pub fn debug(message: &str) {
        raw::log(raw::Level::Debug, message);
    }
    pub fn info(message: &str) {
        raw::log(raw::Level::Info, message);
    }
    pub fn warn(message: &str) {
        raw::log(raw::Level::Warn, message);
    }
    pub fn error(message: &str) {
        raw::log(raw::Level::Error, message);
    }
}
