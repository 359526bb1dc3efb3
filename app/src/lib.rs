//! Rampart's application: everything `rampart` does besides parsing its
//! command line.
//!
//! - [`config`]: the one set of configuration types, parsed from YAML and
//!   validated as a whole, errors with file, line, column and field;
//! - [`run`]: the assembly of a running sidecar from a [`config::Config`]
//!   (identity source, central management, policy reloads, the data plane),
//!   as a process (`rampart run`) or in a caller's runtime ([`run::Sidecar`]);
//! - [`identity`] and [`central`]: the wiring of the identity source and of
//!   central management that [`run`] uses; [`istio_kube`]: Istio's security
//!   resources read from the Kubernetes API, for the policy reloads;
//! - [`init`], [`inject`], [`webhook`]: the pod's capture rules, the
//!   Kubernetes mutation (with [`probes`] and [`other_mesh`]) and the
//!   admission webhook (with [`webhook_tls`]);
//! - [`demo`]: `rampart demo`, scenario 1 on loopback or in namespaces,
//!   these made by [`netns`] (which the test kit's pods use too).
//!
//! The option structs of the commands derive `clap::Args`, so that one
//! definition serves the command line and callers of this library.

#![forbid(unsafe_code)]

pub mod central;
pub mod config;
pub mod demo;
pub mod identity;
pub mod init;
pub mod inject;
pub mod istio_kube;
pub mod metrics;
pub mod netns;
pub mod other_mesh;
pub mod probes;
pub mod run;
pub mod webhook;
pub mod webhook_tls;

pub use config::Config;
pub use run::{EXIT_CONFIG, Sidecar, StartError, Telemetry};
