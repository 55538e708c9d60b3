//! Host bindings generated from `wit/`, one module per world. Each world gets its own copy
//! of the shared types; `convert.rs` maps them to and from `plugin::types`.

use wasmtime::Store;
use wasmtime::component::{HasSelf, Linker};

use super::{State, World};

pub mod driver {
    wasmtime::component::bindgen!({ path: "../wit", world: "driver-matcher" });
}
pub mod layer {
    wasmtime::component::bindgen!({ path: "../wit", world: "layer-rules" });
}
pub mod reflector {
    wasmtime::component::bindgen!({ path: "../wit", world: "reflector-selector" });
}

pub use driver::DriverMatcher as Driver;
pub use driver::DriverMatcherPre as DriverPre;
pub use layer::LayerRules as Layer;
pub use layer::LayerRulesPre as LayerPre;
pub use reflector::ReflectorSelector as Reflector;
pub use reflector::ReflectorSelectorPre as ReflectorPre;

macro_rules! world {
    ($module:ident, $world:ident, $pre:ident, $link:ident) => {
        impl $module::morgana::plugins::log::Host for State {
            fn log(&mut self, level: $module::morgana::plugins::log::Level, message: String) {
                use $module::morgana::plugins::log::Level;
                let level = match level {
                    Level::Debug => "debug",
                    Level::Info => "info",
                    Level::Warn => "warn",
                    Level::Error => "error",
                };
                self.push_log(level, message);
            }
        }

        impl $module::morgana::plugins::types::Host for State {}

        pub fn $link(linker: &mut Linker<State>) -> wasmtime::Result<()> {
            $world::add_to_linker::<State, HasSelf<State>>(linker, |s| s)
        }

        impl World for $world {
            type Pre = $pre<State>;
            fn instantiate(pre: &Self::Pre, store: &mut Store<State>) -> wasmtime::Result<Self> {
                pre.instantiate(store)
            }
        }
    };
}

world!(driver, Driver, DriverPre, driver_link);
world!(layer, Layer, LayerPre, layer_link);
world!(reflector, Reflector, ReflectorPre, reflector_link);
