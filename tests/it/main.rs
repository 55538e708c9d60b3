//! End-to-end tests: real `morgana serve` and `morgana-agent` processes over TLS on
//! loopback. One test binary for the whole suite keeps link time down.

mod daemon;
mod damage;
mod dedup;
mod drivers;
mod fidelity;
mod gc;
mod image;
mod layers;
mod mdns;
mod plugins;
mod policy;
mod protocol;
mod reflectors;
mod resume;
mod web;

/// rustls needs one process-wide crypto provider before any TLS use in a test helper.
pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        morgana_e2e::bin_dir();
    });
}
