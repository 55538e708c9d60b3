//! Chunk + hash throughput on one thread: Morgana's streaming chunker beside a bare loop of
//! the fastcdc and blake3 crates over the same buffer (the issue asks for >= 90 % of it).
//! `chunk_ratio` measures the same two loops interleaved, which a noisy machine needs.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use morgana_core::testdata::noise;
use morgana_core::{Chunker, ChunkerParams};

#[path = "common/chunk_loops.rs"]
mod chunk_loops;

fn bench(c: &mut Criterion) {
    let buf = noise(64 * 1024 * 1024, 1);
    let p = ChunkerParams::default();
    let mut g = c.benchmark_group("chunk+hash");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.sample_size(20);
    g.bench_function("bare fastcdc+blake3", |b| {
        b.iter(|| black_box(chunk_loops::bare(&buf, p)))
    });
    let mut chunker = Chunker::new(p).unwrap();
    g.bench_function("morgana Chunker (streaming, file id)", |b| {
        b.iter(|| black_box(chunk_loops::streaming(&mut chunker, &buf)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
