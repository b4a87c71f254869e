//! cdp's edges: the Segment-compatible HTTP [`collector`] that writes events
//! to `<p>.raw`, and the [`destinations`] the [`deliver`] stage routes
//! audience changes to (webhooks, Kafka topics, stdout).
//!
//! Guarantees: the collector answers 200 only after the broker acknowledged
//! every event of the request; a destination retries a bounded number of
//! times and returns what it gave up on, which the runtime dead-letters.

pub mod avro;
pub mod collector;
pub mod deliver;
pub mod destinations;
pub mod limits;

pub use collector::{Collector, CollectorConfig};
pub use deliver::DeliverOperator;
pub use destinations::{
    build_sink, DestinationConfig, DestinationError, DestinationKind, KafkaSink, StdoutSink,
    WebhookSink,
};
