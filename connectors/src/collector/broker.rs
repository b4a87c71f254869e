//! Broker health and the producer: the probe, rebuilding a producer that
//! cannot recover, and producing a request's events with acknowledgements.

use std::sync::atomic::Ordering;
use std::time::Instant;

use cdp_pipeline::{envelope, metrics, ReadyFlag, Shutdown};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureRecord, Producer};

use super::error::CollectError;
use super::{Collector, Prepared, PROBE_INTERVAL};

impl Collector {
    /// Probe the broker until shutdown: readiness, the fast 503 path, and
    /// replacing a producer that cannot recover (see module docs).
    pub(super) async fn watch_broker(self, shutdown: Shutdown, ready: ReadyFlag) {
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

    /// Produce every event and wait until the broker acknowledged all, or
    /// until the probe finds the broker gone.
    pub(super) async fn produce(
        &self,
        source: &str,
        events: &[Prepared],
    ) -> Result<(), CollectError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    use std::time::Duration;

    use crate::collector::testkit::*;
    use crate::collector::{CollectorConfig, RETRY_AFTER_SECS};

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
}
