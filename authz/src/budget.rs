//! Compiling within a time budget (issue 19, R1): a policy compile runs on
//! a thread of its own and its caller waits for it at most the budget. A
//! compile cannot be cancelled, so one over time is abandoned on its thread
//! (its result dropped when it ends); at most [`MAX_ABANDONED`] may run at
//! once, after which new compiles are refused until one ends. Shared by the
//! policy file watcher (`rampart_proxy::policy`) and the bundle poller
//! (`rampart_central`). std only: no runtime.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Compiles abandoned over time that may still run at once (each holds a
/// thread and a core until it ends by itself).
pub const MAX_ABANDONED: usize = 2;

static ABANDONED: AtomicUsize = AtomicUsize::new(0);

/// Why a compile gave no result within its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BudgetExceeded {
    /// It took longer than the budget (it goes on, abandoned).
    #[error("compiling took longer than the {0:?} budget")]
    OverTime(Duration),
    /// Too many compiles over time are still running.
    #[error("{MAX_ABANDONED} earlier compiles over budget are still running; not starting another")]
    Busy,
    /// No thread could be started for it.
    #[error("no thread could be started for the compile")]
    NoThread,
}

/// Runs `compile` on a thread of its own and waits for it at most `time`,
/// blocking the caller (call it at start, or from a blocking task).
pub fn run_within<T: Send + 'static>(
    time: Duration,
    compile: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BudgetExceeded> {
    if ABANDONED.load(Ordering::SeqCst) >= MAX_ABANDONED {
        return Err(BudgetExceeded::Busy);
    }
    // Whether the waiter gave up; the thread reads it under the same lock
    // when it ends, so exactly one of them releases the slot.
    let abandoned = Arc::new(Mutex::new(false));
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let flag = abandoned.clone();
    std::thread::Builder::new()
        .name("rampart-policy-compile".into())
        .spawn(move || {
            let result = compile();
            let gave_up = flag.lock().map(|g| *g).unwrap_or(true);
            if gave_up {
                ABANDONED.fetch_sub(1, Ordering::SeqCst);
            } else {
                let _ = tx.send(result);
            }
        })
        .map_err(|_| BudgetExceeded::NoThread)?;
    match rx.recv_timeout(time) {
        Ok(r) => Ok(r),
        Err(_) => {
            let mut gave_up = abandoned.lock().unwrap_or_else(|p| p.into_inner());
            // The result may have arrived between the timeout and the lock.
            if let Ok(r) = rx.try_recv() {
                return Ok(r);
            }
            *gave_up = true;
            ABANDONED.fetch_add(1, Ordering::SeqCst);
            Err(BudgetExceeded::OverTime(time))
        }
    }
}

/// How many abandoned compiles run now.
pub fn abandoned() -> usize {
    ABANDONED.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_compile_over_time_is_refused_at_its_budget_and_released_when_it_ends() {
        let started = Instant::now();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let r = run_within(Duration::from_millis(100), move || {
            std::thread::sleep(Duration::from_millis(600));
            let _ = done_tx.send(());
        });
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "waited past the budget"
        );
        assert_eq!(r, Err(BudgetExceeded::OverTime(Duration::from_millis(100))));
        done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while abandoned() != 0 {
            assert!(Instant::now() < deadline, "slot never released");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(run_within(Duration::from_secs(5), || 7), Ok(7));
    }
}
