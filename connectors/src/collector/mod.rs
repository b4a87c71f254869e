//! The HTTP collector: a Segment-compatible Tracking API that writes every
//! event to `<p>.raw`.
//!
//! Routes: `POST /v1/identify|track|page|screen|group|alias` (one event, its
//! type from the path; also by the one-letter paths analytics.js posts to,
//! `/v1/i|t|p|s|g|a`), `POST /v1/batch`, `/v1/import` and `/v1/b`
//! (`{"batch": [...]}` with optional batch-level `context`, `integrations`
//! and `sentAt` merged into every item that lacks them), and `GET
//! /v1/projects/{writeKey}/settings` (the minimal settings analytics.js asks
//! for). CORS is permissive so browser SDKs can post from any origin; gzip
//! request bodies are accepted.
//!
//! Auth is the write key of a configured source, as the Basic-auth user name
//! or as `writeKey` in the body; it is never written to the topic.
//!
//! Each event is checked only for what the edge must know (JSON object, a
//! `userId` or `anonymousId`, `event` on a track, a known `type` in a batch),
//! then enriched: `receivedAt`, a `messageId` when absent, and `timestamp`
//! corrected for the client's clock skew (`timestamp = receivedAt - (sentAt -
//! originalTimestamp)`). Everything deeper is the validate stage's job.
//! Only those few top-level fields are ever parsed: the rest of each event
//! (properties, context, traits) is copied to the topic as the client wrote
//! it, byte for byte, in its field order.
//!
//! Guarantee: `200 {"success": true}` is sent only after the broker
//! acknowledged every event of the request (idempotent producer, acks=all).
//! When the broker cannot take writes, or the in-flight memory budget is
//! spent, the answer is `503` with `Retry-After` and the client retries.
//!
//! Broker outages: a probe asks the broker for the raw topic's metadata
//! every [`PROBE_INTERVAL`]. While it gets no answer, `/readyz` is false,
//! new requests get `503` at once and requests waiting for acks are answered
//! `503` within a probe (instead of after the producer's message timeout).
//! A producer that keeps failing while the broker answers (its idempotence
//! state lost in a broker restart: every produce then fails with "Unknown
//! broker error") is replaced by a new one.
//! Limit: a request that failed part-way may have written some of its events;
//! the retry writes them again and the validate stage drops the repeats by
//! `messageId` — except events the client sent without a `messageId`, which
//! get a fresh one per attempt.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cdp_operators::config::SourceConfig;
use cdp_pipeline::kafka::ClientError;
use cdp_pipeline::ClientFactory;
use rdkafka::producer::FutureProducer;
use tokio::sync::{watch, Semaphore};

mod body;
mod broker;
mod config;
mod error;
mod normalize;
mod parse;
mod routes;
#[cfg(test)]
mod testkit;

pub use config::CollectorConfig;

use error::CollectError;
use parse::Fields;

/// Seconds a client is asked to wait after a 503.
const RETRY_AFTER_SECS: &str = "5";

/// How often the broker is probed (and how long a probe waits).
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// The Segment call types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
}

impl EventType {
    const ALL: [EventType; 6] = [
        EventType::Identify,
        EventType::Track,
        EventType::Page,
        EventType::Screen,
        EventType::Group,
        EventType::Alias,
    ];

    fn as_str(self) -> &'static str {
        match self {
            EventType::Identify => "identify",
            EventType::Track => "track",
            EventType::Page => "page",
            EventType::Screen => "screen",
            EventType::Group => "group",
            EventType::Alias => "alias",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// What a POST route carries.
#[derive(Debug, Clone, Copy)]
enum Call {
    Single(EventType),
    Batch,
}

/// One event of a request, with its index in the batch (`None` for a
/// single-event call) for error messages (`batch[3]`).
#[derive(Debug)]
struct Item<'a> {
    index: Option<usize>,
    fields: Fields<'a>,
}

/// Where an event sits in its request, for error messages.
fn at(index: Option<usize>) -> String {
    match index {
        Some(i) => format!("batch[{i}]"),
        None => "body".into(),
    }
}

/// One event ready to produce.
#[derive(Debug)]
struct Prepared {
    key: String,
    payload: Vec<u8>,
}

/// What the collector knows of a write key's source.
struct Source {
    id: String,
    /// Whether `context.ip` is filled from the request (see
    /// [`SourceKind`](cdp_operators::config::SourceKind)).
    client_side: bool,
}

/// The HTTP collector. Cheap to clone.
#[derive(Clone)]
pub struct Collector {
    inner: Arc<Inner>,
}

struct Inner {
    config: CollectorConfig,
    /// Write key → source.
    sources: HashMap<String, Source>,
    factory: ClientFactory,
    /// Replaced by the probe when it stops working (see module docs).
    producer: RwLock<FutureProducer>,
    /// Whether the broker answered the last probe.
    broker_up: watch::Sender<bool>,
    /// Produce failures since the last probe while the broker answered.
    failures_while_up: AtomicU64,
    raw_topic: String,
    /// Bytes of request bodies waiting for the broker, one permit a byte.
    budget: Semaphore,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Write keys are credentials: print source ids only.
        f.debug_struct("Collector")
            .field("config", &self.inner.config)
            .field(
                "sources",
                &self
                    .inner
                    .sources
                    .values()
                    .map(|s| &s.id)
                    .collect::<Vec<_>>(),
            )
            .field("raw_topic", &self.inner.raw_topic)
            .finish()
    }
}

impl Collector {
    pub fn new(
        config: CollectorConfig,
        sources: &[SourceConfig],
        factory: &ClientFactory,
        raw_topic: String,
    ) -> Result<Self, ClientError> {
        let budget = Semaphore::new(config.max_in_flight_bytes.min(Semaphore::MAX_PERMITS));
        // Assumed up until the first probe says otherwise.
        let (broker_up, _) = watch::channel(true);
        Ok(Collector {
            inner: Arc::new(Inner {
                sources: sources
                    .iter()
                    .map(|s| {
                        let source = Source {
                            id: s.id.clone(),
                            client_side: s.kind.is_client_side(),
                        };
                        (s.write_key.clone(), source)
                    })
                    .collect(),
                config,
                producer: RwLock::new(factory.producer()?),
                factory: factory.clone(),
                broker_up,
                failures_while_up: AtomicU64::new(0),
                raw_topic,
                budget,
            }),
        })
    }

    fn producer(&self) -> Result<FutureProducer, CollectError> {
        self.inner
            .producer
            .read()
            .map(|p| p.clone())
            .map_err(|_| CollectError::Internal("producer lock poisoned".into()))
    }
}
