//! The image for real, with podman: the Dockerfile builds (target
//! `prebuilt`, on a Debian base made locally with debootstrap), and in two
//! podman pods (containers sharing one network namespace, as in Kubernetes)
//! the init container installs the capture rules and the sidecar, running
//! as UID 2102, carries an app's traffic over mTLS to the other pod.
//!
//! Ignored unless asked for (`--include-ignored`, as `.ci/run` does), as root,
//! with podman, runc and debootstrap installed (it fails without them). The
//! base image's rootfs is cached under /var/tmp/rampart-ci.
//! Addresses: 10.213.250.0/24, a podman network of the test's own (see
//! tests/README.md).

use std::borrow::BorrowMut;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rampart_app::config::{Config, IdentityConfig, PortConfig};
use rampart_proxy::config::{ServerRule, TransparentConfig};
use rampart_testkit::pki::parse_id;

const BASE_IMAGE: &str = "localhost/rampart-ci/debian:bookworm";
const SUBNET: &str = "10.213.250.0/24";
const SERVER_IP: &str = "10.213.250.10";
const CLIENT_IP: &str = "10.213.250.11";
const OUTSIDER_IP: &str = "10.213.250.12";
const APP_PORT: u16 = 8080;
const PROXY_UID: u32 = 2102;
const NAME_PREFIX: &str = "rampart-ci-";

#[test]
#[ignore = "needs root, podman, runc and debootstrap (.ci/run installs them; a cold run builds a base image)"]
fn init_and_sidecar_carry_an_apps_traffic_in_podman_pods() {
    let started = Instant::now();
    assert!(
        is_root(),
        "the container test needs root (podman with netavark)"
    );
    sweep_leftovers();
    let run = Run::new();

    // The base image (cached), then the Dockerfile's `prebuilt` target with
    // this build's binary as the whole build context.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/container/base-image.sh");
    sh_ok(Command::new("bash").arg(&script).arg(BASE_IMAGE));
    let context = tempfile::tempdir().unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_rampart"),
        context.path().join("rampart"),
    )
    .unwrap();
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile");
    sh_ok(
        podman(&["build", "-q", "--target", "prebuilt", "--build-arg"])
            .arg(format!("RUNTIME_IMAGE={BASE_IMAGE}"))
            .arg("-f")
            .arg(&dockerfile)
            .args(["-t", &run.image])
            .arg(context.path()),
    );
    eprintln!("image built after {:?}", started.elapsed());

    // A PKI made with the real CLI; the sidecar (UID 2102) owns its key.
    let pki = tempfile::tempdir().unwrap();
    let ca = pki.path().join("ca");
    rampart_ok(&["ca", "init", "--dir", ca.to_str().unwrap()]);
    for (name, peer) in [("server", "client"), ("client", "server")] {
        let dir = pki.path().join(name);
        let id = format!("spiffe://example.org/{name}");
        rampart_ok(&[
            "ca",
            "issue",
            "--dir",
            ca.to_str().unwrap(),
            "--spiffe-id",
            &id,
            "--out",
            dir.to_str().unwrap(),
        ]);
        let peer = parse_id(&format!("spiffe://example.org/{peer}"));
        let mut config = Config::new(IdentityConfig::files_in(Path::new("/etc/rampart")));
        config.admin.address = SocketAddr::from(([0, 0, 0, 0], 15000));
        config.transparent = Some(TransparentConfig::default());
        config.inbound.ports.push(PortConfig {
            allowed_peers: Some(vec![peer.clone()]),
            ..PortConfig::new(APP_PORT)
        });
        config.outbound.servers.push(ServerRule {
            cidrs: vec![SUBNET.parse().unwrap()],
            ports: Vec::new(),
            identities: vec![peer],
            trust_domains: Vec::new(),
            allow_dns_san_servers: Vec::new(),
        });
        std::fs::write(dir.join("config.yaml"), config.to_yaml()).unwrap();
        for file in ["", "svid.pem", "svid.key", "bundle.pem", "config.yaml"] {
            std::os::unix::fs::chown(dir.join(file), Some(PROXY_UID), Some(PROXY_UID)).unwrap();
        }
    }

    sh_ok(podman(&[
        "network",
        "create",
        "--subnet",
        SUBNET,
        &run.network,
    ]));
    let server = run.pod("server", SERVER_IP);
    let client = run.pod("client", CLIENT_IP);
    let outsider = run.pod("outsider", OUTSIDER_IP);
    for pod in [&server, &client] {
        // The init container as injected: root with NET_ADMIN and NET_RAW
        // only, read-only root.
        sh_ok(podman(&[
            "run",
            "--rm",
            "--pod",
            pod,
            "--user",
            "0",
            "--read-only",
            "--cap-drop",
            "ALL",
            "--cap-add",
            "NET_ADMIN",
            "--cap-add",
            "NET_RAW",
            &run.image,
            "init",
        ]));
        // The sidecar: the image's own user, no capabilities, read-only root.
        let svid = pki.path().join(pod.trim_start_matches(&run.prefix));
        sh_ok(
            podman(&[
                "run",
                "-d",
                "--pod",
                pod,
                "--name",
                &format!("{pod}-proxy"),
                "--read-only",
                "--cap-drop",
                "ALL",
                "-v",
            ])
            .arg(format!("{}:/etc/rampart:ro", svid.display()))
            .args([&run.image, "run", "--config", "/etc/rampart/config.yaml"]),
        );
    }
    let server_app = format!("{server}-app");
    sh_ok(podman(&[
        "run",
        "-d",
        "--pod",
        &server,
        "--name",
        &server_app,
        "--user",
        "1000",
        BASE_IMAGE,
        "python3",
        "-c",
        SERVER_APP,
    ]));
    for (pod, ip) in [(&server, SERVER_IP), (&client, CLIENT_IP)] {
        wait_ready(ip, &format!("{pod}-proxy"));
    }
    let proxy_user = sh_ok(podman(&["top", &format!("{client}-proxy"), "huser"]));
    assert!(
        proxy_user
            .lines()
            .skip(1)
            .all(|u| u.trim() == PROXY_UID.to_string()),
        "sidecar runs as: {proxy_user}"
    );

    // The app in the client pod dials the server pod's IP, knowing nothing
    // of the mesh; the server app sees the connection come from its own
    // sidecar (127.0.0.1), so both sidecars carried it.
    let reply = call(&client, SERVER_IP);
    assert_eq!(reply.trim(), "hello from 127.0.0.1: ping", "{}", run.logs());
    // A pod without a sidecar is refused: the server's listener is STRICT.
    let refused = call(&outsider, SERVER_IP);
    assert!(
        !refused.contains("hello"),
        "plaintext reached the app: {refused}"
    );
    eprintln!("done after {:?}", started.elapsed());
}

/// The server app: answers `hello from <peer ip>: <line>`.
const SERVER_APP: &str = "
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 8080)); s.listen(16)
while True:
    c, a = s.accept()
    line = c.makefile().readline().strip()
    c.sendall(('hello from %s: %s\\n' % (a[0], line)).encode()); c.close()
";

/// The client app: sends `ping`, prints the answer, or the error.
const CLIENT_APP: &str = "
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], 8080), timeout=5)
    c.sendall(b'ping\\n'); print(c.makefile().readline().strip())
except Exception as e:
    print('error: %r' % e)
";

/// One test run's podman objects, removed on drop (also on panic).
struct Run {
    prefix: String,
    image: String,
    network: String,
    pods: std::cell::RefCell<Vec<String>>,
}

impl Run {
    fn new() -> Run {
        let prefix = format!("{NAME_PREFIX}{}-", std::process::id());
        Run {
            image: format!("localhost/{prefix}rampart:test"),
            network: format!("{prefix}net"),
            prefix,
            pods: Default::default(),
        }
    }

    fn pod(&self, name: &str, ip: &str) -> String {
        let pod = format!("{}{name}", self.prefix);
        sh_ok(podman(&[
            "pod",
            "create",
            "--name",
            &pod,
            "--network",
            &self.network,
            "--ip",
            ip,
        ]));
        self.pods.borrow_mut().push(pod.clone());
        pod
    }

    fn logs(&self) -> String {
        let mut logs = String::new();
        for pod in self.pods.borrow().iter() {
            for ctr in [format!("{pod}-proxy"), format!("{pod}-app")] {
                if let Ok(out) = podman(&["logs", &ctr]).output() {
                    logs += &format!(
                        "--- {ctr}\n{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        logs
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        for pod in self.pods.borrow().iter() {
            let _ = podman(&["pod", "rm", "-f", "-t", "0", pod]).output();
        }
        let _ = podman(&["network", "rm", "-f", &self.network]).output();
        let _ = podman(&["rmi", "-f", &self.image]).output();
    }
}

/// Removes pods and networks of earlier runs whose process is gone.
fn sweep_leftovers() {
    for what in [["pod", "ls"], ["network", "ls"]] {
        let Ok(out) = podman(&[what[0], what[1], "--format", "{{.Name}}"]).output() else {
            continue;
        };
        for name in String::from_utf8_lossy(&out.stdout).lines() {
            let pid = name
                .strip_prefix(NAME_PREFIX)
                .and_then(|rest| rest.split('-').next());
            let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = podman(&[what[0], "rm", "-f", name]).output();
            }
        }
    }
}

fn call(pod: &str, ip: &str) -> String {
    let out = podman(&[
        "run", "--rm", "--pod", pod, "--user", "1000", BASE_IMAGE, "python3", "-c", CLIENT_APP, ip,
    ])
    .output()
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls the sidecar's `/ready` through its pod IP (the admin port is never captured).
fn wait_ready(ip: &str, container: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if http_get(ip, 15000, "/ready").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs = podman(&["logs", container]).output().unwrap();
    panic!(
        "{container} not ready:\n{}",
        String::from_utf8_lossy(&logs.stderr)
    );
}

fn http_get(ip: &str, port: u16, path: &str) -> Option<String> {
    let addr = format!("{ip}:{port}").parse().ok()?;
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).ok()?;
    Some(text)
}

fn podman(args: &[&str]) -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(args);
    cmd
}

fn rampart_ok(args: &[&str]) {
    sh_ok(Command::new(env!("CARGO_BIN_EXE_rampart")).args(args));
}

/// Runs a command that must succeed; returns its stdout.
fn sh_ok(mut cmd: impl BorrowMut<Command>) -> String {
    let cmd = cmd.borrow_mut();
    let out: Output = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}
