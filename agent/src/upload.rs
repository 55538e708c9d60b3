//! The upload stage: blobs (chunks from the readers, trees from the finaliser) are checked
//! against the appliance in batches, only the missing ones are compressed (in parallel),
//! packed, and uploaded with at most two packs in flight.
//!
//! Memory is bounded by a byte [`Budget`]: a blob takes a lease on its raw size before it
//! enters the stage and gives it back once it is in a pack (or dropped as a duplicate), so
//! readers wait when the appliance or the network is the bottleneck. Packs are uploaded as
//! they fill: a sync killed midway has left every finished pack on the appliance, and the
//! next run's missing queries skip them.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use morgana_core::Id;
use morgana_core::pack::{
    BlobKind, Codec, Compression, DEFAULT_ZSTD_LEVEL, PackBuilder, TARGET_PACK_BYTES,
};
use tokio::runtime::Handle;

use crate::client::{Client, ClientError};

/// Raw blob bytes allowed between the readers and the packs.
pub const BUDGET_BYTES: usize = 16 * 1024 * 1024;
/// A missing query is sent once a batch holds this many ids or bytes, or nothing new has
/// arrived for [`BATCH_IDLE`].
const BATCH_IDS: usize = 4096;
const BATCH_BYTES: usize = 4 * 1024 * 1024;
const BATCH_IDLE: Duration = Duration::from_millis(3);
/// Ids known to be on the appliance or already queued this session; cleared when full so
/// memory stays flat (forgetting only costs a repeated question).
const SEEN_MAX: usize = 128 * 1024;
const UPLOADS_IN_FLIGHT: usize = 2;
const QUERIES_IN_FLIGHT: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("an upload or query task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// Another stage failed first; its error is the one to report.
    #[error("the sync was cancelled")]
    Cancelled,
}

/// A counting semaphore over bytes, abortable so that no stage waits forever after
/// another has failed.
pub struct Budget {
    state: Mutex<Held>,
    cv: Condvar,
    cap: usize,
}

#[derive(Default)]
struct Held {
    bytes: usize,
    waiters: usize,
    /// The largest request among the waiters (or that waited since there were none).
    largest_wait: usize,
    aborted: bool,
}

/// Bytes held from a [`Budget`], given back on drop.
pub struct Lease {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Budget {
    pub fn new(cap: usize) -> Arc<Budget> {
        Arc::new(Budget {
            state: Mutex::new(Held::default()),
            cv: Condvar::new(),
            cap,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for `bytes` (capped at the whole budget, so one huge tree cannot wait forever).
    pub fn acquire(self: &Arc<Self>, bytes: usize) -> Result<Lease, UploadError> {
        let bytes = bytes.min(self.cap);
        let mut st = self.lock();
        loop {
            if st.aborted {
                return Err(UploadError::Cancelled);
            }
            if st.bytes + bytes <= self.cap {
                st.bytes += bytes;
                return Ok(Lease {
                    budget: self.clone(),
                    bytes,
                });
            }
            st.waiters += 1;
            st.largest_wait = st.largest_wait.max(bytes);
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            st.waiters -= 1;
            if st.waiters == 0 {
                st.largest_wait = 0;
            }
        }
    }

    pub fn is_aborted(&self) -> bool {
        self.lock().aborted
    }

    /// Wakes every waiter with [`UploadError::Cancelled`].
    pub fn abort(&self) {
        self.lock().aborted = true;
        self.cv.notify_all();
    }
}

impl Drop for Lease {
    /// Wakes the waiters only once the largest of them fits: a wake-up is a system call
    /// whether anyone waits or not, and waking readers for every small blob packed (one
    /// wake-up per blob, half of the agent's futex calls) only sent them back to sleep.
    /// Leases drain to zero whatever the readers do, so every waiter is woken in the end.
    fn drop(&mut self) {
        let wake = {
            let mut st = self.budget.lock();
            st.bytes -= self.bytes;
            st.waiters > 0 && st.bytes + st.largest_wait <= self.budget.cap
        };
        if wake {
            self.budget.cv.notify_all();
        }
    }
}

pub struct Blob {
    pub id: Id,
    pub kind: BlobKind,
    pub data: Vec<u8>,
    _lease: Lease,
}

/// Where readers and the finaliser hand blobs to the stage.
#[derive(Clone)]
pub struct BlobSink {
    tx: Sender<Blob>,
    budget: Arc<Budget>,
}

impl BlobSink {
    pub fn new(tx: Sender<Blob>, budget: Arc<Budget>) -> BlobSink {
        BlobSink { tx, budget }
    }

    /// Whether a stage has failed and the sync is being abandoned.
    pub fn is_cancelled(&self) -> bool {
        self.budget.is_aborted()
    }

    pub fn send(&self, id: Id, kind: BlobKind, data: Vec<u8>) -> Result<(), UploadError> {
        let lease = self.budget.acquire(data.len())?;
        self.tx
            .send(Blob {
                id,
                kind,
                data,
                _lease: lease,
            })
            .map_err(|_| UploadError::Cancelled)
    }
}

/// Ids are BLAKE3 output: their first bytes are already a good hash.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 |= (*b as u64) << (8 * i);
        }
    }
}

type IdSet = HashSet<Id, BuildHasherDefault<IdHasher>>;

type MissingQuery = tokio::task::JoinHandle<Result<Vec<Id>, ClientError>>;

/// Batches incoming blobs, asks the appliance which it lacks, and passes those on. Up to
/// [`QUERIES_IN_FLIGHT`] questions are outstanding, so compression does not stall on one
/// round trip.
pub fn dedup(
    rx: Receiver<Blob>,
    out: Sender<Blob>,
    client: Arc<Client>,
    rt: &Handle,
) -> Result<(), UploadError> {
    let mut seen = IdSet::default();
    let mut batch: Vec<Blob> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut asked: VecDeque<(MissingQuery, Vec<Blob>)> = VecDeque::new();
    // Hands on the blobs of the oldest question the appliance has answered.
    let settle =
        |asked: &mut VecDeque<(MissingQuery, Vec<Blob>)>, wait: bool| -> Result<(), UploadError> {
            while let Some((query, _)) = asked.front() {
                if !wait && !query.is_finished() {
                    break;
                }
                let Some((query, blobs)) = asked.pop_front() else {
                    break;
                };
                let missing: IdSet = rt.block_on(query)??.into_iter().collect();
                for blob in blobs {
                    if missing.contains(&blob.id) {
                        out.send(blob).map_err(|_| UploadError::Cancelled)?;
                    }
                }
                if wait {
                    break;
                }
            }
            Ok(())
        };
    loop {
        let (blob, closed) = match rx.recv_timeout(BATCH_IDLE) {
            Ok(b) => (Some(b), false),
            Err(RecvTimeoutError::Timeout) => (None, false),
            Err(RecvTimeoutError::Disconnected) => (None, true),
        };
        // A pause or the end of input both mean "ask about what you have": readers may be
        // waiting for the budget this batch holds.
        let idle = blob.is_none();
        if let Some(blob) = blob {
            // Repeats (zero blocks, copies) go no further: the lease is returned here. An id
            // counts as seen from the moment it is asked about.
            if seen.len() >= SEEN_MAX {
                seen.clear();
            }
            if seen.insert(blob.id) {
                batch_bytes += blob.data.len();
                batch.push(blob);
            }
        }
        settle(&mut asked, false)?;
        let full = batch.len() >= BATCH_IDS || batch_bytes >= BATCH_BYTES;
        if !batch.is_empty() && (full || idle) {
            if asked.len() >= QUERIES_IN_FLIGHT {
                settle(&mut asked, true)?;
            }
            let ids: Vec<Id> = batch.iter().map(|b| b.id).collect();
            let client = client.clone();
            let query = rt.spawn(async move { client.missing(&ids).await });
            asked.push_back((query, std::mem::take(&mut batch)));
            batch_bytes = 0;
        }
        if closed {
            while !asked.is_empty() {
                settle(&mut asked, true)?;
            }
            return Ok(());
        }
    }
}

pub struct Compressed {
    id: Id,
    kind: BlobKind,
    compression: Compression,
    stored: Vec<u8>,
    raw_len: u32,
    _lease: Lease,
}

/// Compresses blobs that the appliance lacks; run one per core.
pub fn compress(rx: Receiver<Blob>, out: Sender<Compressed>) -> Result<(), UploadError> {
    let mut codec = Codec::new(DEFAULT_ZSTD_LEVEL);
    let mut probe = Codec::new(1);
    let mut scratch = Vec::new();
    for blob in rx {
        let Blob {
            id,
            kind,
            data,
            _lease,
        } = blob;
        let raw_len = data.len() as u32;
        let (compression, stored) = if looks_incompressible(&mut probe, &data, &mut scratch) {
            (Compression::None, data)
        } else {
            match codec.compress_into(&data, &mut scratch) {
                Compression::None => (Compression::None, data),
                // An exact-size copy: the scratch buffer stays at its largest for reuse.
                c => (c, scratch.clone()),
            }
        };
        out.send(Compressed {
            id,
            kind,
            compression,
            stored,
            raw_len,
            _lease,
        })
        .map_err(|_| UploadError::Cancelled)?;
    }
    Ok(())
}

/// Bytes of a blob tried at a fast level before the whole blob is compressed.
const PROBE_BYTES: usize = 8 * 1024;

/// Below this order-0 entropy a sample is taken as compressible without trying. Random
/// bytes measure about 7.97 bits over 8 KiB.
const PROBE_ENTROPY_BITS: f64 = 7.5;

/// Order-0 (byte frequency) entropy of `data`.
fn bits_per_byte(data: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    for &b in data {
        counts[b as usize] += 1;
    }
    let n = data.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// Whether a blob is not worth compressing, judged from its first bytes: their byte
/// frequencies, then, if those look random, a trial at the fastest level. Already
/// compressed or encrypted data (media, archives, libraries' packed sections) is about half
/// of a desktop; searching it for matches at the real level costs most of the compression
/// time and gains nothing. A blob misjudged here is stored raw, which is always correct.
fn looks_incompressible(probe: &mut Codec, data: &[u8], scratch: &mut Vec<u8>) -> bool {
    if data.len() < 2 * PROBE_BYTES {
        return false;
    }
    let sample = &data[..PROBE_BYTES];
    // Text and code use well under 7 bits per byte and always compress. Counting bytes
    // says so far more cheaply than the trial, which was about a tenth of the agent's CPU
    // in a first sync of the benchmark tree.
    if bits_per_byte(sample) < PROBE_ENTROPY_BITS {
        return false;
    }
    match probe.compress_into(sample, scratch) {
        Compression::None => true,
        _ => scratch.len() * 100 > sample.len() * 97,
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct UploadTotals {
    pub packs: u64,
    /// Chunks the appliance stored as new (trees not counted).
    pub new_chunks: u64,
    pub new_blobs: u64,
}

/// Pack buffers, back from finished uploads. Each pack is then written into memory that is
/// already mapped: a fresh 17 MiB buffer per pack cost about 4,300 page faults, each one
/// zeroing a page (and, on a VM that hands freed pages back to its host, a host fault).
/// At most [`UPLOADS_IN_FLIGHT`] + 1 buffers exist, the packs that are live anyway.
#[derive(Clone, Default)]
struct PackBuffers(Arc<Mutex<Vec<Vec<u8>>>>);

impl PackBuffers {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default()
    }

    /// `buf` as an upload body that comes back here when the upload lets go of it.
    fn lend(&self, buf: Vec<u8>) -> bytes::Bytes {
        bytes::Bytes::from_owner(Lent {
            buf,
            home: self.clone(),
        })
    }
}

struct Lent {
    buf: Vec<u8>,
    home: PackBuffers,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.home
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(buf);
    }
}

/// Fills packs and uploads each as soon as it passes the target size.
pub fn pack(
    rx: Receiver<Compressed>,
    client: Arc<Client>,
    rt: &Handle,
) -> Result<UploadTotals, UploadError> {
    let permits = Arc::new(tokio::sync::Semaphore::new(UPLOADS_IN_FLIGHT));
    let mut uploads: Vec<tokio::task::JoinHandle<Result<UploadTotals, UploadError>>> = Vec::new();
    let mut totals = UploadTotals::default();
    let mut builder: Option<PackBuilder> = None;
    let mut chunks_in_pack = 0u64;
    let buffers = PackBuffers::default();

    let send = |b: PackBuilder,
                chunks: u64,
                uploads: &mut Vec<tokio::task::JoinHandle<_>>,
                totals: &mut UploadTotals|
     -> Result<(), UploadError> {
        // Waiting for a permit before finishing keeps at most two packs in flight plus the
        // one being filled.
        let permit = rt
            .block_on(permits.clone().acquire_owned())
            .map_err(|_| UploadError::Cancelled)?;
        let body = buffers.lend(b.finish().bytes);
        let client = client.clone();
        uploads.push(rt.spawn(async move {
            let accepted = client.upload_pack(body).await?;
            drop(permit);
            Ok(UploadTotals {
                packs: 1,
                new_chunks: chunks.saturating_sub(accepted.duplicate_blobs),
                new_blobs: accepted.new_blobs,
            })
        }));
        // Collect finished uploads as we go so that a failure stops the sync early.
        let mut i = 0;
        while i < uploads.len() {
            if uploads[i].is_finished() {
                let t = rt.block_on(uploads.swap_remove(i))??;
                add(totals, t);
            } else {
                i += 1;
            }
        }
        Ok(())
    };

    for blob in rx {
        let b = builder.get_or_insert_with(|| PackBuilder::with_buffer(buffers.take()));
        b.add_stored(
            blob.id,
            blob.kind,
            blob.compression,
            &blob.stored,
            blob.raw_len,
        );
        if blob.kind == BlobKind::Chunk {
            chunks_in_pack += 1;
        }
        drop(blob);
        if b.len() >= TARGET_PACK_BYTES
            && let Some(full) = builder.take()
        {
            send(full, chunks_in_pack, &mut uploads, &mut totals)?;
            chunks_in_pack = 0;
        }
    }
    if let Some(last) = builder.take().filter(|b| !b.is_empty()) {
        send(last, chunks_in_pack, &mut uploads, &mut totals)?;
    }
    for u in uploads {
        let t = rt.block_on(u)??;
        add(&mut totals, t);
    }
    Ok(totals)
}

fn add(totals: &mut UploadTotals, t: UploadTotals) {
    totals.packs += t.packs;
    totals.new_chunks += t.new_chunks;
    totals.new_blobs += t.new_blobs;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize) -> Vec<u8> {
        morgana_core::testdata::noise(n, 1)
    }

    #[test]
    fn a_pack_buffer_comes_back_once_its_upload_lets_go() {
        let buffers = PackBuffers::default();
        let mut buf = buffers.take();
        buf.extend_from_slice(b"pack bytes");
        let (ptr, capacity) = (buf.as_ptr(), buf.capacity());
        let body = buffers.lend(buf);
        let clone = body.clone();
        drop(body);
        assert_eq!(buffers.take().capacity(), 0, "still lent to a clone");
        assert_eq!(&clone[..], b"pack bytes");
        drop(clone);
        let back = buffers.take();
        assert_eq!((back.as_ptr(), back.capacity()), (ptr, capacity));
    }

    #[test]
    fn incompressible_blobs_are_stored_raw_and_text_is_compressed() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (out_tx, out_rx) = crossbeam_channel::unbounded();
        let budget = Budget::new(1 << 30);
        let sink = BlobSink::new(tx, budget);
        let noise = random(100_000);
        let text = b"the quick brown fox jumps over the lazy dog ".repeat(2000);
        for data in [&noise, &text] {
            sink.send(Id::of(data), BlobKind::Chunk, data.clone())
                .unwrap();
        }
        drop(sink);
        compress(rx, out_tx).unwrap();
        let got: Vec<Compressed> = out_rx.iter().collect();
        assert_eq!(got[0].compression, Compression::None);
        assert_eq!(got[0].stored, noise);
        assert_eq!(got[1].compression, Compression::Zstd);
        let mut codec = Codec::new(1);
        let back = codec
            .open(
                got[1].id,
                got[1].compression,
                &got[1].stored,
                got[1].raw_len,
            )
            .unwrap();
        assert_eq!(back, text);
    }

    #[test]
    fn entropy_tells_text_from_noise() {
        let text = b"the quick brown fox jumps over the lazy dog ".repeat(200);
        assert!(bits_per_byte(&text[..PROBE_BYTES]) < 5.0);
        assert!(bits_per_byte(&random(PROBE_BYTES)) > PROBE_ENTROPY_BITS);
        assert_eq!(bits_per_byte(&[7; 100]), 0.0);
        // One random 4 KiB block, five times: high entropy, yet zstd shrinks it. The trial
        // compression, not the byte count, decides.
        let block = random(4096);
        let doubled = [block.as_slice(), &block, &block, &block, &block].concat();
        assert!(bits_per_byte(&doubled[..PROBE_BYTES]) > PROBE_ENTROPY_BITS);
        let (mut probe, mut scratch) = (Codec::new(1), Vec::new());
        assert!(!looks_incompressible(&mut probe, &doubled, &mut scratch));
        assert!(looks_incompressible(
            &mut probe,
            &random(3 * PROBE_BYTES),
            &mut scratch
        ));
    }

    #[test]
    fn budget_blocks_until_leases_return_and_aborts() {
        let b = Budget::new(100);
        let l1 = b.acquire(60).unwrap();
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.acquire(60).map(|_| ()));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished());
        drop(l1);
        assert!(t.join().unwrap().is_ok());
        // More than the whole budget is capped to it rather than waiting forever.
        let _l = b.acquire(1000).unwrap();
        let b3 = b.clone();
        let t = std::thread::spawn(move || b3.acquire(1).map(|_| ()));
        std::thread::sleep(Duration::from_millis(20));
        b.abort();
        assert!(matches!(t.join().unwrap(), Err(UploadError::Cancelled)));
    }

    #[test]
    fn waiters_small_and_large_all_get_through_as_leases_drain() {
        let b = Budget::new(100);
        let mut held: Vec<Lease> = (0..4).map(|_| b.acquire(25).unwrap()).collect();
        let waiter = |bytes| {
            let b = b.clone();
            std::thread::spawn(move || b.acquire(bytes).map(|l| l.bytes))
        };
        let (large, small) = (waiter(70), waiter(10));
        std::thread::sleep(Duration::from_millis(20));
        // 25 free: the large waiter does not fit yet, so nobody is woken for it.
        held.pop();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!large.is_finished());
        held.clear();
        assert_eq!(large.join().unwrap().unwrap(), 70);
        assert_eq!(small.join().unwrap().unwrap(), 10);
    }
}
