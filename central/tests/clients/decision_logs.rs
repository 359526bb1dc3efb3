//! Decision-log shipping: entries reach a collector as gzipped JSON in
//! OPA's shape, and a slow or absent collector never grows the queue past
//! its bound (drops are counted) nor blocks the request path.

use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use rampart_authz::central::decision_log::EntryContext;
use rampart_authz::{Authorizer, ConnectionInfo, HttpProtocol, RequestInfo};
use rampart_central::decision_logs::{self, DecisionLogConfig, DecisionLogger};

/// A collector on loopback that answers each upload after `delay`, keeping
/// the decoded batches.
async fn collector(delay: Duration) -> (SocketAddr, Arc<Mutex<Vec<serde_json::Value>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let store = store.clone();
                        async move {
                            assert_eq!(req.headers()["content-encoding"], "gzip");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let mut json = String::new();
                            flate2::read::GzDecoder::new(&body[..])
                                .read_to_string(&mut json)
                                .unwrap();
                            tokio::time::sleep(delay).await;
                            let batch: Vec<serde_json::Value> =
                                serde_json::from_str(&json).unwrap();
                            store.lock().unwrap().extend(batch);
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::new(),
                            )))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, got)
}

fn config(url: String, max_queued: usize) -> DecisionLogConfig {
    DecisionLogConfig {
        max_queued,
        max_batch: 10,
        flush_interval: Duration::from_millis(20),
        timeout: Duration::from_millis(100),
        ..DecisionLogConfig::new(url.parse().unwrap())
    }
}

fn log_one(logger: &DecisionLogger, a: &Authorizer, path: &str) {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "authorization",
        http::HeaderValue::from_static("Bearer secret"),
    );
    headers.insert("x-request-id", http::HeaderValue::from_static("r-1"));
    let conn = ConnectionInfo::new(None, "127.0.0.1".parse().unwrap(), 8080);
    let req = RequestInfo {
        method: &http::Method::GET,
        authority: "app",
        path,
        raw_path_and_query: path,
        query: None,
        headers: &headers,
        protocol: HttpProtocol::Http11,
        scheme: "http",
        grpc_method: None,
        source: "127.0.0.1:40000".parse().unwrap(),
        destination: "127.0.0.1:8080".parse().unwrap(),
        local_identity: None,
        peer_cert_sha256: None,
    };
    let d = a.check_request(&conn, &req);
    logger.log(&conn, &req, &d);
}

fn context() -> EntryContext {
    let mut labels = serde_json::Map::new();
    labels.insert("id".into(), "sidecar-1".into());
    EntryContext {
        labels,
        redact: vec!["/input/attributes/request/http/headers/authorization".into()],
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn entries_reach_the_collector_in_opas_shape_with_redactions() {
    let (addr, got) = collector(Duration::ZERO).await;
    let (logger, task) =
        decision_logs::spawn(config(format!("http://{addr}/logs"), 100), context(), None);
    let a = Authorizer::default();
    log_one(&logger, &a, "/x");
    eventually("the entry", || !got.lock().unwrap().is_empty()).await;
    let e = got.lock().unwrap()[0].clone();
    assert_eq!(e["labels"]["id"], "sidecar-1");
    assert!(e.get("bundles").is_none(), "no bundle followed");
    assert_eq!(e["result"]["allowed"], false);
    assert_eq!(e["result"]["reason"], "no_policy");
    assert_eq!(e["input"]["attributes"]["request"]["http"]["path"], "/x");
    assert_eq!(
        e["input"]["attributes"]["request"]["http"]["headers"]["x-request-id"],
        "r-1"
    );
    assert!(
        e["input"]["attributes"]["request"]["http"]["headers"]
            .get("authorization")
            .is_none()
    );
    assert_eq!(
        e["erased"][0],
        "/input/attributes/request/http/headers/authorization"
    );
    assert!(e["decision_id"].as_str().is_some_and(|s| s.len() == 36));
    assert!(e["timestamp"].as_str().is_some_and(|s| s.ends_with('Z')));
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_absent_collector_keeps_the_queue_bounded_and_counts_drops() {
    let (slow, _) = collector(Duration::from_secs(30)).await;
    let absent = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    for (name, addr) in [("slow", slow), ("absent", absent)] {
        let capacity = 50;
        let (logger, task) = decision_logs::spawn(
            config(format!("http://{addr}/logs"), capacity),
            context(),
            None,
        );
        let a = Authorizer::default();
        let total = 2_000u64;
        for i in 0..total {
            log_one(&logger, &a, "/x");
            assert!(
                logger.queue().len() <= capacity,
                "{name}: bounded at push {i}"
            );
        }
        let q = logger.queue().clone();
        // Every entry is queued or dropped once the in-flight batch returns.
        eventually(name, || q.len() as u64 + q.dropped() == total).await;
        assert!(q.len() <= capacity, "{name}");
        assert!(
            q.dropped() >= total - capacity as u64,
            "{name}: {} dropped",
            q.dropped()
        );
        task.abort();
    }
}
