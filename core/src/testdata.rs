//! Deterministic test data shared by unit tests, end-to-end tests and benchmarks, so that
//! every one of them means the same thing by "incompressible bytes from seed N".

/// `len` pseudo-random bytes (xorshift64) from `seed`: incompressible, like media files,
/// and identical on every run.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
