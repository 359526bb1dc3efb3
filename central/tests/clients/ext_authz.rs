//! The ext_authz client against a real gRPC server on loopback: each answer
//! the server can give maps to what Envoy would deliver.

use std::net::SocketAddr;
use std::time::Duration;

use rampart_authz::external::{CheckAttributes, Evaluation, ProviderFailure, ProviderVerdict};
use rampart_authz::model::ProviderName;
use rampart_authz::{Decision, DenyReason};
use rampart_central::ext_authz::{ExtAuthzClients, ProviderConfig};
use rampart_central::pb;

use rampart_testkit::ext_authz::start_server;

fn clients(addr: SocketAddr, fail_open: bool) -> ExtAuthzClients {
    ExtAuthzClients::new(vec![ProviderConfig {
        name: ProviderName::try_from("opa".to_owned()).unwrap(),
        endpoint: format!("http://{addr}").parse().unwrap(),
        timeout: Duration::from_millis(300),
        failure_mode_allow_i_understand_the_risk: fail_open,
    }])
    .unwrap()
}

fn attributes(path: &str) -> CheckAttributes {
    CheckAttributes {
        source: "10.0.0.1:40000".parse().unwrap(),
        source_principal: Some("spiffe://example.org/ec-web".into()),
        destination: "10.0.0.2:8080".parse().unwrap(),
        destination_principal: Some("spiffe://example.org/ec-backend".into()),
        id: "req-1".into(),
        method: "GET".into(),
        headers: vec![
            (":path".into(), path.into()),
            ("accept".into(), "a,b".into()),
        ],
        path: path.into(),
        host: "ec-backend".into(),
        scheme: "https".into(),
        protocol: "HTTP/1.1".into(),
    }
}

fn header(n: &'static str, v: &'static str) -> (http::HeaderName, http::HeaderValue) {
    (
        http::HeaderName::from_static(n),
        http::HeaderValue::from_static(v),
    )
}

#[tokio::test]
async fn each_answer_maps_to_what_envoy_delivers() {
    let (addr, server) = start_server().await;
    let c = clients(addr, false);
    let opa = ProviderName::try_from("opa".to_owned()).unwrap();

    let v = c.check_attributes(&opa, attributes("/allow")).await;
    assert_eq!(v, ProviderVerdict::Allowed(Default::default()));

    match c.check_attributes(&opa, attributes("/headers")).await {
        ProviderVerdict::Allowed(e) => {
            assert_eq!(
                e.headers,
                vec![header("x-user", "alice")],
                "append unset: overwrite"
            );
            assert_eq!(e.request_headers_to_append, vec![header("x-tag", "b")]);
            assert_eq!(
                e.request_headers_to_remove,
                vec![http::header::AUTHORIZATION]
            );
            assert_eq!(e.response_headers_to_add, vec![header("x-checked", "yes")]);
        }
        other => panic!("headers: {other:?}"),
    }

    match c.check_attributes(&opa, attributes("/deny")).await {
        ProviderVerdict::Denied(r) => {
            assert_eq!(r.status, http::StatusCode::IM_A_TEAPOT);
            assert_eq!(r.body, "no tea for you");
            assert_eq!(r.headers, vec![header("x-why", "policy")]);
        }
        other => panic!("deny: {other:?}"),
    }
    match c.check_attributes(&opa, attributes("/deny-bare")).await {
        ProviderVerdict::Denied(r) => assert_eq!(r.status, http::StatusCode::FORBIDDEN),
        other => panic!("deny-bare: {other:?}"),
    }

    let start = std::time::Instant::now();
    let v = c.check_attributes(&opa, attributes("/hang")).await;
    assert_eq!(v, ProviderVerdict::Failed(ProviderFailure::Timeout));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the timeout bounds the wait"
    );

    assert!(matches!(
        c.check_attributes(&opa, attributes("/error")).await,
        ProviderVerdict::Failed(ProviderFailure::Unavailable(_))
    ));
    assert!(matches!(
        c.check_attributes(&opa, attributes("/bad-header")).await,
        ProviderVerdict::Failed(ProviderFailure::Malformed(_))
    ));
    let other = ProviderName::try_from("other".to_owned()).unwrap();
    assert_eq!(
        c.check_attributes(&other, attributes("/allow")).await,
        ProviderVerdict::Failed(ProviderFailure::UnknownProvider)
    );

    // The server saw Envoy's CheckRequest attributes.
    let seen = server.seen.lock().unwrap();
    let a = seen[0].attributes.as_ref().unwrap();
    let src = a.source.as_ref().unwrap();
    assert_eq!(src.principal, "spiffe://example.org/ec-web");
    match src.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(pb::address::Address::SocketAddress(s)) => {
            assert_eq!(s.address, "10.0.0.1");
            assert_eq!(
                s.port_specifier,
                Some(pb::socket_address::PortSpecifier::PortValue(40000))
            );
        }
        None => panic!("no source address"),
    }
    assert_eq!(
        a.destination.as_ref().unwrap().principal,
        "spiffe://example.org/ec-backend"
    );
    let h = a.request.as_ref().unwrap().http.as_ref().unwrap();
    assert_eq!(
        (h.method.as_str(), h.path.as_str(), h.host.as_str()),
        ("GET", "/allow", "ec-backend")
    );
    assert_eq!(
        (h.protocol.as_str(), h.id.as_str(), h.size),
        ("HTTP/1.1", "req-1", -1)
    );
    assert_eq!(h.headers.get("accept").map(String::as_str), Some("a,b"));
}

#[tokio::test]
async fn failures_refuse_unless_explicitly_configured_to_fail_open() {
    // Nothing listens on this port.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let opa = ProviderName::try_from("opa".to_owned()).unwrap();
    assert!(matches!(
        clients(dead, false)
            .check_attributes(&opa, attributes("/allow"))
            .await,
        ProviderVerdict::Failed(_)
    ));
    assert_eq!(
        clients(dead, true)
            .check_attributes(&opa, attributes("/allow"))
            .await,
        ProviderVerdict::Allowed(Default::default())
    );
}

#[tokio::test]
async fn a_custom_policy_end_to_end_through_the_authorizer() {
    let (addr, _server) = start_server().await;
    let c = clients(addr, false);
    let a = rampart_authz::Authorizer::from_yaml(
        "t.yaml",
        "policies:\n  - name: mesh\n    action: ALLOW\n    rules: [{ from: { principals: [\"*\"] } }]\n  - name: central\n    action: CUSTOM\n    provider: opa\n    rules: [{ to: { paths: [\"/deny\", \"/headers\"] } }]\n",
        std::path::Path::new("."),
        &rampart_authz::Options::default(),
    )
    .unwrap();
    let id = rampart_identity::SpiffeId::parse("spiffe://example.org/ec-web").unwrap();
    let conn = rampart_authz::ConnectionInfo::new(Some(&id), "10.0.0.1".parse().unwrap(), 8080);
    let headers = http::HeaderMap::new();
    let decide = |path: &'static str| {
        let a = a.clone();
        let c = c.clone();
        let headers = headers.clone();
        async move {
            let req = rampart_authz::RequestInfo {
                method: &http::Method::GET,
                authority: "ec-backend",
                path,
                raw_path_and_query: path,
                query: None,
                headers: &headers,
                protocol: rampart_authz::HttpProtocol::Http11,
                scheme: "https",
                grpc_method: None,
                source: "10.0.0.1:40000".parse().unwrap(),
                destination: "10.0.0.2:8080".parse().unwrap(),
                local_identity: None,
                peer_cert_sha256: None,
            };
            assert!(matches!(
                a.evaluate_request(&conn, &req),
                Evaluation::Consult(_) | Evaluation::Decided(_)
            ));
            let fut = a.authorize_request(&conn, &req, &c);
            // The proxy awaits this inside spawned connection tasks.
            fn assert_send<T: Send>(t: T) -> T {
                t
            }
            assert_send(fut).await
        }
    };
    match decide("/deny").await {
        Decision::Deny(d) => {
            assert_eq!(d.reason, DenyReason::ProviderDenied);
            assert_eq!(d.http_status(), http::StatusCode::IM_A_TEAPOT);
        }
        Decision::Allow(_) => panic!("allowed"),
    }
    match decide("/headers").await {
        Decision::Allow(p) => {
            assert_eq!(p.consulted().map(ProviderName::as_str), Some("opa"));
            assert_eq!(
                p.effects().unwrap().headers,
                vec![header("x-user", "alice")]
            );
        }
        Decision::Deny(d) => panic!("denied: {}", d.explain()),
    }
    // Not matched by the CUSTOM rule: no hop, allowed in-process.
    assert!(decide("/other").await.is_allowed());
}
