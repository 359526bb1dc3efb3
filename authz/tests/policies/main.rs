//! Policies end to end: fixtures and scenarios, every field, CUSTOM
//! providers, bundles, Rego limits and Istio's AuthorizationPolicy table.
//! One binary, one module per topic (`no_alloc` is a binary of its own: its
//! counting global allocator would see the other tests' allocations).

mod support;

mod bundle;
mod custom;
mod fields;
mod import_table;
mod istio_table;
mod opa_differential;
mod rego_limits;
mod request_body;
mod scenarios;
