//! Destinations: where audience changes go besides the `<p>.audiences` topic.
//!
//! Each destination of the `destinations` config section becomes one
//! [`Sink`] the deliver stage hands records to:
//!
//! - [`WebhookSink`] POSTs each change as JSON, signed with HMAC-SHA256 when a
//!   secret is configured, and carries the runtime's delivery id so a
//!   receiver can drop the repeats an at-least-once delivery may make.
//!   Network errors, 5xx and 429 are retried with exponential backoff up to
//!   `max_attempts`; any other 4xx fails at once. A record it gives up on is
//!   returned as `Err(reason)` and the runtime dead-letters it: one dead
//!   endpoint never stalls the stage and nothing is dropped silently. Once a
//!   record of a batch gave up on retries, the records of that batch not yet
//!   started fail at once (the endpoint is down; waiting out every retry of
//!   every record would stall the stage for minutes); the next batch tries
//!   again. Records with the same key (one profile) are delivered in order;
//!   different keys are delivered concurrently. A record that fails is
//!   dead-lettered while later records of its key go on, so order holds
//!   among delivered records only. A whole batch has a deadline
//!   (`batch_deadline`, default 60 s, well inside the consumer's poll
//!   interval): what is not delivered by then fails and is dead-lettered,
//!   so a slow endpoint cannot hold the stage.
//! - [`KafkaSink`] produces each change to another topic with the
//!   idempotent producer of the [`ClientFactory`] and waits for the acks.
//! - [`StdoutSink`] prints each change as one JSON line (for `cdp dev`).

mod config;
mod http;
mod kafka;
mod segment;
mod stdout;
mod telemetry;
mod webhook;

#[cfg(test)]
mod testing;

use std::sync::Arc;
use std::time::Duration;

use cdp_pipeline::kafka::ClientError;
use cdp_pipeline::{ClientFactory, Sink, Span};

pub use config::{check, DestinationConfig, DestinationError, DestinationKind};

use crate::avro::{avro_codec, AvroSetupError, Format};
pub use http::HttpSink;
pub use kafka::KafkaSink;
pub use segment::SegmentSink;
pub use stdout::StdoutSink;
pub use webhook::WebhookSink;

/// Header carrying the runtime's delivery id (`origin/lineage/offset/index`,
/// no epoch), stable across replays of the same input: receivers dedupe on
/// it.
pub const DELIVERY_ID_HEADER: &str = "X-CDP-Delivery-Id";
/// Header carrying `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "X-CDP-Signature";
/// Kafka header with the delivery id on records a [`KafkaSink`] produces.
pub const KAFKA_DELIVERY_ID_HEADER: &str = "cdp-delivery-id";

/// Attempts per record when `max_attempts` is not set.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Per-request timeout of a webhook when `timeout` is not set.
pub const DEFAULT_TIMEOUT: Span = Span::from_secs(10);
/// First retry delay; doubled after every failed attempt.
const BASE_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two attempts (also caps a `Retry-After`).
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Longest time one batch of webhook deliveries may take when
/// `batch_deadline` is not set.
pub const DEFAULT_BATCH_DEADLINE: Span = Span::from_secs(60);
/// Keys (profiles) a webhook delivers to concurrently within one batch.
const KEY_CONCURRENCY: usize = 16;

/// Build the sink of one destination. Reads the webhook secret from the
/// environment (never logged).
/// Whether the broker knows `topic`, from the metadata of every topic (a
/// request naming it could make a broker with auto-creation create it);
/// `None` when the broker does not answer.
fn topic_known(producer: &rdkafka::producer::FutureProducer, topic: &str) -> Option<bool> {
    use rdkafka::producer::Producer;
    let metadata = producer
        .client()
        .fetch_metadata(None, std::time::Duration::from_secs(10))
        .ok()?;
    Some(
        metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none()),
    )
}

pub fn build_sink(
    dest: &DestinationConfig,
    factory: &ClientFactory,
) -> Result<Arc<dyn Sink>, DestinationError> {
    let missing = |field| DestinationError::Missing {
        id: dest.id.clone(),
        field,
        kind: dest.kind.name(),
    };
    match dest.kind {
        DestinationKind::Stdout => Ok(Arc::new(StdoutSink::new(&dest.id))),
        DestinationKind::Kafka => {
            let topic = dest.topic.clone().ok_or_else(|| missing("topic"))?;
            // A topic the broker does not know would hold every other
            // destination's round until the produce timed out, then
            // dead-letter: refuse to start instead. A broker that does not
            // answer now is waited out by the deliveries, as always.
            let producer = factory
                .producer()
                .and_then(|p| match topic_known(&p, &topic) {
                    Some(false) => Err(ClientError::UnknownTopic(topic.clone())),
                    _ => Ok(p),
                })
                .map_err(|source| DestinationError::Kafka {
                    id: dest.id.clone(),
                    source,
                })?;
            let sink = KafkaSink::new(&dest.id, producer, topic.clone());
            match dest.format.unwrap_or_default() {
                Format::Json => Ok(Arc::new(sink)),
                Format::Avro => {
                    let codec = avro_codec(dest.schema_registry.as_deref(), &topic).map_err(
                        |e| match e {
                            AvroSetupError::Registry(source) => DestinationError::Registry {
                                id: dest.id.clone(),
                                source,
                            },
                            AvroSetupError::Codec(source) => DestinationError::Codec {
                                id: dest.id.clone(),
                                source,
                            },
                        },
                    )?;
                    Ok(Arc::new(sink.with_avro(Arc::new(codec))))
                }
            }
        }
        DestinationKind::Segment => {
            let url = dest.url.clone().ok_or_else(|| missing("url"))?;
            let var = dest
                .write_key_env
                .clone()
                .ok_or_else(|| missing("write_key_env"))?;
            let write_key = secret_from_env(dest, "write_key_env", &var)?;
            let sink = SegmentSink::new(
                &dest.id,
                &url,
                write_key,
                dest.timeout.unwrap_or(DEFAULT_TIMEOUT).to_std(),
                dest.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
                dest.batch_size.unwrap_or(segment::DEFAULT_BATCH_SIZE),
            )?;
            Ok(Arc::new(with_http_settings(sink, dest)))
        }
        DestinationKind::Webhook => {
            let url = dest.url.clone().ok_or_else(|| missing("url"))?;
            let secret = match &dest.secret_env {
                None => None,
                Some(var) => Some(secret_from_env(dest, "secret_env", var)?.into_bytes()),
            };
            let sink = WebhookSink::new(
                &dest.id,
                &url,
                secret,
                dest.timeout.unwrap_or(DEFAULT_TIMEOUT).to_std(),
                dest.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            )?;
            Ok(Arc::new(with_http_settings(sink, dest)))
        }
    }
}

/// A secret a destination names by environment variable (`field`).
fn secret_from_env(
    dest: &DestinationConfig,
    field: &'static str,
    var: &str,
) -> Result<String, DestinationError> {
    std::env::var(var).map_err(|_| DestinationError::MissingSecret {
        id: dest.id.clone(),
        field,
        var: var.to_string(),
    })
}

/// The settings every HTTP destination takes: `batch_deadline` and
/// `max_per_second`.
fn with_http_settings<S: HttpSink>(sink: S, dest: &DestinationConfig) -> S {
    let sink = sink.with_batch_deadline(
        dest.batch_deadline
            .unwrap_or(DEFAULT_BATCH_DEADLINE)
            .to_std(),
    );
    match dest.max_per_second {
        Some(n) => sink.with_rate_limit(n),
        None => sink,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testing::{dest, TestResult};

    #[test]
    fn build_sink_needs_the_secret_in_the_environment() -> TestResult {
        let factory = ClientFactory::new(cdp_pipeline::KafkaConfig::default())?;
        let mut d = dest("crm", DestinationKind::Webhook);
        d.url = Some("http://127.0.0.1:1/hook".into());
        d.secret_env = Some("CDP_TEST_WEBHOOK_SECRET_THAT_IS_NOT_SET".into());
        let err = build_sink(&d, &factory)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("CDP_TEST_WEBHOOK_SECRET_THAT_IS_NOT_SET"),
            "{err}"
        );
        d.secret_env = None;
        assert_eq!(build_sink(&d, &factory)?.name(), "crm");
        assert_eq!(
            build_sink(&dest("out", DestinationKind::Stdout), &factory)?.name(),
            "out"
        );
        Ok(())
    }
}
