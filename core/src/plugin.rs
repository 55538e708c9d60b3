//! Plugin hooks: the three policy points partners can replace with a WASM component
//! (`wit/` holds the contract), each a Rust trait with a built-in implementation in plain
//! Rust and, with the `plugin-host` feature, a plugin-backed one running under wasmtime.
//!
//! Callers hold a [`Fallback`]: it asks the plugin when one is active and, when the plugin
//! fails in any way, answers with the built-in and hands back a [`PluginFailure`] for the
//! event log. A broken plugin therefore degrades a decision, never the process.

pub mod driver;
pub mod layer;
pub mod reflector;
pub mod types;

#[cfg(feature = "plugin-host")]
pub mod host;

use std::fmt;
use std::str::FromStr;

pub use driver::BuiltinDriverMatcher;
pub use layer::BuiltinLayerRules;
pub use reflector::BuiltinReflectorSelector;
use types::{
    ClientInfo, Disposition, DriverProfile, FileEntry, HardwareInventory, LayerContext,
    ProfileMatch, ReflectorCandidate, SelectorPolicy,
};

/// A hook point, named as its WIT world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    DriverMatcher,
    LayerRules,
    ReflectorSelector,
}

impl Hook {
    pub const ALL: [Hook; 3] = [
        Hook::DriverMatcher,
        Hook::LayerRules,
        Hook::ReflectorSelector,
    ];

    /// The WIT world (and CLI) name.
    pub fn name(self) -> &'static str {
        match self {
            Hook::DriverMatcher => "driver-matcher",
            Hook::LayerRules => "layer-rules",
            Hook::ReflectorSelector => "reflector-selector",
        }
    }

    /// The interface a component must export for this hook, fully qualified.
    pub fn export_interface(self) -> &'static str {
        match self {
            Hook::DriverMatcher => "morgana:plugins/driver-matching@0.1.0",
            Hook::LayerRules => "morgana:plugins/layer-classification@0.1.0",
            Hook::ReflectorSelector => "morgana:plugins/reflector-ranking@0.1.0",
        }
    }

    /// The function inside [`Hook::export_interface`] Morgana calls.
    pub fn export_function(self) -> &'static str {
        match self {
            Hook::DriverMatcher => "match-profiles",
            Hook::LayerRules => "classify",
            Hook::ReflectorSelector => "rank",
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Hook {
    type Err = String;
    fn from_str(s: &str) -> Result<Hook, String> {
        Hook::ALL
            .into_iter()
            .find(|h| h.name() == s)
            .ok_or_else(|| {
                format!(
                    "`{s}` is not a hook: use one of driver-matcher, layer-rules, reflector-selector"
                )
            })
    }
}

/// Everything that can go wrong loading or calling a plugin. Every variant names the
/// plugin and the hook, so the event log says which one to fix or disable.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(
        "plugin {plugin} ({hook}) is not a valid component: {detail}; build it with \
         `cargo build --release --target wasm32-wasip2` against the `{hook}` world in wit/"
    )]
    Invalid {
        plugin: String,
        hook: Hook,
        detail: String,
    },
    #[error(
        "plugin {plugin} does not fit the `{hook}` world: {detail}; rebuild it against \
         `world {hook}` in wit/worlds.wit or add it with the --hook it was built for"
    )]
    WrongWorld {
        plugin: String,
        hook: Hook,
        detail: String,
    },
    #[error(
        "plugin {plugin} ({hook}) ran out of fuel ({limit} units) in one call: it loops or \
         does too much work per call; fix the plugin or raise the fuel limit"
    )]
    OutOfFuel {
        plugin: String,
        hook: Hook,
        limit: u64,
    },
    #[error(
        "plugin {plugin} ({hook}) ran past its deadline of {limit_ms} ms in one call: it \
         blocks or loops; fix the plugin or raise the deadline"
    )]
    Deadline {
        plugin: String,
        hook: Hook,
        limit_ms: u64,
    },
    #[error(
        "plugin {plugin} ({hook}) tried to grow its memory past the limit of {limit} bytes; \
         fix its allocation or raise the memory limit"
    )]
    MemoryLimit {
        plugin: String,
        hook: Hook,
        limit: usize,
    },
    #[error("plugin {plugin} ({hook}) trapped: {detail}; the instance was dropped")]
    Trap {
        plugin: String,
        hook: Hook,
        detail: String,
    },
    #[error("plugin {plugin} ({hook}) reported an error: {message}")]
    Failed {
        plugin: String,
        hook: Hook,
        message: String,
    },
    #[error("plugin {plugin} ({hook}) returned a malformed result: {detail}")]
    Malformed {
        plugin: String,
        hook: Hook,
        detail: String,
    },
    #[error("plugin host cannot {doing}: {detail}")]
    Host { doing: &'static str, detail: String },
}

impl PluginError {
    /// The plugin the error is about, if it is about one.
    pub fn plugin(&self) -> Option<&str> {
        match self {
            PluginError::Invalid { plugin, .. }
            | PluginError::WrongWorld { plugin, .. }
            | PluginError::OutOfFuel { plugin, .. }
            | PluginError::Deadline { plugin, .. }
            | PluginError::MemoryLimit { plugin, .. }
            | PluginError::Trap { plugin, .. }
            | PluginError::Failed { plugin, .. }
            | PluginError::Malformed { plugin, .. } => Some(plugin),
            PluginError::Host { .. } => None,
        }
    }
}

/// Which driver profiles apply to a device.
pub trait DriverMatcher {
    fn match_profiles(
        &self,
        inventory: &HardwareInventory,
        profiles: &[DriverProfile],
    ) -> Result<Vec<ProfileMatch>, PluginError>;
}

/// Where each file of a layer belongs; one disposition per entry, in order.
pub trait LayerRules {
    fn classify(
        &self,
        context: &LayerContext,
        entries: &[FileEntry],
    ) -> Result<Vec<Disposition>, PluginError>;
}

/// Reflector ids to fetch from, best first; empty means the server.
pub trait ReflectorSelector {
    fn rank(
        &self,
        client: &ClientInfo,
        policy: &SelectorPolicy,
        candidates: &[ReflectorCandidate],
    ) -> Result<Vec<String>, PluginError>;
}

/// An event-like record of a plugin that failed and was replaced by the built-in for one
/// decision; the caller writes it to the event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginFailure {
    pub hook: Hook,
    /// The plugin's name, or empty when the error is the host's own.
    pub plugin: String,
    /// The full error, as a person reads it.
    pub message: String,
}

impl PluginFailure {
    fn new(hook: Hook, error: &PluginError) -> PluginFailure {
        PluginFailure {
            hook,
            plugin: error.plugin().unwrap_or_default().to_string(),
            message: error.to_string(),
        }
    }
}

/// A decision and, when the plugin failed and the built-in answered instead, why.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision<T> {
    pub value: T,
    pub failure: Option<PluginFailure>,
}

/// A hook as callers use it: the active plugin if any, the built-in otherwise and whenever
/// the plugin fails.
pub struct Fallback<P, B> {
    pub plugin: Option<P>,
    pub builtin: B,
}

impl<P, B> Fallback<P, B> {
    pub fn new(plugin: Option<P>, builtin: B) -> Self {
        Fallback { plugin, builtin }
    }

    fn decide<T>(
        &self,
        hook: Hook,
        via_plugin: impl FnOnce(&P) -> Result<T, PluginError>,
        via_builtin: impl FnOnce(&B) -> Result<T, PluginError>,
    ) -> Result<Decision<T>, PluginError> {
        let failure = match &self.plugin {
            None => None,
            Some(p) => match via_plugin(p) {
                Ok(value) => {
                    return Ok(Decision {
                        value,
                        failure: None,
                    });
                }
                Err(e) => Some(PluginFailure::new(hook, &e)),
            },
        };
        Ok(Decision {
            value: via_builtin(&self.builtin)?,
            failure,
        })
    }
}

impl<P: DriverMatcher, B: DriverMatcher> Fallback<P, B> {
    pub fn match_profiles(
        &self,
        inventory: &HardwareInventory,
        profiles: &[DriverProfile],
    ) -> Result<Decision<Vec<ProfileMatch>>, PluginError> {
        self.decide(
            Hook::DriverMatcher,
            |p| p.match_profiles(inventory, profiles),
            |b| b.match_profiles(inventory, profiles),
        )
    }
}

impl<P: LayerRules, B: LayerRules> Fallback<P, B> {
    pub fn classify(
        &self,
        context: &LayerContext,
        entries: &[FileEntry],
    ) -> Result<Decision<Vec<Disposition>>, PluginError> {
        self.decide(
            Hook::LayerRules,
            |p| p.classify(context, entries),
            |b| b.classify(context, entries),
        )
    }
}

impl<P: ReflectorSelector, B: ReflectorSelector> Fallback<P, B> {
    pub fn rank(
        &self,
        client: &ClientInfo,
        policy: &SelectorPolicy,
        candidates: &[ReflectorCandidate],
    ) -> Result<Decision<Vec<String>>, PluginError> {
        self.decide(
            Hook::ReflectorSelector,
            |p| p.rank(client, policy, candidates),
            |b| b.rank(client, policy, candidates),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::types::{FileKind, LayerKind};
    use super::*;

    struct Broken;
    impl LayerRules for Broken {
        fn classify(
            &self,
            _: &LayerContext,
            _: &[FileEntry],
        ) -> Result<Vec<Disposition>, PluginError> {
            Err(PluginError::Trap {
                plugin: "broken".into(),
                hook: Hook::LayerRules,
                detail: "wasm trap: unreachable".into(),
            })
        }
    }

    /// `wit/since_v0.1.0/` is the released contract; `wit/` may only differ from it once
    /// its package version has moved on.
    #[test]
    fn released_contract_is_frozen() {
        let wit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
        let frozen = wit.join("since_v0.1.0");
        let worlds = std::fs::read_to_string(wit.join("worlds.wit")).unwrap();
        let mut files = 0;
        for entry in std::fs::read_dir(&frozen).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "wit") {
                continue;
            }
            files += 1;
            let name = path.file_name().unwrap();
            let released = std::fs::read_to_string(&path).unwrap();
            if worlds.starts_with("package morgana:plugins@0.1.0;") {
                let current = std::fs::read_to_string(wit.join(name)).unwrap_or_default();
                assert!(
                    current == released,
                    "wit/{} differs from the released 0.1.0 contract in wit/since_v0.1.0/: \
                     released versions never change; raise the package version for a new one",
                    name.to_string_lossy()
                );
            }
        }
        let current = std::fs::read_dir(&wit)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "wit")
            })
            .count();
        assert_eq!(files, current, "every released file is frozen, and no more");
    }

    #[test]
    fn hook_names_round_trip() {
        for h in Hook::ALL {
            assert_eq!(h.name().parse::<Hook>(), Ok(h));
        }
        assert!(
            "drivers"
                .parse::<Hook>()
                .unwrap_err()
                .contains("layer-rules")
        );
    }

    #[test]
    fn a_failing_plugin_falls_back_to_the_builtin_and_says_why() {
        let ctx = LayerContext {
            layer_name: "base".into(),
            kind: LayerKind::Base,
            os: "debian 12".into(),
        };
        let entries = [FileEntry {
            path: "/etc/hostname".into(),
            kind: FileKind::File,
            size: 6,
            mode: 0o100644,
        }];
        let hook = Fallback::new(Some(Broken), BuiltinLayerRules);
        let d = hook.classify(&ctx, &entries).unwrap();
        assert_eq!(d.value, vec![layer::classify_path("/etc/hostname")]);
        let failure = d.failure.expect("failure recorded");
        assert_eq!(failure.plugin, "broken");
        assert_eq!(failure.hook, Hook::LayerRules);
        assert!(failure.message.contains("trapped"), "{}", failure.message);

        let none: Fallback<Broken, _> = Fallback::new(None, BuiltinLayerRules);
        assert_eq!(none.classify(&ctx, &entries).unwrap().failure, None);
    }
}
