//! `cdp passthrough`: one bare consume→produce hop, the transport limit a
//! stage is measured against. It uses the stages' own consumer and producer
//! settings (the one client factory) and their batch discipline — poll up
//! to `kafka.max_batch` records, produce them to the same key (so the same
//! partitioning), wait for every acknowledgement, then commit the group
//! offset — but no state, no changelog, no processing. At-least-once: a
//! crash re-sends the last batch; fine for a benchmark, not for data.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cdp_pipeline::kafka::{send_now, ROUND_PATIENCE};
use cdp_pipeline::ClientFactory;
use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, DefaultConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct HopOptions {
    /// Input topic (full name).
    pub from: String,
    /// Output topic (full name).
    pub to: String,
    /// Stop after forwarding this many records.
    pub expect: u64,
    /// Or after this long without a record, once records flowed.
    pub idle: Duration,
}

/// What a hop did, printed as one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct HopReport {
    pub from: String,
    pub to: String,
    pub records: u64,
    /// Wall-clock ms of the first record consumed and of the last record
    /// acknowledged.
    pub first_ms: i64,
    pub last_ms: i64,
    pub events_per_sec: f64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Forward records until `expect` or idle; blocking (run it on its own
/// thread).
pub fn run_hop(factory: &ClientFactory, opts: &HopOptions) -> anyhow::Result<HopReport> {
    let group = format!(
        "{}.passthrough-{}",
        factory.config().topic_prefix,
        opts.from
    );
    let consumer: BaseConsumer = factory.stage_consumer(&group, None, DefaultConsumerContext)?;
    consumer.subscribe(&[&opts.from])?;
    // Ready before the first batch, or the hop's first round would wait
    // for the producer id and the transport limit would read lower.
    let producer = factory.producer_ready_for(&opts.to)?;
    let max = factory.config().max_batch.max(1);
    let (mut records, mut first_ms, mut last_ms) = (0u64, 0i64, 0i64);
    let mut last_record = Instant::now();
    let mut assigned = false;
    while records < opts.expect && !(records > 0 && last_record.elapsed() > opts.idle) {
        if !assigned && consumer.assignment()?.count() > 0 {
            // The benchmark waits for this line before it sends a latency
            // phase's load.
            tracing::info!(from = %opts.from, "hop assigned");
            assigned = true;
        }
        let mut batch = Vec::new();
        let mut timeout = Duration::from_millis(100);
        while batch.len() < max {
            match consumer.poll(timeout) {
                None => break,
                Some(Ok(m)) => batch.push(m.detach()),
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
            }
            timeout = Duration::ZERO;
        }
        if batch.is_empty() {
            continue;
        }
        if first_ms == 0 {
            first_ms = now_ms();
        }
        last_record = Instant::now();
        let mut sends = Vec::with_capacity(batch.len());
        for m in &batch {
            let mut r = FutureRecord::to(&opts.to).payload(m.payload().unwrap_or_default());
            if let Some(k) = m.key() {
                r = r.key(k);
            }
            if let Some(h) = m.headers() {
                r = r.headers(h.clone());
            }
            match producer.send_result(r) {
                Ok(d) => sends.push(d),
                Err((e, _)) => anyhow::bail!("producing to {}: {e}", opts.to),
            }
        }
        // The round is all queued: sent at once, as a stage sends its
        // round, not after `linger.ms`.
        send_now(&producer, ROUND_PATIENCE);
        for d in futures::executor::block_on(join_all(sends)) {
            match d {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => anyhow::bail!("producing to {}: {e}", opts.to),
                Err(_) => anyhow::bail!("producing to {}: delivery canceled", opts.to),
            }
        }
        records += batch.len() as u64;
        last_ms = now_ms();
        for m in &batch {
            consumer.store_offset(m.topic(), m.partition(), m.offset() + 1)?;
        }
        consumer.commit_consumer_state(CommitMode::Async)?;
    }
    let secs = ((last_ms - first_ms) as f64 / 1000.0).max(1e-3);
    Ok(HopReport {
        from: opts.from.clone(),
        to: opts.to.clone(),
        records,
        first_ms,
        last_ms,
        events_per_sec: records as f64 / secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdp_pipeline::KafkaConfig;
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::message::{Header, Headers, OwnedHeaders};
    use rdkafka::mocking::MockCluster;
    use rdkafka::{Offset, TopicPartitionList};

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hop_forwards_keys_payloads_and_headers_to_the_same_partitions() -> TestResult {
        let cluster = MockCluster::new(1)?;
        let factory = ClientFactory::new(KafkaConfig {
            brokers: cluster.bootstrap_servers(),
            topic_prefix: "hop".into(),
            max_batch: 7,
            ..KafkaConfig::default()
        })?;
        cluster.create_topic("hop.in", 3, 1)?;
        cluster.create_topic("hop.out", 3, 1)?;
        let producer = factory.producer()?;
        for i in 0..40 {
            let key = format!("k{}", i % 9);
            let payload = format!("{{\"n\":{i}}}");
            let headers = OwnedHeaders::new().insert(Header {
                key: "cdp-source",
                value: Some("web"),
            });
            producer
                .send(
                    FutureRecord::to("hop.in")
                        .key(&key)
                        .payload(&payload)
                        .headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
        let opts = HopOptions {
            from: "hop.in".into(),
            to: "hop.out".into(),
            expect: 40,
            idle: Duration::from_secs(10),
        };
        // A hop sends each round at once, as a stage does: with a 20 s linger
        // (below the 30 s `message.timeout.ms`) not even its first round
        // would be acknowledged before the deadline otherwise.
        let lingering = ClientFactory::new(KafkaConfig {
            properties: [("producer.linger.ms".to_string(), "20000".to_string())].into(),
            ..factory.config().clone()
        })?;
        let report = tokio::time::timeout(
            Duration::from_secs(15),
            tokio::task::spawn_blocking(move || run_hop(&lingering, &opts)),
        )
        .await
        .map_err(|_| "the hop waited out linger.ms instead of sending its rounds at once")???;
        assert_eq!(report.records, 40);
        assert!(report.first_ms > 0 && report.last_ms >= report.first_ms);

        let read = |topic: &'static str| {
            let f = factory.clone();
            move || -> Result<Vec<(i32, String, String, String)>, rdkafka::error::KafkaError> {
                let c: BaseConsumer = f
                    .plain_consumer("hop-test")
                    .map_err(|_| rdkafka::error::KafkaError::Canceled)?;
                let mut tpl = TopicPartitionList::new();
                for p in 0..3 {
                    tpl.add_partition_offset(topic, p, Offset::Beginning)?;
                }
                c.assign(&tpl)?;
                let deadline = Instant::now() + Duration::from_secs(15);
                let mut out = Vec::new();
                while out.len() < 40 && Instant::now() < deadline {
                    if let Some(m) = c.poll(Duration::from_millis(200)) {
                        let m = m?;
                        let header = m
                            .headers()
                            .and_then(|h| h.iter().next())
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                            .unwrap_or_default();
                        out.push((
                            m.partition(),
                            String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                            String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                            header,
                        ));
                    }
                }
                out.sort();
                Ok(out)
            }
        };
        let input = tokio::task::spawn_blocking(read("hop.in")).await??;
        let output = tokio::task::spawn_blocking(read("hop.out")).await??;
        assert_eq!(input.len(), 40);
        assert_eq!(input, output);
        Ok(())
    }
}
