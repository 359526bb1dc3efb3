//! Request-smuggling guard for HTTP/1 connections, between `detect` and the
//! hyper server in `http` and `pool`.
//!
//! A request with both `Content-Length` and `Transfer-Encoding` is refused
//! with 400 and nothing of it is forwarded. hyper alone would accept it the
//! way RFC 9112 §6.3 allows (chunked wins, the connection closes after), but
//! "a server MAY reject a request that contains both" (ibid.) is what an
//! edge should do: the client and an upstream may disagree on framing.
//!
//! The guard follows the request framing on the bytes hyper reads: it holds
//! each request head (bounded by the head size limit) until it is complete,
//! and when both fields are present it blanks the `Transfer-Encoding` value,
//! which hyper answers with 400 and a close. Bodies pass through as they
//! arrive; nothing is buffered beyond one head.
//!
//! Since it sees where each head starts and ends, the guard also keeps the
//! header read timeout ([`SmugglingGuard::with_head_timeout`]): from the
//! first byte of a head (an empty line before a request counts) to its
//! blank line. hyper's own timer cannot do this: it runs from the moment
//! the connection waits for a request, so it would close idle keep-alive
//! connections too (their idle time is `http_idle_timeout`, kept by the
//! server, not here).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::future::Future;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Where the guard is in the request stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a request head.
    Head,
    /// In a Content-Length body: bytes left.
    Body(u64),
    /// In a chunk-size line.
    ChunkSize,
    /// In chunk data: bytes left.
    ChunkData(u64),
    /// The CRLF that closes a chunk's data.
    ChunkCrlf,
    /// In the trailer section after the last chunk.
    Trailers,
    /// Framing unknown or the connection is ending: hyper decides.
    PassThrough,
}

/// Wraps an HTTP/1 server-side stream.
#[derive(Debug)]
pub struct SmugglingGuard<S> {
    inner: S,
    state: State,
    /// Bytes of the current head (or chunk or trailer line), not yet released.
    pending: Vec<u8>,
    /// Released bytes not yet handed to hyper.
    out: BytesMut,
    max_head: usize,
    /// Whether a head has started and not yet ended.
    in_head: bool,
    /// The header read timeout, when kept.
    head_timeout: Option<Duration>,
    /// The running head deadline (made on the first head, then reset).
    head_deadline: Option<Pin<Box<Sleep>>>,
    /// Whether `head_deadline` is armed for the current head.
    head_armed: bool,
}

/// A request head took longer than the header read timeout.
#[derive(Debug, thiserror::Error)]
#[error("request head not complete within {0:?}")]
pub struct HeadTimeout(pub Duration);

impl<S> SmugglingGuard<S> {
    /// Guards `inner`; heads longer than `max_head` are released unexamined
    /// (hyper answers 431 for them).
    pub fn new(inner: S, max_head: usize) -> Self {
        SmugglingGuard {
            inner,
            state: State::Head,
            pending: Vec::new(),
            out: BytesMut::new(),
            max_head,
            in_head: false,
            head_timeout: None,
            head_deadline: None,
            head_armed: false,
        }
    }

    /// Closes the connection (an `io::ErrorKind::TimedOut` read error)
    /// when a request head is not complete `timeout` after its first byte.
    pub fn with_head_timeout(mut self, timeout: Duration) -> Self {
        self.head_timeout = Some(timeout);
        self
    }

    /// Arms the head deadline when a head has started, disarms it when it
    /// ended; true when it has expired.
    fn head_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(timeout) = self.head_timeout else {
            return false;
        };
        if !self.in_head {
            self.head_armed = false;
            return false;
        }
        if !self.head_armed {
            self.head_armed = true;
            let at = Instant::now() + timeout;
            match &mut self.head_deadline {
                Some(d) => d.as_mut().reset(at),
                None => self.head_deadline = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        self.head_deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
    }

    fn process(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::PassThrough => {
                    self.in_head = false;
                    self.out.extend_from_slice(data);
                    return;
                }
                State::Head => {
                    self.in_head = true;
                    // Empty lines before a request line are ignored (RFC 9112 §2.2).
                    if self.pending.is_empty() {
                        let skip = data
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        self.out.extend_from_slice(&data[..skip]);
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    let from = self.pending.len().saturating_sub(3);
                    self.pending.extend_from_slice(data);
                    data = &[];
                    let Some(end) = find(&self.pending[from..], b"\r\n\r\n").map(|i| from + i + 4)
                    else {
                        if self.pending.len() > self.max_head {
                            self.in_head = false;
                            self.state = State::PassThrough;
                            self.out.extend_from_slice(&self.pending);
                            self.pending.clear();
                        }
                        return;
                    };
                    let rest = self.pending.split_off(end);
                    let mut head = std::mem::take(&mut self.pending);
                    self.in_head = false;
                    self.state = framing(&mut head);
                    self.out.extend_from_slice(&head);
                    // `rest` is at most one read's worth; process it in turn.
                    self.process(&rest);
                }
                State::Body(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    self.out.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Body(left)
                    };
                }
                State::ChunkData(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    self.out.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::ChunkCrlf
                    } else {
                        State::ChunkData(left)
                    };
                }
                State::ChunkCrlf | State::ChunkSize | State::Trailers => {
                    let Some(nl) = data.iter().position(|b| *b == b'\n') else {
                        self.pending.extend_from_slice(data);
                        self.out.extend_from_slice(data);
                        if self.pending.len() > 4096 {
                            self.state = State::PassThrough;
                            self.pending.clear();
                        }
                        return;
                    };
                    self.pending.extend_from_slice(&data[..nl]);
                    self.out.extend_from_slice(&data[..=nl]);
                    data = &data[nl + 1..];
                    let line = std::mem::take(&mut self.pending);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    self.state = match self.state {
                        State::ChunkCrlf => State::ChunkSize,
                        State::ChunkSize => match chunk_size(line) {
                            Some(0) => State::Trailers,
                            Some(n) => State::ChunkData(n),
                            None => State::PassThrough,
                        },
                        State::Trailers if line.is_empty() => State::Head,
                        State::Trailers => State::Trailers,
                        State::Head | State::Body(_) | State::ChunkData(_) | State::PassThrough => {
                            // Invariant: this arm only runs in the line states.
                            State::PassThrough
                        }
                    };
                }
            }
        }
    }
}

/// Decides the framing of the body after `head`, blanking the
/// Transfer-Encoding value when Content-Length is present too.
///
/// A request that may switch protocols (`Upgrade`, `CONNECT`) ends the
/// watch: what follows may be a tunnel's bytes. The sidecar answers such a
/// request with `Connection: close` unless it switched (`http`, `pool`), so
/// no request follows on the unwatched stream.
fn framing(head: &mut [u8]) -> State {
    let mut content_length: Option<Option<u64>> = None;
    let mut te_values = Vec::new();
    let mut chunked = false;
    let mut may_switch = head.starts_with(b"CONNECT ");
    let mut pos = 0;
    for line in head.split(|b| *b == b'\n') {
        let start = pos;
        pos += line.len() + 1;
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = &line[..colon];
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            content_length = Some(std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()));
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            // `h2c` is never switched to (`tunnel`): keep watching.
            may_switch |= !value.eq_ignore_ascii_case(b"h2c");
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let end = start + line.len() - usize::from(line.ends_with(b"\r"));
            te_values.push(start + colon + 1..end);
            chunked = value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    match (content_length, te_values.is_empty()) {
        (Some(_), false) => {
            for r in te_values {
                head[r].fill(b' ');
            }
            State::PassThrough
        }
        _ if may_switch => State::PassThrough,
        (None, false) if chunked => State::ChunkSize,
        (None, false) => State::PassThrough,
        (Some(Some(0)), true) | (None, true) => State::Head,
        (Some(Some(n)), true) => State::Body(n),
        (Some(None), true) => State::PassThrough,
    }
}

/// A chunk-size line's size: hex digits only (`from_str_radix` alone would
/// take a sign), then optional whitespace and extensions.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let hex = line.split(|b| *b == b';').next()?.trim_ascii_end();
    if hex.is_empty() || hex.len() > 16 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl<S: AsyncRead + Unpin> AsyncRead for SmugglingGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            match this.state {
                State::PassThrough if this.pending.is_empty() => {
                    return Pin::new(&mut this.inner).poll_read(cx, buf);
                }
                // Body bytes go straight to hyper, without a copy.
                State::Body(left) | State::ChunkData(left) if buf.remaining() > 0 => {
                    let limit = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(buf.remaining());
                    let mut direct = ReadBuf::new(buf.initialize_unfilled_to(limit));
                    match Pin::new(&mut this.inner).poll_read(cx, &mut direct) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(())) => {
                            let n = direct.filled().len();
                            buf.advance(n);
                            let left = left - n as u64;
                            this.state = match (this.state, left) {
                                (_, 0) if n == 0 => this.state,
                                (State::Body(_), 0) => State::Head,
                                (State::Body(_), l) => State::Body(l),
                                (_, 0) => State::ChunkCrlf,
                                (_, l) => State::ChunkData(l),
                            };
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
                _ => {}
            }
            // Not zeroed: 8 KiB cleared on every read of a head (and every
            // poll of an idle keep-alive connection) was a large share of
            // a request's cost; the read only hands back what it filled.
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 8192];
            let mut rb = ReadBuf::uninit(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending if this.head_expired(cx) => {
                    let timeout = this.head_timeout.unwrap_or_default();
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        HeadTimeout(timeout),
                    )));
                }
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    // EOF: hand over a partial head for hyper to judge.
                    if this.state == State::Head && !this.pending.is_empty() {
                        let pending = std::mem::take(&mut this.pending);
                        this.out.extend_from_slice(&pending);
                        continue;
                    }
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => this.process(rb.filled()),
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SmugglingGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns what hyper would read.
    fn run(input: &[u8], step: usize) -> Vec<u8> {
        let mut g = SmugglingGuard::new((), 64 * 1024);
        for piece in input.chunks(step) {
            g.process(piece);
        }
        g.out.to_vec()
    }

    #[test]
    fn conflicting_framing_blanks_transfer_encoding_in_every_head() {
        let keepalive = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        let chunked_post =
            b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n";
        let cl_post = b"POST /c HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        let evil = b"POST /d HTTP/1.1\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX";
        let mut input = Vec::new();
        for part in [&keepalive[..], chunked_post, cl_post, evil] {
            input.extend_from_slice(part);
        }
        for step in [1, 2, 7, 4096] {
            let out = run(&input, step);
            assert_eq!(out.len(), input.len(), "step {step}");
            let text = String::from_utf8_lossy(&out);
            // The benign requests are untouched, the evil one is blanked.
            assert!(
                text.contains("Transfer-Encoding: chunked\r\n\r\n3\r\nabc"),
                "{text}"
            );
            assert!(
                text.contains("Transfer-Encoding:        \r\n\r\n0"),
                "{text}"
            );
        }
    }

    #[test]
    fn tunnel_bytes_after_an_upgrade_or_connect_head_pass_untouched() {
        // Frames that never contain a blank line must not be held as a head.
        let frames = [0x81u8, 0x85, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        for head in [
            &b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"[..],
            b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n",
        ] {
            let mut input = head.to_vec();
            input.extend_from_slice(&frames);
            for step in [1, 3, 4096] {
                assert_eq!(run(&input, step), input, "step {step}");
            }
        }
        // Conflicting framing is still refused on a tunnel request.
        let evil = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(
            String::from_utf8_lossy(&run(evil, 4096)).contains("Transfer-Encoding:        \r\n")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_must_end_within_the_timeout_of_its_first_byte_but_idle_time_is_free() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let timeout = Duration::from_secs(2);
        let (mut client, server) = tokio::io::duplex(4096);
        let mut g = SmugglingGuard::new(server, 64 * 1024).with_head_timeout(timeout);
        let mut buf = [0u8; 256];
        // Idle before the first request: not the guard's business.
        let idle = tokio::time::timeout(Duration::from_secs(60), g.read(&mut buf)).await;
        assert!(idle.is_err(), "an idle connection was cut off");
        // A head that takes 1.5 s to arrive is let through whole.
        client.write_all(b"GET /a HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        client.write_all(b"Host: x\r\n\r\n").await.unwrap();
        let n = g.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        // Idle again between requests: free.
        let idle = tokio::time::timeout(Duration::from_secs(60), g.read(&mut buf)).await;
        assert!(idle.is_err(), "an idle keep-alive connection was cut off");
        // A head that never ends is cut off `timeout` after its first byte.
        client.write_all(b"GET /b HTTP/1.1\r\nX: ").await.unwrap();
        let start = Instant::now();
        let e = g.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), timeout);
    }

    #[test]
    fn body_bytes_that_look_like_heads_are_not_examined() {
        let body = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut input =
            format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        input.extend_from_slice(body);
        assert_eq!(run(&input, 5), input);
    }
}
