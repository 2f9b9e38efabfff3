//! Progress of a snapshot, for the log and a terminal.

use std::time::Duration;

/// Progress of a snapshot: a log line at every tenth of the keys and at least every few seconds,
/// with percent and rate, and a bar when standard error is a terminal. The total is the
/// primary's key count when the sync began.
pub struct SnapshotProgress {
    total: u64,
    pub keys: u64,
    next_percent: f64,
    started: std::time::Instant,
    last_log: std::time::Instant,
    bar: indicatif::ProgressBar,
}

impl SnapshotProgress {
    const LOG_EVERY: Duration = Duration::from_secs(5);
    const LOOK_EVERY_KEYS: u64 = 256;

    pub fn new(total: u64) -> Self {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(total.max(1)),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "snapshot {bar:40} {pos}/{len} keys {per_sec} {eta}",
        ) {
            bar.set_style(style);
        }
        let now = std::time::Instant::now();
        SnapshotProgress {
            total,
            keys: 0,
            next_percent: 10.0,
            started: now,
            last_log: now,
            bar,
        }
    }

    pub fn key_done(&mut self) {
        self.keys += 1;
        // The bar, the clock and the thresholds are looked at every few hundred keys: per key
        // they were 5% of capture's instructions in a load of small hashes.
        if self.keys % Self::LOOK_EVERY_KEYS == 0 {
            self.look();
        }
    }

    /// Moves the bar, and logs at a tenth of the keys passed or when the last line is old.
    fn look(&mut self) {
        self.bar.set_position(self.keys);
        let percent = self.percent();
        if self.last_log.elapsed() >= Self::LOG_EVERY
            || (self.total > 0 && percent >= self.next_percent)
        {
            self.last_log = std::time::Instant::now();
            while self.next_percent <= percent {
                self.next_percent += 10.0;
            }
            tracing::info!(keys = self.keys, total = self.total, percent = %format!("{percent:.1}"), keys_per_second = self.rate(), "snapshot progress");
        }
    }

    fn percent(&self) -> f64 {
        if self.total == 0 {
            100.0
        } else {
            (self.keys as f64 * 100.0 / self.total as f64).min(100.0)
        }
    }

    pub fn rate(&self) -> u64 {
        let seconds = self.started.elapsed().as_secs_f64();
        if seconds > 0.0 {
            (self.keys as f64 / seconds) as u64
        } else {
            0
        }
    }

    pub fn finish(&mut self) {
        self.look();
        self.bar.finish_and_clear();
    }
}
