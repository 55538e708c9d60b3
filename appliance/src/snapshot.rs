//! Committing snapshots: a snapshot is recorded only once everything its root tree reaches
//! (subtrees and chunks) is stored, so a committed snapshot can always be restored.
//!
//! The walk goes breadth-first, a batch of trees at a time, so that a first commit of a
//! tree with thousands of directories costs a few catalog queries per batch rather than
//! per directory (per directory, it was a tenth of an initial sync's wall time). Memory
//! follows the number of trees this walk loads, not the repository: a tree whose closure
//! was verified once is recorded as complete and never walked again, so incremental
//! commits touch only what changed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use morgana_core::Id;
use morgana_core::tree::{Content, Tree, TreeError};

use crate::catalog::{BlobLocation, Catalog, CatalogError};
use crate::store::{PackStore, PackStoreError, with_codec};

/// At most this many missing ids are reported back (and the walk stops there).
pub const MAX_REPORTED_MISSING: usize = 100;

/// Trees loaded per round of the walk: one location query, a few read tasks and two
/// presence queries serve them all.
const WALK_BATCH: usize = 512;

/// Trees one blocking task reads: a batch spreads over `WALK_BATCH / TREES_PER_READ`
/// reads in flight.
const TREES_PER_READ: usize = 32;

/// Verified trees and files are written in batches of about this many, each batch one
/// write transaction.
const RECORD_BATCH: usize = 2000;

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

/// The trees one walk has reached, by position in breadth-first order.
#[derive(Default)]
struct Walk {
    trees: Vec<Id>,
    position: HashMap<Id, u32>,
    /// (child, parent) positions: a shared directory has several parents.
    links: Vec<(u32, u32)>,
    /// Trees known not to be complete by themselves: absent, never loaded, or missing
    /// chunks of their own.
    broken: Vec<u32>,
    /// Whole-file ids of multi-chunk files whose chunks are all stored.
    files: Vec<Id>,
    missing: Vec<Id>,
}

impl Walk {
    fn starting_at(root: Id) -> Walk {
        let mut walk = Walk::default();
        walk.add(root);
        walk
    }

    /// The position of `tree`, queued for loading if this walk had not reached it yet.
    fn add(&mut self, tree: Id) -> u32 {
        let next = self.trees.len() as u32;
        let position = *self.position.entry(tree).or_insert(next);
        if position == next {
            self.trees.push(tree);
        }
        position
    }

    fn reach(&mut self, child: Id, parent: u32) {
        let position = self.add(child);
        self.links.push((position, parent));
    }

    fn note_missing(&mut self, id: Id) {
        if self.missing.len() < MAX_REPORTED_MISSING && !self.missing.contains(&id) {
            self.missing.push(id);
        }
    }

    /// Trees whose whole closure is stored, children before their parents: every
    /// reached tree except the broken ones and everything above them.
    fn complete(&self) -> Vec<Id> {
        let mut parents = self.links.clone();
        parents.sort_unstable();
        let mut incomplete = vec![false; self.trees.len()];
        let mut stack = self.broken.clone();
        while let Some(tree) = stack.pop() {
            if std::mem::replace(&mut incomplete[tree as usize], true) {
                continue;
            }
            let first = parents.partition_point(|&(child, _)| child < tree);
            stack.extend(
                parents[first..]
                    .iter()
                    .take_while(|&&(child, _)| child == tree)
                    .map(|&(_, parent)| parent),
            );
        }
        self.trees
            .iter()
            .zip(&incomplete)
            .rev()
            .filter(|(_, incomplete)| !**incomplete)
            .map(|(id, _)| *id)
            .collect()
    }
}

/// Verifies that the closure of `root` is stored, marking every tree whose closure turns
/// out complete, and recording whole-file ids of multi-chunk files whose chunks are stored.
pub async fn verify_closure(catalog: &Arc<dyn Catalog>, root: Id) -> Result<Closure, ClosureError> {
    if catalog.tree_complete(root).await? {
        return Ok(Closure::Complete);
    }
    let mut walk = Walk::starting_at(root);
    let mut loaded = 0;
    while loaded < walk.trees.len() && walk.missing.len() < MAX_REPORTED_MISSING {
        let end = walk.trees.len().min(loaded + WALK_BATCH);
        load_batch(catalog, &mut walk, loaded..end).await?;
        loaded = end;
    }
    // A walk cut short knows nothing below what it did not load.
    walk.broken.extend(loaded as u32..walk.trees.len() as u32);

    // What was verified stays recorded even when the snapshot as a whole is incomplete.
    let complete = walk.complete();
    let (mut trees, mut files) = (complete.as_slice(), walk.files.as_slice());
    while !trees.is_empty() || !files.is_empty() {
        let (trees_now, trees_later) = trees.split_at(trees.len().min(RECORD_BATCH));
        let (files_now, files_later) = files.split_at(files.len().min(RECORD_BATCH));
        catalog.record_verified(trees_now, files_now).await?;
        (trees, files) = (trees_later, files_later);
    }
    Ok(if walk.missing.is_empty() {
        Closure::Complete
    } else {
        Closure::Missing(walk.missing)
    })
}

/// Reads and decodes trees, each kept with its position in the walk.
fn read_trees(located: Vec<(u32, Id, BlobLocation)>) -> Result<Vec<(u32, Tree)>, ClosureError> {
    with_codec(|codec| {
        located
            .into_iter()
            .map(|(position, id, loc)| {
                let raw = PackStore::read_blob(&loc, codec)?;
                let tree =
                    Tree::decode(&raw).map_err(|source| ClosureError::BadTree { id, source })?;
                Ok((position, tree))
            })
            .collect()
    })
}

/// Loads the trees at `batch` positions, checks their chunks and queues the subtrees not
/// yet known complete.
async fn load_batch(
    catalog: &Arc<dyn Catalog>,
    walk: &mut Walk,
    batch: std::ops::Range<usize>,
) -> Result<(), ClosureError> {
    let ids = walk.trees[batch.clone()].to_vec();
    let mut located = Vec::with_capacity(ids.len());
    for ((position, id), loc) in batch.zip(&ids).zip(catalog.locate_blobs(&ids).await?) {
        match loc {
            Some(loc) => located.push((position as u32, *id, loc)),
            None => {
                walk.note_missing(*id);
                walk.broken.push(position as u32);
            }
        }
    }
    // Packs are written past the page cache, so each tree is a small read from disk: a
    // few reads in flight at once instead of one after another.
    let mut reads = Vec::new();
    while !located.is_empty() {
        let rest = located.split_off(located.len().min(TREES_PER_READ));
        let part = std::mem::replace(&mut located, rest);
        reads.push(tokio::task::spawn_blocking(move || read_trees(part)));
    }
    let mut trees = Vec::new();
    for read in reads {
        trees.extend(read.await??);
    }

    let mut subtrees = Vec::new();
    let mut chunks = Vec::new();
    // Apart: a chunk may hold the very bytes of a tree, and must not hide it from the walk.
    let (mut seen_subtrees, mut seen_chunks) = (HashSet::new(), HashSet::new());
    for (_, tree) in &trees {
        for entry in &tree.entries {
            match &entry.content {
                Content::Tree(t) if seen_subtrees.insert(*t) => subtrees.push(*t),
                Content::Chunks { chunks: ids, .. } => {
                    chunks.extend(ids.iter().filter(|c| seen_chunks.insert(**c)));
                }
                _ => {}
            }
        }
    }
    let incomplete: HashSet<Id> = catalog
        .incomplete_trees(&subtrees)
        .await?
        .into_iter()
        .collect();
    let absent: HashSet<Id> = catalog.missing_blobs(&chunks).await?.into_iter().collect();
    for (position, tree) in &trees {
        let mut whole = true;
        for entry in &tree.entries {
            match &entry.content {
                Content::Tree(t) if incomplete.contains(t) => walk.reach(*t, *position),
                Content::Chunks { chunks: ids, .. } => {
                    for c in ids.iter().filter(|c| absent.contains(c)) {
                        walk.note_missing(*c);
                        whole = false;
                    }
                }
                _ => {}
            }
        }
        if whole {
            walk.files
                .extend(tree.entries.iter().filter_map(|e| match &e.content {
                    Content::Chunks { file, chunks } if chunks.len() > 1 => Some(*file),
                    _ => None,
                }));
        } else {
            walk.broken.push(*position);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gc::tests::{chunk, repo, store_pack};
    use morgana_core::pack::BlobKind;
    use morgana_core::tree::{Entry, Kind};

    fn dir(name: &str, tree: Id) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            kind: Some(Kind::Dir),
            mode: 0o755,
            content: Content::Tree(tree),
            ..Default::default()
        }
    }

    fn file(name: &str, chunks: &[Id]) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            kind: Some(Kind::File),
            mode: 0o644,
            size: 70_000 * chunks.len() as u64,
            content: Content::Chunks {
                file: Id::of(name.as_bytes()),
                chunks: chunks.to_vec(),
            },
            ..Default::default()
        }
    }

    fn sealed(entries: Vec<Entry>) -> (Id, Vec<u8>) {
        Tree { entries }.seal()
    }

    #[tokio::test]
    async fn records_exactly_the_trees_whose_closure_is_stored() {
        let r = repo().await;
        let (a, b, gone) = (chunk("a"), chunk("bb"), chunk("ccc"));
        // shared/ appears under both left/ and right/; right/deep/ lacks a chunk.
        let shared = sealed(vec![file("s", &[a.0, b.0])]);
        let deep = sealed(vec![file("d", &[gone.0])]);
        let left = sealed(vec![dir("shared", shared.0)]);
        let right = sealed(vec![dir("deep", deep.0), dir("shared", shared.0)]);
        let root = sealed(vec![dir("left", left.0), dir("right", right.0)]);
        store_pack(
            &r,
            &[
                (BlobKind::Chunk, &a),
                (BlobKind::Chunk, &b),
                (BlobKind::Tree, &shared),
                (BlobKind::Tree, &deep),
                (BlobKind::Tree, &left),
                (BlobKind::Tree, &right),
                (BlobKind::Tree, &root),
            ],
        )
        .await;

        match verify_closure(&r.catalog, root.0).await.unwrap() {
            Closure::Missing(missing) => assert_eq!(missing, vec![gone.0]),
            Closure::Complete => panic!("a snapshot missing a chunk was complete"),
        }
        let all = [shared.0, deep.0, left.0, right.0, root.0];
        assert_eq!(
            r.catalog.incomplete_trees(&all).await.unwrap(),
            vec![deep.0, right.0, root.0]
        );
        // The multi-chunk file whose chunks are stored is known by its whole-file id.
        assert!(
            r.catalog
                .missing_objects_held("d1", &[Id::of(b"s")], 0)
                .await
                .unwrap()
                .is_empty()
        );

        store_pack(&r, &[(BlobKind::Chunk, &gone)]).await;
        assert!(matches!(
            verify_closure(&r.catalog, root.0).await.unwrap(),
            Closure::Complete
        ));
        assert!(r.catalog.incomplete_trees(&all).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_absent_subtree_is_reported_and_nothing_above_it_recorded() {
        let r = repo().await;
        let a = chunk("a");
        let kept = sealed(vec![file("k", &[a.0])]);
        let absent = sealed(vec![]);
        let root = sealed(vec![dir("absent", absent.0), dir("kept", kept.0)]);
        store_pack(
            &r,
            &[
                (BlobKind::Chunk, &a),
                (BlobKind::Tree, &kept),
                (BlobKind::Tree, &root),
            ],
        )
        .await;
        match verify_closure(&r.catalog, root.0).await.unwrap() {
            Closure::Missing(missing) => assert_eq!(missing, vec![absent.0]),
            Closure::Complete => panic!("a snapshot missing a tree was complete"),
        }
        assert_eq!(
            r.catalog.incomplete_trees(&[kept.0, root.0]).await.unwrap(),
            vec![root.0]
        );
    }

    #[tokio::test]
    async fn a_walk_cut_short_records_nothing_it_did_not_see_whole() {
        let r = repo().await;
        // More missing chunks than are reported, in the root, then one deeper down.
        let missing: Vec<Id> = (0..MAX_REPORTED_MISSING + 5)
            .map(|i| Id::of(format!("never uploaded {i}").as_bytes()))
            .collect();
        let leaf = sealed(vec![]);
        let middle = sealed(vec![dir("leaf", leaf.0)]);
        let mut entries: Vec<Entry> = missing
            .iter()
            .enumerate()
            .map(|(i, c)| file(&format!("f{i:03}"), &[*c]))
            .collect();
        entries.push(dir("middle", middle.0));
        let root = sealed(entries);
        store_pack(
            &r,
            &[
                (BlobKind::Tree, &leaf),
                (BlobKind::Tree, &middle),
                (BlobKind::Tree, &root),
            ],
        )
        .await;
        match verify_closure(&r.catalog, root.0).await.unwrap() {
            Closure::Missing(reported) => {
                assert_eq!(reported, missing[..MAX_REPORTED_MISSING].to_vec())
            }
            Closure::Complete => panic!("complete without its chunks"),
        }
        // The walk stopped before it loaded middle/: neither it nor root is recorded.
        assert_eq!(
            r.catalog
                .incomplete_trees(&[leaf.0, middle.0, root.0])
                .await
                .unwrap(),
            vec![leaf.0, middle.0, root.0]
        );
    }
}
