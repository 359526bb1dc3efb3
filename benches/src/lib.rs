//! Shared helpers for Rampart's benchmarks.
