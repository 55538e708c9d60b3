//! The two loops the chunk + hash benches compare, over the same in-memory buffer.

use morgana_core::{Chunker, ChunkerParams, Id};

/// The fastcdc and blake3 crates with nothing around them: the ceiling.
pub fn bare(buf: &[u8], p: ChunkerParams) -> u64 {
    let mut n = 0u64;
    for ch in fastcdc::v2020::FastCDC::new(buf, p.min as usize, p.avg as usize, p.max as usize) {
        let h = blake3::hash(&buf[ch.offset..ch.offset + ch.length]);
        n = n.wrapping_add(h.as_bytes()[0] as u64);
    }
    n
}

/// Morgana's streaming chunker as the agent runs it: reads into its buffer, chunk ids,
/// the whole-file id.
pub fn streaming(chunker: &mut Chunker, buf: &[u8]) -> (u64, Id) {
    let mut n = 0u64;
    let r = chunker
        .chunk::<_, std::io::Error>(buf, |id: Id, _| {
            n = n.wrapping_add(id.0[0] as u64);
            Ok(())
        })
        .expect("reading from memory cannot fail");
    (n, r.file_id)
}
