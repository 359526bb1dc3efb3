"""Calls /SpiffeWorkloadAPI/FetchX509SVID with plain grpcio, with or without
the `workload.spiffe.io: true` header, and prints the gRPC status code name
of the outcome (OK when a first message arrived).

usage: raw_call.py ENDPOINT with-header|without-header
"""
import sys

import grpc

endpoint, mode = sys.argv[1], sys.argv[2]
# See spiffe_fetch.py for why the authority is set.
channel = grpc.insecure_channel(endpoint, options=[("grpc.default_authority", "localhost")])
call = channel.unary_stream(
    "/SpiffeWorkloadAPI/FetchX509SVID",
    request_serializer=lambda x: x,
    response_deserializer=lambda x: x,
)
metadata = [("workload.spiffe.io", "true")] if mode == "with-header" else []
try:
    for _ in call(b"", metadata=metadata, timeout=5):
        print("OK")
        break
except grpc.RpcError as e:
    print(e.code().name)
