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
//! (half the round trip counted), so a host clock that is off does not decide either.

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

/// What a `DEL` of a key with an expiry time was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    Expiry,
    Delete,
}

#[derive(Debug, Default)]
pub struct PrimaryClock {
    /// Primary time minus local time (ms), from the last sample.
    skew_ms: i64,
    samples: VecDeque<ClockSample>,
}

impl PrimaryClock {
    /// The primary's time now (ms), as well as it is known.
    pub fn now(&self) -> i64 {
        now_ms().saturating_add(self.skew_ms)
    }

    /// Records a sample (and the skew measured with it). Samples of an earlier stream (a
    /// higher offset than this one) are dropped: offsets only compare within one history.
    pub fn record(&mut self, sample: ClockSample, skew_ms: Option<i64>) {
        if let Some(skew) = skew_ms {
            self.skew_ms = skew;
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
        let latest = after.map_or_else(|| self.now(), |a| a.time_ms);
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
        clock.record(sample(100, 10_000, 5), Some(0));
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
