//! The HTTP routes and their handlers: authenticate, read, check, enrich
//! and produce one request.

use std::time::Instant;

use axum::body::Body;
use std::net::IpAddr;

use axum::extract::{ConnectInfo, MatchedPath, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use cdp_operators::messages::rfc3339_ms;
use cdp_pipeline::{metrics, ReadyFlag, Shutdown};
use serde_json::json;
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer};
use tower_http::decompression::RequestDecompressionLayer;

use crate::limits::PeerAddr;

use super::body::{read_body, replace_lone_surrogates, ReadError};
use super::error::CollectError;
use super::normalize::{enrich, split_batch, Received};
use super::parse::{raw_string, string, BatchDoc, Doc, SingleDoc};
use super::{Call, Collector, EventType, Item, Source, RETRY_AFTER_SECS};

impl Collector {
    /// The HTTP API with its CORS, gzip and metrics layers.
    pub fn router(&self) -> Router {
        let mut router = Router::new();
        for kind in EventType::ALL {
            let handler = post(
                move |State(c): State<Collector>, request: Request| async move {
                    c.respond(Call::Single(kind), request).await
                },
            );
            let name = kind.as_str();
            // analytics.js posts to the first letter: `/v1/t` for a track.
            router = router
                .route(&format!("/v1/{name}"), handler.clone())
                .route(&format!("/v1/{}", &name[..1]), handler);
        }
        let batch = |State(c): State<Collector>, request: Request| async move {
            c.respond(Call::Batch, request).await
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
            .layer(cors())
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
        let router = self.router();
        let result = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<PeerAddr>(),
        )
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

    fn source_of(&self, write_key: &str) -> Result<&Source, CollectError> {
        self.inner
            .sources
            .get(write_key)
            .ok_or(CollectError::Unauthorized("unknown write key"))
    }

    async fn respond(&self, call: Call, request: Request) -> Response {
        let mut events = 1;
        let (parts, body) = request.into_parts();
        match self.collect(call, &parts, body, &mut events).await {
            Ok(refused) if refused.is_empty() => {
                (StatusCode::OK, Json(json!({"success": true}))).into_response()
            }
            Ok(refused) => {
                // The batch's good events were written: `200`, as Segment
                // answers, with each refused one and why in the body.
                for e in &refused {
                    metrics::EVENTS_REJECTED
                        .with_label_values(&[e.reason()])
                        .inc();
                }
                tracing::debug!(
                    refused = refused.len(),
                    events,
                    "collector batch partly refused"
                );
                let refused: Vec<_> = refused
                    .iter()
                    .map(|e| json!({"error": e.to_string(), "code": e.reason()}))
                    .collect();
                let body = json!({
                    "success": true,
                    "accepted": events - refused.len(),
                    "refused": refused,
                });
                (StatusCode::OK, Json(body)).into_response()
            }
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
    /// A batch's events that break the spec are left out and returned
    /// (the rest are written); a request none of whose events can be
    /// written is an `Err`.
    async fn collect(
        &self,
        call: Call,
        request: &Parts,
        body: Body,
        events: &mut usize,
    ) -> Result<Vec<CollectError>, CollectError> {
        let cfg = &self.inner.config;
        let headers = &request.headers;
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

        // Half an emoji from a JavaScript string: U+FFFD, as JSON.parse
        // reads it, not a refused batch (serde_json refuses it).
        let mut bytes = bytes;
        replace_lone_surrogates(&mut bytes);
        // One pass over the body: the top-level fields of every event,
        // each value left as the raw JSON text of the body.
        let parsed = match call {
            Call::Single(_) => serde_json::from_slice::<SingleDoc>(&bytes).map(|d| d.0),
            Call::Batch => serde_json::from_slice::<BatchDoc>(&bytes).map(|d| d.0),
        }
        .map_err(|e| CollectError::InvalidJson(e.to_string()))?;
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

        let items: Vec<Result<Item, CollectError>> = match call {
            Call::Single(kind) => {
                doc.set("type", raw_string(kind.as_str())?);
                vec![Ok(Item {
                    index: None,
                    fields: doc,
                })]
            }
            Call::Batch => split_batch(doc, batch, cfg, events)?,
        };
        let received_ms = chrono::Utc::now().timestamp_millis();
        let received_at = raw_string(&rfc3339_ms(received_ms))?;
        // A browser's or an app's address, for events without `context.ip`.
        let client_ip = match source.client_side {
            true => client_ip(request, cfg.client_ip_header.as_deref())
                .map(|ip| raw_string(&ip.to_string()))
                .transpose()?,
            false => None,
        };
        let received = Received {
            ms: received_ms,
            at: &received_at,
            client_ip: client_ip.as_deref(),
        };
        let mut prepared = Vec::with_capacity(items.len());
        let mut refused = Vec::new();
        for item in items {
            let enriched = item.and_then(|item| enrich(item.fields, &received, item.index));
            match enriched {
                Ok(p) => prepared.push(p),
                Err(e) => refused.push(e),
            }
        }
        if prepared.is_empty() && !refused.is_empty() {
            return Err(refused.swap_remove(0));
        }
        self.produce(&source.id, &prepared).await?;
        metrics::EVENTS_ACCEPTED
            .with_label_values(&[&source.id])
            .inc_by(prepared.len() as u64);
        Ok(refused)
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
    // The collector serves plain HTTP; behind a TLS-terminating proxy the
    // proxy says which scheme the browser used. analytics.js takes https
    // when the settings name none.
    let protocol = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .filter(|p| matches!(*p, "http" | "https"))
        .unwrap_or("http");
    Json(json!({
        "integrations": {"Segment.io": {
            "apiKey": write_key,
            "apiHost": format!("{host}/v1"),
            "protocol": protocol,
        }},
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
/// The address of the client that sent `request`: the last address of the
/// configured header (what the proxy in front of the collector appended:
/// `X-Forwarded-For`'s earlier entries are the client's own word), else the
/// connection's peer. `None` when neither gives an address.
fn client_ip(request: &Parts, header: Option<&str>) -> Option<IpAddr> {
    if let Some(name) = header {
        let forwarded = request
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .next_back()
            .and_then(|last| last.trim().parse::<IpAddr>().ok());
        if forwarded.is_some() {
            return forwarded;
        }
    }
    request
        .extensions
        .get::<ConnectInfo<PeerAddr>>()
        .map(|info| info.0 .0.ip().to_canonical())
}

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

/// Browsers may call from any page (analytics.js sends no cookies, so `*`
/// is allowed for the origin). The request headers are echoed rather than
/// answered with `*`, which the Fetch standard says does not cover
/// `Authorization` (analytics.js sends `Authorization: Basic …` on every
/// call): browsers that enforce it would refuse every event.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::any())
        .allow_methods(AllowMethods::mirror_request())
        .allow_headers(AllowHeaders::mirror_request())
        .max_age(std::time::Duration::from_secs(24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use cdp_operators::messages::parse_time_ms;
    use std::io::Write as _;
    use std::time::Duration;

    use crate::collector::testkit::*;
    use crate::collector::CollectorConfig;
    use serde_json::Value;

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
    async fn bad_batches_bad_encodings_and_auth_headers_are_refused() -> TestResult {
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
                env.authed("/v1/batch").json(&json!({"batch": ["track"]})),
                StatusCode::BAD_REQUEST,
                "batch[0]: expected a JSON object",
            ),
            // A batch none of whose events can be written.
            (
                env.authed("/v1/batch").json(&json!({"batch": [
                    {"type": "track", "event": "No Id"}, {"type": "track", "userId": "u"}
                ]})),
                StatusCode::BAD_REQUEST,
                "batch[0]: userId or anonymousId",
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

    /// A batch's events that break the spec are left out and named; the
    /// others are written and the request answered `200`, as Segment
    /// does: an SDK drops a batch answered `400`, good events with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batchs_bad_events_are_refused_alone() -> TestResult {
        let env = start().await?;
        let good = |n: &str| json!({"type": "track", "userId": "u", "event": n});
        let (status, body) = json_body(
            env.authed("/v1/batch")
                .json(&json!({"batch": [
                    good("One"),
                    {"type": "track", "event": "No Id"},
                    good("Two"),
                    {"type": "track", "userId": "u", "event": "E", "messageId": "m".repeat(101)},
                    "not an event",
                    good("Three"),
                ]}))
                .send()
                .await?,
        )
        .await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["success"], json!(true));
        assert_eq!(body["accepted"], json!(3));
        let refused: Vec<(String, String)> = body["refused"]
            .as_array()
            .ok_or("no refused list")?
            .iter()
            .map(|r| {
                (
                    str_field(r, "code").to_string(),
                    str_field(r, "error").to_string(),
                )
            })
            .collect();
        assert_eq!(refused.len(), 3, "{body}");
        assert_eq!(refused[0].0, "missing_id");
        assert!(refused[0].1.starts_with("batch[1]: "), "{refused:?}");
        assert_eq!(refused[1].0, "spec_violation");
        assert!(refused[1].1.starts_with("batch[3]: "), "{refused:?}");
        assert_eq!(refused[2].0, "not_an_object");
        let records = env.consume(3).await?;
        let events: Vec<&str> = records
            .iter()
            .map(|r| str_field(&r.value, "event"))
            .collect();
        assert_eq!(events, ["One", "Two", "Three"]);
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
            json!({"integrations": {"Segment.io": {"apiKey": WRITE_KEY, "apiHost": format!("{host}/v1"), "protocol": "http"}},
                   "plan": {"track": {"__default": {"enabled": true}}}})
        );
        // Behind a TLS proxy, the scheme the browser used.
        let proxied = env
            .http
            .get(format!("{}/v1/projects/{WRITE_KEY}/settings", env.base))
            .header("x-forwarded-proto", "https")
            .send()
            .await?;
        let (_, body) = json_body(proxied).await?;
        assert_eq!(body["integrations"]["Segment.io"]["protocol"], "https");
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
        let header = |name: &str| {
            preflight
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(header("access-control-allow-origin").as_deref(), Some("*"));
        // Named, not `*`: a wildcard does not cover Authorization.
        let allowed = header("access-control-allow-headers").unwrap_or_default();
        assert!(allowed.contains("authorization"), "{allowed}");
        assert!(header("access-control-allow-methods").is_some_and(|m| m.contains("POST")));
        let missing = env.authed("/v1/nothing").body("{}").send().await?;
        assert_eq!(missing.status().as_u16(), 404);
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

    /// A website source's events get the client's address in `context.ip`
    /// unless they carry one (`0.0.0.0` opts out, as with Segment); a
    /// server source's are left as sent; a configured proxy header names
    /// the client by its last address.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_side_sources_get_context_ip_from_the_request() -> TestResult {
        let config = CollectorConfig {
            client_ip_header: Some("x-forwarded-for".into()),
            ..CollectorConfig::default()
        };
        let env = start_with(config, &[]).await?;
        let browser = |anon: &str, context: Value| {
            let mut event = json!({"anonymousId": anon, "event": "Viewed"});
            if !context.is_null() {
                event["context"] = context;
            }
            env.post("/v1/track")
                .basic_auth(BROWSER_KEY, Some(""))
                .json(&event)
        };
        let sent = [
            browser("none", Value::Null).send().await?,
            browser(
                "lib",
                json!({"library": {"name": "analytics.js"}, "ip": null}),
            )
            .send()
            .await?,
            browser("own", json!({"ip": "0.0.0.0", "locale": "de"}))
                .send()
                .await?,
            browser("proxied", Value::Null)
                .header("x-forwarded-for", "203.0.113.9, 198.51.100.7")
                .send()
                .await?,
            browser("forged", Value::Null)
                .header("x-forwarded-for", "not an address")
                .send()
                .await?,
            env.authed("/v1/track")
                .json(&json!({"anonymousId": "server", "event": "Viewed"}))
                .send()
                .await?,
        ];
        for response in sent {
            assert_eq!(response.status(), StatusCode::OK);
        }
        let records = env.consume(6).await?;
        let context_of = |key: &str| -> Result<Value, BoxError> {
            let r = records
                .iter()
                .find(|r| r.key.as_deref() == Some(key))
                .ok_or(format!("no record of {key}"))?;
            Ok(r.value.get("context").cloned().unwrap_or(Value::Null))
        };
        assert_eq!(context_of("none")?, json!({"ip": "127.0.0.1"}));
        assert_eq!(
            context_of("lib")?,
            json!({"library": {"name": "analytics.js"}, "ip": "127.0.0.1"})
        );
        assert_eq!(context_of("own")?, json!({"ip": "0.0.0.0", "locale": "de"}));
        assert_eq!(context_of("proxied")?, json!({"ip": "198.51.100.7"}));
        assert_eq!(context_of("forged")?, json!({"ip": "127.0.0.1"}));
        assert_eq!(context_of("server")?, Value::Null);
        env.stop().await
    }
}
