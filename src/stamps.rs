//! `cdp stamps`: the Kafka timestamp of every event's record on a set of
//! topics, joined downstream by `messageId` — the benchmark's hop-by-hop
//! latency. librdkafka stamps a record's CreateTime when `produce()` is
//! called (neither the stages nor the pass-through hops set timestamps), so
//! the difference between an event's record on a stage's input and on its
//! output is that hop's latency: waiting for the stage's previous batch,
//! the fetch, the poll and the processing up to the output's send.
//!
//! Reads each topic from the first record at or after `--since-ms` up to
//! the high watermark seen at the start, and prints one JSON line per
//! record that names an event: `{"topic", "ts", "id"}`. Records that name
//! none (ticks, transfers, changelog records) are skipped. Read-only.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use cdp_operators::messages::{self, wire, ProfileRecord, ProfileUpdate};
use cdp_pipeline::envelope::frame;
use cdp_pipeline::ClientFactory;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct StampOptions {
    /// Topics to read (full names).
    pub topics: Vec<String>,
    /// Skip records stamped before this (ms since the epoch).
    pub since_ms: i64,
    /// Give up on a partition that stops short of its end for this long.
    pub patience: Duration,
}

/// One record that names an event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stamp {
    pub topic: String,
    /// The record's timestamp (CreateTime unless the topic says
    /// LogAppendTime), ms since the epoch.
    pub ts: i64,
    /// The `messageId` of the event the record is, carries or was caused by.
    pub id: String,
}

/// The event a record names: a Segment event's `messageId` (`raw`,
/// `valid`), a profile record's `event.messageId` (`identified`), or the
/// `cause.message_id` of an update or audience change (`traits`,
/// `audiences`). The profile records in their binary form are read as
/// the stages read them; a framed record (`<p>.identified`, `<p>.traits`) by
/// its payload.
pub fn message_id(value: &[u8]) -> Option<String> {
    let payload = frame::read(value).map_or(value, |framed| framed.payload);
    match payload.first() {
        Some(&wire::EVENT_V1) => match ProfileRecord::from_bytes(payload).ok()? {
            ProfileRecord::Event { event, .. } => messages::field(&event, "messageId")
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        },
        Some(&wire::UPDATE_V1) => match ProfileUpdate::from_bytes(payload).ok()? {
            ProfileUpdate::Update { cause, .. } => cause.message_id,
            _ => None,
        },
        _ => {
            let v: Value = serde_json::from_slice(payload).ok()?;
            let found = [
                v.get("messageId"),
                v.get("event").and_then(|e| e.get("messageId")),
                v.get("cause").and_then(|c| c.get("message_id")),
            ]
            .into_iter()
            .flatten()
            .find_map(Value::as_str)
            .map(str::to_string);
            found
        }
    }
}

/// Read the topics and write one JSON line per stamp to `out`.
pub fn run(
    factory: &ClientFactory,
    opts: &StampOptions,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let consumer: BaseConsumer = factory.plain_consumer("cdp-stamps")?;
    let timeout = Duration::from_secs(10);
    let mut ends: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut wanted = TopicPartitionList::new();
    for topic in &opts.topics {
        let meta = consumer.fetch_metadata(Some(topic), timeout)?;
        for t in meta.topics() {
            for p in t.partitions() {
                let (_, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
                ends.insert((topic.clone(), p.id()), high);
                wanted.add_partition_offset(topic, p.id(), Offset::Offset(opts.since_ms))?;
            }
        }
    }
    // Start at the first record at or after `since_ms` where the broker
    // answers a time lookup; from the beginning where it does not.
    // librdkafka's mock cluster answers every time lookup with the end
    // (`cdp mock-broker`): when every partition says "nothing since",
    // read everything and let the time filter below decide (on a broker
    // that does look times up, nothing was written since: still right).
    let found = consumer
        .offsets_for_times(wanted.clone(), timeout)
        .map_err(|e| tracing::warn!(error = %e, "no offsets by time; reading from the beginning"))
        .ok()
        .filter(|f| f.elements().iter().any(|e| e.offset() != Offset::End));
    let start = match found {
        Some(found) => found,
        None => {
            let mut all = TopicPartitionList::new();
            for (topic, partition) in ends.keys() {
                all.add_partition_offset(topic, *partition, Offset::Beginning)?;
            }
            all
        }
    };
    let mut assign = TopicPartitionList::new();
    for e in start.elements() {
        let offset = match e.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            // Nothing at or after the time: nothing to read there.
            Offset::End => continue,
            _ => Offset::Beginning,
        };
        assign.add_partition_offset(e.topic(), e.partition(), offset)?;
    }
    let mut open: BTreeMap<(String, i32), i64> = assign
        .elements()
        .iter()
        .filter_map(|e| {
            let key = (e.topic().to_string(), e.partition());
            let end = *ends.get(&key)?;
            let at = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            (at < end).then_some((key, end))
        })
        .collect();
    consumer.assign(&assign)?;
    let mut written = 0u64;
    let mut last_record = Instant::now();
    while !open.is_empty() && last_record.elapsed() < opts.patience {
        let m = match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => continue,
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => m,
        };
        last_record = Instant::now();
        let key = (m.topic().to_string(), m.partition());
        if open.get(&key).is_some_and(|end| m.offset() + 1 >= *end) {
            open.remove(&key);
        }
        let Some(ts) = m.timestamp().to_millis() else {
            continue;
        };
        if ts < opts.since_ms {
            continue;
        }
        if let Some(id) = m.payload().and_then(message_id) {
            let stamp = Stamp {
                topic: key.0,
                ts,
                id,
            };
            serde_json::to_writer(&mut *out, &stamp)?;
            out.write_all(b"\n")?;
            written += 1;
        }
    }
    if !open.is_empty() {
        anyhow::bail!("partitions left short of their end: {:?}", open.keys());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdp_pipeline::envelope::Position;

    #[test]
    fn the_event_is_found_on_every_kind_of_record() -> Result<(), String> {
        let cases: [(&str, Option<&str>); 6] = [
            (r#"{"type":"track","messageId":"m1"}"#, Some("m1")),
            (
                r#"{"type":"event","profile_id":"p","event":{"messageId":"m2"}}"#,
                Some("m2"),
            ),
            (
                r#"{"type":"update","cause":{"message_id":"m3"},"event_time":1}"#,
                Some("m3"),
            ),
            (r#"{"type":"update","cause":{"tick":5}}"#, None),
            (r#"not json"#, None),
            (r#"{"messageId":7}"#, None),
        ];
        for (payload, id) in cases {
            assert_eq!(message_id(payload.as_bytes()).as_deref(), id, "{payload}");
        }
        // The profile records as the stages write them (binary).
        let event = ProfileRecord::Event {
            profile_id: "p".into(),
            identifiers: Default::default(),
            event: serde_json::json!({"type": "track", "messageId": "m4"}).into(),
            dropped: Vec::new(),
            merged_from: Vec::new(),
        };
        let update = |message_id: Option<&str>, tick| ProfileUpdate::Update {
            profile_id: "p".into(),
            identifiers: Default::default(),
            event: None,
            traits: Default::default(),
            event_time: 1,
            time_corrected_from: None,
            cause: cdp_operators::messages::Cause {
                message_id: message_id.map(str::to_string),
                tick,
            },
            merged_from: Vec::new(),
            traits_until: None,
        };
        let binary = [
            (event.to_bytes(), Some("m4")),
            (update(Some("m5"), None).to_bytes(), Some("m5")),
            (update(None, Some(5)).to_bytes(), None),
        ];
        for (payload, id) in binary {
            let payload = payload.map_err(|e| e.to_string())?;
            assert_eq!(message_id(&payload), id.map(str::to_string));
            // As the runtime frames it between the profile stages.
            let mut framed = Vec::new();
            let at = Position {
                epoch: 1,
                offset: 2,
                index: 0,
                lineage: 3,
            };
            let own = [("cdp-source", &b"web"[..])];
            assert!(frame::write(&mut framed, "identity:0", &at, own, &payload));
            assert_eq!(message_id(&framed), id.map(str::to_string));
        }
        Ok(())
    }

    /// On librdkafka's mock cluster, which answers every time lookup with
    /// the partition's end, the records since `since_ms` are still found
    /// (and the older ones still skipped).
    #[test]
    fn records_since_a_time_are_found_on_a_broker_without_time_lookups() -> anyhow::Result<()> {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

        let broker = crate::dev::MockBroker::start(&["st".to_string()], 2)?;
        let factory = ClientFactory::new(cdp_pipeline::KafkaConfig {
            brokers: broker.bootstrap.clone(),
            topic_prefix: "st".into(),
            partitions: 2,
            ..Default::default()
        })?;
        let topic = factory.topics().raw();
        let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &broker.bootstrap)
            .create()?;
        let since_ms = 1_000_000;
        for (id, ts, partition) in [
            ("old", since_ms - 1, 0),
            ("a", since_ms, 0),
            ("b", since_ms + 5, 1),
        ] {
            let value = format!(r#"{{"messageId":"{id}"}}"#);
            producer
                .send(
                    BaseRecord::<(), _>::to(&topic)
                        .partition(partition)
                        .payload(&value)
                        .timestamp(ts),
                )
                .map_err(|(e, _)| e)?;
        }
        producer.flush(Duration::from_secs(10))?;
        let opts = StampOptions {
            topics: vec![topic.clone()],
            since_ms,
            patience: Duration::from_secs(10),
        };
        let mut out = Vec::new();
        assert_eq!(run(&factory, &opts, &mut out)?, 2);
        let mut ids: Vec<(String, i64)> = String::from_utf8(out)?
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l)
                    .map(|v| (v["id"].to_string(), v["ts"].as_i64().unwrap_or(-1)))
            })
            .collect::<Result<_, _>>()?;
        ids.sort();
        assert_eq!(
            ids,
            [
                (r#""a""#.to_string(), since_ms),
                (r#""b""#.to_string(), since_ms + 5)
            ]
        );
        Ok(())
    }
}
