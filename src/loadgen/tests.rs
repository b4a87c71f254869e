use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use cdp_connectors::collector::{Collector, CollectorConfig};
use cdp_operators::config::SourceConfig;
use cdp_pipeline::{ClientFactory, Health, KafkaConfig, Shutdown};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::mocking::MockCluster;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;

use super::workload::{Event, Workload, WorkloadSpec, CATEGORIES};
use super::*;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), BoxError>;
/// (key, `cdp-source` header, value) of one record.
type RawRecord = (String, String, Value);

fn spec(seed: u64, people: u64) -> WorkloadSpec {
    WorkloadSpec {
        seed,
        people,
        concurrent: 100,
    }
}

#[test]
fn a_seed_names_one_exact_stream() {
    let a: Vec<Event> = Workload::new(spec(7, 300)).collect();
    let b: Vec<Event> = Workload::new(spec(7, 300)).collect();
    let c: Vec<Event> = Workload::new(spec(8, 300)).collect();
    assert!(a.len() > 300);
    assert_eq!(a, b);
    assert_ne!(a, c);
    let ids: BTreeSet<&str> = a
        .iter()
        .filter_map(|e| e.body["messageId"].as_str())
        .collect();
    assert_eq!(ids.len(), a.len(), "message ids are unique");
}

/// Union–find over identifiers: the profiles identity should end with if
/// every event joins its anonymous id and user id. Written apart from the
/// generator's own bookkeeping, which it checks.
fn profiles_by_union_find(events: &[Event]) -> usize {
    fn find(parent: &mut HashMap<String, String>, x: &str) -> String {
        let p = parent.get(x).cloned().unwrap_or_else(|| x.to_string());
        if p == x {
            return p;
        }
        let root = find(parent, &p);
        parent.insert(x.to_string(), root.clone());
        root
    }
    let mut parent: HashMap<String, String> = HashMap::new();
    for e in events {
        let anon = format!("a:{}", e.body["anonymousId"].as_str().unwrap_or_default());
        let a = find(&mut parent, &anon);
        parent.entry(anon).or_insert_with(|| a.clone());
        if let Some(user) = e.body["userId"].as_str() {
            let u = find(&mut parent, &format!("u:{user}"));
            parent.insert(format!("u:{user}"), u.clone());
            if a != u {
                parent.insert(a, u);
            }
        }
    }
    let keys: Vec<String> = parent.keys().cloned().collect();
    keys.iter()
        .map(|k| find(&mut parent, k))
        .collect::<BTreeSet<_>>()
        .len()
}

#[test]
fn the_shape_is_realistic_and_the_counts_add_up() {
    let mut w = Workload::new(spec(1, 5000));
    let events: Vec<Event> = w.by_ref().collect();
    let stats = w.stats();
    assert_eq!(stats.events, events.len() as u64);
    assert_eq!(stats.people_started, 5000);
    assert_eq!(
        stats.page_views + stats.product_views + stats.identifies + stats.orders,
        stats.events
    );
    // 1–3 devices, 1.65 on average.
    let per_person = stats.devices as f64 / 5000.0;
    assert!((1.5..1.8).contains(&per_person), "{per_person}");
    // About 60% identify; some of them on a second device too (merges).
    let identified: BTreeSet<&str> = events
        .iter()
        .filter(|e| e.body["type"] == "identify")
        .filter_map(|e| e.body["userId"].as_str())
        .collect();
    assert!(
        (2700..3300).contains(&identified.len()),
        "{}",
        identified.len()
    );
    assert!(stats.second_device_identifies > 200, "{stats:?}");
    assert_eq!(
        stats.identifies,
        identified.len() as u64 + stats.second_device_identifies
    );
    assert_eq!(
        stats.expected_profiles as usize,
        profiles_by_union_find(&events)
    );
    // Keys are the anonymous id; every event has one.
    assert!(events
        .iter()
        .all(|e| e.body["anonymousId"] == e.key.as_str()));
    // Categories are skewed: the most popular far ahead of the middle one.
    let mut by_category: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &events {
        if let Some(c) = e.body["properties"]["category"].as_str() {
            *by_category.entry(c).or_default() += 1;
        }
    }
    let top = by_category[CATEGORIES[0]];
    let middle = by_category[CATEGORIES[CATEGORIES.len() / 2]];
    assert!(top > 3 * middle, "{by_category:?}");
    // Revenues: positive, long-tailed (mean above median, a far maximum).
    let mut revenues: Vec<f64> = events
        .iter()
        .filter(|e| e.body["event"] == "Order Completed")
        .filter_map(|e| e.body["properties"]["revenue"].as_f64())
        .collect();
    assert_eq!(revenues.len() as u64, stats.orders);
    revenues.sort_by(f64::total_cmp);
    let median = revenues[revenues.len() / 2];
    let mean = revenues.iter().sum::<f64>() / revenues.len() as f64;
    assert!(revenues[0] >= 0.0);
    assert!((45.0..80.0).contains(&median), "{median}");
    assert!(mean > 1.3 * median, "{mean} vs {median}");
    assert!(revenues[revenues.len() - 1] > 10.0 * median);
}

#[test]
fn identified_devices_carry_the_user_id_from_then_on() {
    let events: Vec<Event> = Workload::new(spec(3, 500)).collect();
    let mut identified: BTreeSet<String> = BTreeSet::new();
    for e in &events {
        let anon = e.key.clone();
        if e.body["type"] == "identify" {
            assert!(e.body["userId"].is_string());
            assert!(e.body["traits"]["email"].is_string());
            identified.insert(anon);
        } else {
            assert_eq!(
                e.body["userId"].is_string(),
                identified.contains(&anon),
                "{e:?}"
            );
        }
    }
}

struct Mock {
    _cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    factory: ClientFactory,
}

fn mock(prefix: &str) -> Result<Mock, BoxError> {
    let cluster = MockCluster::new(1)?;
    let factory = ClientFactory::new(KafkaConfig {
        brokers: cluster.bootstrap_servers(),
        topic_prefix: prefix.into(),
        partitions: 2,
        ..KafkaConfig::default()
    })?;
    cluster.create_topic(&factory.topics().raw(), 2, 1)?;
    Ok(Mock {
        _cluster: cluster,
        factory,
    })
}

/// Every record of `<p>.raw`: (key, cdp-source header, value).
fn read_raw(factory: &ClientFactory, expected: usize) -> Result<Vec<RawRecord>, BoxError> {
    let consumer: BaseConsumer = factory.plain_consumer("loadgen-test")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset(&factory.topics().raw(), p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out.len() < expected && Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m?;
        let source = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "cdp-source"))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        out.push((
            key,
            source,
            serde_json::from_slice(m.payload().unwrap_or_default())?,
        ));
    }
    Ok(out)
}

fn options(target: Target, events: u64) -> LoadgenOptions {
    LoadgenOptions {
        workload: spec(11, 1000),
        events: Some(events),
        duration: None,
        rate: None,
        target,
        batch: 100,
        concurrency: 3,
    }
}

/// The generated stream, by message id, without the send time.
fn expected_by_id(n: usize) -> BTreeMap<String, Event> {
    Workload::new(spec(11, 1000))
        .take(n)
        .map(|e| {
            (
                e.body["messageId"].as_str().unwrap_or_default().to_string(),
                e,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn straight_to_raw_with_key_and_source_header() -> TestResult {
    let m = mock("lgraw")?;
    let summary = run(options(
        Target::Raw {
            factory: m.factory.clone(),
            source: "web".into(),
        },
        700,
    ))
    .await?;
    assert_eq!((summary.sent, summary.failed), (700, 0));
    let records = tokio::task::spawn_blocking({
        let f = m.factory.clone();
        move || read_raw(&f, 700)
    })
    .await??;
    let expected = expected_by_id(700);
    assert_eq!(records.len(), 700);
    for (key, source, mut value) in records {
        assert_eq!(source, "web");
        assert!(value["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
        value.as_object_mut().map(|o| o.remove("timestamp"));
        let e = &expected[value["messageId"].as_str().unwrap_or_default()];
        assert_eq!((&key, &value), (&e.key, &e.body));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_collector_accepts_the_http_batches() -> TestResult {
    let m = mock("lghttp")?;
    let sources = [SourceConfig {
        id: "web".into(),
        write_key: "wk_test".into(),
        tracking_plan: None,
        kind: Default::default(),
    }];
    let collector = Collector::new(
        CollectorConfig::default(),
        &sources,
        &m.factory,
        m.factory.topics().raw(),
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let shutdown = Shutdown::default();
    let health = Health::default();
    let server =
        tokio::spawn(collector.serve_on(listener, shutdown.clone(), health.register("collect")));
    let summary = run(options(
        Target::Http {
            url,
            write_key: "wk_test".into(),
        },
        450,
    ))
    .await?;
    assert_eq!((summary.sent, summary.failed), (450, 0), "{summary}");
    let records = tokio::task::spawn_blocking({
        let f = m.factory.clone();
        move || read_raw(&f, 450)
    })
    .await??;
    let expected = expected_by_id(450);
    assert_eq!(records.len(), 450);
    for (key, source, value) in records {
        assert_eq!(source, "web");
        let e = &expected[value["messageId"].as_str().unwrap_or_default()];
        // The collector keys by anonymous id, as loadgen does on `raw`.
        assert_eq!(key, e.key);
        for field in [
            "type",
            "event",
            "userId",
            "anonymousId",
            "properties",
            "traits",
        ] {
            assert_eq!(value.get(field), e.body.get(field), "{field}");
        }
    }
    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(10), server).await???;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_named_before_anything_is_sent() -> TestResult {
    // Nothing listens on port 1: the broker never describes the topic.
    let factory = ClientFactory::new(KafkaConfig {
        brokers: "127.0.0.1:1".into(),
        topic_prefix: "lgnone".into(),
        ..KafkaConfig::default()
    })?;
    let target = Target::Raw {
        factory,
        source: "web".into(),
    };
    let error = match run(options(target, 10)).await {
        Ok(summary) => return Err(format!("sent without a broker: {summary:?}").into()),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        error.contains("the broker did not describe lgnone.raw"),
        "unclear error: {error}"
    );
    Ok(())
}
