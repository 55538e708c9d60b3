//! `morgana plugin …`: add, list, enable, disable and test WASM plugins.
//!
//! Adding, enabling and disabling go through [`crate::plugins`], as the REST API and the
//! Administrator page do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use morgana_core::plugin::Hook;
use morgana_core::plugin::host::{Limits, PluginHost};

use crate::catalog::{Catalog, PluginRecord, SqliteCatalog};
use crate::config::{DEFAULT_DATA_DIR, DataDir};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Validate a component against a hook's world and store it as the next version of its
    /// name (inactive until enabled).
    Add(AddArgs),
    /// List every stored plugin version.
    List(DirArgs),
    /// Make a plugin the active one on its hook (the previous one is switched off).
    Enable(IdArgs),
    /// Switch a plugin off: its hook falls back to the built-in behaviour.
    Disable(IdArgs),
    /// Run one call of a component on a JSON input and print the result, fuel and time.
    Test(TestArgs),
}

#[derive(Debug, clap::Args)]
pub struct DirArgs {
    #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// The component (.wasm) built for wasm32-wasip2 against the hook's world.
    pub file: PathBuf,
    /// driver-matcher, layer-rules or reflector-selector.
    #[arg(long)]
    pub hook: Hook,
    /// Name to version it under (default: the file name without extension).
    #[arg(long)]
    pub name: Option<String>,
    /// Make it the active plugin of its hook right away.
    #[arg(long)]
    pub enable: bool,
    #[command(flatten)]
    pub dir: DirArgs,
}

#[derive(Debug, clap::Args)]
pub struct IdArgs {
    /// The plugin's id, as `morgana plugin list` shows it.
    pub id: i64,
    #[command(flatten)]
    pub dir: DirArgs,
}

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// The component (.wasm) to try; it is not stored.
    pub file: PathBuf,
    /// driver-matcher, layer-rules or reflector-selector.
    #[arg(long)]
    pub hook: Hook,
    /// JSON input of the hook (see plugins/README.md for each hook's shape).
    #[arg(long, value_name = "FILE.json")]
    pub input: PathBuf,
    /// Fuel for the call (about one unit per wasm instruction).
    #[arg(long, default_value_t = Limits::default().fuel)]
    pub fuel: u64,
    /// Wall-clock limit for the call, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = Limits::default().deadline.as_millis() as u64)]
    pub deadline_ms: u64,
    /// Memory limit for the instance, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = (Limits::default().memory_bytes >> 20) as u64)]
    pub memory_mib: u64,
}

pub async fn run(cmd: Command) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match cmd {
        Command::Add(a) => add(a).await.map(|()| ExitCode::SUCCESS),
        Command::List(a) => list(a).await.map(|()| ExitCode::SUCCESS),
        Command::Enable(a) => switch(a, true).await.map(|()| ExitCode::SUCCESS),
        Command::Disable(a) => switch(a, false).await.map(|()| ExitCode::SUCCESS),
        // Compiling and calling is CPU-bound work: keep it off the async workers.
        Command::Test(a) => tokio::task::spawn_blocking(move || test(a))
            .await
            .context("the plugin test thread panicked")?,
    }
}

/// Plugin commands may run before `serve` ever did: they create the catalog, not the CA.
async fn open_catalog(dir: &Path) -> anyhow::Result<(DataDir, SqliteCatalog)> {
    let data = DataDir::new(dir);
    std::fs::create_dir_all(data.root())
        .with_context(|| format!("cannot create the data directory {}", data.root().display()))?;
    let catalog = SqliteCatalog::open(&data.catalog(), true).await?;
    Ok((data, catalog))
}

fn read_component(file: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(file).with_context(|| {
        format!(
            "cannot read the plugin component {}: check the path",
            file.display()
        )
    })
}

fn default_name(file: &Path) -> anyhow::Result<String> {
    let name = file
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .with_context(|| {
            format!(
                "cannot take a plugin name from {}: give one with --name",
                file.display()
            )
        })?;
    Ok(name.to_string())
}

async fn add(args: AddArgs) -> anyhow::Result<()> {
    let bytes = read_component(&args.file)?;
    let name = match args.name {
        Some(n) if !n.trim().is_empty() => n.trim().to_string(),
        Some(_) => bail!("--name is empty: give the plugin a name"),
        None => default_name(&args.file)?,
    };
    let (data, catalog) = open_catalog(&args.dir.data_dir).await?;
    let added =
        crate::plugins::add(&catalog, &data, "cli", &name, args.hook, bytes, args.enable).await;
    catalog.close().await;
    let record = added.with_context(|| format!("refusing {}", args.file.display()))?;
    println!(
        "added plugin {}: {} v{} on {} ({} bytes), {}",
        record.id,
        record.name,
        record.version,
        record.hook,
        record.size,
        if record.active {
            "active".to_string()
        } else {
            format!(
                "inactive: enable it with `morgana plugin enable {}`",
                record.id
            )
        }
    );
    Ok(())
}

async fn list(args: DirArgs) -> anyhow::Result<()> {
    let (_, catalog) = open_catalog(&args.data_dir).await?;
    let plugins = catalog.plugins().await?;
    catalog.close().await;
    if plugins.is_empty() {
        println!(
            "no plugins: every hook uses the built-in; add one with `morgana plugin add FILE --hook HOOK`"
        );
        return Ok(());
    }
    println!(
        "{:>4}  {:<18}  {:<24}  {:>7}  {:<8}  {:>9}  {:<24}  HASH",
        "ID", "HOOK", "NAME", "VERSION", "STATE", "BYTES", "ADDED"
    );
    for p in &plugins {
        print_row(p);
    }
    Ok(())
}

fn print_row(p: &PluginRecord) {
    println!(
        "{:>4}  {:<18}  {:<24}  {:>7}  {:<8}  {:>9}  {:<24}  {}",
        p.id,
        p.hook.name(),
        p.name,
        p.version,
        if p.active { "active" } else { "inactive" },
        p.size,
        p.added,
        &p.hash.to_hex()[..16]
    );
}

/// Checks (and compiles into the cache) the active plugin of every hook; a broken one is
/// reported, and its hook uses the built-in.
pub async fn check_active(catalog: &dyn Catalog, data: &DataDir) {
    for hook in Hook::ALL {
        match catalog.active_plugin(hook).await {
            Ok(None) => {}
            Ok(Some(record)) => match crate::plugins::check_loads(data, &record).await {
                Ok(()) => tracing::info!(
                    hook = %hook, plugin = %record.name, version = record.version,
                    "plugin active"
                ),
                Err(e) => tracing::warn!(
                    hook = %hook, plugin = %record.name, error = %format!("{e:#}"),
                    "active plugin cannot load: the built-in is used"
                ),
            },
            Err(e) => tracing::warn!(hook = %hook, error = %e, "cannot read the active plugin"),
        }
    }
}

async fn switch(args: IdArgs, on: bool) -> anyhow::Result<()> {
    let (data, catalog) = open_catalog(&args.dir.data_dir).await?;
    let switched = crate::plugins::set_enabled(&catalog, &data, "cli", args.id, on).await;
    catalog.close().await;
    let record = switched?;
    if on {
        println!(
            "plugin {} ({} v{}) is now the active {}",
            record.id, record.name, record.version, record.hook
        );
    } else {
        println!(
            "plugin {} ({} v{}) is off: {} uses the built-in unless another is enabled",
            record.id, record.name, record.version, record.hook
        );
    }
    Ok(())
}

fn test(args: TestArgs) -> anyhow::Result<std::process::ExitCode> {
    let bytes = read_component(&args.file)?;
    let name = default_name(&args.file)?;
    let input = std::fs::read_to_string(&args.input)
        .with_context(|| format!("cannot read the test input {}", args.input.display()))?;
    let limits = Limits {
        fuel: args.fuel,
        deadline: Duration::from_millis(args.deadline_ms),
        memory_bytes: usize::try_from(args.memory_mib.saturating_mul(1 << 20))
            .unwrap_or(usize::MAX),
        ..Limits::default()
    };
    // No cache: a partner iterating on a component rebuilds it every time.
    let host = PluginHost::new(None, limits)?;
    let plugin = host
        .load(&name, args.hook, &bytes)
        .with_context(|| format!("cannot load {}", args.file.display()))?;
    let call = plugin.run_json(&input).with_context(|| {
        format!(
            "{} is not a valid {} input; see plugins/README.md for its JSON shape",
            args.input.display(),
            args.hook
        )
    })?;
    let ok = call.result.is_ok();
    let mut out = serde_json::json!({
        "plugin": name,
        "hook": args.hook.name(),
        "ok": ok,
        "fuel_used": call.report.fuel_used,
        "elapsed_us": call.report.elapsed_us,
        "log": call.report.log,
        "output": call.report.output,
    });
    match call.result {
        Ok(v) => out["result"] = v,
        Err(e) => out["error"] = serde_json::Value::String(e.to_string()),
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    // 1 = the plugin failed the call (the JSON says how); 2 = this command itself failed.
    Ok(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    })
}
