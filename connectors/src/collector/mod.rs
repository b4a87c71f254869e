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

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use cdp_operators::config::{ConfigError, SourceConfig};
use cdp_operators::messages::{parse_time_ms, rfc3339_ms};
use cdp_pipeline::kafka::ClientError;
use cdp_pipeline::{envelope, metrics, ClientFactory, ReadyFlag, Shutdown, Span};
use futures::StreamExt;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokio::sync::{watch, Semaphore};
use tower_http::cors::CorsLayer;
use tower_http::decompression::RequestDecompressionLayer;

/// Seconds a client is asked to wait after a 503.
const RETRY_AFTER_SECS: &str = "5";
/// How often the broker is probed (and how long a probe waits).
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// The `collector` section of the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Address the HTTP API listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest single event in bytes (the body of a single-event call, or
    /// one item of a batch); larger ones get 413.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// Largest request body in bytes, after gzip decompression; larger
    /// ones get 413.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// Most events in one batch request; more get 413.
    #[serde(default = "default_max_batch_events")]
    pub max_batch_events: usize,
    /// Request bytes held in memory while waiting for the broker, across
    /// all requests; beyond it requests get 503 with `Retry-After`.
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: usize,
    /// Longest time a client may take to send a request body; a slower one
    /// gets 408 and its connection slot back.
    #[serde(default = "default_body_timeout")]
    pub body_timeout: Span,
    /// Most connections open at once; one more is answered 503 with
    /// `Retry-After` and closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8088))
}
const fn default_max_event_bytes() -> usize {
    32 * 1024
}
const fn default_max_batch_bytes() -> usize {
    500 * 1024
}
const fn default_max_batch_events() -> usize {
    2500
}
const fn default_max_in_flight_bytes() -> usize {
    64 * 1024 * 1024
}
const fn default_body_timeout() -> Span {
    Span::from_secs(10)
}
const fn default_max_connections() -> usize {
    10_000
}

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            listen: default_listen(),
            max_event_bytes: default_max_event_bytes(),
            max_batch_bytes: default_max_batch_bytes(),
            max_batch_events: default_max_batch_events(),
            max_in_flight_bytes: default_max_in_flight_bytes(),
            body_timeout: default_body_timeout(),
            max_connections: default_max_connections(),
        }
    }
}

impl CollectorConfig {
    /// Check limits that only make sense together; errors name the field
    /// (`collector.max_in_flight_bytes: ...`).
    pub fn check(&self) -> Result<(), ConfigError> {
        let positive = [
            ("max_event_bytes", self.max_event_bytes),
            ("max_batch_bytes", self.max_batch_bytes),
            ("max_batch_events", self.max_batch_events),
            ("max_in_flight_bytes", self.max_in_flight_bytes),
            ("max_connections", self.max_connections),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError::new(
                    format!("collector.{field}"),
                    "must be positive",
                ));
            }
        }
        if self.body_timeout.millis() <= 0 {
            return Err(ConfigError::new(
                "collector.body_timeout",
                "must be positive",
            ));
        }
        if self.max_batch_bytes > u32::MAX as usize {
            return Err(ConfigError::new(
                "collector.max_batch_bytes",
                "must be below 4 GiB",
            ));
        }
        if self.max_in_flight_bytes < self.max_batch_bytes.max(self.max_event_bytes) {
            return Err(ConfigError::new(
                "collector.max_in_flight_bytes",
                "must be at least max_batch_bytes and max_event_bytes, or large requests never fit",
            ));
        }
        Ok(())
    }
}

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

/// Why a request was refused. Each maps to a status and a fixed reason code
/// (the `reason` label of `cdp_collector_events_rejected_total`).
#[derive(Debug, thiserror::Error)]
enum CollectError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("{at}: event larger than {limit} bytes")]
    EventTooLarge { at: String, limit: usize },
    #[error("batch of {count} events; at most {limit} allowed")]
    TooManyEvents { count: usize, limit: usize },
    #[error("cannot read the request body: {0}")]
    UnreadableBody(String),
    #[error("the request body did not arrive within {0} ms")]
    BodyTimeout(i64),
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("{at}: {message}")]
    Invalid {
        at: String,
        reason: &'static str,
        message: &'static str,
    },
    #[error("too many requests in flight; retry later")]
    Overloaded,
    #[error("the broker did not take the events: {0}")]
    Broker(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl CollectError {
    fn invalid(at: impl Into<String>, reason: &'static str, message: &'static str) -> Self {
        CollectError::Invalid {
            at: at.into(),
            reason,
            message,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            CollectError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            CollectError::BodyTooLarge { .. }
            | CollectError::EventTooLarge { .. }
            | CollectError::TooManyEvents { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            CollectError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            CollectError::UnreadableBody(_)
            | CollectError::InvalidJson(_)
            | CollectError::Invalid { .. } => StatusCode::BAD_REQUEST,
            CollectError::Overloaded | CollectError::Broker(_) => StatusCode::SERVICE_UNAVAILABLE,
            CollectError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            CollectError::Unauthorized(_) => "unauthorized",
            CollectError::BodyTooLarge { .. } => "body_too_large",
            CollectError::EventTooLarge { .. } => "event_too_large",
            CollectError::TooManyEvents { .. } => "too_many_events",
            CollectError::UnreadableBody(_) => "unreadable_body",
            CollectError::BodyTimeout(_) => "body_timeout",
            CollectError::InvalidJson(_) => "invalid_json",
            CollectError::Invalid { reason, .. } => reason,
            CollectError::Overloaded => "overloaded",
            CollectError::Broker(_) => "broker_unavailable",
            CollectError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for CollectError {
    fn into_response(self) -> Response {
        let status = self.status();
        // `error` for people; `code` and `message` as Segment's and
        // RudderStack's SDKs read them when they log a failed request.
        let message = self.to_string();
        let body = Json(json!({
            "success": false,
            "error": message,
            "code": self.reason(),
            "message": message,
        }));
        let mut response = (status, body).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        response
    }
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

/// The HTTP collector. Cheap to clone.
#[derive(Clone)]
pub struct Collector {
    inner: Arc<Inner>,
}

struct Inner {
    config: CollectorConfig,
    /// Write key → source id.
    sources: HashMap<String, String>,
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
            .field("sources", &self.inner.sources.values().collect::<Vec<_>>())
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
                    .map(|s| (s.write_key.clone(), s.id.clone()))
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

    /// Probe the broker until shutdown: readiness, the fast 503 path, and
    /// replacing a producer that cannot recover (see module docs).
    async fn watch_broker(self, shutdown: Shutdown, ready: ReadyFlag) {
        let reachable = metrics::BROKER_REACHABLE.with_label_values(&["collect"]);
        let mut last_up = true;
        while !shutdown.is_triggered() {
            let started = Instant::now();
            let up = match self.producer() {
                Ok(producer) => {
                    let topic = self.inner.raw_topic.clone();
                    tokio::task::spawn_blocking(move || {
                        producer
                            .client()
                            .fetch_metadata(Some(&topic), PROBE_INTERVAL)
                            .is_ok()
                    })
                    .await
                    .unwrap_or(false)
                }
                Err(_) => false,
            };
            let failures = self.inner.failures_while_up.swap(0, Ordering::SeqCst);
            if up {
                let fatal = self
                    .producer()
                    .ok()
                    .and_then(|p| p.client().fatal_error())
                    .map(|(_, reason)| reason);
                if fatal.is_some() || failures > 0 {
                    let why = fatal.unwrap_or_else(|| {
                        format!("{failures} produce failures while the broker answered")
                    });
                    self.rebuild_producer(&why).await;
                }
            }
            if up != last_up {
                if up {
                    tracing::info!("broker reachable again; accepting events");
                } else {
                    tracing::warn!("broker unreachable; answering 503 until it is back");
                }
                last_up = up;
            }
            self.inner.broker_up.send_replace(up);
            reachable.set(i64::from(up));
            ready.set(up && failures == 0 && !shutdown.is_triggered());
            tokio::select! {
                _ = tokio::time::sleep(PROBE_INTERVAL.saturating_sub(started.elapsed())) => {}
                _ = shutdown.wait() => {}
            }
        }
    }

    async fn rebuild_producer(&self, why: &str) {
        let factory = self.inner.factory.clone();
        let fresh = match tokio::task::spawn_blocking(move || factory.producer()).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot build a new producer");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot build a new producer");
                return;
            }
        };
        let old = match self.inner.producer.write() {
            Ok(mut p) => std::mem::replace(&mut *p, fresh),
            Err(_) => return,
        };
        // Requests still waiting on the old producer hold their own handle;
        // dropping ours flushes nothing they need.
        tokio::task::spawn_blocking(move || drop(old));
        metrics::CLIENT_REBUILDS
            .with_label_values(&["collect", "producer"])
            .inc();
        tracing::warn!(why, "producer rebuilt");
    }

    /// The HTTP API with its CORS, gzip and metrics layers.
    pub fn router(&self) -> Router {
        let mut router = Router::new();
        for kind in EventType::ALL {
            let handler = post(
                move |State(c): State<Collector>, headers: HeaderMap, body: Body| async move {
                    c.respond(Call::Single(kind), &headers, body).await
                },
            );
            let name = kind.as_str();
            // analytics.js posts to the first letter: `/v1/t` for a track.
            router = router
                .route(&format!("/v1/{name}"), handler.clone())
                .route(&format!("/v1/{}", &name[..1]), handler);
        }
        let batch = |State(c): State<Collector>, headers: HeaderMap, body: Body| async move {
            c.respond(Call::Batch, &headers, body).await
        };
        router
            .route("/v1/batch", post(batch))
            .route("/v1/import", post(batch))
            .route("/v1/b", post(batch))
            .route("/v1/projects/{write_key}/settings", get(settings))
            // Decompression sits inside the handlers' reach, so the size
            // limits apply to the decompressed body (no gzip bombs).
            .layer(RequestDecompressionLayer::new())
            .layer(axum::middleware::from_fn(record_metrics))
            .layer(CorsLayer::permissive())
            .with_state(self.clone())
    }

    /// Bind `config.listen` and serve until shutdown.
    pub async fn serve(self, shutdown: Shutdown, ready: ReadyFlag) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.inner.config.listen).await?;
        self.serve_on(listener, shutdown, ready).await
    }

    /// Serve on a bound listener until shutdown. Ready once listening; not
    /// ready as soon as shutdown starts. In-flight requests finish (they are
    /// waiting for acks) before this returns.
    pub async fn serve_on(
        self,
        listener: tokio::net::TcpListener,
        shutdown: Shutdown,
        ready: ReadyFlag,
    ) -> std::io::Result<()> {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, topic = %self.inner.raw_topic, "collector listening");
        let probe = tokio::spawn(self.clone().watch_broker(shutdown.clone(), ready.clone()));
        let draining = ready.clone();
        let listener = crate::limits::CappedListener::new(
            listener,
            self.inner.config.max_connections,
            RETRY_AFTER_SECS,
        );
        let result = axum::serve(listener, self.router())
            .with_graceful_shutdown(async move {
                shutdown.wait().await;
                draining.set(false);
                tracing::info!("collector draining");
            })
            .await;
        ready.set(false);
        probe.abort();
        result
    }

    fn source_of(&self, write_key: &str) -> Result<&str, CollectError> {
        self.inner
            .sources
            .get(write_key)
            .map(String::as_str)
            .ok_or(CollectError::Unauthorized("unknown write key"))
    }

    async fn respond(&self, call: Call, headers: &HeaderMap, body: Body) -> Response {
        let mut events = 1;
        match self.collect(call, headers, body, &mut events).await {
            Ok(()) => (StatusCode::OK, Json(json!({"success": true}))).into_response(),
            Err(e) => {
                metrics::EVENTS_REJECTED
                    .with_label_values(&[e.reason()])
                    .inc_by(events as u64);
                match &e {
                    CollectError::Broker(_) | CollectError::Internal(_) => {
                        tracing::warn!(error = %e, events, "collector request failed")
                    }
                    _ => {
                        tracing::debug!(error = %e, reason = e.reason(), "collector request refused")
                    }
                }
                e.into_response()
            }
        }
    }

    /// Authenticate, read, check, enrich and produce one request. `events`
    /// is set to the number of events once known, for the reject metric.
    async fn collect(
        &self,
        call: Call,
        headers: &HeaderMap,
        body: Body,
        events: &mut usize,
    ) -> Result<(), CollectError> {
        let cfg = &self.inner.config;
        let header_source = match basic_auth_user(headers)? {
            Some(key) => Some(self.source_of(&key)?),
            None => None,
        };
        let limit = match call {
            Call::Single(_) => cfg.max_event_bytes,
            Call::Batch => cfg.max_batch_bytes,
        };
        let read = tokio::time::timeout(cfg.body_timeout.to_std(), read_body(body, limit));
        let bytes = read
            .await
            .map_err(|_| CollectError::BodyTimeout(cfg.body_timeout.millis()))?
            .map_err(|e| match (e, call) {
                (ReadError::TooLarge, Call::Single(_)) => CollectError::EventTooLarge {
                    at: "body".into(),
                    limit,
                },
                (ReadError::TooLarge, Call::Batch) => CollectError::BodyTooLarge { limit },
                (ReadError::Stream(msg), _) => CollectError::UnreadableBody(msg),
            })?;
        // Held until the response: bounds the memory of requests waiting
        // for the broker. Refusing at once beats queueing unboundedly.
        let _permit = self
            .inner
            .budget
            .try_acquire_many(u32::try_from(bytes.len()).unwrap_or(u32::MAX))
            .map_err(|_| CollectError::Overloaded)?;

        // One pass over the body: the top-level fields of every event,
        // each value left as the raw JSON text of the body.
        let parsed = match call {
            Call::Single(_) => serde_json::from_slice::<SingleDoc>(&bytes).map(|d| d.0),
            Call::Batch => serde_json::from_slice::<BatchDoc>(&bytes).map(|d| d.0),
        }
        .map_err(|e| CollectError::InvalidJson(e.to_string()))?;
        // Skipped values are checked for syntax but not for unpaired UTF-16
        // surrogate escapes, which every later stage's parser refuses.
        if let Some(at) = lone_surrogate(&bytes) {
            return Err(CollectError::InvalidJson(format!(
                "lone surrogate in a \\u escape at byte {at}"
            )));
        }
        let Doc::Object {
            fields: mut doc,
            batch,
        } = parsed
        else {
            return Err(CollectError::invalid(
                "body",
                "not_an_object",
                "expected a JSON object",
            ));
        };
        let body_key = doc.remove("writeKey");
        let source = match (header_source, body_key.as_deref().and_then(string)) {
            (Some(source), _) => source,
            (None, Some(key)) => self.source_of(&key)?,
            (None, None) => {
                return Err(CollectError::Unauthorized(
                    "missing write key: send it as the Basic-auth user name or as writeKey",
                ))
            }
        };

        let items: Vec<Item> = match call {
            Call::Single(kind) => {
                doc.set("type", raw_string(kind.as_str())?);
                vec![Item {
                    index: None,
                    fields: doc,
                }]
            }
            Call::Batch => split_batch(doc, batch, cfg, events)?,
        };
        let received_ms = chrono::Utc::now().timestamp_millis();
        let received_at = raw_string(&rfc3339_ms(received_ms))?;
        let prepared = items
            .into_iter()
            .map(|item| enrich(item.fields, received_ms, &received_at, item.index))
            .collect::<Result<Vec<_>, _>>()?;
        self.produce(source, &prepared).await?;
        metrics::EVENTS_ACCEPTED
            .with_label_values(&[source])
            .inc_by(prepared.len() as u64);
        Ok(())
    }

    /// Produce every event and wait until the broker acknowledged all, or
    /// until the probe finds the broker gone.
    async fn produce(&self, source: &str, events: &[Prepared]) -> Result<(), CollectError> {
        let mut broker_up = self.inner.broker_up.subscribe();
        if !*broker_up.borrow_and_update() {
            return Err(CollectError::Broker("the broker is unreachable".into()));
        }
        tokio::select! {
            result = self.produce_acked(source, events) => result,
            _ = broker_up.wait_for(|up| !*up) => {
                Err(CollectError::Broker("the broker became unreachable".into()))
            }
        }
    }

    async fn produce_acked(&self, source: &str, events: &[Prepared]) -> Result<(), CollectError> {
        let started = Instant::now();
        let producer = self.producer()?;
        let mut pending = Vec::with_capacity(events.len());
        for e in events {
            let headers = OwnedHeaders::new().insert(Header {
                key: envelope::SOURCE,
                value: Some(source.as_bytes()),
            });
            let record = FutureRecord::to(&self.inner.raw_topic)
                .key(e.key.as_bytes())
                .payload(e.payload.as_slice())
                .headers(headers);
            // A full local queue means the broker is not keeping up: answer
            // 503 now rather than hold the request.
            match producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((error, _)) => return Err(CollectError::Broker(error.to_string())),
            }
        }
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => {
                    // The broker refused an event it could have taken: the
                    // probe replaces the producer if the broker answers it.
                    self.inner.failures_while_up.fetch_add(1, Ordering::SeqCst);
                    return Err(CollectError::Broker(error.to_string()));
                }
                Err(_) => return Err(CollectError::Broker("the producer was shut down".into())),
            }
        }
        metrics::BROKER_ACK_SECONDS
            .with_label_values::<&str>(&[])
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// `GET /v1/projects/{writeKey}/settings`: what analytics.js needs to send
/// its events here instead of to Segment.
async fn settings(
    State(c): State<Collector>,
    Path(write_key): Path<String>,
    headers: HeaderMap,
) -> Response {
    if c.source_of(&write_key).is_err() {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"success": false, "error": "unknown write key"})),
        )
            .into_response();
    }
    let host = ["x-forwarded-host", "host"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .map(str::to_string)
        .unwrap_or_else(|| c.inner.config.listen.to_string());
    Json(json!({
        "integrations": {"Segment.io": {"apiKey": write_key, "apiHost": format!("{host}/v1")}},
        "plan": {"track": {"__default": {"enabled": true}}}
    }))
    .into_response()
}

/// Count and time every request by matched route and status.
async fn record_metrics(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::HTTP_SECONDS
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    metrics::HTTP_REQUESTS
        .with_label_values(&[&route, response.status().as_str()])
        .inc();
    response
}

/// The write key from `Authorization: Basic base64(key:)`, if the header is
/// there. A malformed header is a 401, not a fallback to the body.
fn basic_auth_user(headers: &HeaderMap) -> Result<Option<String>, CollectError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed =
        CollectError::Unauthorized("malformed Authorization header: expected Basic auth");
    let value = value
        .to_str()
        .map_err(|_| CollectError::Unauthorized("malformed Authorization header"))?;
    let Some((scheme, encoded)) = value.trim().split_once(' ') else {
        return Err(malformed);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(malformed);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or(malformed)?;
    let user = decoded
        .split_once(':')
        .map_or(decoded.as_str(), |(user, _)| user);
    Ok((!user.is_empty()).then(|| user.to_string()))
}

enum ReadError {
    TooLarge,
    Stream(String),
}

/// Read the (decompressed) body, refusing it as soon as it passes `limit`.
async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ReadError> {
    // Content-Length, when sent, sizes the buffer once.
    let expected = axum::body::HttpBody::size_hint(&body).lower();
    let mut buf = Vec::with_capacity(usize::try_from(expected).unwrap_or(limit).min(limit));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ReadError::Stream(e.to_string()))?;
        if buf.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// A JSON object's top-level fields in the order sent, each value the raw
/// JSON text borrowed from the request body. The edge parses only the few
/// fields it reads (ids, type, event, times), and writes the event out by
/// copying the rest verbatim instead of building and re-serializing a tree.
///
/// JSON allows a key twice; like `serde_json::Value`, lookups see the last
/// one, and `set` leaves the key once.
#[derive(Debug, Default)]
struct Fields<'a>(Vec<(Cow<'a, str>, Cow<'a, RawValue>)>);

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| &**v)
    }

    fn get_cow(&self, key: &str) -> Option<Cow<'a, RawValue>> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    /// Remove every occurrence of `key`; the value of the last one.
    fn remove(&mut self, key: &str) -> Option<Cow<'a, RawValue>> {
        let mut removed = None;
        let mut i = 0;
        while i < self.0.len() {
            if self.0[i].0 == key {
                removed = Some(self.0.remove(i).1);
            } else {
                i += 1;
            }
        }
        removed
    }

    /// Set `key`, in place if it is there (keeping the field order), else
    /// at the end.
    fn set(&mut self, key: &'static str, value: Cow<'a, RawValue>) {
        let count = self.0.iter().filter(|(k, _)| k == key).count();
        if count > 1 {
            let mut left = count;
            self.0.retain(|(k, _)| {
                if k != key {
                    return true;
                }
                left -= 1;
                left == 0
            });
        }
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.0.push((Cow::Borrowed(key), value)),
        }
    }

    /// Length of [`Fields::to_json`] for keys without escapes (exact for
    /// every real event; a close estimate otherwise).
    fn json_len(&self) -> usize {
        let commas = self.0.len().saturating_sub(1);
        2 + commas
            + self
                .0
                .iter()
                .map(|(k, v)| k.len() + 3 + v.get().len())
                .sum::<usize>()
    }

    fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut out = Vec::with_capacity(self.json_len() + 16);
        out.push(b'{');
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            if k.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
                out.push(b'"');
                out.extend_from_slice(k.as_bytes());
                out.push(b'"');
            } else {
                serde_json::to_writer(&mut out, k)?;
            }
            out.push(b':');
            out.extend_from_slice(v.get().as_bytes());
        }
        out.push(b'}');
        Ok(out)
    }
}

/// A JSON string as a raw value.
fn raw_string(s: &str) -> Result<Cow<'static, RawValue>, CollectError> {
    serde_json::value::to_raw_value(s)
        .map(Cow::Owned)
        .map_err(|e| CollectError::Internal(e.to_string()))
}

/// A JSON string, borrowed from the body when it has no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The value as a string, if it is a JSON string.
fn string(value: &RawValue) -> Option<Cow<'_, str>> {
    let text = value.get();
    if !text.starts_with('"') {
        return None;
    }
    serde_json::from_str::<Str>(text).ok().map(|s| s.0)
}

/// A usable identifier: a non-empty string or a number.
fn identifier(value: Option<&RawValue>) -> Option<Cow<'_, str>> {
    let value = value?;
    match value.get().as_bytes().first()? {
        b'"' => string(value).filter(|s| !s.is_empty()),
        b'-' | b'0'..=b'9' => serde_json::from_str::<serde_json::Number>(value.get())
            .ok()
            .map(|n| Cow::Owned(n.to_string())),
        _ => None,
    }
}

/// The offset of the first `\uD800`–`\uDFFF` escape that is not half of
/// a surrogate pair, in a body that parsed as JSON (so every backslash is
/// inside a string and starts an escape).
fn lone_surrogate(body: &[u8]) -> Option<usize> {
    let hex = |at: usize| -> Option<u32> {
        let digits = body.get(at..at + 4)?;
        u32::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let unicode_escape =
        |at: usize| -> Option<u32> { (body.get(at..at + 2)? == b"\\u").then(|| hex(at + 2))? };
    let mut i = 0;
    while let Some(found) = next_backslash(body, i) {
        let Some(code) = unicode_escape(found) else {
            i = found + 2; // `\"`, `\\`, `\n`, ...: one escaped byte
            continue;
        };
        i = found + 6;
        match code {
            0xD800..=0xDBFF => match unicode_escape(i) {
                Some(0xDC00..=0xDFFF) => i += 6,
                _ => return Some(found),
            },
            0xDC00..=0xDFFF => return Some(found),
            _ => {}
        }
    }
    None
}

/// The next backslash at or after `from`, eight bytes at a time.
fn next_backslash(body: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let rest = body.get(from..)?;
    let mut chunks = rest.chunks_exact(8);
    let mut offset = from;
    for chunk in chunks.by_ref() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word) ^ (ONES * u64::from(b'\\'));
        // A zero byte in `x` is a backslash in the chunk.
        if x.wrapping_sub(ONES) & !x & HIGHS != 0 {
            return chunk.iter().position(|&b| b == b'\\').map(|p| offset + p);
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'\\')
        .map(|p| offset + p)
}

fn is_null(value: &RawValue) -> bool {
    value.get() == "null"
}

/// The parsed body of a request.
enum Doc<'a> {
    /// A JSON object; with `batch` parsed for a batch call.
    Object {
        fields: Fields<'a>,
        batch: Option<BatchField<'a>>,
    },
    NotAnObject,
}

/// The `batch` field of a batch call.
enum BatchField<'a> {
    Items(Vec<Node<'a>>),
    NotAnArray,
}

/// One item of a batch.
enum Node<'a> {
    Object(Fields<'a>),
    NotAnObject,
}

/// The body of a single-event call.
struct SingleDoc<'a>(Doc<'a>);
/// The body of a batch call.
struct BatchDoc<'a>(Doc<'a>);

impl<'de> Deserialize<'de> for SingleDoc<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DocVisitor { batch: false })
            .map(SingleDoc)
    }
}

impl<'de> Deserialize<'de> for BatchDoc<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DocVisitor { batch: true }).map(BatchDoc)
    }
}

impl<'de> Deserialize<'de> for Node<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

impl<'de> Deserialize<'de> for BatchField<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BatchVisitor)
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(NodeVisitor)? {
            Node::Object(fields) => Ok(fields),
            Node::NotAnObject => Err(de::Error::custom("expected a JSON object")),
        }
    }
}

/// Read a map's entries: values raw, except `batch` when `batch` is set.
fn read_fields<'de, A: MapAccess<'de>>(
    mut map: A,
    batch: bool,
) -> Result<(Fields<'de>, Option<BatchField<'de>>), A::Error> {
    let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(16));
    let mut items = None;
    while let Some(Str(key)) = map.next_key::<Str<'de>>()? {
        if batch && key == "batch" {
            items = Some(map.next_value::<BatchField<'de>>()?);
        } else {
            let value: &'de RawValue = map.next_value()?;
            fields.push((key, Cow::Borrowed(value)));
        }
    }
    Ok((Fields(fields), items))
}

/// Values that are not what the visitor looks for still have to be read
/// (and so validated) to the end.
fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<de::IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Implement the visits of everything but a map (or, with `seq`, an
/// array) as "not what we want".
macro_rules! visit_others {
    ($other:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($other)
        }
    };
}

struct DocVisitor {
    batch: bool,
}

impl<'de> Visitor<'de> for DocVisitor {
    type Value = Doc<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Doc<'de>, A::Error> {
        let (fields, batch) = read_fields(map, self.batch)?;
        Ok(Doc::Object { fields, batch })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Doc<'de>, A::Error> {
        skip_seq(seq)?;
        Ok(Doc::NotAnObject)
    }
    visit_others!(Doc::NotAnObject);
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Node<'de>, A::Error> {
        Ok(Node::Object(read_fields(map, false)?.0))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Node<'de>, A::Error> {
        skip_seq(seq)?;
        Ok(Node::NotAnObject)
    }
    visit_others!(Node::NotAnObject);
}

struct BatchVisitor;

impl<'de> Visitor<'de> for BatchVisitor {
    type Value = BatchField<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<BatchField<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(128).min(4096));
        while let Some(item) = seq.next_element::<Node<'de>>()? {
            items.push(item);
        }
        Ok(BatchField::Items(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BatchField<'de>, A::Error> {
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        Ok(BatchField::NotAnArray)
    }
    visit_others!(BatchField::NotAnArray);
}

/// Split a batch request into its items, merging batch-level `context`,
/// `integrations` and `sentAt` into each, and enforcing the count and
/// per-event size limits.
fn split_batch<'a>(
    mut doc: Fields<'a>,
    batch: Option<BatchField<'a>>,
    cfg: &CollectorConfig,
    events: &mut usize,
) -> Result<Vec<Item<'a>>, CollectError> {
    let batch = match batch {
        Some(BatchField::Items(batch)) => batch,
        Some(BatchField::NotAnArray) => {
            return Err(CollectError::invalid(
                "batch",
                "invalid_batch",
                "expected an array",
            ))
        }
        None => return Err(CollectError::invalid("batch", "invalid_batch", "required")),
    };
    *events = batch.len().max(1);
    if batch.len() > cfg.max_batch_events {
        return Err(CollectError::TooManyEvents {
            count: batch.len(),
            limit: cfg.max_batch_events,
        });
    }
    let context = doc.remove("context");
    let integrations = doc.remove("integrations");
    let sent_at = doc.remove("sentAt");
    let mut items = Vec::with_capacity(batch.len());
    for (i, item) in batch.into_iter().enumerate() {
        let Node::Object(mut item) = item else {
            return Err(CollectError::invalid(
                at(Some(i)),
                "not_an_object",
                "expected a JSON object",
            ));
        };
        if item.json_len() > cfg.max_event_bytes {
            return Err(CollectError::EventTooLarge {
                at: at(Some(i)),
                limit: cfg.max_event_bytes,
            });
        }
        if item
            .get("type")
            .and_then(string)
            .and_then(|t| EventType::parse(&t))
            .is_none()
        {
            return Err(CollectError::invalid(
                format!("{}.type", at(Some(i))),
                "invalid_type",
                "expected identify, track, page, screen, group or alias",
            ));
        }
        merge_missing(&mut item, "context", context.as_ref())?;
        merge_missing(&mut item, "integrations", integrations.as_ref())?;
        merge_missing(&mut item, "sentAt", sent_at.as_ref())?;
        items.push(Item {
            index: Some(i),
            fields: item,
        });
    }
    Ok(items)
}

/// Give `item[field]` the batch-level value where the item lacks it; for
/// objects, key by key (the item's own keys win).
fn merge_missing<'a>(
    item: &mut Fields<'a>,
    field: &'static str,
    batch_value: Option<&Cow<'a, RawValue>>,
) -> Result<(), CollectError> {
    let Some(batch_value) = batch_value else {
        return Ok(());
    };
    let own = item.get(field);
    if own.is_none_or(is_null) {
        item.set(field, batch_value.clone());
        return Ok(());
    }
    let both_objects =
        own.is_some_and(|v| v.get().starts_with('{')) && batch_value.get().starts_with('{');
    if !both_objects {
        return Ok(());
    }
    // The rare case (a batch-level and an item-level object): merge as trees.
    let parse = |v: &str| {
        serde_json::from_str::<Map<String, Value>>(v)
            .map_err(|e| CollectError::Internal(e.to_string()))
    };
    let mut merged = parse(own.map_or("{}", RawValue::get))?;
    for (k, v) in parse(batch_value.get())? {
        merged.entry(k).or_insert(v);
    }
    let merged = serde_json::value::to_raw_value(&merged)
        .map_err(|e| CollectError::Internal(e.to_string()))?;
    item.set(field, Cow::Owned(merged));
    Ok(())
}

/// Check what the edge must check, then set `receivedAt`, `messageId` and
/// the skew-corrected `timestamp`. The key is the anonymousId if present,
/// else the userId, so one visitor's events share a partition.
fn enrich<'a>(
    mut event: Fields<'a>,
    received_ms: i64,
    received_at: &'a RawValue,
    index: Option<usize>,
) -> Result<Prepared, CollectError> {
    let key = identifier(event.get("anonymousId"))
        .or_else(|| identifier(event.get("userId")))
        .map(Cow::into_owned)
        .ok_or_else(|| {
            CollectError::invalid(at(index), "missing_id", "userId or anonymousId is required")
        })?;
    let is_track = event
        .get("type")
        .and_then(string)
        .is_some_and(|t| t == EventType::Track.as_str());
    let has_event_name = event
        .get("event")
        .and_then(string)
        .is_some_and(|e| !e.is_empty());
    if is_track && !has_event_name {
        return Err(CollectError::invalid(
            at(index),
            "missing_event",
            "a track call needs an event name",
        ));
    }
    // The write key is a credential: never let it reach the topic.
    event.remove("writeKey");
    if identifier(event.get("messageId")).is_none() {
        let id = format!("api-{}", uuid::Uuid::new_v4());
        event.set("messageId", raw_string(&id)?);
    }
    event.set("receivedAt", Cow::Borrowed(received_at));

    let time_of = |field: &str, event: &Fields<'a>| {
        event.get_cow(field).and_then(|raw| {
            let ms = string(&raw).and_then(|s| parse_time_ms(&s))?;
            Some((raw, ms))
        })
    };
    let sent_ms = time_of("sentAt", &event).map(|(_, ms)| ms);
    // RudderStack SDKs send `originalTimestamp` instead of `timestamp`.
    let client = match event.get("timestamp").and_then(string) {
        Some(_) => time_of("timestamp", &event),
        None => time_of("originalTimestamp", &event),
    };
    match (client, sent_ms) {
        (Some((original, client_ms)), Some(sent_ms)) => {
            let corrected = received_ms.saturating_sub(sent_ms.saturating_sub(client_ms));
            event.set("timestamp", raw_string(&rfc3339_ms(corrected))?);
            event.set("originalTimestamp", original);
        }
        // A timestamp without sentAt (or unparsable) is kept as sent; the
        // validate stage judges its format. No timestamp: receivedAt.
        _ => {
            if event.get("timestamp").is_none_or(is_null) {
                event.set("timestamp", Cow::Borrowed(received_at));
            }
        }
    }
    let payload = event
        .to_json()
        .map_err(|e| CollectError::Internal(e.to_string()))?;
    Ok(Prepared { key, payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::time::Duration;

    use cdp_pipeline::{ClientFactory, Health, KafkaConfig};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;
    use rdkafka::{Message, Offset, TopicPartitionList};

    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    type TestResult = Result<(), BoxError>;

    const WRITE_KEY: &str = "wk_web_123";
    const PARTITIONS: i32 = 2;

    /// A collector served on a real socket, producing to an in-process
    /// broker (real Kafka protocol over TCP).
    struct Env {
        mock: Option<MockCluster<'static, DefaultProducerContext>>,
        brokers: String,
        topic: String,
        base: String,
        http: reqwest::Client,
        shutdown: Shutdown,
        health: Health,
        server: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    fn unique(prefix: &str) -> String {
        format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
    }

    async fn start_with(
        config: CollectorConfig,
        producer_props: &[(&str, &str)],
    ) -> Result<Env, BoxError> {
        let mock = MockCluster::new(1)?;
        let brokers = mock.bootstrap_servers();
        let topic = unique("raw");
        mock.create_topic(&topic, PARTITIONS, 1)?;
        let mut kafka = KafkaConfig {
            brokers: brokers.clone(),
            ..Default::default()
        };
        for (k, v) in producer_props {
            kafka
                .properties
                .insert(format!("producer.{k}"), v.to_string());
        }
        let factory = ClientFactory::new(kafka)?;
        let sources = [SourceConfig {
            id: "web".into(),
            write_key: WRITE_KEY.into(),
            tracking_plan: None,
        }];
        let collector = Collector::new(config, &sources, &factory, topic.clone())?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let shutdown = Shutdown::default();
        let health = Health::default();
        let server = tokio::spawn(collector.serve_on(
            listener,
            shutdown.clone(),
            health.register("collect"),
        ));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()?;
        Ok(Env {
            mock: Some(mock),
            brokers,
            topic,
            base,
            http,
            shutdown,
            health,
            server,
        })
    }

    async fn start() -> Result<Env, BoxError> {
        start_with(CollectorConfig::default(), &[]).await
    }

    /// One record read back from the topic.
    #[derive(Debug)]
    struct Consumed {
        key: Option<String>,
        value: Value,
        source: Option<String>,
    }

    impl Env {
        fn post(&self, path: &str) -> reqwest::RequestBuilder {
            self.http.post(format!("{}{path}", self.base))
        }

        fn authed(&self, path: &str) -> reqwest::RequestBuilder {
            self.post(path).basic_auth(WRITE_KEY, Some(""))
        }

        /// Read `expected` records from every partition, or fail at the
        /// deadline.
        async fn consume(&self, expected: usize) -> Result<Vec<Consumed>, BoxError> {
            let brokers = self.brokers.clone();
            let topic = self.topic.clone();
            tokio::task::spawn_blocking(move || consume_blocking(&brokers, &topic, expected))
                .await?
        }

        async fn stop(self) -> TestResult {
            self.shutdown.trigger();
            tokio::time::timeout(Duration::from_secs(10), self.server).await???;
            drop(self.mock);
            Ok(())
        }
    }

    fn consume_blocking(
        brokers: &str,
        topic: &str,
        expected: usize,
    ) -> Result<Vec<Consumed>, BoxError> {
        let consumer: BaseConsumer = ClientFactory::new(KafkaConfig {
            brokers: brokers.to_string(),
            ..Default::default()
        })?
        .plain_consumer(&unique("test"))?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut out = Vec::new();
        while out.len() < expected && Instant::now() < deadline {
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message?;
            let source = message.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == envelope::SOURCE)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
            out.push(Consumed {
                key: message
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned()),
                value: serde_json::from_slice(message.payload().unwrap_or_default())?,
                source,
            });
        }
        if out.len() < expected {
            return Err(format!(
                "read {} of {expected} records before the deadline",
                out.len()
            )
            .into());
        }
        Ok(out)
    }

    async fn json_body(response: reqwest::Response) -> Result<(StatusCode, Value), BoxError> {
        let status = StatusCode::from_u16(response.status().as_u16())?;
        Ok((status, response.json().await?))
    }

    fn str_field<'a>(v: &'a Value, field: &str) -> &'a str {
        v.get(field).and_then(Value::as_str).unwrap_or_default()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn track_is_acknowledged_enriched_and_keyed_by_anonymous_id() -> TestResult {
        let env = start().await?;
        let before = metrics::HTTP_REQUESTS
            .with_label_values(&["/v1/track", "200"])
            .get();
        let response = env
            .authed("/v1/track")
            .json(&json!({
                "userId": "u_42", "anonymousId": "anon-1", "event": "Order Completed",
                "properties": {"revenue": 12},
                "timestamp": "2020-01-01T00:00:00.000Z", "sentAt": "2020-01-01T00:00:10.000Z"
            }))
            .send()
            .await?;
        assert_eq!(
            json_body(response).await?,
            (StatusCode::OK, json!({"success": true}))
        );
        let records = env.consume(1).await?;
        let r = &records[0];
        assert_eq!(r.key.as_deref(), Some("anon-1"));
        assert_eq!(r.source.as_deref(), Some("web"));
        assert_eq!(str_field(&r.value, "type"), "track");
        assert_eq!(str_field(&r.value, "event"), "Order Completed");
        assert!(str_field(&r.value, "messageId").starts_with("api-"));
        assert_eq!(
            str_field(&r.value, "originalTimestamp"),
            "2020-01-01T00:00:00.000Z"
        );
        let received = parse_time_ms(str_field(&r.value, "receivedAt")).ok_or("receivedAt")?;
        let timestamp = parse_time_ms(str_field(&r.value, "timestamp")).ok_or("timestamp")?;
        assert_eq!(
            received - timestamp,
            10_000,
            "timestamp = receivedAt - (sentAt - timestamp)"
        );
        assert!((chrono::Utc::now().timestamp_millis() - received).abs() < 60_000);
        assert!(r.value.get("writeKey").is_none());
        assert!(
            metrics::HTTP_REQUESTS
                .with_label_values(&["/v1/track", "200"])
                .get()
                > before
        );
        env.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_merges_context_and_takes_the_write_key_from_the_body() -> TestResult {
        let env = start().await?;
        let response = env
            .post("/v1/batch")
            .json(&json!({
                "writeKey": WRITE_KEY,
                "context": {"library": {"name": "analytics-node"}, "ip": "1.2.3.4"},
                "integrations": {"All": true},
                "batch": [
                    {"type": "identify", "userId": "u_1", "traits": {"email": "a@example.com"}, "messageId": "m-1"},
                    {"type": "page", "userId": "u_2", "name": "Home", "context": {"ip": "9.9.9.9"}, "messageId": "m-2"}
                ]
            }))
            .send()
            .await?;
        assert_eq!(json_body(response).await?.0, StatusCode::OK);
        let mut records = env.consume(2).await?;
        records
            .sort_by(|a, b| str_field(&a.value, "messageId").cmp(str_field(&b.value, "messageId")));
        let (first, second) = (&records[0].value, &records[1].value);
        assert_eq!(
            records[0].key.as_deref(),
            Some("u_1"),
            "userId keys when anonymousId is absent"
        );
        assert_eq!(
            first["context"],
            json!({"library": {"name": "analytics-node"}, "ip": "1.2.3.4"})
        );
        assert_eq!(first["integrations"], json!({"All": true}));
        assert_eq!(
            second["context"],
            json!({"ip": "9.9.9.9", "library": {"name": "analytics-node"}})
        );
        assert_eq!(str_field(second, "type"), "page");
        // No client timestamp: the event happened when it was received.
        assert_eq!(
            str_field(first, "timestamp"),
            str_field(first, "receivedAt")
        );
        assert!(records
            .iter()
            .all(|r| r.value.get("writeKey").is_none() && r.source.as_deref() == Some("web")));
        env.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_unauthenticated_and_incomplete_requests_are_refused() -> TestResult {
        let env = start().await?;
        let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
            (
                env.authed("/v1/track").body("{not json"),
                StatusCode::BAD_REQUEST,
                "invalid JSON",
            ),
            (
                env.authed("/v1/track").body("[1]"),
                StatusCode::BAD_REQUEST,
                "expected a JSON object",
            ),
            (
                env.authed("/v1/identify").json(&json!({"traits": {}})),
                StatusCode::BAD_REQUEST,
                "userId or anonymousId",
            ),
            (
                env.authed("/v1/track").json(&json!({"userId": "u"})),
                StatusCode::BAD_REQUEST,
                "event name",
            ),
            (
                env.authed("/v1/batch")
                    .json(&json!({"batch": [{"userId": "u"}]})),
                StatusCode::BAD_REQUEST,
                "batch[0].type",
            ),
            (
                env.post("/v1/track")
                    .basic_auth("wk_nope", Some(""))
                    .json(&json!({"userId": "u", "event": "E"})),
                StatusCode::UNAUTHORIZED,
                "unknown write key",
            ),
            (
                env.post("/v1/track")
                    .json(&json!({"userId": "u", "event": "E"})),
                StatusCode::UNAUTHORIZED,
                "missing write key",
            ),
            (
                env.post("/v1/track")
                    .json(&json!({"userId": "u", "event": "E", "writeKey": "wk_nope"})),
                StatusCode::UNAUTHORIZED,
                "unknown write key",
            ),
        ];
        for (request, status, reason) in cases {
            let (got, body) = json_body(request.send().await?).await?;
            assert_eq!(got, status, "{body}");
            assert_eq!(body["success"], json!(false));
            assert!(
                str_field(&body, "error").contains(reason),
                "{body} should mention {reason}"
            );
            // SDKs log `code` and `message` from a failed request.
            assert_eq!(body["message"], body["error"], "{body}");
            assert!(!str_field(&body, "code").is_empty(), "{body}");
        }
        // Nothing refused reached the topic: the one good event is the first record.
        let ok = env
            .authed("/v1/screen")
            .json(&json!({"anonymousId": "a", "name": "Home"}))
            .send()
            .await?;
        assert_eq!(ok.status().as_u16(), 200);
        let records = env.consume(1).await?;
        assert_eq!(str_field(&records[0].value, "type"), "screen");
        env.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_batch_is_refused_whole_and_bad_encodings_and_auth_headers_too() -> TestResult {
        let env = start().await?;
        let good = json!({"type": "track", "userId": "u", "event": "Fine"});
        let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
            (
                env.authed("/v1/batch")
                    .json(&json!({"batch": {"type": "track"}})),
                StatusCode::BAD_REQUEST,
                "batch: expected an array",
            ),
            (
                env.authed("/v1/batch").json(&json!({"events": []})),
                StatusCode::BAD_REQUEST,
                "batch: required",
            ),
            (
                env.authed("/v1/batch")
                    .json(&json!({"batch": [good.clone(), "track"]})),
                StatusCode::BAD_REQUEST,
                "batch[1]: expected a JSON object",
            ),
            // One bad item refuses the request: the good ones before it
            // are not written either, so a fixed retry never duplicates.
            (
                env.authed("/v1/batch").json(&json!({"batch": [
                    good.clone(), good.clone(), {"type": "track", "event": "No Id"}
                ]})),
                StatusCode::BAD_REQUEST,
                "batch[2]: userId or anonymousId",
            ),
            (
                env.authed("/v1/track")
                    .body(r#"{"userId": "u", "event": "E", "properties": {"p": "\ud800"}}"#),
                StatusCode::BAD_REQUEST,
                "lone surrogate",
            ),
            (
                env.authed("/v1/track")
                    .header("content-encoding", "gzip")
                    .body("this is not gzip"),
                StatusCode::BAD_REQUEST,
                "cannot read the request body",
            ),
            (
                env.post("/v1/track")
                    .header("authorization", "Bearer wk_web_123")
                    .json(&good),
                StatusCode::UNAUTHORIZED,
                "malformed Authorization",
            ),
            (
                env.post("/v1/track")
                    .header("authorization", "Basic %%%")
                    .json(&good),
                StatusCode::UNAUTHORIZED,
                "malformed Authorization",
            ),
        ];
        for (request, status, reason) in cases {
            let (got, body) = json_body(request.send().await?).await?;
            assert_eq!(got, status, "{body}");
            assert_eq!(body["success"], json!(false));
            assert!(
                str_field(&body, "error").contains(reason),
                "{body} should mention {reason}"
            );
        }
        let ok = env
            .authed("/v1/track")
            .json(&json!({"userId": "u", "event": "Last"}))
            .send()
            .await?;
        assert_eq!(ok.status().as_u16(), 200);
        let records = env.consume(1).await?;
        assert_eq!(
            str_field(&records[0].value, "event"),
            "Last",
            "nothing of a refused request reached the topic"
        );
        env.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_events_and_batches_get_413() -> TestResult {
        let env = start().await?;
        let big = "x".repeat(33 * 1024);
        let event = |pad: &str| json!({"type": "track", "userId": "u", "event": "E", "properties": {"pad": pad}});
        let too_many: Vec<Value> = (0..2501)
            .map(|_| json!({"type": "track", "userId": "u", "event": "E"}))
            .collect();
        let too_big: Vec<Value> = (0..20).map(|_| event(&"y".repeat(30 * 1024))).collect();
        let cases = vec![
            (
                env.authed("/v1/track").json(&event(&big)),
                "event larger than",
            ),
            (
                env.authed("/v1/batch")
                    .json(&json!({"batch": [event(&big)]})),
                "batch[0]: event larger than",
            ),
            (
                env.authed("/v1/batch").json(&json!({"batch": too_many})),
                "at most 2500",
            ),
            (
                env.authed("/v1/batch").json(&json!({"batch": too_big})),
                "request body larger than",
            ),
        ];
        for (request, reason) in cases {
            let (status, body) = json_body(request.send().await?).await?;
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
            assert!(
                str_field(&body, "error").contains(reason),
                "{body} should mention {reason}"
            );
        }
        // A small gzip body that inflates past the limit is refused too.
        let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        bomb.write_all(br#"{"batch":[], "pad":""#)?;
        bomb.write_all(&vec![b' '; 600 * 1024])?;
        bomb.write_all(br#""}"#)?;
        let bomb = bomb.finish()?;
        assert!(bomb.len() < 10 * 1024);
        let response = env
            .authed("/v1/batch")
            .header("content-encoding", "gzip")
            .body(bomb)
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 413);
        env.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gzip_bodies_are_accepted() -> TestResult {
        let env = start().await?;
        let body = json!({"batch": [{"type": "track", "anonymousId": "a-9", "event": "Zipped"}]});
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(body.to_string().as_bytes())?;
        let response = env
            .authed("/v1/import")
            .header("content-encoding", "gzip")
            .header("content-type", "application/json")
            .body(gz.finish()?)
            .send()
            .await?;
        assert_eq!(json_body(response).await?.0, StatusCode::OK);
        let records = env.consume(1).await?;
        assert_eq!(str_field(&records[0].value, "event"), "Zipped");
        assert_eq!(records[0].key.as_deref(), Some("a-9"));
        env.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn analytics_js_one_letter_paths_with_text_plain_bodies() -> TestResult {
        let env = start().await?;
        // analytics.js posts `text/plain` (no CORS preflight) with the write
        // key in the body, to `/v1/` plus the type's first letter.
        let calls = [
            ("/v1/i", json!({"userId": "u", "traits": {"plan": "pro"}})),
            ("/v1/t", json!({"userId": "u", "event": "Clicked"})),
            ("/v1/p", json!({"userId": "u", "name": "Home"})),
            ("/v1/s", json!({"userId": "u", "name": "Feed"})),
            ("/v1/g", json!({"userId": "u", "groupId": "g1"})),
            ("/v1/a", json!({"userId": "u", "previousId": "a1"})),
            (
                "/v1/b",
                json!({"batch": [{"type": "track", "userId": "u", "event": "Batched"}]}),
            ),
        ];
        for (path, mut body) in calls {
            body["writeKey"] = json!(WRITE_KEY);
            let response = env
                .post(path)
                .header("content-type", "text/plain")
                .body(body.to_string())
                .send()
                .await?;
            assert_eq!(json_body(response).await?.0, StatusCode::OK, "{path}");
        }
        // One key, one partition: the order of the calls.
        let records = env.consume(7).await?;
        let kinds: Vec<&str> = records
            .iter()
            .map(|r| str_field(&r.value, "type"))
            .collect();
        assert_eq!(
            kinds,
            ["identify", "track", "page", "screen", "group", "alias", "track"]
        );
        assert_eq!(str_field(&records[6].value, "event"), "Batched");
        env.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn settings_cors_and_unknown_routes() -> TestResult {
        let env = start().await?;
        let response = env
            .http
            .get(format!("{}/v1/projects/{WRITE_KEY}/settings", env.base))
            .send()
            .await?;
        let (status, body) = json_body(response).await?;
        assert_eq!(status, StatusCode::OK);
        let host = env.base.trim_start_matches("http://");
        assert_eq!(
            body,
            json!({"integrations": {"Segment.io": {"apiKey": WRITE_KEY, "apiHost": format!("{host}/v1")}},
                   "plan": {"track": {"__default": {"enabled": true}}}})
        );
        let unknown = env
            .http
            .get(format!("{}/v1/projects/wk_nope/settings", env.base))
            .send()
            .await?;
        assert_eq!(unknown.status().as_u16(), 404);

        let preflight = env
            .http
            .request(reqwest::Method::OPTIONS, format!("{}/v1/track", env.base))
            .header("origin", "https://shop.example.com")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,authorization",
            )
            .send()
            .await?;
        assert!(preflight.status().is_success());
        assert_eq!(
            preflight
                .headers()
                .get("access-control-allow-origin")
                .and_then(|v| v.to_str().ok()),
            Some("*")
        );
        let missing = env.authed("/v1/nothing").body("{}").send().await?;
        assert_eq!(missing.status().as_u16(), 404);
        env.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn broker_gone_means_503_with_retry_after() -> TestResult {
        let mut env = start_with(
            CollectorConfig::default(),
            &[("message.timeout.ms", "1500")],
        )
        .await?;
        // The broker disappears: nothing can be acknowledged any more.
        drop(env.mock.take());
        let started = Instant::now();
        let response = env
            .authed("/v1/track")
            .json(&json!({"userId": "u", "event": "Lost"}))
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 503);
        assert_eq!(
            response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some(RETRY_AFTER_SECS)
        );
        let body: Value = response.json().await?;
        assert_eq!(body["success"], json!(false));
        assert!(
            str_field(&body, "error").contains("broker did not take"),
            "{body}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        env.stop().await
    }

    /// Poll `done` until it holds or `timeout` passes; whether it held.
    async fn eventually(timeout: Duration, done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        done()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broker_outage_is_a_prompt_503_and_not_ready_and_then_it_recovers() -> TestResult {
        // The producer keeps its default message timeout (30 s), longer
        // than the HTTP client's (15 s): only the probe answers in time.
        let env = start().await?;
        let mock = env.mock.as_ref().ok_or("no broker")?;
        let track =
            |n: u32| json!({"userId": "u", "event": "Outage", "messageId": format!("m{n}")});
        let ok = env.authed("/v1/track").json(&track(1)).send().await?;
        assert_eq!(ok.status().as_u16(), 200);
        assert!(
            eventually(Duration::from_secs(10), || env
                .health
                .not_ready()
                .is_empty())
            .await
        );

        mock.broker_down(1)?;
        assert!(
            eventually(Duration::from_secs(10), || !env
                .health
                .not_ready()
                .is_empty())
            .await,
            "/readyz must go false while the broker is away"
        );
        let refused = env.authed("/v1/track").json(&track(2)).send().await?;
        assert_eq!(refused.status().as_u16(), 503);
        assert_eq!(
            refused
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some(RETRY_AFTER_SECS)
        );

        mock.broker_up(1)?;
        assert!(
            eventually(Duration::from_secs(20), || env
                .health
                .not_ready()
                .is_empty())
            .await,
            "/readyz must come back with the broker"
        );
        let back = env.authed("/v1/track").json(&track(3)).send().await?;
        assert_eq!(back.status().as_u16(), 200);
        let ids: Vec<String> = env
            .consume(2)
            .await?
            .iter()
            .map(|c| str_field(&c.value, "messageId").to_string())
            .collect();
        assert!(
            ids.contains(&"m1".to_string()) && ids.contains(&"m3".to_string()),
            "{ids:?}"
        );
        env.stop().await
    }

    /// Send raw bytes on a fresh connection and read the answer (until the
    /// server closes or 5 s pass).
    async fn raw_exchange(env: &Env, request: &[u8]) -> Result<String, BoxError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = env.base.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let read = async {
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&answer);
                if text.contains("\r\n\r\n") && text.trim_end().ends_with('}') {
                    break;
                }
            }
            Ok::<_, std::io::Error>(())
        };
        tokio::time::timeout(Duration::from_secs(5), read).await??;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_that_does_not_arrive_in_time_gets_408() -> TestResult {
        let config = CollectorConfig {
            body_timeout: Span::from_millis(300),
            ..Default::default()
        };
        let env = start_with(config, &[]).await?;
        // Announces 100 bytes, sends 10, then stalls.
        let request = b"POST /v1/track HTTP/1.1\r\nhost: x\r\nauthorization: Basic d2tfd2ViXzEyMzo=\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"userId\":";
        let answer = raw_exchange(&env, request).await?;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        env.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_past_the_cap_get_503_with_retry_after() -> TestResult {
        let config = CollectorConfig {
            max_connections: 1,
            ..Default::default()
        };
        let env = start_with(config, &[]).await?;
        let addr = env.base.trim_start_matches("http://").to_string();
        // A slow client holds the only slot.
        let held = tokio::net::TcpStream::connect(&addr).await?;
        let answer = raw_exchange(
            &env,
            b"GET /v1/projects/x/settings HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await?;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("retry-after: "), "{answer}");
        assert!(answer.contains("too_many_connections"), "{answer}");
        drop(held);
        // The slot frees once the slow client goes away.
        let mut ok = false;
        for _ in 0..50 {
            let fresh = reqwest::Client::new();
            let r = fresh
                .post(format!("{}/v1/track", env.base))
                .basic_auth(WRITE_KEY, Some(""))
                .json(&json!({"userId": "u", "event": "After"}))
                .send()
                .await?;
            if r.status().as_u16() == 200 {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "the freed slot must take a new connection");
        env.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spent_memory_budget_means_503() -> TestResult {
        let config = CollectorConfig {
            max_in_flight_bytes: 16,
            ..Default::default()
        };
        let env = start_with(config, &[]).await?;
        let response = env
            .authed("/v1/track")
            .json(&json!({"userId": "u", "event": "Bigger than sixteen bytes"}))
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 503);
        assert!(response.headers().get("retry-after").is_some());
        env.stop().await
    }

    /// Enrich one event given as JSON text, as the collector would.
    fn enrich_text(text: &str, received_ms: i64) -> Result<Prepared, BoxError> {
        let fields: Fields = serde_json::from_str(text)?;
        let received_at = raw_string(&rfc3339_ms(received_ms)).map_err(|e| e.to_string())?;
        Ok(enrich(fields, received_ms, &received_at, None).map_err(|e| e.to_string())?)
    }

    #[test]
    fn skew_correction_and_defaults() -> TestResult {
        let received = parse_time_ms("2026-01-01T12:00:00.000Z").ok_or("time")?;
        let run = |v: Value| enrich_text(&v.to_string(), received);
        let decode = |p: Prepared| serde_json::from_slice::<Value>(&p.payload);

        // Client clock 1h behind: sentAt and timestamp both from that clock.
        let skewed = json!({"type": "track", "event": "E", "userId": "u",
            "timestamp": "2026-01-01T10:59:50.000Z", "sentAt": "2026-01-01T11:00:00.000Z"});
        let v = decode(run(skewed)?)?;
        assert_eq!(str_field(&v, "timestamp"), "2026-01-01T11:59:50.000Z");
        assert_eq!(
            str_field(&v, "originalTimestamp"),
            "2026-01-01T10:59:50.000Z"
        );

        // RudderStack style: originalTimestamp + sentAt.
        let rudder = json!({"type": "page", "anonymousId": "a",
            "originalTimestamp": "2026-01-01T11:00:00.000Z", "sentAt": "2026-01-01T11:00:01.000Z"});
        let v = decode(run(rudder)?)?;
        assert_eq!(str_field(&v, "timestamp"), "2026-01-01T11:59:59.000Z");

        // Timestamp without sentAt is kept; none at all becomes receivedAt.
        let kept = json!({"type": "identify", "userId": 42, "timestamp": "2025-05-05T00:00:00Z", "messageId": "m"});
        let p = run(kept)?;
        assert_eq!(p.key, "42");
        let v = decode(p)?;
        assert_eq!(str_field(&v, "timestamp"), "2025-05-05T00:00:00Z");
        assert_eq!(str_field(&v, "messageId"), "m");
        let bare = json!({"type": "identify", "userId": "u", "anonymousId": ""});
        let p = run(bare)?;
        assert_eq!(p.key, "u", "an empty anonymousId does not count");
        let v = decode(p)?;
        assert_eq!(str_field(&v, "timestamp"), "2026-01-01T12:00:00.000Z");
        assert_eq!(str_field(&v, "receivedAt"), "2026-01-01T12:00:00.000Z");
        // A null timestamp counts as none; an unparsable one is kept.
        let null = json!({"type": "identify", "userId": "u", "timestamp": null, "sentAt": "x"});
        let v = decode(run(null)?)?;
        assert_eq!(str_field(&v, "timestamp"), "2026-01-01T12:00:00.000Z");
        let odd = json!({"type": "identify", "userId": "u", "timestamp": "yesterday",
            "sentAt": "2026-01-01T11:00:00.000Z"});
        let v = decode(run(odd)?)?;
        assert_eq!(str_field(&v, "timestamp"), "yesterday");
        Ok(())
    }

    #[test]
    fn events_are_copied_through_verbatim_with_their_field_order() -> TestResult {
        let received = parse_time_ms("2026-01-01T12:00:00.000Z").ok_or("time")?;
        // Whitespace, escapes in keys and values, unicode, deep nesting,
        // numbers that a float would round, and a key sent twice.
        let text = r#" { "userId" : "u\"1\u00e9" , "type":"track", "event": "Caf\u00e9 \u2615",
            "properties": {"big": 12345678901234567890123, "nested": [ {"a": [1, 2.50, null]} ],
            "q\"k": "v"}, "weird\nkey": true, "event": "Second", "writeKey": "wk_secret",
            "messageId": 7 } "#;
        let p = enrich_text(text, received)?;
        assert_eq!(p.key, "u\"1é");
        let out = std::str::from_utf8(&p.payload)?;
        // Nested values are the client's own text, byte for byte.
        assert!(
            out.contains(r#""properties":{"big": 12345678901234567890123, "nested": [ {"a": [1, 2.50, null]} ],
            "q\"k": "v"}"#),
            "{out}"
        );
        let v: Value = serde_json::from_slice(&p.payload)?;
        let keys: Vec<&str> = v
            .as_object()
            .ok_or("object")?
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "userId",
                "type",
                "event",
                "properties",
                "weird\nkey",
                "messageId",
                "receivedAt",
                "timestamp"
            ]
        );
        assert_eq!(
            str_field(&v, "event"),
            "Second",
            "the last of a repeated key wins"
        );
        assert!(v.get("writeKey").is_none());
        assert_eq!(v["messageId"], json!(7), "a numeric messageId is kept");
        assert_eq!(v["weird\nkey"], json!(true));
        assert_eq!(v.pointer("/properties/q\"k"), Some(&json!("v")));

        // `set` leaves one occurrence, in place of the last.
        let mut fields: Fields = serde_json::from_str(r#"{"a": 1, "b": 2, "a": 3, "c": 4}"#)?;
        fields.set("a", raw_string("x").map_err(|e| e.to_string())?);
        assert_eq!(
            std::str::from_utf8(&fields.to_json()?)?,
            r#"{"b":2,"a":"x","c":4}"#
        );
        assert_eq!(fields.json_len(), fields.to_json()?.len());
        assert!(serde_json::from_str::<Fields>("[1]").is_err());
        Ok(())
    }

    #[test]
    fn lone_surrogates_are_found_and_pairs_and_escaped_backslashes_are_not() {
        let cases: [(&str, Option<usize>); 9] = [
            (r#"{"a": "plain"}"#, None),
            (r#"{"a": "\u00e9 \ud83d\ude00 \"q\" \\"}"#, None),
            (r#"{"a": "\\ud800"}"#, None),
            (r#"{"a": "\\\ud83d\ude00"}"#, None),
            (r#"{"a": "x\ud800"}"#, Some(8)),
            (r#"{"a": "\ud800\u0041"}"#, Some(7)),
            (r#"{"a": "\udc00"}"#, Some(7)),
            (r#"{"a": "\ude00\ud83d"}"#, Some(7)),
            (
                r#"{"long key to pass eight bytes": "\uDBFF\uDFFF", "b": "\uD800"}"#,
                Some(55),
            ),
        ];
        for (body, expected) in cases {
            assert!(
                serde_json::from_str::<de::IgnoredAny>(body).is_ok(),
                "{body}"
            );
            assert_eq!(lone_surrogate(body.as_bytes()), expected, "{body}");
        }
        for i in 0..40 {
            let body = format!("{}\\", "x".repeat(i));
            assert_eq!(next_backslash(body.as_bytes(), 0), Some(i));
            assert_eq!(next_backslash(body.as_bytes(), i + 1), None);
        }
    }

    #[test]
    fn config_defaults_and_checks() {
        let c = CollectorConfig::default();
        assert_eq!(c.listen.port(), 8088);
        assert_eq!(
            (c.max_event_bytes, c.max_batch_bytes, c.max_batch_events),
            (32 * 1024, 500 * 1024, 2500)
        );
        assert!(c.check().is_ok());
        let small = CollectorConfig {
            max_in_flight_bytes: 1024,
            ..Default::default()
        };
        assert_eq!(
            small.check().err().map(|e| e.path),
            Some("collector.max_in_flight_bytes".to_string())
        );
        let parsed: Result<CollectorConfig, _> =
            serde_json::from_str(r#"{"listen": "127.0.0.1:9000"}"#);
        assert_eq!(parsed.ok().map(|c| c.listen.port()), Some(9000));
        assert!(serde_json::from_str::<CollectorConfig>(r#"{"port": 1}"#).is_err());
    }

    #[test]
    fn basic_auth_takes_the_user_name() -> TestResult {
        let mut headers = HeaderMap::new();
        assert_eq!(basic_auth_user(&headers)?, None);
        let encoded = base64::engine::general_purpose::STANDARD.encode("wk_1:");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}"))?,
        );
        assert_eq!(basic_auth_user(&headers)?, Some("wk_1".to_string()));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert!(basic_auth_user(&headers).is_err());
        Ok(())
    }
}
