"""Sends N GET requests with random paths, queries and headers to host:port
over one keep-alive connection, pipelined in batches (so that 100,000 of
them take seconds, not minutes); prints the number answered."""
import random
import socket
import string
import sys

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
BATCH = 100
rnd = random.Random(7)
ALPHABET = string.ascii_letters + string.digits


def word(k):
    return "".join(rnd.choices(ALPHABET, k=k))


def request():
    path = rnd.choice(["/data", "/" + word(12), "/" + word(4) + "/" + word(8)])
    if rnd.random() < 0.5:
        path += "?" + word(6) + "=" + word(10)
    lines = [f"GET {path} HTTP/1.1", "Host: bench"]
    for _ in range(rnd.randint(0, 4)):
        lines.append(f"x-{word(8).lower()}: {word(20)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Responses:
    """Reads HTTP/1.1 responses with a Content-Length from a socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("closed")
        self.buf += chunk

    def read_one(self):
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(self.buf) < length:
            self._fill()
        self.buf = self.buf[length:]
        return int(head.split(b" ", 2)[1])


def connect():
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s, Responses(s)


sock, responses = connect()
answered = 0
sent = 0
while sent < n:
    batch = min(BATCH, n - sent)
    try:
        sock.sendall(b"".join(request() for _ in range(batch)))
        for _ in range(batch):
            responses.read_one()
            answered += 1
    except (OSError, ValueError, IndexError):
        sock.close()
        sock, responses = connect()
    sent += batch
print(answered)
