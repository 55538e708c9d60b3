//! Debian packages as a layer dry run sees them: the installed versions in
//! `/var/lib/dpkg/status`, and version ordering exactly as dpkg does it (`dpkg
//! --compare-versions`, deb-version(7)), so a layer that would put an older package on a
//! device shows as a downgrade.

use std::cmp::Ordering;
use std::collections::BTreeMap;

/// Where dpkg keeps what is installed, as seen from the protected root.
pub const STATUS_PATH: &[u8] = b"/var/lib/dpkg/status";

/// Installed packages (`Status: install ok installed`) and their versions, by name (with
/// `:arch` when the stanza names a foreign `Multi-Arch: same` architecture, as dpkg keys
/// them). Unreadable stanzas are skipped: a damaged status file must not hide the rest.
pub fn installed(status: &[u8]) -> BTreeMap<String, String> {
    let text = String::from_utf8_lossy(status);
    let mut out = BTreeMap::new();
    for stanza in text.split("\n\n") {
        let (mut name, mut version, mut arch, mut installed) = (None, None, None, false);
        for line in stanza.lines() {
            if line.starts_with([' ', '\t']) {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key {
                "Package" => name = Some(value.to_owned()),
                "Version" => version = Some(value.to_owned()),
                "Architecture" => arch = Some(value.to_owned()),
                "Status" => installed = value.ends_with(" installed"),
                _ => {}
            }
        }
        if let (Some(name), Some(version), true) = (name, version, installed) {
            let key = match arch.as_deref() {
                // One architecture per name is the common case; keep keys simple then.
                Some(a) if out.contains_key(&name) && a != "all" => format!("{name}:{a}"),
                _ => name,
            };
            out.insert(key, version);
        }
    }
    out
}

/// Compares two Debian versions (`[epoch:]upstream[-revision]`) the way dpkg does.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| compare_part(ua, ub))
        .then_with(|| compare_part(ra, rb))
}

/// Epoch (0 when absent or unparsable), upstream version, revision ("" when absent).
fn split(v: &str) -> (u64, &str, &str) {
    let v = v.trim();
    let (epoch, rest) = match v.split_once(':') {
        Some((e, rest)) if e.bytes().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(0), rest),
        _ => (0, v),
    };
    match rest.rsplit_once('-') {
        Some((upstream, revision)) => (epoch, upstream, revision),
        None => (epoch, rest, ""),
    }
}

/// dpkg's `verrevcmp`: alternating non-digit and digit runs; in non-digit runs `~` sorts
/// before everything (even the end), letters before other characters.
fn compare_part(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    while !a.is_empty() || !b.is_empty() {
        loop {
            let ca = a.first().copied().filter(|c| !c.is_ascii_digit());
            let cb = b.first().copied().filter(|c| !c.is_ascii_digit());
            if ca.is_none() && cb.is_none() {
                break;
            }
            let o = order(ca).cmp(&order(cb));
            if o != Ordering::Equal {
                return o;
            }
            a = &a[1..];
            b = &b[1..];
        }
        let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
        let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
        let na = trim_zeros(&a[..da]);
        let nb = trim_zeros(&b[..db]);
        let o = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
        if o != Ordering::Equal {
            return o;
        }
        a = &a[da..];
        b = &b[db..];
    }
    Ordering::Equal
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let first = digits
        .iter()
        .position(|&c| c != b'0')
        .unwrap_or(digits.len());
    &digits[first..]
}

/// Sort weight of one character of a non-digit run; `None` is the end of the run.
fn order(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::{Equal, Greater, Less};

    #[test]
    fn versions_order_as_dpkg_orders_them() {
        // Cases from dpkg's own test suite (t-version.c) and deb-version(7).
        let cases = [
            ("1.0", "1.0", Equal),
            ("1.0", "1.1", Less),
            ("1.10", "1.9", Greater),
            ("1:0.1", "2.0", Greater),
            ("0:1.0", "1.0", Equal),
            ("1.0-1", "1.0-2", Less),
            ("1.0-1", "1.0", Greater),
            ("1.0~rc1", "1.0", Less),
            ("1.0~~", "1.0~", Less),
            ("1.0~~a", "1.0~~", Greater),
            ("1.0~", "1.0", Less),
            ("1.0a", "1.0", Greater),
            ("1.0a", "1.0+", Less),
            ("1.0+", "1.0.", Less),
            ("1.01", "1.1", Equal),
            ("1.002", "1.1", Greater),
            ("2.36-9+deb12u4", "2.36-9+deb12u10", Less),
            ("1.2.3-1ubuntu1", "1.2.3-1", Greater),
            ("7.88.1-10+deb12u5", "7.88.1-10+deb12u5", Equal),
            ("1:2.0", "1:10.0", Less),
            ("a", "b", Less),
            ("1.0-1-2", "1.0-1-10", Less),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn only_installed_packages_are_read() {
        let status = b"Package: curl\nStatus: install ok installed\nArchitecture: amd64\n\
            Version: 7.88.1-10\nDescription: tool\n multi-line\n\n\
            Package: gone\nStatus: deinstall ok config-files\nVersion: 1.0\n\n\
            Package: half\nVersion: 2\n";
        let got = installed(status);
        assert_eq!(got.len(), 1);
        assert_eq!(got["curl"], "7.88.1-10");
    }
}
