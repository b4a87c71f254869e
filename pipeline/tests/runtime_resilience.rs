//! The runtime riding out what brokers and producers do to it (librdkafka's
//! mock cluster, in process, real TCP): a broker that refuses or is away,
//! a fatal client error, forged ticks and forged runtime headers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cdp_pipeline::changelog::{self, commit_key, Marker, Restorer};
use cdp_pipeline::runtime::RuntimeError;
use cdp_pipeline::store::{StateBackend, TaskMeta, TaskStore};
use cdp_pipeline::{
    ClientFactory, Context, Health, Operator, OperatorError, OutputTarget, Record, Shutdown,
    StageRuntime, StageSpec,
};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

mod common;

use common::{mock_stage, BoxError, MockOptions, MockStage, StageJoin};

type TestResult = Result<(), BoxError>;

/// Emits `value@now` for every record: what it saw and the stream time.
struct Clock;

impl Operator for Clock {
    fn process(&mut self, r: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let out = format!("{}@{}", String::from_utf8_lossy(r.value), ctx.now());
        ctx.emit("next", r.key.map(<[u8]>::to_vec), out.into_bytes());
        Ok(())
    }
}

fn setup(extra: &[(&str, &str)]) -> Result<MockStage, BoxError> {
    mock_stage(MockOptions {
        stage: "clock",
        partitions: 1,
        state_dir: None,
        max_batch: None,
        properties: extra,
    })
}

fn spec() -> StageSpec {
    let mut outputs = BTreeMap::new();
    outputs.insert("next", OutputTarget::Topic("t.out".into()));
    StageSpec {
        name: "clock",
        input_topic: "t.in".into(),
        outputs,
        operator: Box::new(|_| Box::new(Clock)),
        ticks: true,
        observer: None,
        timers_from_state: None,
    }
}

fn headers(pairs: &[(&str, &str)]) -> OwnedHeaders {
    pairs.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
        h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        })
    })
}

async fn produce(p: &FutureProducer, value: &str, h: &[(&str, &str)]) -> TestResult {
    p.send(
        FutureRecord::to("t.in")
            .key("k")
            .payload(value)
            .headers(headers(h)),
        Duration::from_secs(10),
    )
    .await
    .map_err(|(e, _)| e)?;
    Ok(())
}

/// Values of `t.out`, read until `want` holds or 40 s pass.
fn read_out(factory: &ClientFactory, want: impl Fn(&[String]) -> bool) -> Vec<String> {
    let Some(c) = common::out_reader(factory) else {
        return vec![];
    };
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline && !want(&out) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            out.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).to_string());
        }
    }
    out
}

fn start(
    runtime: StageRuntime,
    shutdown: &Shutdown,
) -> Result<StageJoin, Box<dyn std::error::Error + Send + Sync>> {
    Ok(runtime.spawn(tokio::runtime::Handle::current(), shutdown.clone())?)
}

/// Wait (off the async workers) for a stage thread to end.
async fn finished(join: StageJoin, timeout: Duration) -> Option<Result<(), RuntimeError>> {
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + timeout;
        while !join.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if join.is_finished() {
            join.join().ok()
        } else {
            None
        }
    })
    .await
    .ok()
    .flatten()
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn time_of(value: &str) -> i64 {
    value
        .rsplit_once('@')
        .and_then(|(_, t)| t.parse().ok())
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_refusing_writes_for_longer_than_the_message_timeout_does_not_end_the_stage(
) -> TestResult {
    // Deliveries fail after 1.5 s: each refused round ends a produce.
    let s = setup(&[("producer.message.timeout.ms", "1500")])?;
    for i in 0..5 {
        produce(&s.producer, &format!("v{i}"), &[]).await?;
    }
    // From now on the broker refuses the next 25 produce requests (several
    // message timeouts' worth): the claim, the outputs, the changelog.
    s.mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 25],
    );
    let shutdown = Shutdown::default();
    let health = Health::default();
    let join = start(
        StageRuntime::new(spec(), s.factory.clone(), None, health.register("clock")),
        &shutdown,
    )?;
    let f = s.factory.clone();
    let out = tokio::task::spawn_blocking(move || read_out(&f, |o| o.len() >= 5)).await?;
    let values: Vec<&str> = out
        .iter()
        .map(|v| v.split('@').next().unwrap_or_default())
        .collect();
    assert_eq!(values, ["v0", "v1", "v2", "v3", "v4"], "{out:?}");
    assert!(!join.is_finished(), "the stage must ride out the refusals");
    assert!(health.failure().is_none());
    shutdown.trigger();
    let result = finished(join, Duration::from_secs(30)).await;
    assert!(matches!(result, Some(Ok(()))), "{result:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_waits_for_a_broker_that_is_away() -> TestResult {
    let s = setup(&[])?;
    let marker = serde_json::to_vec(&Marker::commit(&TaskMeta {
        input_offset: 42,
        ..TaskMeta::default()
    }))?;
    let marker_key = commit_key(1);
    for (key, value) in [
        (&b"a"[..], &b"1"[..]),
        (marker_key.as_slice(), marker.as_slice()),
    ] {
        s.producer
            .send(
                FutureRecord::to("t.clock-changelog")
                    .partition(0)
                    .key(key)
                    .payload(value)
                    .headers(headers(&[("cdp-epoch", "1")])),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let (_, high) = changelog::watermarks(&s.factory.restore_consumer()?, "t.clock-changelog", 0)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().to_path_buf();
    let consumer = s.factory.restore_consumer()?;
    // The broker goes away just as the restore starts, and comes back.
    s.mock.broker_down(1)?;
    let restore = tokio::task::spawn_blocking(move || {
        let mut store = TaskStore::open(&path)?;
        let mut restorer = Restorer::new(TaskMeta::default());
        changelog::replay(
            &consumer,
            &mut store,
            &mut restorer,
            "t.clock-changelog",
            0,
            0,
            high - 1,
        )?;
        let value = store.get(b"a")?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((value, restorer.meta.input_offset))
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.mock.broker_up(1)?;
    let (value, input_offset) = restore.await??;
    assert_eq!(value, Some(b"1".to_vec()));
    assert_eq!(input_offset, 42);
    Ok(())
}

/// The stage as static member `clock-0`, once it has joined and processed
/// a record.
async fn static_member_processing(
    s: &MockStage,
    shutdown: &Shutdown,
    health: &Health,
) -> Result<StageJoin, BoxError> {
    let join = start(
        StageRuntime::new(
            spec(),
            s.factory.clone(),
            Some("clock-0".into()),
            health.register("clock"),
        ),
        shutdown,
    )?;
    produce(&s.producer, "before", &[]).await?;
    let f = s.factory.clone();
    let out = tokio::task::spawn_blocking(move || read_out(&f, |o| !o.is_empty())).await?;
    assert_eq!(out.len(), 1, "{out:?}");
    Ok(join)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_static_member_ends_the_stage_and_fails_health() -> TestResult {
    let s = setup(&[])?;
    let shutdown = Shutdown::default();
    let health = Health::default();
    let join = static_member_processing(&s, &shutdown, &health).await?;
    // Another instance with the same group.instance.id took over: the
    // coordinator answers the next heartbeats with FENCED_INSTANCE_ID.
    s.mock.request_errors(
        RDKafkaApiKey::Heartbeat,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID; 5],
    );
    let result = finished(join, Duration::from_secs(30)).await;
    assert!(
        matches!(
            result,
            Some(Err(RuntimeError::Fatal {
                client: "consumer",
                ..
            }))
        ),
        "a fenced member must end the stage, got {result:?}"
    );
    assert!(
        health.failure().is_some(),
        "/healthz must fail until the process exits"
    );
    assert!(shutdown.is_triggered(), "the process shuts down");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_ticks_do_not_move_time_and_foreign_positions_are_stripped_from_external_input(
) -> TestResult {
    let s = setup(&[])?;
    let day_ahead = (wall_ms() + 86_400_000).to_string();
    // A tick nobody of ours wrote, a day ahead; then records carrying a
    // re-injected dead letter's runtime headers, the second at a lower
    // position (a "replay" to a stage that trusted them).
    produce(&s.producer, "", &[("cdp-tick", &day_ahead)]).await?;
    let forged = |pos: &'static str| {
        [
            ("cdp-source", "web"),
            ("cdp-origin", "clock:0"),
            ("cdp-epoch", "1"),
            ("cdp-pos", pos),
        ]
    };
    produce(&s.producer, "first", &forged("100:0")).await?;
    produce(&s.producer, "second", &forged("5:0")).await?;
    // A producer's event that copied a tick header along with the rest:
    // an event (ticks carry no payload), not a tick to drop.
    produce(
        &s.producer,
        "copied",
        &[
            ("cdp-source", "web"),
            ("cdp-tick", &day_ahead),
            ("cdp-origin", "clock:0"),
        ],
    )
    .await?;
    let shutdown = Shutdown::default();
    let join = start(
        StageRuntime::new(
            spec(),
            s.factory.clone(),
            None,
            Health::default().register("clock"),
        )
        .with_external_input(),
        &shutdown,
    )?;
    let f = s.factory.clone();
    let out = tokio::task::spawn_blocking(move || read_out(&f, |o| o.len() >= 3)).await?;
    let values: Vec<&str> = out
        .iter()
        .map(|v| v.split('@').next().unwrap_or_default())
        .collect();
    assert_eq!(values, ["first", "second", "copied"], "{out:?}");
    assert!(
        out.iter().all(|v| time_of(v) < wall_ms() + 60_000),
        "a forged tick moved stream time: {out:?}"
    );
    // The stage's own ticks still move time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    produce(&s.producer, "third", &[]).await?;
    let f = s.factory.clone();
    let out = tokio::task::spawn_blocking(move || read_out(&f, |o| o.len() >= 4)).await?;
    let third = out.get(3).map(|v| time_of(v)).unwrap_or(-1);
    assert!(third > 0 && third <= wall_ms(), "{out:?}");
    shutdown.trigger();
    let result = finished(join, Duration::from_secs(30)).await;
    assert!(matches!(result, Some(Ok(()))), "{result:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stage_is_not_ready_while_the_broker_is_away_and_stops_on_time() -> TestResult {
    // A session that outlasts the outage: no revoke tells the stage.
    let s = setup(&[("consumer.session.timeout.ms", "60000")])?;
    let shutdown = Shutdown::default();
    let health = Health::default();
    let ready = health.register("clock");
    // No ticks: what the stage hears of the broker is its idle check.
    let idle = StageSpec {
        ticks: false,
        ..spec()
    };
    let join = start(
        StageRuntime::new(idle, s.factory.clone(), None, ready.clone()),
        &shutdown,
    )?;
    let until = |want: bool, within: Duration| {
        let ready = ready.clone();
        async move {
            let deadline = Instant::now() + within;
            while ready.is_ready() != want {
                if Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            true
        }
    };
    assert!(until(true, Duration::from_secs(30)).await, "never ready");
    s.mock.broker_down(1)?;
    // The idle check runs every 5 s and waits 2 s for an answer.
    assert!(
        until(false, Duration::from_secs(9)).await,
        "ready while the broker is away"
    );
    s.mock.broker_up(1)?;
    assert!(
        until(true, Duration::from_secs(20)).await,
        "not ready again once the broker is back"
    );
    // Away again: a shutdown is not held up by the stage's waiting.
    s.mock.broker_down(1)?;
    assert!(until(false, Duration::from_secs(9)).await);
    shutdown.trigger();
    let result = finished(join, Duration::from_secs(10)).await;
    assert!(result.is_some(), "the stage did not stop within 10 s");
    Ok(())
}

/// librdkafka's debug lines of the group protocol, kept (rust-rdkafka logs
/// through the `log` crate).
struct GroupDebug(std::sync::Mutex<Vec<String>>);

impl log::Log for GroupDebug {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.target() == "librdkafka"
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            if let Ok(mut lines) = self.0.lock() {
                lines.push(r.args().to_string());
            }
        }
    }
    fn flush(&self) {}
}

/// A static member (`--instance-id`) that stops gracefully, as a pod does
/// in a rolling upgrade, must not leave the group: its partitions wait for
/// it through the session timeout instead of moving to another instance
/// and back (KIP-345). librdkafka leaves on an unsubscribe, static or not,
/// and skips the LeaveGroup only when the consumer closes: read from its
/// own debug lines, since the mock cluster rebalances either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_that_stops_does_not_leave_the_group() -> TestResult {
    let debug: &'static GroupDebug = Box::leak(Box::new(GroupDebug(Default::default())));
    log::set_logger(debug).map_err(|e| e.to_string())?;
    log::set_max_level(log::LevelFilter::Debug);
    let s = setup(&[("consumer.debug", "cgrp")])?;
    let shutdown = Shutdown::default();
    let health = Health::default();
    let join = static_member_processing(&s, &shutdown, &health).await?;
    let joined = debug.0.lock().map_err(|e| e.to_string())?.len();
    assert!(joined > 0, "no debug lines of librdkafka were seen");

    shutdown.trigger();
    assert!(matches!(
        finished(join, Duration::from_secs(20)).await,
        Some(Ok(()))
    ));
    let lines = debug.0.lock().map_err(|e| e.to_string())?;
    let leaves: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("LEAVE") && l.contains("leave (in state"))
        .collect();
    assert!(
        leaves.is_empty(),
        "the static member left the group: {leaves:?}"
    );
    // It did close: librdkafka says so at its debug level.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("CLOSE") || l.contains("TERMINATE")),
        "{:?}",
        &lines[lines.len().saturating_sub(20)..]
    );
    Ok(())
}
