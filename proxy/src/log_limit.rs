//! Log lines that an attacker or an outage could repeat thousands of times
//! a second (a full listener, a flooding source, refusals while the
//! identity is gone): at most one line per interval, carrying how many
//! were left out since the last one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The interval of the rate-limited lines.
pub const EVERY: Duration = Duration::from_secs(10);

/// One rate-limited log line.
#[derive(Debug)]
pub struct RateLimited {
    every: Duration,
    /// When the last line was written, and how many were left out since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    /// At most one line per `every`.
    pub const fn new(every: Duration) -> Self {
        RateLimited {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Whether to write the line now: `Some(n)` with the number of lines
    /// left out since the last one, or `None` to leave this one out.
    pub fn hit(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < self.every => {
                s.1 += 1;
                None
            }
            _ => {
                let suppressed = s.1;
                *s = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_of_the_others() {
        let l = RateLimited::new(Duration::from_millis(200));
        assert_eq!(l.hit(), Some(0));
        for _ in 0..99 {
            assert_eq!(l.hit(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(l.hit(), Some(99));
        assert_eq!(l.hit(), None);
    }
}
