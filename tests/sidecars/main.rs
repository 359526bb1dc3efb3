//! End-to-end tests of sidecars on loopback (no root): real `rampart run`
//! processes with explicit listeners, real apps and clients (curl, grpcio,
//! openssl, nginx, py-spiffe), a real Kubernetes API server. One binary,
//! one module per topic.

use rampart_testkit as support;

mod boundary;
mod central;
mod flood;
mod gospiffe;
mod hostile_policy;
mod http;
mod ingress_mtls;
mod istio;
mod istio_interop;
mod istio_kube;
mod istio_reload;
mod kube_api;
mod loopback;
mod observability;
mod opa_body;
mod restart;
mod revocation;
mod wl_support;
mod workload_api;
