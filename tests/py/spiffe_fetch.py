"""Fetches an X.509-SVID and the X.509 bundles from a Workload API endpoint
with py-spiffe (an independent client), and writes them as PEM files.

usage: spiffe_fetch.py ENDPOINT OUT_DIR
Writes OUT_DIR/svid.pem (chain, leaf first), OUT_DIR/bundle.pem (the SVID's
trust domain bundle from FetchX509Bundles) and prints the SPIFFE ID.
"""
import sys

import grpc

# grpcio >= 1.57 sends the percent-encoded socket path as the HTTP/2
# :authority of a unix: target, which hyper's h2 (under tonic) rejects as
# malformed (grpc/grpc#38142, hyperium/h2#487). grpc-go, and grpcio before
# 1.57, send "localhost"; set that, through grpc's own channel option, since
# py-spiffe does not expose channel options.
_insecure_channel = grpc.insecure_channel


def _channel(target, options=None, compression=None):
    options = list(options or []) + [("grpc.default_authority", "localhost")]
    return _insecure_channel(target, options=options, compression=compression)


grpc.insecure_channel = _channel

from cryptography.hazmat.primitives.serialization import Encoding  # noqa: E402
from spiffe import WorkloadApiClient  # noqa: E402

endpoint, out = sys.argv[1], sys.argv[2]
client = WorkloadApiClient(endpoint)
svid = client.fetch_x509_svid()
bundles = client.fetch_x509_bundles()
bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
if bundle is None:
    sys.exit("no bundle for the SVID's trust domain")
with open(f"{out}/svid.pem", "wb") as f:
    for cert in svid.cert_chain:
        f.write(cert.public_bytes(Encoding.PEM))
with open(f"{out}/bundle.pem", "wb") as f:
    for cert in bundle.x509_authorities:
        f.write(cert.public_bytes(Encoding.PEM))
print(svid.spiffe_id)
