//! Body wrappers of the HTTP stage: request bodies that report progress and
//! their end (the response timeout starts at the end; a stalled upload is
//! cut off), and response bodies that keep an HTTP/2 connection's stream
//! count (its idle timeout runs only at zero).
//!
//! Both delegate every frame untouched. The one buffer is
//! [`read_for_policies`]: when a Rego policy asks for the body
//! (`with_request_body`), at most `max_request_bytes` of it is read before
//! the decision, and [`RequestBody`] sends those bytes on first.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use rampart_authz::model::WithRequestBody;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A request body on its way upstream, with any identity header removed
/// from its trailers. When it has no end yet (an upload),
/// it reports its progress and its end, so that the response timeout can
/// start at the end, as Envoy's route timeout does (a slow upload to a
/// healthy app is not a 504), while an upload that stops moving is still
/// cut off. Bodyless requests (the common case) carry nothing and allocate
/// nothing.
#[derive(Debug)]
pub struct RequestBody {
    /// What was read for the policies, sent before `inner`.
    ahead: Option<ReadAhead>,
    /// `None`: no body at all (a request rebuilt for a retry).
    inner: Option<Incoming>,
    progress: Option<Arc<Progress>>,
}

/// The start of a request body (or all of it, with its trailers) read for
/// the policies before the decision; it rides in the request's extensions
/// to `forward`, which sends it first, unchanged.
#[derive(Debug, Clone)]
pub struct ReadAhead {
    data: Bytes,
    trailers: Option<http::HeaderMap>,
}

impl ReadAhead {
    /// The bytes read.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

/// Why the body could not be read for the policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// Longer than `max_request_bytes` without `allow_partial_message`
    /// (Envoy's 413).
    TooLarge,
    /// No frame for the timeout.
    Stalled,
    /// The client's framing broke.
    Malformed,
}

/// Reads the body for the policies, as Envoy's ext_authz buffers it: until
/// its end or, with `allow_partial_message`, until `max_request_bytes` are
/// in; a longer body without it is [`ReadError::TooLarge`] (a declared
/// `content-length` over the limit is refused before any byte is read).
/// At most one frame past the limit is ever held. `timeout` bounds the wait
/// for each frame.
pub async fn read_for_policies(
    body: &mut Incoming,
    content_length: Option<u64>,
    spec: WithRequestBody,
    timeout: Duration,
) -> Result<ReadAhead, ReadError> {
    let max = usize::try_from(spec.max_request_bytes).unwrap_or(usize::MAX);
    if !spec.allow_partial_message && content_length.is_some_and(|n| n > max as u64) {
        return Err(ReadError::TooLarge);
    }
    let mut data = BytesMut::new();
    let mut trailers = None;
    while !spec.allow_partial_message || data.len() < max {
        let frame = match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => return Err(ReadError::Stalled),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(ReadError::Malformed),
            Ok(Some(Ok(f))) => f,
        };
        match frame.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(f) => {
                trailers = f.into_trailers().ok();
                break;
            }
        }
        if !spec.allow_partial_message && data.len() > max {
            return Err(ReadError::TooLarge);
        }
        if body.is_end_stream() {
            break;
        }
    }
    Ok(ReadAhead {
        data: data.freeze(),
        trailers,
    })
}

/// How far a request body got: the time of its last frame, and its end.
#[derive(Debug)]
pub struct Progress {
    ended: Notify,
    epoch: Instant,
    /// Milliseconds after `epoch` of the last frame read.
    last_ms: AtomicU64,
    /// Whether the client's body failed (its framing broke).
    failed: AtomicBool,
}

impl Progress {
    /// Whether the client's side of the body failed: an exchange that broke
    /// then is the client's fault (400), not the far end's (502).
    pub fn client_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Acquire))
    }
}

impl RequestBody {
    /// Wraps `inner`; the progress is `Some` when the body is still to come.
    pub fn new(inner: Incoming) -> (Self, Option<Arc<Progress>>) {
        let progress = (!inner.is_end_stream()).then(|| {
            Arc::new(Progress {
                ended: Notify::new(),
                epoch: Instant::now(),
                last_ms: AtomicU64::new(0),
                failed: AtomicBool::new(false),
            })
        });
        let watch = progress.clone();
        (
            RequestBody {
                ahead: None,
                inner: Some(inner),
                progress,
            },
            watch,
        )
    }

    /// The same body, with what was read for the policies sent first.
    pub fn after(mut self, ahead: Option<ReadAhead>) -> Self {
        self.ahead = ahead;
        self
    }

    /// No body (a bodyless request rebuilt to be sent again).
    pub fn empty() -> Self {
        RequestBody {
            ahead: None,
            inner: None,
            progress: None,
        }
    }

    fn finish(&mut self) {
        if let Some(p) = self.progress.take() {
            // notify_one keeps a permit when nobody waits yet.
            p.ended.notify_one();
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(ahead) = &mut self.ahead {
            if !ahead.data.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut ahead.data)))));
            }
            let trailers = ahead.trailers.take();
            self.ahead = None;
            if let Some(t) = trailers {
                // Identity headers in trailers go, as below.
                let mut frame = Frame::trailers(t);
                if let Some(t) = frame.trailers_mut() {
                    super::headers::remove_identity_headers(t, false);
                }
                return Poll::Ready(Some(Ok(frame)));
            }
        }
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let mut polled = Pin::new(inner).poll_frame(cx);
        match &mut polled {
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = &self.progress {
                    p.failed.store(true, Ordering::Release);
                }
                self.finish();
            }
            Poll::Ready(Some(Ok(frame))) => {
                // Trailers (HTTP/1.1 chunked, HTTP/2) never carry an
                // identity header on to the app: the sidecar sets none
                // there, so any is forged.
                if let Some(t) = frame.trailers_mut() {
                    super::headers::remove_identity_headers(t, false);
                }
                if self.is_end_stream() {
                    self.finish();
                } else if let Some(p) = &self.progress {
                    let ms = u64::try_from(p.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                    p.last_ms.store(ms, Ordering::Release);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_none() && self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = match &self.inner {
            Some(b) => b.size_hint(),
            None => SizeHint::with_exact(0),
        };
        if let Some(a) = &self.ahead {
            let n = a.data.len() as u64;
            let lower = hint.lower() + n;
            // The upper bound first: a lower bound above it panics.
            if let Some(u) = hint.upper() {
                hint.set_upper(u + n);
            }
            hint.set_lower(lower);
        }
        hint
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        // Dropped unfinished (the app answered early, or the exchange
        // broke): whatever waits for the end must not wait forever.
        self.finish();
    }
}

/// Why no response came in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Waited {
    /// The request body moved no byte for the timeout (408).
    #[error("request body stalled")]
    UploadStalled,
    /// No response head within the timeout after the request ended (504).
    #[error("no response in time")]
    NoResponse,
}

/// Waits for the response future `sent`. While the request body is still
/// being sent, the deadline is `timeout` after its last frame (a stalled
/// upload is [`Waited::UploadStalled`]); once it has ended, `timeout` after
/// the end. A response that comes before the body ends (an early 413, a
/// gRPC stream) is taken at once.
pub async fn response_within<F: std::future::Future>(
    timeout: Duration,
    progress: Option<Arc<Progress>>,
    sent: F,
) -> Result<F::Output, Waited> {
    tokio::pin!(sent);
    if let Some(p) = progress {
        let ended = p.ended.notified();
        tokio::pin!(ended);
        loop {
            let stalled_at = p.last() + timeout;
            tokio::select! {
                r = &mut sent => return Ok(r),
                _ = &mut ended => break,
                _ = tokio::time::sleep_until(stalled_at) => {
                    if p.last() + timeout <= Instant::now() {
                        return Err(Waited::UploadStalled);
                    }
                }
            }
        }
    }
    tokio::time::timeout(timeout, sent)
        .await
        .map_err(|_| Waited::NoResponse)
}

/// Open streams of one HTTP/2 connection and since when it has none.
#[derive(Debug)]
pub struct StreamCount {
    active: AtomicUsize,
    /// Milliseconds after `epoch` when `active` last dropped to zero.
    idle_since_ms: AtomicU64,
    epoch: Instant,
    timeout: Duration,
}

impl StreamCount {
    /// A connection that has just opened (idle from now).
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(StreamCount {
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            timeout,
        })
    }

    /// Counts a stream until the guard is dropped (with its response body).
    pub fn open(self: &Arc<Self>) -> StreamGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }

    /// Resolves once the connection has had no open stream for the timeout.
    pub async fn idle_expired(&self) {
        let mut check = Instant::now() + self.timeout;
        loop {
            tokio::time::sleep_until(check).await;
            if self.active.load(Ordering::Acquire) != 0 {
                // Busy: it can be idle for a whole timeout no sooner than that.
                check = Instant::now() + self.timeout;
                continue;
            }
            let since =
                self.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
            let due = since + self.timeout;
            if due <= Instant::now() {
                return;
            }
            check = due;
        }
    }
}

/// One open stream of a [`StreamCount`].
#[derive(Debug)]
pub struct StreamGuard(Arc<StreamCount>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let c = &self.0;
        if c.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            let ms = u64::try_from(c.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            c.idle_since_ms.store(ms, Ordering::Release);
        }
    }
}

/// A response body that holds its stream's [`StreamGuard`] (if any) until
/// hyper is done with it.
#[derive(Debug)]
pub struct Counted<B> {
    inner: B,
    _stream: Option<StreamGuard>,
}

impl<B> Counted<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, stream: Option<StreamGuard>) -> Self {
        Counted {
            inner,
            _stream: stream,
        }
    }
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_expiry_waits_for_streams_to_close() {
        let count = StreamCount::new(Duration::from_secs(10));
        let start = Instant::now();
        let guard = count.open();
        let expiry = tokio::spawn({
            let c = count.clone();
            async move { c.idle_expired().await }
        });
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(!expiry.is_finished(), "expired with a stream open");
        drop(guard);
        expiry.await.unwrap();
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(35) && waited < Duration::from_secs(36),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_connection_expires_after_the_timeout() {
        let count = StreamCount::new(Duration::from_secs(3));
        let start = Instant::now();
        count.idle_expired().await;
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    fn progress() -> Arc<Progress> {
        Arc::new(Progress {
            ended: Notify::new(),
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_response_timeout_starts_when_the_body_ends() {
        // A body that moves every 3 s for 30 s, with a 5 s timeout.
        let p = progress();
        let start = Instant::now();
        let body = p.clone();
        tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                let ms = u64::try_from(body.epoch.elapsed().as_millis()).unwrap();
                body.last_ms.store(ms, Ordering::Release);
            }
            body.ended.notify_one();
        });
        let never = std::future::pending::<()>();
        let r = response_within(Duration::from_secs(5), Some(p), never).await;
        assert_eq!(r, Err(Waited::NoResponse));
        assert_eq!(start.elapsed(), Duration::from_secs(35));
        let r = response_within(Duration::from_secs(5), None, async { 7 }).await;
        assert_eq!(r, Ok(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_upload_is_cut_off() {
        let p = progress();
        let start = Instant::now();
        let body = p.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            let ms = u64::try_from(body.epoch.elapsed().as_millis()).unwrap();
            body.last_ms.store(ms, Ordering::Release);
            // Then nothing, never the end.
        });
        let never = std::future::pending::<()>();
        let r = response_within(Duration::from_secs(5), Some(p), never).await;
        assert_eq!(r, Err(Waited::UploadStalled));
        assert_eq!(start.elapsed(), Duration::from_secs(9));
    }

    #[tokio::test(start_paused = true)]
    async fn an_early_response_is_taken_before_the_body_ends() {
        let r = response_within(Duration::from_secs(5), Some(progress()), async { 1 }).await;
        assert_eq!(r, Ok(1));
    }
}
