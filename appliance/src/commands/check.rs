//! `morgana check`: reads every stored byte and every snapshot's structure, and names what
//! is damaged or missing, down to the blob and pack file.
//!
//! The catalog is walked in pages and packs one at a time, so memory is one pack plus one
//! page, whatever the repository's size.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use morgana_core::Id;
use morgana_core::pack::{self, BlobKind, PackEntry};
use morgana_core::tree::Tree;

use crate::catalog::{Catalog, PackRecord, SqliteCatalog};
use crate::config::{DEFAULT_DATA_DIR, DataDir};
use crate::store::{PackStore, with_codec};

const PAGE: u32 = 1000;
/// Trees whose closure was found intact are remembered up to this many, so snapshots
/// sharing most of their trees are walked quickly without memory growing unbounded.
const VERIFIED_CACHE: usize = 250_000;
/// Damaged blob ids remembered to tell which snapshots they hurt.
const DAMAGED_CACHE: usize = 100_000;
/// Lines printed per snapshot before the rest is summarised.
const LINES_PER_SNAPSHOT: usize = 100;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, value_name = "DIR", env = "MORGANA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

#[derive(Default)]
struct Report {
    problems: u64,
    packs: u64,
    blobs: u64,
    snapshots: u64,
    layers: u64,
    driver_sets: u64,
    damaged: HashSet<Id>,
}

impl Report {
    fn problem(&mut self, line: String) {
        self.problems += 1;
        Self::print(&line);
    }

    fn print(line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    fn damaged_blob(&mut self, id: Id) {
        if self.damaged.len() < DAMAGED_CACHE {
            self.damaged.insert(id);
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let data = DataDir::new(&args.data_dir);
    let problems = check(&data).await?;
    Ok(if problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Checks everything, printing one line per problem and a summary; returns the number of
/// problems.
pub async fn check(data: &DataDir) -> anyhow::Result<u64> {
    data.require_initialised()?;
    let catalog: Arc<dyn Catalog> = Arc::new(SqliteCatalog::open(&data.catalog(), false).await?);
    let mut report = Report::default();

    let mut after = None;
    loop {
        let page = catalog
            .packs_page(after, 100)
            .await
            .context("cannot list packs")?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for p in &page {
            check_pack(&catalog, p, &mut report).await?;
        }
    }

    let mut after = None;
    loop {
        let page = catalog
            .orphan_blobs_page(after, PAGE)
            .await
            .context("cannot list blobs")?;
        let Some(last) = page.last() else { break };
        after = Some(last.0);
        for (blob, pack) in page {
            report.problem(format!(
                "MISSING pack {pack}: the catalog indexes blob {blob} in it but lists no such pack"
            ));
        }
    }

    let mut verified = HashSet::new();
    let mut after: Option<String> = None;
    loop {
        let page = catalog
            .snapshots_page(after.as_deref(), 100)
            .await
            .context("cannot list snapshots")?;
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        for s in &page {
            report.snapshots += 1;
            let label = format!("SNAPSHOT {} of device {}", s.id, s.device_id);
            check_root(&catalog, &label, s.root, &mut verified, &mut report).await?;
        }
    }
    // Layers and driver sets are roots too: garbage collection keeps what they reach, so
    // check reads it.
    for l in catalog.layers().await.context("cannot list layers")? {
        report.layers += 1;
        let label = format!("LAYER {} v{}", l.layer.name, l.version);
        check_root(&catalog, &label, l.layer.root, &mut verified, &mut report).await?;
    }
    for d in catalog
        .driver_sets()
        .await
        .context("cannot list driver sets")?
    {
        report.driver_sets += 1;
        let label = format!("DRIVER SET {} v{}", d.set.name, d.version);
        check_root(&catalog, &label, d.set.root, &mut verified, &mut report).await?;
    }

    let summary = format!(
        "check: {} packs ({} blobs), {} snapshots, {} layers, {} driver sets: {}",
        report.packs,
        report.blobs,
        report.snapshots,
        report.layers,
        report.driver_sets,
        match report.problems {
            0 => "clean".to_string(),
            1 => "1 problem found".to_string(),
            n => format!("{n} problems found"),
        }
    );
    Report::print(&summary);
    Ok(report.problems)
}

async fn check_pack(
    catalog: &Arc<dyn Catalog>,
    p: &PackRecord,
    report: &mut Report,
) -> anyhow::Result<()> {
    report.packs += 1;
    let path = PackStore::pack_path(&p.volume, p.id);
    let shown = path.display().to_string();
    let read_path = path.clone();
    let bytes = match tokio::task::spawn_blocking(move || std::fs::read(read_path)).await? {
        Ok(b) => Arc::new(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            report.problem(format!(
                "MISSING pack {shown}: the file does not exist; the {} blobs the catalog indexes in it are lost",
                p.blob_count
            ));
            return Ok(());
        }
        Err(e) => {
            report.problem(format!("DAMAGED pack {shown}: cannot read it: {e}"));
            return Ok(());
        }
    };
    // The pack's own index, when the file is intact, to confirm the catalog's offsets.
    let own_index: Option<Arc<HashMap<Id, PackEntry>>> = {
        let bytes = bytes.clone();
        match tokio::task::spawn_blocking(move || pack::parse(&bytes)).await? {
            Ok((id, _)) if id != p.id => {
                report.problem(format!(
                    "DAMAGED pack {shown}: the file holds pack {id}, not the pack {} the catalog expects there",
                    p.id
                ));
                None
            }
            Ok((_, entries)) => Some(Arc::new(entries.into_iter().map(|e| (e.id, e)).collect())),
            Err(e) => {
                report.problem(format!("DAMAGED pack {shown}: {e}"));
                None
            }
        }
    };

    let mut after = None;
    loop {
        let page = catalog
            .pack_blobs_page(p.id, after, PAGE)
            .await
            .context("cannot list a pack's blobs")?;
        let Some(last) = page.last() else { break };
        after = Some(last.offset);
        report.blobs += page.len() as u64;
        let (bytes, own_index, path) = (bytes.clone(), own_index.clone(), path.clone());
        let findings = tokio::task::spawn_blocking(move || {
            check_blobs(&bytes, own_index.as_deref(), &path, &page)
        })
        .await?;
        for (id, line) in findings {
            if let Some(id) = id {
                report.damaged_blob(id);
            }
            report.problem(line);
        }
    }
    Ok(())
}

/// Opens every indexed blob of one pack at the catalog's offsets; returns (damaged blob,
/// line) for each problem.
fn check_blobs(
    bytes: &[u8],
    own_index: Option<&HashMap<Id, PackEntry>>,
    path: &Path,
    entries: &[PackEntry],
) -> Vec<(Option<Id>, String)> {
    let shown = path.display();
    let mut out = Vec::new();
    with_codec(|codec| {
        for e in entries {
            let what = e.kind.name();
            let end = e.offset.checked_add(u64::from(e.stored_len));
            let Some(stored) = end
                .filter(|end| *end <= bytes.len() as u64)
                .map(|end| &bytes[e.offset as usize..end as usize])
            else {
                out.push((
                    Some(e.id),
                    format!(
                        "DAMAGED pack {shown}: {what} {} at offset {} is beyond the end of the file ({} bytes); the file is truncated",
                        e.id,
                        e.offset,
                        bytes.len()
                    ),
                ));
                continue;
            };
            if let Err(err) = codec.open(e.id, e.compression, stored, e.raw_len) {
                out.push((
                    Some(e.id),
                    format!(
                        "DAMAGED pack {shown}: {what} {} at offset {}: {err}",
                        e.id, e.offset
                    ),
                ));
                continue;
            }
            if let Some(index) = own_index
                && index
                    .get(&e.id)
                    .is_none_or(|own| own.offset != e.offset || own.stored_len != e.stored_len)
            {
                out.push((
                    None,
                    format!(
                        "MISSING blob {}: the catalog indexes it in pack {shown} at offset {}, but the pack's own index does not list it there",
                        e.id, e.offset
                    ),
                ));
            }
        }
    });
    out
}

struct Frame {
    tree: Id,
    subtrees: Vec<Id>,
    ok: bool,
}

/// Walks the closure of a root (a snapshot's, a layer's, a driver set's): every tree
/// present and decodable, every chunk indexed (and not found damaged above).
async fn check_root(
    catalog: &Arc<dyn Catalog>,
    label: &str,
    root: Id,
    verified: &mut HashSet<Id>,
    report: &mut Report,
) -> anyhow::Result<()> {
    if verified.contains(&root) {
        return Ok(());
    }
    let mut lines = 0usize;
    let mut suppressed = 0u64;
    let mut say = |report: &mut Report, what: String| {
        if lines < LINES_PER_SNAPSHOT {
            lines += 1;
            report.problem(format!("{label}: {what}"));
        } else {
            suppressed += 1;
            report.problems += 1;
        }
    };
    let mut failed: HashSet<Id> = HashSet::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut next = Some(root);
    loop {
        if let Some(tree) = next.take() {
            match load_tree(catalog, tree, report, &mut say, tree == root).await? {
                Some(frame) => stack.push(frame),
                None => {
                    failed.insert(tree);
                    if let Some(parent) = stack.last_mut() {
                        parent.ok = false;
                    }
                }
            }
            continue;
        }
        let Some(top) = stack.last_mut() else { break };
        if let Some(child) = top.subtrees.pop() {
            if verified.contains(&child) {
                continue;
            }
            if failed.contains(&child) {
                top.ok = false;
                continue;
            }
            next = Some(child);
        } else {
            let Some(done) = stack.pop() else { break };
            if done.ok {
                if verified.len() >= VERIFIED_CACHE {
                    verified.clear();
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
    if suppressed > 0 {
        Report::print(&format!("{label}: {suppressed} more problems not listed"));
    }
    Ok(())
}

async fn load_tree(
    catalog: &Arc<dyn Catalog>,
    id: Id,
    report: &mut Report,
    say: &mut impl FnMut(&mut Report, String),
    is_root: bool,
) -> anyhow::Result<Option<Frame>> {
    let label = if is_root { "root tree" } else { "tree" };
    let Some(Some(loc)) = catalog
        .locate_blobs(&[id])
        .await
        .context("cannot locate a tree")?
        .into_iter()
        .next()
    else {
        say(report, format!("{label} {id} is not in the blob index"));
        return Ok(None);
    };
    let decoded = tokio::task::spawn_blocking(move || -> Result<Tree, String> {
        let raw =
            with_codec(|codec| PackStore::read_blob(&loc, codec)).map_err(|e| e.to_string())?;
        Tree::decode(&raw).map_err(|e| format!("it does not decode: {e}"))
    })
    .await?;
    let tree = match decoded {
        Ok(t) => t,
        Err(e) => {
            say(report, format!("{label} {id} is unreadable: {e}"));
            return Ok(None);
        }
    };
    let mut subtrees = Vec::new();
    let mut chunks = Vec::new();
    let mut seen = HashSet::new();
    for r in tree.references() {
        if seen.insert(r.1) {
            match r.0 {
                BlobKind::Tree => subtrees.push(r.1),
                BlobKind::Chunk => chunks.push(r.1),
            }
        }
    }
    let mut ok = true;
    for c in catalog
        .missing_blobs(&chunks)
        .await
        .context("cannot look up chunks")?
    {
        ok = false;
        say(
            report,
            format!("chunk {c} (in tree {id}) is not in the blob index"),
        );
    }
    let damaged: Vec<Id> = chunks
        .iter()
        .filter(|c| report.damaged.contains(c))
        .copied()
        .collect();
    for c in damaged {
        ok = false;
        say(
            report,
            format!("chunk {c} (in tree {id}) is damaged (see DAMAGED above)"),
        );
    }
    subtrees.reverse();
    Ok(Some(Frame {
        tree: id,
        subtrees,
        ok,
    }))
}
