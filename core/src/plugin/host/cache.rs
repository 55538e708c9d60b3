//! Compiled components on disk. Compiling costs tens of milliseconds in release builds (and
//! 20–30× that in debug builds); loading compiled code costs a file read. Entries are keyed
//! by the component's BLAKE3 hash and the engine's compatibility hash (wasmtime version and
//! every setting that affects code), so a new `morgana` never loads stale code.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// Feeds `Hash` output into BLAKE3 so the key is stable across processes and Rust versions.
struct Blake3Hasher(blake3::Hasher);

impl Hasher for Blake3Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        let h = self.0.finalize();
        u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
    }
}

fn engine_key(engine: &Engine) -> String {
    let mut h = Blake3Hasher(blake3::Hasher::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    h.0.finalize().to_hex()[..16].to_string()
}

/// Where the compiled form of `bytes` lives in `dir`.
pub fn entry_path(engine: &Engine, dir: &Path, bytes: &[u8]) -> PathBuf {
    let id = blake3::hash(bytes).to_hex();
    dir.join(format!("{id}-wasmtime48-{}.cwasm", engine_key(engine)))
}

/// The compiled component, from the cache when it holds a usable entry. A cache that
/// cannot be read or written costs a compile, never a failure. `Err` says why the bytes
/// are not a component this engine accepts.
pub fn compile(engine: &Engine, dir: Option<&Path>, bytes: &[u8]) -> Result<Component, String> {
    let Some(dir) = dir else {
        return Component::new(engine, bytes).map_err(|e| format!("{e:#}"));
    };
    let path = entry_path(engine, dir, bytes);
    if path.is_file() {
        // SAFETY: files in the cache directory are written only by `store` below, from
        // `Component::serialize` of this same engine configuration (the key says so);
        // the directory is inside the appliance's own data directory, which is trusted
        // like the binary itself. A damaged entry fails the header checks and is rebuilt.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing_free_warn(&path, &e);
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let component = Component::new(engine, bytes).map_err(|e| format!("{e:#}"))?;
    if let Ok(code) = component.serialize() {
        let _ = store(dir, &path, &code);
    }
    Ok(component)
}

/// core has no logging dependency: a stale or damaged entry is worth one line on stderr.
fn tracing_free_warn(path: &Path, e: &wasmtime::Error) {
    eprintln!(
        "warning: discarding compiled plugin cache entry {}: {e}",
        path.display()
    );
}

/// Writes atomically (temp file, fsync, rename) so a crash never leaves a torn entry.
fn store(dir: &Path, path: &Path, code: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(code)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
