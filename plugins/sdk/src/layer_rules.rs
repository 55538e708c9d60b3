//! The `layer-rules` hook: where each file of a layer belongs.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "layer-rules",
        pub_export_macro: true,
        export_macro_name: "__export_layer_rules_world",
        default_bindings_module: "morgana_plugin_sdk::layer_rules::bindings",
    });
}

pub use bindings::morgana::plugins::types::{
    ConflictPolicy, Disposition, DispositionKind, FileEntry, FileKind, LayerContext, LayerKind,
};

impl Disposition {
    /// Part of the layer; the layer's version wins on the device.
    pub fn layer() -> Self {
        Disposition {
            kind: DispositionKind::Layer,
            conflict: ConflictPolicy::LayerWins,
        }
    }
    /// User data: never captured, never overwritten.
    pub fn user_area() -> Self {
        Disposition {
            kind: DispositionKind::UserArea,
            conflict: ConflictPolicy::KeepDevice,
        }
    }
    /// Identifies one machine: each device keeps its own.
    pub fn machine_identity() -> Self {
        Disposition {
            kind: DispositionKind::MachineIdentity,
            conflict: ConflictPolicy::KeepDevice,
        }
    }
    /// Neither captured nor protected; left alone on the device.
    pub fn exclude() -> Self {
        Disposition {
            kind: DispositionKind::Exclude,
            conflict: ConflictPolicy::Skip,
        }
    }
}

/// Implement `classify`; override `classify_batch` only to share work across a batch.
pub trait LayerRules {
    /// The disposition of one entry.
    fn classify(context: &LayerContext, entry: &FileEntry) -> Result<Disposition, String>;

    /// One disposition per entry, in order. Morgana calls this with thousands of entries.
    fn classify_batch(
        context: &LayerContext,
        entries: Vec<FileEntry>,
    ) -> Result<Vec<Disposition>, String> {
        entries.iter().map(|e| Self::classify(context, e)).collect()
    }
}

/// Exports a [`LayerRules`] implementation as the component's `layer-rules` world.
#[macro_export]
macro_rules! export_layer_rules {
    ($t:ty) => {
        const _: () = {
            struct __MorganaExport;
            impl $crate::layer_rules::bindings::exports::morgana::plugins::layer_classification::Guest
                for __MorganaExport
            {
                fn classify(
                    context: $crate::layer_rules::LayerContext,
                    entries: ::std::vec::Vec<$crate::layer_rules::FileEntry>,
                ) -> ::std::result::Result<
                    ::std::vec::Vec<$crate::layer_rules::Disposition>,
                    ::std::string::String,
                > {
                    <$t as $crate::layer_rules::LayerRules>::classify_batch(&context, entries)
                }
            }
            $crate::layer_rules::bindings::__export_layer_rules_world!(__MorganaExport with_types_in $crate::layer_rules::bindings);
        };
    };
}
