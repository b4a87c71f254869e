//! The `webhook` destination: one signed POST per change, retried with
//! backoff, in order per profile (see the parent module's docs).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cdp_pipeline::{Sink, SinkRecord};
use futures::future::BoxFuture;
use futures::FutureExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::http::{classify, impl_http_sink, run_lanes, Attempt, BatchRun, HttpCore};
use super::{DestinationError, DELIVERY_ID_HEADER, SIGNATURE_HEADER};

/// POSTs each record's value to a URL; see the module docs for retries,
/// ordering and signing.
#[derive(Clone)]
pub struct WebhookSink {
    inner: Arc<WebhookInner>,
}

#[derive(Clone)]
struct WebhookInner {
    core: HttpCore,
    url: reqwest::Url,
    secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs.
        f.debug_struct("WebhookSink")
            .field("id", &self.inner.core.id)
            .field("url", &self.inner.url.as_str())
            .field("signed", &self.inner.secret.is_some())
            .field("max_attempts", &self.inner.core.policy.max_attempts)
            .finish()
    }
}

impl WebhookSink {
    pub fn new(
        id: &str,
        url: &str,
        secret: Option<Vec<u8>>,
        timeout: Duration,
        max_attempts: u32,
    ) -> Result<Self, DestinationError> {
        let (core, url) = HttpCore::new(id, url, timeout, max_attempts)?;
        Ok(WebhookSink {
            inner: Arc::new(WebhookInner { core, url, secret }),
        })
    }
}

impl_http_sink!(WebhookSink);

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
            .core
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(DELIVERY_ID_HEADER, &record.delivery_id)
            .body(record.value.clone());
        if let Some(sig) = signature {
            request = request.header(SIGNATURE_HEADER, sig);
        }
        classify(request.send().await)
    }

    /// Deliver one record within the batch.
    async fn deliver_one(&self, record: &SinkRecord, batch: &BatchRun) -> Result<(), String> {
        let signature = match &self.secret {
            None => None,
            Some(_) => match self.signature(&record.value) {
                Some(s) => Some(s),
                None => {
                    self.core.telemetry.dead_lettered(1);
                    return Err("cannot compute the HMAC signature".into());
                }
            },
        };
        let result = self
            .core
            .send(batch, 1, || self.attempt(record, signature.as_deref()))
            .await;
        if result.is_ok() {
            self.core.telemetry.delivered(&record.value);
        }
        result
    }
}

impl Sink for WebhookSink {
    fn name(&self) -> &str {
        &self.inner.core.id
    }

    fn deliver(&self, records: Vec<SinkRecord>) -> BoxFuture<'static, Vec<Result<(), String>>> {
        let inner = self.inner.clone();
        let in_flight = inner.core.telemetry.in_flight(records.len() as i64);
        async move {
            let _in_flight = in_flight;
            // Group by key, keeping batch order within a key: one profile's
            // changes arrive in order, different profiles in parallel.
            let mut groups: BTreeMap<Option<&[u8]>, Vec<usize>> = BTreeMap::new();
            for (i, r) in records.iter().enumerate() {
                groups.entry(r.key.as_deref()).or_default().push(i);
            }
            let batch = &inner.core.start_batch();
            let inner = &inner;
            let records = &records;
            let results = vec![Err("not delivered".to_string()); records.len()];
            run_lanes(results, groups.into_values(), |indexes| async move {
                let mut out = Vec::with_capacity(indexes.len());
                for i in indexes {
                    let result = match records.get(i) {
                        Some(r) => inner.deliver_one(r, batch).await,
                        None => Err("record index out of range".to_string()),
                    };
                    out.push((i, result));
                }
                out
            })
            .await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::testing::{receiver, record, requests, TestResult};
    use crate::destinations::HttpSink;
    use axum::http::StatusCode;
    use axum::routing::post;
    use axum::Router;

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
}
