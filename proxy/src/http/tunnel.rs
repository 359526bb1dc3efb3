//! Tunnels through the HTTP stage: HTTP/1.1 `Upgrade` (WebSocket, RFC 9110
//! §7.8, RFC 6455) and `CONNECT` (RFC 9110 §9.3.6).
//!
//! A tunnel request is an HTTP request like any other until it is answered:
//! the inbound sidecar authorizes it (method `GET` and the path for an
//! upgrade; `CONNECT` and its authority-form target, with an empty path,
//! for CONNECT), sets XFCC, and sends it to the app. When the far end
//! switches (101 to an upgrade, 2xx to a CONNECT), the response is relayed
//! and both connections become byte streams, spliced with half-close.
//!
//! Between sidecars a tunnel rides its own HTTP/1.1 connection over mTLS,
//! not a stream of the pooled HTTP/2 connection (RFC 8441 extended
//! CONNECT), for the same reasons linkerd2-proxy keeps upgrades off its
//! HTTP/2 pool: tunnels live long, and on the shared connection each would
//! hold one of its `max_concurrent_streams` slots (hyper's pool never opens
//! a second HTTP/2 connection to a destination, so enough WebSockets would
//! stall every ordinary request to it); a tunnel whose reader stalls would
//! pin connection-level flow-control window that the other streams need;
//! and the peer's `SETTINGS_ENABLE_CONNECT_PROTOCOL` only arrives after the
//! handshake, so the first tunnel on a fresh connection would race it. A
//! dedicated connection has TCP's own flow control and half-close, like the
//! opaque TCP path, and the same identity checks.
//!
//! The sidecar never dials a CONNECT target itself: CONNECT goes to the
//! destination the app was sending to, which must be a proxy. Dialing the
//! target would turn every sidecar into an open forward proxy around the
//! outbound routing and server-identity rules.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

use super::ProxyBody;
use super::headers::strip_hop_by_hop;
use crate::config::Direction;

/// The tunnel an HTTP/1.1 request asks for.
#[derive(Debug, Clone)]
pub enum Tunnel {
    /// `Connection: upgrade` with `Upgrade: <one protocol>`; switched by a 101.
    Upgrade(HeaderValue),
    /// `CONNECT host:port`; established by a 2xx.
    Connect,
}

impl Tunnel {
    /// The tunnel a request head asks for, if any. Only HTTP/1.1 has them;
    /// `Upgrade: h2c` is not tunneled (the sidecars speak HTTP/2 between
    /// themselves already), nor an upgrade offering several protocols.
    pub fn of(method: &Method, version: Version, h: &HeaderMap) -> Option<Tunnel> {
        if version != Version::HTTP_11 {
            return None;
        }
        if method == Method::CONNECT {
            return Some(Tunnel::Connect);
        }
        // The common case costs one lookup.
        let token = h.get(header::UPGRADE)?;
        let t = token.as_bytes().trim_ascii();
        if t.is_empty() || t.contains(&b',') || t.eq_ignore_ascii_case(b"h2c") {
            return None;
        }
        let asks = h.get_all(header::CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|n| n.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
        });
        asks.then(|| Tunnel::Upgrade(token.clone()))
    }

    /// Fixed label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Tunnel::Upgrade(_) => "upgrade",
            Tunnel::Connect => "connect",
        }
    }

    /// Whether the far end's `status` switched the connection.
    pub fn switched(&self, status: StatusCode) -> bool {
        match self {
            Tunnel::Upgrade(_) => status == StatusCode::SWITCHING_PROTOCOLS,
            Tunnel::Connect => status.is_success(),
        }
    }

    /// Hop-by-hop fields removed (RFC 9110 §7.6.1), then the ones that ask
    /// the next hop for this tunnel put back.
    pub fn prepare_request(&self, h: &mut HeaderMap) {
        strip_hop_by_hop(h);
        if let Tunnel::Upgrade(token) = self {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, token.clone());
        }
    }
}

/// Whether a request head may ask to switch protocols: wider than
/// [`Tunnel::of`] (any `Upgrade` field but `h2c` counts), the same test
/// the smuggling guard applies. The answer to such a request closes the
/// connection unless it switched (see [`close_unless_switched`]).
pub fn may_switch(method: &Method, version: Version, h: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && (method == Method::CONNECT
            || h.get_all(header::UPGRADE)
                .iter()
                .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"h2c")))
}

/// Adds `Connection: close` to a response to a request that may have
/// switched protocols, unless it did: the smuggling guard stops following
/// request framing after such a head, so no other request may follow it on
/// the connection.
pub fn close_unless_switched<B>(connect: bool, resp: &mut Response<B>) {
    let status = resp.status();
    let switched = if connect {
        status.is_success()
    } else {
        status == StatusCode::SWITCHING_PROTOCOLS
    };
    if !switched {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// A tunnel request could not be sent or answered.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The HTTP/1.1 exchange with the far end failed.
    #[error("tunnel request failed: {0}")]
    Exchange(#[from] hyper::Error),
    /// No response head within the response timeout.
    #[error("no answer to the tunnel request in time")]
    Timeout,
}

/// Sends tunnel request `req` on a fresh HTTP/1.1 connection over `io` and
/// returns the response for the client. When the far end switches, a task
/// splices the client's upgraded connection (`downstream`) with this one;
/// its handle comes back so the caller's connection (its listener slot,
/// the drain) lasts as long as the tunnel.
pub async fn open<I>(
    io: I,
    req: Request<Incoming>,
    tunnel: &Tunnel,
    downstream: OnUpgrade,
    timeout: Duration,
    direction: Direction,
) -> Result<(Response<ProxyBody>, Option<JoinHandle<()>>), TunnelError>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "tunnel connection ended with an error");
        }
    });
    let mut resp = tokio::time::timeout(timeout, send.send_request(req))
        .await
        .map_err(|_| TunnelError::Timeout)??;
    if !tunnel.switched(resp.status()) {
        // Refused or not switched: an ordinary response.
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        return Ok((Response::from_parts(parts, Either::Left(body.into())), None));
    }
    let upstream = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let Tunnel::Upgrade(asked) = tunnel {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts
            .headers
            .insert(header::UPGRADE, protocol.unwrap_or_else(|| asked.clone()));
    } else {
        // RFC 9110 §9.3.6: no Content-Length or Transfer-Encoding in a 2xx
        // to CONNECT.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let label = tunnel.label();
    let splice = tokio::spawn(async move {
        let (down, up) = match tokio::try_join!(downstream, upstream) {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "tunnel not established");
                return;
            }
        };
        crate::forward::tunnel_bytes(TokioIo::new(down), TokioIo::new(up), direction, label).await;
    });
    let resp = Response::from_parts(parts, Either::Right(Full::new(Bytes::new())));
    Ok((resp, Some(splice)))
}

/// The task of a connection's tunnel, if one opened: the connection waits
/// for it before it gives up its listener slot.
#[derive(Debug, Default)]
pub struct TunnelTask(std::sync::Mutex<Option<JoinHandle<()>>>);

impl TunnelTask {
    /// Records the tunnel's task (one per HTTP/1.1 connection at most).
    pub fn set(&self, task: JoinHandle<()>) {
        // A poisoned lock only means a panic elsewhere; the slot is still usable.
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(task);
    }

    /// Waits for the tunnel, if there is one.
    pub async fn finished(&self) {
        self.finished_unless(std::future::pending()).await;
    }

    /// Waits for the tunnel, if there is one, and ends it (both sides
    /// closed) if `stop` resolves first.
    pub async fn finished_unless(&self, stop: impl std::future::Future<Output = ()>) {
        let task = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut t) = task {
            tokio::select! {
                _ = &mut t => {}
                () = stop => {
                    t.abort();
                    let _ = t.await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn tunnels_are_recognized() {
        let ws = head(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        let cases: [(Method, Version, HeaderMap, Option<&str>); 7] = [
            (Method::GET, Version::HTTP_11, ws.clone(), Some("upgrade")),
            (Method::GET, Version::HTTP_10, ws.clone(), None),
            (
                Method::GET,
                Version::HTTP_11,
                head(&[("upgrade", "websocket")]),
                None,
            ),
            (
                Method::GET,
                Version::HTTP_11,
                head(&[("connection", "upgrade"), ("upgrade", "h2c")]),
                None,
            ),
            (
                Method::GET,
                Version::HTTP_11,
                head(&[("connection", "upgrade"), ("upgrade", "a, b")]),
                None,
            ),
            (
                Method::CONNECT,
                Version::HTTP_11,
                HeaderMap::new(),
                Some("connect"),
            ),
            (Method::GET, Version::HTTP_11, HeaderMap::new(), None),
        ];
        for (m, v, h, want) in cases {
            let got = Tunnel::of(&m, v, &h);
            assert_eq!(got.as_ref().map(Tunnel::label), want, "{m} {v:?} {h:?}");
        }
    }

    #[test]
    fn only_h2c_upgrades_keep_the_connection_watched() {
        let get = |h: &[(&'static str, &'static str)]| {
            may_switch(&Method::GET, Version::HTTP_11, &head(h))
        };
        assert!(get(&[("upgrade", "websocket")]));
        assert!(!get(&[("upgrade", "h2c")]));
        assert!(!get(&[]));
        assert!(may_switch(
            &Method::CONNECT,
            Version::HTTP_11,
            &HeaderMap::new()
        ));
        assert!(!may_switch(
            &Method::CONNECT,
            Version::HTTP_2,
            &HeaderMap::new()
        ));
    }

    #[test]
    fn switching_depends_on_the_kind() {
        let up = Tunnel::Upgrade(HeaderValue::from_static("websocket"));
        assert!(up.switched(StatusCode::SWITCHING_PROTOCOLS));
        assert!(!up.switched(StatusCode::OK));
        assert!(Tunnel::Connect.switched(StatusCode::OK));
        assert!(!Tunnel::Connect.switched(StatusCode::FORBIDDEN));
    }

    #[test]
    fn prepared_requests_keep_only_the_tunnel_fields() {
        let mut h = head(&[
            ("connection", "Upgrade, x-hop"),
            ("x-hop", "1"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        Tunnel::Upgrade(HeaderValue::from_static("websocket")).prepare_request(&mut h);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert!(!h.contains_key("x-hop"));
        assert!(h.contains_key("sec-websocket-key"));
    }
}
