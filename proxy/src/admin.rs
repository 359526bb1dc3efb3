//! The admin server, loopback by default: liveness, readiness, metrics, the
//! effective configuration, the current identity and policies, the log
//! filter (readable and changeable at runtime), a drain trigger, and what
//! discovery knows about a destination (`/discovery?dst=ADDR:PORT`).
//!
//! Whatever `admin.address` is (on Kubernetes it is `0.0.0.0:15000`, so
//! that the kubelet can probe it), only the probe endpoints (`/live`,
//! `/ready`, `/metrics` and the app's rewritten probes under
//! `/app-health/`) answer clients outside the pod; every other path, and
//! any path added later, answers loopback clients only ([`Exposure`]), as
//! linkerd2-proxy serves its mutating endpoints to localhost only. A
//! remote client gets 403 (counted, logged at debug).
//!
//! Nothing here prints key material: `/identity` shows certificate facts
//! (ID, serial, validity) only, and `/config` is the configuration file's
//! view, which holds key *paths*, never keys.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::server::Shared;

/// Renders the Prometheus text exposition of the process's metrics.
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// Reads and changes the process's log filter (a `tracing` filter such as
/// `info,rampart_proxy=debug`); implemented by the binary, which owns the
/// subscriber.
pub trait LogControl: Send + Sync {
    /// The filter in force.
    fn current(&self) -> String;
    /// Puts `filter` in force; an invalid filter changes nothing.
    fn set(&self, filter: &str) -> Result<(), String>;
}

/// What the admin API serves besides the proxy's own state.
#[derive(Clone)]
pub struct AdminHooks {
    /// `/metrics`.
    pub render: MetricsRender,
    /// `/config`: the effective configuration as JSON, secrets redacted.
    pub config_json: Arc<str>,
    /// `/logging`.
    pub logging: Arc<dyn LogControl>,
    /// `/policy`'s `central` member: bundle revision and status, decision-log
    /// queue (central management, when configured).
    pub central_status: Option<CentralStatus>,
    /// `/app-health/...`: the app's probes, run for the kubelet.
    pub app_probes: Arc<crate::probe::AppProbes>,
}

/// Renders the state of central management as JSON for `/policy`.
pub type CentralStatus = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// The longest `/logging` body accepted.
const MAX_BODY: usize = 4096;

/// Serves the admin API until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    hooks: AdminHooks,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, client) = tokio::select! {
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let hooks = hooks.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                let hooks = hooks.clone();
                async move { Ok::<_, Infallible>(handle(req, client, &shared, &hooks).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    with_type(status, body, "text/plain; charset=utf-8")
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_string_pretty(value).unwrap_or_default();
    body.push('\n');
    with_type(StatusCode::OK, body, "application/json")
}

fn with_type(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// Who may call an admin path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// Any client that reaches the admin address: the kubelet's probes and
    /// the metrics scraper.
    Probe,
    /// Loopback clients only (the pod's own containers, an operator with
    /// `kubectl exec` or `port-forward`).
    LoopbackOnly,
}

impl Exposure {
    /// The exposure of `path` (the app's probes, served before this
    /// question is asked, are probes too): only the probe paths are
    /// [`Exposure::Probe`], so a path added later is loopback-only until
    /// someone decides otherwise here.
    pub fn of(path: &str) -> Exposure {
        match path {
            "/live" | "/ready" | "/metrics" => Exposure::Probe,
            _ => Exposure::LoopbackOnly,
        }
    }
}

/// Whether `client` is on this host's loopback (an IPv4-mapped `::ffff:127.x`
/// included, as a dual-stack listener reports IPv4 clients).
fn is_loopback(client: std::net::SocketAddr) -> bool {
    client.ip().to_canonical().is_loopback()
}

/// The methods each path answers, or `None` for an unknown path.
fn allowed(path: &str) -> Option<&'static str> {
    match path {
        "/live" | "/ready" | "/metrics" | "/config" | "/identity" | "/policy" | "/discovery" => {
            Some("GET, HEAD")
        }
        "/logging" => Some("GET, HEAD, PUT, POST"),
        "/drain" => Some("POST"),
        _ => None,
    }
}

async fn handle(
    req: Request<Incoming>,
    client: std::net::SocketAddr,
    shared: &Shared,
    hooks: &AdminHooks,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if let Some(probe) = hooks.app_probes.get(&path) {
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        return probe.run(req.headers()).await;
    }
    if Exposure::of(&path) == Exposure::LoopbackOnly && !is_loopback(client) {
        tracing::debug!(src.addr = %client, path = %path, "admin request from outside the pod refused");
        crate::metrics::admin_refused();
        return text(
            StatusCode::FORBIDDEN,
            "forbidden: this admin endpoint answers loopback clients only\n",
        );
    }
    let Some(allow) = allowed(&path) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let method = req.method().clone();
    if !allow.split(", ").any(|m| m == method.as_str()) {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
        return r;
    }
    match (path.as_str(), method) {
        ("/live", _) => text(StatusCode::OK, "live\n"),
        ("/ready", _) => {
            if shared.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        ("/metrics", _) => with_type(
            StatusCode::OK,
            (hooks.render)(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        ("/config", _) => with_type(
            StatusCode::OK,
            format!("{}\n", hooks.config_json),
            "application/json",
        ),
        ("/identity", _) => json(&identity_json(shared)),
        ("/discovery", _) => match &shared.config.discovery {
            None => json(&serde_json::json!({ "sources": "none" })),
            Some(d) => {
                // `?dst=ADDR:PORT` (or `HOST:PORT`, or a service name).
                let query = req.uri().query().and_then(|q| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix("dst="))
                        .map(str::to_owned)
                });
                json(&d.describe(query.as_deref()).await)
            }
        },
        ("/policy", _) => {
            let mut v = policy_json(shared);
            if let Some(status) = &hooks.central_status {
                v["central"] = status();
            }
            json(&v)
        }
        ("/logging", Method::PUT | Method::POST) => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n"),
            };
            let filter = String::from_utf8_lossy(&body).trim().to_owned();
            match hooks.logging.set(&filter) {
                Ok(()) => {
                    tracing::info!(filter = %filter, "log filter changed");
                    text(StatusCode::OK, format!("{filter}\n"))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("invalid filter: {e}\n")),
            }
        }
        ("/logging", _) => text(StatusCode::OK, format!("{}\n", hooks.logging.current())),
        ("/drain", _) => {
            tracing::info!("drain requested through the admin API");
            shared.request_drain();
            text(StatusCode::ACCEPTED, "draining\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn identity_json(shared: &Shared) -> serde_json::Value {
    match shared.identity() {
        None => serde_json::json!({ "state": "none" }),
        Some(c) => serde_json::json!({
            "state": "ready",
            "spiffe_id": c.svid.id.as_str(),
            "dns_names": c.svid.dns_names,
            "serial": c.svid.serial,
            "not_before_unix": unix(c.svid.not_before),
            "not_after_unix": unix(c.svid.not_after),
            "trust_domains": c.trust_domains.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        }),
    }
}

fn policy_json(shared: &Shared) -> serde_json::Value {
    let current = shared.config.authorizer.current();
    let policies: Vec<_> = current
        .authorizer
        .policies()
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.name,
                "file": p.file.display().to_string(),
                "kind": format!("{:?}", p.kind),
                "action": p.action.map(|a| format!("{a:?}")),
                "ports": p.ports,
                "dry_run": p.dry_run,
                "rules": p.rules,
                "content_hash": p.content_hash,
            })
        })
        .collect();
    let mut v = serde_json::json!({
        "origin": current.origin.as_str(),
        "loaded_at_unix": unix(current.loaded_at),
        "policies": policies,
    });
    if let crate::policy::PolicyOrigin::Bundle { revision, verified } = &current.origin {
        v["bundle_revision"] = serde_json::Value::String(revision.clone());
        v["bundle_verified"] = serde_json::Value::Bool(*verified);
    }
    v
}
