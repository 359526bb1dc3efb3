//! Policy reloads and live HTTP connections (issue 19, item 7): a
//! keep-alive connection (HTTP/1.1 or HTTP/2) whose peer the reloaded
//! policies allow no request on its port is closed after its in-flight
//! requests, logged and counted; one whose peer is still allowed stays open,
//! and its requests are decided with the new policies.

use crate::observability::{eventually, get, sample, write_atomically};
use crate::support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rampart_app::config::PortConfig;
use rampart_proxy::config::{DeclaredProtocol, TlsMode};
use support::apps;
use support::sidecar::{
    LocalProc, Loopback, free_addr, inbound_listener_as, outbound_listener, wait_listening,
};

const BACKEND: &str = "spiffe://example.org/ec-backend";
const WEB: &str = "spiffe://example.org/ec-web";
const NEWS: &str = "spiffe://example.org/news-web";
const REVOKED_HTTP: &str = "rampart_authz_connections_revoked_total{protocol=\"http\"}";
const INBOUND_OPENED: &str = "rampart_tcp_connections_opened_total{direction=\"inbound\"}";

/// An ALLOW policy: each (principal, paths) pair may GET those paths
/// (`None`: any path).
fn allow(rules: &[(&str, Option<&str>)]) -> String {
    let mut s = String::from("policies:\n  - name: backend\n    action: ALLOW\n    rules:\n");
    for (i, (who, path)) in rules.iter().enumerate() {
        let to = match path {
            Some(p) => format!("{{methods: [GET], paths: [\"{p}\"]}}"),
            None => "{methods: [GET]}".to_owned(),
        };
        s.push_str(&format!(
            "      - name: r{i}\n        from: {{principals: [\"{who}\"]}}\n        to: {to}\n"
        ));
    }
    s
}

/// `count` GETs of `path` through an outbound sidecar, one every
/// `every`, on one HTTP/2 connection (prior knowledge, so that the
/// sidecar-to-sidecar connection is HTTP/2 too) for as long as it lasts,
/// then on a new one, as a client's pool would. Each request's status
/// (0: failed) and the number of connections used.
fn h2_series(out: SocketAddr, path: &str, count: usize, every: Duration) -> (Vec<u16>, usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let connect = || async {
            let tcp = tokio::net::TcpStream::connect(out).await.unwrap();
            let (send, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tcp),
            )
            .await
            .expect("HTTP/2 handshake");
            tokio::spawn(conn);
            send
        };
        let mut send = connect().await;
        let mut connections = 1;
        let mut statuses = Vec::new();
        for _ in 0..count {
            tokio::time::sleep(every).await;
            if send.ready().await.is_err() {
                send = connect().await;
                connections += 1;
            }
            let req = http::Request::get(format!("http://{out}{path}"))
                .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                .unwrap();
            let status = match send.send_request(req).await {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            };
            statuses.push(status);
        }
        (statuses, connections)
    })
}

#[test]
fn a_reload_closes_the_connections_of_a_refused_peer_and_keeps_the_others() {
    let pki = Loopback::new();
    let app_addr = free_addr();
    let _app = LocalProc::spawn(
        &apps::http_app(app_addr.port(), "ec-backend"),
        pki.dir.path(),
        "app",
    );
    wait_listening(app_addr);
    let policy = pki.dir.path().join("policy.yaml");
    std::fs::write(&policy, allow(&[(WEB, None), (NEWS, None)])).unwrap();
    let inbound = free_addr();
    let backend = pki.sidecar_with(BACKEND, |c| {
        c.listeners
            .push(inbound_listener_as("in", inbound, app_addr, 18302));
        c.inbound.policies = vec![policy.clone()];
        // The app speaks HTTP/1.1 whatever the caller's sidecar sends.
        c.inbound.ports = vec![PortConfig {
            protocol: DeclaredProtocol::Http,
            ..PortConfig::new(18302)
        }];
    });
    let (web_out, news_out) = (free_addr(), free_addr());
    let _web = pki.sidecar_with(WEB, |c| {
        c.listeners
            .push(outbound_listener("out", web_out, inbound, BACKEND));
    });
    let _news = pki.sidecar_with(NEWS, |c| {
        c.listeners
            .push(outbound_listener("out", news_out, inbound, BACKEND));
    });

    // Each caller's sidecar holds a pooled HTTP/1.1 connection to the
    // backend; ec-web also carries a client's HTTP/2 connection, which
    // keeps asking (4 requests a second) across the reload.
    assert_eq!(get(web_out, "/data", &[]).0, 200, "{}", backend.logs());
    assert_eq!(get(news_out, "/other", &[]).0, 200, "{}", backend.logs());
    let h2 =
        std::thread::spawn(move || h2_series(web_out, "/data", 16, Duration::from_millis(250)));
    assert!(
        eventually(Duration::from_secs(10), || sample(
            &backend.metrics(),
            INBOUND_OPENED
        ) == 3.0),
        "the HTTP/2 connection did not open:\n{}",
        backend.logs()
    );
    std::thread::sleep(Duration::from_millis(600));

    // The reload refuses ec-web everything, and news-web all but /data.
    write_atomically(&policy, &allow(&[(NEWS, Some("/data"))]));
    assert!(
        eventually(Duration::from_secs(10), || sample(
            &backend.metrics(),
            REVOKED_HTTP
        ) == 2.0),
        "ec-web's two connections were not revoked:\n{}",
        backend.logs()
    );
    let logs = backend.logs();
    let revoked: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("connection revoked by a policy reload"))
        .collect();
    assert_eq!(revoked.len(), 2, "{logs}");
    assert!(
        revoked
            .iter()
            .all(|l| l.contains(WEB) && l.contains("protocol=\"http\"")),
        "{revoked:#?}"
    );
    // The HTTP/2 client's requests: allowed until the reload, refused
    // after it (on a new connection), none lost at the switch.
    let (statuses, connections) = h2.join().unwrap();
    assert_eq!(statuses.len(), 16, "{statuses:?}");
    let switch = statuses.iter().position(|s| *s != 200).unwrap_or(16);
    assert!(
        (2..16).contains(&switch),
        "200s, then 403s: {statuses:?}\n{}",
        backend.logs()
    );
    assert_eq!(connections, 2, "the client was sent away once");
    assert!(
        statuses[switch..].iter().all(|s| *s == 403),
        "{statuses:?}\n{}",
        backend.logs()
    );

    // news-web's connection stayed open: its requests reuse it, decided
    // with the new policies.
    let opened = sample(&backend.metrics(), INBOUND_OPENED);
    assert_eq!(get(news_out, "/data", &[]).0, 200, "{}", backend.logs());
    assert_eq!(get(news_out, "/other", &[]).0, 403, "{}", backend.logs());
    let m = backend.metrics();
    assert_eq!(sample(&m, INBOUND_OPENED), opened, "news-web reconnected");
    assert_eq!(sample(&m, REVOKED_HTTP), 2.0, "news-web's was revoked");

    // ec-web reconnects and is refused per request.
    let (status, body) = get(web_out, "/data", &[]);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains(BACKEND),
        "the refusal names the backend: {body}"
    );
}

/// One plaintext HTTP/1.1 connection to `to` from `source` (a loopback
/// address of its own, so that policies can tell clients apart).
fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    s.connect_timeout(&to.into(), Duration::from_secs(2))
        .unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// A response read off a keep-alive connection: its status and head.
struct Response {
    status: u16,
    head: String,
}

/// Sends `GET path` on `conn` and reads one response (Content-Length body).
fn exchange(conn: &mut TcpStream, path: &str) -> Response {
    write!(conn, "GET {path} HTTP/1.1\r\nHost: backend\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = conn.read(&mut byte).expect("read the response head");
        assert_eq!(n, 1, "connection closed mid-head: {buf:?}");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).expect("read the body");
    Response { status, head }
}

/// Whether the peer closed `conn` (EOF) within `within`.
fn closed_within(conn: &mut TcpStream, within: Duration) -> bool {
    conn.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 1];
    matches!(conn.read(&mut b), Ok(0))
}

#[test]
fn a_revoked_keep_alive_connection_finishes_its_request_in_flight_then_closes() {
    let pki = Loopback::new();
    let app_addr = free_addr();
    let _app = LocalProc::spawn(
        &apps::http_app(app_addr.port(), "ec-backend"),
        pki.dir.path(),
        "app",
    );
    wait_listening(app_addr);
    // Plaintext clients told apart by source address.
    let by_source = |cidrs: &str, paths: &str| {
        format!(
            "policies:\n  - name: local\n    action: ALLOW\n    rules:\n      - name: sources\n        from: {{unauthenticated: true, source_cidrs: [{cidrs}]}}\n        to: {{methods: [GET]{paths}}}\n"
        )
    };
    let policy = pki.dir.path().join("policy.yaml");
    std::fs::write(&policy, by_source("127.0.0.2/32, 127.0.0.3/32", "")).unwrap();
    let plain = free_addr();
    let backend = pki.sidecar_with(BACKEND, |c| {
        c.listeners
            .push(inbound_listener_as("p", plain, app_addr, 18301));
        c.inbound.policies = vec![policy.clone()];
        c.inbound.ports = vec![PortConfig {
            mode: TlsMode::PermissiveAllowPlaintext,
            ..PortConfig::new(18301)
        }];
    });

    let mut refused = connect_from([127, 0, 0, 2], plain);
    let mut kept = connect_from([127, 0, 0, 3], plain);
    assert_eq!(exchange(&mut refused, "/data").status, 200);
    assert_eq!(exchange(&mut kept, "/other").status, 200);

    // A request in flight on the connection to be revoked (the app answers
    // /slow after 3 s) while the policy changes under it.
    write!(refused, "GET /slow HTTP/1.1\r\nHost: backend\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    write_atomically(&policy, &by_source("127.0.0.3/32", ", paths: [\"/data\"]"));
    assert!(
        eventually(Duration::from_secs(10), || sample(
            &backend.metrics(),
            REVOKED_HTTP
        ) == 1.0),
        "not revoked:\n{}",
        backend.logs()
    );
    // The request in flight is answered in full, with `connection: close`,
    // and then the connection closes.
    let started = Instant::now();
    let mut head = Vec::new();
    refused
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    refused
        .read_to_end(&mut head)
        .expect("the response, then EOF");
    let text = String::from_utf8_lossy(&head);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after the answer"
    );

    // The other connection is still open, and decided by the new policy.
    assert_eq!(exchange(&mut kept, "/data").status, 200);
    let r = exchange(&mut kept, "/other");
    assert_eq!(r.status, 403, "{}", r.head);
    assert_eq!(exchange(&mut kept, "/data").status, 200);
    assert!(!closed_within(&mut kept, Duration::from_millis(300)));
    assert_eq!(sample(&backend.metrics(), REVOKED_HTTP), 1.0);
    // A new connection from the refused source is refused per request.
    let mut again = connect_from([127, 0, 0, 2], plain);
    assert_eq!(exchange(&mut again, "/data").status, 403);
}
