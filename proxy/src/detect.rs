//! The detect stage: tells what protocol a connection speaks from its first
//! bytes, between `accept` and `tls` (on the raw socket: TLS or not) and
//! again after `tls` (on the decrypted stream: HTTP or opaque).
//!
//! Detection only looks; it never consumes. On a socket it peeks; on a
//! decrypted stream it reads into a small buffer that [`Rewind`] replays.
//! A client that sends nothing within the detect timeout is treated as
//! opaque, so server-speaks-first protocols (SMTP, MySQL) still work on
//! undeclared ports, after the timeout; declare such ports `opaque`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::Direction;

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// A TLS ClientHello.
    Tls,
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 connection preface.
    Http2,
    /// Anything else, including silence until the timeout.
    Opaque,
}

impl Protocol {
    /// Fixed label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tls => "tls",
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Opaque => "opaque",
        }
    }

    /// Whether hyper should serve it.
    pub fn is_http(self) -> bool {
        match self {
            Protocol::Http1 | Protocol::Http2 => true,
            Protocol::Tls | Protocol::Opaque => false,
        }
    }
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How much is examined at most: an HTTP/1 request line longer than this is
/// treated as opaque rather than buffered further.
pub const MAX_DETECT_BYTES: usize = 8 * 1024;

/// The verdict on a prefix of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Decided.
    Known(Protocol),
    /// The prefix is consistent with a protocol but too short to tell.
    NeedMore,
}

/// Classifies the first bytes of a stream.
pub fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    // TLS record: handshake (22), legacy version 3.x (RFC 8446 §5.1).
    if buf[0] == 0x16 {
        return match buf.get(1) {
            None => Verdict::NeedMore,
            Some(3) => Verdict::Known(Protocol::Tls),
            Some(_) => Verdict::Known(Protocol::Opaque),
        };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::Known(Protocol::Http2)
        } else {
            Verdict::NeedMore
        };
    }
    classify_http1(buf)
}

/// `method SP request-target SP HTTP/1.x CRLF` (RFC 9112 §3). The method is
/// a token; we accept upper-case letters and '-' only, which covers every
/// registered method and rejects most binary protocols at the first byte.
fn classify_http1(buf: &[u8]) -> Verdict {
    let method_len = buf
        .iter()
        .take_while(|b| b.is_ascii_uppercase() || **b == b'-')
        .count();
    if method_len == 0 || method_len > 20 {
        return Verdict::Known(Protocol::Opaque);
    }
    match buf.get(method_len) {
        None => return Verdict::NeedMore,
        Some(b' ') => {}
        Some(_) => return Verdict::Known(Protocol::Opaque),
    }
    let Some(eol) = buf.iter().position(|b| *b == b'\n') else {
        return if buf.len() >= MAX_DETECT_BYTES {
            Verdict::Known(Protocol::Opaque)
        } else {
            Verdict::NeedMore
        };
    };
    let line = buf[..eol].strip_suffix(b"\r").unwrap_or(&buf[..eol]);
    if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
        Verdict::Known(Protocol::Http1)
    } else {
        Verdict::Known(Protocol::Opaque)
    }
}

/// What peeking at a raw socket found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// The first bytes decided (an HTTP/1 request line longer than the
    /// peek, or any other prefix, is `Opaque` here and may be decided again
    /// on the stream).
    Decided(Protocol),
    /// Nothing decisive arrived before the timeout: opaque, and waiting
    /// again on the stream would only double the client's wait.
    TimedOut,
}

/// Detects the protocol of a raw socket without consuming anything.
/// Silence or an undecidable prefix until `timeout` is [`Sniffed::TimedOut`]
/// (counted as a detect timeout of `direction`).
pub async fn detect_socket(
    stream: &TcpStream,
    timeout: Duration,
    direction: Direction,
) -> io::Result<Sniffed> {
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + timeout;
    let mut backoff = Duration::from_millis(1);
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => {
                crate::metrics::detect_timeout(direction);
                return Ok(Sniffed::TimedOut);
            }
            Ok(r) => r?,
        };
        if n == 0 {
            // The client closed without sending anything.
            return Ok(Sniffed::Decided(Protocol::Opaque));
        }
        match classify(&buf[..n]) {
            Verdict::Known(p) => return Ok(Sniffed::Decided(p)),
            // `peek` returns at once while any byte is buffered, so a
            // partial first segment is re-examined after a short pause
            // rather than in a busy loop. Rare: clients send their first
            // message in one segment.
            Verdict::NeedMore if n < buf.len() => {
                if tokio::time::Instant::now() + backoff >= deadline {
                    crate::metrics::detect_timeout(direction);
                    return Ok(Sniffed::TimedOut);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            // 64 bytes decide TLS and HTTP/2; an HTTP/1 line this long
            // without its end is decided on the decrypted path only.
            Verdict::NeedMore => return Ok(Sniffed::Decided(Protocol::Opaque)),
        }
    }
}

/// Detects the protocol of a stream by reading its first bytes, and returns
/// a stream that replays them. Silence until `timeout` means
/// [`Protocol::Opaque`] (counted as a detect timeout of `direction`).
pub async fn detect_stream<S>(
    mut stream: S,
    timeout: Duration,
    direction: Direction,
) -> io::Result<(Protocol, Rewind<S>)>
where
    S: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    let protocol = loop {
        match classify(&buf) {
            Verdict::Known(p) => break p,
            Verdict::NeedMore => {}
        }
        if buf.len() >= MAX_DETECT_BYTES {
            break Protocol::Opaque;
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) => {
                crate::metrics::detect_timeout(direction);
                break Protocol::Opaque;
            }
            Ok(Ok(0)) => break Protocol::Opaque,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    };
    Ok((
        protocol,
        Rewind {
            prefix: buf,
            inner: stream,
        },
    ))
}

/// A stream that first yields bytes already read from it.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Rewind<S> {
    /// A stream with nothing to replay.
    pub fn new(inner: S) -> Self {
        Rewind {
            prefix: BytesMut::new(),
            inner,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
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
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_prefixes() {
        use Protocol::*;
        let cases: &[(&[u8], Verdict)] = &[
            (b"", Verdict::NeedMore),
            (b"\x16", Verdict::NeedMore),
            (b"\x16\x03\x01\x02\x00", Verdict::Known(Tls)),
            (b"\x16\x02", Verdict::Known(Opaque)),
            (b"PRI * HTTP/2.0\r\n", Verdict::NeedMore),
            (H2_PREFACE, Verdict::Known(Http2)),
            (b"GE", Verdict::NeedMore),
            (b"GET /", Verdict::NeedMore),
            (b"GET / HTTP/1.1\r\nHost: x\r\n", Verdict::Known(Http1)),
            (b"POST /a HTTP/1.0\n", Verdict::Known(Http1)),
            (b"GET / HTTP/2.0\r\n", Verdict::Known(Opaque)),
            (b"get / HTTP/1.1\r\n", Verdict::Known(Opaque)),
            (b"SSH-2.0-OpenSSH\r\n", Verdict::Known(Opaque)),
            (b"\x00\x00\x00\x08", Verdict::Known(Opaque)),
            (b"EHLO mail\r\n", Verdict::Known(Opaque)),
        ];
        for (input, want) in cases {
            assert_eq!(
                classify(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[tokio::test]
    async fn stream_detection_replays_what_it_read() {
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (p, mut r) = detect_stream(b, Duration::from_secs(1), Direction::Inbound)
            .await
            .unwrap();
        assert_eq!(p, Protocol::Http1);
        let mut got = vec![0u8; 27];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn silence_is_opaque_after_the_timeout() {
        let (_a, b) = tokio::io::duplex(1024);
        let (p, _) = detect_stream(b, Duration::from_secs(1), Direction::Inbound)
            .await
            .unwrap();
        assert_eq!(p, Protocol::Opaque);
    }

    #[tokio::test]
    async fn split_request_line_is_http() {
        let (mut a, b) = tokio::io::duplex(1024);
        let t = tokio::spawn(async move {
            a.write_all(b"GET /lo").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            a.write_all(b"ng HTTP/1.1\r\n").await.unwrap();
            a
        });
        let (p, _) = detect_stream(b, Duration::from_secs(1), Direction::Inbound)
            .await
            .unwrap();
        assert_eq!(p, Protocol::Http1);
        drop(t.await);
    }
}
