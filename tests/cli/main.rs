//! The command line as a user runs it: `rampart demo`, `rampart inject`
//! and the webhook, the Kubernetes manifests they and deploy/ produce, and
//! the fuzz targets' bodies over their seeds. One binary, one module per
//! topic.

use rampart_testkit as support;

mod demo;
mod fuzz_seeds;
mod inject;
mod kubernetes;
mod policy_import;
