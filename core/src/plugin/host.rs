//! The WASM plugin host: wasmtime's component model, one engine per process, compiled
//! components cached on disk, and every call under a fuel limit, an epoch deadline and a
//! memory limit.
//!
//! A plugin keeps one live instance between calls (instantiating costs ~20× a call); the
//! first error of any kind other than the plugin's own `err(...)` drops that instance, and
//! the next call starts from a fresh one. Guests get the `log` import and an empty WASI
//! context (wasip2 std guests import wasi interfaces even if they never use them): no
//! preopened directories, no environment, no network, clocks frozen at zero, stdout and
//! stderr into a capped buffer.

mod bindings;
mod cache;
mod convert;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

use super::types::{
    ClientInfo, Disposition, DriverMatcherInput, DriverProfile, FileEntry, HardwareInventory,
    LayerContext, LayerRulesInput, ProfileMatch, ReflectorCandidate, ReflectorSelectorInput,
    SelectorPolicy,
};
use super::{DriverMatcher, Hook, LayerRules, PluginError, ReflectorSelector};

/// How often the epoch advances; deadlines are whole ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Entries per `classify` call: large enough that the per-call cost vanishes, small enough
/// that one call's fuel and memory stay bounded whatever the tree's size.
pub const LAYER_BATCH: usize = 4096;

/// What one call may use.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Wasm fuel per call (roughly one unit per instruction).
    pub fuel: u64,
    /// Wall-clock time per call, enforced through epoch interruption.
    pub deadline: Duration,
    /// Linear memory per instance, in bytes.
    pub memory_bytes: usize,
    /// Log messages plus stdout/stderr kept per call, in bytes.
    pub log_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // About 0.15 s of a tight loop; a batch of 4,096 layer entries takes ~8 M.
            fuel: 1_000_000_000,
            deadline: Duration::from_secs(2),
            memory_bytes: 64 << 20,
            log_bytes: 64 << 10,
        }
    }
}

/// One log line a plugin wrote through the `log` import.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    pub level: &'static str,
    pub message: String,
}

/// What one call cost, and what the plugin logged.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CallReport {
    pub fuel_used: u64,
    pub elapsed_us: u64,
    pub log: Vec<LogLine>,
    /// Anything the guest printed to stdout or stderr.
    pub output: String,
    /// Whether log lines were dropped for exceeding `Limits::log_bytes`.
    pub log_truncated: bool,
}

/// The per-instance state wasmtime hands to host functions.
pub(crate) struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    log: Vec<LogLine>,
    log_bytes: usize,
    log_cap: usize,
    log_truncated: bool,
    output: MemoryOutputPipe,
    output_seen: usize,
}

impl State {
    pub(crate) fn push_log(&mut self, level: &'static str, message: String) {
        if self.log_bytes + message.len() > self.log_cap {
            self.log_truncated = true;
            return;
        }
        self.log_bytes += message.len();
        self.log.push(LogLine { level, message });
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Refuses growth past the memory limit and remembers that it did, because the resulting
/// error is not a `Trap` and would otherwise read as an ordinary failure.
struct Limiter {
    memory_bytes: usize,
    hit_memory: bool,
}

const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.hit_memory = true;
            // An error (not `Ok(false)`) stops the guest at once instead of letting it
            // retry or limp on after a failed allocation.
            return Err(wasmtime::Error::msg("memory limit reached"));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Guests have no clock: both clocks read zero.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

struct Inner {
    engine: Engine,
    limits: Limits,
    cache_dir: Option<PathBuf>,
    driver_linker: Linker<State>,
    layer_linker: Linker<State>,
    reflector_linker: Linker<State>,
}

/// Loads plugins and runs them. Cheap to clone; one per process is enough.
#[derive(Clone)]
pub struct PluginHost {
    inner: Arc<Inner>,
}

fn host_err(doing: &'static str) -> impl FnOnce(wasmtime::Error) -> PluginError {
    move |e| PluginError::Host {
        doing,
        detail: format!("{e:#}"),
    }
}

impl PluginHost {
    /// A host whose compiled components are cached in `cache_dir` (none: compile on every
    /// load), running every call under `limits`.
    pub fn new(cache_dir: Option<PathBuf>, limits: Limits) -> Result<PluginHost, PluginError> {
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .consume_fuel(true)
            .epoch_interruption(true)
            // Shipped components are stripped: frames would read `<wasm function 101>`.
            // What the guest printed (a Rust panic message, say) goes into the error instead.
            .wasm_backtrace_max_frames(None);
        let engine = Engine::new(&config).map_err(host_err("create the wasm engine"))?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                // Ends with the last handle on the engine.
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| PluginError::Host {
                doing: "start the deadline timer thread",
                detail: e.to_string(),
            })?;
        let linker = |add: fn(&mut Linker<State>) -> wasmtime::Result<()>| {
            let mut l = Linker::new(&engine);
            wasmtime_wasi::p2::add_to_linker_sync(&mut l).map_err(host_err("link WASI"))?;
            add(&mut l).map_err(host_err("link the log import"))?;
            Ok::<_, PluginError>(l)
        };
        let driver_linker = linker(bindings::driver_link)?;
        let layer_linker = linker(bindings::layer_link)?;
        let reflector_linker = linker(bindings::reflector_link)?;
        Ok(PluginHost {
            inner: Arc::new(Inner {
                engine,
                limits,
                cache_dir,
                driver_linker,
                layer_linker,
                reflector_linker,
            }),
        })
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Compiles (or takes from the cache) the component `bytes`, checks it against `hook`'s
    /// world and returns it ready to call. `name` appears in every error about it.
    pub fn load(&self, name: &str, hook: Hook, bytes: &[u8]) -> Result<Plugin, PluginError> {
        let component = cache::compile(&self.inner.engine, self.inner.cache_dir.as_deref(), bytes)
            .map_err(|detail| PluginError::Invalid {
                plugin: name.into(),
                hook,
                detail,
            })?;
        check_exports(&self.inner.engine, &component, name, hook)?;
        let wrong_world = |e: wasmtime::Error| PluginError::WrongWorld {
            plugin: name.into(),
            hook,
            detail: format!("{e:#}"),
        };
        let runner = |linker: &Linker<State>| {
            linker
                .instantiate_pre(&component)
                .map_err(|e| PluginError::WrongWorld {
                    plugin: name.into(),
                    hook,
                    detail: format!(
                        "it imports something Morgana does not provide (only `log` and wasi \
                         interfaces are): {e:#}"
                    ),
                })
        };
        Ok(match hook {
            Hook::DriverMatcher => Plugin::DriverMatcher(DriverMatcherPlugin(Runner::new(
                self,
                name,
                hook,
                bindings::DriverPre::new(runner(&self.inner.driver_linker)?)
                    .map_err(wrong_world)?,
            ))),
            Hook::LayerRules => Plugin::LayerRules(LayerRulesPlugin(Runner::new(
                self,
                name,
                hook,
                bindings::LayerPre::new(runner(&self.inner.layer_linker)?).map_err(wrong_world)?,
            ))),
            Hook::ReflectorSelector => {
                Plugin::ReflectorSelector(ReflectorSelectorPlugin(Runner::new(
                    self,
                    name,
                    hook,
                    bindings::ReflectorPre::new(runner(&self.inner.reflector_linker)?)
                        .map_err(wrong_world)?,
                )))
            }
        })
    }
}

/// Names the missing piece when a component does not export what `hook` calls, before
/// the type check (whose messages do not say which export a partner forgot).
fn check_exports(
    engine: &Engine,
    component: &Component,
    name: &str,
    hook: Hook,
) -> Result<(), PluginError> {
    let ty = component.component_type();
    let wrong = |detail: String| PluginError::WrongWorld {
        plugin: name.into(),
        hook,
        detail,
    };
    let interface = hook.export_interface();
    let function = hook.export_function();
    match ty.get_export(engine, interface).map(|e| e.ty) {
        Some(ComponentItem::ComponentInstance(instance)) => {
            if instance.get_export(engine, function).is_none() {
                let has: Vec<&str> = instance.exports(engine).map(|(n, _)| n).collect();
                return Err(wrong(format!(
                    "it exports `{interface}` but not its function `{function}` (it has: {})",
                    list_or_nothing(&has)
                )));
            }
            Ok(())
        }
        Some(_) => Err(wrong(format!(
            "its export `{interface}` is not an interface instance"
        ))),
        None => {
            let has: Vec<&str> = ty.exports(engine).map(|(n, _)| n).collect();
            Err(wrong(format!(
                "it does not export `{interface}` (it exports: {})",
                list_or_nothing(&has)
            )))
        }
    }
}

fn list_or_nothing(names: &[&str]) -> String {
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}

/// A loaded plugin, one variant per hook.
pub enum Plugin {
    DriverMatcher(DriverMatcherPlugin),
    LayerRules(LayerRulesPlugin),
    ReflectorSelector(ReflectorSelectorPlugin),
}

/// The answer of [`Plugin::run_json`]: the result as JSON, or the error, plus the cost.
#[derive(Debug)]
pub struct JsonCall {
    pub result: Result<serde_json::Value, PluginError>,
    pub report: CallReport,
}

impl Plugin {
    pub fn hook(&self) -> Hook {
        match self {
            Plugin::DriverMatcher(_) => Hook::DriverMatcher,
            Plugin::LayerRules(_) => Hook::LayerRules,
            Plugin::ReflectorSelector(_) => Hook::ReflectorSelector,
        }
    }

    /// Runs one call on input in the JSON shape of the hook's `*Input` type (see
    /// `types.rs`); `Err` when the input does not parse.
    pub fn run_json(&self, input: &str) -> Result<JsonCall, serde_json::Error> {
        fn json<T: serde::Serialize>(
            (result, report): (Result<T, PluginError>, CallReport),
        ) -> JsonCall {
            JsonCall {
                result: result.map(|v| serde_json::to_value(v).unwrap_or_default()),
                report,
            }
        }
        Ok(match self {
            Plugin::DriverMatcher(p) => {
                let i: DriverMatcherInput = serde_json::from_str(input)?;
                json(p.call(&i.inventory, &i.profiles))
            }
            Plugin::LayerRules(p) => {
                let i: LayerRulesInput = serde_json::from_str(input)?;
                // One call as the partner wrote it, not split into host batches.
                json(p.call(&i.context, &i.entries))
            }
            Plugin::ReflectorSelector(p) => {
                let i: ReflectorSelectorInput = serde_json::from_str(input)?;
                json(p.call(&i.client, &i.policy, &i.candidates))
            }
        })
    }
}

/// The world-specific half of a runner: how to instantiate and what the instance is.
pub(crate) trait World: Send + 'static {
    type Pre: Send + Sync;
    fn instantiate(pre: &Self::Pre, store: &mut Store<State>) -> wasmtime::Result<Self>
    where
        Self: Sized;
}

struct Live<W> {
    store: Store<State>,
    bindings: W,
}

/// Runs calls on one plugin, keeping an instance alive between calls that succeed.
struct Runner<W: World> {
    host: PluginHost,
    name: String,
    hook: Hook,
    pre: W::Pre,
    live: Mutex<Option<Live<W>>>,
}

impl<W: World> Runner<W> {
    fn new(host: &PluginHost, name: &str, hook: Hook, pre: W::Pre) -> Self {
        Runner {
            host: host.clone(),
            name: name.into(),
            hook,
            pre,
            live: Mutex::new(None),
        }
    }

    fn new_store(&self) -> Store<State> {
        let limits = self.host.inner.limits;
        let output = MemoryOutputPipe::new(limits.log_bytes);
        let wasi = WasiCtx::builder()
            .stdout(output.clone())
            .stderr(output.clone())
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .build();
        let mut store = Store::new(
            &self.host.inner.engine,
            State {
                wasi,
                table: ResourceTable::new(),
                limiter: Limiter {
                    memory_bytes: limits.memory_bytes,
                    hit_memory: false,
                },
                log: Vec::new(),
                log_bytes: 0,
                log_cap: limits.log_bytes,
                log_truncated: false,
                output,
                output_seen: 0,
            },
        );
        store.limiter(|s| &mut s.limiter);
        store
    }

    fn arm(&self, store: &mut Store<State>) -> Result<(), PluginError> {
        let limits = self.host.inner.limits;
        store
            .set_fuel(limits.fuel)
            .map_err(host_err("set a call's fuel"))?;
        let ticks = limits.deadline.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64;
        // +1: the current tick may be about to end.
        store.set_epoch_deadline(ticks.saturating_add(1));
        let s = store.data_mut();
        s.log.clear();
        s.log_bytes = 0;
        s.log_truncated = false;
        s.limiter.hit_memory = false;
        Ok(())
    }

    /// Runs `f` on the live instance (creating one if needed) under the limits. Drops the
    /// instance when anything but the plugin's own `err` comes back.
    fn call<R>(
        &self,
        f: impl FnOnce(&W, &mut Store<State>) -> wasmtime::Result<Result<R, String>>,
    ) -> (Result<R, PluginError>, CallReport) {
        let start = Instant::now();
        // A panic while holding the lock can only leave `None` or a live instance that
        // finished its last call: either is safe to use.
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let fuel = self.host.inner.limits.fuel;
        let mut report = CallReport::default();
        if live.is_none() {
            let mut store = self.new_store();
            if let Err(e) = self.arm(&mut store) {
                return (Err(e), report);
            }
            match W::instantiate(&self.pre, &mut store) {
                Ok(bindings) => *live = Some(Live { store, bindings }),
                Err(e) => {
                    let err = self.classify(&e, &store);
                    self.fill_report(&mut report, &mut store, fuel, start);
                    return (Err(err), report);
                }
            }
        } else if let Some(l) = live.as_mut()
            && let Err(e) = self.arm(&mut l.store)
        {
            return (Err(e), report);
        }
        let l = live.as_mut().expect("instance created above");
        let outcome = f(&l.bindings, &mut l.store);
        self.fill_report(&mut report, &mut l.store, fuel, start);
        let result = match outcome {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(message)) => Err(PluginError::Failed {
                plugin: self.name.clone(),
                hook: self.hook,
                message,
            }),
            Err(e) => {
                let err = self.classify(&e, &l.store);
                *live = None;
                Err(err)
            }
        };
        (result, report)
    }

    fn fill_report(
        &self,
        report: &mut CallReport,
        store: &mut Store<State>,
        fuel: u64,
        start: Instant,
    ) {
        report.fuel_used = fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        report.elapsed_us = start.elapsed().as_micros() as u64;
        let s = store.data_mut();
        report.log = std::mem::take(&mut s.log);
        report.log_truncated = s.log_truncated;
        let out = s.output.contents();
        report.output = String::from_utf8_lossy(&out[s.output_seen.min(out.len())..]).into();
        s.output_seen = out.len();
    }

    fn classify(&self, e: &wasmtime::Error, store: &Store<State>) -> PluginError {
        let (plugin, hook) = (self.name.clone(), self.hook);
        let limits = self.host.inner.limits;
        if store.data().limiter.hit_memory {
            return PluginError::MemoryLimit {
                plugin,
                hook,
                limit: limits.memory_bytes,
            };
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => PluginError::OutOfFuel {
                plugin,
                hook,
                limit: limits.fuel,
            },
            Some(Trap::Interrupt) => PluginError::Deadline {
                plugin,
                hook,
                limit_ms: limits.deadline.as_millis() as u64,
            },
            _ => {
                let mut detail = format!("{e:#}");
                let printed = store.data().output.contents();
                let printed = String::from_utf8_lossy(&printed);
                let printed = printed.trim();
                if !printed.is_empty() {
                    let tail: String = {
                        let chars: Vec<char> = printed.chars().collect();
                        chars[chars.len().saturating_sub(300)..].iter().collect()
                    };
                    detail.push_str(&format!(" (it printed: {})", tail.replace('\n', " | ")));
                }
                PluginError::Trap {
                    plugin,
                    hook,
                    detail,
                }
            }
        }
    }

    fn malformed(&self, detail: String) -> PluginError {
        PluginError::Malformed {
            plugin: self.name.clone(),
            hook: self.hook,
            detail,
        }
    }
}

/// A `driver-matcher` plugin.
pub struct DriverMatcherPlugin(Runner<bindings::Driver>);

impl DriverMatcherPlugin {
    /// One call, with its cost.
    pub fn call(
        &self,
        inventory: &HardwareInventory,
        profiles: &[DriverProfile],
    ) -> (Result<Vec<ProfileMatch>, PluginError>, CallReport) {
        let inv = convert::inventory(inventory);
        let profs: Vec<_> = profiles.iter().map(convert::profile).collect();
        let (result, report) = self.0.call(|b, store| {
            b.morgana_plugins_driver_matching()
                .call_match_profiles(store, &inv, &profs)
        });
        let result = result.and_then(|matches| {
            if matches.len() > profiles.len() {
                return Err(self.0.malformed(format!(
                    "it returned {} matches for {} profiles",
                    matches.len(),
                    profiles.len()
                )));
            }
            let mut seen = std::collections::HashSet::new();
            matches
                .into_iter()
                .map(|m| {
                    if !profiles.iter().any(|p| p.id == m.profile_id) {
                        return Err(self.0.malformed(format!(
                            "it matched profile `{}`, which is not among the {} given",
                            truncate(&m.profile_id),
                            profiles.len()
                        )));
                    }
                    if !seen.insert(m.profile_id.clone()) {
                        return Err(self.0.malformed(format!(
                            "it matched profile `{}` more than once",
                            truncate(&m.profile_id)
                        )));
                    }
                    Ok(ProfileMatch {
                        profile_id: m.profile_id,
                        reason: m.reason,
                    })
                })
                .collect()
        });
        (result, report)
    }
}

impl DriverMatcher for DriverMatcherPlugin {
    fn match_profiles(
        &self,
        inventory: &HardwareInventory,
        profiles: &[DriverProfile],
    ) -> Result<Vec<ProfileMatch>, PluginError> {
        self.call(inventory, profiles).0
    }
}

/// A `layer-rules` plugin.
pub struct LayerRulesPlugin(Runner<bindings::Layer>);

impl LayerRulesPlugin {
    /// One call on exactly `entries` (no batching), with its cost.
    pub fn call(
        &self,
        context: &LayerContext,
        entries: &[FileEntry],
    ) -> (Result<Vec<Disposition>, PluginError>, CallReport) {
        let ctx = convert::layer_context(context);
        let items: Vec<_> = entries.iter().map(convert::file_entry).collect();
        let (result, report) = self.0.call(|b, store| {
            b.morgana_plugins_layer_classification()
                .call_classify(store, &ctx, &items)
        });
        let result = result.and_then(|out| {
            if out.len() != entries.len() {
                return Err(self.0.malformed(format!(
                    "it returned {} dispositions for {} entries",
                    out.len(),
                    entries.len()
                )));
            }
            Ok(out.into_iter().map(convert::disposition).collect())
        });
        (result, report)
    }
}

impl LayerRules for LayerRulesPlugin {
    /// Classifies in batches of [`LAYER_BATCH`], so the limits bound one batch, not a tree.
    fn classify(
        &self,
        context: &LayerContext,
        entries: &[FileEntry],
    ) -> Result<Vec<Disposition>, PluginError> {
        let mut out = Vec::with_capacity(entries.len());
        for batch in entries.chunks(LAYER_BATCH) {
            out.extend(self.call(context, batch).0?);
        }
        Ok(out)
    }
}

/// A `reflector-selector` plugin.
pub struct ReflectorSelectorPlugin(Runner<bindings::Reflector>);

impl ReflectorSelectorPlugin {
    /// One call, with its cost.
    pub fn call(
        &self,
        client: &ClientInfo,
        policy: &SelectorPolicy,
        candidates: &[ReflectorCandidate],
    ) -> (Result<Vec<String>, PluginError>, CallReport) {
        let c = convert::client(client);
        let p = convert::policy(policy);
        let cands: Vec<_> = candidates.iter().map(convert::candidate).collect();
        let (result, report) = self.0.call(|b, store| {
            b.morgana_plugins_reflector_ranking()
                .call_rank(store, &c, &p, &cands)
        });
        let result = result.and_then(|ids| {
            if ids.len() > candidates.len() {
                return Err(self.0.malformed(format!(
                    "it ranked {} reflectors out of {} candidates",
                    ids.len(),
                    candidates.len()
                )));
            }
            let mut seen = std::collections::HashSet::new();
            for id in &ids {
                if !candidates.iter().any(|c| &c.id == id) {
                    return Err(self.0.malformed(format!(
                        "it ranked `{}`, which is not a candidate",
                        truncate(id)
                    )));
                }
                if !seen.insert(id) {
                    return Err(self
                        .0
                        .malformed(format!("it ranked `{}` twice", truncate(id))));
                }
            }
            Ok(ids)
        });
        (result, report)
    }
}

impl ReflectorSelector for ReflectorSelectorPlugin {
    fn rank(
        &self,
        client: &ClientInfo,
        policy: &SelectorPolicy,
        candidates: &[ReflectorCandidate],
    ) -> Result<Vec<String>, PluginError> {
        self.call(client, policy, candidates).0
    }
}

/// A plugin-supplied string, cut short enough for an error message.
fn truncate(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}
