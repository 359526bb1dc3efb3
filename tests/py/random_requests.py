"""Sends N requests with random paths, queries and headers to host:port
over keep-alive connections; prints the number answered."""
import http.client
import random
import string
import sys

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(7)


def word(k):
    return "".join(rnd.choice(string.ascii_letters + string.digits) for _ in range(k))


conn = http.client.HTTPConnection(host, port, timeout=10)
answered = 0
for i in range(n):
    path = rnd.choice(["/data", "/" + word(12), "/" + word(4) + "/" + word(8)])
    if rnd.random() < 0.5:
        path += "?" + word(6) + "=" + word(10)
    headers = {"x-" + word(8).lower(): word(20) for _ in range(rnd.randint(0, 4))}
    try:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        r.read()
        answered += 1
    except Exception:
        conn.close()
        conn = http.client.HTTPConnection(host, port, timeout=10)
print(answered)
