//! The demo's four small apps, as in scenario 1: two backends answering
//! "Hi <name> client!", and two web tiers that answer `/noproxy` themselves
//! and proxy every other path to their backend through their sidecar.
//! `rampart demo-app` runs one of them as a process of its own (in a pod,
//! for `rampart demo --transparent`).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What an app does with a request.
#[derive(Debug, Clone)]
pub enum App {
    /// Answers every request with a greeting.
    Backend {
        /// The backend's name.
        name: &'static str,
    },
    /// Answers `/noproxy`, proxies `/call/<peer>/<rest>` to that peer's
    /// `/<rest>`, and the rest to `upstream` (its backend, or its outbound
    /// sidecar listener on loopback).
    Web {
        /// The web tier's name.
        name: &'static str,
        /// Where its backend is.
        upstream: SocketAddr,
        /// Other services it may be asked to call, by name.
        peers: Vec<(&'static str, SocketAddr)>,
    },
}

/// Starts `app` on an ephemeral loopback port; returns its address.
pub async fn start(app: App) -> std::io::Result<SocketAddr> {
    start_on(app, SocketAddr::from(([127, 0, 0, 1], 0))).await
}

/// Starts `app` on `addr`; returns the bound address.
pub async fn start_on(app: App, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let app = app.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(handle(app, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

async fn handle(app: App, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match app {
        App::Backend { name } => text(StatusCode::OK, format!("Hi {name} client!")),
        App::Web {
            name,
            upstream,
            peers,
        } => {
            if req.uri().path() == "/noproxy" {
                return text(StatusCode::OK, format!("Hello from {name}"));
            }
            let mut path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into());
            let mut upstream = upstream;
            if let Some(rest) = path.strip_prefix("/call/") {
                let (peer, rest) = rest.split_once('/').unwrap_or((rest, ""));
                let Some((_, addr)) = peers.iter().find(|(n, _)| *n == peer) else {
                    return text(StatusCode::NOT_FOUND, format!("{name}: no peer {peer}"));
                };
                upstream = *addr;
                path = format!("/{rest}");
            }
            match get(upstream, &path, &[]).await {
                Ok((status, body)) => text(status, body),
                Err(e) => text(
                    StatusCode::BAD_GATEWAY,
                    format!("{name}: upstream failed: {e}"),
                ),
            }
        }
    }
}

/// One GET over a fresh HTTP/1.1 connection; returns status and body.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, String), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "demo.local");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).trim().to_owned()))
}
