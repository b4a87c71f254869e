//! The `segment` destination: for each audience change, the two calls
//! Segment Engage sends when a profile enters or leaves an audience, to any
//! Segment-compatible `/v1/batch` (Segment, RudderStack, cdp's own
//! collector), so the destinations of those catalogs can take them.
//!
//! - `identify` with the audience as a boolean trait (`{"<audience>":
//!   true}` on entry, `false` on exit);
//! - `track` `"Audience Entered"` / `"Audience Exited"` with properties
//!   `{"audience_key": "<audience>", "<audience>": true|false}`.
//!
//! Both carry `userId` (the profile's first `user_id`) and `anonymousId`
//! (its first `anonymous_id`; the profile id when it has neither), the
//! change's `event_time` as `timestamp`, Engage's `context.personas`
//! (`computation_class: audience`, `computation_key: <audience>`), and a
//! `messageId` derived from the runtime's delivery id, so a retried or
//! replayed change is the same message and the receiver dedupes it.
//!
//! An exit because the profile was merged into another (`merged_into`) is
//! not sent: Engage sends nothing for a merge, and the survivor's own
//! changes say where the person is.
//!
//! Calls are batched: the changes of one profile go, in order, in one lane
//! of requests of up to `batch_size` calls (a change's two calls are never
//! split); lanes run concurrently. Retries, backoff, `Retry-After`, the
//! rate limit, the batch deadline and "skip the rest once the endpoint gave
//! up" are the webhook's ([`super::http`]). A request that fails for good
//! dead-letters every change in it.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use cdp_operators::messages::{AudienceAction, AudienceChange};
use cdp_pipeline::{Sink, SinkRecord};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::http::{classify, impl_http_sink, invalid_url, run_lanes, BatchRun, HttpCore};
use super::{DestinationError, KEY_CONCURRENCY};

/// Calls per request when `batch_size` is not set.
pub const DEFAULT_BATCH_SIZE: u32 = 100;

/// The Segment calls of one change: `identify`, then `track`.
pub fn calls(change: &AudienceChange, delivery_id: &str) -> [Value; 2] {
    let entered = change.action == AudienceAction::Entered;
    let audience = change.audience.as_str();
    let first = |kind: &str| {
        change
            .identifiers
            .get(kind)
            .and_then(|v| v.first())
            .cloned()
    };
    let user_id = first("user_id");
    let anonymous_id =
        first("anonymous_id").or_else(|| user_id.is_none().then(|| change.profile_id.clone()));
    let mut traits = serde_json::Map::new();
    traits.insert(audience.to_string(), Value::Bool(entered));
    if let Some(email) = first("email") {
        traits.insert("email".into(), Value::String(email));
    }
    let context = json!({
        "personas": {
            "computation_class": "audience",
            "computation_key": audience,
            "computation_id": audience,
        },
        "library": {"name": "cdp", "version": env!("CARGO_PKG_VERSION")},
    });
    let id = message_id(delivery_id);
    let mut identify = json!({
        "type": "identify",
        "messageId": format!("{id}-identify"),
        "timestamp": change.event_time,
        "traits": traits,
        "context": context,
    });
    let mut track = json!({
        "type": "track",
        "event": if entered { "Audience Entered" } else { "Audience Exited" },
        "messageId": format!("{id}-track"),
        "timestamp": change.event_time,
        "properties": {"audience_key": audience, audience: entered},
        "context": context,
    });
    for call in [&mut identify, &mut track] {
        if let Some(u) = &user_id {
            call["userId"] = Value::String(u.clone());
        }
        if let Some(a) = &anonymous_id {
            call["anonymousId"] = Value::String(a.clone());
        }
    }
    [identify, track]
}

/// A stable `messageId` stem from the delivery id (which replays keep).
fn message_id(delivery_id: &str) -> String {
    let digest = Sha256::digest(delivery_id.as_bytes());
    format!("cdp-{}", hex::encode(&digest[..16]))
}

/// Sends each change as Engage's `identify` + `track` to `<url>/v1/batch`.
#[derive(Clone)]
pub struct SegmentSink {
    inner: Arc<SegmentInner>,
}

#[derive(Clone)]
struct SegmentInner {
    core: HttpCore,
    endpoint: reqwest::Url,
    write_key: String,
    /// Changes per request (two calls each).
    changes_per_request: usize,
}

impl std::fmt::Debug for SegmentSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The write key stays out of logs.
        f.debug_struct("SegmentSink")
            .field("id", &self.inner.core.id)
            .field("endpoint", &self.inner.endpoint.as_str())
            .field("changes_per_request", &self.inner.changes_per_request)
            .finish()
    }
}

/// One change ready to send: its index in the batch, its calls, its value.
struct Prepared {
    index: usize,
    calls: [Value; 2],
}

impl SegmentSink {
    /// `url` is the API's base (`https://api.segment.io`); calls go to
    /// `<url>/v1/batch`.
    pub fn new(
        id: &str,
        url: &str,
        write_key: String,
        timeout: Duration,
        max_attempts: u32,
        batch_size: u32,
    ) -> Result<Self, DestinationError> {
        let (core, mut endpoint) = HttpCore::new(id, url, timeout, max_attempts)?;
        endpoint
            .path_segments_mut()
            .map_err(|()| invalid_url(id, url, "cannot be a base".into()))?
            .pop_if_empty()
            .extend(["v1", "batch"]);
        Ok(SegmentSink {
            inner: Arc::new(SegmentInner {
                core,
                endpoint,
                write_key,
                changes_per_request: (batch_size.max(2) / 2) as usize,
            }),
        })
    }
}

impl_http_sink!(SegmentSink);

impl SegmentInner {
    /// The body of one request of changes.
    fn body(chunk: &[Prepared]) -> Result<Vec<u8>, String> {
        let batch: Vec<&Value> = chunk.iter().flat_map(|p| p.calls.iter()).collect();
        serde_json::to_vec(&json!({
            "batch": batch,
            "sentAt": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }))
        .map_err(|e| format!("cannot encode the batch: {e}"))
    }

    /// Send one request of changes within the batch.
    async fn send(&self, chunk: &[Prepared], batch: &BatchRun) -> Result<(), String> {
        let n = chunk.len() as u32;
        let body = match Self::body(chunk) {
            Ok(body) => body,
            Err(reason) => {
                self.core.telemetry.dead_lettered(u64::from(n));
                return Err(reason);
            }
        };
        self.core
            .send(batch, n, || {
                let request = self
                    .core
                    .client
                    .post(self.endpoint.clone())
                    .basic_auth(&self.write_key, Some(""))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
                async move { classify(request.send().await) }
            })
            .await
    }

    /// One lane: its changes in order, request after request.
    async fn run_lane(
        &self,
        lane: Vec<Prepared>,
        records: &[SinkRecord],
        batch: &BatchRun,
    ) -> Vec<(usize, Result<(), String>)> {
        let mut out = Vec::with_capacity(lane.len());
        for chunk in lane.chunks(self.changes_per_request.max(1)) {
            let result = self.send(chunk, batch).await;
            if result.is_ok() {
                for p in chunk {
                    if let Some(r) = records.get(p.index) {
                        self.core.telemetry.delivered(&r.value);
                    }
                }
            }
            out.extend(chunk.iter().map(|p| (p.index, result.clone())));
        }
        out
    }
}

/// The lane of a key: one profile's changes always share one.
fn lane_of(key: Option<&[u8]>) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % KEY_CONCURRENCY as u64) as usize
}

impl Sink for SegmentSink {
    fn name(&self) -> &str {
        &self.inner.core.id
    }

    fn deliver(&self, records: Vec<SinkRecord>) -> BoxFuture<'static, Vec<Result<(), String>>> {
        let inner = self.inner.clone();
        let in_flight = inner.core.telemetry.in_flight(records.len() as i64);
        async move {
            let _in_flight = in_flight;
            let mut results: Vec<Result<(), String>> =
                vec![Err("not delivered".to_string()); records.len()];
            let mut lanes: BTreeMap<usize, Vec<Prepared>> = BTreeMap::new();
            for (index, r) in records.iter().enumerate() {
                match serde_json::from_slice::<AudienceChange>(&r.value) {
                    // A profile merged into another: Engage sends nothing
                    // for it, and Segment, which links both ids, could see
                    // this `false` after the survivor's `true` (another
                    // lane) and drop the person from the audience.
                    Ok(change) if change.merged_into.is_some() => results[index] = Ok(()),
                    Ok(change) => {
                        lanes
                            .entry(lane_of(r.key.as_deref()))
                            .or_default()
                            .push(Prepared {
                                index,
                                calls: calls(&change, &r.delivery_id),
                            })
                    }
                    Err(e) => {
                        inner.core.telemetry.dead_lettered(1);
                        results[index] = Err(format!("not an audience change: {e}"));
                    }
                }
            }
            let batch = &inner.core.start_batch();
            let inner = &inner;
            let records = &records;
            run_lanes(results, lanes.into_values(), |lane| {
                inner.run_lane(lane, records, batch)
            })
            .await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests;
