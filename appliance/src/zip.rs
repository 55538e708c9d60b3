//! A streaming ZIP writer for folder downloads: entries are stored (not compressed), sizes
//! and CRC follow each entry in a data descriptor, so nothing is staged or read twice; the
//! ZIP64 records are written exactly when a size, an offset or the entry count needs them
//! (APPNOTE 6.3.x, as Go's `archive/zip` does it).
//!
//! Stored, because snapshot contents are mostly compressed already and the appliance's CPU
//! serves many downloads at once; the chunks are zstd-compressed at rest anyway.
//!
//! The writer only produces bytes: the caller sends them wherever they go.

const LOCAL_HEADER: u32 = 0x0403_4b50;
const DATA_DESCRIPTOR: u32 = 0x0807_4b50;
const CENTRAL_HEADER: u32 = 0x0201_4b50;
const END_OF_CENTRAL: u32 = 0x0605_4b50;
const ZIP64_END_OF_CENTRAL: u32 = 0x0606_4b50;
const ZIP64_LOCATOR: u32 = 0x0706_4b50;
const ZIP64_EXTRA: u16 = 0x0001;
/// General purpose flags: sizes in a data descriptor (bit 3), UTF-8 names (bit 11).
const FLAG_DESCRIPTOR: u16 = 1 << 3;
const FLAG_UTF8: u16 = 1 << 11;
const VERSION_ZIP64: u16 = 45;
const VERSION_DEFAULT: u16 = 20;
/// "Made by" Unix (high byte 3), so external attributes carry the Unix mode.
const MADE_BY_UNIX: u16 = (3 << 8) | VERSION_ZIP64;

/// One entry's facts, as its central directory record needs them.
struct Written {
    name: Vec<u8>,
    mode: u32,
    dos_time: u16,
    dos_date: u16,
    crc: u32,
    size: u64,
    offset: u64,
}

/// The file being written: its header is out, its data is being counted.
struct Open {
    w: Written,
    hasher: crc32fast::Hasher,
}

pub struct ZipWriter {
    /// Bytes written so far (the next entry's offset).
    offset: u64,
    entries: Vec<Written>,
    open: Option<Open>,
    /// Sizes and offsets from this on need ZIP64 records; lowered by tests to exercise
    /// them without writing 4 GiB.
    zip64_at: u64,
}

impl Default for ZipWriter {
    fn default() -> Self {
        ZipWriter {
            offset: 0,
            entries: Vec::new(),
            open: None,
            zip64_at: u32::MAX as u64,
        }
    }
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// MS-DOS date and time (local time in the format; we write UTC), clamped to 1980–2107.
fn dos_time(mtime_ns: i64) -> (u16, u16) {
    let secs = mtime_ns.div_euclid(1_000_000_000);
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(secs) else {
        return (0, (1 << 5) | 1);
    };
    if t.year() < 1980 {
        return (0, (1 << 5) | 1);
    }
    let year = (t.year() - 1980).min(127) as u16;
    let date = (year << 9) | ((t.month() as u16) << 5) | t.day() as u16;
    let time = ((t.hour() as u16) << 11) | ((t.minute() as u16) << 5) | (t.second() as u16 / 2);
    (time, date)
}

impl ZipWriter {
    #[cfg(test)]
    fn with_zip64_at(zip64_at: u64) -> ZipWriter {
        ZipWriter {
            zip64_at,
            ..ZipWriter::default()
        }
    }

    /// Starts an entry: `name` is its path inside the archive (`/`-separated, folders end
    /// in `/`), `mode` its Unix mode with the file type bits. Appends its local header to
    /// `out`; the data follows through [`ZipWriter::data`].
    pub fn start(&mut self, out: &mut Vec<u8>, name: Vec<u8>, mode: u32, mtime_ns: i64) {
        assert!(self.open.is_none(), "finish the open entry first");
        let (dos_time, dos_date) = dos_time(mtime_ns);
        let flags = FLAG_DESCRIPTOR
            | if std::str::from_utf8(&name).is_ok() {
                FLAG_UTF8
            } else {
                0
            };
        let start = out.len();
        put32(out, LOCAL_HEADER);
        put16(out, VERSION_ZIP64);
        put16(out, flags);
        put16(out, 0); // stored
        put16(out, dos_time);
        put16(out, dos_date);
        put32(out, 0); // CRC, in the descriptor
        put32(out, 0); // compressed size, in the descriptor
        put32(out, 0); // size, in the descriptor
        put16(out, name.len() as u16);
        put16(out, 0);
        out.extend_from_slice(&name);
        let w = Written {
            name,
            mode,
            dos_time,
            dos_date,
            crc: 0,
            size: 0,
            offset: self.offset,
        };
        self.offset += (out.len() - start) as u64;
        self.open = Some(Open {
            w,
            hasher: crc32fast::Hasher::new(),
        });
    }

    /// Appends `data` of the open entry to `out`.
    pub fn data(&mut self, out: &mut Vec<u8>, data: &[u8]) {
        let open = self.open.as_mut().expect("start an entry first");
        open.hasher.update(data);
        open.w.size += data.len() as u64;
        self.offset += data.len() as u64;
        out.extend_from_slice(data);
    }

    /// Ends the open entry: appends its data descriptor.
    pub fn finish_entry(&mut self, out: &mut Vec<u8>) {
        let Open { mut w, hasher } = self.open.take().expect("start an entry first");
        w.crc = hasher.finalize();
        let start = out.len();
        put32(out, DATA_DESCRIPTOR);
        put32(out, w.crc);
        if w.size >= self.zip64_at {
            put64(out, w.size);
            put64(out, w.size);
        } else {
            put32(out, w.size as u32);
            put32(out, w.size as u32);
        }
        self.offset += (out.len() - start) as u64;
        self.entries.push(w);
    }

    /// Appends the central directory and the end records; the archive is complete.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        assert!(self.open.is_none(), "finish the open entry first");
        let limit = self.zip64_at;
        let central_start = self.offset;
        let start = out.len();
        for w in &self.entries {
            let big_size = w.size >= limit;
            let big_offset = w.offset >= limit;
            let mut extra = Vec::new();
            if big_size {
                put64(&mut extra, w.size);
                put64(&mut extra, w.size);
            }
            if big_offset {
                put64(&mut extra, w.offset);
            }
            let utf8 = std::str::from_utf8(&w.name).is_ok();
            put32(out, CENTRAL_HEADER);
            put16(out, MADE_BY_UNIX);
            put16(
                out,
                if big_size || big_offset {
                    VERSION_ZIP64
                } else {
                    VERSION_DEFAULT
                },
            );
            put16(out, FLAG_DESCRIPTOR | if utf8 { FLAG_UTF8 } else { 0 });
            put16(out, 0);
            put16(out, w.dos_time);
            put16(out, w.dos_date);
            put32(out, w.crc);
            let size32 = if big_size { u32::MAX } else { w.size as u32 };
            put32(out, size32);
            put32(out, size32);
            put16(out, w.name.len() as u16);
            put16(
                out,
                if extra.is_empty() {
                    0
                } else {
                    extra.len() as u16 + 4
                },
            );
            put16(out, 0); // comment
            put16(out, 0); // disk
            put16(out, 0); // internal attributes
            // MS-DOS directory bit too, for readers that ignore the Unix mode.
            let dos_dir = if w.name.ends_with(b"/") { 0x10 } else { 0 };
            put32(out, (w.mode << 16) | dos_dir);
            put32(
                out,
                if big_offset {
                    u32::MAX
                } else {
                    w.offset as u32
                },
            );
            out.extend_from_slice(&w.name);
            if !extra.is_empty() {
                put16(out, ZIP64_EXTRA);
                put16(out, extra.len() as u16);
                out.extend_from_slice(&extra);
            }
        }
        let central_size = (out.len() - start) as u64;
        let count = self.entries.len() as u64;
        let zip64 = count >= 0xFFFF || central_size >= limit || central_start >= limit;
        if zip64 {
            let record = central_start + central_size;
            put32(out, ZIP64_END_OF_CENTRAL);
            put64(out, 44); // size of the rest of this record
            put16(out, MADE_BY_UNIX);
            put16(out, VERSION_ZIP64);
            put32(out, 0); // this disk
            put32(out, 0); // disk of the central directory
            put64(out, count);
            put64(out, count);
            put64(out, central_size);
            put64(out, central_start);
            put32(out, ZIP64_LOCATOR);
            put32(out, 0);
            put64(out, record);
            put32(out, 1); // disks
        }
        put32(out, END_OF_CENTRAL);
        put16(out, 0);
        put16(out, 0);
        let count16 = if zip64 { 0xFFFF } else { count as u16 };
        put16(out, count16);
        put16(out, count16);
        put32(out, if zip64 { u32::MAX } else { central_size as u32 });
        put32(
            out,
            if zip64 {
                u32::MAX
            } else {
                central_start as u32
            },
        );
        put16(out, 0); // comment
        self.offset = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes an archive, then has Python's zipfile (an independent reader) list it and
    /// check every CRC; `unzip -t` as well when it is installed.
    fn check_with_readers(zip64_at: u64) {
        let files: Vec<(&str, Vec<u8>)> = vec![
            ("docs/", Vec::new()),
            ("docs/a.txt", b"alpha".to_vec()),
            ("docs/empty", Vec::new()),
            (
                "docs/big.bin",
                (0..200_000u32).map(|i| (i * 7) as u8).collect(),
            ),
            ("docs/ünïcode.txt", b"utf-8 names".to_vec()),
        ];
        let mut zw = ZipWriter::with_zip64_at(zip64_at);
        let mut out = Vec::new();
        for (name, data) in &files {
            let mode = if name.ends_with('/') {
                0o040755
            } else {
                0o100644
            };
            zw.start(
                &mut out,
                name.as_bytes().to_vec(),
                mode,
                1_700_000_000_000_000_000,
            );
            // In pieces, as chunks arrive.
            for piece in data.chunks(7_000) {
                zw.data(&mut out, piece);
            }
            zw.finish_entry(&mut out);
        }
        zw.finish(&mut out);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.zip");
        std::fs::write(&path, &out).unwrap();
        let script = r#"
import sys, zipfile, hashlib
z = zipfile.ZipFile(sys.argv[1])
assert z.testzip() is None
for i in z.infolist():
    print(i.filename, i.file_size, hashlib.sha256(z.read(i)).hexdigest())
"#;
        let py = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&path)
            .output()
            .expect("python3 is needed to check ZIP output");
        assert!(
            py.status.success(),
            "{}",
            String::from_utf8_lossy(&py.stderr)
        );
        let listed = String::from_utf8(py.stdout).unwrap();
        let want: String = files
            .iter()
            .map(|(n, d)| {
                use sha2::Digest;
                format!("{n} {} {:x}\n", d.len(), sha2::Sha256::digest(d))
            })
            .collect();
        assert_eq!(listed, want);
        if let Ok(o) = std::process::Command::new("unzip")
            .arg("-t")
            .arg(&path)
            .output()
        {
            assert!(
                o.status.success(),
                "unzip -t: {}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
    }

    #[test]
    fn readers_accept_plain_archives() {
        check_with_readers(u32::MAX as u64);
    }

    #[test]
    fn readers_accept_zip64_records() {
        // Every size and offset takes the ZIP64 form, as past 4 GiB.
        check_with_readers(0);
    }

    #[test]
    fn dos_times_are_clamped() {
        assert_eq!(dos_time(0), (0, (1 << 5) | 1));
        let (t, d) = dos_time(1_700_000_000_000_000_000); // 2023-11-14 22:13:20 UTC
        assert_eq!(d >> 9, 2023 - 1980);
        assert_eq!((d >> 5) & 0xF, 11);
        assert_eq!(d & 0x1F, 14);
        assert_eq!(t >> 11, 22);
    }
}
