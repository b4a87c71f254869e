//! What the runtime's mock-cluster tests share: a counting operator, stage
//! specs, starting a stage and reading what it wrote.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cdp_pipeline::store::StoreError;
use cdp_pipeline::{
    ClientFactory, Context, Health, KafkaConfig, Operator, OperatorError, OutputTarget, Record,
    Shutdown, StageRuntime, StageSpec,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::common::{header_text, mock_stage, BoxError, MockOptions, MockStage, StageJoin};

pub(crate) type TestResult = Result<(), BoxError>;

/// Counts records per key; emits `key:count`. Rejects the value `bad`.
/// On its first record sets a timer 300 ms of stream time ahead (stream
/// time is 0 until the first tick, so the first tick fires it). Like the
/// profile stages, it keeps the counts a batch changed in memory and
/// writes them when the batch ends (`Operator::end_batch`): a runtime that
/// did not end its batches would commit and log none of them, and every
/// restore below would count from zero again.
#[derive(Default)]
pub(crate) struct Counter {
    pending: BTreeMap<Vec<u8>, u64>,
}

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
        let n: u64 = match self.pending.get(&state_key) {
            Some(&n) => n,
            None => ctx.get_json(&state_key)?.unwrap_or(0),
        } + 1;
        self.pending.insert(state_key, n);
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

    fn end_batch(&mut self, ctx: &mut Context<'_>) -> Result<(), StoreError> {
        for (key, n) in std::mem::take(&mut self.pending) {
            ctx.put_json(&key, &n)?;
        }
        Ok(())
    }
}

pub(crate) fn setup(state_dir: &str) -> Result<MockStage, BoxError> {
    mock_stage(MockOptions {
        stage: "count",
        partitions: 2,
        state_dir: Some(state_dir.into()),
        max_batch: None,
        properties: &[],
    })
}

/// The counting stage `t.in` → `t.out`, with ticks.
pub(crate) fn spec() -> StageSpec {
    stage("count", "t.in", "t.out", true)
}

pub(crate) async fn produce(
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

/// Produce `k0: x` into partition 0 of `t.in`, the partition the
/// ownership tests fence and repair.
pub(crate) async fn produce_to_p0(p: &FutureProducer) -> TestResult {
    let record = FutureRecord::to("t.in").partition(0).key("k0").payload("x");
    p.send(record, Duration::from_secs(5))
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

pub(crate) fn read_all(
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
            let reason = header_text(&m, "cdp-dlq-reason");
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
            let value = String::from_utf8_lossy(m.payload().unwrap_or_default()).to_string();
            out.push((key, reason.unwrap_or(value)));
        }
    }
    out
}

pub(crate) fn run_stage(factory: &ClientFactory, shutdown: &Shutdown) -> StageJoin {
    start(spec(), factory, shutdown)
}

/// The counting stage without ticks (the ownership tests write into its
/// changelog and must not race a tick's batch).
pub(crate) fn run_counter(factory: &ClientFactory, shutdown: &Shutdown) -> StageJoin {
    start(stage("count", "t.in", "t.out", false), factory, shutdown)
}

pub(crate) fn counts(out: &[(String, String)], key: &str) -> Vec<String> {
    out.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .collect()
}

pub(crate) fn stage(name: &'static str, input: &str, output: &str, ticks: bool) -> StageSpec {
    let mut outputs = BTreeMap::new();
    outputs.insert("next", OutputTarget::Topic(output.into()));
    StageSpec {
        name,
        input_topic: input.into(),
        outputs,
        operator: Box::new(|_| Box::new(Counter::default())),
        ticks,
        observer: None,
        timers_from_state: None,
    }
}

pub(crate) fn start(spec: StageSpec, factory: &ClientFactory, shutdown: &Shutdown) -> StageJoin {
    let name = spec.name;
    let rt = StageRuntime::new(
        spec,
        factory.clone(),
        None,
        Health::default().register(name),
    );
    let handle = tokio::runtime::Handle::current();
    let s = shutdown.clone();
    std::thread::spawn(move || rt.run(handle, s))
}

/// Run `spec` until what it wrote to `topic` satisfies `want` (or
/// `read_all`'s deadline passes), then stop it; returns what was read.
pub(crate) async fn run_until(
    spec: StageSpec,
    factory: &ClientFactory,
    topic: &'static str,
    want: impl Fn(&[(String, String)]) -> bool + Send + 'static,
) -> Result<Vec<(String, String)>, BoxError> {
    let shutdown = Shutdown::default();
    let join = start(spec, factory, &shutdown);
    let f = factory.clone();
    let out = tokio::task::spawn_blocking(move || read_all(&f, topic, want)).await?;
    shutdown.trigger();
    join.join().map_err(|_| "stage panicked")??;
    Ok(out)
}

/// A factory on `mock` with its own topic prefix (changelogs, group,
/// dead letters) and state directory.
pub(crate) fn factory_on(
    mock: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    prefix: &str,
    state_dir: &std::path::Path,
) -> Result<ClientFactory, Box<dyn std::error::Error + Send + Sync>> {
    let mut properties = BTreeMap::new();
    properties.insert("consumer.session.timeout.ms".into(), "6000".into());
    properties.insert("consumer.heartbeat.interval.ms".into(), "500".into());
    Ok(ClientFactory::new(KafkaConfig {
        brokers: mock.bootstrap_servers(),
        topic_prefix: prefix.into(),
        partitions: 2,
        state_dir: state_dir.display().to_string(),
        tick_interval: cdp_pipeline::Span::from_millis(100),
        properties,
        ..KafkaConfig::default()
    })?)
}

pub(crate) async fn read_until(
    factory: &ClientFactory,
    topic: &'static str,
    want: impl Fn(&[(String, String)]) -> bool + Send + 'static,
) -> Result<Vec<(String, String)>, tokio::task::JoinError> {
    let f = factory.clone();
    tokio::task::spawn_blocking(move || read_all(&f, topic, want)).await
}
