//! The event and audit log: what happened, to which device, who did it.
//!
//! Every catalog implementation chains events the same way, so the hash is defined here:
//! BLAKE3 over the previous event's hash and this event's fields, each length-prefixed so
//! that no two different events encode alike. The first event chains from all zeroes.

use morgana_core::Id;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

impl std::str::FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "info" => Ok(Severity::Info),
            "warning" => Ok(Severity::Warning),
            "error" => Ok(Severity::Error),
            other => Err(format!("unknown severity {other:?} (info, warning, error)")),
        }
    }
}

/// An event about to be recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub at_ms: i64,
    /// Dotted and stable, for filtering: `device.enrolled`, `job.failed`, `alert.stale`, …
    pub kind: String,
    pub severity: Severity,
    /// `system`, `user:NAME`, `device:ID` or `cli`.
    pub actor: String,
    pub device_id: Option<String>,
    pub message: String,
}

impl NewEvent {
    pub fn system(kind: &str, severity: Severity, message: impl Into<String>) -> NewEvent {
        NewEvent {
            at_ms: crate::clock::now_ms(),
            kind: kind.to_owned(),
            severity,
            actor: "system".to_owned(),
            device_id: None,
            message: message.into(),
        }
    }

    pub fn for_device(mut self, device_id: &str) -> NewEvent {
        self.device_id = Some(device_id.to_owned());
        self
    }

    pub fn by(mut self, actor: impl Into<String>) -> NewEvent {
        self.actor = actor.into();
        self
    }

    /// The chain hash of this event recorded after an event whose hash is `prev`.
    pub fn chain_hash(&self, prev: &Id) -> Id {
        let mut h = blake3::Hasher::new();
        h.update(b"morgana event v1\0");
        h.update(&prev.0);
        h.update(&self.at_ms.to_le_bytes());
        for field in [
            self.kind.as_str(),
            self.severity.name(),
            &self.actor,
            self.device_id.as_deref().unwrap_or(""),
            &self.message,
        ] {
            h.update(&(field.len() as u64).to_le_bytes());
            h.update(field.as_bytes());
        }
        h.update(&[u8::from(self.device_id.is_some())]);
        Id(*h.finalize().as_bytes())
    }
}

/// Records `event`; a failure to record is logged, never passed on: the action the event
/// describes has already happened and must not be reported as failed because of its log.
pub async fn record(catalog: &dyn crate::catalog::Catalog, event: NewEvent) {
    if let Err(e) = catalog.record_event(&event).await {
        tracing::warn!(error = %e, kind = %event.kind, message = %event.message, "cannot record an event");
    }
}

/// A recorded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Grows with every event; pages are keyed by it.
    pub seq: i64,
    pub event: NewEvent,
    pub hash: Id,
}

/// Which events a page holds. Empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub device_id: Option<String>,
    /// Kinds starting with this, e.g. `alert.` or `job.failed`.
    pub kind_prefix: Option<String>,
    pub min_severity: Option<Severity>,
}

/// The newest event a verification reached: a later one can start from it. Held in memory
/// only, so that rewriting the catalog cannot rewrite it too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainAnchor {
    pub seq: i64,
    pub hash: Id,
    /// Events up to and including `seq`.
    pub events: u64,
}

/// Where the chain first fails to verify, if anywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainCheck {
    Intact {
        events: u64,
    },
    /// The event at `seq` does not hash to what the chain says: it, or one before it, was
    /// changed, inserted or removed.
    BrokenAt {
        seq: i64,
        events_before: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_hash_covers_every_field_and_the_previous_hash() {
        let e = NewEvent {
            at_ms: 5,
            kind: "job.failed".into(),
            severity: Severity::Error,
            actor: "system".into(),
            device_id: Some("abc".into()),
            message: "restore failed".into(),
        };
        let base = e.chain_hash(&Id([0; 32]));
        assert_ne!(base, e.chain_hash(&Id([1; 32])));
        let mut changed = e.clone();
        changed.message.push('!');
        assert_ne!(base, changed.chain_hash(&Id([0; 32])));
        let mut no_device = e.clone();
        no_device.device_id = Some(String::new());
        let mut none = e.clone();
        none.device_id = None;
        assert_ne!(
            no_device.chain_hash(&Id([0; 32])),
            none.chain_hash(&Id([0; 32]))
        );
        // Moving bytes between fields must change the hash.
        let mut shifted = e.clone();
        shifted.kind = "job.faile".into();
        shifted.severity = Severity::Error;
        shifted.actor = "dsystem".into();
        assert_ne!(base, shifted.chain_hash(&Id([0; 32])));
    }
}
