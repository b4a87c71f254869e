//! The consumer group's offsets (librdkafka's mock cluster, in process,
//! real TCP): committed once a second rather than per batch, they still
//! show lag tools the stage's progress, while a restart resumes from the
//! store.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cdp_pipeline::{
    ClientFactory, Context, Health, Operator, OperatorError, OutputTarget, Record, Shutdown,
    StageRuntime, StageSpec,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

mod common;

use common::{ended, mock_stage, BoxError, MockOptions, MockStage, StageJoin};

type TestResult = Result<(), BoxError>;

/// How long a read waits for what it expects.
const PATIENCE: Duration = Duration::from_secs(40);

/// Counts records per key and emits `key:count`.
struct Counter;

impl Operator for Counter {
    fn process(&mut self, r: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let key = r.key.unwrap_or_default().to_vec();
        let mut state_key = b"count/".to_vec();
        state_key.extend_from_slice(&key);
        let n: u64 = ctx.get_json(&state_key)?.unwrap_or(0) + 1;
        ctx.put_json(&state_key, &n)?;
        let out = format!("{}:{n}", String::from_utf8_lossy(&key));
        ctx.emit("next", Some(key), out.into_bytes());
        Ok(())
    }
}

/// One partition; batches of one record (`max_batch = 1`).
fn setup() -> Result<MockStage, BoxError> {
    mock_stage(MockOptions {
        stage: "count",
        partitions: 1,
        state_dir: None,
        max_batch: Some(1),
        properties: &[],
    })
}

fn start(factory: &ClientFactory, shutdown: &Shutdown) -> StageJoin {
    start_with_ticks(factory, shutdown, false)
}

fn start_with_ticks(factory: &ClientFactory, shutdown: &Shutdown, ticks: bool) -> StageJoin {
    let mut outputs = BTreeMap::new();
    outputs.insert("next", OutputTarget::Topic("t.out".into()));
    let spec = StageSpec {
        name: "count",
        input_topic: "t.in".into(),
        outputs,
        operator: Box::new(|_| Box::new(Counter)),
        ticks,
        observer: None,
        timers_from_state: None,
    };
    let rt = StageRuntime::new(
        spec,
        factory.clone(),
        None,
        Health::default().register("count"),
    );
    let handle = tokio::runtime::Handle::current();
    let s = shutdown.clone();
    std::thread::spawn(move || rt.run(handle, s))
}

/// Send every value to `t.in` (key `k`) at once, so they travel in one
/// produce request and are fetched together; wait for all.
async fn produce_together(p: &FutureProducer, values: &[&str]) -> TestResult {
    let sends = values.iter().map(|v| {
        p.send(
            FutureRecord::to("t.in").partition(0).key("k").payload(*v),
            Duration::from_secs(10),
        )
    });
    for sent in futures::future::join_all(sends).await {
        sent.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// The values of `t.out` with key `k`, read until `want` holds or
/// `within` passes.
async fn read_out(
    factory: &ClientFactory,
    within: Duration,
    want: impl Fn(&[String]) -> bool + Send + 'static,
) -> Result<Vec<String>, tokio::task::JoinError> {
    let out = read_positioned(factory, within, move |o| {
        want(&o.iter().map(|(v, _)| v.clone()).collect::<Vec<_>>())
    })
    .await?;
    Ok(out.into_iter().map(|(v, _)| v).collect())
}

/// [`read_out`] with each value's position (`cdp-pos`).
async fn read_positioned(
    factory: &ClientFactory,
    within: Duration,
    want: impl Fn(&[(String, (i64, u32))]) -> bool + Send + 'static,
) -> Result<Vec<(String, (i64, u32))>, tokio::task::JoinError> {
    let f = factory.clone();
    tokio::task::spawn_blocking(move || {
        let Some(c) = common::out_reader(&f) else {
            return vec![];
        };
        let mut out = Vec::new();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline && !want(&out) {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                if m.key() == Some(b"k".as_slice()) {
                    let pos = common::header_text(&m, "cdp-pos")
                        .as_deref()
                        .and_then(|v| v.split_once(':'))
                        .and_then(|(o, i)| Some((o.parse().ok()?, i.parse().ok()?)))
                        .unwrap_or((-1, 0));
                    let value = String::from_utf8_lossy(m.payload().unwrap_or_default());
                    out.push((value.to_string(), pos));
                }
            }
        }
        out
    })
    .await
}

/// The group's committed offset of `t.in[0]`, as a lag tool reads it.
fn group_offset(factory: &ClientFactory) -> Option<i64> {
    let c: BaseConsumer = factory.plain_consumer("t.count").ok()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition("t.in", 0);
    let committed = c.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
    match committed.find_partition("t.in", 0)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// The group's offset, committed once a second rather than per batch,
/// still follows the stage within seconds (lag tools read it), and a
/// restart resumes where the store says, replaying nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_tools_see_progress_and_a_restart_resumes_from_the_store() -> TestResult {
    let s = setup()?;
    let shutdown = Shutdown::default();
    let join = start(&s.factory, &shutdown);
    produce_together(&s.producer, &["a", "b", "c"]).await?;
    let out = read_out(&s.factory, PATIENCE, |o| o.len() >= 3).await?;
    assert_eq!(out, ["k:1", "k:2", "k:3"]);
    let f = s.factory.clone();
    let seen = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let offset = group_offset(&f);
            if offset == Some(3) || Instant::now() > deadline {
                return offset;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await?;
    assert_eq!(
        seen,
        Some(3),
        "the group offset shows every record consumed"
    );
    shutdown.trigger();
    assert!(matches!(
        ended(join, Duration::from_secs(30)).await,
        Some(Ok(()))
    ));

    let shutdown = Shutdown::default();
    let join = start(&s.factory, &shutdown);
    produce_together(&s.producer, &["d"]).await?;
    let out = read_out(&s.factory, PATIENCE, |o| o.len() >= 4).await?;
    // Give a replay the time to show up, were there one.
    let more = read_out(&s.factory, Duration::from_secs(3), |o| o.len() > 4).await?;
    assert_eq!(out, ["k:1", "k:2", "k:3", "k:4"]);
    assert_eq!(more.len(), 4, "nothing replayed: {more:?}");
    shutdown.trigger();
    assert!(matches!(
        ended(join, Duration::from_secs(30)).await,
        Some(Ok(()))
    ));
    Ok(())
}

/// An idle stage's ticks (batches that change nothing, never committed to
/// the store) still move the group's offset: a lag tool sees no lag on a
/// quiet pipeline instead of one more record a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stages_ticks_move_the_group_offset() -> TestResult {
    let s = setup()?;
    let shutdown = Shutdown::default();
    let join = start_with_ticks(&s.factory, &shutdown, true);
    produce_together(&s.producer, &["a"]).await?;
    read_out(&s.factory, PATIENCE, |o| !o.is_empty()).await?;
    let f = s.factory.clone();
    let (end, reached) = tokio::task::spawn_blocking(move || {
        // Ticks (every 100 ms here) pile up behind the one record.
        std::thread::sleep(Duration::from_secs(2));
        let c: BaseConsumer = f.plain_consumer("t.watch").ok()?;
        let (_, end) = c.fetch_watermarks("t.in", 0, Duration::from_secs(5)).ok()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let offset = group_offset(&f);
            if offset.is_some_and(|o| o >= end) || Instant::now() > deadline {
                return Some((end, offset));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await?
    .ok_or("no watermarks")?;
    assert!(end > 5, "ticks arrived: the input ends at {end}");
    assert!(
        reached.is_some_and(|o| o >= end),
        "the group offset {reached:?} stays behind the ticks (input end {end})"
    );
    shutdown.trigger();
    assert!(matches!(
        ended(join, Duration::from_secs(30)).await,
        Some(Ok(()))
    ));
    Ok(())
}
