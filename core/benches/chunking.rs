//! Chunk + hash throughput on one thread: Morgana's streaming chunker beside a bare loop of
//! the fastcdc and blake3 crates over the same buffer (the issue asks for >= 90 % of it).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use morgana_core::testdata::noise;
use morgana_core::{Chunker, ChunkerParams, Id};

fn bench(c: &mut Criterion) {
    let buf = noise(64 * 1024 * 1024, 1);
    let p = ChunkerParams::default();
    let mut g = c.benchmark_group("chunk+hash");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.sample_size(20);
    g.bench_function("bare fastcdc+blake3", |b| {
        b.iter(|| {
            let mut n = 0u64;
            for ch in
                fastcdc::v2020::FastCDC::new(&buf, p.min as usize, p.avg as usize, p.max as usize)
            {
                let h = blake3::hash(&buf[ch.offset..ch.offset + ch.length]);
                n = n.wrapping_add(h.as_bytes()[0] as u64);
            }
            black_box(n)
        })
    });
    let mut chunker = Chunker::new(p).unwrap();
    g.bench_function("morgana Chunker (streaming, file id)", |b| {
        b.iter(|| {
            let mut n = 0u64;
            let r = chunker
                .chunk::<_, std::io::Error>(&buf[..], |id: Id, _| {
                    n = n.wrapping_add(id.0[0] as u64);
                    Ok(())
                })
                .unwrap();
            black_box((n, r.file_id))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
