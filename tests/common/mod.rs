//! Helpers shared by the integration and end-to-end tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cdp_operators::messages::AudienceChange;
use cdp_pipeline::envelope::Position;
use cdp_pipeline::ClientFactory;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// An audience change without the one field a replay may change.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub audience: String,
    pub action: String,
    pub profile_id: String,
    pub identifiers: BTreeMap<String, Vec<String>>,
    pub traits: BTreeMap<String, serde_json::Value>,
    pub event_time: String,
    pub cause: String,
}

impl From<AudienceChange> for Change {
    fn from(c: AudienceChange) -> Self {
        Change {
            audience: c.audience,
            action: serde_json::to_value(c.action)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            profile_id: c.profile_id,
            identifiers: c.identifiers,
            traits: c.traits,
            event_time: c.event_time,
            cause: serde_json::to_string(&c.cause).unwrap_or_default(),
        }
    }
}

/// Reads `<p>.audiences` the way a destination must: dropping replays by
/// their origin and position headers.
pub struct ChangeReader {
    consumer: BaseConsumer,
    seen: BTreeMap<String, Position>,
    pub changes: Vec<Change>,
    pub duplicates: usize,
}

impl ChangeReader {
    pub fn new(
        factory: &ClientFactory,
        topic: &str,
        partitions: i32,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let consumer = factory.plain_consumer("test-reader")?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        Ok(ChangeReader {
            consumer,
            seen: BTreeMap::new(),
            changes: Vec::new(),
            duplicates: 0,
        })
    }

    /// Poll until `done(changes)` holds or the timeout passes.
    pub fn read_until(&mut self, timeout: Duration, done: impl Fn(&[Change]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if done(&self.changes) {
                return true;
            }
            self.poll_once(Duration::from_millis(200));
        }
        done(&self.changes)
    }

    /// Keep reading for `period` (to catch anything extra).
    pub fn settle(&mut self, period: Duration) {
        let deadline = Instant::now() + period;
        while Instant::now() < deadline {
            self.poll_once(Duration::from_millis(200));
        }
    }

    fn poll_once(&mut self, timeout: Duration) {
        let Some(Ok(m)) = self.consumer.poll(timeout) else {
            return;
        };
        let headers: Vec<(String, Vec<u8>)> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        if let Some((origin, pos)) = Position::from_headers(&headers) {
            if self.seen.get(&origin).is_some_and(|s| !pos.is_new_after(s)) {
                self.duplicates += 1;
                return;
            }
            self.seen.insert(origin, pos);
        }
        if let Some(change) = m
            .payload()
            .and_then(|p| serde_json::from_slice::<AudienceChange>(p).ok())
        {
            self.changes.push(change.into());
        }
    }
}

/// Changes grouped by profile, each profile's in order.
pub fn by_profile(changes: &[Change]) -> BTreeMap<String, Vec<Change>> {
    let mut out: BTreeMap<String, Vec<Change>> = BTreeMap::new();
    for c in changes {
        out.entry(c.profile_id.clone()).or_default().push(c.clone());
    }
    out
}

/// Whether `visitor` (of the demo journey) has entered `audience`.
pub fn entered(changes: &[Change], visitor: &str, audience: &str) -> bool {
    let user = format!("user-{visitor}");
    changes.iter().any(|c| {
        c.audience == audience
            && c.action == "entered"
            && c.identifiers
                .get("user_id")
                .is_some_and(|u| u.contains(&user))
    })
}

/// Kafka's murmur2 (the Java client's default partitioner, librdkafka's
/// `murmur2_random` for keyed records).
pub fn murmur2(data: &[u8]) -> i32 {
    const M: i32 = 0x5bd1_e995;
    let length = data.len() as i32;
    let mut h: i32 = (0x9747_b28c_u32 as i32) ^ length;
    for chunk in data.chunks_exact(4) {
        let mut k = i32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= ((k as u32) >> 24) as i32;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = &data[data.len() & !3..];
    if tail.len() >= 3 {
        h ^= (tail[2] as i32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as i32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as i32;
        h = h.wrapping_mul(M);
    }
    h ^= ((h as u32) >> 13) as i32;
    h = h.wrapping_mul(M);
    h ^= ((h as u32) >> 15) as i32;
    h
}

/// The partition Kafka's default partitioner picks for `key`.
pub fn partition_of(key: &str, partitions: i32) -> i32 {
    (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions
}

/// A free TCP port on loopback.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A name no other test run uses (topic prefixes, groups).
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}{}x{}", std::process::id(), nanos % 1_000_000_000)
}

/// Wait until a process's `/readyz` answers 200.
pub fn wait_ready(
    admin: &str,
    timeout: Duration,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let deadline = Instant::now() + timeout;
    let client = reqwest::blocking::Client::new();
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("http://{admin}/readyz")).send() {
            if r.status().is_success() {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("{admin} not ready after {timeout:?}").into())
}

/// The demo config for a chain of processes on a real broker: `brokers`,
/// its own topic prefix and partitions, short consumer sessions (a killed
/// process's partitions move within seconds), a stdout destination and
/// the collector on `collector`.
pub fn chain_config(
    brokers: &str,
    prefix: &str,
    partitions: i32,
    collector: std::net::SocketAddr,
) -> String {
    cdp::config::DEMO_CONFIG
        .replace("brokers: localhost:9092", &format!("brokers: {brokers}"))
        .replace("topic_prefix: cdp", &format!("topic_prefix: {prefix}"))
        .replace("partitions: 4", &format!("partitions: {partitions}"))
        .replace(
            "tick_interval: 1s",
            "tick_interval: 1s\n  replication_factor: 1\n  properties:\n    consumer.session.timeout.ms: \"6000\"\n    consumer.heartbeat.interval.ms: \"500\"",
        )
        .replace(
            "destinations: []",
            &format!("destinations:\n  - {{id: out, type: stdout}}\ncollector:\n  listen: {collector}"),
        )
}

/// The last `lines` lines of `<dir>/<name>.log` for each process name,
/// each under a `--- name` heading: what a failed end-to-end test prints.
pub fn log_tails<'a>(
    dir: &std::path::Path,
    names: impl IntoIterator<Item = &'a str>,
    lines: usize,
) -> String {
    let mut s = String::new();
    for name in names {
        let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        s.push_str(&format!(
            "--- {name}\n{}\n",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    s
}
