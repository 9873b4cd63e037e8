//! Giving memory back to the system after large responses.
//!
//! A LIST of thousands of objects (and more so its Table form) builds
//! hundreds of megabytes of short-lived values. glibc keeps freed heap
//! memory in its arenas for reuse, so after such a burst the server's RSS
//! stays at the burst's peak: with 10,000 pods stored, 650 MB resident of
//! which 400 MB was free heap (`malloc_trim` took it to 250 MB). The
//! response to a large list carries a guard ([`TrimWhenDropped`]) that
//! requests a trim when the response is dropped, once it was sent and what
//! was built for it is freed; a thread of its own runs the trim shortly
//! after (trimming walks every arena, so it stays off the request path,
//! and a burst of lists ends in one trim). A trim requested when the list
//! is read would run while a slow response (a Table of 10,000 pods takes
//! seconds on a busy machine) still holds its memory, with none after it.

use std::{
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hyper::body::{Body, Frame, SizeHint};

/// Lists at least this long request a trim.
pub const LARGE_LIST: usize = 500;

/// How long after a large response was dropped its trim runs: lists in a
/// burst (a client paging, several clients at once) end in one trim.
const DELAY: Duration = Duration::from_millis(500);

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

/// Asks for free heap memory to be returned shortly (a later request
/// moves the trim later).
fn trim_soon() {
    DUE.store(now_ms() + DELAY.as_millis() as u64, Ordering::Relaxed);
}

/// A response body that requests a trim when it is dropped: after its last
/// frame was written, or when the client went away.
#[derive(Debug)]
pub struct TrimWhenDropped<B> {
    inner: B,
}

impl<B> TrimWhenDropped<B> {
    pub fn new(inner: B) -> Self {
        Self { inner }
    }
}

impl<B> Drop for TrimWhenDropped<B> {
    fn drop(&mut self) {
        trim_soon();
    }
}

impl<B: Body + Unpin> Body for TrimWhenDropped<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    // Passed on: it gives the response its Content-Length.
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn a_large_response_asks_for_a_trim_only_once_it_is_dropped() {
        DUE.store(0, Ordering::Relaxed);
        let body = TrimWhenDropped::new(Full::new(Bytes::from_static(b"0123456789")));
        // The length goes on (the response's Content-Length).
        assert_eq!(body.size_hint().exact(), Some(10));
        let mut body = body;
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(
            frame.into_data().unwrap(),
            Bytes::from_static(b"0123456789")
        );
        assert!(body.frame().await.is_none());
        assert_eq!(
            DUE.load(Ordering::Relaxed),
            0,
            "a trim was asked for while the response was still alive"
        );
        let before = now_ms();
        drop(body);
        let due = DUE.load(Ordering::Relaxed);
        assert!(
            due >= before + DELAY.as_millis() as u64,
            "dropping the response asked for no trim (due: {due})"
        );
    }
}
