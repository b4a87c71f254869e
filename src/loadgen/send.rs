//! Sending the workload: to the collector over HTTP in batches (as SDKs
//! do) or straight to `<p>.raw` with the producer every stage uses, at a
//! target rate or as fast as the receiver takes it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use super::workload::Event;

/// Paces sends to a target rate: event `n` is due `n / rate` seconds
/// after the start.
pub struct Pace {
    start: Instant,
    rate: Option<f64>,
}

impl Pace {
    pub fn new(rate: Option<f64>) -> Self {
        Pace {
            start: Instant::now(),
            rate: rate.filter(|r| *r > 0.0),
        }
    }

    pub async fn wait_for(&self, sent: u64) {
        if let Some(rate) = self.rate {
            let due = self.start + Duration::from_secs_f64(sent as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

/// The send time, as the event's `timestamp`.
pub fn stamp(event: &mut Event) {
    let now = chrono::Utc::now().timestamp_millis();
    event.body["timestamp"] = json!(cdp_operators::messages::rfc3339_ms(now));
}

/// Posts batches to `<url>/v1/batch` with up to `concurrency` in flight.
pub struct HttpSender {
    client: reqwest::Client,
    url: String,
    write_key: String,
    concurrency: usize,
    in_flight: JoinSet<Result<u64, (u64, String)>>,
    pub failed: u64,
    pub first_error: Option<String>,
}

impl HttpSender {
    pub fn new(base: &str, write_key: &str, concurrency: usize) -> Self {
        HttpSender {
            client: reqwest::Client::new(),
            url: format!("{}/v1/batch", base.trim_end_matches('/')),
            write_key: write_key.to_string(),
            concurrency: concurrency.max(1),
            in_flight: JoinSet::new(),
            failed: 0,
            first_error: None,
        }
    }

    /// Queue one batch; waits while `concurrency` batches are in flight.
    pub async fn send(&mut self, batch: Vec<Value>) {
        while self.in_flight.len() >= self.concurrency {
            self.reap_one().await;
        }
        let n = batch.len() as u64;
        let body = json!({"batch": batch, "sentAt": cdp_operators::messages::rfc3339_ms(
            chrono::Utc::now().timestamp_millis())});
        let (client, url, key) = (
            self.client.clone(),
            self.url.clone(),
            self.write_key.clone(),
        );
        self.in_flight.spawn(async move {
            // The collector answers 503 while its producer queue is full:
            // back off and retry, as SDKs do.
            let mut backoff = Duration::from_millis(50);
            for _ in 0..8 {
                let resp = client
                    .post(&url)
                    .basic_auth(&key, Some(""))
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| (n, format!("not sent: {e}")))?;
                let status = resp.status();
                if status.is_success() {
                    return Ok(n);
                }
                if status.as_u16() != 503 && status.as_u16() != 429 {
                    let text = resp.text().await.unwrap_or_default();
                    return Err((n, format!("refused: {status}: {text}")));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err((
                n,
                "not sent: collector still busy after 8 tries".to_string(),
            ))
        });
    }

    async fn reap_one(&mut self) {
        match self.in_flight.join_next().await {
            Some(Ok(Ok(_))) | None => {}
            Some(Ok(Err((n, e)))) => self.fail(n, e),
            Some(Err(e)) => self.fail(0, format!("send task failed: {e}")),
        }
    }

    fn fail(&mut self, n: u64, e: String) {
        self.failed += n;
        self.first_error.get_or_insert(e);
    }

    /// Wait for every batch in flight.
    pub async fn finish(&mut self) {
        while !self.in_flight.is_empty() {
            self.reap_one().await;
        }
    }
}

/// Produces one record per event to `<p>.raw`, keyed by the anonymous id,
/// with the `cdp-source` header.
pub struct RawSender {
    producer: FutureProducer,
    topic: String,
    source: String,
    in_flight: VecDeque<DeliveryFuture>,
    pub failed: u64,
    pub first_error: Option<String>,
}

/// Deliveries awaited at most before sending more.
const MAX_IN_FLIGHT: usize = 100_000;

impl RawSender {
    pub fn new(producer: FutureProducer, topic: String, source: String) -> Self {
        RawSender {
            producer,
            topic,
            source,
            in_flight: VecDeque::new(),
            failed: 0,
            first_error: None,
        }
    }

    pub async fn send(&mut self, event: &Event) -> anyhow::Result<()> {
        let payload = serde_json::to_vec(&event.body).context("serializing an event")?;
        loop {
            if self.in_flight.len() >= MAX_IN_FLIGHT {
                self.reap_one().await;
            }
            let headers = OwnedHeaders::new().insert(Header {
                key: "cdp-source",
                value: Some(self.source.as_bytes()),
            });
            let record = FutureRecord::to(&self.topic)
                .key(event.key.as_bytes())
                .payload(&payload)
                .headers(headers);
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.in_flight.push_back(delivery);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // The client's queue is full: wait for the oldest send.
                    if self.in_flight.is_empty() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    } else {
                        self.reap_one().await;
                    }
                }
                Err((e, _)) => anyhow::bail!("producing to {}: {e}", self.topic),
            }
        }
    }

    async fn reap_one(&mut self) {
        let Some(delivery) = self.in_flight.pop_front() else {
            return;
        };
        let error = match delivery.await {
            Ok(Ok(_)) => return,
            Ok(Err((e, _))) => e.to_string(),
            Err(_) => "delivery canceled".to_string(),
        };
        self.failed += 1;
        self.first_error.get_or_insert(error);
    }

    /// Wait for every delivery.
    pub async fn finish(&mut self) {
        while !self.in_flight.is_empty() {
            self.reap_one().await;
        }
    }
}
