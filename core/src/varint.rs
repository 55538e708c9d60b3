//! LEB128 unsigned varints and a bounds-checked reader shared by the tree and pack formats.

pub fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Reads from a byte slice, failing with the name of the field that ran off the end.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadError {
    #[error("truncated while reading {0}")]
    Truncated(&'static str),
    #[error("{0} does not fit in 64 bits")]
    Overflow(&'static str),
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn u8(&mut self, what: &'static str) -> Result<u8, ReadError> {
        Ok(self.take(1, what)?[0])
    }
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ReadError> {
        if self.remaining() < n {
            return Err(ReadError::Truncated(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn varint(&mut self, what: &'static str) -> Result<u64, ReadError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8(what)?;
            let bits = (b & 0x7f) as u64;
            if shift == 63 && bits > 1 {
                return Err(ReadError::Overflow(what));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ReadError::Overflow(what))
    }
    /// A length-prefixed byte string of at most `max` bytes.
    pub fn bytes(&mut self, max: usize, what: &'static str) -> Result<&'a [u8], ReadError> {
        let n = self.varint(what)?;
        if n > max as u64 || n > self.remaining() as u64 {
            return Err(ReadError::Truncated(what));
        }
        self.take(n as usize, what)
    }
    pub fn id(&mut self, what: &'static str) -> Result<crate::Id, ReadError> {
        Ok(crate::Id(self.take(32, what)?.try_into().unwrap()))
    }
    pub fn u64_le(&mut self, what: &'static str) -> Result<u64, ReadError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_edges() {
        for v in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            put(&mut out, v);
            let mut r = Reader::new(&out);
            assert_eq!(r.varint("v").unwrap(), v);
            assert!(r.is_empty());
        }
    }

    #[test]
    fn rejects_overlong() {
        let bad = [0xffu8; 11];
        assert!(Reader::new(&bad).varint("v").is_err());
        assert_eq!(
            Reader::new(&[0x80]).varint("v"),
            Err(ReadError::Truncated("v"))
        );
    }
}
