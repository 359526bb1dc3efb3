//! End-to-end tests in network namespaces (root): pods on a private
//! switch, `rampart init`'s capture rules, sidecars as the proxy UID, and
//! the container image in podman pods. Every test is `#[ignore]`d unless
//! asked for (`cargo test -- --include-ignored`, as root). One binary, one
//! module per topic.

use rampart_testkit as support;

mod admin;
mod container;
mod discovery;
mod dsl;
mod init;
mod kubernetes;
mod mesh;
