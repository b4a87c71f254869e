//! cdp's operators: pure, deterministic logic over `(state, record)`.
//!
//! Each module holds one operator: its config section, its state, its logic
//! and its tests. None touches Kafka, tokio or the wall clock; the runtime
//! (`cdp-pipeline`) feeds them records and ticks.

pub mod audiences;
pub mod config;
pub mod event_time;
pub mod identity;
pub mod lint;
pub mod messages;
mod profile_keyed;
pub use profile_keyed::MAX_HELD_INPUTS;
pub mod traits;
pub mod validate;
