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

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cdp_operators::config::ConfigError;
use cdp_pipeline::kafka::ClientError;
use cdp_pipeline::{metrics, ClientFactory, Sink, SinkRecord, Span};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use hmac::{Hmac, Mac};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

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

/// One entry of the `destinations` config section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Unique name of the destination; used in logs, metric labels and as
    /// the deliver stage's output name.
    pub id: String,
    /// `webhook`, `kafka` or `stdout`.
    #[serde(rename = "type")]
    pub kind: DestinationKind,
    /// Webhook only: the `http://` or `https://` URL changes are POSTed to.
    #[serde(default)]
    pub url: Option<String>,
    /// Webhook only: name of the environment variable holding the HMAC
    /// secret that signs each body (`X-CDP-Signature`). Unsigned when unset.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Kafka only: the topic changes are produced to.
    #[serde(default)]
    pub topic: Option<String>,
    /// Audiences whose changes go to this destination; empty means all.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Webhook only: timeout of one HTTP attempt (default `10s`).
    #[serde(default)]
    pub timeout: Option<Span>,
    /// Webhook only: attempts per record before it is dead-lettered
    /// (default 5).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Webhook only: longest time one batch of deliveries may take (default
    /// `60s`); records not delivered by then are dead-lettered.
    #[serde(default)]
    pub batch_deadline: Option<Span>,
}

impl DestinationConfig {
    /// A destination of `kind` with every optional field unset.
    pub fn new(id: &str, kind: DestinationKind) -> Self {
        DestinationConfig {
            id: id.into(),
            kind,
            url: None,
            secret_env: None,
            topic: None,
            audiences: Vec::new(),
            timeout: None,
            max_attempts: None,
            batch_deadline: None,
        }
    }
}

/// The kind of a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DestinationKind {
    /// HTTP POST of each change to `url`.
    Webhook,
    /// Produce each change to `topic`.
    Kafka,
    /// Print each change as a JSON line on stdout.
    Stdout,
}

/// Why a destination could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("destination {id}: {field} is required for type {kind}")]
    Missing {
        id: String,
        field: &'static str,
        kind: &'static str,
    },
    #[error("destination {id}: environment variable {var} (secret_env) is not set")]
    MissingSecret { id: String, var: String },
    #[error("destination {id}: invalid url {url:?}: {reason}")]
    InvalidUrl {
        id: String,
        url: String,
        reason: String,
    },
    #[error("destination {id}: building the HTTP client: {source}")]
    HttpClient { id: String, source: reqwest::Error },
    #[error("destination {id}: {source}")]
    Kafka { id: String, source: ClientError },
}

impl DestinationKind {
    fn name(self) -> &'static str {
        match self {
            DestinationKind::Webhook => "webhook",
            DestinationKind::Kafka => "kafka",
            DestinationKind::Stdout => "stdout",
        }
    }
}

/// Check the `destinations` section: required fields per type, valid URLs,
/// sane limits, unique ids. Errors name the path of the bad field, e.g.
/// `destinations[0].url: required for webhook`. Audience names are checked
/// by the caller, which knows the `audiences` section.
pub fn check(dests: &[DestinationConfig]) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for (i, d) in dests.iter().enumerate() {
        let at = |field: &str| format!("destinations[{i}].{field}");
        if d.id.trim().is_empty() {
            return Err(ConfigError::new(at("id"), "must not be empty"));
        }
        if !seen.insert(d.id.as_str()) {
            return Err(ConfigError::new(
                at("id"),
                format!("duplicate destination id {:?}", d.id),
            ));
        }
        let kind = d.kind.name();
        match d.kind {
            DestinationKind::Webhook => {
                let Some(url) = &d.url else {
                    return Err(ConfigError::new(at("url"), "required for webhook"));
                };
                check_url(url).map_err(|reason| ConfigError::new(at("url"), reason))?;
                if let Some(var) = &d.secret_env {
                    if var.trim().is_empty() {
                        return Err(ConfigError::new(
                            at("secret_env"),
                            "must name an environment variable",
                        ));
                    }
                }
            }
            DestinationKind::Kafka => match &d.topic {
                None => return Err(ConfigError::new(at("topic"), "required for kafka")),
                Some(t) if t.trim().is_empty() => {
                    return Err(ConfigError::new(at("topic"), "must not be empty"))
                }
                Some(_) => {}
            },
            DestinationKind::Stdout => {}
        }
        if d.kind != DestinationKind::Webhook {
            for (field, set) in [
                ("url", d.url.is_some()),
                ("secret_env", d.secret_env.is_some()),
                ("timeout", d.timeout.is_some()),
                ("max_attempts", d.max_attempts.is_some()),
                ("batch_deadline", d.batch_deadline.is_some()),
            ] {
                if set {
                    return Err(ConfigError::new(
                        at(field),
                        format!("only for webhook, not {kind}"),
                    ));
                }
            }
        }
        if d.kind != DestinationKind::Kafka && d.topic.is_some() {
            return Err(ConfigError::new(
                at("topic"),
                format!("only for kafka, not {kind}"),
            ));
        }
        if d.max_attempts == Some(0) {
            return Err(ConfigError::new(at("max_attempts"), "must be at least 1"));
        }
        if matches!(d.timeout, Some(t) if t.millis() <= 0) {
            return Err(ConfigError::new(at("timeout"), "must be positive"));
        }
        if matches!(d.batch_deadline, Some(t) if t.millis() <= 0) {
            return Err(ConfigError::new(at("batch_deadline"), "must be positive"));
        }
        for (j, a) in d.audiences.iter().enumerate() {
            if a.trim().is_empty() {
                return Err(ConfigError::new(
                    format!("destinations[{i}].audiences[{j}]"),
                    "must not be empty",
                ));
            }
        }
    }
    Ok(())
}

fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    match parsed.scheme() {
        "http" | "https" => Ok(()),
        other => Err(format!("scheme {other:?} is not http or https")),
    }
}

/// Build the sink of one destination. Reads the webhook secret from the
/// environment (never logged).
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
            let producer = factory
                .producer()
                .map_err(|source| DestinationError::Kafka {
                    id: dest.id.clone(),
                    source,
                })?;
            Ok(Arc::new(KafkaSink::new(&dest.id, producer, topic)))
        }
        DestinationKind::Webhook => {
            let url = dest.url.clone().ok_or_else(|| missing("url"))?;
            let secret = match &dest.secret_env {
                None => None,
                Some(var) => Some(
                    std::env::var(var)
                        .map_err(|_| DestinationError::MissingSecret {
                            id: dest.id.clone(),
                            var: var.clone(),
                        })?
                        .into_bytes(),
                ),
            };
            let sink = WebhookSink::new(
                &dest.id,
                &url,
                secret,
                dest.timeout.unwrap_or(DEFAULT_TIMEOUT).to_std(),
                dest.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            )?
            .with_batch_deadline(
                dest.batch_deadline
                    .unwrap_or(DEFAULT_BATCH_DEADLINE)
                    .to_std(),
            );
            Ok(Arc::new(sink))
        }
    }
}

/// Observe event time → delivery for one delivered record, if the record
/// is an audience change with a parsable `event_time`.
fn observe_end_to_end(destination: &str, value: &[u8]) {
    #[derive(Deserialize)]
    struct EventTime {
        event_time: Option<String>,
    }
    let Ok(EventTime {
        event_time: Some(t),
    }) = serde_json::from_slice::<EventTime>(value)
    else {
        return;
    };
    let Ok(at) = chrono::DateTime::parse_from_rfc3339(&t) else {
        return;
    };
    let elapsed_ms = chrono::Utc::now().timestamp_millis() - at.timestamp_millis();
    metrics::END_TO_END_SECONDS
        .with_label_values(&[destination])
        .observe(elapsed_ms.max(0) as f64 / 1000.0);
}

/// Prints each record's value as one JSON line on stdout. Never fails: a
/// closed stdout is logged, not dead-lettered.
#[derive(Debug, Clone)]
pub struct StdoutSink {
    id: String,
}

impl StdoutSink {
    pub fn new(id: &str) -> Self {
        StdoutSink { id: id.to_string() }
    }

    fn write_all(&self, records: &[SinkRecord]) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        for r in records {
            // Values are compact JSON already; re-encode anything that would
            // break the one-record-per-line framing.
            if r.value.contains(&b'\n') {
                match serde_json::from_slice::<serde_json::Value>(&r.value) {
                    Ok(v) => serde_json::to_writer(&mut out, &v)?,
                    Err(_) => out.write_all(
                        &r.value
                            .iter()
                            .map(|&b| if b == b'\n' { b' ' } else { b })
                            .collect::<Vec<_>>(),
                    )?,
                }
            } else {
                out.write_all(&r.value)?;
            }
            out.write_all(b"\n")?;
        }
        out.flush()
    }
}

impl Sink for StdoutSink {
    fn name(&self) -> &str {
        &self.id
    }

    fn deliver(&self, records: Vec<SinkRecord>) -> BoxFuture<'static, Vec<Result<(), String>>> {
        metrics::DELIVERY_ATTEMPTS
            .with_label_values(&[&self.id])
            .inc_by(records.len() as u64);
        if let Err(error) = self.write_all(&records) {
            tracing::warn!(destination = %self.id, %error, "cannot write to stdout");
        }
        for r in &records {
            observe_end_to_end(&self.id, &r.value);
        }
        futures::future::ready(records.iter().map(|_| Ok(())).collect()).boxed()
    }
}

/// POSTs each record's value to a URL; see the module docs for retries,
/// ordering and signing.
#[derive(Clone)]
pub struct WebhookSink {
    inner: Arc<WebhookInner>,
}

#[derive(Clone)]
struct WebhookInner {
    id: String,
    url: reqwest::Url,
    client: reqwest::Client,
    secret: Option<Vec<u8>>,
    max_attempts: u32,
    base_backoff: Duration,
    batch_deadline: Duration,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs.
        f.debug_struct("WebhookSink")
            .field("id", &self.inner.id)
            .field("url", &self.inner.url.as_str())
            .field("signed", &self.inner.secret.is_some())
            .field("max_attempts", &self.inner.max_attempts)
            .finish()
    }
}

/// How one attempt ended.
enum Attempt {
    Delivered,
    /// Worth another try, after at least this long (a `Retry-After`).
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    Fatal(String),
}

impl WebhookSink {
    pub fn new(
        id: &str,
        url: &str,
        secret: Option<Vec<u8>>,
        timeout: Duration,
        max_attempts: u32,
    ) -> Result<Self, DestinationError> {
        let invalid = |reason: String| DestinationError::InvalidUrl {
            id: id.to_string(),
            url: url.to_string(),
            reason,
        };
        check_url(url).map_err(invalid)?;
        let parsed = reqwest::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        let client = reqwest::Client::builder()
            // A redirected POST turns into a GET on 301/302: treat any 3xx as
            // a misconfigured URL (fails at once) instead of following it.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|source| DestinationError::HttpClient {
                id: id.to_string(),
                source,
            })?;
        Ok(WebhookSink {
            inner: Arc::new(WebhookInner {
                id: id.to_string(),
                url: parsed,
                client,
                secret,
                max_attempts: max_attempts.max(1),
                base_backoff: BASE_BACKOFF,
                batch_deadline: DEFAULT_BATCH_DEADLINE.to_std(),
            }),
        })
    }

    /// Bound the time one batch may take (default 60 s).
    pub fn with_batch_deadline(self, deadline: Duration) -> Self {
        let mut inner = (*self.inner).clone();
        inner.batch_deadline = deadline;
        WebhookSink {
            inner: Arc::new(inner),
        }
    }

    /// Change the first retry delay (doubled per attempt, default 100 ms).
    pub fn with_backoff(self, base: Duration) -> Self {
        let mut inner = (*self.inner).clone();
        inner.base_backoff = base;
        WebhookSink {
            inner: Arc::new(inner),
        }
    }
}

impl WebhookInner {
    fn signature(&self, body: &[u8]) -> Option<String> {
        let secret = self.secret.as_ref()?;
        // HMAC takes keys of any length, so this only fails in theory; the
        // caller then fails the record rather than send it unsigned.
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
        mac.update(body);
        Some(format!(
            "sha256={}",
            hex::encode(mac.finalize().into_bytes())
        ))
    }

    async fn attempt(&self, record: &SinkRecord, signature: Option<&str>) -> Attempt {
        let mut request = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(DELIVERY_ID_HEADER, &record.delivery_id)
            .body(record.value.clone());
        if let Some(sig) = signature {
            request = request.header(SIGNATURE_HEADER, sig);
        }
        match request.send().await {
            Err(e) => Attempt::Retry {
                reason: format!("request failed: {e}"),
                after: None,
            },
            Ok(response) => {
                let status = response.status();
                if status.is_success() {
                    Attempt::Delivered
                } else if status.is_server_error()
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                {
                    let after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    Attempt::Retry {
                        reason: format!("HTTP {status}"),
                        after,
                    }
                } else {
                    Attempt::Fatal(format!("HTTP {status}"))
                }
            }
        }
    }

    /// Deliver one record with bounded retries.
    async fn deliver_one(
        &self,
        record: &SinkRecord,
        endpoint_down: &AtomicBool,
    ) -> Result<(), String> {
        if endpoint_down.load(Ordering::Relaxed) {
            metrics::DELIVERY_FAILURES
                .with_label_values(&[&self.id])
                .inc();
            return Err("skipped: an earlier record of this batch gave up on the endpoint".into());
        }
        let signature = if self.secret.is_some() {
            match self.signature(&record.value) {
                Some(s) => Some(s),
                None => return Err("cannot compute the HMAC signature".into()),
            }
        } else {
            None
        };
        let mut backoff = self.base_backoff;
        let mut last = String::new();
        for attempt in 1..=self.max_attempts {
            metrics::DELIVERY_ATTEMPTS
                .with_label_values(&[&self.id])
                .inc();
            match self.attempt(record, signature.as_deref()).await {
                Attempt::Delivered => {
                    observe_end_to_end(&self.id, &record.value);
                    return Ok(());
                }
                Attempt::Fatal(reason) => {
                    metrics::DELIVERY_FAILURES
                        .with_label_values(&[&self.id])
                        .inc();
                    return Err(reason);
                }
                Attempt::Retry { reason, after } => {
                    tracing::debug!(destination = %self.id, delivery_id = %record.delivery_id, attempt, %reason, "webhook attempt failed");
                    last = reason;
                    if attempt < self.max_attempts {
                        let wait = after.map_or(backoff, |a| a.max(backoff)).min(MAX_BACKOFF);
                        tokio::time::sleep(wait).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
        endpoint_down.store(true, Ordering::Relaxed);
        metrics::DELIVERY_FAILURES
            .with_label_values(&[&self.id])
            .inc();
        Err(format!(
            "gave up after {} attempts: {last}",
            self.max_attempts
        ))
    }
}

impl Sink for WebhookSink {
    fn name(&self) -> &str {
        &self.inner.id
    }

    fn deliver(&self, records: Vec<SinkRecord>) -> BoxFuture<'static, Vec<Result<(), String>>> {
        let inner = self.inner.clone();
        async move {
            // Group by key, keeping batch order within a key: one profile's
            // changes arrive in order, different profiles in parallel.
            let mut groups: BTreeMap<Option<Vec<u8>>, Vec<usize>> = BTreeMap::new();
            for (i, r) in records.iter().enumerate() {
                groups.entry(r.key.clone()).or_default().push(i);
            }
            let records = &records;
            let inner = &inner;
            let endpoint_down = &AtomicBool::new(false);
            let deadline = tokio::time::Instant::now() + inner.batch_deadline;
            let done: Vec<Vec<(usize, Result<(), String>)>> =
                futures::stream::iter(groups.into_values())
                    .map(|indexes| async move {
                        let mut out = Vec::with_capacity(indexes.len());
                        for i in indexes {
                            let result = match records.get(i) {
                                Some(r) => match tokio::time::timeout_at(
                                    deadline,
                                    inner.deliver_one(r, endpoint_down),
                                )
                                .await
                                {
                                    Ok(result) => result,
                                    Err(_) => {
                                        metrics::DELIVERY_FAILURES
                                            .with_label_values(&[&inner.id])
                                            .inc();
                                        Err(format!(
                                            "batch deadline of {} ms passed",
                                            inner.batch_deadline.as_millis()
                                        ))
                                    }
                                },
                                None => Err("record index out of range".to_string()),
                            };
                            out.push((i, result));
                        }
                        out
                    })
                    .buffer_unordered(KEY_CONCURRENCY)
                    .collect()
                    .await;
            let mut results: Vec<Result<(), String>> =
                vec![Err("not delivered".to_string()); records.len()];
            for (i, result) in done.into_iter().flatten() {
                if let Some(slot) = results.get_mut(i) {
                    *slot = result;
                }
            }
            results
        }
        .boxed()
    }
}

/// Produces each record (key and value) to a topic and waits for the acks.
#[derive(Clone)]
pub struct KafkaSink {
    id: String,
    producer: FutureProducer,
    topic: String,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .finish()
    }
}

impl KafkaSink {
    pub fn new(id: &str, producer: FutureProducer, topic: String) -> Self {
        KafkaSink {
            id: id.to_string(),
            producer,
            topic,
        }
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &str {
        &self.id
    }

    fn deliver(&self, records: Vec<SinkRecord>) -> BoxFuture<'static, Vec<Result<(), String>>> {
        let this = self.clone();
        async move {
            // Enqueue in batch order (the idempotent producer keeps that order
            // per partition), then await every ack.
            let mut pending = Vec::with_capacity(records.len());
            for r in &records {
                metrics::DELIVERY_ATTEMPTS
                    .with_label_values(&[&this.id])
                    .inc();
                let headers = OwnedHeaders::new().insert(Header {
                    key: KAFKA_DELIVERY_ID_HEADER,
                    value: Some(r.delivery_id.as_bytes()),
                });
                let mut record = FutureRecord::to(&this.topic)
                    .payload(r.value.as_slice())
                    .headers(headers);
                if let Some(k) = &r.key {
                    record = record.key(k.as_slice());
                }
                // `send` waits (up to the message timeout) while the local
                // queue is full instead of failing at once.
                pending.push(this.producer.send(record, Duration::from_secs(30)));
            }
            let outcomes = futures::future::join_all(pending).await;
            records
                .iter()
                .zip(outcomes)
                .map(|(r, outcome)| match outcome {
                    Ok(_) => {
                        observe_end_to_end(&this.id, &r.value);
                        Ok(())
                    }
                    Err((e, _)) => {
                        metrics::DELIVERY_FAILURES
                            .with_label_values(&[&this.id])
                            .inc();
                        Err(kafka_reason(&e))
                    }
                })
                .collect()
        }
        .boxed()
    }
}

fn kafka_reason(e: &KafkaError) -> String {
    format!("produce failed: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use axum::Router;

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    fn dest(id: &str, kind: DestinationKind) -> DestinationConfig {
        DestinationConfig::new(id, kind)
    }

    fn record(key: &str, n: u32) -> SinkRecord {
        SinkRecord {
            delivery_id: format!("audiences:0/1/{n}/0"),
            key: Some(key.as_bytes().to_vec()),
            value: format!(
                r#"{{"type":"audience_change","audience":"vip","n":{n},"event_time":"2026-01-01T00:00:00Z"}}"#
            )
            .into_bytes(),
        }
    }

    /// What the test receiver saw: headers and body of every request.
    #[derive(Default)]
    struct Received {
        requests: Vec<(HeaderMap, Vec<u8>)>,
    }

    /// A local webhook receiver answering with `statuses` in turn (the last
    /// one repeats). Returns its URL and the log of requests.
    async fn receiver(
        statuses: Vec<StatusCode>,
    ) -> Result<(String, Arc<Mutex<Received>>), Box<dyn std::error::Error + Send + Sync>> {
        let log = Arc::new(Mutex::new(Received::default()));
        let state = log.clone();
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                let statuses = statuses.clone();
                async move {
                    let mut log = match state.lock() {
                        Ok(l) => l,
                        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR,
                    };
                    let n = log.requests.len();
                    log.requests.push((headers, body.to_vec()));
                    statuses
                        .get(n)
                        .or(statuses.last())
                        .copied()
                        .unwrap_or(StatusCode::OK)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok((format!("http://{addr}/hook"), log))
    }

    fn requests(log: &Arc<Mutex<Received>>) -> Vec<(HeaderMap, Vec<u8>)> {
        log.lock().map(|l| l.requests.clone()).unwrap_or_default()
    }

    fn sink(
        url: &str,
        secret: Option<&str>,
        max_attempts: u32,
    ) -> Result<WebhookSink, DestinationError> {
        Ok(WebhookSink::new(
            "crm",
            url,
            secret.map(|s| s.as_bytes().to_vec()),
            Duration::from_secs(5),
            max_attempts,
        )?
        .with_backoff(Duration::from_millis(5)))
    }

    #[tokio::test]
    async fn webhook_signs_the_body_and_sends_the_delivery_id() -> TestResult {
        let (url, log) = receiver(vec![StatusCode::OK]).await?;
        let sink = sink(&url, Some("s3cret"), 3)?;
        let results =
            tokio::time::timeout(Duration::from_secs(10), sink.deliver(vec![record("p1", 1)]))
                .await?;
        assert_eq!(results, vec![Ok(())]);
        let seen = requests(&log);
        assert_eq!(seen.len(), 1);
        let (headers, body) = &seen[0];
        assert_eq!(body, &record("p1", 1).value);
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        assert_eq!(
            header("x-cdp-delivery-id").as_deref(),
            Some("audiences:0/1/1/0")
        );
        assert_eq!(header("content-type").as_deref(), Some("application/json"));
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret")?;
        mac.update(body);
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(header("x-cdp-signature"), Some(expected));
        Ok(())
    }

    #[tokio::test]
    async fn webhook_without_secret_is_unsigned() -> TestResult {
        let (url, log) = receiver(vec![StatusCode::NO_CONTENT]).await?;
        let results = sink(&url, None, 3)?.deliver(vec![record("p1", 1)]).await;
        assert_eq!(results, vec![Ok(())]);
        let seen = requests(&log);
        assert!(seen[0].0.get("x-cdp-signature").is_none());
        Ok(())
    }

    #[tokio::test]
    async fn webhook_retries_5xx_and_429_then_succeeds() -> TestResult {
        let statuses = vec![
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::OK,
        ];
        let (url, log) = receiver(statuses).await?;
        let results = tokio::time::timeout(
            Duration::from_secs(10),
            sink(&url, None, 5)?.deliver(vec![record("p1", 1)]),
        )
        .await?;
        assert_eq!(results, vec![Ok(())]);
        let seen = requests(&log);
        assert_eq!(seen.len(), 3);
        // Every attempt carries the same delivery id, so the receiver can dedupe.
        assert!(seen.iter().all(|(h, _)| h
            .get("x-cdp-delivery-id")
            .is_some_and(|v| v == "audiences:0/1/1/0")));
        Ok(())
    }

    #[tokio::test]
    async fn webhook_gives_up_after_max_attempts() -> TestResult {
        let (url, log) = receiver(vec![StatusCode::SERVICE_UNAVAILABLE]).await?;
        let results = tokio::time::timeout(
            Duration::from_secs(10),
            sink(&url, None, 3)?.deliver(vec![record("p1", 1)]),
        )
        .await?;
        assert_eq!(results.len(), 1);
        let reason = results[0].clone().err().unwrap_or_default();
        assert!(reason.contains("gave up after 3 attempts"), "{reason}");
        assert_eq!(requests(&log).len(), 3);
        Ok(())
    }

    #[tokio::test]
    async fn webhook_skips_the_rest_of_a_batch_once_the_endpoint_is_down() -> TestResult {
        let (url, log) = receiver(vec![StatusCode::BAD_GATEWAY]).await?;
        let batch = vec![record("a", 1), record("a", 2), record("a", 3)];
        let results =
            tokio::time::timeout(Duration::from_secs(10), sink(&url, None, 2)?.deliver(batch))
                .await?;
        assert!(
            matches!(&results[0], Err(r) if r.contains("gave up after 2 attempts")),
            "{results:?}"
        );
        assert!(
            results[1..]
                .iter()
                .all(|r| matches!(r, Err(r) if r.starts_with("skipped"))),
            "{results:?}"
        );
        assert_eq!(requests(&log).len(), 2);
        Ok(())
    }

    #[tokio::test]
    async fn a_slow_endpoint_cannot_hold_a_batch_past_its_deadline() -> TestResult {
        // Answers after 5 s, inside the 10 s attempt timeout.
        let app = Router::new().route(
            "/hook",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                StatusCode::OK
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let sink = WebhookSink::new(
            "slow",
            &format!("http://{addr}/hook"),
            None,
            Duration::from_secs(10),
            3,
        )?
        .with_batch_deadline(Duration::from_millis(300));
        let batch = vec![record("a", 1), record("a", 2), record("b", 3)];
        // Bounded well below one slow answer: the deadline, not the
        // endpoint, ends the batch.
        let results = tokio::time::timeout(Duration::from_secs(4), sink.deliver(batch)).await?;
        assert_eq!(results.len(), 3);
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(reason) if reason.contains("deadline"))),
            "{results:?}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn webhook_fails_at_once_on_a_client_error() -> TestResult {
        let (url, log) = receiver(vec![StatusCode::BAD_REQUEST]).await?;
        let results = tokio::time::timeout(
            Duration::from_secs(10),
            sink(&url, None, 5)?.deliver(vec![record("p1", 1)]),
        )
        .await?;
        assert!(
            matches!(&results[..], [Err(r)] if r.contains("400")),
            "{results:?}"
        );
        assert_eq!(requests(&log).len(), 1);
        Ok(())
    }

    #[tokio::test]
    async fn webhook_retries_an_unreachable_endpoint_and_fails() -> TestResult {
        // Bind then drop a listener: nothing listens on that port any more.
        let addr = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await?
            .local_addr()?;
        let sink = sink(&format!("http://{addr}/hook"), None, 2)?;
        let results =
            tokio::time::timeout(Duration::from_secs(10), sink.deliver(vec![record("p1", 1)]))
                .await?;
        assert!(
            matches!(&results[..], [Err(r)] if r.contains("gave up after 2 attempts")),
            "{results:?}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn webhook_keeps_the_order_of_one_key_and_returns_results_in_batch_order() -> TestResult {
        let (url, log) = receiver(vec![StatusCode::OK]).await?;
        let batch = vec![
            record("a", 1),
            record("b", 2),
            record("a", 3),
            record("b", 4),
            record("a", 5),
        ];
        let results =
            tokio::time::timeout(Duration::from_secs(10), sink(&url, None, 3)?.deliver(batch))
                .await?;
        assert_eq!(results, vec![Ok(()); 5]);
        let ids: Vec<String> = requests(&log)
            .iter()
            .filter_map(|(h, _)| {
                h.get("x-cdp-delivery-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            })
            .collect();
        let pos = |id: &str| ids.iter().position(|x| x == id);
        assert!(pos("audiences:0/1/1/0") < pos("audiences:0/1/3/0"));
        assert!(pos("audiences:0/1/3/0") < pos("audiences:0/1/5/0"));
        assert!(pos("audiences:0/1/2/0") < pos("audiences:0/1/4/0"));
        assert_eq!(ids.len(), 5);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kafka_sink_produces_key_value_and_delivery_id() -> TestResult {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Headers;
        use rdkafka::Message;

        let mock = rdkafka::mocking::MockCluster::new(1)?;
        let topic = format!("out-{}", uuid::Uuid::new_v4().simple());
        mock.create_topic(&topic, 1, 1)?;
        let factory = ClientFactory::new(cdp_pipeline::KafkaConfig {
            brokers: mock.bootstrap_servers(),
            ..Default::default()
        })?;
        let mut d = dest("topic-out", DestinationKind::Kafka);
        d.topic = Some(topic.clone());
        let sink = build_sink(&d, &factory)?;
        let results = tokio::time::timeout(
            Duration::from_secs(15),
            sink.deliver(vec![record("p1", 1), record("p2", 2)]),
        )
        .await?;
        assert_eq!(results, vec![Ok(()), Ok(())]);

        let consumer: BaseConsumer =
            factory.plain_consumer(&format!("test-{}", uuid::Uuid::new_v4().simple()))?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut seen = Vec::new();
        while seen.len() < 2 && std::time::Instant::now() < deadline {
            let message = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(200)));
            if let Some(message) = message {
                let message = message?;
                let id = message.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == KAFKA_DELIVERY_ID_HEADER)
                        .and_then(|h| h.value)
                        .map(<[u8]>::to_vec)
                });
                seen.push((
                    message.key().map(<[u8]>::to_vec),
                    message.payload().map(<[u8]>::to_vec),
                    id,
                ));
            }
        }
        assert_eq!(
            seen,
            vec![
                (
                    Some(b"p1".to_vec()),
                    Some(record("p1", 1).value),
                    Some(b"audiences:0/1/1/0".to_vec())
                ),
                (
                    Some(b"p2".to_vec()),
                    Some(record("p2", 2).value),
                    Some(b"audiences:0/1/2/0".to_vec())
                ),
            ]
        );
        Ok(())
    }

    #[tokio::test]
    async fn stdout_sink_never_fails() {
        let sink = StdoutSink::new("stdout");
        let mut pretty = record("p", 2);
        pretty.value = b"{\n  \"a\": 1\n}".to_vec();
        let results = sink.deliver(vec![record("p", 1), pretty]).await;
        assert_eq!(results, vec![Ok(()), Ok(())]);
        assert_eq!(sink.name(), "stdout");
    }

    #[test]
    fn config_checks_name_the_bad_field() {
        let err = |dests: &[DestinationConfig]| {
            check(dests)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(check(&[dest("out", DestinationKind::Stdout)]).is_ok());
        assert_eq!(
            err(&[dest("crm", DestinationKind::Webhook)]),
            "destinations[0].url: required for webhook"
        );
        assert_eq!(
            err(&[
                dest("a", DestinationKind::Stdout),
                dest("t", DestinationKind::Kafka)
            ]),
            "destinations[1].topic: required for kafka"
        );
        let dup = [
            dest("a", DestinationKind::Stdout),
            dest("a", DestinationKind::Stdout),
        ];
        assert!(
            err(&dup).starts_with("destinations[1].id: duplicate"),
            "{}",
            err(&dup)
        );
        let mut bad_url = dest("crm", DestinationKind::Webhook);
        bad_url.url = Some("ftp://x/y".into());
        assert!(err(&[bad_url.clone()]).starts_with("destinations[0].url: scheme"));
        bad_url.url = Some("not a url".into());
        assert!(err(&[bad_url.clone()]).starts_with("destinations[0].url:"));
        bad_url.url = Some("https://crm.internal/hooks".into());
        bad_url.max_attempts = Some(0);
        assert_eq!(
            err(&[bad_url]),
            "destinations[0].max_attempts: must be at least 1"
        );
        let mut stray = dest("out", DestinationKind::Stdout);
        stray.url = Some("http://x".into());
        assert_eq!(
            err(&[stray]),
            "destinations[0].url: only for webhook, not stdout"
        );
    }

    #[test]
    fn config_parses_from_yaml_shaped_json_and_rejects_unknown_fields() {
        let ok: Result<Vec<DestinationConfig>, _> = serde_json::from_str(
            r#"[{"id":"crm","type":"webhook","url":"http://crm/hook","secret_env":"S","audiences":["vip"],"timeout":"5s","max_attempts":3}]"#,
        );
        let ok = ok.ok().unwrap_or_default();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].kind, DestinationKind::Webhook);
        assert_eq!(ok[0].timeout, Some(Span::from_secs(5)));
        let bad: Result<DestinationConfig, _> =
            serde_json::from_str(r#"{"id":"x","type":"stdout","colour":"red"}"#);
        assert!(bad.is_err());
    }

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
