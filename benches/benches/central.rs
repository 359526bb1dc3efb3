//! What a CUSTOM policy costs: the same allowed request decided in-process
//! (native policies only) and through an ext_authz round trip to a gRPC
//! server on loopback, measured in the same run. Both go through
//! `Authorizer::authorize_request` on a current-thread runtime, so the
//! difference is the hop (encode, HTTP/2 on loopback, decode).

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use rampart_authz::model::ProviderName;
use rampart_authz::{Authorizer, ConnectionInfo, HttpProtocol, Options, RequestInfo};
use rampart_central::ext_authz::{ExtAuthzClients, ProviderConfig};
use rampart_central::pb;
use rampart_identity::SpiffeId;

const POLICY: &str = r#"
policies:
  - name: mesh
    action: ALLOW
    rules:
      - from: { principals: ["spiffe://example.org/ec-web"] }
        to: { methods: [GET] }
  - name: central
    action: CUSTOM
    provider: opa
    rules:
      - to: { paths: ["/custom/*"] }
"#;

/// An authorizer that allows everything, adding one header.
struct AllowAll;

#[tonic::async_trait]
impl pb::authorization_server::Authorization for AllowAll {
    async fn check(
        &self,
        _request: tonic::Request<pb::CheckRequest>,
    ) -> Result<tonic::Response<pb::CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::CheckResponse {
            status: Some(pb::Status::default()),
            http_response: Some(pb::check_response::HttpResponse::OkResponse(
                pb::OkHttpResponse {
                    headers: vec![pb::HeaderValueOption {
                        header: Some(pb::HeaderValue {
                            key: "x-checked".into(),
                            value: "yes".into(),
                            raw_value: Vec::new(),
                        }),
                        append: None,
                        append_action: 0,
                    }],
                    ..Default::default()
                },
            )),
        }))
    }
}

fn custom_vs_native(c: &mut Criterion) {
    // The server runs on its own runtime thread, as a separate process would.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    server_rt.spawn(tonic::transport::Server::builder().serve_with_incoming(
        pb::authorization_server::AuthorizationServer::new(AllowAll),
        tokio_stream::wrappers::TcpListenerStream::new(listener),
    ));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let clients = rt.block_on(async {
        ExtAuthzClients::new(vec![ProviderConfig {
            name: ProviderName::try_from("opa".to_owned()).unwrap(),
            endpoint: format!("http://{addr}").parse().unwrap(),
            timeout: Duration::from_secs(1),
            failure_mode_allow_i_understand_the_risk: false,
        }])
        .unwrap()
    });
    let authz =
        Authorizer::from_yaml("bench.yaml", POLICY, Path::new("."), &Options::default()).unwrap();
    let peer = SpiffeId::parse("spiffe://example.org/ec-web").unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("x-request-id", http::HeaderValue::from_static("r-1"));
    headers.insert("user-agent", http::HeaderValue::from_static("bench"));
    let conn = ConnectionInfo::new(Some(&peer), "10.0.0.1".parse().unwrap(), 8080);
    let request = |path: &'static str| RequestInfo {
        method: &http::Method::GET,
        authority: "ec-backend",
        path,
        raw_path_and_query: path,
        query: None,
        headers: &headers,
        protocol: HttpProtocol::Http11,
        scheme: "https",
        grpc_method: None,
        source: "10.0.0.1:40000".parse().unwrap(),
        destination: "10.0.0.2:8080".parse().unwrap(),
        local_identity: None,
        peer_cert_sha256: None,
    };
    let native = request("/data");
    let custom = request("/custom/data");
    // Warm the connection, and check both paths decide as intended.
    let d = rt.block_on(authz.authorize_request(&conn, &custom, &clients));
    assert!(d.is_allowed(), "{}", d.explain());
    assert!(matches!(&d, rampart_authz::Decision::Allow(p) if p.consulted().is_some()));

    let mut g = c.benchmark_group("custom_vs_native");
    g.bench_function("native_in_process", |b| {
        b.iter(|| {
            let d = rt.block_on(authz.authorize_request(&conn, black_box(&native), &clients));
            black_box(d.is_allowed())
        })
    });
    g.bench_function("custom_ext_authz_loopback", |b| {
        b.iter(|| {
            let d = rt.block_on(authz.authorize_request(&conn, black_box(&custom), &clients));
            black_box(d.is_allowed())
        })
    });
    g.finish();
}

criterion_group!(benches, custom_vs_native);
criterion_main!(benches);
