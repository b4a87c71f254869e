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

mod common;

use common::{ended, mock_stage, BoxError, MockOptions, MockStage, StageJoin};

type TestResult = Result<(), BoxError>;

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

fn setup(state_dir: &str) -> Result<MockStage, BoxError> {
    mock_stage(MockOptions {
        stage: "count",
        partitions: 2,
        state_dir: Some(state_dir.into()),
        max_batch: None,
        properties: &[],
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
        timers_from_state: None,
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

/// Produce `k0: x` into partition 0 of `t.in`, the partition the
/// ownership tests fence and repair.
async fn produce_to_p0(p: &FutureProducer) -> TestResult {
    let record = FutureRecord::to("t.in").partition(0).key("k0").payload("x");
    p.send(record, Duration::from_secs(5))
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
            lineage: 1,
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
    let out = run_until(spec(), &s.factory, "t.out", |o| counts(o, "k0").len() >= 8).await?;
    assert_eq!(
        counts(&out, "k0"),
        ["k0:1", "k0:2", "k0:3", "k0:4", "k0:5", "k0:6", "k0:7", "k0:8"],
        "state restored from the changelog, input resumed after the last commit"
    );
    Ok(())
}

fn stage(name: &'static str, input: &str, output: &str, ticks: bool) -> StageSpec {
    let mut outputs = BTreeMap::new();
    outputs.insert("next", OutputTarget::Topic(output.into()));
    StageSpec {
        name,
        input_topic: input.into(),
        outputs,
        operator: Box::new(|_| Box::new(Counter)),
        ticks,
        observer: None,
        timers_from_state: None,
    }
}

fn start(spec: StageSpec, factory: &ClientFactory, shutdown: &Shutdown) -> StageJoin {
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
async fn run_until(
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
fn factory_on(
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

async fn read_until(
    factory: &ClientFactory,
    topic: &'static str,
    want: impl Fn(&[(String, String)]) -> bool + Send + 'static,
) -> Result<Vec<(String, String)>, tokio::task::JoinError> {
    let f = factory.clone();
    tokio::task::spawn_blocking(move || read_all(&f, topic, want)).await
}

/// `cdp dev --state-dir D`, stopped and started again: the embedded broker
/// comes back empty while the local state remains. Every task must notice
/// (its local copy is ahead of the changelog), say so and start over,
/// instead of skipping the new broker's input as already consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_lost_its_data_is_noticed_and_new_input_is_processed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let state = dir.path().display().to_string();
    let s = setup(&state)?;
    for _ in 0..3 {
        produce(&s.producer, "k0", "x", None).await?;
    }
    let shutdown = Shutdown::default();
    let join = run_stage(&s.factory, &shutdown);
    let out = read_until(&s.factory, "t.out", |o| counts(o, "k0").len() >= 3).await?;
    assert_eq!(counts(&out, "k0"), ["k0:1", "k0:2", "k0:3"]);
    shutdown.trigger();
    join.join().map_err(|_| "stage panicked")??;
    drop(s);

    // A new, empty broker; the same state directory.
    let resets = || {
        cdp_pipeline::metrics::STATE_RESETS
            .with_label_values(&["count", "ahead_of_changelog"])
            .get()
    };
    let before = resets();
    let s = setup(&state)?;
    for _ in 0..2 {
        produce(&s.producer, "k0", "x", None).await?;
    }
    let shutdown = Shutdown::default();
    let join = run_stage(&s.factory, &shutdown);
    let out = read_until(&s.factory, "t.out", |o| counts(o, "k0").len() >= 2).await?;
    shutdown.trigger();
    join.join().map_err(|_| "stage panicked")??;
    assert_eq!(
        counts(&out, "k0"),
        ["k0:1", "k0:2"],
        "the new broker's input is processed from a clean state"
    );
    assert!(resets() >= before + 2, "each task's reset is counted");
    Ok(())
}

/// An owner that another instance fenced (it claimed the changelog and
/// committed a batch) must not commit its own batch; when the partition
/// comes back, the restore must include the other owner's batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_owner_does_not_commit_and_later_restores_the_new_owners_batches() -> TestResult {
    use cdp_pipeline::changelog::{claim_key, commit_key, Claim, Marker};
    use cdp_pipeline::store::TaskMeta;

    let dir = tempfile::tempdir()?;
    let s = setup(&dir.path().display().to_string())?;
    for _ in 0..2 {
        produce_to_p0(&s.producer).await?;
    }
    let shutdown = Shutdown::default();
    let join = start(
        stage("count", "t.in", "t.out", false),
        &s.factory,
        &shutdown,
    );
    let out = read_until(&s.factory, "t.out", |o| counts(o, "k0").len() >= 2).await?;
    assert_eq!(counts(&out, "k0"), ["k0:1", "k0:2"]);

    // Another owner claims partition 0 (at the changelog's end, so its claim
    // is valid) and commits a batch that sets the count to 100.
    let reader = s.factory.plain_consumer("probe")?;
    let (_, end) = reader.fetch_watermarks("t.count-changelog", 0, Duration::from_secs(5))?;
    let progress = TaskMeta {
        input_offset: 2,
        changelog_offset: end - 1,
        ..TaskMeta::default()
    };
    let epoch = 50u32;
    let header = || {
        OwnedHeaders::new().insert(Header {
            key: "cdp-epoch",
            value: Some(epoch.to_string().as_bytes()),
        })
    };
    let claim = serde_json::to_vec(&Claim::new(end, &progress))?;
    let marker = serde_json::to_vec(&Marker::commit(&progress))?;
    for (key, value) in [
        (claim_key(epoch), claim),
        (b"count/k0".to_vec(), b"100".to_vec()),
        (commit_key(epoch), marker),
    ] {
        s.producer
            .send(
                FutureRecord::to("t.count-changelog")
                    .partition(0)
                    .key(&key)
                    .payload(&value)
                    .headers(header()),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    // The old owner gets one more record: it must find itself fenced.
    produce_to_p0(&s.producer).await?;
    let result = ended(join, Duration::from_secs(30)).await;
    assert!(
        matches!(&result, Some(Err(e)) if e.contains("fenced")),
        "the fenced owner stops without committing: {result:?}"
    );

    // The partition comes back to it: the restore sees the other owner's
    // claim and batch, so the replayed record counts from 100.
    let shutdown = Shutdown::default();
    let join = start(
        stage("count", "t.in", "t.out", false),
        &s.factory,
        &shutdown,
    );
    let out = read_until(&s.factory, "t.out", |o| {
        counts(o, "k0").iter().any(|v| v == "k0:101")
    })
    .await?;
    shutdown.trigger();
    join.join().map_err(|_| "stage panicked")??;
    assert!(
        counts(&out, "k0").iter().any(|v| v == "k0:101"),
        "restored the new owner's batch: {:?}",
        counts(&out, "k0")
    );
    Ok(())
}

/// The reset of docs/OPERATIONS.md on one stage of a chain: a new changelog,
/// no group offsets, no local state. The reset stage starts again at epoch
/// 1 from offset 0, under a new lineage; the stage downstream must take its
/// output as new, not as replays of what it already applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_reset_as_documented_keeps_the_chain_delivering() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mock = MockCluster::new(1)?;
    for t in [
        "t.in",
        "t.mid",
        "t.out",
        "t.invalid",
        "t.down-changelog",
        "r1.invalid",
        "r1.up-changelog",
        "r2.invalid",
        "r2.up-changelog",
    ] {
        mock.create_topic(t, 2, 1)?;
    }
    let up1 = factory_on(&mock, "r1", &dir.path().join("up1"))?;
    let down = factory_on(&mock, "t", &dir.path().join("down"))?;
    let producer = down.producer()?;
    let send = |key: &'static str| {
        let p = producer.clone();
        async move {
            // One input partition: one origin whose epochs `down` tracks.
            p.send(
                FutureRecord::to("t.in").partition(0).key(key).payload("x"),
                Duration::from_secs(5),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
        }
    };
    let down_stop = Shutdown::default();
    let down_join = start(stage("down", "t.mid", "t.out", false), &down, &down_stop);
    // Run `up` three times so its epoch grows past 1.
    for n in 1..=3usize {
        let stop = Shutdown::default();
        let join = start(stage("up", "t.in", "t.mid", false), &up1, &stop);
        send("k0").await?;
        read_until(&down, "t.out", move |o| counts(o, "k0").len() >= n).await?;
        stop.trigger();
        join.join().map_err(|_| "stage panicked")??;
    }

    // The reset: new changelog and group (prefix r2), no local state.
    let up2 = factory_on(&mock, "r2", &dir.path().join("up2"))?;
    let stop = Shutdown::default();
    let join = start(stage("up", "t.in", "t.mid", false), &up2, &stop);
    // It replays its input (three records) from scratch and then gets one
    // more: four new outputs under the new lineage, counted on by `down`.
    send("k0").await?;
    let out = read_until(&down, "t.out", |o| counts(o, "k0").len() >= 7).await?;
    stop.trigger();
    join.join().map_err(|_| "stage panicked")??;
    down_stop.trigger();
    down_join.join().map_err(|_| "stage panicked")??;
    assert_eq!(
        counts(&out, "k0"),
        ["k0:1", "k0:2", "k0:3", "k0:4", "k0:5", "k0:6", "k0:7"],
        "the reset stage's output after the reset comes through"
    );
    Ok(())
}

/// Two instances that both believe they own the same partitions (here: two
/// consumer groups over one changelog, the worst case of a stale
/// assignment) claim at the same time. The log decides: no two valid
/// claims share an epoch, and the loser stops at its first batch instead of
/// interleaving its state with the winner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_claimers_of_one_changelog_never_share_an_epoch() -> TestResult {
    use cdp_pipeline::changelog::{Claim, RecordKind};

    let dir = tempfile::tempdir()?;
    let mock = MockCluster::new(1)?;
    for t in ["t.in", "t.out", "t.invalid", "t.count-changelog"] {
        mock.create_topic(t, 2, 1)?;
    }
    let group = |name: &str,
                 state: &str|
     -> Result<ClientFactory, Box<dyn std::error::Error + Send + Sync>> {
        let f = factory_on(&mock, "t", &dir.path().join(state))?;
        let mut config = f.config().clone();
        config
            .properties
            .insert("consumer.group.id".into(), name.into());
        Ok(ClientFactory::new(config)?)
    };
    let a = group("group-a", "a")?;
    let b = group("group-b", "b")?;
    let (stop_a, stop_b) = (Shutdown::default(), Shutdown::default());
    let join_a = start(stage("count", "t.in", "t.out", false), &a, &stop_a);
    let join_b = start(stage("count", "t.in", "t.out", false), &b, &stop_b);
    let producer = a.producer()?;
    // Keep feeding both partitions until one instance gives up.
    let deadline = Instant::now() + Duration::from_secs(40);
    while !(join_a.is_finished() || join_b.is_finished()) && Instant::now() < deadline {
        for p in 0..2 {
            producer
                .send(
                    FutureRecord::to("t.in").partition(p).key("k").payload("x"),
                    Duration::from_secs(5),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (loser, winner, stop_winner) = if join_a.is_finished() {
        (join_a, join_b, stop_b)
    } else {
        (join_b, join_a, stop_a)
    };
    let lost = ended(loser, Duration::from_secs(1)).await;
    stop_winner.trigger();
    let won = ended(winner, Duration::from_secs(30)).await;
    // Fenced at its first batch, or (claiming second against a busy owner)
    // every claim voided: either way it stops instead of interleaving.
    assert!(
        matches!(&lost, Some(Err(e)) if e.contains("fenced") || e.contains("voided")),
        "one instance gives up: {lost:?}"
    );
    assert!(matches!(won, Some(Ok(()))), "the other runs on: {won:?}");

    // The log: valid claims (at their own offset) have distinct epochs.
    let reader = a.plain_consumer("claims")?;
    for p in 0..2 {
        let (_, end) = reader.fetch_watermarks("t.count-changelog", p, Duration::from_secs(5))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t.count-changelog", p, Offset::Beginning)?;
        reader.assign(&tpl)?;
        let mut epochs = Vec::new();
        let mut seen = 0;
        let until = Instant::now() + Duration::from_secs(20);
        while seen < end && Instant::now() < until {
            let Some(Ok(m)) = reader.poll(Duration::from_millis(200)) else {
                continue;
            };
            seen = m.offset() + 1;
            let key = m.key().unwrap_or_default();
            if RecordKind::of(key) != RecordKind::Claim {
                continue;
            }
            let claim: Claim = serde_json::from_slice(m.payload().unwrap_or_default())?;
            if claim.at == m.offset() {
                epochs.push(key.to_vec());
            }
        }
        let mut unique = epochs.clone();
        unique.sort();
        unique.dedup();
        assert!(!epochs.is_empty(), "partition {p} was claimed");
        assert_eq!(
            epochs.len(),
            unique.len(),
            "one valid claim per epoch in partition {p}"
        );
    }
    Ok(())
}

/// A zombie (an older epoch) writes into an idle owner's changelog. Restores
/// ignore its record, but compaction would let it hide the committed value
/// of its key: the owner notices within seconds and writes that value again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_owner_repairs_what_a_zombie_wrote_into_its_changelog() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = setup(&dir.path().display().to_string())?;
    for _ in 0..2 {
        produce_to_p0(&s.producer).await?;
    }
    let shutdown = Shutdown::default();
    let join = start(
        stage("count", "t.in", "t.out", false),
        &s.factory,
        &shutdown,
    );
    read_until(&s.factory, "t.out", |o| counts(o, "k0").len() >= 2).await?;

    // Epoch 0 (no header): older than any claim.
    let zombie_at = s
        .producer
        .send(
            FutureRecord::to("t.count-changelog")
                .partition(0)
                .key("count/k0")
                .payload("999"),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)?
        .offset;
    let f = s.factory.clone();
    let repaired = tokio::task::spawn_blocking(move || -> Option<(String, String)> {
        let c: BaseConsumer = f.plain_consumer("repair-reader").ok()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t.count-changelog", 0, Offset::Offset(zombie_at + 1))
            .ok()?;
        c.assign(&tpl).ok()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                if m.key() == Some(b"count/k0".as_slice()) {
                    let epoch = m
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == "cdp-epoch"))
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).to_string())
                        .unwrap_or_default();
                    let value = String::from_utf8_lossy(m.payload().unwrap_or_default());
                    return Some((epoch, value.to_string()));
                }
            }
        }
        None
    })
    .await?;
    assert_eq!(
        repaired,
        Some(("1".to_string(), "2".to_string())),
        "the owner (epoch 1) wrote the committed count again after the zombie's record"
    );
    // And it goes on owning the partition.
    produce_to_p0(&s.producer).await?;
    let out = read_until(&s.factory, "t.out", |o| counts(o, "k0").len() >= 3).await?;
    shutdown.trigger();
    join.join().map_err(|_| "stage panicked")??;
    assert_eq!(counts(&out, "k0"), ["k0:1", "k0:2", "k0:3"]);
    Ok(())
}

/// Remembers each record's key as `e/<key>` until the due time (ms) in its
/// value, with a timer keyed by the entry: timers that follow from state.
struct Due;

impl Operator for Due {
    fn process(&mut self, r: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let key = r.key.unwrap_or_default();
        let Some(due) = std::str::from_utf8(r.value)
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
        else {
            return Err(OperatorError::rejected("bad_due", serde_json::json!({})));
        };
        let entry = [b"e/", key].concat();
        ctx.put(&entry, r.value.to_vec());
        ctx.set_timer(due, &entry);
        ctx.emit("next", Some(b"set".to_vec()), key.to_vec());
        Ok(())
    }

    fn on_timer(&mut self, key: &[u8], ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        if ctx.get(key)?.is_some() {
            ctx.delete(key);
            ctx.emit("next", Some(b"fired".to_vec()), key.to_vec());
        }
        Ok(())
    }
}

/// [`Due`]'s timers, from its entries.
fn due_of(key: &[u8], value: &[u8]) -> Option<i64> {
    key.starts_with(b"e/")
        .then(|| std::str::from_utf8(value).ok()?.parse().ok())
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_derived_from_state_are_not_logged_and_fire_after_a_restore() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = mock_stage(MockOptions {
        stage: "due",
        partitions: 2,
        state_dir: Some(dir.path().to_path_buf()),
        max_batch: None,
        properties: &[],
    })?;
    let spec = || {
        let mut spec = stage("due", "t.in", "t.out", true);
        spec.operator = Box::new(|_| Box::new(Due));
        spec.timers_from_state = Some(due_of);
        spec
    };
    // Due well after the first run ends: the timers must survive it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let due = (now + 15_000).to_string();
    for key in ["a", "b"] {
        produce(&s.producer, key, &due, None).await?;
    }
    let out = run_until(spec(), &s.factory, "t.out", |o| counts(o, "set").len() >= 2).await?;
    assert_eq!(counts(&out, "set").len(), 2);
    assert!(
        counts(&out, "fired").is_empty(),
        "the timers fired during the first run: the test's due time is too early"
    );

    // The changelog holds the entries and commit markers, no timer.
    let f = s.factory.clone();
    let log = tokio::task::spawn_blocking(move || {
        read_all(&f, "t.due-changelog", |o| {
            let has = |k: &str| o.iter().any(|(key, _)| key == k);
            has("e/a") && has("e/b") && o.iter().any(|(k, _)| k.contains("cdp/commit/"))
        })
    })
    .await?;
    assert!(log.iter().any(|(k, _)| k == "e/a") && log.iter().any(|(k, _)| k == "e/b"));
    let timers: Vec<&String> = log
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.contains("cdp/timer/"))
        .collect();
    assert!(timers.is_empty(), "timers were logged: {timers:?}");

    // Lose the disk: the restore sets the timers again from the entries.
    std::fs::remove_dir_all(dir.path())?;
    let out = run_until(spec(), &s.factory, "t.out", |o| {
        counts(o, "fired").len() >= 2
    })
    .await?;
    let mut fired = counts(&out, "fired");
    fired.sort();
    assert_eq!(
        fired,
        ["e/a", "e/b"],
        "each restored entry's timer fires once"
    );
    Ok(())
}

/// Forwards every input record to the output `sink`.
struct Forward;

impl Operator for Forward {
    fn process(&mut self, r: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        ctx.emit("sink", r.key.map(<[u8]>::to_vec), r.value.to_vec());
        Ok(())
    }
}

/// Accepts every record and keeps how many each `deliver` call was handed.
struct RoundSizes(std::sync::Arc<std::sync::Mutex<Vec<usize>>>);

impl cdp_pipeline::Sink for RoundSizes {
    fn name(&self) -> &str {
        "sizes"
    }

    fn deliver(
        &self,
        records: Vec<cdp_pipeline::SinkRecord>,
    ) -> futures::future::BoxFuture<'static, Vec<Result<(), String>>> {
        if let Ok(mut sizes) = self.0.lock() {
            sizes.push(records.len());
        }
        let n = records.len();
        Box::pin(async move { vec![Ok(()); n] })
    }
}

/// Run a `Forward` stage named `name` (its own consumer group) until its
/// sink got `want` records; the size of every batch the sink was handed.
async fn sink_rounds(
    name: &'static str,
    factory: &ClientFactory,
    round_limit: Option<usize>,
    want: usize,
) -> Result<Vec<usize>, BoxError> {
    let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut outputs = BTreeMap::new();
    outputs.insert(
        "sink",
        OutputTarget::Sink(std::sync::Arc::new(RoundSizes(sizes.clone()))),
    );
    let spec = StageSpec {
        name,
        input_topic: "t.in".into(),
        outputs,
        operator: Box::new(|_| Box::new(Forward)),
        ticks: false,
        observer: None,
        timers_from_state: None,
    };
    let mut rt = StageRuntime::new(
        spec,
        factory.clone(),
        None,
        Health::default().register(name),
    );
    if let Some(most) = round_limit {
        rt = rt.with_round_limit(most);
    }
    let shutdown = Shutdown::default();
    let (handle, s) = (tokio::runtime::Handle::current(), shutdown.clone());
    let join = std::thread::spawn(move || rt.run(handle, s));
    let delivered = || sizes.lock().map(|s| s.iter().sum::<usize>()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(40);
    while delivered() < want && Instant::now() < deadline && !join.is_finished() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.trigger();
    join.join().map_err(|_| "stage panicked")??;
    let sizes = sizes.lock().map_err(|_| "poisoned")?.clone();
    Ok(sizes)
}

/// `with_round_limit` (deliver's bound) caps a round below
/// `kafka.max_batch`: a backlog reaches a sink in batches no larger than
/// the limit, and all of it arrives. The same backlog without the limit
/// arrives in larger batches, so the setup can tell the two apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_limit_caps_the_batches_a_sink_is_handed() -> TestResult {
    let s = mock_stage(MockOptions {
        stage: "whole",
        partitions: 1,
        state_dir: None,
        max_batch: Some(5000),
        properties: &[],
    })?;
    s.mock.create_topic("t.capped-changelog", 1, 1)?;
    let keys: Vec<String> = (0..400).map(|i| format!("k{i}")).collect();
    let sends: Vec<_> = keys
        .iter()
        .map(|k| {
            s.producer.send(
                FutureRecord::to("t.in").key(k).payload("v"),
                Duration::from_secs(5),
            )
        })
        .collect();
    for sent in futures::future::join_all(sends).await {
        sent.map_err(|(e, _)| e)?;
    }
    let whole = sink_rounds("whole", &s.factory, None, 400).await?;
    let capped = sink_rounds("capped", &s.factory, Some(50), 400).await?;
    assert_eq!(whole.iter().sum::<usize>(), 400, "{whole:?}");
    assert!(whole.iter().any(|&n| n > 50), "uncapped rounds: {whole:?}");
    assert_eq!(capped.iter().sum::<usize>(), 400, "{capped:?}");
    assert!(capped.iter().all(|&n| n <= 50), "capped rounds: {capped:?}");
    Ok(())
}
