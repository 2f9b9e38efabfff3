//! The primary's clock, and deciding whether a replicated `DEL` was an expiry (docs/design.md
//! section 3.1).
//!
//! A key that expires reaches replicas as `DEL` (or `UNLINK`), exactly like an application's
//! delete, and the stream carries no time. What tells them apart is *when* the command ran on the
//! primary: Redis deletes an expired key before any command touches it, so a `DEL` that ran at or
//! after the key's expiry time is the expiry, one that ran before it is the application's.
//!
//! Capture samples the primary with one `MULTI` of `TIME`, `INFO replication` and `INFO stats`
//! (the primary's time, its offset, its count of expired keys) when a link starts and about
//! every second while it runs, keeps the last [`SAMPLES`], and stores the latest with each
//! commit so that it survives a restart. A command ending at offset `O` ran between the last
//! sample taken at or before `O` and the first one taken after it. Then:
//! - no key expired on the primary between those two samples: the `DEL` is a delete;
//! - the key's expiry time is at or before the earlier sample: an expiry;
//! - it is after the later sample (or after the primary's time now): a delete;
//! - otherwise the decision is ambiguous: capture treats it as an expiry (deleting a row the
//!   mapping keeps would lose the only copy) and counts it in
//!   `writebehind_expiry_decisions_total{basis="ambiguous"}`.
//!
//! The primary's time is the local clock corrected by the skew measured at the last sample
//! (half the round trip counted), so a host clock that is off does not decide either. That
//! estimate is only good to half the sample's round trip plus the milliseconds both clocks
//! truncate, so "after the primary's time now" means after it by more than that: a key whose
//! expiry time is within it of now is ambiguous, never a delete (a key with a TTL of a few
//! milliseconds, expired on the primary just before capture applies its `DEL`, must not lose
//! its kept row to a clock estimate a millisecond behind).

use std::collections::VecDeque;

use crate::clock::now_ms;
use crate::position::ReplOffset;

/// Samples kept in memory (about a minute while the link runs).
pub const SAMPLES: usize = 64;

/// The primary at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockSample {
    /// The primary's `master_repl_offset` then.
    pub offset: ReplOffset,
    /// The primary's time then (ms).
    pub time_ms: i64,
    /// The primary's `expired_keys` counter then.
    pub expired_keys: u64,
}

/// The primary's time minus the local time, as one sample measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Skew {
    /// Primary time minus local time (ms), the primary's time taken at the round trip's middle.
    pub offset_ms: i64,
    /// How far the true skew may be from `offset_ms` (ms): half the round trip, plus one
    /// millisecond for each clock's truncation to whole milliseconds.
    pub uncertainty_ms: i64,
}

impl Skew {
    /// The skew measured by a request sent at local time `sent_ms`, answered at
    /// `received_ms`, that read the primary's time `primary_ms` (all truncated to ms).
    pub fn measured(sent_ms: i64, primary_ms: i64, received_ms: i64) -> Skew {
        let half_trip = (received_ms - sent_ms).max(0) / 2;
        Skew {
            offset_ms: primary_ms - (sent_ms + half_trip),
            // The remainder of an odd round trip, then one truncation per clock.
            uncertainty_ms: (received_ms - sent_ms).max(0) - half_trip + 2,
        }
    }
}

/// What a `DEL` of a key with an expiry time was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    Expiry,
    Delete,
}

#[derive(Debug, Default)]
pub struct PrimaryClock {
    /// Primary time minus local time, from the last sample that measured it.
    skew: Skew,
    samples: VecDeque<ClockSample>,
}

impl PrimaryClock {
    /// The primary's time now (ms), as well as it is known.
    pub fn now(&self) -> i64 {
        now_ms().saturating_add(self.skew.offset_ms)
    }

    /// Records a sample (and the skew measured with it). Samples of an earlier stream (a
    /// higher offset than this one) are dropped: offsets only compare within one history.
    pub fn record(&mut self, sample: ClockSample, skew: Option<Skew>) {
        if let Some(skew) = skew {
            self.skew = skew;
        }
        while self
            .samples
            .back()
            .is_some_and(|last| last.offset > sample.offset)
        {
            self.samples.pop_back();
        }
        self.samples.push_back(sample);
        while self.samples.len() > SAMPLES {
            self.samples.pop_front();
        }
    }

    /// A new history (a full sync): earlier samples mean nothing for its offsets.
    pub fn forget(&mut self) {
        self.samples.clear();
    }

    /// What a `DEL` ending at `end` of a key expiring at `expire_at_ms` was, and whether the
    /// samples could not tell (see the module doc).
    pub fn deletion(&self, expire_at_ms: i64, end: ReplOffset) -> (Deletion, bool) {
        let before = self.samples.iter().rev().find(|s| s.offset < end);
        let after = self.samples.iter().find(|s| s.offset >= end);
        if let (Some(before), Some(after)) = (before, after) {
            if after.expired_keys == before.expired_keys {
                return (Deletion::Delete, false);
            }
        }
        if before.is_some_and(|b| expire_at_ms <= b.time_ms) {
            return (Deletion::Expiry, false);
        }
        // A later sample read the primary's time itself; the estimate of now is only as good
        // as the skew.
        let latest = after.map_or_else(
            || self.now().saturating_add(self.skew.uncertainty_ms),
            |a| a.time_ms,
        );
        if expire_at_ms > latest {
            return (Deletion::Delete, false);
        }
        (Deletion::Expiry, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(offset: u64, time_ms: i64, expired_keys: u64) -> ClockSample {
        ClockSample {
            offset: ReplOffset(offset),
            time_ms,
            expired_keys,
        }
    }

    #[test]
    fn a_del_is_an_expiry_only_when_the_samples_allow_it() {
        let mut clock = PrimaryClock::default();
        clock.record(sample(100, 10_000, 5), Some(Skew::default()));
        clock.record(sample(200, 20_000, 5), None);
        clock.record(sample(300, 30_000, 6), None);
        // No key expired between the samples around it: a delete, whatever the TTL says.
        assert_eq!(
            clock.deletion(12_000, ReplOffset(150)),
            (Deletion::Delete, false)
        );
        // Expired before the earlier sample: the primary deleted it.
        assert_eq!(
            clock.deletion(15_000, ReplOffset(250)),
            (Deletion::Expiry, false)
        );
        // Expiring after the later sample: the application deleted it.
        assert_eq!(
            clock.deletion(35_000, ReplOffset(250)),
            (Deletion::Delete, false)
        );
        // In between, with a key expired meanwhile: cannot tell; counted, kept as an expiry.
        assert_eq!(
            clock.deletion(25_000, ReplOffset(250)),
            (Deletion::Expiry, true)
        );
        // Newer than every sample: against the primary's time now.
        let far = clock.now() + 60_000;
        assert_eq!(
            clock.deletion(far, ReplOffset(400)),
            (Deletion::Delete, false)
        );
        assert_eq!(
            clock.deletion(28_000, ReplOffset(400)),
            (Deletion::Expiry, false)
        );
    }

    #[test]
    fn a_del_within_the_skews_uncertainty_of_now_is_never_a_delete() {
        let mut clock = PrimaryClock::default();
        // Sent at 1,000, answered at 1,010: the primary read 5,003 somewhere in between.
        let skew = Skew::measured(1_000, 5_003, 1_010);
        assert_eq!(skew.offset_ms, 5_003 - 1_005);
        assert_eq!(skew.uncertainty_ms, 7);
        clock.record(sample(100, 5_003, 0), Some(skew));
        // The key expired on the primary an instant ago, but the estimate of its time may be
        // up to the uncertainty behind: not a delete.
        let just_expired = clock.now() + skew.uncertainty_ms;
        assert_eq!(
            clock.deletion(just_expired, ReplOffset(200)),
            (Deletion::Expiry, true)
        );
        // Beyond the uncertainty (and the time this test takes): certainly the application's.
        let later = clock.now() + skew.uncertainty_ms + 60_000;
        assert_eq!(
            clock.deletion(later, ReplOffset(200)),
            (Deletion::Delete, false)
        );
    }

    #[test]
    fn samples_of_an_earlier_history_are_dropped_and_memory_is_bounded() {
        let mut clock = PrimaryClock::default();
        for i in 0..200u64 {
            clock.record(sample(i * 10, i as i64, 0), None);
        }
        assert_eq!(clock.samples.len(), SAMPLES);
        clock.record(sample(5, 1, 0), None);
        assert_eq!(clock.samples.back(), Some(&sample(5, 1, 0)));
        assert_eq!(clock.samples.len(), 1);
    }
}
