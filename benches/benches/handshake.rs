//! mTLS handshakes between two SPIFFE sidecars, in memory (no sockets):
//! TLS 1.3 with the configurations the identity store builds, full and
//! resumed. Throughput is reported in handshakes per second.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rampart_identity::bundle::BundleSet;
use rampart_identity::ca::DevCa;
use rampart_identity::{IdMatcher, SpiffeId, TrustDomain, tls};
use rustls::client::Resumption;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use rustls_pki_types::ServerName;

fn configs() -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let td = TrustDomain::parse("example.org").expect("valid trust domain");
    let ca = DevCa::generate(&td, Duration::from_secs(3600)).expect("CA");
    let mut bundles = BundleSet::new();
    bundles.insert(ca.bundle().expect("bundle"));
    let svid = |p: &str| {
        ca.issue(
            &SpiffeId::parse(p).expect("valid ID"),
            Duration::from_secs(3600),
        )
        .expect("SVID")
        .svid
    };
    let server = svid("spiffe://example.org/server");
    let client = svid("spiffe://example.org/client");
    let expected = IdMatcher::ids([server.id().clone()]);
    let allowed = IdMatcher::ids([client.id().clone()]);
    let c = tls::client_config(&client, &bundles, expected, &[]).expect("client config");
    let s = tls::server_config(&server, &bundles, Some(allowed), &[]).expect("server config");
    (c, s)
}

/// Moves records between the two ends until neither has anything to say.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) {
    let name = ServerName::try_from("10.0.0.1").expect("valid name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client");
    let mut s = ServerConnection::new(server.clone()).expect("server");
    let mut buf = Vec::with_capacity(8192);
    loop {
        let mut moved = false;
        while c.wants_write() {
            buf.clear();
            c.write_tls(&mut buf).expect("client write");
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).expect("server read");
                s.process_new_packets().expect("server accepts");
            }
            moved = true;
        }
        while s.wants_write() {
            buf.clear();
            s.write_tls(&mut buf).expect("server write");
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).expect("client read");
                c.process_new_packets().expect("client accepts");
            }
            moved = true;
        }
        if !moved {
            break;
        }
    }
    assert!(
        !c.is_handshaking() && !s.is_handshaking(),
        "handshake stalled"
    );
}

fn bench(cr: &mut Criterion) {
    let (client, server) = configs();
    let mut full = (*client).clone();
    full.resumption = Resumption::disabled();
    let full = Arc::new(full);

    let mut g = cr.benchmark_group("mtls_handshake");
    g.throughput(Throughput::Elements(1));
    g.bench_function("full", |b| b.iter(|| handshake(&full, &server)));
    // Prime the client's ticket cache; each resumed handshake gets new tickets.
    handshake(&client, &server);
    g.bench_function("resumed", |b| b.iter(|| handshake(&client, &server)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
