//! RequestAuthentication keys from an `https://` jwksUri: the server is
//! verified against the configured CA certificates (WebPKI, the address in
//! its certificate); a server the CA did not sign gets no request, and the
//! cache keeps nothing from it.

use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http_body_util::Full;
use rampart_authz::jwt::JwksCache;
use rampart_central::jwks;
use rampart_testkit::kube::TestCa;
use rustls_pki_types::pem::PemObject as _;

const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

/// An https server with a certificate for 127.0.0.1 from `ca`.
async fn jwks_server(ca: &TestCa, dir: &Path) -> SocketAddr {
    let files = ca.issue(dir, "jwks", &["127.0.0.1"], None);
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&files.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&files.key).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(JWKS.as_bytes()),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_jwks_are_fetched_from_a_server_the_configured_ca_signed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("jwks-ca");
    let addr = jwks_server(&ca, dir.path()).await;
    let uri = format!("https://127.0.0.1:{}/jwks.json", addr.port());

    // A client trusting another CA refuses the server: nothing is cached.
    let other = TestCa::new("other-ca");
    let other_ca = other.write_cert(&dir.path().join("other.pem"));
    let wrong = jwks::https_client(&other_ca).unwrap();
    let cache = JwksCache::default();
    let e = jwks::refresh_once(&uri, &cache, Some(&wrong))
        .await
        .unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    assert!(cache.get(&uri).is_none());
    // Without a TLS client an https URI is an error too.
    assert!(jwks::refresh_once(&uri, &cache, None).await.is_err());

    let ca_file = ca.write_cert(&dir.path().join("ca.pem"));
    let client = jwks::https_client(&ca_file).unwrap();
    jwks::refresh_once(&uri, &cache, Some(&client))
        .await
        .unwrap();
    assert!(cache.get(&uri).is_some());

    // A CA file without a certificate is a configuration error.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no certificates here\n").unwrap();
    let e = jwks::https_client(&empty).err().unwrap();
    assert!(e.contains("no CA certificate"), "{e}");
}
