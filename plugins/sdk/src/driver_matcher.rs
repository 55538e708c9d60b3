//! The `driver-matcher` hook: which driver profiles apply to a device.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "driver-matcher",
        pub_export_macro: true,
        export_macro_name: "__export_driver_matcher_world",
        default_bindings_module: "morgana_plugin_sdk::driver_matcher::bindings",
    });
}

pub use bindings::morgana::plugins::types::{
    Condition, DriverProfile, HardwareInventory, InventoryField, MatchGroup, PciDevice,
    ProfileMatch,
};

impl PciDevice {
    /// `vvvv:dddd` in lowercase hex, the form `pci-id` conditions match against.
    pub fn id_string(&self) -> String {
        format!("{:04x}:{:04x}", self.vendor_id, self.device_id)
    }
}

impl InventoryField {
    /// The field's WIT name, as reasons and the built-in write it.
    pub fn wit_name(self) -> &'static str {
        match self {
            InventoryField::Vendor => "vendor",
            InventoryField::Model => "model",
            InventoryField::Os => "os",
            InventoryField::PciId => "pci-id",
        }
    }
}

pub trait DriverMatcher {
    /// The profiles that apply, in the order given, each with a reason for the preview.
    fn match_profiles(
        inventory: HardwareInventory,
        profiles: Vec<DriverProfile>,
    ) -> Result<Vec<ProfileMatch>, String>;
}

/// Exports a [`DriverMatcher`] implementation as the component's `driver-matcher` world.
#[macro_export]
macro_rules! export_driver_matcher {
    ($t:ty) => {
        const _: () = {
            struct __MorganaExport;
            impl $crate::driver_matcher::bindings::exports::morgana::plugins::driver_matching::Guest
                for __MorganaExport
            {
                fn match_profiles(
                    inventory: $crate::driver_matcher::HardwareInventory,
                    profiles: ::std::vec::Vec<$crate::driver_matcher::DriverProfile>,
                ) -> ::std::result::Result<
                    ::std::vec::Vec<$crate::driver_matcher::ProfileMatch>,
                    ::std::string::String,
                > {
                    <$t as $crate::driver_matcher::DriverMatcher>::match_profiles(inventory, profiles)
                }
            }
            $crate::driver_matcher::bindings::__export_driver_matcher_world!(__MorganaExport with_types_in $crate::driver_matcher::bindings);
        };
    };
}
