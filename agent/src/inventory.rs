//! Hardware and OS inventory, read from sysfs, procfs and `/etc/os-release` below a root
//! prefix (`/` in production, a fake tree in tests). A source the machine lacks (no DMI in
//! a container, no PCI bus in some VMs) or cannot be read leaves its fields empty: collecting
//! never fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use morgana_core::control::{Disk, Inventory, NetworkInterface, PciId};

/// Block devices that are not disks.
const NOT_DISKS: [&str; 3] = ["loop", "ram", "zram"];

/// Names a directory read instead of `/` for the inventory (its `sys/`, `proc/`, `etc/`):
/// a test and lab aid, so one machine can play devices with different hardware.
pub const ROOT_ENV: &str = "MORGANA_AGENT_INVENTORY_ROOT";

/// Where the inventory is read: `/`, unless [`ROOT_ENV`] names another directory.
pub fn root() -> PathBuf {
    std::env::var_os(ROOT_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/"), PathBuf::from)
}

pub fn collect(root: &Path) -> Inventory {
    let real = root == Path::new("/");
    let text = |rel: &str| read_trimmed(&root.join(rel));
    let cpuinfo = text("proc/cpuinfo");
    let (cpu_model, cpu_count) = parse_cpuinfo(&cpuinfo);
    let os = parse_os_release(&text("etc/os-release").or_else_empty(|| text("usr/lib/os-release")));
    let mut network = interfaces(root);
    if real {
        add_addresses(&mut network);
    }
    Inventory {
        hostname: text("proc/sys/kernel/hostname").or_else_empty(|| text("etc/hostname")),
        vendor: text("sys/class/dmi/id/sys_vendor"),
        model: text("sys/class/dmi/id/product_name"),
        serial: text("sys/class/dmi/id/product_serial"),
        cpu_model,
        cpu_count,
        memory_bytes: parse_meminfo(&text("proc/meminfo")),
        disks: disks(root),
        network,
        pci: pci(root),
        os_id: os.get("ID").cloned().unwrap_or_default(),
        os_version: os.get("VERSION_ID").cloned().unwrap_or_default(),
        os_name: os.get("PRETTY_NAME").cloned().unwrap_or_default(),
        kernel: if real {
            uname_release().or_else_empty(|| text("proc/sys/kernel/osrelease"))
        } else {
            text("proc/sys/kernel/osrelease")
        },
    }
}

trait OrElseEmpty {
    fn or_else_empty(self, f: impl FnOnce() -> String) -> String;
}

impl OrElseEmpty for String {
    fn or_else_empty(self, f: impl FnOnce() -> String) -> String {
        if self.is_empty() { f() } else { self }
    }
}

/// The file's text without surrounding whitespace; empty if it cannot be read.
fn read_trimmed(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default()
}

/// Names in a directory, sorted; none if it cannot be listed.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The first `model name` and the number of `processor` lines.
fn parse_cpuinfo(text: &str) -> (String, u32) {
    let mut model = String::new();
    let mut count = 0;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim() {
            "processor" => count += 1,
            "model name" if model.is_empty() => model = value.trim().to_owned(),
            _ => {}
        }
    }
    (model, count)
}

/// `MemTotal:  16318412 kB` in bytes.
fn parse_meminfo(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            let mut parts = rest.split_whitespace();
            let n: u64 = parts.next()?.parse().ok()?;
            Some(match parts.next() {
                Some("kB") => n.saturating_mul(1024),
                _ => n,
            })
        })
        .unwrap_or(0)
}

/// `KEY=value` and `KEY="quoted value"` lines.
fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (k.trim().to_owned(), v.replace("\\\"", "\""))
        })
        .collect()
}

fn disks(root: &Path) -> Vec<Disk> {
    let block = root.join("sys/block");
    names(&block)
        .into_iter()
        .filter(|n| !NOT_DISKS.iter().any(|p| n.starts_with(p)))
        .map(|name| {
            let dir = block.join(&name);
            // Always in 512-byte units, whatever the device's sector size.
            let sectors: u64 = read_trimmed(&dir.join("size")).parse().unwrap_or(0);
            Disk {
                model: read_trimmed(&dir.join("device/model")),
                size_bytes: sectors.saturating_mul(512),
                name,
            }
        })
        .collect()
}

fn interfaces(root: &Path) -> Vec<NetworkInterface> {
    let net = root.join("sys/class/net");
    names(&net)
        .into_iter()
        .filter(|n| n != "lo")
        .map(|name| {
            let mac = read_trimmed(&net.join(&name).join("address"));
            NetworkInterface {
                mac: if mac.chars().all(|c| c == '0' || c == ':') {
                    String::new()
                } else {
                    mac
                },
                addresses: Vec::new(),
                name,
            }
        })
        .collect()
}

fn pci(root: &Path) -> Vec<PciId> {
    let devices = root.join("sys/bus/pci/devices");
    let hex = |p: &Path| u16::from_str_radix(read_trimmed(p).trim_start_matches("0x"), 16).ok();
    let mut ids: Vec<PciId> = names(&devices)
        .into_iter()
        .filter_map(|d| {
            let dir = devices.join(d);
            Some(PciId {
                vendor_id: hex(&dir.join("vendor"))?,
                device_id: hex(&dir.join("device"))?,
            })
        })
        .collect();
    ids.sort();
    ids
}

fn uname_release() -> String {
    // SAFETY: an all-zero utsname is a valid out-buffer for uname.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-buffer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    // SAFETY: uname NUL-terminates its fields.
    unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Adds each interface's IPv4 and IPv6 addresses (with prefix length) from getifaddrs.
fn add_addresses(network: &mut [NetworkInterface]) {
    for (name, addr, prefix) in interface_addresses() {
        if let Some(nic) = network.iter_mut().find(|n| n.name == name) {
            nic.addresses.push(format!("{addr}/{prefix}"));
        }
    }
    for nic in network {
        nic.addresses.sort();
    }
}

/// The network (`ADDRESS/PREFIX`, host bits cleared) of the interface holding `ip`.
pub fn subnet_of(ip: std::net::IpAddr) -> Option<String> {
    let (_, _, prefix) = interface_addresses()
        .into_iter()
        .find(|(_, a, _)| *a == ip)?;
    let network = match ip {
        std::net::IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
            std::net::IpAddr::V4((u32::from(a) & mask).into())
        }
        std::net::IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            std::net::IpAddr::V6((u128::from(a) & mask).into())
        }
    };
    Some(format!("{network}/{prefix}"))
}

/// Every interface address with its prefix length, from getifaddrs.
fn interface_addresses() -> Vec<(String, std::net::IpAddr, u32)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: valid out-pointer; freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        // SAFETY: ifa_addr and ifa_netmask point to sockaddrs of the family ifa_addr names.
        let addr = unsafe { sockaddr_ip(ifa.ifa_addr) };
        let mask = if ifa.ifa_netmask.is_null() {
            None
        } else {
            // SAFETY: as above.
            unsafe { sockaddr_ip(ifa.ifa_netmask) }
        };
        if let Some(addr) = addr {
            let prefix = mask.map_or(0, |m| match m {
                std::net::IpAddr::V4(m) => u32::from(m).count_ones(),
                std::net::IpAddr::V6(m) => u128::from(m).count_ones(),
            });
            out.push((name.into_owned(), addr, prefix));
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The IP address in a sockaddr of family AF_INET or AF_INET6.
///
/// # Safety
/// `sa` must point to a valid sockaddr as long as its family says.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<std::net::IpAddr> {
    // SAFETY: the caller guarantees a valid sockaddr.
    match i32::from(unsafe { (*sa).sa_family }) {
        libc::AF_INET => {
            // SAFETY: AF_INET means a sockaddr_in.
            let sin = unsafe { &*(sa as *const libc::sockaddr_in) };
            Some(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: AF_INET6 means a sockaddr_in6.
            let sin6 = unsafe { &*(sa as *const libc::sockaddr_in6) };
            Some(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subnet_of_an_address_is_its_interfaces_network() {
        let lo = "127.0.0.1".parse().unwrap();
        assert_eq!(subnet_of(lo).as_deref(), Some("127.0.0.0/8"));
        assert_eq!(subnet_of("192.0.2.77".parse().unwrap()), None);
    }
    use std::fs;

    fn put(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    #[test]
    fn reads_a_fake_machine() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        put(r, "proc/sys/kernel/hostname", "pc-042\n");
        put(r, "proc/sys/kernel/osrelease", "6.1.0-27-amd64\n");
        put(r, "sys/class/dmi/id/sys_vendor", "LENOVO\n");
        put(r, "sys/class/dmi/id/product_name", "20XW0026GE\n");
        put(r, "sys/class/dmi/id/product_serial", "PF2ABCDE\n");
        put(
            r,
            "proc/cpuinfo",
            "processor\t: 0\nmodel name\t: Intel(R) Core(TM) i5-10210U CPU @ 1.60GHz\n\n\
             processor\t: 1\nmodel name\t: Intel(R) Core(TM) i5-10210U CPU @ 1.60GHz\n",
        );
        put(
            r,
            "proc/meminfo",
            "MemTotal:       16318412 kB\nMemFree:  1 kB\n",
        );
        put(r, "sys/block/nvme0n1/size", "1000215216\n");
        put(
            r,
            "sys/block/nvme0n1/device/model",
            "SAMSUNG MZVLB512HBJQ-000L7  \n",
        );
        put(r, "sys/block/loop0/size", "8\n");
        put(r, "sys/block/zram0/size", "8\n");
        put(r, "sys/block/sda/size", "2048\n");
        put(r, "sys/class/net/enp0s31f6/address", "54:e1:ad:00:11:22\n");
        put(r, "sys/class/net/lo/address", "00:00:00:00:00:00\n");
        put(r, "sys/class/net/wg0/address", "\n");
        put(r, "sys/bus/pci/devices/0000:00:02.0/vendor", "0x8086\n");
        put(r, "sys/bus/pci/devices/0000:00:02.0/device", "0x9b41\n");
        put(r, "sys/bus/pci/devices/0000:00:1f.6/vendor", "0x8086\n");
        put(r, "sys/bus/pci/devices/0000:00:1f.6/device", "0x15be\n");
        put(r, "sys/bus/pci/devices/0000:00:1f.7/vendor", "garbage\n");
        put(
            r,
            "etc/os-release",
            "# comment\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\n\
             VERSION_ID=\"12\"\nID=debian\n",
        );
        let inv = collect(r);
        assert_eq!(inv.hostname, "pc-042");
        assert_eq!(
            (inv.vendor.as_str(), inv.model.as_str(), inv.serial.as_str()),
            ("LENOVO", "20XW0026GE", "PF2ABCDE")
        );
        assert_eq!(inv.cpu_model, "Intel(R) Core(TM) i5-10210U CPU @ 1.60GHz");
        assert_eq!(inv.cpu_count, 2);
        assert_eq!(inv.memory_bytes, 16318412 * 1024);
        assert_eq!(
            inv.disks,
            vec![
                Disk {
                    name: "nvme0n1".into(),
                    model: "SAMSUNG MZVLB512HBJQ-000L7".into(),
                    size_bytes: 1000215216 * 512,
                },
                Disk {
                    name: "sda".into(),
                    model: String::new(),
                    size_bytes: 2048 * 512,
                },
            ]
        );
        assert_eq!(
            inv.network,
            vec![
                NetworkInterface {
                    name: "enp0s31f6".into(),
                    mac: "54:e1:ad:00:11:22".into(),
                    addresses: vec![],
                },
                NetworkInterface {
                    name: "wg0".into(),
                    mac: String::new(),
                    addresses: vec![],
                },
            ]
        );
        assert_eq!(
            inv.pci,
            vec![
                PciId {
                    vendor_id: 0x8086,
                    device_id: 0x15be
                },
                PciId {
                    vendor_id: 0x8086,
                    device_id: 0x9b41
                },
            ]
        );
        assert_eq!(
            (
                inv.os_id.as_str(),
                inv.os_version.as_str(),
                inv.os_name.as_str()
            ),
            ("debian", "12", "Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(inv.kernel, "6.1.0-27-amd64");
        // Same tree, same digest: no spurious change reports.
        assert_eq!(collect(r).digest(), inv.digest());
    }

    #[test]
    fn missing_sources_leave_fields_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let inv = collect(tmp.path());
        assert_eq!(inv, Inventory::default());
        // Unreadable: a directory where a file should be.
        fs::create_dir_all(tmp.path().join("proc/meminfo")).unwrap();
        fs::create_dir_all(tmp.path().join("sys/block/sda/size")).unwrap();
        let inv = collect(tmp.path());
        assert_eq!(inv.memory_bytes, 0);
        assert_eq!(inv.disks[0].size_bytes, 0);
    }

    #[test]
    fn os_release_falls_back_and_unquotes() {
        let tmp = tempfile::tempdir().unwrap();
        put(
            tmp.path(),
            "usr/lib/os-release",
            "ID='fedora'\nVERSION_ID=40\nPRETTY_NAME=\"Say \\\"hi\\\"\"\n",
        );
        let inv = collect(tmp.path());
        assert_eq!(inv.os_id, "fedora");
        assert_eq!(inv.os_version, "40");
        assert_eq!(inv.os_name, "Say \"hi\"");
    }

    #[test]
    fn the_real_machine_has_a_kernel_and_addresses_parse() {
        let inv = collect(Path::new("/"));
        assert!(!inv.kernel.is_empty());
        for nic in &inv.network {
            for a in &nic.addresses {
                let (ip, prefix) = a.split_once('/').unwrap();
                assert!(ip.parse::<std::net::IpAddr>().is_ok(), "{a}");
                assert!(prefix.parse::<u8>().unwrap() <= 128, "{a}");
            }
        }
    }
}
