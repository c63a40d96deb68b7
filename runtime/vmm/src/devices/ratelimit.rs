//! Rate limiting of log lines a guest (or a misbehaving host peer) can trigger at will.

use std::time::{Duration, Instant};

/// Limits one kind of warning: the first occurrence is logged, later ones at most once per
/// period, each with the count of occurrences left out since the last line. A guest that
/// triggers the warning in a loop gets one line per period into the VMM log, not one per
/// packet.
#[derive(Debug)]
pub struct LogLimiter {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    pub const fn new(period: Duration) -> Self {
        LogLimiter {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// Records one occurrence. Returns `Some(left_out)` if it should be logged now, where
    /// `left_out` is how many occurrences were not logged since the last logged one.
    pub fn hit(&mut self) -> Option<u64> {
        self.hit_at(Instant::now())
    }

    fn hit_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.period => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

impl Default for LogLimiter {
    /// One line per second.
    fn default() -> Self {
        LogLimiter::new(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_then_one_per_period_with_the_count_left_out() {
        let mut l = LogLimiter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.hit_at(t0), Some(0));
        let logged = (1..=10_000u64)
            .filter_map(|i| l.hit_at(t0 + Duration::from_micros(i * 10)))
            .count();
        assert_eq!(logged, 0, "a burst within the period is not logged");
        assert_eq!(l.hit_at(t0 + Duration::from_secs(1)), Some(10_000));
        assert_eq!(l.hit_at(t0 + Duration::from_millis(1500)), None);
        assert_eq!(l.hit_at(t0 + Duration::from_secs(3)), Some(1));
        assert_eq!(l.hit_at(t0 + Duration::from_secs(5)), Some(0));
    }
}
