package envoy.authz

import input.attributes.request.http as http_request

default allow = false

svc_spiffe_id = client_id {
    [_, _, uri_type_san] := split(http_request.headers["x-forwarded-client-cert"], ";")
    [_, client_id] := split(uri_type_san, "=")
}

allow {
    http_request.path == "/data"
    http_request.method == "GET"
    svc_spiffe_id == "spiffe://example.org/ec-web"
}
