//! The bundle poller over https with mTLS: it authenticates with the
//! sidecar's SVID (the client configuration the identity store publishes)
//! and verifies the policy server's SPIFFE ID; without a usable client
//! configuration it gets nothing and no policy is in force.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use rampart_authz::central::bundle::{self, BundleOptions};
use rampart_central::bundle_poller::{self, BundleSource};
use rampart_central::http_fetch::ClientTlsProvider;
use rampart_identity::bundle::BundleSet;
use rampart_identity::ca::DevCa;
use rampart_identity::{IdMatcher, SpiffeId, TrustDomain};

const REGO: &str = "package envoy.authz\nallow if input.attributes.request.http.path == \"/ok\"\n";

/// A policy server that requires a client SVID from the trust domain.
async fn policy_server(ca: &DevCa, bundles: &BundleSet, body: Vec<u8>) -> SocketAddr {
    let id = SpiffeId::parse("spiffe://example.org/policy-server").unwrap();
    let svid = ca.issue(&id, Duration::from_secs(3600)).unwrap().svid;
    let td = TrustDomain::parse("example.org").unwrap();
    let cfg = rampart_identity::tls::server_config(
        &svid,
        bundles,
        Some(IdMatcher::trust_domains([td])),
        &[b"http/1.1".to_vec()],
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = Bytes::from(body);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let body = body.clone();
            tokio::spawn(async move {
                // A client without an acceptable SVID fails here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

fn source(addr: SocketAddr) -> BundleSource {
    BundleSource {
        poll_interval: Duration::from_millis(100),
        timeout: Duration::from_secs(2),
        ..BundleSource::new(
            format!("https://127.0.0.1:{}/b.tar.gz", addr.port())
                .parse()
                .unwrap(),
        )
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_are_fetched_over_mtls_with_the_sidecars_svid() {
    let td = TrustDomain::parse("example.org").unwrap();
    let ca = DevCa::generate(&td, Duration::from_secs(3600)).unwrap();
    let mut bundles = BundleSet::new();
    bundles.insert(ca.bundle().unwrap());
    let mut files = std::collections::BTreeMap::new();
    files.insert("p.rego".to_owned(), REGO.as_bytes().to_vec());
    files.insert(".manifest".to_owned(), br#"{"revision": "tls-1"}"#.to_vec());
    let addr = policy_server(&ca, &bundles, bundle::pack(&files)).await;

    let me = SpiffeId::parse("spiffe://example.org/ec-backend").unwrap();
    let svid = ca.issue(&me, Duration::from_secs(3600)).unwrap().svid;
    let server_id = SpiffeId::parse("spiffe://example.org/policy-server").unwrap();
    let client = rampart_identity::tls::client_config(
        &svid,
        &bundles,
        IdMatcher::ids([server_id]),
        &[b"http/1.1".to_vec()],
    )
    .unwrap();
    let tls: ClientTlsProvider = Arc::new(move || Some(client.clone()));
    let (h, task) = bundle_poller::spawn(source(addr), BundleOptions::default(), Some(tls), None);
    eventually("the bundle over mTLS", || {
        h.revision().as_deref() == Some("tls-1")
    })
    .await;
    task.abort();

    // No client configuration yet (no SVID): nothing is fetched.
    let none: ClientTlsProvider = Arc::new(|| None);
    let (h, task) = bundle_poller::spawn(source(addr), BundleOptions::default(), Some(none), None);
    eventually("the error", || h.status().last_error.is_some()).await;
    assert!(
        h.status()
            .last_error
            .unwrap()
            .contains("no TLS client configuration")
    );
    assert!(!h.has_policy());
    task.abort();

    // A client that expects another server identity refuses the server.
    let wrong = rampart_identity::tls::client_config(
        &svid,
        &bundles,
        IdMatcher::ids([SpiffeId::parse("spiffe://example.org/other").unwrap()]),
        &[b"http/1.1".to_vec()],
    )
    .unwrap();
    let tls: ClientTlsProvider = Arc::new(move || Some(wrong.clone()));
    let (h, task) = bundle_poller::spawn(source(addr), BundleOptions::default(), Some(tls), None);
    eventually("the handshake error", || h.status().last_error.is_some()).await;
    assert!(!h.has_policy());
    task.abort();
}
