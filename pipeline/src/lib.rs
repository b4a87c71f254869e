//! The cdp runtime: a small Kafka-Streams-like library.
//!
//! A *stage* consumes one input topic in a consumer group and runs one
//! *task* per assigned partition. A task owns a RocksDB [`store`] backed by
//! a compacted changelog topic and an [`operator::Operator`] that turns
//! `(state, record)` into state changes and outputs. The [`runtime`]
//! processes a batch, produces its outputs and waits for the acks, writes the
//! changelog and a commit marker, and only then commits state, input offset
//! and dedupe positions in one RocksDB write batch. Every output carries its
//! [`envelope`] (origin, epoch, position) so consumers drop replays: the
//! effectively-once guarantee on any Kafka-protocol broker, without
//! broker-side transactions. Time enters only through tick records.

mod alloc;
pub mod changelog;
pub mod duration;
pub mod envelope;
pub mod json;
pub mod kafka;
pub mod metrics;
pub mod operator;
pub mod retry;
pub mod runtime;
pub mod service;
pub mod sink;
pub mod store;
pub mod trust;

pub use duration::Span;
pub use kafka::{ClientFactory, Guarantee, KafkaConfig, Topics};
pub use operator::{
    Context, Emitted, Operator, OperatorError, OperatorFactory, OperatorHarness, Record,
    TimersFromState,
};
pub use runtime::{OutputTarget, StageRuntime, StageSpec};
pub use service::{Health, ReadyFlag, Shutdown};
pub use sink::{Sink, SinkRecord};
