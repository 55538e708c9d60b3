//! Layer rules over a 100,000-file tree on one thread: the built-in beside the same rules
//! as a WASM plugin (`plugins/examples/layer-rules`), at several batch sizes, so the cost
//! of one host→guest call and the case for the batched `classify` export are both visible.
//!
//!     cargo bench -p morgana-core --features plugin-host --bench plugins
//!
//! Builds the plugin with a nested `cargo build --release --target wasm32-wasip2`.

use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use morgana_core::plugin::host::{LAYER_BATCH, Limits, Plugin, PluginHost};
use morgana_core::plugin::layer::synthetic_tree;
use morgana_core::plugin::types::{LayerContext, LayerKind};
use morgana_core::plugin::{BuiltinLayerRules, Hook, LayerRules};

const FILES: usize = 100_000;
const ROUNDS: usize = 5;

/// Best of `ROUNDS` wall-clock times of `f`.
fn best(mut f: impl FnMut()) -> Duration {
    (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .expect("rounds > 0")
}

fn main() {
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            "layer-rules",
        ])
        .current_dir(&plugins)
        .status()
        .expect("run cargo build in plugins/");
    assert!(status.success(), "building the layer-rules plugin failed");
    let wasm = std::fs::read(plugins.join("target/wasm32-wasip2/release/layer_rules.wasm"))
        .expect("read layer_rules.wasm");

    let host = PluginHost::new(None, Limits::default()).expect("plugin host");
    let t = Instant::now();
    let Plugin::LayerRules(plugin) = host
        .load("layer-rules", Hook::LayerRules, &wasm)
        .expect("load the layer-rules plugin")
    else {
        unreachable!("loaded for the layer-rules hook")
    };
    let compile = t.elapsed();

    let ctx = LayerContext {
        layer_name: "bench".into(),
        kind: LayerKind::Base,
        os: "debian 12".into(),
    };
    let tree = synthetic_tree(FILES);
    let want = BuiltinLayerRules.classify(&ctx, &tree).unwrap();
    assert_eq!(plugin.classify(&ctx, &tree).unwrap(), want, "plugin agrees");

    println!(
        "layer rules, {FILES} files, one thread, best of {ROUNDS} \
         (component {} KB, compiled in {compile:.0?})",
        wasm.len() / 1024
    );
    println!(
        "{:<28} {:>7} {:>12} {:>14} {:>10}",
        "implementation", "batch", "time", "files/s", "vs built-in"
    );
    let builtin = best(|| {
        black_box(BuiltinLayerRules.classify(&ctx, black_box(&tree)).unwrap());
    });
    let rate = |d: Duration, n: usize| n as f64 / d.as_secs_f64();
    let base = rate(builtin, FILES);
    println!(
        "{:<28} {:>7} {:>12.2?} {:>14.0} {:>10}",
        "built-in (Rust)", "-", builtin, base, "1.00x"
    );
    for batch in [1, 16, 256, LAYER_BATCH, 16_384] {
        // One call per file is slow: measure it on a tenth of the tree.
        let n = if batch == 1 { FILES / 10 } else { FILES };
        let d = best(|| {
            for chunk in tree[..n].chunks(batch) {
                black_box(plugin.call(&ctx, chunk).0.unwrap());
            }
        });
        let r = rate(d, n);
        println!(
            "{:<28} {:>7} {:>12.2?} {:>14.0} {:>9.2}x",
            "plugin (wasm, wasmtime)",
            batch,
            d,
            r,
            base / r
        );
    }
    let d = best(|| {
        black_box(plugin.classify(&ctx, &tree).unwrap());
    });
    println!(
        "plugin via LayerRules::classify (batches of {LAYER_BATCH}): {:.0} files/s",
        rate(d, FILES)
    );
}
