//! Retention: which of a device's snapshots to keep. Only the server applies it (an agent
//! cannot delete snapshots), as the first step of every garbage collection.
//!
//! Each tier keeps the newest snapshot of each of its N most recent periods that hold a
//! snapshot (as `restic forget --keep-hourly` and friends do). The newest snapshot and
//! pinned snapshots are always kept. Periods are UTC hours, days, ISO weeks (Monday first)
//! and calendar months.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            hourly: 24,
            daily: 14,
            weekly: 8,
            monthly: 12,
        }
    }
}

/// Tiers set for every device at once (`--keep-*` of `serve` and `gc`), over what each
/// device's policy says; `None` leaves the policy's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionOverride {
    pub hourly: Option<u32>,
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
}

impl RetentionOverride {
    /// The same tiers for every device, whatever their policies say.
    #[cfg(test)]
    pub fn all(rules: Retention) -> RetentionOverride {
        RetentionOverride {
            hourly: Some(rules.hourly),
            daily: Some(rules.daily),
            weekly: Some(rules.weekly),
            monthly: Some(rules.monthly),
        }
    }

    pub fn apply(&self, policy: Retention) -> Retention {
        Retention {
            hourly: self.hourly.unwrap_or(policy.hourly),
            daily: self.daily.unwrap_or(policy.daily),
            weekly: self.weekly.unwrap_or(policy.weekly),
            monthly: self.monthly.unwrap_or(policy.monthly),
        }
    }
}

/// What retention needs to know of one snapshot.
#[derive(Clone, Debug)]
pub struct Dated {
    pub id: String,
    pub created_ms: i64,
    pub pinned: bool,
}

/// Maps a time (ms) to the number of its period (hour, day, week, month).
type Period = fn(i64) -> i64;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

fn hour(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS)
}

fn day(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// 1970-01-01 was a Thursday: shifting by three days makes weeks start on Monday.
fn iso_week(ms: i64) -> i64 {
    (day(ms) + 3).div_euclid(7)
}

fn month(ms: i64) -> i64 {
    let t = OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    i64::from(t.year()) * 12 + i64::from(u8::from(t.month()))
}

/// The ids of the snapshots to keep.
pub fn keep(snapshots: &[Dated], rules: &Retention) -> HashSet<String> {
    let mut newest_first: Vec<&Dated> = snapshots.iter().collect();
    newest_first.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(b.id.cmp(&a.id)));
    let mut kept: HashSet<String> = newest_first
        .iter()
        .filter(|s| s.pinned)
        .map(|s| s.id.clone())
        .collect();
    if let Some(newest) = newest_first.first() {
        kept.insert(newest.id.clone());
    }
    let tiers: [(u32, Period); 4] = [
        (rules.hourly, hour),
        (rules.daily, day),
        (rules.weekly, iso_week),
        (rules.monthly, month),
    ];
    for (count, period) in tiers {
        let mut last = None;
        let mut taken = 0;
        for s in &newest_first {
            if taken == count {
                break;
            }
            let p = period(s.created_ms);
            if last != Some(p) {
                last = Some(p);
                taken += 1;
                kept.insert(s.id.clone());
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-02 00:00 UTC, a Monday.
    const MONDAY: i64 = 1_793_577_600_000;

    fn every(step_ms: i64, n: i64) -> Vec<Dated> {
        (0..n)
            .map(|i| Dated {
                id: format!("s{i:04}"),
                created_ms: MONDAY + i * step_ms,
                pinned: false,
            })
            .collect()
    }

    fn sorted(set: HashSet<String>) -> Vec<String> {
        let mut v: Vec<String> = set.into_iter().collect();
        v.sort();
        v
    }

    fn rules(hourly: u32, daily: u32, weekly: u32, monthly: u32) -> Retention {
        Retention {
            hourly,
            daily,
            weekly,
            monthly,
        }
    }

    #[test]
    fn the_monday_constant_is_a_monday_midnight() {
        let t = OffsetDateTime::from_unix_timestamp(MONDAY / 1000).unwrap();
        assert_eq!(t.weekday(), time::Weekday::Monday);
        assert_eq!((t.hour(), t.minute()), (0, 0));
        assert_eq!(iso_week(MONDAY), iso_week(MONDAY + 7 * DAY_MS - 1));
        assert_ne!(iso_week(MONDAY), iso_week(MONDAY - 1));
    }

    #[test]
    fn hourly_keeps_the_newest_of_each_recent_hour() {
        // Every 20 minutes for 5 hours: 15 snapshots, three per hour.
        let snaps = every(20 * 60_000, 15);
        let kept = sorted(keep(&snaps, &rules(3, 0, 0, 0)));
        // Hours 4, 3, 2: their last snapshots are s14, s11, s08.
        assert_eq!(kept, ["s0008", "s0011", "s0014"]);
    }

    #[test]
    fn tiers_add_up_and_overlap() {
        // One snapshot every 6 hours for 60 days, starting on a Monday.
        let snaps = every(6 * HOUR_MS, 240);
        let kept = keep(&snaps, &rules(2, 3, 2, 2));
        let ids = |v: &[i64]| v.iter().map(|i| format!("s{i:04}")).collect::<Vec<_>>();
        // hourly: s239, s238; daily: newest of days 59, 58, 57 = s239, s235, s231;
        // weekly: weeks of day 59 (week 8) and day 55 (week 7): s239 and s223 (day 55 18h);
        // monthly: November (days 0..28 → s115) and December (s239).
        let mut expected = ids(&[239, 238, 235, 231, 223, 115]);
        expected.sort();
        assert_eq!(sorted(kept), expected);
    }

    #[test]
    fn newest_and_pinned_are_always_kept() {
        let mut snaps = every(DAY_MS, 10);
        snaps[2].pinned = true;
        let kept = sorted(keep(&snaps, &rules(0, 0, 0, 0)));
        assert_eq!(kept, ["s0002", "s0009"]);
        assert!(keep(&[], &Retention::default()).is_empty());
    }

    #[test]
    fn gaps_do_not_count_as_periods() {
        // Three snapshots months apart: daily 3 keeps all three (one per day that has one).
        let snaps = vec![
            Dated {
                id: "a".into(),
                created_ms: MONDAY,
                pinned: false,
            },
            Dated {
                id: "b".into(),
                created_ms: MONDAY + 40 * DAY_MS,
                pinned: false,
            },
            Dated {
                id: "c".into(),
                created_ms: MONDAY + 90 * DAY_MS,
                pinned: false,
            },
        ];
        assert_eq!(sorted(keep(&snaps, &rules(0, 3, 0, 0))), ["a", "b", "c"]);
        assert_eq!(sorted(keep(&snaps, &rules(0, 2, 0, 0))), ["b", "c"]);
    }
}
