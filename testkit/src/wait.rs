//! Waiting for a condition: poll it with a deadline, and fail with what
//! was awaited. Timing-dependent tests are defects; a test waits for the
//! state it needs, never for a fixed time.

use std::time::{Duration, Instant};

/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` until it returns `Some`, for at most `within`; panics
/// naming `what` when the deadline passes.
pub fn until<T>(what: &str, within: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Polls `cond` until it holds, for at most `within`; panics naming `what`
/// when the deadline passes.
pub fn until_true(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    until(what, within, || cond().then_some(()))
}
