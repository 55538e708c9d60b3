//! Reading snapshots for people: one directory of a snapshot's tree, and the difference
//! between two snapshots.
//!
//! Paths are walked from the snapshot's root, never looked up by a tree id from the URL:
//! a tree id names content any device may share, so taking one from a request would let a
//! caller read trees of devices they may not see. The diff uses the Merkle structure: a
//! subtree with the same id on both sides is equal and is not read.

use morgana_core::Id;
use morgana_core::tree::{Content, Entry, Kind, Tree, TreeError};

use crate::catalog::{Catalog, CatalogError};
use crate::store::{PackStoreError, TreeLoadError, load_tree};

/// Directory entries listed per page at most.
pub const MAX_LISTED: usize = 2000;
/// Changes a diff reports at most (it stops reading trees there).
pub const MAX_CHANGES: usize = 2000;
/// Path components walked at most.
const MAX_DEPTH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum BrowseError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] PackStoreError),
    #[error("tree {0} is not stored on this appliance; run `morgana check`")]
    MissingTree(Id),
    #[error("tree {id} cannot be read: {source}; run `morgana check`")]
    BadTree { id: Id, source: TreeError },
    #[error("{path:?} is not in this snapshot: go back to its parent folder")]
    NoSuchPath { path: String },
    #[error("{path:?} is a file, not a folder")]
    NotAFolder { path: String },
    #[error("reading a tree was interrupted: {0}")]
    Task(#[from] tokio::task::JoinError),
}

pub async fn read_tree(catalog: &dyn Catalog, id: Id) -> Result<Tree, BrowseError> {
    load_tree(catalog, id).await.map_err(|e| match e {
        TreeLoadError::Missing { id } => BrowseError::MissingTree(id),
        TreeLoadError::Bad { id, source } => BrowseError::BadTree { id, source },
        TreeLoadError::Catalog(e) => BrowseError::Catalog(e),
        TreeLoadError::Store(e) => BrowseError::Store(e),
        TreeLoadError::Task(e) => BrowseError::Task(e),
    })
}

/// `/a/b/` → `["a", "b"]`; empty and `.` components are dropped.
pub fn split_path(path: &str) -> Vec<&str> {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .take(MAX_DEPTH)
        .collect()
}

/// The tree of the folder at `path` below `root`.
pub async fn folder(catalog: &dyn Catalog, root: Id, path: &str) -> Result<Tree, BrowseError> {
    let mut tree = read_tree(catalog, root).await?;
    let mut walked = String::new();
    for name in split_path(path) {
        walked.push('/');
        walked.push_str(name);
        let Some(entry) = tree.entries.iter().find(|e| e.name == name.as_bytes()) else {
            return Err(BrowseError::NoSuchPath { path: walked });
        };
        let Content::Tree(id) = entry.content else {
            return Err(BrowseError::NotAFolder { path: walked });
        };
        tree = read_tree(catalog, id).await?;
    }
    Ok(tree)
}

/// One entry as people see it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Listed {
    pub name: String,
    pub kind: &'static str,
    pub size: u64,
    /// RFC 3339 UTC.
    pub modified: String,
    pub mode: String,
    /// For symlinks: the target.
    pub target: Option<String>,
}

pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::File => "file",
        Kind::Dir => "folder",
        Kind::Symlink => "symlink",
        _ => "special",
    }
}

pub fn listed(e: &Entry) -> Listed {
    let kind = e.kind();
    Listed {
        name: String::from_utf8_lossy(&e.name).into_owned(),
        kind: kind_name(kind),
        size: e.size,
        modified: crate::clock::rfc3339_ms(e.mtime_ns.div_euclid(1_000_000)),
        mode: format!("{:o}", e.mode & 0o7777),
        target: (kind == Kind::Symlink)
            .then(|| String::from_utf8_lossy(&e.symlink_target).into_owned()),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    Added,
    Removed,
    Modified,
}

impl ChangeKind {
    pub fn symbol(self) -> &'static str {
        match self {
            ChangeKind::Added => "+",
            ChangeKind::Removed => "−",
            ChangeKind::Modified => "~",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    pub kind: ChangeKind,
    pub path: String,
    pub entry_kind: &'static str,
    /// Size after the change (before, for removals).
    pub size: u64,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Diff {
    pub changes: Vec<Change>,
    /// True when [`MAX_CHANGES`] was reached and the walk stopped.
    pub truncated: bool,
    /// Trees read to find the changes.
    pub trees_read: u64,
    /// Folders skipped because their tree id was the same on both sides.
    pub subtrees_skipped: u64,
}

/// Whether an entry changed, apart from a folder's contents (compared by walking).
fn entry_changed(a: &Entry, b: &Entry) -> bool {
    if a.kind() != b.kind() {
        return true;
    }
    match (&a.content, &b.content) {
        (Content::Tree(_), Content::Tree(_)) => a.mode != b.mode,
        _ => a != b,
    }
}

/// The changes from snapshot root `from` to `to`: each folder's changes in name order,
/// then its subfolders'.
pub async fn diff(catalog: &dyn Catalog, from: Id, to: Id) -> Result<Diff, BrowseError> {
    let mut out = Diff::default();
    // Explicit stack: memory follows depth and the widest folder, not the snapshot.
    let mut stack = vec![(String::new(), from, to)];
    while let Some((prefix, a_id, b_id)) = stack.pop() {
        if a_id == b_id {
            out.subtrees_skipped += 1;
            continue;
        }
        let a = read_tree(catalog, a_id).await?;
        let b = read_tree(catalog, b_id).await?;
        out.trees_read += 2;
        let mut deeper = Vec::new();
        let (mut i, mut j) = (0, 0);
        // Both sides are sorted by name: one merge pass.
        while i < a.entries.len() || j < b.entries.len() {
            let order = match (a.entries.get(i), b.entries.get(j)) {
                (Some(x), Some(y)) => x.name.cmp(&y.name),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            let mut push = |kind, e: &Entry| {
                out.changes.push(Change {
                    kind,
                    path: format!("{prefix}/{}", String::from_utf8_lossy(&e.name)),
                    entry_kind: kind_name(e.kind()),
                    size: e.size,
                })
            };
            match order {
                std::cmp::Ordering::Less => {
                    push(ChangeKind::Removed, &a.entries[i]);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    push(ChangeKind::Added, &b.entries[j]);
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    let (x, y) = (&a.entries[i], &b.entries[j]);
                    if entry_changed(x, y) {
                        push(ChangeKind::Modified, y);
                    }
                    if let (Content::Tree(tx), Content::Tree(ty)) = (&x.content, &y.content) {
                        deeper.push((
                            format!("{prefix}/{}", String::from_utf8_lossy(&y.name)),
                            *tx,
                            *ty,
                        ));
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        if out.changes.len() >= MAX_CHANGES {
            out.changes.truncate(MAX_CHANGES);
            out.truncated = true;
            break;
        }
        // Popped from the end: reversed so folders are walked in name order.
        stack.extend(deeper.into_iter().rev());
    }
    Ok(out)
}
