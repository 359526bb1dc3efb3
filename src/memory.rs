//! How `rampart run` gives heap memory back to the system (issue 19 item
//! 5, issue 20 item 4). Rust uses the C library's malloc; glibc's keeps
//! what a burst freed: up to 8 arenas per core, each trimmed only from its
//! top, so RSS after a flood or a concurrency peak stayed at the peak.
//! Two settings fix that without another allocator: at most two arenas
//! (the runtime has two workers; more arenas only spread free memory
//! around), fixed trim and mmap thresholds (glibc otherwise raises them
//! after the first large free, keeping ever larger blocks), and a thread
//! that calls `malloc_trim` every few seconds, which returns free pages
//! from the middle of every arena too.

#![allow(
    unsafe_code,
    reason = "mallopt and malloc_trim are glibc calls with no memory-safety preconditions"
)]

use std::time::Duration;

/// How often freed memory is handed back.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Applies the settings and starts the trimming thread. Call before the
/// runtime starts its threads (arenas are chosen per thread).
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called
        // before other threads allocate.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        }
        let trimmer = std::thread::Builder::new()
            .name("malloc-trim".into())
            .stack_size(64 * 1024)
            .spawn(|| {
                loop {
                    std::thread::sleep(TRIM_EVERY);
                    // SAFETY: malloc_trim takes the allocator's own locks
                    // and only releases free pages.
                    unsafe {
                        libc::malloc_trim(0);
                    }
                }
            });
        if let Err(e) = trimmer {
            tracing::warn!(error = %e, "could not start the malloc-trim thread");
        }
    }
}
