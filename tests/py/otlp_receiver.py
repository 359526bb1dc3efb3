"""An independent OTLP/HTTP trace receiver: decodes each
ExportTraceServiceRequest (POST /v1/traces, protobuf) with the
`opentelemetry-proto` package's generated messages and prints one JSON line
per span: service, name, kind, trace_id, span_id, parent_span_id (hex) and
its string/int attributes. argv: port."""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

port = int(sys.argv[1])


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        ok = self.path == "/v1/traces" and self.headers.get("content-type") == "application/x-protobuf"
        if ok:
            request = trace_service_pb2.ExportTraceServiceRequest()
            request.ParseFromString(body)
            for rs in request.resource_spans:
                attrs = {a.key: value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        print(json.dumps({
                            "service": attrs.get("service.name"),
                            "name": s.name,
                            "kind": s.kind,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "attributes": {a.key: value(a.value) for a in s.attributes},
                        }), flush=True)
        answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString() if ok else b"bad request\n"
        self.send_response(200 if ok else 400)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


print("listening", flush=True)
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
