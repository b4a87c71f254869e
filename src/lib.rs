//! The `cdp` binary's library: config loading, stage wiring, `cdp dev`.
//! Split from `main.rs` so the end-to-end tests can drive the same code.

pub mod config;
pub mod dead_letters;
pub mod demo;
pub mod dev;
pub mod loadgen;
pub mod notice;
pub mod passthrough;
pub mod profiles;
pub mod stages;
pub mod stamps;
pub mod sync;
pub mod topics;
