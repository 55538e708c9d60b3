//! Chooses the default chunk sizes: for several min/avg/max triples, chunks a real file
//! corpus (default /usr), then a copy with small edits in 1 % of the files (a few bytes
//! changed in the middle, a few KiB appended), and prints index size against bytes that
//! would be sent for the edits.
//!
//! `cargo run --release -p morgana-core --example chunk_sizes [DIR] [MAX_MIB]`

use std::collections::HashSet;
use std::path::PathBuf;

use morgana_core::{Chunker, ChunkerParams, Id};

/// Bytes a chunk costs in the appliance's index (id, pack, offsets, B-tree overhead).
const INDEX_BYTES_PER_CHUNK: u64 = 96;

fn corpus(root: PathBuf, max_bytes: u64) -> Vec<Vec<u8>> {
    let mut files = Vec::new();
    let mut total = 0;
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = rd.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file()
                && let Ok(data) = std::fs::read(e.path())
            {
                total += data.len() as u64;
                files.push(data);
                if total >= max_bytes {
                    return files;
                }
            }
        }
    }
    files
}

fn edit(files: &[Vec<u8>]) -> Vec<Vec<u8>> {
    files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut f = f.clone();
            if i % 100 == 7 && f.len() > 16 {
                let mid = f.len() / 2;
                f[mid..mid + 8].copy_from_slice(b"EDITED!!");
            } else if i % 100 == 57 {
                f.extend(std::iter::repeat_n(b'x', 4096));
            }
            f
        })
        .collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let root = PathBuf::from(args.next().unwrap_or_else(|| "/usr".into()));
    let max_mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let base = corpus(root, max_mib << 20);
    let edited = edit(&base);
    let logical: u64 = base.iter().map(|f| f.len() as u64).sum();
    println!(
        "corpus: {} files, {:.1} MiB; 1 % of files edited",
        base.len(),
        logical as f64 / 1048576.0
    );
    println!(
        "{:>22} {:>10} {:>12} {:>12} {:>14} {:>12}",
        "min/avg/max KiB", "chunks", "index MiB", "stored MiB", "sent after edit", "dedup ratio"
    );
    for (min, avg, max) in [
        (2, 8, 32),
        (4, 16, 64),
        (8, 32, 128),
        (16, 64, 256),
        (32, 128, 512),
        (128, 512, 2048),
        (256, 1024, 4096),
    ] {
        let p = ChunkerParams {
            min: min * 1024,
            avg: avg * 1024,
            max: max * 1024,
        };
        let mut chunker = Chunker::new(p).unwrap();
        let mut seen: HashSet<Id> = HashSet::new();
        let mut stored = 0u64;
        for f in &base {
            chunker
                .chunk::<_, std::io::Error>(&f[..], |id, b| {
                    if seen.insert(id) {
                        stored += b.len() as u64;
                    }
                    Ok(())
                })
                .unwrap();
        }
        let chunks = seen.len() as u64;
        let mut sent = 0u64;
        for f in &edited {
            chunker
                .chunk::<_, std::io::Error>(&f[..], |id, b| {
                    if seen.insert(id) {
                        sent += b.len() as u64;
                    }
                    Ok(())
                })
                .unwrap();
        }
        println!(
            "{:>22} {:>10} {:>12.2} {:>12.1} {:>12.2} MiB {:>12.3}",
            format!("{min}/{avg}/{max}"),
            chunks,
            (chunks * INDEX_BYTES_PER_CHUNK) as f64 / 1048576.0,
            stored as f64 / 1048576.0,
            sent as f64 / 1048576.0,
            logical as f64 / stored as f64
        );
    }
}
