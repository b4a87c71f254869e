//! Compatibility with clients nobody here wrote. Segment's and
//! RudderStack's SDKs send every call type to the collector of `cdp dev`,
//! and every event must arrive on `<p>.raw` with the fields the Segment
//! spec promises; generic Kafka clients write `<p>.raw` directly and read
//! the pipeline's output topics.
//!
//! The drivers live in `tests/compat/`: `segment_python.py`
//! (segment-analytics-python), `rudder_python.py` (rudder-sdk-python) and
//! `kafka_python.py` (confluent-kafka), all from the venv `scripts/test.sh`
//! makes in `$CDP_CACHE/venv` (`CDP_COMPAT_PYTHON` overrides it);
//! `segment_node.mjs` (@segment/analytics-node) and `segment_browser.mjs`
//! (@segment/analytics-next, analytics.js, in headless Debian Chromium
//! driven by playwright-core; both from `npm ci` in `tests/compat`). kcat is
//! Debian's (`CDP_KCAT` overrides the path). Without them a test skips
//! locally and fails in CI (`CI` set), so a missing client can never pass as
//! green.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cdp::demo::DEMO_WRITE_KEY;
use cdp::dev::Dev;
use cdp_operators::messages::{parse_time_ms, AudienceAction, AudienceChange};
use cdp_pipeline::envelope;
use common::TestResult;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long one SDK driver may run.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the events may take to show up on the raw topic.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Events each driver queues for its normal batched flush.
const BATCH_EVENTS: usize = 30;
/// The source id of the demo write key.
const SOURCE: &str = "web";

fn compat_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat")
}

fn cache_dir() -> PathBuf {
    match std::env::var_os("CDP_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/cdp"),
    }
}

/// The SDK is not installed: fail in CI, skip (with the reason) elsewhere.
fn missing(what: &str) -> TestResult {
    let message = format!("{what}; scripts/test.sh installs it");
    if std::env::var_os("CI").is_some() {
        return Err(message.into());
    }
    eprintln!("skipping: {message}");
    Ok(())
}

/// A per-run id, so ids never collide with another run's.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}x{}", std::process::id(), nanos % 1_000_000_000)
}

/// One record read back from the raw topic.
#[derive(Debug)]
struct Raw {
    key: Option<String>,
    source: Option<String>,
    value: Value,
}

fn str_of<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get(field).and_then(Value::as_str)
}

/// What reached the raw topic for one run: ids start with `ours`.
struct Run {
    ours: String,
    records: Vec<Raw>,
}

/// Start `cdp dev`, run `program args… HOST WRITE_KEY RUN`, and return
/// what reached the raw topic for this run (ids starting with `prefix-RUN`).
async fn drive(program: &Path, args: &[&str], prefix: &str) -> Result<Run, BoxError> {
    let dev = Dev::start_for_tests().await?;
    let result = drive_on(&dev, program, args, prefix).await;
    dev.stop().await?;
    result
}

async fn drive_on(dev: &Dev, program: &Path, args: &[&str], prefix: &str) -> Result<Run, BoxError> {
    let run = run_id();
    let host = format!("http://{}", dev.collector);
    let mut args: Vec<&str> = args.to_vec();
    args.extend([host.as_str(), DEMO_WRITE_KEY, run.as_str()]);
    run_bounded(program, &args).await?;

    let ours = format!("{prefix}-{run}");
    let factory = dev.factory.clone();
    let mine = ours.clone();
    let records = tokio::task::spawn_blocking(move || read_raw(&factory, &mine)).await??;
    Ok(Run { ours, records })
}

/// Run `program args…` in tests/compat for at most [`DRIVER_TIMEOUT`],
/// pass its stderr on, and return its stdout; an error if it failed.
async fn run_bounded(program: &Path, args: &[&str]) -> Result<String, BoxError> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .current_dir(compat_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", program.display()))?;
    let output = tokio::time::timeout(DRIVER_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("{} {args:?} ran past {DRIVER_TIMEOUT:?}", program.display()))??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !stderr.trim().is_empty() {
        eprintln!("{}", stderr.trim_end());
    }
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!(
            "{} {args:?} failed ({}):\n{stderr}{stdout}",
            program.display(),
            output.status,
        )
        .into());
    }
    Ok(stdout)
}

/// Read `<p>.raw` from the beginning of every partition until this run's
/// every expected event is there (and a little longer, to catch repeats),
/// or the deadline passes.
fn read_raw(factory: &cdp_pipeline::ClientFactory, ours: &str) -> Result<Vec<Raw>, BoxError> {
    let expected = 7 + BATCH_EVENTS;
    let consumer = factory.plain_consumer(&format!("compat-{ours}"))?;
    let topic = factory.topics().raw();
    let mut tpl = TopicPartitionList::new();
    for p in 0..factory.config().partitions {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut out = Vec::new();
    let mut last_new = Instant::now();
    while Instant::now() < deadline {
        // Everything arrived and nothing more of ours for a second: done.
        // (Other records, such as the stages' ticks, keep coming.)
        if out.len() >= expected && last_new.elapsed() > Duration::from_secs(1) {
            break;
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        // Other writers share the topic (ticks and markers have no JSON
        // body); an event of ours that did not parse shows up as missing.
        let Ok(value) = serde_json::from_slice::<Value>(message.payload().unwrap_or_default())
        else {
            continue;
        };
        let mine = ["userId", "anonymousId"]
            .iter()
            .any(|f| str_of(&value, f).is_some_and(|id| id.starts_with(ours)));
        if !mine {
            continue;
        }
        let source = message.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == envelope::SOURCE)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        last_new = Instant::now();
        out.push(Raw {
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            source,
            value,
        });
    }
    Ok(out)
}

/// Assert that `records` are exactly what a driver sends (see
/// tests/compat/*): the six call types, a past-dated track and a batch,
/// each with the fields the spec promises. `identify_traits` points at
/// where the SDK puts identify's traits (`/traits` in Segment's spec,
/// `/context/traits` in RudderStack's).
fn check(records: &[Raw], ours: &str, library: &str, identify_traits: &str) -> TestResult {
    let user = format!("{ours}-user");
    let anon = format!("{ours}-anon");
    let now = chrono::Utc::now().timestamp_millis();
    let dump = || {
        records
            .iter()
            .map(|r| r.value.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        records.len(),
        7 + BATCH_EVENTS,
        "every event exactly once; got:\n{}",
        dump()
    );

    // What every event carries.
    let mut by_id: BTreeMap<String, &Value> = BTreeMap::new();
    for r in records {
        let v = &r.value;
        assert_eq!(r.source.as_deref(), Some(SOURCE), "cdp-source header: {v}");
        let message_id = str_of(v, "messageId").ok_or_else(|| format!("no messageId: {v}"))?;
        assert!(
            !message_id.is_empty() && !message_id.starts_with("api-"),
            "the SDK's own messageId is kept: {v}"
        );
        assert!(
            by_id.insert(message_id.to_string(), v).is_none(),
            "messageId {message_id} twice"
        );
        let kind = str_of(v, "type").ok_or_else(|| format!("no type: {v}"))?;
        assert!(
            ["identify", "track", "page", "screen", "group", "alias"].contains(&kind),
            "{v}"
        );
        let received = str_of(v, "receivedAt")
            .and_then(parse_time_ms)
            .ok_or_else(|| format!("no receivedAt: {v}"))?;
        assert!((now - received).abs() < 300_000, "receivedAt is now: {v}");
        let timestamp = str_of(v, "timestamp")
            .and_then(parse_time_ms)
            .ok_or_else(|| format!("no timestamp: {v}"))?;
        // The SDK stamps the call and the batch (sentAt); the collector
        // keeps the client's time, corrected for its clock skew.
        assert!(str_of(v, "sentAt").is_some(), "sentAt: {v}");
        let original = str_of(v, "originalTimestamp")
            .and_then(parse_time_ms)
            .ok_or_else(|| format!("originalTimestamp kept after skew correction: {v}"))?;
        assert!((timestamp - original).abs() < 60_000, "{v}");
        assert!(
            v.get("writeKey").is_none(),
            "the write key never lands: {v}"
        );
        assert_eq!(
            v.pointer("/context/library/name").and_then(Value::as_str),
            Some(library),
            "{v}"
        );
        let key = str_of(v, "anonymousId")
            .filter(|a| !a.is_empty())
            .or_else(|| str_of(v, "userId"));
        assert_eq!(r.key.as_deref(), key, "keyed by anonymousId, else userId");
        if str_of(v, "event") != Some("Past Event") {
            assert!(
                (timestamp - received).abs() < 60_000,
                "timestamp ~ now: {v}"
            );
        }
    }

    let get = |name: &str| -> Result<&Value, String> {
        let id = format!("{ours}-{name}");
        by_id
            .get(&id)
            .copied()
            .ok_or_else(|| format!("no event {id} among:\n{}", dump()))
    };

    let identify = get("identify")?;
    assert_eq!(str_of(identify, "type"), Some("identify"));
    assert_eq!(str_of(identify, "userId"), Some(user.as_str()));
    assert_eq!(str_of(identify, "anonymousId"), Some(anon.as_str()));
    assert_eq!(
        identify.pointer(identify_traits),
        Some(&json!({"email": format!("{ours}@example.com"), "plan": "pro"})),
        "{identify}"
    );

    let track = get("track")?;
    assert_eq!(str_of(track, "type"), Some("track"));
    assert_eq!(str_of(track, "userId"), Some(user.as_str()));
    assert_eq!(str_of(track, "anonymousId"), Some(anon.as_str()));
    assert_eq!(str_of(track, "event"), Some("Order Completed"));
    assert_eq!(
        track["properties"],
        json!({"revenue": 42.5, "currency": "EUR"})
    );

    let page = get("page")?;
    assert_eq!(str_of(page, "type"), Some("page"));
    assert_eq!(str_of(page, "userId"), Some(user.as_str()));
    assert_eq!(str_of(page, "name"), Some("Install"));
    assert_eq!(str_of(page, "category"), Some("Docs"));
    assert_eq!(page.pointer("/properties/path"), Some(&json!("/install")));

    let screen = get("screen")?;
    assert_eq!(str_of(screen, "type"), Some("screen"));
    assert_eq!(str_of(screen, "name"), Some("Home"));
    assert_eq!(screen.pointer("/properties/tab"), Some(&json!("feed")));

    let group = get("group")?;
    assert_eq!(str_of(group, "type"), Some("group"));
    assert_eq!(str_of(group, "userId"), Some(user.as_str()));
    assert_eq!(
        str_of(group, "groupId"),
        Some(format!("{ours}-org").as_str())
    );
    assert_eq!(group["traits"], json!({"name": "Acme"}));

    let alias = get("alias")?;
    assert_eq!(str_of(alias, "type"), Some("alias"));
    assert_eq!(str_of(alias, "userId"), Some(user.as_str()));
    assert_eq!(str_of(alias, "previousId"), Some(anon.as_str()));

    // An old event keeps its time: timestamp = receivedAt - (sentAt -
    // original), and sentAt ~ receivedAt on one machine.
    let past = get("past")?;
    assert_eq!(str_of(past, "event"), Some("Past Event"));
    let jan_1 = parse_time_ms("2024-01-01T00:00:00Z").ok_or("time")?;
    let original = str_of(past, "originalTimestamp").and_then(parse_time_ms);
    assert_eq!(original, Some(jan_1), "{past}");
    let corrected = str_of(past, "timestamp")
        .and_then(parse_time_ms)
        .ok_or("timestamp")?;
    assert!((corrected - jan_1).abs() < 60_000, "{past}");

    // The queued calls, flushed in the SDK's own batches.
    let batch_anon = format!("{ours}-batch");
    let items: BTreeSet<u64> = records
        .iter()
        .map(|r| &r.value)
        .filter(|v| str_of(v, "event") == Some("Batch Item"))
        .inspect(|v| {
            assert_eq!(str_of(v, "type"), Some("track"), "{v}");
            assert_eq!(str_of(v, "anonymousId"), Some(batch_anon.as_str()), "{v}");
        })
        .filter_map(|v| v.pointer("/properties/i").and_then(Value::as_u64))
        .collect();
    assert_eq!(
        items,
        (0..BATCH_EVENTS as u64).collect::<BTreeSet<_>>(),
        "every queued event, once"
    );
    Ok(())
}

/// The venv's Python (`CDP_COMPAT_PYTHON`, else `$CDP_CACHE/venv`).
fn python() -> PathBuf {
    match std::env::var_os("CDP_COMPAT_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => cache_dir().join("venv/bin/python"),
    }
}

/// Whether `python` can import `module`.
fn importable(python: &Path, module: &str) -> bool {
    std::process::Command::new(python)
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_analytics_python_sends_every_call_type() -> TestResult {
    let python = python();
    if !importable(&python, "segment.analytics") {
        return missing(&format!(
            "segment-analytics-python is not importable by {}",
            python.display()
        ));
    }
    let script = compat_dir().join("segment_python.py");
    let script = script.to_string_lossy();
    let run = drive(&python, &[&script], "py").await?;
    check(&run.records, &run.ours, "analytics-python", "/traits")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_analytics_node_sends_every_call_type() -> TestResult {
    let sdk = compat_dir().join("node_modules/@segment/analytics-node/package.json");
    let node_ok = std::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !node_ok || !sdk.exists() {
        return missing("node or @segment/analytics-node (npm ci in tests/compat) is missing");
    }
    let script = compat_dir().join("segment_node.mjs");
    let script = script.to_string_lossy();
    let run = drive(Path::new("node"), &[&script], "node").await?;
    check(
        &run.records,
        &run.ours,
        "@segment/analytics-node",
        "/traits",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_analytics_next_in_chromium_sends_every_call_type() -> TestResult {
    let chromium = std::env::var_os("CDP_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    let packages = [
        "@segment/analytics-next/dist/umd/index.js",
        "playwright-core/package.json",
    ];
    let installed = packages
        .iter()
        .all(|p| compat_dir().join("node_modules").join(p).exists());
    if !chromium.exists() || !installed {
        return missing(&format!(
            "{} or @segment/analytics-next and playwright-core (npm ci in tests/compat) are missing",
            chromium.display()
        ));
    }
    let script = compat_dir().join("segment_browser.mjs");
    let script = script.to_string_lossy();
    let run = drive(Path::new("node"), &[&script], "browser").await?;
    check(&run.records, &run.ours, "analytics.js", "/traits")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rudder_sdk_python_sends_every_call_type() -> TestResult {
    let python = python();
    if !importable(&python, "rudderstack.analytics") {
        return missing(&format!(
            "rudder-sdk-python is not importable by {}",
            python.display()
        ));
    }
    let script = compat_dir().join("rudder_python.py");
    let script = script.to_string_lossy();
    let run = drive(&python, &[&script], "rudder").await?;
    // RudderStack's SDK names itself like Segment's, puts identify's traits
    // under context, and adds its own fields, which the collector keeps.
    check(
        &run.records,
        &run.ours,
        "analytics-python",
        "/context/traits",
    )?;
    for r in &run.records {
        assert_eq!(str_of(&r.value, "channel"), Some("server"), "{}", r.value);
    }
    Ok(())
}

/// One record the confluent-kafka driver printed (tests/compat/kafka_python.py).
#[derive(Debug, serde::Deserialize)]
struct Seen {
    kind: String,
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<String>,
    value_hex: String,
    #[serde(default)]
    headers: Vec<(String, String)>,
}

impl Seen {
    fn value(&self) -> Result<Vec<u8>, BoxError> {
        self.value_hex
            .as_bytes()
            .chunks(2)
            .map(|pair| match pair {
                [_, _] => Ok(u8::from_str_radix(std::str::from_utf8(pair)?, 16)?),
                _ => Err(format!("odd hex: {}", self.value_hex).into()),
            })
            .collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// confluent-kafka writes straight to `<p>.raw` (the documented contract)
/// and reads the pipeline's `<p>.valid` and `<p>.invalid` back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluent_kafka_writes_raw_and_reads_valid_and_dead_letters() -> TestResult {
    let python = python();
    if !importable(&python, "confluent_kafka") {
        return missing(&format!(
            "confluent-kafka is not importable by {}",
            python.display()
        ));
    }
    let dev = Dev::start_for_tests().await?;
    let result = confluent_kafka_round_trip(&dev, &python).await;
    dev.stop().await?;
    result
}

async fn confluent_kafka_round_trip(dev: &Dev, python: &Path) -> TestResult {
    let run = run_id();
    let ours = format!("kafka-{run}");
    let topics = dev.factory.topics();
    let (raw, valid, invalid) = (topics.raw(), topics.valid(), topics.invalid());
    let script = compat_dir().join("kafka_python.py");
    let script = script.to_string_lossy();
    let stdout = run_bounded(
        python,
        &[
            &script,
            &dev.bootstrap,
            &raw,
            &valid,
            &invalid,
            SOURCE,
            &run,
        ],
    )
    .await?;
    let seen = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str::<Seen>)
        .collect::<Result<Vec<_>, _>>()?;
    let of = |kind: &str, topic: &str| -> Vec<&Seen> {
        seen.iter()
            .filter(|s| s.kind == kind && s.topic == topic)
            .collect()
    };
    let anon = format!("{ours}-anon");
    let bad_key = format!("{ours}-bad");

    // What it produced: both records acknowledged on <p>.raw, the event in
    // the partition murmur2 of its key gives (the contract's partitioner).
    let produced = of("produced", &raw);
    assert_eq!(produced.len(), 2, "{seen:?}");
    let good = produced
        .iter()
        .find(|s| s.key.as_deref() == Some(anon.as_str()))
        .ok_or_else(|| format!("the event was not produced: {seen:?}"))?;
    let bad = produced
        .iter()
        .find(|s| s.key.as_deref() == Some(bad_key.as_str()))
        .ok_or_else(|| format!("the malformed record was not produced: {seen:?}"))?;
    let partitions = dev.factory.config().partitions;
    assert_eq!(good.partition, common::partition_of(&anon, partitions));

    // The event passed validate: on <p>.valid, same key, same event.
    let passed = of("consumed", &valid);
    assert_eq!(passed.len(), 1, "exactly the event on {valid}: {seen:?}");
    let passed = passed[0];
    assert_eq!(passed.key.as_deref(), Some(anon.as_str()));
    let event: Value = serde_json::from_slice(&passed.value()?)?;
    assert_eq!(str_of(&event, "type"), Some("track"), "{event}");
    assert_eq!(
        str_of(&event, "messageId"),
        Some(format!("{ours}-track").as_str())
    );
    assert_eq!(str_of(&event, "anonymousId"), Some(anon.as_str()));
    assert_eq!(str_of(&event, "event"), Some("Order Completed"));
    assert_eq!(
        event["properties"],
        json!({"revenue": 42.5, "currency": "EUR"})
    );
    assert_eq!(passed.header(envelope::SOURCE), Some(SOURCE), "{passed:?}");

    // The malformed record is a dead letter: original key and bytes, reason.
    let dead = of("consumed", &invalid);
    assert_eq!(
        dead.len(),
        1,
        "exactly the malformed record on {invalid}: {seen:?}"
    );
    let dead = dead[0];
    assert_eq!(dead.key.as_deref(), Some(bad_key.as_str()));
    assert_eq!(dead.value()?, bad.value()?, "the original bytes");
    assert_eq!(dead.header(envelope::DLQ_REASON), Some("invalid_json"));
    assert_eq!(dead.header(envelope::DLQ_STAGE), Some("validate"));
    assert_eq!(
        dead.header("cdp-dlq-input"),
        Some(format!("{raw}[{}]@{}", bad.partition, bad.offset).as_str()),
        "the dead letter points at the record confluent-kafka wrote"
    );
    Ok(())
}

/// kcat reads `<p>.audiences` with headers: the public contract, as a
/// generic Kafka tool sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcat_reads_audience_changes_with_their_headers() -> TestResult {
    let kcat = std::env::var_os("CDP_KCAT").map_or_else(|| PathBuf::from("kcat"), PathBuf::from);
    let installed = std::process::Command::new(&kcat)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        return missing(&format!("{} (Debian's kcat) is missing", kcat.display()));
    }
    let dev = Dev::start_for_tests().await?;
    let result = kcat_reads_audiences(&dev, &kcat).await;
    dev.stop().await?;
    result
}

async fn kcat_reads_audiences(dev: &Dev, kcat: &Path) -> TestResult {
    let client = reqwest::Client::new();
    cdp::demo::send_journey(&client, dev.collector, "kcat1", None).await?;
    let topic = dev.factory.topics().audiences();
    let args = [
        "-b",
        dev.bootstrap.as_str(),
        "-C",
        "-t",
        topic.as_str(),
        "-o",
        "beginning",
        "-e",
        "-J",
        "-q",
    ];
    // Read the whole topic until the change is there (kcat exits at the
    // end of every partition with -e).
    let deadline = Instant::now() + Duration::from_secs(60);
    let records = loop {
        let stdout = run_bounded(kcat, &args).await?;
        let records = stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str::<Value>)
            .collect::<Result<Vec<_>, _>>()?;
        let entered: Vec<(Value, AudienceChange)> = records
            .iter()
            .filter_map(|r| {
                let change: AudienceChange = serde_json::from_str(str_of(r, "payload")?).ok()?;
                let user = change.identifiers.get("user_id")?;
                (change.audience == "big_spenders"
                    && matches!(change.action, AudienceAction::Entered)
                    && user.iter().any(|u| u == "user-kcat1"))
                .then(|| (r.clone(), change))
            })
            .collect();
        if !entered.is_empty() {
            break entered;
        }
        if Instant::now() > deadline {
            return Err(
                format!("no big_spenders entry for user-kcat1 on {topic}: {records:?}").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let mut positions = BTreeSet::new();
    for (record, change) in &records {
        assert_eq!(str_of(record, "topic"), Some(topic.as_str()));
        assert_eq!(
            str_of(record, "key"),
            Some(change.profile_id.as_str()),
            "keyed by profile: {record}"
        );
        assert_eq!(change.kind, "audience_change");
        // kcat -J: headers as a flat [name, value, name, value, …] list.
        let flat = record
            .get("headers")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("no headers: {record}"))?;
        let headers: Vec<(String, Vec<u8>)> = flat
            .chunks(2)
            .filter_map(|pair| match pair {
                [k, v] => Some((k.as_str()?.to_string(), v.as_str()?.as_bytes().to_vec())),
                _ => None,
            })
            .collect();
        for name in [envelope::ORIGIN, envelope::EPOCH, envelope::POSITION] {
            assert!(headers.iter().any(|(k, _)| k == name), "{name} in {record}");
        }
        let (origin, position) = envelope::Position::from_headers(&headers)
            .ok_or_else(|| format!("unparsable origin headers: {record}"))?;
        assert!(origin.starts_with("audiences:"), "{origin}");
        positions.insert((origin, position.offset, position.index));
    }
    // Repeats, if any, are replays of the same position: one change.
    assert_eq!(positions.len(), 1, "{records:?}");
    Ok(())
}
