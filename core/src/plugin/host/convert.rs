//! Between `plugin::types` and each world's generated copy of the WIT types.

use super::bindings::{driver, layer, reflector};
use crate::plugin::types as t;

pub fn inventory(i: &t::HardwareInventory) -> driver::morgana::plugins::types::HardwareInventory {
    use driver::morgana::plugins::types as w;
    w::HardwareInventory {
        vendor: i.vendor.clone(),
        model: i.model.clone(),
        os: i.os.clone(),
        pci_devices: i
            .pci_devices
            .iter()
            .map(|d| w::PciDevice {
                vendor_id: d.vendor_id,
                device_id: d.device_id,
            })
            .collect(),
    }
}

pub fn profile(p: &t::DriverProfile) -> driver::morgana::plugins::types::DriverProfile {
    use driver::morgana::plugins::types as w;
    w::DriverProfile {
        id: p.id.clone(),
        name: p.name.clone(),
        any_of: p
            .any_of
            .iter()
            .map(|g| w::MatchGroup {
                all: g
                    .all
                    .iter()
                    .map(|c| w::Condition {
                        field: match c.field {
                            t::InventoryField::Vendor => w::InventoryField::Vendor,
                            t::InventoryField::Model => w::InventoryField::Model,
                            t::InventoryField::Os => w::InventoryField::Os,
                            t::InventoryField::PciId => w::InventoryField::PciId,
                        },
                        pattern: c.pattern.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

pub fn layer_context(c: &t::LayerContext) -> layer::morgana::plugins::types::LayerContext {
    use layer::morgana::plugins::types as w;
    w::LayerContext {
        layer_name: c.layer_name.clone(),
        kind: match c.kind {
            t::LayerKind::Base => w::LayerKind::Base,
            t::LayerKind::App => w::LayerKind::App,
        },
        os: c.os.clone(),
    }
}

pub fn file_entry(e: &t::FileEntry) -> layer::morgana::plugins::types::FileEntry {
    use layer::morgana::plugins::types as w;
    w::FileEntry {
        path: e.path.clone(),
        kind: match e.kind {
            t::FileKind::File => w::FileKind::File,
            t::FileKind::Directory => w::FileKind::Directory,
            t::FileKind::Symlink => w::FileKind::Symlink,
            t::FileKind::Other => w::FileKind::Other,
        },
        size: e.size,
        mode: e.mode,
    }
}

pub fn disposition(d: layer::morgana::plugins::types::Disposition) -> t::Disposition {
    use layer::morgana::plugins::types as w;
    t::Disposition {
        kind: match d.kind {
            w::DispositionKind::Layer => t::DispositionKind::Layer,
            w::DispositionKind::UserArea => t::DispositionKind::UserArea,
            w::DispositionKind::MachineIdentity => t::DispositionKind::MachineIdentity,
            w::DispositionKind::Exclude => t::DispositionKind::Exclude,
        },
        conflict: match d.conflict {
            w::ConflictPolicy::LayerWins => t::ConflictPolicy::LayerWins,
            w::ConflictPolicy::KeepDevice => t::ConflictPolicy::KeepDevice,
            w::ConflictPolicy::Skip => t::ConflictPolicy::Skip,
        },
    }
}

pub fn client(c: &t::ClientInfo) -> reflector::morgana::plugins::types::ClientInfo {
    reflector::morgana::plugins::types::ClientInfo {
        device_id: c.device_id.clone(),
        address: c.address.clone(),
        site: c.site.clone(),
    }
}

pub fn policy(p: &t::SelectorPolicy) -> reflector::morgana::plugins::types::SelectorPolicy {
    reflector::morgana::plugins::types::SelectorPolicy {
        preferred_subnets: p.preferred_subnets.clone(),
        latency_threshold_ms: p.latency_threshold_ms,
    }
}

pub fn candidate(
    c: &t::ReflectorCandidate,
) -> reflector::morgana::plugins::types::ReflectorCandidate {
    reflector::morgana::plugins::types::ReflectorCandidate {
        id: c.id.clone(),
        address: c.address.clone(),
        subnet: c.subnet.clone(),
        site: c.site.clone(),
        load: c.load,
        latency_ms: c.latency_ms,
    }
}
