//! Shared helpers for Rampart benchmarks (see src/main.rs for the harness).
