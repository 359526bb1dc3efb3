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
/// `x-request-id`, `x-user`, `x-tag`, `authorization` as `x-app-<name>`,
/// repeated fields joined with `,`, `-` when absent). Prints `<METHOD> <path>`
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
    # Head and body are two writes: without this, Nagle and the client's
    # delayed ACK hold the body back ~40 ms on keep-alive connections.
    disable_nagle_algorithm = True
    def log_message(self, *a):
        pass
    def reply(self, body):
        print(self.command, self.path, flush=True)
        b = body.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(b)))
        self.send_header("x-app-path", self.path)
        self.send_header("x-app-xfcc", self.headers.get("x-forwarded-client-cert", "-"))
        for h in ("traceparent", "b3", "x-request-id", "x-user", "x-tag", "authorization"):
            self.send_header("x-app-" + h, ",".join(self.headers.get_all(h, [])) or "-")
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
/// and `/demo.Greeter/Secret` answer `hello <request>`; `Whoami` answers the
/// `x-forwarded-client-cert` it received (`-` when absent); `Fail` fails
/// with NOT_FOUND; `Count` and `SecretCount` stream `1..=<request>` with
/// trailer `x-trailer: counted` and initial metadata `x-meta-seen` (the
/// caller's `x-meta`); `CountFail` streams two messages, then fails with
/// RESOURCE_EXHAUSTED; `Chat` and `SecretChat` answer each message with
/// `re:<message>`, trailer `x-trailer: chatted`.
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
def count(req, ctx):
    seen = dict(ctx.invocation_metadata()).get("x-meta", "-")
    ctx.send_initial_metadata((("x-meta-seen", seen),))
    for i in range(1, int(req) + 1):
        yield str(i).encode()
    ctx.set_trailing_metadata((("x-trailer", "counted"),))
def count_fail(req, ctx):
    yield b"1"
    yield b"2"
    ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota gone")
def chat(reqs, ctx):
    for r in reqs:
        yield b"re:" + r
    ctx.set_trailing_metadata((("x-trailer", "chatted"),))
def fail(req, ctx):
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such greeting")
def whoami(req, ctx):
    return dict(ctx.invocation_metadata()).get("x-forwarded-client-cert", "-").encode()
handlers = {m: grpc.unary_unary_rpc_method_handler(hello) for m in ("Hello", "Secret")}
handlers["Fail"] = grpc.unary_unary_rpc_method_handler(fail)
handlers["Whoami"] = grpc.unary_unary_rpc_method_handler(whoami)
for m in ("Count", "SecretCount"):
    handlers[m] = grpc.unary_stream_rpc_method_handler(count)
handlers["CountFail"] = grpc.unary_stream_rpc_method_handler(count_fail)
for m in ("Chat", "SecretChat"):
    handlers[m] = grpc.stream_stream_rpc_method_handler(chat)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
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

/// A gRPC client for every call shape: `kind` is `unary`, `server`
/// (server-streaming) or `bidi`; `messages` are the request messages (one
/// for `unary` and `server`). It sends metadata `x-meta: from-client`; a
/// bidi call sends each message only after the reply to the previous one
/// (so nothing may be buffered to the end of a stream). Prints `MSG <reply>`
/// per reply, then `STATUS <code name> <details>`, `INITIAL <key> <value>`
/// and `TRAILER <key> <value>` lines.
pub fn grpc_call(addr: SocketAddr, method: &str, kind: &str, messages: &[&str]) -> Vec<String> {
    script(
        GRPC_CALL,
        [addr.to_string(), method.to_owned(), kind.to_owned()]
            .into_iter()
            .chain(messages.iter().map(|m| (*m).to_owned())),
    )
}

const GRPC_CALL: &str = r#"
import queue, sys
import grpc
addr, method, kind = sys.argv[1], sys.argv[2], sys.argv[3]
msgs = [m.encode() for m in sys.argv[4:]]
md = (("x-meta", "from-client"),)
replied = queue.Queue()
def ping_pong():
    for m in msgs:
        yield m
        replied.get(timeout=10)
with grpc.insecure_channel(addr) as ch:
    try:
        if kind == "unary":
            reply, call = ch.unary_unary(method).with_call(msgs[0], timeout=10, metadata=md)
            print("MSG", reply.decode())
        else:
            if kind == "server":
                call = ch.unary_stream(method)(msgs[0], timeout=10, metadata=md)
            else:
                call = ch.stream_stream(method)(ping_pong(), timeout=10, metadata=md)
            for r in call:
                print("MSG", r.decode(), flush=True)
                replied.put(1)
        code, details = call.code(), call.details()
    except grpc.RpcError as e:
        call, code, details = e, e.code(), e.details()
    print("STATUS", code.name, details or "")
    for k, v in call.initial_metadata() or ():
        print("INITIAL", k, v)
    for k, v in call.trailing_metadata() or ():
        print("TRAILER", k, v)
"#;

/// A raw-socket HTTP/1.1 app for tunnels (one request per connection),
/// printing `<request line> xfcc=<x-forwarded-client-cert or ->` for each:
/// - an RFC 6455 WebSocket upgrade gets 101; each masked frame it receives
///   is answered `echo:<payload>`, and after the client half-closes, one
///   last frame `bye`, then it closes;
/// - `CONNECT <target>` gets 200, as a proxy would; then, if the client
///   sends an HTTP request inside, it answers `tunneled to <target>: <its
///   request line>`; otherwise it echoes bytes until the client
///   half-closes, then sends `<eof:<target>>` and closes;
/// - anything else gets 200 `plain`.
pub fn tunnel_app(port: u16) -> Vec<String> {
    script(TUNNEL_APP, [port.to_string()])
}

const TUNNEL_APP: &str = r#"
import base64, hashlib, socket, sys, threading
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
class Conn:
    def __init__(self, sock):
        self.sock, self.buf = sock, b""
    def fill(self):
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)
    def until(self, sep):
        while sep not in self.buf:
            if not self.fill():
                return None
        out, self.buf = self.buf.split(sep, 1)
        return out
    def take(self, n):
        while len(self.buf) < n:
            if not self.fill():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out
def frame(payload, opcode=1):
    n = len(payload)
    size = bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big")
    return bytes([0x80 | opcode]) + size + payload
def websocket(c, headers):
    key = headers.get("sec-websocket-key", "").encode()
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
    c.sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Accept: %s\r\n\r\n" % accept).encode())
    while True:
        head = c.take(2)
        if head is None:
            c.sock.sendall(frame(b"bye"))
            return
        n = head[1] & 0x7F
        if n == 126:
            n = int.from_bytes(c.take(2), "big")
        mask = c.take(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(c.take(n)))
        if head[0] & 0x0F == 8:
            c.sock.sendall(frame(payload, 8))
            return
        c.sock.sendall(frame(b"echo:" + payload))
def connect(c, target):
    c.sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    while len(c.buf) < 4 and c.fill():
        pass
    if c.buf.startswith(b"GET "):
        line = c.until(b"\r\n\r\n").split(b"\r\n")[0].decode()
        body = ("tunneled to %s: %s" % (target, line)).encode()
        c.sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        return
    while True:
        if c.buf:
            c.sock.sendall(c.buf)
            c.buf = b""
        if not c.fill():
            break
    c.sock.sendall(b"<eof:" + target.encode() + b">")
def serve(sock):
    with sock:
        c = Conn(sock)
        head = c.until(b"\r\n\r\n")
        if head is None:
            return
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for l in lines[1:]:
            k, _, v = l.partition(":")
            headers[k.strip().lower()] = v.strip()
        print(lines[0], "xfcc=" + headers.get("x-forwarded-client-cert", "-"), flush=True)
        method, target = lines[0].split(" ")[:2]
        if method == "CONNECT":
            connect(c, target)
        elif headers.get("upgrade", "").lower() == "websocket":
            websocket(c, headers)
        else:
            c.sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nplain")
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=128)
while True:
    sock, _ = srv.accept()
    threading.Thread(target=serve, args=(sock,), daemon=True).start()
"#;
