//! The HTTP collector: a Segment-compatible Tracking API that writes every
//! event to `<p>.raw`.
//!
//! Routes: `POST /v1/identify|track|page|screen|group|alias` (one event, its
//! type from the path), `POST /v1/batch` and `/v1/import` (`{"batch": [...]}`
//! with optional batch-level `context`, `integrations` and `sentAt` merged
//! into every item that lacks them), and `GET /v1/projects/{writeKey}/settings`
//! (the minimal settings analytics.js asks for). CORS is permissive so
//! browser SDKs can post from any origin; gzip request bodies are accepted.
//!
//! Auth is the write key of a configured source, as the Basic-auth user name
//! or as `writeKey` in the body; it is never written to the topic.
//!
//! Each event is checked only for what the edge must know (JSON object, a
//! `userId` or `anonymousId`, `event` on a track, a known `type` in a batch),
//! then enriched: `receivedAt`, a `messageId` when absent, and `timestamp`
//! corrected for the client's clock skew (`timestamp = receivedAt - (sentAt -
//! originalTimestamp)`). Everything deeper is the validate stage's job.
//!
//! Guarantee: `200 {"success": true}` is sent only after the broker
//! acknowledged every event of the request (idempotent producer, acks=all).
//! When the broker cannot take writes, or the in-flight memory budget is
//! spent, the answer is `503` with `Retry-After` and the client retries.
//! Limit: a request that failed part-way may have written some of its events;
//! the retry writes them again and the validate stage drops the repeats by
//! `messageId` — except events the client sent without a `messageId`, which
//! get a fresh one per attempt.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

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
use cdp_pipeline::{envelope, metrics, ReadyFlag, Shutdown};
use futures::StreamExt;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::Semaphore;
use tower_http::cors::CorsLayer;
use tower_http::decompression::RequestDecompressionLayer;

/// Seconds a client is asked to wait after a 503.
const RETRY_AFTER_SECS: &str = "5";

/// The `collector` section of the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            listen: default_listen(),
            max_event_bytes: default_max_event_bytes(),
            max_batch_bytes: default_max_batch_bytes(),
            max_batch_events: default_max_batch_events(),
            max_in_flight_bytes: default_max_in_flight_bytes(),
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
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError::new(
                    format!("collector.{field}"),
                    "must be positive",
                ));
            }
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
        let body = Json(json!({"success": false, "error": self.to_string()}));
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

/// A Segment event as a JSON object.
type Event = Map<String, Value>;

/// One event of a request, with its path for error messages (`batch[3]`).
#[derive(Debug)]
struct Item {
    at: String,
    event: Event,
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
    producer: FutureProducer,
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
        producer: FutureProducer,
        raw_topic: String,
    ) -> Self {
        let budget = Semaphore::new(config.max_in_flight_bytes.min(Semaphore::MAX_PERMITS));
        Collector {
            inner: Arc::new(Inner {
                sources: sources
                    .iter()
                    .map(|s| (s.write_key.clone(), s.id.clone()))
                    .collect(),
                config,
                producer,
                raw_topic,
                budget,
            }),
        }
    }

    /// The HTTP API with its CORS, gzip and metrics layers.
    pub fn router(&self) -> Router {
        let mut router = Router::new();
        for kind in EventType::ALL {
            router = router.route(
                &format!("/v1/{}", kind.as_str()),
                post(
                    move |State(c): State<Collector>, headers: HeaderMap, body: Body| async move {
                        c.respond(Call::Single(kind), &headers, body).await
                    },
                ),
            );
        }
        let batch = |State(c): State<Collector>, headers: HeaderMap, body: Body| async move {
            c.respond(Call::Batch, &headers, body).await
        };
        router
            .route("/v1/batch", post(batch))
            .route("/v1/import", post(batch))
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
        ready.set(true);
        let draining = ready.clone();
        let result = axum::serve(listener, self.router())
            .with_graceful_shutdown(async move {
                shutdown.wait().await;
                draining.set(false);
                tracing::info!("collector draining");
            })
            .await;
        ready.set(false);
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
        let bytes = read_body(body, limit).await.map_err(|e| match (e, call) {
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

        let doc: Value =
            serde_json::from_slice(&bytes).map_err(|e| CollectError::InvalidJson(e.to_string()))?;
        let Value::Object(mut doc) = doc else {
            return Err(CollectError::invalid(
                "body",
                "not_an_object",
                "expected a JSON object",
            ));
        };
        let body_key = doc.remove("writeKey");
        let source = match (header_source, body_key) {
            (Some(source), _) => source,
            (None, Some(Value::String(key))) => self.source_of(&key)?,
            (None, _) => {
                return Err(CollectError::Unauthorized(
                    "missing write key: send it as the Basic-auth user name or as writeKey",
                ))
            }
        };

        let items: Vec<Item> = match call {
            Call::Single(kind) => {
                doc.insert("type".into(), Value::String(kind.as_str().into()));
                vec![Item {
                    at: "body".into(),
                    event: doc,
                }]
            }
            Call::Batch => split_batch(doc, cfg, events)?,
        };
        let received_ms = chrono::Utc::now().timestamp_millis();
        let prepared = items
            .into_iter()
            .map(|item| enrich(item.event, received_ms, &item.at))
            .collect::<Result<Vec<_>, _>>()?;
        self.produce(source, &prepared).await?;
        metrics::EVENTS_ACCEPTED
            .with_label_values(&[source])
            .inc_by(prepared.len() as u64);
        Ok(())
    }

    /// Produce every event and wait until the broker acknowledged all.
    async fn produce(&self, source: &str, events: &[Prepared]) -> Result<(), CollectError> {
        let started = Instant::now();
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
            match self.inner.producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((error, _)) => return Err(CollectError::Broker(error.to_string())),
            }
        }
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => return Err(CollectError::Broker(error.to_string())),
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
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ReadError::Stream(e.to_string()))?;
        if buf.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// Split a batch request into its items, merging batch-level `context`,
/// `integrations` and `sentAt` into each, and enforcing the count and
/// per-event size limits. Items are returned with their path for errors.
fn split_batch(
    mut doc: Event,
    cfg: &CollectorConfig,
    events: &mut usize,
) -> Result<Vec<Item>, CollectError> {
    let batch = match doc.remove("batch") {
        Some(Value::Array(batch)) => batch,
        Some(_) => {
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
        let at = format!("batch[{i}]");
        let Value::Object(mut item) = item else {
            return Err(CollectError::invalid(
                at,
                "not_an_object",
                "expected a JSON object",
            ));
        };
        let size = serde_json::to_vec(&item)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > cfg.max_event_bytes {
            return Err(CollectError::EventTooLarge {
                at,
                limit: cfg.max_event_bytes,
            });
        }
        match item
            .get("type")
            .and_then(Value::as_str)
            .and_then(EventType::parse)
        {
            Some(_) => {}
            None => {
                return Err(CollectError::invalid(
                    format!("{at}.type"),
                    "invalid_type",
                    "expected identify, track, page, screen, group or alias",
                ))
            }
        }
        merge_missing(&mut item, "context", context.as_ref());
        merge_missing(&mut item, "integrations", integrations.as_ref());
        merge_missing(&mut item, "sentAt", sent_at.as_ref());
        items.push(Item { at, event: item });
    }
    Ok(items)
}

/// Give `item[field]` the batch-level value where the item lacks it; for
/// objects, key by key (the item's own keys win).
fn merge_missing(item: &mut Event, field: &str, batch_value: Option<&Value>) {
    let Some(batch_value) = batch_value else {
        return;
    };
    match (item.get_mut(field), batch_value) {
        (None | Some(Value::Null), _) => {
            item.insert(field.to_string(), batch_value.clone());
        }
        (Some(Value::Object(own)), Value::Object(shared)) => {
            for (k, v) in shared {
                own.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        _ => {}
    }
}

/// A usable identifier: a non-empty string or a number.
fn identifier(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Check what the edge must check, then set `receivedAt`, `messageId` and
/// the skew-corrected `timestamp`. The key is the anonymousId if present,
/// else the userId, so one visitor's events share a partition.
fn enrich(mut event: Event, received_ms: i64, at: &str) -> Result<Prepared, CollectError> {
    let key = identifier(event.get("anonymousId"))
        .or_else(|| identifier(event.get("userId")))
        .ok_or_else(|| {
            CollectError::invalid(at, "missing_id", "userId or anonymousId is required")
        })?;
    let is_track = event.get("type").and_then(Value::as_str) == Some(EventType::Track.as_str());
    let has_event_name = matches!(event.get("event"), Some(Value::String(s)) if !s.is_empty());
    if is_track && !has_event_name {
        return Err(CollectError::invalid(
            at,
            "missing_event",
            "a track call needs an event name",
        ));
    }
    // The write key is a credential: never let it reach the topic.
    event.remove("writeKey");
    if identifier(event.get("messageId")).is_none() {
        event.insert(
            "messageId".into(),
            Value::String(format!("api-{}", uuid::Uuid::new_v4())),
        );
    }
    let received_at = rfc3339_ms(received_ms);
    event.insert("receivedAt".into(), Value::String(received_at.clone()));

    let time_of = |field: &str, event: &Event| {
        event
            .get(field)
            .and_then(Value::as_str)
            .map(|s| (s.to_string(), parse_time_ms(s)))
    };
    let sent_ms = time_of("sentAt", &event).and_then(|(_, ms)| ms);
    // RudderStack SDKs send `originalTimestamp` instead of `timestamp`.
    let client = time_of("timestamp", &event).or_else(|| time_of("originalTimestamp", &event));
    match (client, sent_ms) {
        (Some((original, Some(client_ms))), Some(sent_ms)) => {
            let corrected = received_ms.saturating_sub(sent_ms.saturating_sub(client_ms));
            event.insert("timestamp".into(), Value::String(rfc3339_ms(corrected)));
            event.insert("originalTimestamp".into(), Value::String(original));
        }
        // A timestamp without sentAt (or unparsable) is kept as sent; the
        // validate stage judges its format. No timestamp: receivedAt.
        _ => {
            if event.get("timestamp").is_none_or(Value::is_null) {
                event.insert("timestamp".into(), Value::String(received_at));
            }
        }
    }
    let payload = serde_json::to_vec(&Value::Object(event))
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
        let producer = ClientFactory::new(kafka)?.producer()?;
        let sources = [SourceConfig {
            id: "web".into(),
            write_key: WRITE_KEY.into(),
            tracking_plan: None,
        }];
        let collector = Collector::new(config, &sources, producer, topic.clone());
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

    #[test]
    fn skew_correction_and_defaults() -> TestResult {
        let received = parse_time_ms("2026-01-01T12:00:00.000Z").ok_or("time")?;
        let event = |v: Value| match v {
            Value::Object(m) => Ok(m),
            _ => Err("not an object"),
        };
        let decode = |p: Prepared| serde_json::from_slice::<Value>(&p.payload);

        // Client clock 1h behind: sentAt and timestamp both from that clock.
        let skewed = event(json!({"type": "track", "event": "E", "userId": "u",
            "timestamp": "2026-01-01T10:59:50.000Z", "sentAt": "2026-01-01T11:00:00.000Z"}))?;
        let v = decode(enrich(skewed, received, "body")?)?;
        assert_eq!(str_field(&v, "timestamp"), "2026-01-01T11:59:50.000Z");
        assert_eq!(
            str_field(&v, "originalTimestamp"),
            "2026-01-01T10:59:50.000Z"
        );

        // RudderStack style: originalTimestamp + sentAt.
        let rudder = event(json!({"type": "page", "anonymousId": "a",
            "originalTimestamp": "2026-01-01T11:00:00.000Z", "sentAt": "2026-01-01T11:00:01.000Z"}))?;
        let v = decode(enrich(rudder, received, "body")?)?;
        assert_eq!(str_field(&v, "timestamp"), "2026-01-01T11:59:59.000Z");

        // Timestamp without sentAt is kept; none at all becomes receivedAt.
        let kept = event(
            json!({"type": "identify", "userId": 42, "timestamp": "2025-05-05T00:00:00Z", "messageId": "m"}),
        )?;
        let p = enrich(kept, received, "body")?;
        assert_eq!(p.key, "42");
        let v = decode(p)?;
        assert_eq!(str_field(&v, "timestamp"), "2025-05-05T00:00:00Z");
        assert_eq!(str_field(&v, "messageId"), "m");
        let bare = event(json!({"type": "identify", "userId": "u", "anonymousId": ""}))?;
        let p = enrich(bare, received, "body")?;
        assert_eq!(p.key, "u", "an empty anonymousId does not count");
        let v = decode(p)?;
        assert_eq!(str_field(&v, "timestamp"), "2026-01-01T12:00:00.000Z");
        assert_eq!(str_field(&v, "receivedAt"), "2026-01-01T12:00:00.000Z");
        Ok(())
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
