//! Randomness for secrets and ids, from the operating system.

/// Fills `buf` from the OS generator. Without one nothing secret can be made, so failing is
/// a broken machine, not bad input.
pub fn fill(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random number generator failed");
}

/// `n` random bytes as lowercase hex.
pub fn hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    fill(&mut bytes);
    to_hex(&bytes)
}

pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
