//! The plugin hooks as the appliance calls them: the active plugin when one is set, the
//! built-in otherwise and whenever the plugin fails. A failure never reaches the caller as
//! an error; it becomes a `plugin.failed` event (at most one a minute per plugin, so a
//! broken plugin asked thousands of times in one capture does not flood the log).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use morgana_core::Id;
use morgana_core::plugin::host::{Limits, Plugin, PluginHost};
use morgana_core::plugin::types::{
    Disposition, DriverProfile, FileEntry, HardwareInventory, LayerContext, ProfileMatch,
};
use morgana_core::plugin::{
    BuiltinDriverMatcher, BuiltinLayerRules, DriverMatcher, Fallback, Hook, LayerRules,
    PluginError, PluginFailure,
};

use crate::catalog::{Catalog, PluginRecord};
use crate::config::DataDir;
use crate::events::{self, NewEvent, Severity};

/// Quiet time between two `plugin.failed` events for the same plugin version.
const FAILURE_EVENT_EVERY_MS: i64 = 60_000;

pub struct Hooks {
    catalog: Arc<dyn Catalog>,
    data: DataDir,
    loaded: Mutex<HashMap<Hook, (i64, Arc<Plugin>)>>,
    last_failure_event: Mutex<HashMap<i64, i64>>,
}

/// Where a plugin version's component is kept (named by its hash, so versions never clash).
pub fn stored_path(data: &DataDir, record: &PluginRecord) -> std::path::PathBuf {
    data.plugins_dir()
        .join(format!("{}.wasm", record.hash.to_hex()))
}

/// Reads a stored plugin version and loads it through `host` (compiled code comes from the
/// cache when it is there).
pub fn load_stored(
    data: &DataDir,
    host: &PluginHost,
    record: &PluginRecord,
) -> anyhow::Result<Plugin> {
    let path = stored_path(data, record);
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "cannot read plugin {} ({} v{}) from {}: add the component again with \
             `morgana plugin add`",
            record.id,
            record.name,
            record.version,
            path.display()
        )
    })?;
    if Id::of(&bytes) != record.hash {
        bail!(
            "{} does not hold plugin {} ({} v{}) any more (its hash changed): add the \
             component again with `morgana plugin add`",
            path.display(),
            record.id,
            record.name,
            record.version
        );
    }
    Ok(host.load(&record.name, record.hook, &bytes)?)
}

/// A loaded plugin shared between calls, answering as the hook it was loaded for.
struct Loaded(Arc<Plugin>);

impl LayerRules for Loaded {
    fn classify(
        &self,
        context: &LayerContext,
        entries: &[FileEntry],
    ) -> Result<Vec<Disposition>, PluginError> {
        match self.0.as_ref() {
            Plugin::LayerRules(p) => p.classify(context, entries),
            other => Err(PluginError::Host {
                doing: "calling the layer-rules hook",
                detail: format!("the active plugin was loaded for {}", other.hook()),
            }),
        }
    }
}

impl DriverMatcher for Loaded {
    fn match_profiles(
        &self,
        inventory: &HardwareInventory,
        profiles: &[DriverProfile],
    ) -> Result<Vec<ProfileMatch>, PluginError> {
        match self.0.as_ref() {
            Plugin::DriverMatcher(p) => p.match_profiles(inventory, profiles),
            other => Err(PluginError::Host {
                doing: "calling the driver-matcher hook",
                detail: format!("the active plugin was loaded for {}", other.hook()),
            }),
        }
    }
}

impl Hooks {
    pub fn new(catalog: Arc<dyn Catalog>, data: DataDir) -> Hooks {
        Hooks {
            catalog,
            data,
            loaded: Mutex::new(HashMap::new()),
            last_failure_event: Mutex::new(HashMap::new()),
        }
    }

    /// The plugin active on `hook`, loaded once per version; `None` when there is none or
    /// it cannot be loaded (then an event says why).
    async fn active(&self, hook: Hook) -> Option<(PluginRecord, Arc<Plugin>)> {
        let record = match self.catalog.active_plugin(hook).await {
            Ok(Some(r)) => r,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(%hook, error = %e, "cannot read the active plugin; using the built-in");
                return None;
            }
        };
        if let Some((id, plugin)) = self.loaded.lock().expect("hooks lock").get(&hook)
            && *id == record.id
        {
            return Some((record, plugin.clone()));
        }
        let (data, rec) = (self.data.clone(), record.clone());
        let loaded = tokio::task::spawn_blocking(move || {
            let host = PluginHost::new(Some(data.plugin_cache_dir()), Limits::default())?;
            load_stored(&data, &host, &rec)
        })
        .await;
        match loaded {
            Ok(Ok(plugin)) => {
                let plugin = Arc::new(plugin);
                self.loaded
                    .lock()
                    .expect("hooks lock")
                    .insert(hook, (record.id, plugin.clone()));
                Some((record, plugin))
            }
            Ok(Err(e)) => {
                let failure = PluginFailure {
                    hook,
                    plugin: record.name.clone(),
                    message: format!("{e:#}"),
                };
                self.failed(&record, &failure).await;
                None
            }
            Err(e) => {
                tracing::warn!(%hook, error = %e, "loading a plugin panicked; using the built-in");
                None
            }
        }
    }

    pub fn data(&self) -> &DataDir {
        &self.data
    }

    async fn failed(&self, record: &PluginRecord, failure: &PluginFailure) {
        self.record_failure(record, failure, "the appliance").await;
    }

    /// A plugin that failed where it runs (`on`: the appliance, or a device for the agent-side
    /// hooks): a `plugin.failed` event, at most one a minute per plugin version.
    pub async fn record_failure(&self, record: &PluginRecord, failure: &PluginFailure, on: &str) {
        let now = crate::clock::now_ms();
        {
            let mut last = self.last_failure_event.lock().expect("hooks lock");
            if last
                .get(&record.id)
                .is_some_and(|t| now - t < FAILURE_EVENT_EVERY_MS)
            {
                return;
            }
            last.insert(record.id, now);
        }
        events::record(
            self.catalog.as_ref(),
            NewEvent::system(
                "plugin.failed",
                Severity::Warning,
                format!(
                    "plugin {} v{} ({}) failed on {on} and the built-in answered instead: {}; \
                     fix or disable it with `morgana plugin disable {}`",
                    record.name, record.version, failure.hook, failure.message, record.id
                ),
            ),
        )
        .await;
    }

    /// Where each file belongs, one disposition per entry.
    pub async fn classify(
        &self,
        context: LayerContext,
        entries: Vec<FileEntry>,
    ) -> Result<Vec<Disposition>, PluginError> {
        let active = self.active(Hook::LayerRules).await;
        let plugin = active.as_ref().map(|(_, p)| Loaded(p.clone()));
        let decision = tokio::task::spawn_blocking(move || {
            Fallback::new(plugin, BuiltinLayerRules).classify(&context, &entries)
        })
        .await
        .map_err(|e| PluginError::Host {
            doing: "running the layer-rules hook",
            detail: e.to_string(),
        })??;
        if let (Some(failure), Some((record, _))) = (&decision.failure, &active) {
            self.failed(record, failure).await;
        }
        Ok(decision.value)
    }

    /// The profiles that apply to a device with `inventory`, each with the reason.
    pub async fn match_profiles(
        &self,
        inventory: HardwareInventory,
        profiles: Vec<DriverProfile>,
    ) -> Result<Vec<ProfileMatch>, PluginError> {
        let active = self.active(Hook::DriverMatcher).await;
        let plugin = active.as_ref().map(|(_, p)| Loaded(p.clone()));
        let decision = tokio::task::spawn_blocking(move || {
            Fallback::new(plugin, BuiltinDriverMatcher).match_profiles(&inventory, &profiles)
        })
        .await
        .map_err(|e| PluginError::Host {
            doing: "running the driver-matcher hook",
            detail: e.to_string(),
        })??;
        if let (Some(failure), Some((record, _))) = (&decision.failure, &active) {
            self.failed(record, failure).await;
        }
        Ok(decision.value)
    }
}
