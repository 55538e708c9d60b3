//! The `reflector-selector` hook: which branch reflectors a device fetches from.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "reflector-selector",
        pub_export_macro: true,
        export_macro_name: "__export_reflector_selector_world",
        default_bindings_module: "morgana_plugin_sdk::reflector_selector::bindings",
    });
}

pub use bindings::morgana::plugins::types::{ClientInfo, ReflectorCandidate, SelectorPolicy};

pub trait ReflectorSelector {
    /// Candidate ids, best first, each at most once; empty sends the device to the server.
    fn rank(
        client: ClientInfo,
        policy: SelectorPolicy,
        candidates: Vec<ReflectorCandidate>,
    ) -> Result<Vec<String>, String>;
}

/// Exports a [`ReflectorSelector`] implementation as the component's `reflector-selector`
/// world.
#[macro_export]
macro_rules! export_reflector_selector {
    ($t:ty) => {
        const _: () = {
            struct __MorganaExport;
            impl $crate::reflector_selector::bindings::exports::morgana::plugins::reflector_ranking::Guest
                for __MorganaExport
            {
                fn rank(
                    client: $crate::reflector_selector::ClientInfo,
                    policy: $crate::reflector_selector::SelectorPolicy,
                    candidates: ::std::vec::Vec<$crate::reflector_selector::ReflectorCandidate>,
                ) -> ::std::result::Result<::std::vec::Vec<::std::string::String>, ::std::string::String> {
                    <$t as $crate::reflector_selector::ReflectorSelector>::rank(client, policy, candidates)
                }
            }
            $crate::reflector_selector::bindings::__export_reflector_selector_world!(__MorganaExport with_types_in $crate::reflector_selector::bindings);
        };
    };
}
