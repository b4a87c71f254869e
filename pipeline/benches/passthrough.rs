//! The runtime's cost over a bare consume→produce loop, on the same broker
//! in the same run (librdkafka's mock cluster, in process).
//!
//! Three passes over the same input (`RECORDS` records of ~600 bytes on 4
//! partitions):
//! - `bare`: a consumer and an idempotent producer copying every record to an
//!   output topic, awaiting acks per poll batch — the floor any Kafka
//!   stage pays;
//! - `stage/stateless`: a `StageRuntime` with an operator that emits each
//!   record unchanged (positions, changelog markers, RocksDB commits);
//! - `stage/stateful`: the same operator also writing one state key per
//!   record (so every batch also writes changelog records).
//!
//! Run: `cargo bench -p cdp-pipeline --bench passthrough`. Prints records/s
//! for each and the ratios. Not a test: nothing is asserted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cdp_pipeline::{
    ClientFactory, Context, Health, KafkaConfig, Operator, OperatorError, OutputTarget, Record,
    Shutdown, StageRuntime, StageSpec,
};
use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

// The mock cluster stopped serving fetches past ~30k records of this size
// in one topic here; stay under that.
const RECORDS: usize = 25_000;
const PARTITIONS: i32 = 4;

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct PassThrough {
    stateful: bool,
}

impl Operator for PassThrough {
    fn process(&mut self, r: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        if self.stateful {
            let mut key = b"last/".to_vec();
            key.extend_from_slice(r.key.unwrap_or_default());
            ctx.put(&key, r.offset.to_be_bytes().to_vec());
        }
        ctx.emit("next", r.key.map(<[u8]>::to_vec), r.value.to_vec());
        Ok(())
    }
}

fn factory(brokers: &str, state_dir: &str) -> BenchResult<ClientFactory> {
    let mut properties = BTreeMap::new();
    properties.insert("consumer.session.timeout.ms".into(), "6000".into());
    properties.insert("consumer.heartbeat.interval.ms".into(), "500".into());
    Ok(ClientFactory::new(KafkaConfig {
        brokers: brokers.into(),
        topic_prefix: "b".into(),
        partitions: PARTITIONS,
        state_dir: state_dir.into(),
        properties,
        ..KafkaConfig::default()
    })?)
}

/// Count records on `topic` until `n` arrived; returns when the first and
/// the last did.
fn wait_for(f: &ClientFactory, topic: &str, n: usize) -> BenchResult<(Instant, Instant)> {
    let c: BaseConsumer = f.plain_consumer("bench-counter")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let mut seen = 0;
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while seen < n {
        if Instant::now() > deadline {
            return Err(format!("only {seen} of {n} records on {topic}").into());
        }
        if let Some(Ok(_)) = c.poll(Duration::from_millis(100)) {
            seen += 1;
            first.get_or_insert_with(Instant::now);
        }
    }
    Ok((first.unwrap_or_else(Instant::now), Instant::now()))
}

async fn fill(f: &ClientFactory, topic: &str) -> BenchResult<()> {
    let producer = f.producer()?;
    let value = format!(
        r#"{{"type":"track","event":"Product Viewed","properties":{{"sku":"sku-1","category":"shoes","price":42.5,"pad":"{}"}}}}"#,
        "x".repeat(480)
    );
    for chunk in (0..RECORDS).collect::<Vec<_>>().chunks(10_000) {
        let futs = chunk.iter().map(|i| {
            let key = format!("user-{}", i % 5000);
            let value = value.clone();
            let producer = producer.clone();
            let topic = topic.to_string();
            async move {
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&value),
                        Duration::from_secs(30),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| e)
            }
        });
        for r in join_all(futs).await {
            r?;
        }
    }
    Ok(())
}

fn bare(f: &ClientFactory, input: &str, output: &str) -> BenchResult<f64> {
    let c: BaseConsumer = f.plain_consumer("bench-bare")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(input, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let producer = f.producer()?;
    // Timed from the assignment, like the stages (from owning partitions).
    let start = Instant::now();
    let mut done = 0;
    while done < RECORDS {
        let mut batch = Vec::new();
        let mut timeout = Duration::from_millis(100);
        while batch.len() < 1000 {
            match c.poll(timeout) {
                Some(Ok(m)) => batch.push(m.detach()),
                _ => break,
            }
            timeout = Duration::ZERO;
        }
        let futs: Vec<_> = batch
            .iter()
            .filter_map(|m| {
                let mut r = FutureRecord::to(output).payload(m.payload().unwrap_or_default());
                if let Some(k) = m.key() {
                    r = r.key(k);
                }
                producer.send_result(r).ok()
            })
            .collect();
        done += futs.len();
        futures::executor::block_on(join_all(futs));
    }
    Ok(RECORDS as f64 / start.elapsed().as_secs_f64())
}

fn stage(f: &ClientFactory, input: &str, output: &str, stateful: bool) -> BenchResult<f64> {
    let mut outputs = BTreeMap::new();
    outputs.insert("next", OutputTarget::Topic(output.into()));
    let spec = StageSpec {
        name: if stateful { "stateful" } else { "stateless" },
        input_topic: input.into(),
        outputs,
        operator: Box::new(move |_| Box::new(PassThrough { stateful })),
        ticks: false,
        observer: None,
        timers_from_state: None,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let shutdown = Shutdown::default();
    let health = Health::default();
    let runtime = StageRuntime::new(spec, f.clone(), None, health.register("bench"));
    let join = runtime.spawn(rt.handle().clone(), shutdown.clone())?;
    // From the moment the stage owns its partitions (group join and restore
    // excluded, as for `bare`, which assigns partitions directly) to the
    // last output's arrival.
    while !health.not_ready().is_empty() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let start = Instant::now();
    let (_, end) = wait_for(f, output, RECORDS)?;
    shutdown.trigger();
    join.join().map_err(|_| "stage panicked")??;
    Ok(RECORDS as f64 / (end - start).as_secs_f64())
}

fn main() -> BenchResult<()> {
    let mock = MockCluster::new(1)?;
    let dir = tempfile::tempdir()?;
    let f = factory(&mock.bootstrap_servers(), &dir.path().display().to_string())?;
    for t in [
        "b.in",
        "b.bare",
        "b.stateless",
        "b.stateful",
        "b.invalid",
        "b.stateless-changelog",
        "b.stateful-changelog",
    ] {
        mock.create_topic(t, PARTITIONS, 1)?;
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(fill(&f, "b.in"))?;
    let bare = bare(&f, "b.in", "b.bare")?;
    let stateless = stage(&f, "b.in", "b.stateless", false)?;
    let stateful = stage(&f, "b.in", "b.stateful", true)?;
    println!("records: {RECORDS} x ~600 B on {PARTITIONS} partitions, mock cluster, one run");
    println!("bare consume->produce : {bare:>10.0} records/s");
    println!(
        "stage (stateless)     : {stateless:>10.0} records/s  ({:.2} x bare)",
        stateless / bare
    );
    println!(
        "stage (1 put/record)  : {stateful:>10.0} records/s  ({:.2} x bare)",
        stateful / bare
    );
    Ok(())
}
