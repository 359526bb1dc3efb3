//! The apps behind the topologies, in the harness process: an echo app
//! (`tcp-rtt`), a threaded HTTP/1.1 app (the keep-alive and new-connection
//! workloads) and an HTTP/2 app on hyper that answers `GET /bench` over
//! HTTP/1.1 or h2c and one unary gRPC method (the h2 and gRPC workloads).

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The gRPC method the gRPC workload calls: unary, `google.protobuf.BytesValue`
/// in and out (the app echoes the value).
pub const GRPC_PATH: &str = "/rampart.bench.Bench/Echo";

/// A threaded echo app.
pub struct EchoApp {
    /// Its address.
    pub addr: SocketAddr,
}

impl EchoApp {
    /// Starts it on an ephemeral loopback port.
    pub fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = s.set_nodelay(true);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s.shutdown(Shutdown::Write);
                });
            }
        });
        EchoApp { addr }
    }
}

/// A threaded HTTP/1.1 app: answers every request head with `200 ok`,
/// keeping the connection alive. Request bodies are not read (GET only).
pub struct HttpApp {
    /// Its address (the first listener's).
    pub addr: SocketAddr,
    /// Requests answered so far.
    pub served: Arc<AtomicU64>,
}

impl HttpApp {
    /// Starts it on an ephemeral loopback port.
    pub fn start() -> Self {
        Self::serve(vec![TcpListener::bind("127.0.0.1:0").expect("bind")])
    }

    /// Serves on listeners made elsewhere (inside a network namespace: a
    /// socket stays in the namespace it was created in).
    pub fn serve(listeners: Vec<TcpListener>) -> Self {
        let addr = listeners[0].local_addr().expect("addr");
        let served = Arc::new(AtomicU64::new(0));
        for l in listeners {
            let count = served.clone();
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let Ok(s) = s else { continue };
                    let count = count.clone();
                    std::thread::spawn(move || serve_http1(s, &count));
                }
            });
        }
        HttpApp { addr, served }
    }
}

fn serve_http1(mut s: std::net::TcpStream, count: &AtomicU64) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = find_head_end(&buf) {
            buf.drain(..end);
            count.fetch_add(1, Ordering::Relaxed);
            let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if s.write_all(resp).is_err() {
                return;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The length of the first complete HTTP head in `buf`, if any.
pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// An HTTP/2 app (hyper, one runtime thread): `GET /bench` answers `200 ok`
/// over HTTP/1.1 or h2c (prior knowledge), and [`GRPC_PATH`] answers a
/// unary gRPC call by echoing its message, with `grpc-status: 0` in the
/// trailers. Anything else is 404.
pub struct H2App {
    /// Its address.
    pub addr: SocketAddr,
    /// Requests and calls answered so far.
    pub served: Arc<AtomicU64>,
}

impl H2App {
    /// Starts it on an ephemeral loopback port.
    pub fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        l.set_nonblocking(true).expect("nonblocking listener");
        let served = Arc::new(AtomicU64::new(0));
        let count = served.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the app's runtime");
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
                let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                loop {
                    let Ok((s, _)) = l.accept().await else {
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    let (server, count) = (server.clone(), count.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let count = count.clone();
                            async move { Ok::<_, Infallible>(answer(req, &count).await) }
                        });
                        let _ = server.serve_connection(TokioIo::new(s), service).await;
                    });
                }
            });
        });
        H2App { addr, served }
    }
}

async fn answer(req: Request<Incoming>, count: &AtomicU64) -> Response<Reply> {
    let path = req.uri().path();
    if req.method() == http::Method::GET && path == "/bench" {
        count.fetch_add(1, Ordering::Relaxed);
        return Response::new(Reply::data(Bytes::from_static(b"ok")));
    }
    if req.method() == http::Method::POST && path == GRPC_PATH {
        let Ok(body) = req.into_body().collect().await else {
            return status(StatusCode::BAD_REQUEST);
        };
        let Some(message) = grpc_message(body.to_bytes()) else {
            return grpc_error(13, "malformed gRPC message");
        };
        count.fetch_add(1, Ordering::Relaxed);
        let mut resp = Response::new(Reply {
            data: Some(grpc_frame(&message)),
            trailers: Some(grpc_trailers(0, None)),
        });
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        return resp;
    }
    status(StatusCode::NOT_FOUND)
}

fn status(code: StatusCode) -> Response<Reply> {
    let mut resp = Response::new(Reply::data(Bytes::new()));
    *resp.status_mut() = code;
    resp
}

/// A trailers-only gRPC answer.
fn grpc_error(code: u8, message: &'static str) -> Response<Reply> {
    let mut resp = Response::new(Reply::data(Bytes::new()));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.extend(grpc_trailers(code, Some(message)));
    resp
}

fn grpc_trailers(code: u8, message: Option<&'static str>) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(u16::from(code)));
    if let Some(m) = message {
        t.insert("grpc-message", HeaderValue::from_static(m));
    }
    t
}

/// One length-prefixed gRPC message (uncompressed), as on the wire.
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out.into()
}

/// The single uncompressed message of a unary gRPC body, if it is exactly
/// one well-formed length-prefixed message.
pub fn grpc_message(mut body: Bytes) -> Option<Bytes> {
    if body.len() < 5 || body[0] != 0 {
        return None;
    }
    body.advance(1);
    let len = body.get_u32() as usize;
    (body.len() == len).then_some(body)
}

/// A response body of at most one data frame, then optional trailers.
pub struct Reply {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Reply {
    fn data(b: Bytes) -> Self {
        Reply {
            data: Some(b),
            trailers: None,
        }
    }
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tonic, an independent gRPC implementation, gets its message echoed:
    /// the app's framing, headers and trailers are real gRPC.
    #[tokio::test]
    async fn tonic_client_calls_the_grpc_app() {
        let app = H2App::start();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("ready");
        // `Vec<u8>` is prost's google.protobuf.BytesValue.
        let reply = grpc
            .unary(
                tonic::Request::new(b"ping".to_vec()),
                http::uri::PathAndQuery::from_static(GRPC_PATH),
                tonic_prost::ProstCodec::<Vec<u8>, Vec<u8>>::default(),
            )
            .await
            .expect("the call succeeds");
        assert_eq!(reply.into_inner(), b"ping");
        assert_eq!(app.served.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn grpc_message_takes_exactly_one_frame() {
        let m = grpc_frame(b"abc");
        assert_eq!(&m[..], b"\0\0\0\0\x03abc");
        assert_eq!(grpc_message(m.clone()).as_deref(), Some(&b"abc"[..]));
        assert_eq!(grpc_message(m.slice(..6)), None, "truncated");
        let mut two = m.to_vec();
        two.extend_from_slice(&m);
        assert_eq!(grpc_message(two.into()), None, "two messages");
        assert_eq!(
            grpc_message(Bytes::from_static(b"\x01\0\0\0\0")),
            None,
            "compressed"
        );
    }
}
