//! The batcher and the fetch workers: they turn the planner's ops into batches of work for
//! the writer, each with the verified chunks it needs, fetched in one request.
//!
//! Many small files share one request (a round trip per file would dominate a desktop's
//! restore); a large file is split over as many batches as it needs, so it is streamed,
//! never held. A chunk repeated within a batch is fetched once, and a chunk known to be all
//! zeros is not fetched again at all.

use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::Duration;

use morgana_core::Id;
use morgana_core::pack::Codec;
use morgana_core::tree::Content;
use morgana_core::wire::MAX_IDS_PER_REQUEST;

use super::plan::{Node, Op};
use super::{
    BATCH_BYTES, BATCH_ITEMS, BlobSource, IdMap, RestoreError, ZeroChunks, fetch_in_order, is_zero,
};

/// How long a partly filled batch waits for more ops (the planner is waiting on a tree)
/// before it is fetched anyway, so the writer does not sit idle.
const FLUSH_AFTER: Duration = Duration::from_millis(2);

/// One unit of the writer's work, in order.
#[derive(Debug)]
pub(super) enum Item {
    /// Anything but the chunks of a file.
    Op(Op),
    /// Chunks `range` of a chunked file: the first range opens the file, the last one
    /// finishes it.
    Chunks {
        node: Arc<Node>,
        range: Range<usize>,
    },
}

/// A verified chunk, or why it cannot be used.
#[derive(Debug)]
pub(super) enum Blob {
    Data(Vec<u8>),
    /// All zero bytes, this many: a hole.
    Zero(u32),
    Bad(String),
}

#[derive(Debug, Default)]
pub(super) struct Batch {
    pub items: Vec<Item>,
    pub blobs: IdMap<Blob>,
    /// Stored bytes and blobs received for this batch.
    pub fetched_bytes: u64,
    pub fetched_chunks: u64,
}

/// What a batch will fetch, while it is being filled.
#[derive(Default)]
pub(super) struct Builder {
    batch: Batch,
    ids: Vec<Id>,
    /// Estimated raw bytes of `ids`.
    bytes: u64,
}

impl Builder {
    fn is_full(&self) -> bool {
        self.ids.len() >= MAX_IDS_PER_REQUEST
            || self.bytes >= BATCH_BYTES
            || self.batch.items.len() >= BATCH_ITEMS
    }

    /// Takes chunks of `node` from `start` on while they fit; returns where it stopped.
    fn add_chunks(&mut self, node: &Node, start: usize, zeros: &ZeroChunks) -> usize {
        let Content::Chunks { chunks, .. } = &node.entry.content else {
            unreachable!("only chunked files are split")
        };
        // Chunk lengths are not in the tree; the file's average is a good estimate.
        let estimate = (node.entry.size / chunks.len() as u64).max(1);
        for (i, id) in chunks.iter().enumerate().skip(start) {
            if self.batch.blobs.contains_key(id) || zeros.get(id).is_some() {
                continue;
            }
            if self.ids.len() >= MAX_IDS_PER_REQUEST
                || (self.bytes + estimate > BATCH_BYTES && !self.ids.is_empty())
            {
                return i;
            }
            // A placeholder until the fetch fills it: marks the id as wanted.
            self.batch
                .blobs
                .insert(*id, Blob::Bad("not fetched".into()));
            self.ids.push(*id);
            self.bytes += estimate;
        }
        chunks.len()
    }
}

/// A batch ready to fetch, or the planner's failure to pass on in its place.
pub(super) struct Job(Result<Builder, RestoreError>);

/// Groups the planner's ops into batches and deals them round-robin to the fetch workers.
/// The writer takes results in the same round-robin order, so batches stay in order
/// without a reordering buffer, and several requests are in flight at once.
pub(super) fn batch(
    zeros: &ZeroChunks,
    ops: Receiver<Result<Op, RestoreError>>,
    workers: Vec<SyncSender<Job>>,
) {
    let mut next_worker = (0..workers.len()).cycle();
    let mut send = |job: Job| {
        workers[next_worker.next().expect("cycle")]
            .send(job)
            .is_ok()
    };
    // A chunked file not yet wholly in a batch, and its first chunk not yet taken.
    let mut carry: Option<(Arc<Node>, usize)> = None;
    let mut planner_done = false;
    let mut failure = None;
    while !planner_done || carry.is_some() {
        let mut b = Builder::default();
        loop {
            if let Some((node, start)) = carry.take() {
                let end = b.add_chunks(&node, start, zeros);
                let len = chunk_count(&node);
                if end > start || len == 0 {
                    b.batch.items.push(Item::Chunks {
                        node: node.clone(),
                        range: start..end,
                    });
                }
                if end < len {
                    carry = Some((node, end));
                    break;
                }
            }
            if b.is_full() {
                break;
            }
            let next = if b.batch.items.is_empty() {
                ops.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                ops.recv_timeout(FLUSH_AFTER)
            };
            match next {
                Ok(Ok(Op::Leaf(node))) if matches!(node.entry.content, Content::Chunks { .. }) => {
                    carry = Some((node, 0));
                }
                Ok(Ok(op)) => b.batch.items.push(Item::Op(op)),
                Ok(Err(e)) => {
                    // What came before the failure is still written, then it is reported.
                    failure = Some(e);
                    planner_done = true;
                    break;
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    planner_done = true;
                    break;
                }
            }
        }
        // A send fails only when the writer has stopped (and reports why).
        if !b.batch.items.is_empty() && !send(Job(Ok(b))) {
            return;
        }
    }
    if let Some(e) = failure {
        send(Job(Err(e)));
    }
}

/// A fetch worker: fetches and verifies its batches, then waits until the writer takes
/// each one (so at most one finished batch per worker is held).
pub(super) fn work(
    source: &dyn BlobSource,
    zeros: &ZeroChunks,
    jobs: Receiver<Job>,
    out: SyncSender<Result<Batch, RestoreError>>,
) {
    let mut codec = Codec::new(morgana_core::pack::DEFAULT_ZSTD_LEVEL);
    for Job(job) in jobs {
        let batch = job.and_then(|b| fetch(source, &mut codec, zeros, b));
        let failed = batch.is_err();
        if out.send(batch).is_err() || failed {
            return;
        }
    }
}

fn chunk_count(node: &Node) -> usize {
    match &node.entry.content {
        Content::Chunks { chunks, .. } => chunks.len(),
        _ => 0,
    }
}

/// Fetches a batch's chunks, verifying each (decompression and BLAKE3) as it arrives so
/// that only verified raw bytes are kept.
fn fetch(
    source: &dyn BlobSource,
    codec: &mut Codec,
    zeros: &ZeroChunks,
    b: Builder,
) -> Result<Batch, RestoreError> {
    let Builder { mut batch, ids, .. } = b;
    for part in ids.chunks(MAX_IDS_PER_REQUEST) {
        fetch_in_order(source, part, "chunk", &mut |frame, stored| {
            let blob = match frame.kind {
                None => Blob::Bad("the appliance does not have it".into()),
                Some(_) => match codec.open(frame.id, frame.compression, stored, frame.raw_len) {
                    Err(e) => Blob::Bad(e.to_string()),
                    Ok(raw) if is_zero(&raw) => {
                        zeros.insert(frame.id, raw.len() as u32);
                        Blob::Zero(raw.len() as u32)
                    }
                    Ok(raw) => Blob::Data(raw),
                },
            };
            batch.fetched_bytes += stored.len() as u64;
            batch.fetched_chunks += 1;
            batch.blobs.insert(frame.id, blob);
            Ok(())
        })?;
    }
    Ok(batch)
}
