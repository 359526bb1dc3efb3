//! `rampart policy import`: each upstream example imported, its policies
//! loaded, and the requests of the example decided as the source mesh
//! documents them (`tests/fixtures/import/README.md` names the sources).
//! One test per source counts its cases as issue 18 asks (cases, equal,
//! refused at load, different: must be 0), prints them and checks them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rampart_authz::import::{ImportOptions, Imported, Source, import};
use rampart_authz::{Authorizer, ConnectionInfo, Decision, Options};
use rampart_identity::SpiffeId;

use super::support::get;

/// The counts of one source's table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    /// Requests of the examples (decided, or refused at load).
    cases: usize,
    /// Decided as the source documents them.
    equal: usize,
    /// Not decided: the importer refused to print them, naming what the
    /// user must supply (a Service's addresses, a DNS-SAN opt-in) or what
    /// Rampart does not carry (UDP), so nothing wider is printed.
    refused: usize,
    /// Decided otherwise.
    different: usize,
}

/// One source's cases.
struct Table {
    source: &'static str,
    counts: Counts,
    different: Vec<String>,
}

impl Table {
    fn new(source: &'static str) -> Table {
        Table {
            source,
            counts: Counts::default(),
            different: Vec::new(),
        }
    }

    /// A request decided (`got`: allowed) where the source says `want`.
    fn case(&mut self, what: impl std::fmt::Display, got: bool, want: bool) {
        self.counts.cases += 1;
        if got == want {
            self.counts.equal += 1;
        } else {
            self.counts.different += 1;
            self.different
                .push(format!("{what}: allowed {got}, the source says {want}"));
        }
    }

    /// `n` requests of an example part the importer refused, which its
    /// report must name with `needle`.
    fn refused(&mut self, n: usize, i: &Imported, needle: &str) {
        let r = report(i);
        assert!(r.contains(needle), "the report names {needle:?}:\n{r}");
        self.counts.cases += n;
        self.counts.refused += n;
    }

    /// Prints the counts and checks them against `expected`.
    fn finish(self, expected: Counts) {
        let c = self.counts;
        println!(
            "{}: {} cases, {} equal, {} refused at load, {} different",
            self.source, c.cases, c.equal, c.refused, c.different
        );
        assert!(self.different.is_empty(), "{:#?}", self.different);
        assert_eq!(c, expected, "{}", self.source);
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/import")
        .join(name)
}

fn run(source: Source, file: &str, options: &ImportOptions) -> Imported {
    match import(source, &[fixture(file)], options) {
        Ok(i) => i,
        Err(e) => panic!("{file}: {e}"),
    }
}

/// The authorizer of one target's printed policy file.
fn authorizer(i: &Imported, workload: &str) -> Authorizer {
    let t = i
        .targets
        .iter()
        .find(|t| t.workload == workload)
        .unwrap_or_else(|| {
            panic!(
                "no target {workload}: {:?}",
                i.targets.iter().map(|t| &t.workload).collect::<Vec<_>>()
            )
        });
    let yaml = serde_yaml::to_string(&t.policies).unwrap();
    Authorizer::from_yaml("imported.yaml", &yaml, Path::new("/"), &Options::default()).unwrap()
}

fn report(i: &Imported) -> String {
    i.report.iter().map(|n| format!("{n}\n")).collect()
}

fn sa(ns: &str, name: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{name}")
}

#[test]
fn smi_examples_decide_as_the_smi_specification_documents() {
    let mut t = Table::new("SMI");
    smi_l7(&mut t);
    smi_l4(&mut t);
    smi_headers(&mut t);
    t.finish(Counts {
        cases: 28,
        equal: 26,
        refused: 2,
        different: 0,
    });
}

#[test]
fn osm_examples_decide_as_osm_documents() {
    let mut t = Table::new("OSM");
    osm_reading_of_smi_l7(&mut t);
    osm_ingress_backends(&mut t);
    t.finish(Counts {
        cases: 12,
        equal: 11,
        refused: 1,
        different: 0,
    });
}

#[test]
fn app_mesh_examples_decide_as_app_mesh_documents() {
    let mut t = Table::new("App Mesh");
    appmesh_san_pinning(&mut t);
    t.finish(Counts {
        cases: 6,
        equal: 5,
        refused: 1,
        different: 0,
    });
}

/// The SMI spec's L7 example and its table.
fn smi_l7(t: &mut Table) {
    let i = run(Source::Smi, "smi-l7.yaml", &ImportOptions::default());
    let a = authorizer(&i, "ServiceAccount default/api-service");
    let website = sa("default", "website-service");
    let payments = sa("default", "payments-service");
    let prometheus = sa("default", "prometheus");
    // (source, method, path, port, allowed): the spec's table, then what
    // it does not list.
    let cases = [
        (&website, "GET", "/api", 8080, true),
        (&website, "DELETE", "/api", 8080, true),
        (&payments, "POST", "/api", 8080, true),
        (&prometheus, "GET", "/metrics", 8080, true),
        (&prometheus, "POST", "/metrics", 8080, false),
        (&prometheus, "GET", "/api", 8080, false),
        (&website, "GET", "/metrics", 8080, false),
        // Anchored at the start only (the spec): /api/books is /api...
        (&website, "GET", "/api/books", 8080, true),
        // ... but the TCPRoute bounds the HTTP rules to its port.
        (&website, "GET", "/api", 9090, false),
        (&sa("default", "other"), "GET", "/api", 8080, false),
    ];
    for (who, m, path, port, want) in cases {
        let r = get(path).from(who).method(m).port(port);
        t.case(
            format_args!("smi-l7 {who} {m} {path} :{port}"),
            r.allowed(&a),
            want,
        );
    }
    // Unauthenticated callers and bare TCP connections never get through.
    t.case(
        "smi-l7 plaintext GET /api",
        get("/api").port(8080).allowed(&a),
        false,
    );
    let web = SpiffeId::parse(&website).unwrap();
    let conn = ConnectionInfo::new(Some(&web), "10.0.0.1".parse().unwrap(), 8080);
    t.case(
        "smi-l7 website TCP connection",
        matches!(a.check_connection(&conn), Decision::Allow(_)),
        false,
    );
    assert!(report(&i).contains("native regex path matcher anchored at the start"));
    assert!(!i.incomplete(), "{}", report(&i));
}

/// OSM reads the same example's `pathRegex` on the whole path.
fn osm_reading_of_smi_l7(t: &mut Table) {
    let website = sa("default", "website-service");
    let osm = run(Source::Osm, "smi-l7.yaml", &ImportOptions::default());
    let a = authorizer(&osm, "ServiceAccount default/api-service");
    t.case(
        "smi-l7 (OSM) website GET /api",
        get("/api").from(&website).allowed(&a),
        true,
    );
    t.case(
        "smi-l7 (OSM) website GET /api/books",
        get("/api/books").from(&website).allowed(&a),
        false,
    );
    assert!(report(&osm).contains("on the whole path"));
}

/// The L4 example: TCP ports admitted; its UDPRoute is not imported.
fn smi_l4(t: &mut Table) {
    let i = run(Source::Smi, "smi-l4.yaml", &ImportOptions::default());
    let a = authorizer(&i, "ServiceAccount default/server");
    let client = SpiffeId::parse(&sa("default", "client")).unwrap();
    let other = SpiffeId::parse(&sa("default", "other")).unwrap();
    for (who, port, want) in [
        (&client, 8301, true),
        (&client, 8300, true),
        (&client, 8303, false),
        (&other, 8301, false),
    ] {
        let conn = ConnectionInfo::new(Some(who), "10.0.0.1".parse().unwrap(), port);
        t.case(
            format_args!("smi-l4 {who} :{port}"),
            matches!(a.check_connection(&conn), Decision::Allow(_)),
            want,
        );
    }
    // UDP from the client on 8301 and 8302.
    t.refused(2, &i, "UDPRoute default/udp-ports: not imported");
    assert!(i.incomplete());
}

/// Header filters (SMI v1alpha4) and v1alpha2 groups.
fn smi_headers(t: &mut Table) {
    let i = run(Source::Smi, "smi-headers.yaml", &ImportOptions::default());
    let a = authorizer(&i, "ServiceAccount default/web");
    let gw = sa("default", "gateway");
    let android = "Mozilla/5.0 (Linux; Android 14)";
    let cases = [
        (
            "GET /x, Android, insider cookie",
            get("/x")
                .from(&gw)
                .header("user-agent", android)
                .header("cookie", "a=1;type=insider"),
            true,
        ),
        (
            "GET /x, Android, public cookie",
            get("/x")
                .from(&gw)
                .header("user-agent", android)
                .header("cookie", "type=public"),
            false,
        ),
        (
            "POST /x, Firefox",
            get("/x")
                .method("POST")
                .from(&gw)
                .header("user-agent", "Firefox/120"),
            true,
        ),
        (
            "HEAD /api/v1, iPhone",
            get("/api/v1")
                .method("HEAD")
                .from(&gw)
                .header("user-agent", "iPhone"),
            true,
        ),
        (
            "POST /api/v1, iPhone",
            get("/api/v1")
                .method("POST")
                .from(&gw)
                .header("user-agent", "iPhone"),
            false,
        ),
        (
            "GET /x, curl",
            get("/x").from(&gw).header("user-agent", "curl"),
            false,
        ),
    ];
    for (what, r, want) in cases {
        t.case(format_args!("smi-headers {what}"), r.allowed(&a), want);
    }

    let b = authorizer(&i, "ServiceAccount bookstore/bookstore");
    let buyer = sa("bookbuyer", "bookbuyer");
    let cases = [
        (
            "bookbuyer GET /books-bought",
            get("/books-bought").from(&buyer),
            true,
        ),
        (
            "bookbuyer GET /buy-a-book/new",
            get("/buy-a-book/new").from(&buyer),
            true,
        ),
        (
            "bookbuyer POST /books-bought",
            get("/books-bought").method("POST").from(&buyer),
            false,
        ),
        (
            "bookstore GET /books-bought",
            get("/books-bought").from(&sa("bookstore", "bookstore")),
            false,
        ),
    ];
    for (what, r, want) in cases {
        t.case(format_args!("smi-headers {what}"), r.allowed(&b), want);
    }
}

/// OSM's IngressBackend: IP ranges, `kind: Service` sources resolved
/// through `--address`, the ingress's DNS-SAN certificate.
fn osm_ingress_backends(t: &mut Table) {
    // Without the Service's addresses the http backend is not imported:
    // only the IPRange backend admits anything.
    let bare = run(Source::Osm, "osm-ingress.yaml", &ImportOptions::default());
    let r = report(&bare);
    assert!(
        r.contains("--allow-dns-san ingress-nginx.ingress-nginx.cluster.local"),
        "{r}"
    );
    // The ingress controller's pods on 14001, not imported without them.
    t.refused(
        1,
        &bare,
        "--address ingress-nginx/ingress-nginx-controller=CIDR",
    );
    let a = authorizer(&bare, "Service httpbin/httpbin");
    t.case(
        "osm-ingress (no addresses) IPRange source :14001",
        get("/get").source("10.1.2.3").port(14001).allowed(&a),
        true,
    );
    t.case(
        "osm-ingress (no addresses) other source :14001",
        get("/get").source("192.168.1.9").port(14001).allowed(&a),
        false,
    );
    t.case(
        "osm-ingress (no addresses) IPRange source :14443",
        get("/get").source("10.1.2.3").port(14443).allowed(&a),
        false,
    );

    let options = ImportOptions {
        addresses: BTreeMap::from([(
            "ingress-nginx/ingress-nginx-controller".to_owned(),
            vec!["192.168.1.0/28".parse().unwrap()],
        )]),
        dns_san_identities: vec!["ingress-nginx.ingress-nginx.cluster.local".into()],
        ..ImportOptions::default()
    };
    let i = run(Source::Osm, "osm-ingress.yaml", &options);
    let a = authorizer(&i, "Service httpbin/httpbin");
    // http: plaintext from the Service's pods (or the IPRange).
    t.case(
        "osm-ingress controller pod :14001",
        get("/get").source("192.168.1.9").port(14001).allowed(&a),
        true,
    );
    t.case(
        "osm-ingress other pod :14001",
        get("/get").source("192.168.1.99").port(14001).allowed(&a),
        false,
    );
    // https: the ingress's DNS-SAN certificate, and from the Service's pods.
    let ingress = get("/get")
        .port(14443)
        .with_dns_san("ingress-nginx.ingress-nginx.cluster.local");
    t.case(
        "osm-ingress ingress certificate from a controller pod :14443",
        ingress.clone().source("192.168.1.9").allowed(&a),
        true,
    );
    t.case(
        "osm-ingress ingress certificate from another pod :14443",
        ingress.clone().source("192.168.1.99").allowed(&a),
        false,
    );
    t.case(
        "osm-ingress another DNS name :14443",
        get("/get")
            .port(14443)
            .source("192.168.1.9")
            .with_dns_san("other.example")
            .allowed(&a),
        false,
    );
    t.case(
        "osm-ingress plaintext :14443",
        get("/get").port(14443).source("192.168.1.9").allowed(&a),
        false,
    );
    // The ports the sidecar needs: plaintext on 14001, DNS-SAN clients on 14443.
    let cfg = &i
        .targets
        .iter()
        .find(|t| t.workload == "Service httpbin/httpbin")
        .unwrap()
        .config;
    let ports = cfg["inbound"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 2, "{ports:?}");
    assert!(
        ports
            .iter()
            .any(|p| p["port"] == 14001 && p["mode"] == "permissive")
    );
    assert!(ports.iter().any(|p| p["port"] == 14443
        && p["mode"] == "strict"
        && p["allow_dns_san_clients"] == true));
    assert!(!i.incomplete(), "{}", report(&i));
}

/// App Mesh's mTLS SDS walkthrough: listener validation and backend
/// client policies.
fn appmesh_san_pinning(t: &mut Table) {
    let options = ImportOptions {
        addresses: BTreeMap::from([(
            "howto-k8s-mtls-sds-based/green".to_owned(),
            vec!["10.100.0.0/16".parse().unwrap()],
        )]),
        ..ImportOptions::default()
    };
    let i = run(Source::AppMesh, "appmesh-mtls.yaml", &options);
    let front = "spiffe://howto-k8s-mtls-sds-based.aws/front";
    // blue's STRICT listener: only front.
    let blue = authorizer(&i, "VirtualNode howto-k8s-mtls-sds-based/blue");
    t.case(
        "appmesh-mtls front to blue :8080",
        get("/").from(front).port(8080).allowed(&blue),
        true,
    );
    t.case(
        "appmesh-mtls colorred to blue :8080",
        get("/")
            .from("spiffe://howto-k8s-mtls-sds-based.aws/colorred")
            .port(8080)
            .allowed(&blue),
        false,
    );
    t.case(
        "appmesh-mtls plaintext to blue :8080",
        get("/").port(8080).allowed(&blue),
        false,
    );
    // red's PERMISSIVE listener admits plaintext; its DNS-SAN listener
    // needs the opt-in, so without it port 9080 admits nothing.
    let red = authorizer(&i, "VirtualNode howto-k8s-mtls-sds-based/red");
    t.case(
        "appmesh-mtls plaintext to red :8080",
        get("/").port(8080).allowed(&red),
        true,
    );
    let dns_peer = |port| ConnectionInfo::new(None, "10.0.0.1".parse().unwrap(), port);
    let names = vec!["front.howto-k8s-mtls-sds-based.svc.cluster.local".to_owned()];
    assert!(matches!(
        red.check_connection(&dns_peer(9080).with_peer_dns(&names)),
        Decision::Deny(_)
    ));
    // front's DNS-SAN certificate on red's 9080: not imported without the
    // opt-in.
    t.refused(
        1,
        &i,
        "--allow-dns-san front.howto-k8s-mtls-sds-based.svc.cluster.local",
    );
    // front's client policies: the green backend's addresses must present
    // exactly its pinned ID, then the defaults (color has no policy of its
    // own) for every other backend.
    let f = &i
        .targets
        .iter()
        .find(|t| t.workload == "VirtualNode howto-k8s-mtls-sds-based/front")
        .unwrap()
        .config;
    let servers = f["outbound"]["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2, "{servers:?}");
    assert_eq!(servers[0]["cidrs"], serde_json::json!(["10.100.0.0/16"]));
    assert_eq!(
        servers[0]["identities"],
        serde_json::json!(["spiffe://howto-k8s-mtls-sds-based.aws/colorgreen"])
    );
    assert_eq!(servers[0]["ports"], serde_json::json!([8080]));
    assert_eq!(
        servers[1]["identities"],
        serde_json::json!([
            "spiffe://howto-k8s-mtls-sds-based.aws/colorblue",
            "spiffe://howto-k8s-mtls-sds-based.aws/colorred"
        ])
    );
    assert!(servers[1].get("cidrs").is_none());

    // Opted in by name, the DNS-SAN client is admitted on 9080.
    let opted = ImportOptions {
        dns_san_identities: names.clone(),
        ..options
    };
    let i = run(Source::AppMesh, "appmesh-mtls.yaml", &opted);
    let red = authorizer(&i, "VirtualNode howto-k8s-mtls-sds-based/red");
    t.case(
        "appmesh-mtls front's DNS-SAN certificate to red :9080 (opted in)",
        matches!(
            red.check_connection(&dns_peer(9080).with_peer_dns(&names)),
            Decision::Allow(_)
        ),
        true,
    );
    let r = &i
        .targets
        .iter()
        .find(|t| t.workload == "VirtualNode howto-k8s-mtls-sds-based/red")
        .unwrap()
        .config;
    assert!(
        r["inbound"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == 9080
                && p["allow_dns_san_clients"] == true
                && p["protocol"] == "opaque")
    );
}

#[test]
fn bad_sources_are_refused_with_the_object_and_field() {
    let dir = std::env::temp_dir().join(format!("rampart-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.yaml");
    std::fs::write(
        &f,
        "kind: HTTPRouteGroup\nmetadata: {name: g}\nspec:\n  matches:\n  - name: m\n    pathRegex: '/a('\n---\nkind: TrafficTarget\nmetadata: {name: t}\nspec:\n  destination: {kind: ServiceAccount, name: d}\n  rules: [{kind: HTTPRouteGroup, name: g}]\n  sources: [{kind: ServiceAccount, name: s}]\n",
    )
    .unwrap();
    let e = import(
        Source::Smi,
        std::slice::from_ref(&f),
        &ImportOptions::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("pathRegex") && e.to_string().contains("invalid path regex"),
        "{e}"
    );
    std::fs::write(
        &f,
        "kind: TrafficTarget\nmetadata: {name: t}\nspec:\n  destinaton: {}\n",
    )
    .unwrap();
    let e = import(
        Source::Smi,
        std::slice::from_ref(&f),
        &ImportOptions::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("TrafficTarget default/t") && e.to_string().contains("destinaton"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn istio_resources_are_checked_and_kept_as_they_are() {
    let dir = std::env::temp_dir().join(format!("rampart-import-istio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("authz.yaml");
    // Istio's "HTTP traffic" task: GET from the bookinfo product page.
    std::fs::write(
        &f,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: get-only, namespace: foo}\nspec:\n  selector: {matchLabels: {app: httpbin}}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]\n    to: [{operation: {methods: [GET]}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: other, namespace: bar}\nspec: {}\n",
    )
    .unwrap();
    let options = ImportOptions {
        istio_namespace: Some("foo".into()),
        istio_labels: BTreeMap::from([("app".to_owned(), "httpbin".to_owned())]),
        ..ImportOptions::default()
    };
    let i = import(Source::Istio, std::slice::from_ref(&f), &options).unwrap();
    let istio = &i.targets[0].config["inbound"]["istio"];
    assert_eq!(istio["namespace"], "foo");
    assert_eq!(istio["labels"]["app"], "httpbin");
    let r = report(&i);
    assert!(
        r.contains("AuthorizationPolicy foo/get-only: mapped"),
        "{r}"
    );
    assert!(
        r.contains("AuthorizationPolicy bar/other: not imported"),
        "{r}"
    );
    // The workload's namespace is required; a field Istio lacks is refused.
    assert!(
        import(
            Source::Istio,
            std::slice::from_ref(&f),
            &ImportOptions::default()
        )
        .is_err()
    );
    std::fs::write(&f, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: foo}\nspec: {rulez: []}\n").unwrap();
    let e = import(Source::Istio, std::slice::from_ref(&f), &options).unwrap_err();
    assert!(e.to_string().contains("rulez"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn appmesh_dns_san_backends_are_pinned_by_name_only_when_opted_in() {
    let color = "color.howto-k8s-mtls-file-based.svc.cluster.local";
    let addresses = BTreeMap::from([(
        "howto-k8s-mtls-file-based/color".to_owned(),
        vec!["10.100.0.0/16".parse().unwrap()],
    )]);
    let servers = |i: &Imported| {
        i.targets
            .iter()
            .find(|t| t.workload == "VirtualNode howto-k8s-mtls-file-based/front")
            .unwrap()
            .config["outbound"]["servers"]
            .clone()
    };
    // Without the opt-in: the SPIFFE SAN only, the DNS SAN reported.
    let plain = ImportOptions {
        addresses: addresses.clone(),
        ..ImportOptions::default()
    };
    let i = run(Source::AppMesh, "appmesh-dns-backend.yaml", &plain);
    let s = servers(&i);
    assert_eq!(
        s[0]["identities"],
        serde_json::json!(["spiffe://howto-k8s-mtls-file-based.aws/color"])
    );
    assert!(s[0].get("allow_dns_san_servers").is_none(), "{s:?}");
    assert!(report(&i).contains(&format!("--allow-dns-san {color}")));
    assert!(i.incomplete(), "a left-out SAN is reported");
    // Opted in by name: the DNS SAN is an accepted server name too.
    let opted = ImportOptions {
        addresses,
        dns_san_identities: vec![color.to_owned()],
        ..ImportOptions::default()
    };
    let i = run(Source::AppMesh, "appmesh-dns-backend.yaml", &opted);
    let s = servers(&i);
    assert_eq!(s[0]["allow_dns_san_servers"], serde_json::json!([color]));
    assert_eq!(s[0]["cidrs"], serde_json::json!(["10.100.0.0/16"]));
    assert_eq!(s[0]["ports"], serde_json::json!([8080]));
    assert!(!i.incomplete(), "{}", report(&i));
}
