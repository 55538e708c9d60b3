//! The chunk + hash ratio on a shared, noisy machine: the bare loop and Morgana's chunker
//! run alternately, round after round, over the same buffer, so that a slow spell of the
//! host hits both alike. Prints the median of each and their ratio.
//!
//! `cargo bench -p morgana-core --bench chunk_ratio [-- ROUNDS]`

use std::hint::black_box;
use std::time::Instant;

use morgana_core::testdata::noise;
use morgana_core::{Chunker, ChunkerParams};

#[path = "common/chunk_loops.rs"]
mod chunk_loops;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; the only argument of ours is a number.
    let rounds = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(41);
    let buf = noise(64 * 1024 * 1024, 1);
    let p = ChunkerParams::default();
    let mut chunker = Chunker::new(p).expect("default params are valid");
    let gib = buf.len() as f64 / (1u64 << 30) as f64;
    let (mut bare, mut ours, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        black_box(chunk_loops::bare(&buf, p));
        let b = gib / t.elapsed().as_secs_f64();
        let t = Instant::now();
        black_box(chunk_loops::streaming(&mut chunker, &buf));
        let o = gib / t.elapsed().as_secs_f64();
        bare.push(b);
        ours.push(o);
        ratios.push(o / b);
    }
    println!("chunk + hash, one thread, 64 MiB buffer, {rounds} alternating rounds (medians)");
    println!("{:<40} {:>10}", "loop", "GiB/s");
    println!("{:<40} {:>10.3}", "bare fastcdc + blake3", median(bare));
    println!(
        "{:<40} {:>10.3}",
        "morgana Chunker (streaming, file id)",
        median(ours)
    );
    println!(
        "{:<40} {:>9.1}%",
        "morgana ÷ bare (median of rounds)",
        100.0 * median(ratios)
    );
}
