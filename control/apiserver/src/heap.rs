//! Giving memory back to the system after large responses.
//!
//! A LIST of thousands of objects (and more so its Table form) builds
//! hundreds of megabytes of short-lived values. glibc keeps freed heap
//! memory in its arenas for reuse, so after such a burst the server's RSS
//! stays at the burst's peak: with 10,000 pods stored, 650 MB resident of
//! which 400 MB was free heap (`malloc_trim` took it to 250 MB). After a
//! large list, a trim is requested; a thread of its own runs it once the
//! request's memory is freed (trimming walks every arena, so it stays off
//! the request path, and a burst of lists ends in one trim).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Lists at least this long request a trim.
pub const LARGE_LIST: usize = 500;

/// How long after the request a trim runs: the list's values and its
/// response buffer must have been freed by then (a Table of 10,000 pods
/// takes about half a second to build and send).
const DELAY: Duration = Duration::from_millis(1500);

/// When the requested trim is due (ms since the epoch; 0: none).
static DUE: AtomicU64 = AtomicU64::new(0);
static STARTED: std::sync::Once = std::sync::Once::new();

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Caps glibc's malloc arenas at four, before the runtime's threads start.
/// By default glibc gives busy threads arenas of their own (up to eight per
/// core); objects a request built on one worker and a watcher freed on
/// another then pin pages in many arenas, and the heap stays fragmented
/// long after a burst. Four arenas still spread the contention of the
/// runtime's workers and blocking threads.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes a malloc tunable; M_ARENA_MAX (-8)
        // takes a count.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 4);
        }
    }
}

/// Asks for free heap memory to be returned once the current request's
/// memory is freed (a later request moves the trim later).
pub fn trim_soon() {
    DUE.store(now_ms() + DELAY.as_millis() as u64, Ordering::Relaxed);
}

/// Starts the trimming thread (once per process).
pub fn start() {
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("skep-heap-trim".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(Duration::from_millis(250));
                    let due = DUE.load(Ordering::Relaxed);
                    if due != 0
                        && now_ms() >= due
                        && DUE
                            .compare_exchange(due, 0, Ordering::Relaxed, Ordering::Relaxed)
                            .is_ok()
                    {
                        trim();
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no heap trimming thread: memory freed after large lists stays resident");
        }
    });
}

fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free pages of glibc's arenas to
        // the kernel; 0 keeps no extra padding at the top of the heap.
        let released = unsafe { libc::malloc_trim(0) };
        tracing::debug!(released = released == 1, "heap trimmed");
    }
}
