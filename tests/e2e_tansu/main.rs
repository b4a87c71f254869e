//! End-to-end: every stage as its own `cdp` process against a real
//! Kafka-protocol broker in another process (tansu in CI).
//!
//! Needs `CDP_E2E_BROKERS`; without it the tests skip locally and fail in CI
//! (`CI` set), so a missing broker can never pass as green.
//!
//! [`chain`] runs the chain through crashes, zombies and scale-out;
//! [`broker`] checks the broker quirks and admin commands; [`support`]
//! holds the pipeline of processes they share.

#[path = "../common/mod.rs"]
mod common;

mod broker;
mod chain;
mod config;
mod support;
