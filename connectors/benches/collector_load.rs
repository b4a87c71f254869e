//! Load benchmark of the HTTP collector, next to a bare producer in the same
//! run (not a timed test: it prints numbers, it asserts nothing about them).
//!
//! One in-process broker (librdkafka's mock cluster, real Kafka protocol on
//! loopback TCP). Two phases of the same length (each run in two halves,
//! in the order bare, collector, collector, bare), each writing the same
//! realistic track events (~0.95 KB) in batches of 100 from N concurrent
//! clients to a topic of its own:
//!
//! 1. **bare** — N tasks each `send` 100 events with a `FutureProducer` from
//!    the same factory settings as the collector's (idempotent, acks=all)
//!    and wait for all 100 acks: the ceiling for this broker and machine.
//! 2. **collector** — N HTTP clients `POST /v1/batch` the same 100 events
//!    (pre-serialized bodies, keep-alive) to the collector on 127.0.0.1;
//!    an event counts once the collector answered 200, i.e. once the broker
//!    acknowledged it.
//!
//! Clients, collector and broker share the process, so the CPU figures are
//! everything together: the collector's own cost per event is lower.
//!
//! ```sh
//! cargo bench -p cdp-connectors --bench collector_load
//! # CDP_BENCH_CLIENTS=16 CDP_BENCH_SECS=10 CDP_BENCH_PARTITIONS=8
//! # CDP_BENCH_ONLY=collector (or bare): one phase only, for a profiler
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdp_connectors::{Collector, CollectorConfig};
use cdp_operators::config::SourceConfig;
use cdp_pipeline::{envelope, ClientFactory, Health, KafkaConfig, Shutdown};
use futures::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::{json, Value};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const WRITE_KEY: &str = "wk_bench";
const BATCH: usize = 100;
/// Distinct pre-built batches the clients cycle through.
const BODIES: usize = 64;

struct Settings {
    clients: usize,
    duration: Duration,
    partitions: i32,
    /// `bare` or `collector` runs that phase only (for a profiler).
    only: Option<String>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One realistic track event: what analytics.js sends for a product view
/// or an order, with a browser context.
fn event(batch: usize, i: usize) -> Value {
    let visitor = (batch * 7919 + i * 104_729) % 50_000;
    let order = i.is_multiple_of(10);
    let category = ["shoes", "apparel", "outdoor", "accessories"][i % 4];
    json!({
        "type": "track",
        "event": if order { "Order Completed" } else { "Product Viewed" },
        "anonymousId": format!("anon-{visitor:08x}-4c1e-9f7a-2b6d3e8f1a0c"),
        "userId": if visitor.is_multiple_of(3) { Value::String(format!("user-{visitor}")) } else { Value::Null },
        "messageId": format!("ajs-next-{batch:04}-{i:04}-0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e"),
        "timestamp": "2026-11-26T10:00:00.000Z",
        "properties": {
            "sku": format!("SKU-{:05}", (visitor * 31 + i) % 20_000),
            "name": "Trail Running Shoe, Men's, Waterproof",
            "category": category,
            "price": 129.99,
            "quantity": 1 + i % 3,
            "currency": "EUR",
            "revenue": if order { json!(259.98) } else { Value::Null },
            "url": format!("https://shop.example.com/products/sku-{}", (visitor * 31 + i) % 20_000),
        },
        "context": {
            "ip": format!("203.0.113.{}", visitor % 250),
            "locale": "de-DE",
            "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
            "library": {"name": "analytics.js", "version": "next-1.84.3"},
            "page": {
                "path": "/products/trail-running-shoe",
                "referrer": "https://www.google.com/",
                "title": "Trail Running Shoe | Example Shop",
                "url": "https://shop.example.com/products/trail-running-shoe"
            },
            "campaign": {"source": "newsletter", "medium": "email", "name": "winter-sale"}
        },
        "integrations": {}
    })
}

/// The same events, as HTTP bodies and as (key, payload) records.
struct Workload {
    /// Leaked once per run, so each request sends them without a copy.
    bodies: Vec<&'static [u8]>,
    records: Vec<Vec<(String, Vec<u8>)>>,
    event_bytes: usize,
}

fn workload() -> Result<Workload, BoxError> {
    let mut bodies = Vec::with_capacity(BODIES);
    let mut records = Vec::with_capacity(BODIES);
    let mut total = 0;
    for b in 0..BODIES {
        let events: Vec<Value> = (0..BATCH).map(|i| event(b, i)).collect();
        let mut batch = Vec::with_capacity(BATCH);
        for e in &events {
            let payload = serde_json::to_vec(e)?;
            total += payload.len();
            let key = e["anonymousId"].as_str().unwrap_or_default().to_string();
            batch.push((key, payload));
        }
        records.push(batch);
        let body =
            serde_json::to_vec(&json!({"batch": events, "sentAt": "2026-11-26T10:00:00.100Z"}))?;
        bodies.push(&*Box::leak(body.into_boxed_slice()));
    }
    Ok(Workload {
        bodies,
        records,
        event_bytes: total / (BODIES * BATCH),
    })
}

/// CPU seconds this process used so far (user + system), from /proc.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the `(comm)`: state is field 3; utime, stime are 14, 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // Field n of the file is fields[n - 3]; USER_HZ is 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

struct Outcome {
    events: u64,
    errors: u64,
    elapsed: Duration,
    cpu: f64,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    fn per_cpu(&self) -> f64 {
        self.events as f64 / self.cpu
    }

    fn plus(self, other: Outcome) -> Outcome {
        Outcome {
            events: self.events + other.events,
            errors: self.errors + other.errors,
            elapsed: self.elapsed + other.elapsed,
            cpu: self.cpu + other.cpu,
        }
    }
}

/// Run `clients` copies of `step` until the deadline; each step returns
/// how many events were acknowledged (0 with an error count on failure).
async fn run_clients<F, Fut>(clients: usize, duration: Duration, step: F) -> Outcome
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<u64, String>> + Send,
{
    let events = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let deadline = started + duration;
    let tasks = (0..clients).map(|c| {
        let (events, errors, first_error, step) = (
            events.clone(),
            errors.clone(),
            first_error.clone(),
            step.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                match step(c, n).await {
                    Ok(k) => {
                        events.fetch_add(k, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut first) = first_error.lock() {
                            first.get_or_insert(e);
                        }
                    }
                }
                n += 1;
            }
        })
    });
    for t in join_all(tasks).await {
        if let Err(e) = t {
            eprintln!("client task failed: {e}");
        }
    }
    let elapsed = started.elapsed();
    if let Ok(first) = first_error.lock() {
        if let Some(e) = first.as_ref() {
            eprintln!("first error: {e}");
        }
    }
    Outcome {
        events: events.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed,
        cpu: cpu_seconds() - cpu_before,
    }
}

/// Records ever written to `topic`: the sum of its high watermarks (the
/// mock broker drops old segments, so the low watermarks move).
fn topic_count(producer: &FutureProducer, topic: &str, partitions: i32) -> Result<i64, BoxError> {
    let mut total = 0;
    for p in 0..partitions {
        let (_, high) = producer
            .client()
            .fetch_watermarks(topic, p, Duration::from_secs(10))?;
        total += high;
    }
    Ok(total)
}

async fn bench(settings: Settings) -> Result<(), BoxError> {
    let mock = MockCluster::new(1)?;
    let brokers = mock.bootstrap_servers();
    let bare_topic = "bench.bare";
    let raw_topic = "bench.raw";
    mock.create_topic(bare_topic, settings.partitions, 1)?;
    mock.create_topic(raw_topic, settings.partitions, 1)?;
    let factory = ClientFactory::new(KafkaConfig {
        brokers,
        ..Default::default()
    })?;
    let work = Arc::new(workload()?);
    println!(
        "collector_load: {} clients, {} events per batch, ~{} bytes per event, {} partitions, {:?} per phase, {} cores",
        settings.clients,
        BATCH,
        work.event_bytes,
        settings.partitions,
        settings.duration,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );

    // Phase 1: the bare producer, same settings, same events.
    let producer = factory.producer()?;
    let send_batch = {
        let (producer, work) = (producer.clone(), work.clone());
        move |c: usize, n: u64| {
            let (producer, work) = (producer.clone(), work.clone());
            async move {
                let batch = &work.records[(c * 7 + n as usize) % BODIES];
                let mut acks = Vec::with_capacity(batch.len());
                for (key, payload) in batch {
                    let headers = OwnedHeaders::new().insert(Header {
                        key: envelope::SOURCE,
                        value: Some("web".as_bytes()),
                    });
                    let record = FutureRecord::to(bare_topic)
                        .key(key.as_bytes())
                        .payload(payload.as_slice())
                        .headers(headers);
                    match producer.send_result(record) {
                        Ok(ack) => acks.push(ack),
                        Err((e, _)) => return Err(e.to_string()),
                    }
                }
                for ack in join_all(acks).await {
                    match ack {
                        Ok(Ok(_)) => {}
                        Ok(Err((e, _))) => return Err(e.to_string()),
                        Err(_) => return Err("producer gone".into()),
                    }
                }
                Ok(batch.len() as u64)
            }
        }
    };
    // Warm-up (connections, producer id), not counted.
    let warm = send_batch(0, 0).await?;

    // Phase 2: the collector over HTTP.
    let sources = [SourceConfig {
        id: "web".into(),
        write_key: WRITE_KEY.into(),
        tracking_plan: None,
        kind: Default::default(),
    }];
    let config = CollectorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Default::default()
    };
    let collector = Collector::new(config, &sources, &factory, raw_topic.into())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/batch", listener.local_addr()?);
    let shutdown = Shutdown::default();
    let health = Health::default();
    let server =
        tokio::spawn(collector.serve_on(listener, shutdown.clone(), health.register("collect")));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(settings.clients)
        .build()?;
    let post_batch = move |c: usize, n: u64| {
        let (http, work, url) = (http.clone(), work.clone(), url.clone());
        async move {
            let body = work.bodies[(c * 7 + n as usize) % BODIES];
            let response = http
                .post(&url)
                .basic_auth(WRITE_KEY, Some(""))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            let text = response.text().await.map_err(|e| e.to_string())?;
            if status.is_success() {
                Ok(BATCH as u64)
            } else {
                Err(format!("{status}: {text}"))
            }
        }
    };
    let warm = warm + post_batch(0, 0).await?;

    // Each phase in two halves, in the order bare, collector, collector,
    // bare: drift (the broker's growing log, other load on the machine)
    // weighs on both alike.
    let (clients, half) = (settings.clients, settings.duration / 2);
    let only = |phase: &str| match &settings.only {
        Some(only) if only != phase => Duration::ZERO,
        _ => half,
    };
    let bare = run_clients(clients, only("bare"), send_batch.clone()).await;
    let collected = run_clients(clients, only("collector"), post_batch.clone()).await;
    let collected = collected.plus(run_clients(clients, only("collector"), post_batch).await);
    let bare = bare.plus(run_clients(clients, only("bare"), send_batch).await);
    report("bare producer", &bare);
    report("collector", &collected);
    shutdown.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;

    // Every acknowledged event is on its topic (and nothing else).
    let on_bare = topic_count(&producer, bare_topic, settings.partitions)?;
    let on_raw = topic_count(&producer, raw_topic, settings.partitions)?;
    println!(
        "on the broker: {on_bare} bare + {on_raw} collector records; acked {} + {} (+ {warm} warm-up)",
        bare.events, collected.events
    );
    println!(
        "collector / bare producer: {:.0}% of the events/s, {:.0}% of the events per CPU-second",
        100.0 * collected.rate() / bare.rate(),
        100.0 * collected.per_cpu() / bare.per_cpu(),
    );
    Ok(())
}

fn report(name: &str, o: &Outcome) {
    println!(
        "{name:>14}: {:>9} events in {:.1}s = {:>8.0} events/s; {:.1} CPU-s = {:>8.0} events per CPU-second (whole process); {} failed requests",
        o.events,
        o.elapsed.as_secs_f64(),
        o.rate(),
        o.cpu,
        o.per_cpu(),
        o.errors,
    );
}

fn main() -> Result<(), BoxError> {
    // `cargo bench` passes `--bench`; a `cargo test --benches` run passes
    // nothing of the sort: keep that one short.
    let benching = std::env::args().any(|a| a == "--bench");
    let settings = Settings {
        clients: env_or("CDP_BENCH_CLIENTS", 16),
        duration: Duration::from_secs_f64(env_or(
            "CDP_BENCH_SECS",
            if benching { 10.0 } else { 0.5 },
        )),
        partitions: env_or("CDP_BENCH_PARTITIONS", 8),
        only: std::env::var("CDP_BENCH_ONLY").ok(),
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(settings))
}
