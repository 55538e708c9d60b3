//! Committing snapshots: a snapshot is recorded only once everything its root tree reaches
//! (subtrees and chunks) is stored, so a committed snapshot can always be restored.
//!
//! The walk is depth-first with an explicit stack, so memory follows the tree's depth and
//! the widest directory, not the repository. A tree whose closure was verified once is
//! recorded as complete and never walked again: incremental commits touch only what changed.

use std::collections::HashSet;
use std::sync::Arc;

use morgana_core::Id;
use morgana_core::tree::{Content, Tree, TreeError};

use crate::catalog::{Catalog, CatalogError};
use crate::store::{PackStore, PackStoreError, with_codec};

/// At most this many missing ids are reported back (and the walk stops there).
pub const MAX_REPORTED_MISSING: usize = 100;

/// Verified trees and files are written in batches of about this many: a write
/// transaction per directory made a first commit cost thousands of fsyncs.
const RECORD_BATCH: usize = 2000;

/// Trees and whole files verified in this walk and not yet written to the catalog.
#[derive(Default)]
struct Verified {
    trees: Vec<Id>,
    files: Vec<Id>,
}

impl Verified {
    fn len(&self) -> usize {
        self.trees.len() + self.files.len()
    }

    async fn flush(&mut self, catalog: &Arc<dyn Catalog>) -> Result<(), CatalogError> {
        if self.len() > 0 {
            catalog.record_verified(&self.trees, &self.files).await?;
            self.trees.clear();
            self.files.clear();
        }
        Ok(())
    }
}

#[derive(Debug)]
pub enum Closure {
    Complete,
    /// A sample of ids the snapshot references that are not stored.
    Missing(Vec<Id>),
}

#[derive(Debug, thiserror::Error)]
pub enum ClosureError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] PackStoreError),
    #[error("tree {id} cannot be used: {source}")]
    BadTree { id: Id, source: TreeError },
    #[error("reading a stored tree was interrupted: {0}")]
    Task(#[from] tokio::task::JoinError),
}

struct Frame {
    tree: Id,
    /// Subtrees not visited yet.
    subtrees: Vec<Id>,
    /// False once anything below this tree is found missing.
    ok: bool,
}

/// Verifies that the closure of `root` is stored, marking every tree whose closure turns
/// out complete, and recording whole-file ids of multi-chunk files whose chunks are stored.
pub async fn verify_closure(catalog: &Arc<dyn Catalog>, root: Id) -> Result<Closure, ClosureError> {
    if catalog.tree_complete(root).await? {
        return Ok(Closure::Complete);
    }
    let mut missing = Vec::new();
    // Trees found incomplete in this walk: a directory shared many times over must not be
    // walked again each time (a hostile DAG would make that exponential).
    let mut failed: HashSet<Id> = HashSet::new();
    // Trees verified in this walk (their parents' frames were filtered before they were).
    let mut verified: HashSet<Id> = HashSet::new();
    let mut pending = Verified::default();
    let Some(first) = load(catalog, root, &mut missing, &mut pending).await? else {
        return Ok(Closure::Missing(vec![root]));
    };
    let mut stack = vec![first];
    while missing.len() < MAX_REPORTED_MISSING {
        let Some(top) = stack.last_mut() else { break };
        if let Some(child) = top.subtrees.pop() {
            if failed.contains(&child) {
                top.ok = false;
                continue;
            }
            if verified.contains(&child) {
                continue;
            }
            match load(catalog, child, &mut missing, &mut pending).await? {
                Some(frame) => stack.push(frame),
                None => {
                    note_missing(&mut missing, child);
                    if let Some(top) = stack.last_mut() {
                        top.ok = false;
                    }
                }
            }
        } else {
            let Some(done) = stack.pop() else { break };
            if done.ok {
                pending.trees.push(done.tree);
                if pending.len() >= RECORD_BATCH {
                    pending.flush(catalog).await?;
                }
                verified.insert(done.tree);
            } else {
                failed.insert(done.tree);
                if let Some(parent) = stack.last_mut() {
                    parent.ok = false;
                }
            }
        }
    }
    // What was verified stays recorded even when the snapshot as a whole is incomplete.
    pending.flush(catalog).await?;
    Ok(if missing.is_empty() {
        Closure::Complete
    } else {
        Closure::Missing(missing)
    })
}

fn note_missing(missing: &mut Vec<Id>, id: Id) {
    if missing.len() < MAX_REPORTED_MISSING && !missing.contains(&id) {
        missing.push(id);
    }
}

/// Reads and decodes one tree and checks its chunks; `None` if the tree is not stored.
async fn load(
    catalog: &Arc<dyn Catalog>,
    id: Id,
    missing: &mut Vec<Id>,
    verified: &mut Verified,
) -> Result<Option<Frame>, ClosureError> {
    let Some(Some(loc)) = catalog.locate_blobs(&[id]).await?.into_iter().next() else {
        return Ok(None);
    };
    let tree = tokio::task::spawn_blocking(move || -> Result<Tree, ClosureError> {
        let raw = with_codec(|codec| PackStore::read_blob(&loc, codec))?;
        Tree::decode(&raw).map_err(|source| ClosureError::BadTree { id, source })
    })
    .await??;

    let mut subtrees = Vec::new();
    let mut seen_subtrees = HashSet::new();
    let mut chunks = Vec::new();
    let mut seen_chunks = HashSet::new();
    for entry in &tree.entries {
        match &entry.content {
            Content::Tree(t) if seen_subtrees.insert(*t) => subtrees.push(*t),
            Content::Chunks { chunks: ids, .. } => {
                chunks.extend(ids.iter().filter(|c| seen_chunks.insert(**c)));
            }
            _ => {}
        }
    }
    let mut subtrees = catalog.incomplete_trees(&subtrees).await?;
    let absent = catalog.missing_blobs(&chunks).await?;
    for c in &absent {
        note_missing(missing, *c);
    }
    let ok = absent.is_empty();
    if ok {
        verified
            .files
            .extend(tree.entries.iter().filter_map(|e| match &e.content {
                Content::Chunks { file, chunks } if chunks.len() > 1 => Some(*file),
                _ => None,
            }));
    }
    // Popped from the end: reverse so subtrees are visited in name order.
    subtrees.reverse();
    Ok(Some(Frame {
        tree: id,
        subtrees,
        ok,
    }))
}
