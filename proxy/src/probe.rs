//! The app's probes, run by the admin server on the kubelet's behalf.
//!
//! Injection (`rampart inject`, `rampart webhook`) rewrites each HTTP, gRPC
//! and TCP probe of the app to an `httpGet` of
//! `/app-health/<container>/<livez|readyz|startupz>` on the admin port, and
//! hands the sidecar the original handlers (the Kubernetes `HTTPGetAction`,
//! `GRPCAction` and `TCPSocketAction` shapes, ports as numbers, plus the
//! probe's `timeoutSeconds`) as JSON keyed by that path. The kubelet's
//! probe then never meets the inbound listener, whose mTLS it could not
//! pass; the admin server runs the original against the app on loopback,
//! with the kubelet's semantics:
//! - HTTP: a GET of the original path, scheme and headers; the app's status
//!   is answered as it is (the kubelet counts 200-399 as success). HTTPS
//!   does not verify the app's certificate, as the kubelet does not.
//! - gRPC: the standard health check (`grpc.health.v1.Health/Check`, the
//!   probe's `service`); 200 when the answer is `SERVING`, else 503.
//! - TCP: 200 when a connection opens, else 503.
//!
//! Only the configured paths are served, so this is no open proxy: the
//! admin port reaches exactly the probe endpoints the pod spec declared.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// The probes of one pod, by admin path.
#[derive(Debug, Default, Clone)]
pub struct AppProbes {
    by_path: HashMap<String, AppProbe>,
}

/// One probe: what to check and how long to wait.
#[derive(Debug, Clone)]
pub struct AppProbe {
    action: Action,
    timeout: Duration,
}

/// The original probe handler.
#[derive(Debug, Clone)]
enum Action {
    Http {
        port: u16,
        path: String,
        scheme: Scheme,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    Grpc {
        port: u16,
        service: String,
    },
    Tcp {
        port: u16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

/// Why the probes handed to the sidecar are unusable. The injector (or
/// whoever wrote them) is at fault.
#[derive(Debug, thiserror::Error)]
pub enum ProbeConfigError {
    /// Not a JSON object of probes.
    #[error("app probes: not a JSON object of probes: {0}")]
    NotJson(String),
    /// One probe is malformed.
    #[error("app probe {path}: {reason}")]
    Bad {
        /// The admin path.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The largest body read from an HTTP probe's answer (the kubelet reads 10 KiB).
const MAX_PROBE_BODY: usize = 10 * 1024;
/// gRPC health `ServingStatus.SERVING`.
const SERVING: u64 = 1;

impl AppProbes {
    /// Parses the `RAMPART_APP_PROBES` JSON; an empty text means no probes.
    pub fn parse(text: &str) -> Result<AppProbes, ProbeConfigError> {
        if text.trim().is_empty() {
            return Ok(AppProbes::default());
        }
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ProbeConfigError::NotJson(e.to_string()))?;
        let object = value
            .as_object()
            .ok_or_else(|| ProbeConfigError::NotJson("not an object".to_owned()))?;
        let mut by_path = HashMap::new();
        for (path, probe) in object {
            let bad = |reason: &str| ProbeConfigError::Bad {
                path: path.clone(),
                reason: reason.to_owned(),
            };
            if !path.starts_with("/app-health/") {
                return Err(bad("the path does not start with /app-health/"));
            }
            let port = |action: &serde_json::Value| {
                action
                    .get("port")
                    .and_then(serde_json::Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p > 0)
                    .ok_or_else(|| bad("`port` is not a port number"))
            };
            let action = if let Some(a) = probe.get("httpGet") {
                let scheme = match a.get("scheme").and_then(serde_json::Value::as_str) {
                    None | Some("HTTP") => Scheme::Http,
                    Some("HTTPS") => Scheme::Https,
                    Some(_) => return Err(bad("`scheme` is neither HTTP nor HTTPS")),
                };
                let target = a
                    .get("path")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("/");
                let target = if target.starts_with('/') {
                    target.to_owned()
                } else {
                    format!("/{target}")
                };
                if target.parse::<http::uri::PathAndQuery>().is_err() {
                    return Err(bad("`path` is not a request path"));
                }
                let mut headers = vec![];
                let listed = a.get("httpHeaders").and_then(serde_json::Value::as_array);
                for h in listed.into_iter().flatten() {
                    let name = h.get("name").and_then(serde_json::Value::as_str);
                    let value = h.get("value").and_then(serde_json::Value::as_str);
                    let (Some(name), Some(value)) = (name, value) else {
                        return Err(bad("an httpHeaders entry lacks `name` or `value`"));
                    };
                    let name = HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| bad("an httpHeaders name is not a header name"))?;
                    let value = HeaderValue::from_str(value)
                        .map_err(|_| bad("an httpHeaders value is not a header value"))?;
                    headers.push((name, value));
                }
                Action::Http {
                    port: port(a)?,
                    path: target,
                    scheme,
                    headers,
                }
            } else if let Some(a) = probe.get("grpc") {
                let service = a.get("service").and_then(serde_json::Value::as_str);
                Action::Grpc {
                    port: port(a)?,
                    service: service.unwrap_or("").to_owned(),
                }
            } else if let Some(a) = probe.get("tcpSocket") {
                Action::Tcp { port: port(a)? }
            } else {
                return Err(bad("no httpGet, grpc or tcpSocket handler"));
            };
            let timeout = probe
                .get("timeoutSeconds")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(1)
                .clamp(1, 3600);
            by_path.insert(
                path.clone(),
                AppProbe {
                    action,
                    timeout: Duration::from_secs(timeout),
                },
            );
        }
        Ok(AppProbes { by_path })
    }

    /// The probe served at `path`.
    pub fn get(&self, path: &str) -> Option<&AppProbe> {
        self.by_path.get(path)
    }

    /// How many probes there are.
    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }
}

impl AppProbe {
    /// Runs the probe against the app and answers the kubelet. `incoming`
    /// are the kubelet's request headers (its `User-Agent` is passed on).
    pub async fn run(&self, incoming: &HeaderMap) -> Response<Full<Bytes>> {
        let outcome = tokio::time::timeout(self.timeout, self.check(incoming)).await;
        let (status, detail) = match outcome {
            Ok(Ok(status)) => (status, String::new()),
            Ok(Err(reason)) => (StatusCode::SERVICE_UNAVAILABLE, reason),
            Err(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no answer within {} s", self.timeout.as_secs()),
            ),
        };
        if !detail.is_empty() {
            tracing::debug!(probe.port = self.action.port(), reason = %detail, "app probe failed");
        }
        let mut r = Response::new(Full::new(Bytes::from(format!(
            "{}{}{detail}\n",
            status.as_u16(),
            if detail.is_empty() { "" } else { " " }
        ))));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    }

    async fn check(&self, incoming: &HeaderMap) -> Result<StatusCode, String> {
        let app = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        match &self.action {
            Action::Tcp { port } => TcpStream::connect(app(*port))
                .await
                .map(|_| StatusCode::OK)
                .map_err(|e| format!("connect: {e}")),
            Action::Http {
                port,
                path,
                scheme,
                headers,
            } => http_get(app(*port), path, *scheme, headers, incoming).await,
            Action::Grpc { port, service } => grpc_health(app(*port), service).await,
        }
    }
}

impl Action {
    fn port(&self) -> u16 {
        match self {
            Action::Http { port, .. } | Action::Grpc { port, .. } | Action::Tcp { port } => *port,
        }
    }
}

async fn http_get(
    addr: SocketAddr,
    path: &str,
    scheme: Scheme,
    headers: &[(HeaderName, HeaderValue)],
    incoming: &HeaderMap,
) -> Result<StatusCode, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut request = Request::get(path)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let h = request.headers_mut();
    // The kubelet's defaults; the probe's own headers override them.
    let host = HeaderValue::from_str(&addr.to_string()).map_err(|e| e.to_string())?;
    h.insert(http::header::HOST, host);
    let agent = incoming.get(http::header::USER_AGENT).cloned();
    h.insert(
        http::header::USER_AGENT,
        agent.unwrap_or(HeaderValue::from_static("kube-probe")),
    );
    h.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
    for (name, value) in headers {
        h.insert(name.clone(), value.clone());
    }
    let status = match scheme {
        Scheme::Http => send_http1(TokioIo::new(tcp), request).await?,
        Scheme::Https => {
            let connector = tokio_rustls::TlsConnector::from(probe_tls_config());
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            send_http1(TokioIo::new(tls), request).await?
        }
    };
    Ok(status)
}

async fn send_http1<IO>(
    io: TokioIo<IO>,
    request: Request<Empty<Bytes>>,
) -> Result<StatusCode, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let status = response.status();
    // Read (a bounded part of) the body so the app sees a complete exchange.
    let _ = Limited::new(response.into_body(), MAX_PROBE_BODY)
        .collect()
        .await;
    Ok(status)
}

async fn grpc_health(addr: SocketAddr, service: &str) -> Result<StatusCode, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, "kube-probe")
        .body(Full::new(health_check_request(service)))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    if response.status() != StatusCode::OK {
        return Err(format!("gRPC: HTTP status {}", response.status()));
    }
    let head_status = response.headers().get("grpc-status").cloned();
    let collected = Limited::new(response.into_body(), MAX_PROBE_BODY)
        .collect()
        .await
        .map_err(|e| format!("gRPC: {e}"))?;
    let trailer_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .cloned();
    let grpc_status = trailer_status.or(head_status);
    if grpc_status.as_ref().map(HeaderValue::as_bytes) != Some(b"0") {
        let shown = grpc_status
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        return Err(format!("gRPC: grpc-status {shown}"));
    }
    match serving_status(collected.to_bytes()) {
        Some(SERVING) => Ok(StatusCode::OK),
        Some(other) => Err(format!("gRPC health: status {other}, not SERVING")),
        None => Err("gRPC health: unreadable answer".to_owned()),
    }
}

/// A gRPC message (RFC-less but fixed: 1 byte flags, 4 bytes length) with a
/// `grpc.health.v1.HealthCheckRequest { string service = 1; }`.
fn health_check_request(service: &str) -> Bytes {
    let mut message = BytesMut::new();
    if !service.is_empty() {
        message.put_u8(0x0a); // field 1, length-delimited
        put_varint(&mut message, service.len() as u64);
        message.put_slice(service.as_bytes());
    }
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    // A service name fits in 4 GiB: it is a probe's config string.
    framed.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    framed.put_slice(&message);
    framed.freeze()
}

/// The `status` (field 1, varint) of a framed `HealthCheckResponse`.
fn serving_status(mut body: Bytes) -> Option<u64> {
    if body.len() < 5 || body[0] != 0 {
        return None; // Compressed or short: not what a health service sends.
    }
    body.advance(1);
    let len = body.get_u32() as usize;
    let mut message = body.get(..len)?;
    // Proto3 leaves out a zero `status` (UNKNOWN).
    let mut status = 0;
    while !message.is_empty() {
        let tag = get_varint(&mut message)?;
        match (tag >> 3, tag & 7) {
            (1, 0) => status = get_varint(&mut message)?,
            (_, 0) => {
                get_varint(&mut message)?;
            }
            (_, 2) => {
                let n = usize::try_from(get_varint(&mut message)?).ok()?;
                message = message.get(n..)?;
            }
            (_, 5) => message = message.get(4..)?,
            (_, 1) => message = message.get(8..)?,
            _ => return None,
        }
    }
    Some(status)
}

fn put_varint(out: &mut BytesMut, mut n: u64) {
    while n >= 0x80 {
        out.put_u8((n as u8) | 0x80);
        n >>= 7;
    }
    out.put_u8(n as u8);
}

fn get_varint(input: &mut &[u8]) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        n |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

/// TLS for HTTPS probes: the kubelet does not verify the app's certificate
/// (an HTTPS probe checks that the app answers, not who it is), and neither
/// does this, which is why it is used for nothing else.
fn probe_tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier = Arc::new(SkipServerCertValidationForProbes(provider.clone()));
            // The ring provider supports the safe default versions.
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports TLS 1.2 and 1.3")
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// Accepts any server certificate, checking only that the handshake's
/// signatures are made with its key. For HTTPS probes of the app only.
#[derive(Debug)]
struct SkipServerCertValidationForProbes(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for SkipServerCertValidationForProbes {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_parse_and_bad_ones_name_their_path() {
        let probes = AppProbes::parse(
            r#"{"/app-health/app/readyz": {"httpGet": {"path": "healthz?x=1", "port": 8080, "scheme": "HTTPS",
                 "httpHeaders": [{"name": "X-A", "value": "b"}]}, "timeoutSeconds": 3},
               "/app-health/app/livez": {"grpc": {"port": 9090}},
               "/app-health/app/startupz": {"tcpSocket": {"port": 7070}}}"#,
        )
        .unwrap();
        assert_eq!(probes.len(), 3);
        let ready = probes.get("/app-health/app/readyz").unwrap();
        assert_eq!(ready.timeout, Duration::from_secs(3));
        match &ready.action {
            Action::Http {
                path,
                scheme,
                headers,
                port,
            } => {
                assert_eq!(
                    (path.as_str(), *scheme, *port),
                    ("/healthz?x=1", Scheme::Https, 8080)
                );
                assert_eq!(headers[0].0, "x-a");
            }
            other => panic!("{other:?}"),
        }
        assert!(AppProbes::parse("").unwrap().is_empty());
        let cases = [
            (
                r#"{"/x": {"tcpSocket": {"port": 1}}}"#,
                "app probe /x: the path does not start with /app-health/",
            ),
            (
                r#"{"/app-health/a/livez": {"tcpSocket": {"port": 0}}}"#,
                "app probe /app-health/a/livez: `port` is not a port number",
            ),
            (
                r#"{"/app-health/a/livez": {"exec": {}}}"#,
                "app probe /app-health/a/livez: no httpGet, grpc or tcpSocket handler",
            ),
            (
                "[1]",
                "app probes: not a JSON object of probes: not an object",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(AppProbes::parse(text).unwrap_err().to_string(), expected);
        }
    }

    #[test]
    fn health_messages_round_trip() {
        let request = health_check_request("app");
        assert_eq!(&request[..], b"\0\0\0\0\x05\x0a\x03app");
        assert_eq!(&health_check_request("")[..], b"\0\0\0\0\0");
        assert_eq!(
            serving_status(Bytes::from_static(b"\0\0\0\0\x02\x08\x01")),
            Some(SERVING)
        );
        assert_eq!(
            serving_status(Bytes::from_static(b"\0\0\0\0\x02\x08\x02")),
            Some(2)
        );
        assert_eq!(serving_status(Bytes::from_static(b"\0\0\0\0\0")), Some(0));
        assert_eq!(
            serving_status(Bytes::from_static(b"\0\0\0\0\x05\x08")),
            None
        );
    }
}
