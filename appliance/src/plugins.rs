//! Plugin management, once for the CLI (`morgana plugin`), the REST API and the
//! Administrator page: validate a component against its hook's world and store it as the
//! next version of its name, enable and disable versions. Every change is an audit event.

use std::path::Path;

use morgana_core::Id;
use morgana_core::plugin::Hook;
use morgana_core::plugin::host::{Limits, PluginHost};

use crate::catalog::{Catalog, CatalogError, NewPlugin, PluginRecord};
use crate::config::DataDir;
use crate::events::{self, NewEvent, Severity};

#[derive(Debug, thiserror::Error)]
pub enum PluginOpError {
    /// The component does not load for its hook (wrong world, missing export, not a
    /// component…): the host's own words, which name the hook and the missing piece.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{0}")]
    Internal(String),
}

/// Validates `bytes` for `hook` (compiling them into the cache, so the first call does not
/// pay for it), stores the component and records it as the next version of `name`;
/// enables it too when asked.
pub async fn add(
    catalog: &dyn Catalog,
    data: &DataDir,
    actor: &str,
    name: &str,
    hook: Hook,
    bytes: Vec<u8>,
    enable: bool,
) -> Result<PluginRecord, PluginOpError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(PluginOpError::Invalid(
            "the plugin name is empty: give the plugin a name".into(),
        ));
    }
    if name.chars().any(char::is_control) || name.len() > 100 {
        return Err(PluginOpError::Invalid(format!(
            "the plugin name {name:?} is not usable: use at most 100 printable characters"
        )));
    }
    let hash = Id::of(&bytes);
    let size = bytes.len() as u64;
    let path = data.plugins_dir().join(format!("{}.wasm", hash.to_hex()));
    {
        let (name, data, path) = (name.to_owned(), data.clone(), path.clone());
        tokio::task::spawn_blocking(move || {
            let host =
                PluginHost::new(Some(data.plugin_cache_dir()), Limits::default()).map_err(|e| {
                    PluginOpError::Internal(format!("cannot start the plugin host: {e}"))
                })?;
            host.load(&name, hook, &bytes)
                .map_err(|e| PluginOpError::Refused(e.to_string()))?;
            write_atomically(&path, &bytes).map_err(|e| {
                PluginOpError::Internal(format!(
                    "cannot store the component as {}: {e}",
                    path.display()
                ))
            })
        })
        .await
        .map_err(|e| {
            PluginOpError::Internal(format!("the plugin validation thread failed: {e}"))
        })??;
    }
    let record = catalog
        .add_plugin(&NewPlugin {
            name: name.to_owned(),
            hook,
            hash,
            size,
            added: crate::clock::rfc3339_ms(crate::clock::now_ms()),
        })
        .await?;
    audit(
        catalog,
        actor,
        "plugin.added",
        format!(
            "plugin {} ({} v{}, {} bytes) added for {}",
            record.id, record.name, record.version, record.size, record.hook
        ),
    )
    .await;
    if enable {
        return set_enabled(catalog, data, actor, record.id, true).await;
    }
    Ok(record)
}

/// Makes plugin `id` the active one of its hook (`on`), or switches it off. A component
/// that no longer loads is never switched on.
pub async fn set_enabled(
    catalog: &dyn Catalog,
    data: &DataDir,
    actor: &str,
    id: i64,
    on: bool,
) -> Result<PluginRecord, PluginOpError> {
    let record = if on {
        let Some(record) = catalog.plugin(id).await? else {
            return Err(CatalogError::PluginUnknown(id).into());
        };
        check_loads(data, &record)
            .await
            .map_err(|e| PluginOpError::Refused(format!("not enabling plugin {id}: {e:#}")))?;
        catalog.enable_plugin(id).await?
    } else {
        catalog.disable_plugin(id).await?
    };
    let (kind, what) = if on {
        ("plugin.enabled", "is now the active plugin of")
    } else {
        (
            "plugin.disabled",
            "is off; the built-in answers unless another is enabled on",
        )
    };
    audit(
        catalog,
        actor,
        kind,
        format!(
            "plugin {} ({} v{}) {what} {}",
            record.id, record.name, record.version, record.hook
        ),
    )
    .await;
    Ok(record)
}

/// Loads a stored plugin version through the host (compiled code from the cache), to
/// check that it still does.
pub async fn check_loads(data: &DataDir, record: &PluginRecord) -> anyhow::Result<()> {
    let (data, record) = (data.clone(), record.clone());
    tokio::task::spawn_blocking(move || {
        let host = PluginHost::new(Some(data.plugin_cache_dir()), Limits::default())?;
        crate::hooks::load_stored(&data, &host, &record).map(drop)
    })
    .await
    .map_err(|e| anyhow::anyhow!("the plugin loading thread failed: {e}"))?
}

async fn audit(catalog: &dyn Catalog, actor: &str, kind: &str, message: String) {
    events::record(
        catalog,
        NewEvent::system(kind, Severity::Info, message).by(actor),
    )
    .await;
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
