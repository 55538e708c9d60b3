//! The values hooks exchange, mirroring `wit/types.wit` one to one. They are plain serde
//! types so `morgana plugin test` can read them from JSON; field and variant names are the
//! WIT names (kebab-case variants, snake_case fields).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDevice {
    pub vendor_id: u16,
    pub device_id: u16,
}

impl PciDevice {
    /// `vvvv:dddd` in lowercase hex, the form `pci-id` conditions match against.
    pub fn id_string(&self) -> String {
        format!("{:04x}:{:04x}", self.vendor_id, self.device_id)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardwareInventory {
    pub vendor: String,
    pub model: String,
    pub os: String,
    #[serde(default)]
    pub pci_devices: Vec<PciDevice>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InventoryField {
    Vendor,
    Model,
    Os,
    PciId,
}

impl InventoryField {
    pub fn wit_name(self) -> &'static str {
        match self {
            InventoryField::Vendor => "vendor",
            InventoryField::Model => "model",
            InventoryField::Os => "os",
            InventoryField::PciId => "pci-id",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    pub field: InventoryField,
    pub pattern: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatchGroup {
    pub all: Vec<Condition>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverProfile {
    pub id: String,
    pub name: String,
    pub any_of: Vec<MatchGroup>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileMatch {
    pub profile_id: String,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub kind: FileKind,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub mode: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerKind {
    Base,
    App,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerContext {
    pub layer_name: String,
    pub kind: LayerKind,
    pub os: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DispositionKind {
    Layer,
    UserArea,
    MachineIdentity,
    Exclude,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictPolicy {
    LayerWins,
    KeepDevice,
    Skip,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Disposition {
    pub kind: DispositionKind,
    pub conflict: ConflictPolicy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub device_id: String,
    pub address: String,
    #[serde(default)]
    pub site: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReflectorCandidate {
    pub id: String,
    pub address: String,
    pub subnet: String,
    #[serde(default)]
    pub site: Option<String>,
    #[serde(default)]
    pub load: f32,
    #[serde(default)]
    pub latency_ms: Option<f32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelectorPolicy {
    #[serde(default)]
    pub preferred_subnets: Vec<String>,
    pub latency_threshold_ms: f32,
}

/// The input of one `driver-matcher` call, as `morgana plugin test` reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverMatcherInput {
    pub inventory: HardwareInventory,
    pub profiles: Vec<DriverProfile>,
}

/// The input of one `layer-rules` call, as `morgana plugin test` reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRulesInput {
    pub context: LayerContext,
    pub entries: Vec<FileEntry>,
}

/// The input of one `reflector-selector` call, as `morgana plugin test` reads it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReflectorSelectorInput {
    pub client: ClientInfo,
    pub policy: SelectorPolicy,
    pub candidates: Vec<ReflectorCandidate>,
}
