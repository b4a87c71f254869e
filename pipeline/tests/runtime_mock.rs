//! The runtime against a real Kafka-protocol broker (librdkafka's mock
//! cluster, in process, real TCP): processing, dead letters, dedupe by
//! position, ticks and timers, and restore from the changelog after the
//! local state is lost.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cdp_pipeline::envelope::Position;
use cdp_pipeline::{
    ClientFactory, Context, Health, KafkaConfig, Operator, OperatorError, OutputTarget, Record,
    Shutdown, StageRuntime, StageSpec,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Counts records per key; emits `key:count`. Rejects the value `bad`.
/// On its first record sets a timer 300 ms of stream time ahead (stream
/// time is 0 until the first tick, so the first tick fires it).
struct Counter;

impl Operator for Counter {
    fn process(&mut self, r: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        if r.value == b"bad" {
            return Err(OperatorError::rejected(
                "bad_value",
                serde_json::json!({"why": "test"}),
            ));
        }
        let key = r.key.unwrap_or_default().to_vec();
        let mut state_key = b"count/".to_vec();
        state_key.extend_from_slice(&key);
        let n: u64 = ctx.get_json(&state_key)?.unwrap_or(0) + 1;
        ctx.put_json(&state_key, &n)?;
        if ctx.get(b"timer-set")?.is_none() {
            ctx.put(b"timer-set", vec![1]);
            ctx.set_timer(ctx.now() + 300, b"t");
        }
        let out = format!("{}:{n}", String::from_utf8_lossy(&key));
        ctx.emit("next", Some(key), out.into_bytes());
        Ok(())
    }

    fn on_timer(&mut self, key: &[u8], ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        ctx.emit("next", Some(b"timer".to_vec()), key.to_vec());
        Ok(())
    }
}

struct Setup {
    _mock: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    factory: ClientFactory,
    producer: FutureProducer,
}

fn setup(state_dir: &str) -> Result<Setup, Box<dyn std::error::Error + Send + Sync>> {
    let mock = MockCluster::new(1)?;
    let mut properties = BTreeMap::new();
    properties.insert(
        "consumer.session.timeout.ms".to_string(),
        "6000".to_string(),
    );
    properties.insert(
        "consumer.heartbeat.interval.ms".to_string(),
        "500".to_string(),
    );
    let config = KafkaConfig {
        brokers: mock.bootstrap_servers(),
        topic_prefix: "t".into(),
        partitions: 2,
        state_dir: state_dir.to_string(),
        tick_interval: cdp_pipeline::Span::from_millis(100),
        properties,
        ..KafkaConfig::default()
    };
    for t in ["t.in", "t.out", "t.invalid", "t.count-changelog"] {
        mock.create_topic(t, 2, 1)?;
    }
    let factory = ClientFactory::new(config)?;
    let producer = factory.producer()?;
    Ok(Setup {
        _mock: mock,
        factory,
        producer,
    })
}

fn spec() -> StageSpec {
    let mut outputs = BTreeMap::new();
    outputs.insert("next", OutputTarget::Topic("t.out".into()));
    StageSpec {
        name: "count",
        input_topic: "t.in".into(),
        outputs,
        operator: Box::new(|_| Box::new(Counter)),
        ticks: true,
        observer: None,
    }
}

async fn produce(
    p: &FutureProducer,
    key: &str,
    value: &str,
    headers: Option<OwnedHeaders>,
) -> TestResult {
    let mut r = FutureRecord::to("t.in").key(key).payload(value);
    if let Some(h) = headers {
        r = r.headers(h);
    }
    p.send(r, Duration::from_secs(5))
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

fn read_all(
    factory: &ClientFactory,
    topic: &str,
    want: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let Ok(c): Result<BaseConsumer, _> = factory.plain_consumer("reader") else {
        return vec![];
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        let _ = tpl.add_partition_offset(topic, p, Offset::Beginning);
    }
    if c.assign(&tpl).is_err() {
        return vec![];
    }
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline && !want(&out) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            let reason = m
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "cdp-dlq-reason")
                        .and_then(|h| h.value)
                })
                .map(|v| String::from_utf8_lossy(v).to_string());
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
            let value = String::from_utf8_lossy(m.payload().unwrap_or_default()).to_string();
            out.push((key, reason.unwrap_or(value)));
        }
    }
    out
}

fn run_stage(
    factory: &ClientFactory,
    shutdown: &Shutdown,
) -> std::thread::JoinHandle<Result<(), cdp_pipeline::runtime::RuntimeError>> {
    let rt = StageRuntime::new(
        spec(),
        factory.clone(),
        None,
        Health::default().register("count"),
    );
    let handle = tokio::runtime::Handle::current();
    let s = shutdown.clone();
    std::thread::spawn(move || rt.run(handle, s))
}

fn counts(out: &[(String, String)], key: &str) -> Vec<String> {
    out.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_dedupes_dead_letters_ticks_and_restores_after_losing_local_state() -> TestResult
{
    let dir = tempfile::tempdir()?;
    let state = dir.path().display().to_string();
    let s = setup(&state)?;

    for i in 0..10 {
        produce(&s.producer, &format!("k{}", i % 2), "x", None).await?;
    }
    produce(&s.producer, "k0", "bad", None).await?;
    // Upstream replay: the same origin position twice; the second is dropped,
    // as is an older epoch's record after a newer one was seen.
    let pos = |epoch, offset| {
        let p = Position {
            epoch,
            offset,
            index: 0,
        };
        p.to_headers("up:0")
            .iter()
            .fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_slice()),
                })
            })
    };
    produce(&s.producer, "dup", "x", Some(pos(2, 7))).await?;
    produce(&s.producer, "dup", "x", Some(pos(2, 7))).await?;
    produce(&s.producer, "dup", "x", Some(pos(1, 8))).await?;
    produce(&s.producer, "dup", "x", Some(pos(2, 8))).await?;

    let shutdown = Shutdown::default();
    let join = run_stage(&s.factory, &shutdown);
    let f = s.factory.clone();
    let out = tokio::task::spawn_blocking(move || {
        read_all(&f, "t.out", |o| {
            counts(o, "k0").len() >= 5
                && counts(o, "k1").len() >= 5
                && counts(o, "dup").len() >= 2
                && !counts(o, "timer").is_empty()
        })
    })
    .await?;
    assert_eq!(counts(&out, "k0"), ["k0:1", "k0:2", "k0:3", "k0:4", "k0:5"]);
    assert_eq!(counts(&out, "k1"), ["k1:1", "k1:2", "k1:3", "k1:4", "k1:5"]);
    assert_eq!(
        counts(&out, "dup"),
        ["dup:1", "dup:2"],
        "replays must be dropped by position"
    );
    assert_eq!(
        counts(&out, "timer"),
        ["t"],
        "the timer fires once, driven by ticks"
    );
    let f = s.factory.clone();
    let dlq =
        tokio::task::spawn_blocking(move || read_all(&f, "t.invalid", |o| !o.is_empty())).await?;
    assert_eq!(dlq, [("k0".to_string(), "bad_value".to_string())]);
    shutdown.trigger();
    join.join().map_err(|_| "stage panicked")??;

    // Lose the disk; the changelog brings the counts back.
    std::fs::remove_dir_all(dir.path())?;
    for _ in 0..3 {
        produce(&s.producer, "k0", "x", None).await?;
    }
    let shutdown = Shutdown::default();
    let join = run_stage(&s.factory, &shutdown);
    let f = s.factory.clone();
    let out =
        tokio::task::spawn_blocking(move || read_all(&f, "t.out", |o| counts(o, "k0").len() >= 8))
            .await?;
    shutdown.trigger();
    join.join().map_err(|_| "stage panicked")??;
    assert_eq!(
        counts(&out, "k0"),
        ["k0:1", "k0:2", "k0:3", "k0:4", "k0:5", "k0:6", "k0:7", "k0:8"],
        "state restored from the changelog, input resumed after the last commit"
    );
    Ok(())
}
