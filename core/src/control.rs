//! The control plane between agent and appliance: heartbeats with inventory, the device's
//! upload policy, and jobs the appliance queues for an agent. The agent always connects out
//! (mTLS, the same client certificate as the data plane); the endpoint opens no port.
//!
//! - `POST` [`PATH_HEARTBEAT`] [`Heartbeat`] → [`HeartbeatReply`]. The agent sends one at
//!   start and every `heartbeat_secs`; it includes its inventory only when it changed since
//!   the last one the appliance acknowledged (compare [`Inventory::digest`]).
//! - `GET` [`PATH_POLICY`] → [`AgentPolicy`]: the calling device's policy, as the agent
//!   needs it (no retention: only the server enforces that). Fetched when a heartbeat reply
//!   names a version other than the one the agent holds.
//! - `POST` [`PATH_JOBS_NEXT`] [`NextJob`] → 200 [`Job`] or 204 when none arrived within
//!   `wait_secs` (a long poll; the appliance caps the wait).
//! - `POST` [`PATH_JOB_REPORT`] [`JobReport`] → 204: progress while a job runs, then its
//!   outcome. A job is handed out once; an agent that restarts mid-job reports it failed.
//! - `GET` [`PATH_REFLECTOR_SELECTOR`] → 200 with the active `reflector-selector` plugin's
//!   component (`ETag`: its BLAKE3 id in quotes; [`PLUGIN_NAME_HEADER`] and
//!   [`PLUGIN_VERSION_HEADER`]), 304 when `If-None-Match` names it, 204 when no plugin is
//!   active (the agent then ranks with the built-in).
//! - `POST` [`PATH_PLUGIN_FAILURES`] [`PluginFailureReport`] → 204: an agent-side plugin
//!   failed and the built-in answered; the appliance records a `plugin.failed` event.
//!
//! Branch reflectors (the role is named in every [`HeartbeatReply`]):
//! - `POST` [`PATH_REFLECTOR_CERT`] [`ReflectorCertRequest`] → [`ReflectorCertReply`]: a
//!   server certificate for the reflector's listener, signed by the appliance CA (which
//!   every enrolled device already pins). Refused (403) unless the role is on.
//! - `POST` [`PATH_REFLECTOR_BEAT`] [`ReflectorBeat`] → 204: the reflector's address and
//!   load; 409 once the role is off (the reflector then stops serving).
//! - `GET` [`PATH_REFLECTORS`] → `Vec<`[`ReflectorInfo`]`>`: reflectors enabled and heard
//!   from recently, other than the caller: download candidates.

use serde::{Deserialize, Serialize};

use crate::id::Id;

pub const PATH_HEARTBEAT: &str = "/v1/heartbeat";
pub const PATH_POLICY: &str = "/v1/policy";
pub const PATH_JOBS_NEXT: &str = "/v1/jobs/next";
pub const PATH_JOB_REPORT: &str = "/v1/jobs/report";
pub const PATH_REFLECTOR_SELECTOR: &str = "/v1/plugins/reflector-selector";
pub const PATH_PLUGIN_FAILURES: &str = "/v1/plugins/failures";
pub const PATH_REFLECTOR_CERT: &str = "/v1/reflector/certificate";
pub const PATH_REFLECTOR_BEAT: &str = "/v1/reflector/heartbeat";
pub const PATH_REFLECTORS: &str = "/v1/reflectors";
pub const PLUGIN_NAME_HEADER: &str = "x-morgana-plugin-name";
pub const PLUGIN_VERSION_HEADER: &str = "x-morgana-plugin-version";
/// Longest failure message the appliance keeps from an agent.
pub const MAX_PLUGIN_FAILURE_MESSAGE: usize = 4096;

/// An agent-side plugin call that failed (the built-in answered instead).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginFailureReport {
    /// The component's BLAKE3 id, as the `ETag` it came with named it.
    pub plugin: Id,
    pub message: String,
}

/// Longest long poll the appliance honours.
pub const MAX_JOB_WAIT_SECS: u32 = 60;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub agent_version: String,
    /// Present when it changed since the last acknowledged heartbeat (and in the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<Inventory>,
    /// The policy version the agent currently applies, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<u64>,
    /// The job the agent is running, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_job: Option<String>,
    /// RFC 3339 UTC of the agent's last successful snapshot, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_snapshot: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The version of the device's policy; fetch [`PATH_POLICY`] when it differs from held.
    pub policy_version: u64,
    /// When to send the next heartbeat.
    pub heartbeat_secs: u32,
    /// Digest of the inventory the appliance holds for this device (`None`: none yet), so
    /// an agent whose state was lost resends it.
    #[serde(default)]
    pub inventory_digest: Option<Id>,
    /// Set while the device has the reflector role: serve blobs to neighbours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reflector: Option<ReflectorRole>,
}

/// The branch reflector role as an administrator set it for a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReflectorRole {
    /// TCP port of the reflector's HTTPS listener.
    pub port: u16,
    /// The branch office it serves; devices of the same site rank it higher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// Beside the appliance's own 8443, and above the range desktops usually hand out.
pub const DEFAULT_REFLECTOR_PORT: u16 = 8444;
/// Longest site name; a label for people, not a path.
pub const MAX_SITE_LEN: usize = 64;

/// A site name is 1 to [`MAX_SITE_LEN`] letters, digits, `-`, `_` or `.`: it travels in
/// mDNS TXT records and plugin inputs, so nothing that needs quoting.
pub fn valid_site(site: &str) -> bool {
    !site.is_empty()
        && site.len() <= MAX_SITE_LEN
        && site
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReflectorCertRequest {
    /// PEM CSR made from the reflector listener's own key (not the device key).
    pub csr_pem: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReflectorCertReply {
    pub cert_pem: String,
}

/// A reflector's state, sent every heartbeat interval while the role is on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReflectorBeat {
    /// The address neighbours reach it at (no port).
    pub address: String,
    pub port: u16,
    /// The network of that address (`CIDR`), for subnet ranking.
    pub subnet: String,
    /// Requests being served now, and that over the most it serves at once (0 to 1).
    pub in_flight: u32,
    pub load: f32,
    pub cache_bytes: u64,
    pub cache_limit: u64,
    /// Stored bytes sent to neighbours since the reflector started.
    pub bytes_served: u64,
}

/// A download candidate, as the appliance lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReflectorInfo {
    pub device_id: String,
    /// `HOST:PORT` (`[v6]:PORT`).
    pub address: String,
    pub subnet: String,
    #[serde(default)]
    pub site: Option<String>,
    pub load: f32,
}

/// Hardware and OS facts. A source the endpoint lacks (containers, VMs without DMI) leaves
/// its fields empty; collecting never fails because of one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub hostname: String,
    /// /sys/class/dmi/id/sys_vendor, product_name, product_serial.
    pub vendor: String,
    pub model: String,
    pub serial: String,
    pub cpu_model: String,
    pub cpu_count: u32,
    pub memory_bytes: u64,
    pub disks: Vec<Disk>,
    pub network: Vec<NetworkInterface>,
    pub pci: Vec<PciId>,
    /// /etc/os-release ID, VERSION_ID and PRETTY_NAME.
    pub os_id: String,
    pub os_version: String,
    pub os_name: String,
    /// uname release, e.g. `6.1.0-27-amd64`.
    pub kernel: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Kernel name, e.g. `nvme0n1`.
    pub name: String,
    pub model: String,
    pub size_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub name: String,
    /// `aa:bb:cc:dd:ee:ff`, empty when the interface has none.
    pub mac: String,
    /// Addresses with prefix length, e.g. `192.168.1.20/24`, `fe80::1/64`.
    pub addresses: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PciId {
    pub vendor_id: u16,
    pub device_id: u16,
}

impl Inventory {
    /// A stable digest of the inventory's content, for change detection.
    pub fn digest(&self) -> Id {
        Id::of(&serde_json::to_vec(self).expect("inventory serializes"))
    }
}

/// Glob patterns over endpoint paths (absolute, as seen from the protected root), with
/// exceptions: a path is in the area when a rule matches it or a folder above it, and no
/// exception does. [`crate::policy`] says how they match and which macros expand.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSet {
    pub rules: Vec<String>,
    #[serde(default)]
    pub exceptions: Vec<String>,
}

/// What an agent needs of its device's upload policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPolicy {
    pub name: String,
    /// Appliance-wide: every save of any policy takes the next number, so the version
    /// changes whenever what the device must apply changes, a move to another policy
    /// included.
    pub version: u64,
    /// Never uploaded. The factory rules are already merged in.
    pub unprotected: RuleSet,
    /// User data: kept in place by a system-only revert and by layer updates.
    pub user_area: RuleSet,
    /// Scheduled sync interval.
    pub sync_interval_secs: u32,
    /// How the agent ranks branch reflectors (the `reflector-selector` hook's policy).
    #[serde(default)]
    pub reflectors: ReflectorPolicy,
}

/// The site's say in reflector choice, as a policy carries it: subnets whose reflectors
/// count as near, and the round-trip time under which any reflector does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReflectorPolicy {
    #[serde(default)]
    pub preferred_subnets: Vec<String>,
    pub latency_threshold_ms: u32,
    /// The site of the devices following this policy (a reflector's own role names its
    /// site first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// Across a campus a round trip stays under this; across a WAN link it rarely does.
pub const DEFAULT_LATENCY_THRESHOLD_MS: u32 = 30;

impl Default for ReflectorPolicy {
    fn default() -> Self {
        ReflectorPolicy {
            preferred_subnets: Vec::new(),
            latency_threshold_ms: DEFAULT_LATENCY_THRESHOLD_MS,
            site: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextJob {
    /// How long the appliance may hold the request open waiting for a job.
    pub wait_secs: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum JobKind {
    /// Take a snapshot now (reason `manual`).
    Sync,
    Restore(RestoreJob),
    /// Make the device base ⊕ apps, keeping its user area, identity and own files; first a
    /// `pre-layer-update` snapshot. Rolling back is a system-only [`RestoreJob`] to it.
    ApplyLayers(ApplyJob),
    /// Undo the last apply: a system-only revert to its `pre-layer-update` snapshot (user
    /// data written since stays); the appliance then records the layers the device had.
    RollbackLayers(RestoreJob),
}

/// One layer version as an apply needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    pub name: String,
    pub version: u32,
    /// The layer's tree: a base layer's files, an app layer's added and changed ones.
    pub root: Id,
    /// App layers: absolute paths the layer removes (raw bytes: names need not be UTF-8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deletions: Vec<Vec<u8>>,
}

/// Layers to apply, and what the previously applied ones leave behind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyJob {
    pub base: LayerRef,
    /// In order: a later layer wins over an earlier one.
    #[serde(default)]
    pub apps: Vec<LayerRef>,
    /// Absolute paths the layers never write, replace or remove.
    #[serde(default)]
    pub do_not_override: Vec<Vec<u8>>,
    /// Paths the previously applied layers put on the device that the new ones lack, so
    /// the apply removes them (files the user installed are in no layer, so never here).
    #[serde(default)]
    pub remove: Vec<Vec<u8>>,
    /// The device's matching driver sets, written in the same apply: a base-layer update
    /// brings the drivers its hardware needs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drivers: Vec<DriverDelivery>,
    /// The device's enrolled hostname: written to `/etc/hostname` when the device has none
    /// (an empty device being provisioned; layers never carry identity).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
}

/// One driver set version to put on a device. Older agents ignore the field that carries
/// these; the on-demand delivery is a plain [`RestoreJob`] and needs none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverDelivery {
    pub set: String,
    pub version: u32,
    /// The set's tree.
    pub root: Id,
    /// Absolute folder as seen from the protected root (like every layer path), e.g.
    /// `/opt/morgana/drivers/intel-nic`; the set replaces what was there.
    pub target: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreJob {
    /// The snapshot restored from; it may belong to another device (restore to new hardware).
    pub snapshot: String,
    pub source_device: String,
    /// The snapshot's root tree.
    pub root: Id,
    pub scope: RestoreScope,
    /// Absolute directory on the endpoint to restore into; `None`: the original place (the
    /// protected root). A full or system-only revert always targets the original place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// A revert onto other hardware than the snapshot's: the new device's own driver sets,
    /// delivered after the revert. The folders they go into keep what the device had there
    /// (the snapshot's machine's drivers would not fit it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drivers: Vec<DriverDelivery>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum RestoreScope {
    /// The device becomes exactly the snapshot, except its unprotected area.
    Full,
    /// As `Full`, but the user area is left as it is now.
    SystemOnly,
    /// These files or folders (absolute endpoint paths), nothing else touched.
    Paths { paths: Vec<String> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    pub job_id: String,
    /// `Running` with progress, then `Succeeded` or `Failed` once.
    pub state: JobState,
    #[serde(default)]
    pub progress: JobProgress,
    /// What happened, for a person: the error and what to do about it when failed.
    #[serde(default)]
    pub message: String,
    /// A layer apply's per-file results, in its final report. Older appliances ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FileResults>,
}

/// Most per-file entries one report carries; the counts cover every path. Failures and
/// kept files are listed first, so what needs a person's eye is never cut off.
pub const MAX_FILE_RESULTS: usize = 1000;
/// Most bytes of paths and details listed in one report, well under the appliance's
/// request limit.
pub const MAX_FILE_RESULTS_BYTES: usize = 128 * 1024;

/// What an apply did, path by path (bounded by [`MAX_FILE_RESULTS`]) and in numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileResults {
    pub added: u64,
    pub replaced: u64,
    pub removed: u64,
    pub kept: u64,
    /// Already as the layers want them: neither fetched nor written.
    pub unchanged: u64,
    pub failed: u64,
    /// Chunk bytes fetched from the appliance as stored (compressed), and file bytes
    /// written to disk.
    #[serde(default)]
    pub fetched_bytes: u64,
    #[serde(default)]
    pub written_bytes: u64,
    /// The fetched chunks' raw (decompressed) bytes.
    #[serde(default)]
    pub fetched_raw_bytes: u64,
    /// Chunk bytes the device's own files already held (read there, not fetched).
    #[serde(default)]
    pub reused_bytes: u64,
    pub files: Vec<FileResult>,
    /// Entries counted above but not listed.
    #[serde(default)]
    pub unlisted: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileResult {
    /// Absolute as seen from the protected root (lossy UTF-8: this is for people).
    pub path: String,
    pub outcome: FileOutcome,
    /// Why a file was kept, or the error that failed it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileOutcome {
    Failed,
    Kept,
    Added,
    Replaced,
    Removed,
}

impl FileOutcome {
    pub fn name(self) -> &'static str {
        match self {
            FileOutcome::Failed => "failed",
            FileOutcome::Kept => "kept",
            FileOutcome::Added => "added",
            FileOutcome::Replaced => "replaced",
            FileOutcome::Removed => "removed",
        }
    }
}

impl FileResults {
    /// Counts `outcome` and lists it while there is room.
    pub fn push(&mut self, path: String, outcome: FileOutcome, detail: String) {
        match outcome {
            FileOutcome::Failed => self.failed += 1,
            FileOutcome::Kept => self.kept += 1,
            FileOutcome::Added => self.added += 1,
            FileOutcome::Replaced => self.replaced += 1,
            FileOutcome::Removed => self.removed += 1,
        }
        self.files.push(FileResult {
            path,
            outcome,
            detail,
        });
    }

    /// Keeps at most [`MAX_FILE_RESULTS`] entries, failures and kept files first, then by
    /// path; the rest is only counted.
    pub fn bound(&mut self) {
        self.files
            .sort_by(|a, b| (a.outcome, &a.path).cmp(&(b.outcome, &b.path)));
        // Long paths and error texts must not push the report past what the appliance
        // takes in one request.
        let mut bytes = 0;
        let fits = self
            .files
            .iter()
            .take(MAX_FILE_RESULTS)
            .take_while(|f| {
                bytes += f.path.len() + f.detail.len() + 32;
                bytes <= MAX_FILE_RESULTS_BYTES
            })
            .count();
        self.unlisted += (self.files.len() - fits) as u64;
        self.files.truncate(fits);
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProgress {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_kinds_have_a_stable_json_shape() {
        let job = Job {
            id: "j1".into(),
            kind: JobKind::Restore(RestoreJob {
                snapshot: "s".into(),
                source_device: "d".into(),
                root: Id([0; 32]),
                scope: RestoreScope::Paths {
                    paths: vec!["/home/a/doc.txt".into()],
                },
                target: None,
                drivers: Vec::new(),
            }),
        };
        let json = serde_json::to_value(&job).unwrap();
        assert_eq!(json["kind"]["type"], "restore");
        assert_eq!(json["kind"]["scope"]["type"], "paths");
        let back: Job = serde_json::from_value(json).unwrap();
        assert_eq!(back, job);
        let sync = serde_json::to_value(Job {
            id: "j2".into(),
            kind: JobKind::Sync,
        })
        .unwrap();
        assert_eq!(sync["kind"]["type"], "sync");
    }

    #[test]
    fn file_results_stay_bounded_and_keep_failures() {
        let mut r = FileResults::default();
        for i in 0..MAX_FILE_RESULTS + 5 {
            r.push(format!("/usr/f{i:05}"), FileOutcome::Added, String::new());
        }
        r.push("/zz".into(), FileOutcome::Failed, "disk full".into());
        r.bound();
        assert_eq!(r.files.len(), MAX_FILE_RESULTS);
        assert_eq!(
            (r.added, r.failed, r.unlisted),
            (MAX_FILE_RESULTS as u64 + 5, 1, 6)
        );
        assert_eq!(r.files[0].outcome, FileOutcome::Failed);
        // An old agent's report (no `files`) still reads.
        let old: JobReport = serde_json::from_str(r#"{"job_id":"j","state":"succeeded"}"#).unwrap();
        assert!(old.files.is_none());
    }

    #[test]
    fn inventory_digest_follows_content() {
        let mut inv = Inventory::default();
        let empty = inv.digest();
        inv.serial = "X1".into();
        assert_ne!(empty, inv.digest());
    }
}
