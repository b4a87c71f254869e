//! `cdp dead-letters replay` after a fix: an event the tracking plan
//! blocked is dead-lettered; the plan is fixed and the chain restarted on
//! the same broker; the dead letter, replayed, reaches `<p>.valid` once,
//! without the stale runtime headers, and a second replay does nothing.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cdp::dead_letters::{self, Selection, REPLAYED_FROM};
use cdp::dev::{Dev, DevOptions};
use cdp::stages::Stage;
use cdp_pipeline::{envelope, ClientFactory};
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The demo plan requires `revenue >= 0` and blocks violations; the fixed
/// plan accepts refunds.
const STRICT: &str = "properties: {revenue: {type: number, minimum: 0}}";
const FIXED: &str = "properties: {revenue: {type: number}}";

async fn start(config: &str, bootstrap: &str, dir: &std::path::Path) -> Result<Dev, BoxError> {
    let path = dir.join("cdp.yaml");
    std::fs::write(&path, config)?;
    let dev = Dev::start(DevOptions {
        config: Some(path),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        admin: None,
        state_dir: None,
        stdout: false,
        brokers: Some(bootstrap.to_string()),
    })
    .await?;
    dev.wait_ready(Duration::from_secs(60)).await?;
    Ok(dev)
}

async fn send_refund(dev: &Dev, message_id: &str) -> Result<(), BoxError> {
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/track", dev.collector))
        .basic_auth(cdp::demo::DEMO_WRITE_KEY, Some(""))
        .json(&serde_json::json!({
            "userId": "refund-user", "event": "Order Completed",
            "messageId": message_id, "properties": {"revenue": -20},
        }))
        .send()
        .await?;
    assert!(response.status().is_success(), "{}", response.status());
    Ok(())
}

/// Records of `topic` whose messageId is `id`, with their headers, read
/// until `settle` passes with nothing new after at least `want`.
fn read_by_message_id(
    factory: &ClientFactory,
    topic: &str,
    id: &str,
    want: usize,
) -> Result<Vec<Vec<(String, String)>>, BoxError> {
    let consumer = factory.plain_consumer(&format!("replay-test-{}", std::process::id()))?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_new = Instant::now();
    let mut out = Vec::new();
    while Instant::now() < deadline {
        if out.len() >= want && last_new.elapsed() > Duration::from_secs(2) {
            break;
        }
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        let Ok(v) = serde_json::from_slice::<Value>(m.payload().unwrap_or_default()) else {
            continue;
        };
        if v["messageId"] == id {
            last_new = Instant::now();
            out.push(
                m.headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            );
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_event_replayed_after_the_fix_is_counted_once() -> Result<(), BoxError> {
    let broker = MockCluster::new(1)?;
    let bootstrap = broker.bootstrap_servers();
    let strict = cdp::config::DEMO_CONFIG.to_string();
    assert!(strict.contains(STRICT), "the demo plan changed");
    let mut config = cdp::config::Config::from_yaml(&strict)?;
    config.kafka.brokers = bootstrap.clone();
    let factory = ClientFactory::new(config.kafka.clone())?;
    for spec in factory.topic_specs(&Stage::changelogs(factory.config().partitions)) {
        broker.create_topic(&spec.name, spec.partitions, 1)?;
    }
    broker.create_topic(&dead_letters::replay_log_topic(&factory.topics()), 1, 1)?;
    let message_id = format!("refund-{}", std::process::id());

    // 1. The strict plan blocks the refund: a dead letter of validate.
    let dir = tempfile::tempdir()?;
    let dev = start(&strict, &bootstrap, dir.path()).await?;
    send_refund(&dev, &message_id).await?;
    let selection = Selection {
        stage: Some("validate".into()),
        reason: Some("plan_violation".into()),
        ids: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let ours = loop {
        let f = factory.clone();
        let letters = tokio::task::spawn_blocking(move || dead_letters::read(&f)).await??;
        let ours: Vec<_> = letters
            .into_iter()
            .filter(|d| {
                selection.matches(d) && String::from_utf8_lossy(&d.value).contains(&message_id)
            })
            .collect();
        if !ours.is_empty() || Instant::now() > deadline {
            break ours;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(ours.len(), 1, "one dead letter for the refund");
    let id = ours[0].id();
    dev.stop().await?;

    // 2. The plan fixed, the chain restarted on the same broker.
    let fixed = strict.replace(STRICT, FIXED);
    let dev = start(&fixed, &bootstrap, dir.path()).await?;
    let only_ours = Selection {
        ids: vec![id.clone()],
        ..selection.clone()
    };
    let first = dead_letters::replay(&dev.factory, &only_ours, false).await?;
    assert_eq!(first.replayed, vec![id.clone()]);
    // 3. A second replay of the same selection replays nothing.
    let second = dead_letters::replay(&dev.factory, &only_ours, false).await?;
    assert!(second.replayed.is_empty(), "{second:?}");
    assert_eq!(second.already_replayed, vec![id.clone()]);

    let f = dev.factory.clone();
    let valid = f.topics().valid();
    let mid = message_id.clone();
    let seen =
        tokio::task::spawn_blocking(move || read_by_message_id(&f, &valid, &mid, 1)).await??;
    let f = dev.factory.clone();
    let raw = f.topics().raw();
    let mid = message_id.clone();
    let raw_seen =
        tokio::task::spawn_blocking(move || read_by_message_id(&f, &raw, &mid, 2)).await??;
    dev.stop().await?;
    drop(broker);
    // On <p>.raw: the original and one replay, which names its dead letter
    // and carries no stale runtime header.
    assert_eq!(raw_seen.len(), 2, "{raw_seen:?}");
    let replayed: Vec<&Vec<(String, String)>> = raw_seen
        .iter()
        .filter(|h| h.iter().any(|(k, _)| k == REPLAYED_FROM))
        .collect();
    assert_eq!(replayed.len(), 1, "{raw_seen:?}");
    let names: BTreeSet<&str> = replayed[0].iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, BTreeSet::from([envelope::SOURCE, REPLAYED_FROM]));

    assert_eq!(seen.len(), 1, "the refund once on <p>.valid: {seen:?}");
    let names: BTreeSet<&str> = seen[0].iter().map(|(k, _)| k.as_str()).collect();
    assert!(names.contains(envelope::SOURCE), "{names:?}");
    assert!(
        !names.iter().any(|k| k.starts_with("cdp-dlq-")),
        "no stale verdict: {names:?}"
    );
    Ok(())
}
