//! Downloads through branch reflectors (DESIGN flow 5). Before a layer apply (never a
//! restore: a device's own data is not cached on a neighbour) the agent gathers candidates — the appliance's list of live reflectors, plus those
//! answering over mDNS when that is on —, ranks them with `reflectors::rank` (the
//! appliance's `reflector-selector` plugin or the built-in decides), and then fetches each
//! batch of blobs from the best reflector, verifying every blob against its BLAKE3 id.
//!
//! Whatever a reflector does not deliver goes to the next one and finally to the
//! appliance: a blob it lacks, one that does not verify, a frame out of order, a refused
//! or dropped connection. A reflector that failed (as opposed to lacking a blob) is not
//! asked again during this download. So a dead or lying reflector costs time, never a
//! wrong byte or a failed apply.
//!
//! What came from where is logged and kept in the state directory (`last-download.json`).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use morgana_core::Id;
use morgana_core::pack::{Codec, DEFAULT_ZSTD_LEVEL};
use morgana_core::plugin::types::ReflectorCandidate;
use morgana_core::wire::BlobFrame;
use serde::Serialize;
use tracing::{info, warn};

use crate::client::Client;
use crate::restore::{OnBlob, RestoreError};
use crate::state::State;

pub const STATS_FILE: &str = "last-download.json";

/// Browse mDNS before downloads (set once by `run --mdns`).
static MDNS: AtomicBool = AtomicBool::new(false);

pub fn enable_mdns(on: bool) {
    MDNS.store(on, Ordering::Relaxed);
}

/// Where one download's blobs came from.
#[derive(Debug, Default, Serialize)]
pub struct Downloads {
    /// Every candidate found, and how.
    pub candidates: Vec<Found>,
    /// Candidate ids, best first, and who ranked them.
    pub ranked: Vec<String>,
    pub decided_by: String,
    /// Frame bytes (header and stored) delivered from each reflector, verified.
    pub from_reflectors: BTreeMap<String, u64>,
    /// Frame bytes the appliance delivered.
    pub from_appliance: u64,
    /// Reflectors given up on, and why.
    pub failed: Vec<Failure>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Found {
    pub id: String,
    pub address: String,
    /// `appliance` or `mdns`.
    pub via: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    pub reflector: String,
    pub reason: String,
}

/// A reflector in ranked order.
struct Peer {
    id: String,
    transport: Transport,
    failed: AtomicBool,
}

enum Transport {
    Https(Client),
    #[cfg(test)]
    Fake(tests::Fake),
}

/// One answer's frames.
enum Answer {
    Https(crate::client::BlobStream),
    #[cfg(test)]
    Fake(tests::FakeFrames),
}

impl Peer {
    async fn ask(&self, ids: &[Id]) -> Result<Answer, String> {
        match &self.transport {
            Transport::Https(c) => c
                .fetch_blobs(ids)
                .await
                .map(Answer::Https)
                .map_err(|e| e.to_string()),
            #[cfg(test)]
            Transport::Fake(f) => f.answer(ids).map(Answer::Fake),
        }
    }
}

impl Answer {
    async fn next(&mut self) -> Result<Option<(BlobFrame, bytes::Bytes)>, String> {
        match self {
            Answer::Https(s) => s.next().await.map_err(|e| e.to_string()),
            #[cfg(test)]
            Answer::Fake(it) => it.next().transpose(),
        }
    }
}

/// The ranked reflectors of one download, and what they delivered.
pub struct Reflected {
    peers: Vec<Peer>,
    stats: Mutex<Downloads>,
    /// Where the stats are kept at the end.
    state: Option<State>,
}

/// The candidates for this device and their ranking; `None` when no reflector qualifies
/// (or none can be asked), and then everything comes from the appliance. Never fails: a
/// download must not depend on finding reflectors.
pub async fn discover(state: &State, client: &Client) -> Option<Arc<Reflected>> {
    let (candidates, found) = candidates(state, client, MDNS.load(Ordering::Relaxed)).await;
    if candidates.is_empty() {
        return None;
    }
    let ranking = match crate::reflectors::rank(state, client, candidates).await {
        Ok(r) => r,
        Err(e) => {
            warn!("ranking the branch reflectors failed: {e:#}; downloading from the appliance");
            return None;
        }
    };
    let mut peers = Vec::new();
    for id in &ranking.ranked {
        let Some(c) = ranking.candidates.iter().find(|c| &c.id == id) else {
            continue;
        };
        match Client::for_reflector(state, &c.address) {
            Ok(client) => peers.push(Peer {
                id: id.clone(),
                transport: Transport::Https(client),
                failed: AtomicBool::new(false),
            }),
            Err(e) => warn!(reflector = %id, "cannot use reflector at {}: {e}", c.address),
        }
    }
    info!(
        ranked = ?ranking.ranked,
        decided_by = %ranking.decided_by,
        "branch reflectors for this download"
    );
    if peers.is_empty() {
        return None;
    }
    Some(Arc::new(Reflected {
        peers,
        stats: Mutex::new(Downloads {
            candidates: found,
            ranked: ranking.ranked,
            decided_by: ranking.decided_by,
            ..Downloads::default()
        }),
        state: Some(state.clone()),
    }))
}

/// Reflectors other than this device: the appliance's list, and with `mdns` those
/// answering on the local network (for the same appliance CA). Never fails: what cannot
/// be asked is logged and left out.
pub async fn candidates(
    state: &State,
    client: &Client,
    mdns: bool,
) -> (Vec<ReflectorCandidate>, Vec<Found>) {
    let own_id = state.device().map(|d| d.device_id).unwrap_or_default();
    let mut found = Vec::new();
    let mut candidates: Vec<ReflectorCandidate> = Vec::new();
    match client.reflectors().await {
        Ok(list) => {
            for r in list {
                found.push(Found {
                    id: r.device_id.clone(),
                    address: r.address.clone(),
                    via: "appliance",
                });
                candidates.push(ReflectorCandidate {
                    id: r.device_id,
                    address: r.address,
                    subnet: r.subnet,
                    site: r.site,
                    load: r.load,
                    latency_ms: None,
                });
            }
        }
        Err(e) => warn!("cannot list the branch reflectors: {e}; looking no further than mDNS"),
    }
    if mdns {
        let pin = crate::mdns::ca_pin(state);
        let own = own_id.clone();
        let browsed = match pin {
            Ok(pin) => tokio::task::spawn_blocking(move || {
                crate::mdns::browse(pin, &own, crate::mdns::BROWSE_FOR)
            })
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the mDNS browse stopped: {e}"))),
            Err(e) => Err(e),
        };
        match browsed {
            Ok(list) => merge(&mut candidates, &mut found, list),
            Err(e) => warn!("browsing for reflectors over mDNS failed: {e:#}"),
        }
    }
    candidates.retain(|c| c.id != own_id);
    (candidates, found)
}

/// Adds mDNS answers the appliance did not list; for one it did list, the local answer's
/// address wins (it is the one seen from here).
fn merge(
    candidates: &mut Vec<ReflectorCandidate>,
    found: &mut Vec<Found>,
    browsed: Vec<ReflectorCandidate>,
) {
    for b in browsed {
        found.push(Found {
            id: b.id.clone(),
            address: b.address.clone(),
            via: "mdns",
        });
        match candidates.iter_mut().find(|c| c.id == b.id) {
            Some(c) => {
                c.address = b.address;
                if !b.subnet.is_empty() {
                    c.subnet = b.subnet;
                }
            }
            None => candidates.push(b),
        }
    }
}

/// The appliance as the last source: `BlobSource::fetch` without reflectors.
pub type Direct<'a> = dyn Fn(&[Id], &mut OnBlob<'_>) -> Result<(), RestoreError> + 'a;

/// How one reflector's part of a fetch ended.
enum End {
    /// Everything asked for was delivered.
    Done,
    /// It lacks the blob at the stop: the rest goes to the next source.
    Lacks,
    /// It failed: skip it from now on.
    Failed(String),
    /// The caller's own handling failed: stop everything.
    Caller(RestoreError),
}

impl Reflected {
    /// Delivers `ids` to `each` in request order (first occurrences), from the reflectors
    /// in rank order and then from `appliance` (`BlobSource::fetch` semantics, but every
    /// reflector frame is verified here before the caller sees it).
    pub fn fetch(
        &self,
        handle: &tokio::runtime::Handle,
        ids: &[Id],
        each: &mut OnBlob<'_>,
        appliance: &Direct<'_>,
    ) -> Result<(), RestoreError> {
        let mut seen = HashSet::with_capacity(ids.len());
        let ids: Vec<Id> = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
        let mut pos = 0;
        let mut codec = Codec::new(DEFAULT_ZSTD_LEVEL);
        for peer in &self.peers {
            if pos == ids.len() {
                break;
            }
            if peer.failed.load(Ordering::Relaxed) {
                continue;
            }
            let mut bytes = 0u64;
            let end = handle.block_on(from_peer(
                peer,
                &ids[pos..],
                &mut codec,
                &mut |frame, stored| {
                    bytes += (BlobFrame::HEADER_LEN + stored.len()) as u64;
                    each(frame, stored)
                },
                &mut pos,
            ));
            if bytes > 0 {
                *self
                    .lock()
                    .from_reflectors
                    .entry(peer.id.clone())
                    .or_default() += bytes;
            }
            match end {
                End::Done | End::Lacks => {}
                End::Caller(e) => return Err(e),
                End::Failed(reason) => {
                    warn!(reflector = %peer.id, "{reason}; falling back");
                    peer.failed.store(true, Ordering::Relaxed);
                    self.lock().failed.push(Failure {
                        reflector: peer.id.clone(),
                        reason,
                    });
                }
            }
        }
        if pos < ids.len() {
            let mut bytes = 0u64;
            let result = appliance(&ids[pos..], &mut |frame, stored| {
                bytes += (BlobFrame::HEADER_LEN + stored.len()) as u64;
                each(frame, stored)
            });
            self.lock().from_appliance += bytes;
            result?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Downloads> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Reflected {
    fn drop(&mut self) {
        let stats = self.lock();
        info!(
            from_reflectors = ?stats.from_reflectors,
            from_appliance = stats.from_appliance,
            failed = stats.failed.len(),
            "download sources"
        );
        let bytes = serde_json::to_vec(&*stats).expect("download stats serialize");
        if let Some(state) = &self.state
            && let Err(e) = state.write(STATS_FILE, &bytes, 0o600)
        {
            warn!("cannot keep the download's sources: {e}");
        }
    }
}

/// Takes frames for `ids` from `peer` while they come in order and verify; `pos` advances
/// by each one delivered to `each`.
async fn from_peer(
    peer: &Peer,
    ids: &[Id],
    codec: &mut Codec,
    each: &mut OnBlob<'_>,
    pos: &mut usize,
) -> End {
    let mut stream = match peer.ask(ids).await {
        Ok(s) => s,
        Err(e) => return End::Failed(format!("reflector {} did not answer: {e}", peer.id)),
    };
    let mut next = 0;
    loop {
        let (frame, stored) = match stream.next().await {
            Ok(Some(f)) => f,
            Ok(None) if next == ids.len() => return End::Done,
            Ok(None) => {
                return End::Failed(format!(
                    "reflector {} ended its answer after {next} of {} blobs",
                    peer.id,
                    ids.len()
                ));
            }
            Err(e) => return End::Failed(format!("reflector {} broke off: {e}", peer.id)),
        };
        let Some(&want) = ids.get(next) else {
            return End::Failed(format!(
                "reflector {} sent more blobs than asked for",
                peer.id
            ));
        };
        if frame.id != want {
            return End::Failed(format!(
                "reflector {} answered out of order ({} instead of {want})",
                peer.id, frame.id
            ));
        }
        if frame.kind.is_none() {
            return End::Lacks;
        }
        if let Err(e) = codec.open(frame.id, frame.compression, &stored, frame.raw_len) {
            return End::Failed(format!(
                "reflector {} sent blob {want} that does not verify: {e}",
                peer.id
            ));
        }
        if let Err(e) = each(frame, &stored) {
            return End::Caller(e);
        }
        next += 1;
        *pos += 1;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bytes::Bytes;
    use morgana_core::pack::{BlobKind, Compression};

    use super::*;

    pub(super) type FakeFrames = std::vec::IntoIter<Result<(BlobFrame, Bytes), String>>;

    /// A reflector in memory: what it holds, and how it misbehaves.
    #[derive(Default)]
    pub(super) struct Fake {
        blobs: HashMap<Id, Vec<u8>>,
        /// Serves these with a flipped byte.
        corrupt: HashSet<Id>,
        /// Refuses every request (a dead reflector).
        dead: bool,
        /// Breaks the connection after this many frames.
        break_after: Option<usize>,
        asked: Mutex<Vec<Vec<Id>>>,
    }

    impl Fake {
        pub(super) fn answer(&self, ids: &[Id]) -> Result<FakeFrames, String> {
            self.asked.lock().unwrap().push(ids.to_vec());
            if self.dead {
                return Err("connection refused".into());
            }
            let mut out = Vec::new();
            for (n, id) in ids.iter().enumerate() {
                if self.break_after == Some(n) {
                    out.push(Err("connection reset".into()));
                    break;
                }
                out.push(Ok(match self.blobs.get(id) {
                    Some(data) => {
                        let mut data = data.clone();
                        if self.corrupt.contains(id) {
                            data[0] ^= 1;
                        }
                        (frame(*id, data.len()), Bytes::from(data))
                    }
                    None => (BlobFrame::missing(*id), Bytes::new()),
                }));
            }
            Ok(out.into_iter())
        }
    }

    fn frame(id: Id, len: usize) -> BlobFrame {
        BlobFrame {
            id,
            kind: Some(BlobKind::Chunk),
            compression: Compression::None,
            raw_len: len as u32,
            stored_len: len as u32,
        }
    }

    fn blobs(n: u8) -> Vec<(Id, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let data = vec![i; 100 + usize::from(i)];
                (Id::of(&data), data)
            })
            .collect()
    }

    fn peer(id: &str, fake: Fake) -> Peer {
        Peer {
            id: id.into(),
            transport: Transport::Fake(fake),
            failed: AtomicBool::new(false),
        }
    }

    fn holding(all: &[(Id, Vec<u8>)]) -> Fake {
        Fake {
            blobs: all.iter().cloned().collect(),
            ..Fake::default()
        }
    }

    fn asked(r: &Reflected, n: usize) -> Vec<Vec<Id>> {
        match &r.peers[n].transport {
            Transport::Fake(f) => f.asked.lock().unwrap().clone(),
            Transport::Https(_) => unreachable!(),
        }
    }

    fn reflected(peers: Vec<Peer>) -> Reflected {
        Reflected {
            peers,
            stats: Mutex::new(Downloads::default()),
            state: None,
        }
    }

    /// Fetches `ids`; returns what the caller got, in order, and the ids the appliance was
    /// asked for.
    fn fetch(r: &Reflected, ids: &[Id], all: &[(Id, Vec<u8>)]) -> (Vec<(Id, Vec<u8>)>, Vec<Id>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let appliance_asked = Mutex::new(Vec::new());
        let store: HashMap<Id, Vec<u8>> = all.iter().cloned().collect();
        let appliance = |ids: &[Id], each: &mut OnBlob<'_>| {
            appliance_asked.lock().unwrap().extend_from_slice(ids);
            for id in ids {
                let data = &store[id];
                each(frame(*id, data.len()), data)?;
            }
            Ok(())
        };
        let mut got = Vec::new();
        r.fetch(
            rt.handle(),
            ids,
            &mut |f, stored| {
                got.push((f.id, stored.to_vec()));
                Ok(())
            },
            &appliance,
        )
        .unwrap();
        (got, appliance_asked.into_inner().unwrap())
    }

    #[test]
    fn the_best_reflector_serves_everything_it_holds_in_order() {
        let all = blobs(6);
        let ids: Vec<Id> = all.iter().map(|(id, _)| *id).collect();
        let r = reflected(vec![
            peer("best", holding(&all)),
            peer("second", holding(&all)),
        ]);
        let (got, from_appliance) = fetch(&r, &ids, &all);
        assert_eq!(got, all);
        assert!(from_appliance.is_empty());
        assert!(asked(&r, 1).is_empty(), "the second was not needed");
        let stats = r.lock();
        assert!(stats.from_reflectors["best"] > 0);
        assert_eq!(stats.from_appliance, 0);
    }

    #[test]
    fn a_dead_reflector_is_skipped_for_the_next_and_not_asked_again() {
        let all = blobs(4);
        let ids: Vec<Id> = all.iter().map(|(id, _)| *id).collect();
        let dead = Fake {
            dead: true,
            ..Fake::default()
        };
        let r = reflected(vec![peer("dead", dead), peer("alive", holding(&all))]);
        assert_eq!(fetch(&r, &ids[..2], &all).0, all[..2]);
        assert_eq!(fetch(&r, &ids[2..], &all).0, all[2..]);
        assert_eq!(asked(&r, 0).len(), 1, "a failed reflector is asked once");
        assert_eq!(asked(&r, 1).len(), 2);
        assert_eq!(r.lock().failed[0].reflector, "dead");
    }

    #[test]
    fn a_corrupt_blob_is_caught_and_the_rest_comes_from_the_next_source() {
        let all = blobs(5);
        let ids: Vec<Id> = all.iter().map(|(id, _)| *id).collect();
        let liar = Fake {
            corrupt: [ids[2]].into(),
            ..holding(&all)
        };
        let r = reflected(vec![peer("liar", liar)]);
        let (got, from_appliance) = fetch(&r, &ids, &all);
        assert_eq!(got, all, "every byte the caller saw is right, in order");
        assert_eq!(from_appliance, ids[2..], "from the bad blob on");
        let stats = r.lock();
        assert!(
            stats.failed[0].reason.contains("does not verify"),
            "{:?}",
            stats.failed
        );
        assert!(stats.from_appliance > 0);
    }

    #[test]
    fn a_missing_blob_goes_on_without_giving_up_on_the_reflector() {
        let all = blobs(4);
        let ids: Vec<Id> = all.iter().map(|(id, _)| *id).collect();
        let partial = holding(&[all[0].clone(), all[1].clone(), all[3].clone()]);
        let r = reflected(vec![peer("partial", partial), peer("full", holding(&all))]);
        let (got, from_appliance) = fetch(&r, &ids, &all);
        assert_eq!(got, all);
        assert!(from_appliance.is_empty());
        assert_eq!(asked(&r, 1), vec![ids[2..].to_vec()]);
        assert!(r.lock().failed.is_empty());
        // Still first in line for the next batch.
        fetch(&r, &ids[..1], &all);
        assert_eq!(asked(&r, 0).len(), 2);
    }

    #[test]
    fn a_connection_broken_mid_answer_falls_back_from_where_it_stopped() {
        let all = blobs(6);
        let ids: Vec<Id> = all.iter().map(|(id, _)| *id).collect();
        let flaky = Fake {
            break_after: Some(3),
            ..holding(&all)
        };
        let r = reflected(vec![peer("flaky", flaky)]);
        let (got, from_appliance) = fetch(&r, &ids, &all);
        assert_eq!(got, all);
        assert_eq!(from_appliance, ids[3..]);
    }

    #[test]
    fn duplicate_ids_are_answered_once_in_first_occurrence_order() {
        let all = blobs(3);
        let ids: Vec<Id> = all.iter().map(|(id, _)| *id).collect();
        // Asked for [0, 1, 0, 2]: first occurrences, like the appliance answers.
        let r = reflected(vec![peer("r", holding(&all))]);
        let (got, _) = fetch(&r, &[ids[0], ids[1], ids[0], ids[2]], &all);
        assert_eq!(got, all);
    }

    #[test]
    fn an_error_of_the_caller_stops_the_fetch_without_fallback() {
        let all = blobs(2);
        let ids: Vec<Id> = all.iter().map(|(id, _)| *id).collect();
        let r = reflected(vec![peer("r", holding(&all))]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let appliance_called = std::cell::Cell::new(false);
        let err = r
            .fetch(
                rt.handle(),
                &ids,
                &mut |_, _| Err(RestoreError::Protocol("disk full".into())),
                &|_, _| {
                    appliance_called.set(true);
                    Ok(())
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(!appliance_called.get());
        assert!(
            r.lock().failed.is_empty(),
            "the reflector did nothing wrong"
        );
    }

    #[test]
    fn mdns_answers_add_to_the_appliances_list_and_give_the_local_address() {
        let cand = |id: &str, addr: &str| ReflectorCandidate {
            id: id.into(),
            address: addr.into(),
            subnet: String::new(),
            site: None,
            load: 0.0,
            latency_ms: None,
        };
        let mut list = vec![cand("a", "10.0.0.1:8444")];
        let mut found = Vec::new();
        merge(
            &mut list,
            &mut found,
            vec![cand("a", "192.168.1.5:8444"), cand("b", "192.168.1.6:8444")],
        );
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].address, "192.168.1.5:8444");
        assert_eq!(found.iter().filter(|f| f.via == "mdns").count(), 2);
    }
}
