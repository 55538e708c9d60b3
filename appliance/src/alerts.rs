//! Alerts: conditions an administrator must hear about, raised as events once per episode.
//!
//! - `alert.no-recent-snapshot`: a device's newest snapshot (or, before its first, its
//!   enrolment) is older than its policy's `alert_after`.
//! - `alert.volume-full`: a volume is more than [`VOLUME_FULL_PERCENT`] used.
//!
//! An episode is a row in the catalog's open alerts: a check raises the event only when it
//! opens the row, and records `alert.recovered` only when it closes it, so the periodic
//! check in `serve` and `morgana alerts check` beside it never report one episode twice.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::catalog::{Catalog, CatalogError, OpenAlert};
use crate::clock;
use crate::events::{self, NewEvent, Severity};
use crate::policy::format_duration;

pub const NO_RECENT_SNAPSHOT: &str = "alert.no-recent-snapshot";
pub const VOLUME_FULL: &str = "alert.volume-full";
pub const RECOVERED: &str = "alert.recovered";
/// A volume above this share of its space used raises `alert.volume-full`.
pub const VOLUME_FULL_PERCENT: f64 = 90.0;

/// What one check changed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    /// Episodes opened by this check (their messages).
    pub raised: Vec<String>,
    /// Episodes closed by this check.
    pub recovered: Vec<String>,
    /// Every episode open after the check.
    pub open: Vec<OpenAlert>,
}

/// Runs every check once, as of `now_ms`.
pub async fn check(
    catalog: &dyn Catalog,
    volumes: &[PathBuf],
    now_ms: i64,
) -> Result<CheckReport, CatalogError> {
    let mut report = CheckReport::default();
    for d in catalog.device_protection().await? {
        if d.device.revoked {
            // A revoked device will never sync again: nothing to chase.
            close(catalog, &stale_key(&d.device.id), &mut report).await?;
            continue;
        }
        let newest = d
            .newest_snapshot
            .as_deref()
            .and_then(clock::parse_rfc3339_ms);
        let since = newest.or_else(|| clock::parse_rfc3339_ms(&d.device.created));
        let Some(since) = since else { continue };
        let limit_ms = i64::try_from(d.policy.spec.alert_after_secs)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000);
        let key = stale_key(&d.device.id);
        if now_ms.saturating_sub(since) <= limit_ms {
            close(catalog, &key, &mut report).await?;
            continue;
        }
        let what = match newest {
            Some(_) => format!("no successful snapshot since {}", clock::rfc3339_ms(since)),
            None => format!(
                "no successful snapshot since its enrolment at {}",
                clock::rfc3339_ms(since)
            ),
        };
        let message = format!(
            "device {} ({}) has {what}, longer than the {} its policy {:?} allows: check that \
             its agent runs (`morgana-agent run`) and can reach the appliance",
            d.device.hostname,
            d.device.id,
            format_duration(d.policy.spec.alert_after_secs),
            d.policy.name,
        );
        let alert = OpenAlert {
            key,
            kind: NO_RECENT_SNAPSHOT.into(),
            device_id: Some(d.device.id.clone()),
            since_ms: now_ms,
            message,
        };
        raise(catalog, alert, Severity::Warning, &mut report).await?;
    }
    for volume in volumes {
        let key = format!("volume-full:{}", volume.display());
        match used_percent(volume) {
            Err(e) => {
                // Unknown is not recovered: the episode stays as it is.
                tracing::warn!(volume = %volume.display(), error = %e, "cannot read how full a volume is");
            }
            Ok(used) if used > VOLUME_FULL_PERCENT => {
                let alert = OpenAlert {
                    key,
                    kind: VOLUME_FULL.into(),
                    device_id: None,
                    since_ms: now_ms,
                    message: format!(
                        "volume {} is {used:.1} % full (alert above {VOLUME_FULL_PERCENT} %): \
                         add a volume with `serve --volume DIR`, free space, or shorten \
                         retention in the policies and run `morgana gc`",
                        volume.display()
                    ),
                };
                raise(catalog, alert, Severity::Error, &mut report).await?;
            }
            Ok(_) => close(catalog, &key, &mut report).await?,
        }
    }
    report.open = catalog.open_alerts().await?;
    Ok(report)
}

fn stale_key(device_id: &str) -> String {
    format!("no-recent-snapshot:{device_id}")
}

async fn raise(
    catalog: &dyn Catalog,
    alert: OpenAlert,
    severity: Severity,
    report: &mut CheckReport,
) -> Result<(), CatalogError> {
    if !catalog.open_alert(&alert).await? {
        return Ok(());
    }
    tracing::warn!(kind = %alert.kind, message = %alert.message, "alert raised");
    let mut event = NewEvent::system(&alert.kind, severity, alert.message.clone());
    if let Some(device) = &alert.device_id {
        event = event.for_device(device);
    }
    events::record(catalog, event).await;
    report.raised.push(alert.message);
    Ok(())
}

async fn close(
    catalog: &dyn Catalog,
    key: &str,
    report: &mut CheckReport,
) -> Result<(), CatalogError> {
    let Some(closed) = catalog.close_alert(key).await? else {
        return Ok(());
    };
    let message = format!(
        "recovered ({} since {}): {}",
        closed.kind,
        clock::rfc3339_ms(closed.since_ms),
        closed.message
    );
    tracing::info!(%message, "alert recovered");
    let mut event = NewEvent::system(RECOVERED, Severity::Info, message.clone());
    if let Some(device) = &closed.device_id {
        event = event.for_device(device);
    }
    events::record(catalog, event).await;
    report.recovered.push(message);
    Ok(())
}

/// How much of the filesystem holding `dir` is used, as `df` counts it: the blocks
/// reserved for root count as neither used nor available.
pub fn used_percent(dir: &Path) -> std::io::Result<f64> {
    space(dir).map(|s| s.used_percent())
}

/// Bytes used and available to ordinary writers on the filesystem holding a directory.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Space {
    pub used: u64,
    pub available: u64,
}

impl Space {
    pub fn used_percent(&self) -> f64 {
        let usable = self.used + self.available;
        if usable == 0 {
            return 0.0;
        }
        self.used as f64 * 100.0 / usable as f64
    }
}

/// [`Space`] of the filesystem holding `dir`.
pub fn space(dir: &Path) -> std::io::Result<Space> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is writable for one statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The block counts are u32 on some targets.
    #[allow(clippy::unnecessary_cast)]
    let (blocks, free, available, size) = (
        st.f_blocks as u64,
        st.f_bfree as u64,
        st.f_bavail as u64,
        st.f_frsize as u64,
    );
    Ok(Space {
        used: blocks.saturating_sub(free) * size,
        available: available * size,
    })
}

#[cfg(test)]
fn percent(blocks: u64, free: u64, available: u64) -> f64 {
    Space {
        used: blocks.saturating_sub(free),
        available,
    }
    .used_percent()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Device, SqliteCatalog};
    use crate::events::EventFilter;
    use morgana_core::Id;
    use morgana_core::wire::{SnapshotInfo, SnapshotStats};

    const HOUR: i64 = 3_600_000;

    /// The kinds of the alert events recorded, oldest first.
    async fn alerts(cat: &SqliteCatalog) -> Vec<String> {
        let filter = EventFilter {
            kind_prefix: Some("alert.".into()),
            ..Default::default()
        };
        cat.events_page(&filter, None, 100)
            .await
            .unwrap()
            .into_iter()
            .rev()
            .map(|e| e.event.kind)
            .collect()
    }

    #[test]
    fn usage_counts_like_df() {
        assert_eq!(percent(100, 100, 95), 0.0);
        // 5 blocks reserved for root: 90 used of 95 usable.
        assert!((percent(100, 10, 5) - 90.0 / 95.0 * 100.0).abs() < 1e-9);
        assert_eq!(percent(0, 0, 0), 0.0);
        assert!(used_percent(Path::new("/")).unwrap() <= 100.0);
        assert!(used_percent(Path::new("/no/such/dir")).is_err());
    }

    #[tokio::test]
    async fn a_stale_device_alerts_once_per_episode_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let cat = SqliteCatalog::open(&dir.path().join("catalog.sqlite"), true)
            .await
            .unwrap();
        cat.create_token(Id::of(b"t"), 1, i64::MAX).await.unwrap();
        let enrolled = 1_790_000_000_000;
        cat.enroll_device(
            Id::of(b"t"),
            0,
            &Device {
                id: "d1".into(),
                hostname: "alpha".into(),
                cert_fingerprint: Id::of(b"d1"),
                created: clock::rfc3339_ms(enrolled),
                revoked: false,
            },
        )
        .await
        .unwrap();
        // Never synced, enrolled 23 h ago: fine. At 25 h: stale, once.
        let r = check(&cat, &[], enrolled + 23 * HOUR).await.unwrap();
        assert!(r.raised.is_empty() && r.open.is_empty());
        let r = check(&cat, &[], enrolled + 25 * HOUR).await.unwrap();
        assert_eq!(r.raised.len(), 1);
        assert!(r.raised[0].contains("alpha") && r.raised[0].contains("1d"));
        let r = check(&cat, &[], enrolled + 26 * HOUR).await.unwrap();
        assert!(r.raised.is_empty());
        assert_eq!(r.open.len(), 1);
        assert_eq!(alerts(&cat).await, [NO_RECENT_SNAPSHOT]);

        // A snapshot ends the episode; the next one starts a new one.
        let synced = enrolled + 27 * HOUR;
        cat.insert_snapshot(&SnapshotInfo {
            id: "s1".into(),
            device_id: "d1".into(),
            root: Id::of(b"root"),
            created: clock::rfc3339_ms(synced),
            reason: "test".into(),
            stats: SnapshotStats::default(),
            pinned: None,
        })
        .await
        .unwrap();
        let r = check(&cat, &[], synced + HOUR).await.unwrap();
        assert_eq!(r.recovered.len(), 1);
        assert!(r.open.is_empty());
        check(&cat, &[], synced + 2 * HOUR).await.unwrap();
        check(&cat, &[], synced + 25 * HOUR).await.unwrap();
        assert_eq!(
            alerts(&cat).await,
            [NO_RECENT_SNAPSHOT, RECOVERED, NO_RECENT_SNAPSHOT]
        );
    }
}
