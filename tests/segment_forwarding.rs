//! The `segment` destination against cdp's own collector, in a second
//! chain: the calls Engage sends for audience changes must be accepted by a
//! Segment-compatible API (cdp's collector, write key as Basic auth), pass
//! that chain's spec checks and tracking plan onto `<p>.valid`, and a
//! repeated delivery (a retry or a replay: same delivery ids, so the same
//! messageIds) must come through once, deduplicated by `messageId`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cdp::demo::DEMO_WRITE_KEY;
use cdp::dev::Dev;
use cdp_connectors::destinations::SegmentSink;
use cdp_operators::messages::{AudienceAction, AudienceChange, Cause};
use cdp_pipeline::{Sink, SinkRecord};
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn change_record(run: &str, n: u32, action: AudienceAction) -> Result<SinkRecord, BoxError> {
    let user = format!("seg-{run}-{n}");
    let change = AudienceChange {
        kind: "audience_change".into(),
        audience: "big_spenders".into(),
        action,
        profile_id: format!("prof_{user}"),
        identifiers: [
            ("user_id".to_string(), vec![user.clone()]),
            ("email".to_string(), vec![format!("{user}@example.com")]),
        ]
        .into_iter()
        .collect(),
        traits: BTreeMap::new(),
        event_time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        emitted_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        cause: Cause::default(),
        merged_into: None,
    };
    Ok(SinkRecord {
        delivery_id: format!("audiences:0/1/{n}/0"),
        key: Some(change.profile_id.clone().into_bytes()),
        value: serde_json::to_vec(&change)?,
    })
}

/// Every record of `<p>.valid` whose userId starts with `seg-RUN`, until
/// `expected` are there and nothing new came for 2 s.
fn read_valid(
    factory: &cdp_pipeline::ClientFactory,
    run: &str,
    expected: usize,
) -> Result<Vec<Value>, BoxError> {
    let consumer = factory.plain_consumer(&format!("segment-forwarding-{run}"))?;
    let topic = factory.topics().valid();
    let mut tpl = TopicPartitionList::new();
    for p in 0..cdp_pipeline::kafka::SERIAL_PARTITIONS {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_new = Instant::now();
    let mut out = Vec::new();
    let prefix = format!("seg-{run}");
    while Instant::now() < deadline {
        if out.len() >= expected && last_new.elapsed() > Duration::from_secs(2) {
            break;
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        let Ok(value) = serde_json::from_slice::<Value>(message.payload().unwrap_or_default())
        else {
            continue;
        };
        if value["userId"]
            .as_str()
            .is_some_and(|u| u.starts_with(&prefix))
        {
            last_new = Instant::now();
            out.push(value);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engage_calls_reach_a_second_chain_through_its_collector_once() -> Result<(), BoxError> {
    let second = Dev::start_for_tests().await?;
    let result = forward(&second).await;
    second.stop().await?;
    result
}

async fn forward(second: &Dev) -> Result<(), BoxError> {
    let run = std::process::id().to_string();
    let sink = SegmentSink::new(
        "second-chain",
        &format!("http://{}", second.collector),
        DEMO_WRITE_KEY.to_string(),
        Duration::from_secs(10),
        3,
        4,
    )?;
    let records = vec![
        change_record(&run, 1, AudienceAction::Entered)?,
        change_record(&run, 2, AudienceAction::Entered)?,
        change_record(&run, 3, AudienceAction::Exited)?,
    ];
    let results = sink.deliver(records.clone()).await;
    assert_eq!(results, vec![Ok(()); 3]);
    // The same changes again, as a replay would send them.
    let results = sink.deliver(records).await;
    assert_eq!(results, vec![Ok(()); 3]);

    let factory = second.factory.clone();
    let valid = tokio::task::spawn_blocking(move || read_valid(&factory, &run, 6)).await??;
    let mut by_id: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for v in &valid {
        by_id
            .entry(v["messageId"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(v);
    }
    assert_eq!(by_id.len(), 6, "two calls per change: {valid:#?}");
    assert!(
        by_id.values().all(|v| v.len() == 1),
        "each messageId once on <p>.valid: {valid:#?}"
    );
    let count = |kind: &str, event: Option<&str>| {
        valid
            .iter()
            .filter(|v| v["type"] == kind && event.is_none_or(|e| v["event"] == e))
            .count()
    };
    assert_eq!(count("identify", None), 3);
    assert_eq!(count("track", Some("Audience Entered")), 2);
    assert_eq!(count("track", Some("Audience Exited")), 1);
    for v in valid.iter().filter(|v| v["type"] == "identify") {
        let entered = v["event"].is_null() && v["traits"]["big_spenders"].is_boolean();
        assert!(entered, "{v}");
        assert!(v["traits"]["email"].as_str().is_some(), "{v}");
    }
    Ok(())
}
