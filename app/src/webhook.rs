//! `rampart webhook`: a mutating admission webhook that injects pods.
//!
//! The API server sends an `AdmissionReview` (admission.k8s.io/v1) for each
//! pod created in a namespace the MutatingWebhookConfiguration selects; the
//! answer carries the same mutation as `rampart inject` ([`crate::inject`])
//! as an RFC 6902 JSON patch, base64-encoded. The server speaks HTTP/1.1
//! over TLS (rustls) with a certificate and key read from files and
//! reloaded when they change ([`crate::webhook_tls`]);
//! `deploy/webhook/` and `docs/kubernetes.md` show the certificate setup.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value as Json, json};

use crate::inject::{InjectOptions, inject_pod};
use crate::webhook_tls::{CertError, CertFiles, ReloadingCert};

/// Largest AdmissionReview accepted (the API server's own request limit is 3 MiB).
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Arguments of `rampart webhook`.
#[derive(Debug, Args)]
pub struct WebhookArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// PEM certificate chain the API server verifies (its `caBundle`).
    #[arg(long)]
    pub tls_cert: PathBuf,
    /// PEM private key of the certificate.
    #[arg(long)]
    pub tls_key: PathBuf,
    /// How often the certificate files are checked for a new certificate.
    #[arg(long, default_value = "10s", value_parser = parse_seconds)]
    pub tls_reload_interval: std::time::Duration,
    /// Log lines as `text` or `json` (one object per line); text has colour
    /// only on a terminal.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub options: InjectOptions,
}

/// Why the webhook server could not start. Once it serves, a failed
/// handshake or request is logged, never fatal.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The certificate or key files cannot be used (the operator's fault).
    #[error(transparent)]
    Cert(#[from] CertError),
    /// rustls refused the TLS settings (a bug: they are fixed).
    #[error("TLS settings: {0}")]
    Tls(#[from] rustls::Error),
    /// The runtime could not be built (the machine).
    #[error("cannot build the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The listen address cannot be bound (in use, or not ours).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// `--listen`.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
}

/// Runs the webhook server until SIGTERM or SIGINT.
pub fn run(args: WebhookArgs) -> Result<(), WebhookError> {
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match args.log_format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt.json().init(),
    }
    let cert = Arc::new(ReloadingCert::load(CertFiles {
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
    })?);
    let tls = Arc::new(server_config(cert.clone())?);
    let options = Arc::new(args.options);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(WebhookError::Runtime)?;
    rt.block_on(async move {
        let listen_error = |source| WebhookError::Listen {
            addr: args.listen,
            source,
        };
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(listen_error)?;
        let bound = listener.local_addr().map_err(listen_error)?;
        tracing::info!(listen.addr = %bound, "webhook listening");
        tokio::spawn(cert.watch(args.tls_reload_interval));
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let shutdown = shutdown_signal();
        tokio::pin!(shutdown);
        loop {
            let (tcp, client) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => { tracing::warn!(error = %e, "accept failed"); continue; }
                },
                () = &mut shutdown => break,
            };
            let acceptor = acceptor.clone();
            let options = options.clone();
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        tracing::debug!(src.addr = %client, error = %e, "handshake failed");
                        return;
                    }
                };
                let service = hyper::service::service_fn(move |req| {
                    let options = options.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(req, &options).await) }
                });
                let io = hyper_util::rt::TokioIo::new(tls);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(src.addr = %client, error = %e, "connection failed");
                }
            });
        }
        tracing::info!("webhook stopped");
        Ok(())
    })
}

/// Answers one AdmissionReview (the request body) with an AdmissionReview.
/// Pods are injected; any other object is allowed unchanged. A pod whose
/// annotations cannot be used is refused with the reason, so the operator
/// sees it in the controller's events rather than getting a pod without
/// the sidecar.
pub fn review(body: &[u8], options: &InjectOptions) -> Result<Json, String> {
    let review: Json = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let request = review
        .get("request")
        .ok_or("no `request` in the AdmissionReview")?;
    let uid = request
        .get("uid")
        .and_then(Json::as_str)
        .ok_or("no `request.uid`")?;
    let api_version = review
        .get("apiVersion")
        .and_then(Json::as_str)
        .unwrap_or("admission.k8s.io/v1");
    let mut response = json!({ "uid": uid, "allowed": true });
    let kind = request.pointer("/kind/kind").and_then(Json::as_str);
    let object = request.get("object");
    if let (Some("Pod"), Some(pod)) = (kind, object) {
        match mutate_pod_json(pod, options) {
            Ok(patch) if patch.is_empty() => {}
            Ok(patch) => {
                let patch = serde_json::to_vec(&patch).expect("a JSON value serializes");
                response["patchType"] = json!("JSONPatch");
                response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
            }
            Err(reason) => {
                response["allowed"] = json!(false);
                response["status"] = json!({ "code": 400, "message": reason });
            }
        }
    }
    Ok(json!({ "apiVersion": api_version, "kind": "AdmissionReview", "response": response }))
}

/// The JSON patch that injects `pod`.
pub fn mutate_pod_json(pod: &Json, options: &InjectOptions) -> Result<Vec<Json>, String> {
    let mut yaml: serde_yaml::Value = serde_yaml::to_value(pod).map_err(|e| e.to_string())?;
    let name = pod
        .pointer("/metadata/name")
        .or_else(|| pod.pointer("/metadata/generateName"))
        .and_then(Json::as_str)
        .unwrap_or("<unnamed>");
    let mapping = yaml.as_mapping_mut().ok_or("the pod is not an object")?;
    inject_pod(mapping, options, &format!("Pod/{name}")).map_err(|e| e.to_string())?;
    let injected: Json = serde_json::to_value(&yaml).map_err(|e| e.to_string())?;
    let mut patch = vec![];
    diff("", pod, &injected, &mut patch);
    Ok(patch)
}

/// Appends to `patch` the RFC 6902 operations that turn `from` into `to`:
/// objects are compared key by key; a changed list is replaced whole, which
/// is always correct and keeps the patch independent of list positions.
pub fn diff(path: &str, from: &Json, to: &Json, patch: &mut Vec<Json>) {
    match (from, to) {
        (Json::Object(a), Json::Object(b)) => {
            for (key, old) in a {
                let here = format!("{path}/{}", escape(key));
                match b.get(key) {
                    None => patch.push(json!({ "op": "remove", "path": here })),
                    Some(new) => diff(&here, old, new, patch),
                }
            }
            for (key, new) in b {
                if !a.contains_key(key) {
                    let here = format!("{path}/{}", escape(key));
                    patch.push(json!({ "op": "add", "path": here, "value": new }));
                }
            }
        }
        (a, b) if a == b => {}
        (_, b) => patch.push(json!({ "op": "replace", "path": path, "value": b })),
    }
}

/// A JSON pointer reference token (RFC 6901 section 3: `~` is `~0`, `/` is `~1`).
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    options: &InjectOptions,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: Vec<u8>, content_type: &str| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, b"ok\n".to_vec(), "text/plain"),
        (&Method::POST, "/inject") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        format!("{e}\n").into_bytes(),
                        "text/plain",
                    );
                }
            };
            match review(&body, options) {
                Ok(answer) => {
                    let allowed = answer.pointer("/response/allowed").and_then(Json::as_bool);
                    let uid = answer
                        .pointer("/response/uid")
                        .and_then(Json::as_str)
                        .unwrap_or("");
                    let reason = answer
                        .pointer("/response/status/message")
                        .and_then(Json::as_str);
                    tracing::info!(request.uid = uid, allowed, reason, "admission reviewed");
                    let body = serde_json::to_vec(&answer).expect("a JSON value serializes");
                    reply(StatusCode::OK, body, "application/json")
                }
                Err(reason) => reply(
                    StatusCode::BAD_REQUEST,
                    format!("{reason}\n").into_bytes(),
                    "text/plain",
                ),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, b"not found\n".to_vec(), "text/plain"),
    }
}

fn server_config(cert: Arc<ReloadingCert>) -> Result<rustls::ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The webhook's log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

fn parse_seconds(text: &str) -> Result<std::time::Duration, String> {
    let secs = text.strip_suffix('s').unwrap_or(text);
    match secs.parse::<u64>() {
        Ok(n) if n > 0 => Ok(std::time::Duration::from_secs(n)),
        _ => Err(format!(
            "'{text}' is not a whole number of seconds (e.g. 10s)"
        )),
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_tokens_are_escaped() {
        let mut patch = vec![];
        diff("", &json!({}), &json!({ "a/b~c": 1 }), &mut patch);
        assert_eq!(
            patch,
            vec![json!({ "op": "add", "path": "/a~1b~0c", "value": 1 })]
        );
    }

    #[test]
    fn other_kinds_are_allowed_unchanged() {
        let body = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": { "uid": "u1", "kind": { "group": "", "version": "v1", "kind": "Service" },
                         "object": { "kind": "Service" } }
        });
        let answer = review(
            &serde_json::to_vec(&body).unwrap(),
            &InjectOptions::default(),
        )
        .unwrap();
        assert_eq!(answer["response"], json!({ "uid": "u1", "allowed": true }));
    }

    #[test]
    fn an_injected_pod_gets_no_patch() {
        let mut pod = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p" },
                              "spec": { "containers": [ { "name": "app", "image": "x" } ] } });
        let options = InjectOptions::default();
        let first = mutate_pod_json(&pod, &options).unwrap();
        assert!(!first.is_empty());
        // What `rampart inject` did to the template, or the first invocation
        // (reinvocationPolicy: IfNeeded), is not done twice.
        let mut yaml: serde_yaml::Value = serde_yaml::to_value(&pod).unwrap();
        inject_pod(yaml.as_mapping_mut().unwrap(), &options, "Pod/p").unwrap();
        pod = serde_json::to_value(&yaml).unwrap();
        assert_eq!(mutate_pod_json(&pod, &options).unwrap(), Vec::<Json>::new());
    }

    #[test]
    fn a_bad_annotation_refuses_the_pod_with_the_reason() {
        let body = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": { "uid": "u2", "kind": { "group": "", "version": "v1", "kind": "Pod" },
                         "object": { "apiVersion": "v1", "kind": "Pod",
                                     "metadata": { "name": "p", "annotations": { "rampart.io/inject": "perhaps" } },
                                     "spec": { "containers": [ { "name": "app", "image": "x" } ] } } }
        });
        let answer = review(
            &serde_json::to_vec(&body).unwrap(),
            &InjectOptions::default(),
        )
        .unwrap();
        assert_eq!(answer["response"]["allowed"], json!(false));
        let message = answer["response"]["status"]["message"].as_str().unwrap();
        assert!(message.contains("rampart.io/inject"), "{message}");
    }
}
