//! Tiny apps to run inside pods, as python3 scripts (standard library
//! only): each function returns the command line to pass to
//! [`Pod::spawn`](super::Pod::spawn) or [`Pod::exec`](super::Pod::exec).

use std::net::SocketAddr;
use std::path::Path;

/// An echo server: every connection gets back what it sent, until EOF.
pub fn echo_server(port: u16) -> Vec<String> {
    script(ECHO, [port.to_string(), String::new()])
}

/// A server-speaks-first server: sends `banner` on accept, then echoes.
pub fn banner_server(port: u16, banner: &str) -> Vec<String> {
    script(ECHO, [port.to_string(), banner.to_owned()])
}

/// A server that answers each connection with one line,
/// `port=<port it accepted on> orig=<ip:port from SO_ORIGINAL_DST, or ->`,
/// then reads until EOF and closes: it shows where a redirect sent a
/// connection.
pub fn whoami_server(ports: &[u16]) -> Vec<String> {
    script(WHOAMI, ports.iter().map(u16::to_string))
}

/// A client: connects to `addr`, sends `payload`, half-closes, prints all
/// it receives until EOF to stdout; exits 1 (with the reason on stderr)
/// when the connection fails or stalls for 5 seconds.
pub fn client(addr: SocketAddr, payload: &str) -> Vec<String> {
    script(
        CLIENT,
        [
            addr.ip().to_string(),
            addr.port().to_string(),
            payload.to_owned(),
        ],
    )
}

/// A TLS client: connects to `addr` and starts a handshake (no
/// certificate checks: it only has to put a real ClientHello on the wire);
/// prints `handshake ok` or the failure, and always exits 0.
pub fn tls_client(addr: SocketAddr) -> Vec<String> {
    script(TLS_CLIENT, [addr.ip().to_string(), addr.port().to_string()])
}

/// An HTTP/1.1 app named `name` (keep-alive): `GET /data` answers
/// `Hi <name> client!`, `/slow` answers after 3 s and `/pause` after 0.5 s,
/// `POST` reads the body (Content-Length or chunked) and answers its length
/// and SHA-256; every answer carries the path and `x-forwarded-client-cert`
/// it received as `x-app-path` and `x-app-xfcc` (and `traceparent`, `b3`,
/// `x-request-id` as `x-app-<name>`, `-` when absent). Prints `<METHOD> <path>`
/// per request.
pub fn http_app(port: u16, name: &str) -> Vec<String> {
    script(HTTP_APP, [port.to_string(), name.to_owned()])
}

/// The python3 the apps run with: the system one when there is one, since
/// a per-user install (pyenv under /root) is not reachable by other UIDs.
pub fn python() -> Option<String> {
    if Path::new("/usr/bin/python3").is_file() {
        return Some("/usr/bin/python3".to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("python3"))
        .find(|candidate| candidate.is_file())
        .map(|found| found.to_string_lossy().into_owned())
}

fn script(source: &str, args: impl IntoIterator<Item = String>) -> Vec<String> {
    let python = python().expect("python3 is installed (checked by require_root)");
    [python, "-u".to_owned(), "-c".to_owned(), source.to_owned()]
        .into_iter()
        .chain(args)
        .collect()
}

const ECHO: &str = r#"
import socket, sys, threading
port, banner = int(sys.argv[1]), sys.argv[2].encode()
def serve(conn):
    with conn:
        if banner:
            conn.sendall(banner)
        while data := conn.recv(65536):
            conn.sendall(data)
srv = socket.create_server(("0.0.0.0", port), reuse_port=False, backlog=128)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

const WHOAMI: &str = r#"
import socket, struct, sys, threading
SO_ORIGINAL_DST = 80
def orig_dst(conn):
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return "-"
    port, = struct.unpack("!H", raw[2:4])
    return "%s:%d" % (socket.inet_ntoa(raw[4:8]), port)
def serve(port):
    srv = socket.create_server(("0.0.0.0", port), backlog=128)
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(("port=%d orig=%s\n" % (port, orig_dst(conn))).encode())
            conn.shutdown(socket.SHUT_WR)
            # Read what the client sent: closing with unread data resets.
            conn.settimeout(5)
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass
threads = [threading.Thread(target=serve, args=(int(p),), daemon=True) for p in sys.argv[1:]]
for t in threads:
    t.start()
for t in threads:
    t.join()
"#;

const CLIENT: &str = r#"
import socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
try:
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        while data := conn.recv(65536):
            sys.stdout.buffer.write(data)
except OSError as e:
    sys.exit("client: %s:%d: %s" % (host, port, e))
"#;

const TLS_CLIENT: &str = r#"
import socket, ssl, sys
host, port = sys.argv[1], int(sys.argv[2])
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
try:
    with socket.create_connection((host, port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            print("handshake ok")
except (OSError, ssl.SSLError) as e:
    print("handshake failed: %s" % e)
"#;

const HTTP_APP: &str = r#"
import hashlib, sys, time
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
port, name = int(sys.argv[1]), sys.argv[2]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def reply(self, body):
        print(self.command, self.path, flush=True)
        b = body.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(b)))
        self.send_header("x-app-path", self.path)
        self.send_header("x-app-xfcc", self.headers.get("x-forwarded-client-cert", "-"))
        for h in ("traceparent", "b3", "x-request-id"):
            self.send_header("x-app-" + h, self.headers.get(h, "-"))
        self.end_headers()
        self.wfile.write(b)
    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(3)
        if self.path.startswith("/pause"):
            time.sleep(0.5)
        self.reply(f"Hi {name} client!" if self.path == "/data" else f"{name} {self.path}")
    def do_POST(self):
        h, total = hashlib.sha256(), 0
        if "chunked" in self.headers.get("transfer-encoding", ""):
            while size := int(self.rfile.readline().split(b";")[0], 16):
                data = self.rfile.read(size)
                self.rfile.readline()
                h.update(data)
                total += size
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
        else:
            left = int(self.headers.get("content-length", "0"))
            while left:
                chunk = self.rfile.read(min(left, 65536))
                if not chunk:
                    break
                h.update(chunk)
                total += len(chunk)
                left -= len(chunk)
        self.reply(f"{total} {h.hexdigest()}")
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

/// Whether the python3 the apps run with has grpcio.
pub fn has_grpcio() -> bool {
    python().is_some_and(|py| {
        std::process::Command::new(py)
            .args(["-c", "import grpc"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// A gRPC server (grpcio, generic handlers, raw bytes): `/demo.Greeter/Hello`
/// and `/demo.Greeter/Secret` answer `hello <request>`.
pub fn grpc_server(port: u16) -> Vec<String> {
    script(GRPC_SERVER, [port.to_string()])
}

/// A gRPC client: calls `method` (e.g. `/demo.Greeter/Hello`) at `addr`
/// with `world`; prints `OK <reply>` or `ERR <status code name> <details>`.
pub fn grpc_client(addr: SocketAddr, method: &str) -> Vec<String> {
    script(GRPC_CLIENT, [addr.to_string(), method.to_owned()])
}

const GRPC_SERVER: &str = r#"
import sys, time
from concurrent import futures
import grpc
def hello(req, ctx):
    return b"hello " + req
handlers = {m: grpc.unary_unary_rpc_method_handler(hello) for m in ("Hello", "Secret")}
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Greeter", handlers),))
server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
server.start()
server.wait_for_termination()
"#;

const GRPC_CLIENT: &str = r#"
import sys
import grpc
with grpc.insecure_channel(sys.argv[1]) as ch:
    try:
        reply = ch.unary_unary(sys.argv[2])(b"world", timeout=10)
        print("OK", reply.decode())
    except grpc.RpcError as e:
        print("ERR", e.code().name, e.details())
"#;
