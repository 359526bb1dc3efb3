//! An ext_authz server (Envoy's `envoy.service.auth.v3.Authorization/Check`
//! over gRPC, served by tonic on a loopback port) whose answer is chosen by
//! the request path, covering every answer Envoy distinguishes:
//!
//! | path | answer |
//! |---|---|
//! | `/allow` | OK |
//! | `/headers` | OK; sets `x-user: alice`, appends `x-tag: b`, removes `authorization`, adds `x-checked: yes` to the response |
//! | `/deny` | PERMISSION_DENIED with status 418, body `no tea for you`, header `x-why: policy` |
//! | `/deny-bare` | PERMISSION_DENIED, no HTTP response |
//! | `/hang...` | answers after 30 s (past any timeout) |
//! | `/error` | a gRPC INTERNAL error |
//! | anything else | OK with an invalid header name (malformed) |
//!
//! Used by `tests/` and `central/tests/`.

// Each test binary uses part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rampart_central::pb;

/// The server; what it answers is chosen by the request path.
#[derive(Default, Clone)]
pub struct Server {
    /// Every CheckRequest received, in order.
    pub seen: Arc<Mutex<Vec<pb::CheckRequest>>>,
}

/// A header for a `CheckResponse`; `append` as the proto's `BoolValue`.
pub fn hv(key: &str, value: &str, append: Option<bool>) -> pb::HeaderValueOption {
    pb::HeaderValueOption {
        header: Some(pb::HeaderValue {
            key: key.into(),
            value: value.into(),
            raw_value: Vec::new(),
        }),
        append: append.map(|value| pb::BoolValue { value }),
        append_action: 0,
    }
}

#[tonic::async_trait]
impl pb::authorization_server::Authorization for Server {
    async fn check(
        &self,
        request: tonic::Request<pb::CheckRequest>,
    ) -> Result<tonic::Response<pb::CheckResponse>, tonic::Status> {
        let req = request.into_inner();
        let path = req
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .map(|h| h.path.clone())
            .unwrap_or_default();
        self.seen.lock().unwrap().push(req);
        let ok = |http_response| pb::CheckResponse {
            status: Some(pb::Status {
                code: 0,
                message: String::new(),
            }),
            http_response,
        };
        // The request target as forwarded: the path, then any query.
        let path = path.split('?').next().unwrap_or("").to_owned();
        let resp = match path.as_str() {
            "/allow" => ok(None),
            "/headers" => ok(Some(pb::check_response::HttpResponse::OkResponse(
                pb::OkHttpResponse {
                    headers: vec![hv("x-user", "alice", None), hv("x-tag", "b", Some(true))],
                    headers_to_remove: vec!["authorization".into()],
                    response_headers_to_add: vec![hv("x-checked", "yes", None)],
                },
            ))),
            "/deny" => pb::CheckResponse {
                status: Some(pb::Status {
                    code: 7,
                    message: "no".into(),
                }),
                http_response: Some(pb::check_response::HttpResponse::DeniedResponse(
                    pb::DeniedHttpResponse {
                        status: Some(pb::HttpStatus { code: 418 }),
                        headers: vec![hv("x-why", "policy", None)],
                        body: "no tea for you".into(),
                    },
                )),
            },
            "/deny-bare" => pb::CheckResponse {
                status: Some(pb::Status {
                    code: 7,
                    message: String::new(),
                }),
                http_response: None,
            },
            p if p.starts_with("/hang") => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                ok(None)
            }
            "/error" => return Err(tonic::Status::internal("boom")),
            _ => ok(Some(pb::check_response::HttpResponse::OkResponse(
                pb::OkHttpResponse {
                    headers: vec![hv("bad header", "x", None)],
                    ..Default::default()
                },
            ))),
        };
        Ok(tonic::Response::new(resp))
    }
}

/// Serves on a fresh loopback port from the current runtime.
pub async fn start_server() -> (SocketAddr, Server) {
    let server = Server::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = pb::authorization_server::AuthorizationServer::new(server.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .serve_with_incoming(
                svc,
                tokio_stream::wrappers::TcpListenerStream::new(listener),
            )
            .await
            .unwrap();
    });
    (addr, server)
}
