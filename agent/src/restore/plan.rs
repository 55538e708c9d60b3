//! The planner: walks the snapshot's trees depth first and emits, in write order, what to
//! create. Every tree is verified (`Codec::open`) and decoded (`Tree::decode`, which
//! refuses hostile names) before any of its entries is emitted, so a bad tree stops the
//! restore before anything of that directory is written.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use morgana_core::Id;
use morgana_core::pack::Codec;
use morgana_core::tree::{Content, Entry, Kind, Tree, TreeError};
use morgana_core::wire::MAX_IDS_PER_REQUEST;

use super::{BlobSource, IdMap, Request, RestoreError, join, show};

/// Sibling subtrees fetched in one request. Bounds what the walk holds per directory level
/// (this many decoded trees) while saving a round trip per directory.
const SUBTREES_PER_FETCH: usize = 64;

/// One entry and where it goes, relative to the snapshot root (and so to `--to`).
#[derive(Debug)]
pub(super) struct Node {
    pub path: Vec<u8>,
    pub entry: Entry,
}

#[derive(Debug)]
pub(super) enum Op {
    /// Create (or, with --overwrite, reuse) a directory and make it the current one.
    Enter(Arc<Node>),
    /// The current directory's children are all written: set its metadata, go back up.
    Leave,
    /// A non-directory entry in the current directory.
    Leaf(Arc<Node>),
    /// A further name of a file (same non-zero `hardlink` id) restored earlier at `first`.
    Link { node: Arc<Node>, first: Arc<[u8]> },
}

/// Why a tree could not be used; turned into an error once the path it belongs to is known.
#[derive(Clone, Debug)]
enum Problem {
    Missing,
    Damaged(String),
    Hostile(String),
}

/// Loaded trees, each with how many more times the walk will use it.
type Loaded = IdMap<(usize, Result<Tree, Problem>)>;

enum Stop {
    Fail(RestoreError),
    /// The writer has stopped (it failed, and reports its own error).
    Gone,
}

impl From<RestoreError> for Stop {
    fn from(e: RestoreError) -> Stop {
        Stop::Fail(e)
    }
}

struct Planner<'a> {
    source: &'a dyn BlobSource,
    req: &'a Request,
    codec: Codec,
    out: SyncSender<Result<Op, RestoreError>>,
    /// First path restored for each hard link group.
    links: HashMap<u64, Arc<[u8]>>,
}

pub(super) fn run(
    source: &dyn BlobSource,
    req: &Request,
    out: SyncSender<Result<Op, RestoreError>>,
) {
    let mut p = Planner {
        source,
        req,
        codec: Codec::new(morgana_core::pack::DEFAULT_ZSTD_LEVEL),
        out,
        links: HashMap::new(),
    };
    if let Err(Stop::Fail(e)) = p.plan() {
        // If the writer is gone too, it has its own error to report.
        let _ = p.out.send(Err(e));
    }
}

impl Planner<'_> {
    fn send(&self, op: Op) -> Result<(), Stop> {
        self.out.send(Ok(op)).map_err(|_| Stop::Gone)
    }

    fn plan(&mut self) -> Result<(), Stop> {
        let mut tree = self.load_one(self.req.root, b"")?;
        let subpath = &self.req.subpath;
        if subpath.is_empty() {
            return self.walk(tree, &[]);
        }
        // Resolve the whole path before emitting anything: an unknown path writes nothing.
        let no_such = || RestoreError::NoSuchPath {
            snapshot: self.req.snapshot.clone(),
            path: show(&subpath.join(&b'/')),
        };
        let mut parents = Vec::new();
        let mut dir_path = Vec::new();
        let target = loop {
            let name = &subpath[parents.len()];
            let pos = tree
                .entries
                .binary_search_by(|e| e.name.as_slice().cmp(name))
                .map_err(|_| no_such())?;
            let entry = tree.entries.swap_remove(pos);
            let path = join(&dir_path, name);
            if parents.len() + 1 == subpath.len() {
                break Node { path, entry };
            }
            let Content::Tree(id) = entry.content else {
                return Err(no_such().into());
            };
            tree = self.load_one(id, &path)?;
            dir_path = path.clone();
            parents.push(Arc::new(Node { path, entry }));
        };
        let entered = parents.len();
        for node in parents {
            self.send(Op::Enter(node))?;
        }
        self.entry(target.entry, target.path, None)?;
        for _ in 0..entered {
            self.send(Op::Leave)?;
        }
        Ok(())
    }

    /// Emits one entry; a directory with everything below it. `subtree` is the directory's
    /// tree when the caller already has it.
    fn entry(
        &mut self,
        entry: Entry,
        path: Vec<u8>,
        subtree: Option<Result<Tree, Problem>>,
    ) -> Result<(), Stop> {
        if self.req.keeps(&path) {
            // Left as it is: nothing of it is written (its tree, if fetched, goes unused).
            return Ok(());
        }
        if let Content::Tree(id) = entry.content {
            let tree = match subtree {
                Some(t) => t.map_err(|p| self.tree_error(id, &path, p))?,
                None => self.load_one(id, &path)?,
            };
            let node = Arc::new(Node { path, entry });
            self.send(Op::Enter(node.clone()))?;
            self.walk(tree, &node.path)?;
            return self.send(Op::Leave);
        }
        // Only directories carry trees (Tree::decode checks it); everything else is a leaf.
        debug_assert!(entry.kind() != Kind::Dir);
        let group = entry.hardlink;
        let node = Arc::new(Node { path, entry });
        if group != 0 {
            if let Some(first) = self.links.get(&group) {
                return self.send(Op::Link {
                    first: first.clone(),
                    node,
                });
            }
            self.links.insert(group, Arc::from(node.path.as_slice()));
        }
        self.send(Op::Leaf(node))
    }

    /// Emits a directory's entries, fetching its subdirectories' trees a group at a time.
    fn walk(&mut self, tree: Tree, dir_path: &[u8]) -> Result<(), Stop> {
        let subtree_ids: Vec<Id> = tree
            .entries
            .iter()
            .filter_map(|e| match e.content {
                Content::Tree(id) => Some(id),
                _ => None,
            })
            .collect();
        let mut next = 0;
        let mut window_end = 0;
        let mut window: Loaded = IdMap::default();
        for entry in tree.entries {
            let path = join(dir_path, &entry.name);
            let subtree = match entry.content {
                Content::Tree(_) => {
                    if next == window_end {
                        window_end = (next + SUBTREES_PER_FETCH).min(subtree_ids.len());
                        window = self.load(&subtree_ids[next..window_end])?;
                    }
                    let id = subtree_ids[next];
                    next += 1;
                    Some(take(&mut window, id))
                }
                _ => None,
            };
            self.entry(entry, path, subtree)?;
        }
        Ok(())
    }

    fn load_one(&mut self, id: Id, path: &[u8]) -> Result<Tree, RestoreError> {
        let mut m = self.load(&[id])?;
        take(&mut m, id).map_err(|p| self.tree_error(id, path, p))
    }

    /// Fetches, verifies and decodes trees; each with how often `ids` names it (identical
    /// directories, empty ones above all, share one tree).
    fn load(&mut self, ids: &[Id]) -> Result<Loaded, RestoreError> {
        let mut out: Loaded = IdMap::default();
        let mut unique = Vec::new();
        for id in ids {
            out.entry(*id)
                .and_modify(|(n, _)| *n += 1)
                .or_insert_with(|| {
                    unique.push(*id);
                    (1, Err(Problem::Missing))
                });
        }
        let codec = &mut self.codec;
        for batch in unique.chunks(MAX_IDS_PER_REQUEST) {
            let mut i = 0;
            self.source.fetch(batch, &mut |frame, stored| {
                let expected = batch.get(i).copied();
                if expected != Some(frame.id) {
                    return Err(RestoreError::Protocol(format!(
                        "asked for tree {expected:?}, got blob {}",
                        frame.id
                    )));
                }
                i += 1;
                let tree = match frame.kind {
                    None => Err(Problem::Missing),
                    Some(_) => match codec.open(frame.id, frame.compression, stored, frame.raw_len)
                    {
                        Err(e) => Err(Problem::Damaged(e.to_string())),
                        Ok(raw) => Tree::decode(&raw).map_err(|e| match e {
                            TreeError::HostileName(_) => Problem::Hostile(e.to_string()),
                            e => Problem::Damaged(e.to_string()),
                        }),
                    },
                };
                out.get_mut(&frame.id).expect("asked for it").1 = tree;
                Ok(())
            })?;
            if i != batch.len() {
                return Err(RestoreError::Protocol(format!(
                    "asked for {} trees, got {i}",
                    batch.len()
                )));
            }
        }
        Ok(out)
    }

    fn tree_error(&self, id: Id, path: &[u8], p: Problem) -> RestoreError {
        match p {
            Problem::Hostile(reason) => RestoreError::HostileName {
                snapshot: self.req.snapshot.clone(),
                path: show(path),
                reason,
            },
            Problem::Missing => RestoreError::DamagedTree {
                id,
                path: show(path),
                reason: "the appliance does not have it".into(),
            },
            Problem::Damaged(reason) => RestoreError::DamagedTree {
                id,
                path: show(path),
                reason,
            },
        }
    }
}

/// Takes one use of a loaded tree: the last use moves it out, earlier ones copy it.
fn take(m: &mut Loaded, id: Id) -> Result<Tree, Problem> {
    let slot = m.get_mut(&id).expect("every subtree id was loaded");
    slot.0 -= 1;
    if slot.0 == 0 {
        m.remove(&id).expect("present").1
    } else {
        slot.1.clone()
    }
}
