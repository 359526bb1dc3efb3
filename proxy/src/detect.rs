//! The detect stage: tells what protocol a connection speaks from its first
//! bytes, between `accept` and `tls` (on the raw socket: TLS or not) and
//! again after `tls` (on the decrypted stream: HTTP or opaque).
//!
//! Detection only looks; it never consumes. On a socket it peeks; on a
//! decrypted stream it reads into a small buffer that [`Rewind`] replays.
//! It leans towards HTTP ([`classify`]): anything an HTTP server could
//! take for a request is served by hyper, which parses it or refuses it,
//! so no request reaches an app without the sidecar's header rules. A
//! client that sends nothing within the detect timeout is treated as
//! opaque, so server-speaks-first protocols (SMTP, MySQL) still work on
//! undeclared ports, after the timeout; declare such ports `opaque`. A
//! client that sent a first byte is never turned into an opaque tunnel by
//! the clock: a prefix still undecided at the timeout is HTTP ([`settle`]).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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

/// How much is examined at most. A prefix this long that still looks like
/// the start of an HTTP/1 request (a long request line) is HTTP: hyper
/// parses it or refuses it.
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
///
/// Detection is biased towards HTTP: whatever an HTTP server could take
/// for a request is HTTP, so that hyper parses it (or refuses it with 400)
/// and the sidecar's header rules apply; only bytes that cannot start a
/// request are opaque. The detector and the parser must never disagree in
/// the direction where the app would parse a request that the sidecar did
/// not (a forged `x-forwarded-client-cert` in it would reach the app).
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

/// The verdict once no more bytes will come in time (the detect timeout,
/// end of stream): a prefix still consistent with an HTTP/1 request is
/// HTTP (hyper's header timeout and parser take over); silence is opaque
/// (server-speaks-first protocols).
pub fn settle(buf: &[u8]) -> Protocol {
    match classify(buf) {
        Verdict::Known(p) => p,
        Verdict::NeedMore if buf.is_empty() || buf[0] == 0x16 => Protocol::Opaque,
        Verdict::NeedMore => Protocol::Http1,
    }
}

/// The verdict at the end of the stream: a prefix still undecided has no
/// line end, hence no header field any parser would read, so it is opaque.
pub fn settle_at_eof(buf: &[u8]) -> Protocol {
    match classify(buf) {
        Verdict::Known(p) => p,
        Verdict::NeedMore => Protocol::Opaque,
    }
}

/// Whether a byte may separate or precede the words of a request line for
/// some HTTP server: ASCII whitespace, and what lenient parsers split on
/// too (Python's `str.split` on Latin-1 text: VT, FF, the information
/// separators 0x1c-0x1f, NEL and NBSP).
fn is_space(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t' | b'\r' | b'\n' | 0x0b | 0x0c | 0x1c..=0x1f | 0x85 | 0xa0
    )
}

/// Bytes no text request line contains: the other control characters.
fn is_binary(b: u8) -> bool {
    matches!(b, 0x00..=0x08 | 0x0e..=0x1b | 0x7f)
}

/// RFC 9110 §5.6.2 `tchar`, any case.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// An HTTP/1 request line (RFC 9112 §3), read as leniently as any server
/// might: empty lines and whitespace before it are skipped (RFC 9112 §2.2
/// and beyond), the method is any token in any case, and a first line that
/// names `HTTP/` (any case, any version, any separators) is HTTP, even one
/// that hyper then refuses (`HTTP/1.2`, tabs); so is `GET` and a space (an
/// HTTP/0.9 request, after which some servers still read header fields).
/// A line that ends without naming `HTTP/`, a first byte that cannot start
/// a method, or a control byte that no request line holds is opaque.
fn classify_http1(buf: &[u8]) -> Verdict {
    let Some(start) = buf.iter().position(|b| !is_space(*b)) else {
        return need_more(buf);
    };
    if !is_tchar(buf[start]) {
        return Verdict::Known(Protocol::Opaque);
    }
    let line = &buf[start..];
    // HTTP/0.9's simple request, `GET target`: Python's `http.server`
    // still reads header fields after it.
    if line.len() > 3 && line[..3].eq_ignore_ascii_case(b"GET") && is_space(line[3]) {
        return Verdict::Known(Protocol::Http1);
    }
    for (i, b) in line.iter().enumerate() {
        match *b {
            b'\n' => return Verdict::Known(Protocol::Opaque),
            b'H' | b'h'
                if line[i..].len() >= 5 && line[i..i + 5].eq_ignore_ascii_case(b"HTTP/") =>
            {
                return Verdict::Known(Protocol::Http1);
            }
            b if is_binary(b) => return Verdict::Known(Protocol::Opaque),
            _ => {}
        }
    }
    need_more(buf)
}

/// A consistent prefix: more is needed, unless it reached the limit.
fn need_more(buf: &[u8]) -> Verdict {
    if buf.len() >= MAX_DETECT_BYTES {
        Verdict::Known(Protocol::Http1)
    } else {
        Verdict::NeedMore
    }
}

/// What peeking at a raw socket found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// The first bytes decided, or settled at the timeout ([`settle`]).
    Decided(Protocol),
    /// Not one byte arrived before the timeout: opaque (a server speaks
    /// first), and waiting again on the stream would only double the
    /// client's wait.
    TimedOut,
}

/// Detects the protocol of a raw socket without consuming anything.
/// Silence until `timeout` is [`Sniffed::TimedOut`]; a prefix that is
/// still undecided then is settled ([`settle`]: HTTP if it may be HTTP).
/// Both count as a detect timeout of `direction`.
pub async fn detect_socket(
    stream: &TcpStream,
    timeout: Duration,
    direction: Direction,
) -> io::Result<Sniffed> {
    // Most first segments decide within 64 bytes; a long request line gets
    // the whole detection window (allocated only then).
    let mut small = [0u8; 64];
    let mut large: Vec<u8> = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut backoff = Duration::from_millis(1);
    let mut seen = 0;
    loop {
        let grown = !large.is_empty();
        let buf: &mut [u8] = if grown { &mut large } else { &mut small };
        let n = match tokio::time::timeout_at(deadline, stream.peek(buf)).await {
            Err(_) => {
                crate::metrics::detect_timeout(direction);
                return Ok(match seen {
                    0 => Sniffed::TimedOut,
                    _ => Sniffed::Decided(settle(&buf[..seen])),
                });
            }
            Ok(r) => r?,
        };
        seen = n;
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
                    return Ok(Sniffed::Decided(settle(&buf[..n])));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            // A long request line: look at up to the detection limit.
            Verdict::NeedMore if !grown => large = vec![0; MAX_DETECT_BYTES],
            // Invariant: the limit always decides (`need_more`).
            Verdict::NeedMore => return Ok(Sniffed::Decided(settle(&buf[..n]))),
        }
    }
}

/// Detects the protocol of a stream by reading its first bytes, and returns
/// a stream that replays them. Silence until `timeout` is
/// [`Protocol::Opaque`]; an undecided prefix then is settled ([`settle`]),
/// at the end of the stream it is opaque ([`settle_at_eof`]). Timeouts
/// count as detect timeouts of `direction`.
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
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) => {
                crate::metrics::detect_timeout(direction);
                break settle(&buf);
            }
            // At the end of the stream no header can follow a first line
            // that has not ended: what is undecided is opaque.
            Ok(Ok(0)) => break settle_at_eof(&buf),
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

/// Tells HTTP/2 (its connection preface) from HTTP/1 on a stream that is
/// HTTP either way, and returns a stream that replays what was read. It
/// waits for the first byte as long as the caller lets it (an idle
/// connection opened ahead of use is served when its request comes);
/// after the first byte, `head_timeout` bounds the rest of the preface.
pub async fn http_version<S>(
    mut stream: S,
    head_timeout: Duration,
) -> io::Result<(Protocol, Rewind<S>)>
where
    S: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    let mut deadline = None;
    let protocol = loop {
        let n = buf.len().min(H2_PREFACE.len());
        if !buf.is_empty() && buf[..n] != H2_PREFACE[..n] {
            break Protocol::Http1;
        }
        if n == H2_PREFACE.len() {
            break Protocol::Http2;
        }
        let read = stream.read_buf(&mut buf);
        let got = match deadline {
            None => read.await,
            Some(d) => match tokio::time::timeout_at(d, read).await {
                Ok(r) => r,
                Err(_) => return Err(io::ErrorKind::TimedOut.into()),
            },
        };
        match got? {
            // hyper's HTTP/1 side reports a partial head at the end.
            0 => break Protocol::Http1,
            _ => {
                deadline.get_or_insert_with(|| tokio::time::Instant::now() + head_timeout);
            }
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

/// A silent client's stream on its way into an opaque splice, watched for
/// who speaks first. If the app does (a server-speaks-first protocol), the
/// splice goes on untouched. If the client does, and its first bytes may be
/// HTTP, reading fails ([`LateHttp`]) before a byte reaches the app, so the
/// splice ends and the caller serves the stream as HTTP from its handle
/// ([`LateWatchHandle::take_http`]): a client pool's connection opened ahead
/// of use then gets the sidecar's header rules like any other request,
/// where the detect timeout alone would have spliced it with the client's
/// headers intact.
pub struct LateWatch<S> {
    shared: Arc<Mutex<Late<S>>>,
}

/// The caller's side of a [`LateWatch`].
pub struct LateWatchHandle<S> {
    shared: Arc<Mutex<Late<S>>>,
}

struct Late<S> {
    stream: Option<S>,
    /// Who spoke first is known (pass-through from then on).
    decided: bool,
    /// The client's first bytes, kept when they may be HTTP.
    first: BytesMut,
    /// The client spoke first, and may speak HTTP.
    http: bool,
}

/// The client of a silent connection spoke first, in what may be HTTP.
#[derive(Debug, thiserror::Error)]
#[error("a silent client's first bytes may be HTTP")]
pub struct LateHttp;

impl<S> LateWatch<S> {
    /// Watches `stream`; the handle gets it back when the client spoke HTTP.
    pub fn new(stream: S) -> (Self, LateWatchHandle<S>) {
        let shared = Arc::new(Mutex::new(Late {
            stream: Some(stream),
            decided: false,
            first: BytesMut::new(),
            http: false,
        }));
        (
            LateWatch {
                shared: shared.clone(),
            },
            LateWatchHandle { shared },
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Late<S>> {
        // A poisoned lock only means a panic elsewhere; the state is intact.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<S> LateWatchHandle<S> {
    /// The stream, replaying the client's first bytes, when the client
    /// spoke first in what may be HTTP; `None` otherwise (or while the
    /// splice still holds the watch).
    pub fn take_http(self) -> Option<Rewind<S>> {
        let mut late = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if !late.http {
            return None;
        }
        let inner = late.stream.take()?;
        Some(Rewind {
            prefix: std::mem::take(&mut late.first),
            inner,
        })
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream taken back")
}

impl<S: AsyncRead + Unpin> AsyncRead for LateWatch<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut guard = self.lock();
        let late = &mut *guard;
        let Some(stream) = late.stream.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        if late.decided {
            return Pin::new(stream).poll_read(cx, out);
        }
        let mut chunk = [0u8; 1024];
        let mut rb = ReadBuf::new(&mut chunk);
        match Pin::new(stream).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                let got = rb.filled();
                late.decided = true;
                // The first segment decides: what cannot be HTTP is spliced
                // on; anything else (HTTP, or a prefix too short to tell)
                // is for hyper to judge.
                let opaque = got.is_empty()
                    || matches!(
                        classify(got),
                        Verdict::Known(Protocol::Opaque | Protocol::Tls)
                    );
                if opaque {
                    out.put_slice(got);
                    return Poll::Ready(Ok(()));
                }
                late.first.extend_from_slice(got);
                late.http = true;
                Poll::Ready(Err(io::Error::other(LateHttp)))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LateWatch<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut late = self.lock();
        // The app spoke first: a server-speaks-first protocol.
        late.decided = true;
        match late.stream.as_mut() {
            Some(s) => Pin::new(s).poll_write(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.lock().stream.as_mut() {
            Some(s) => Pin::new(s).poll_flush(cx),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut late = self.lock();
        // Never half-close a stream that is about to be served as HTTP.
        if late.http {
            return Poll::Ready(Ok(()));
        }
        match late.stream.as_mut() {
            Some(s) => Pin::new(s).poll_shutdown(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
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

    /// Whether nothing was read before (the client was silent).
    pub fn replays_nothing(&self) -> bool {
        self.prefix.is_empty()
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
            (b"GET /", Verdict::Known(Http1)),
            (b"POST /", Verdict::NeedMore),
            (b"GET / HTTP/1.1\r\nHost: x\r\n", Verdict::Known(Http1)),
            (b"POST /a HTTP/1.0\n", Verdict::Known(Http1)),
            // What hyper refuses is still HTTP: it answers 400.
            (b"GET / HTTP/2.0\r\n", Verdict::Known(Http1)),
            (b"GET / HTTP/1.2\r\n", Verdict::Known(Http1)),
            (b"get / HTTP/1.1\r\n", Verdict::Known(Http1)),
            (b"GET\t/\tHTTP/1.1\r\n", Verdict::Known(Http1)),
            (b"\r\nGET / HTTP/1.1\r\n", Verdict::Known(Http1)),
            (b"  GET / http/1.1", Verdict::Known(Http1)),
            (b"GET\xa0/\xa0HTTP/1.1", Verdict::Known(Http1)),
            (b"PRI * HTTP/2.0\r\n\r\nXX", Verdict::Known(Http1)),
            (b"\r\n", Verdict::NeedMore),
            (b"G", Verdict::NeedMore),
            (b"POST / HT", Verdict::NeedMore),
            (b"SSH-2.0-OpenSSH\r\n", Verdict::Known(Opaque)),
            (b"\x00\x00\x00\x08", Verdict::Known(Opaque)),
            (b"GET\x00 / HTTP/1.1", Verdict::Known(Opaque)),
            (b"EHLO mail\r\n", Verdict::Known(Opaque)),
            (b"get key\r\n", Verdict::Known(Http1)),
            (
                b"GET /x\r\nX-Forwarded-Client-Cert: f\r\n\r\n",
                Verdict::Known(Http1),
            ),
            (b"GETS key\r\n", Verdict::Known(Opaque)),
            (b"set k 0 0 1\r\n", Verdict::Known(Opaque)),
            (
                b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3\r\n",
                Verdict::Known(Opaque),
            ),
            (b"*1\r\n$4\r\nPING\r\n", Verdict::Known(Opaque)),
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

    #[test]
    fn long_lines_and_undecided_prefixes_settle_as_http() {
        let mut long = b"GET /".to_vec();
        long.resize(MAX_DETECT_BYTES, b'a');
        assert_eq!(classify(&long), Verdict::Known(Protocol::Http1));
        assert_eq!(settle(b""), Protocol::Opaque);
        assert_eq!(settle(b"\x16"), Protocol::Opaque);
        assert_eq!(settle(b"G"), Protocol::Http1);
        assert_eq!(settle(b"\r\n"), Protocol::Http1);
        assert_eq!(settle(b"SSH-2.0\r\n"), Protocol::Opaque);
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_byte_then_silence_is_http() {
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(b"G").await.unwrap();
        let (p, _) = detect_stream(b, Duration::from_secs(1), Direction::Inbound)
            .await
            .unwrap();
        assert_eq!(p, Protocol::Http1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_http_version_waits_for_a_late_first_byte() {
        let (mut a, b) = tokio::io::duplex(1024);
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(120)).await;
            a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            a
        });
        let (p, _) = http_version(b, Duration::from_secs(1)).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(H2_PREFACE).await.unwrap();
        let (p, _) = http_version(b, Duration::from_secs(1)).await.unwrap();
        assert_eq!(p, Protocol::Http2);
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(b"PR").await.unwrap();
        let e = http_version(b, Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        drop(late.await);
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
