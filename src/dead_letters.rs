//! `cdp dead-letters list|replay`: read the dead-letter topic
//! (`<p>.invalid`) by stage and reason, and put selected dead letters back
//! into their stage's input once the cause is fixed (a tracking plan that
//! was too strict, a destination that was down).
//!
//! A replayed record is the dead letter's key and bytes with its headers
//! minus every runtime `cdp-*` header (positions, epochs, the `cdp-dlq-*`
//! verdict: stale once replayed) except `cdp-source`, which validate needs,
//! plus `cdp-replayed-from: <topic>[partition]@offset`.
//!
//! Each dead letter is replayed once: after the broker acknowledged the
//! replayed record, a marker keyed by the dead letter's coordinates goes to
//! the compacted `<p>.invalid-replayed`, and every run skips what it names.
//! The window between the two acknowledgements is at-least-once: a crash
//! there replays that record again on the next run; validate drops such a
//! repeat by `messageId` within its dedupe window, and deliver's receivers
//! by delivery id. Replaying a `deliver` dead letter sends the change to
//! every destination of its audience again, not only the one that failed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context as _;
use cdp_pipeline::envelope;
use cdp_pipeline::{ClientFactory, Topics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

use crate::stages::Stage;

/// Header a replayed record carries: where its dead letter was.
pub const REPLAYED_FROM: &str = "cdp-replayed-from";
/// How long reading a topic to its end may take.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// One record of the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl DeadLetter {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// `<partition>@<offset>` on the dead-letter topic: how to name it.
    pub fn id(&self) -> String {
        format!("{}@{}", self.partition, self.offset)
    }

    pub fn stage(&self) -> Option<&str> {
        self.header(envelope::DLQ_STAGE)
    }

    pub fn reason(&self) -> Option<&str> {
        self.header(envelope::DLQ_REASON)
    }

    pub fn detail(&self) -> Option<&str> {
        self.header("cdp-dlq-detail")
    }

    /// The headers a replay keeps: the record's own, `cdp-source`; and for
    /// a failed delivery, the destination it failed at, so the replay goes
    /// to it alone ([`cdp_connectors::deliver::REPLAY_TO`]).
    fn replay_headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut kept: Vec<(String, Vec<u8>)> = self
            .headers
            .iter()
            .filter(|(k, _)| {
                !k.starts_with(envelope::RUNTIME_HEADER_PREFIX) || k == envelope::SOURCE
            })
            .cloned()
            .collect();
        if let Some(destination) = self.failed_destination() {
            kept.push((
                cdp_connectors::deliver::REPLAY_TO.to_string(),
                destination.into_bytes(),
            ));
        }
        kept
    }

    /// The destination a `deliver` dead letter failed at (its detail's
    /// `destination`).
    fn failed_destination(&self) -> Option<String> {
        if self.stage() != Some(Stage::Deliver.name()) {
            return None;
        }
        let detail: serde_json::Value = serde_json::from_str(self.detail()?).ok()?;
        detail["destination"].as_str().map(str::to_string)
    }
}

/// Which dead letters to act on; unset fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub stage: Option<String>,
    pub reason: Option<String>,
    /// `partition@offset` ids; empty means all.
    pub ids: Vec<String>,
}

impl Selection {
    /// The selected dead letters of `letters`; `Err` naming every id asked
    /// for with `--id` that is not a dead letter (a script replaying by id
    /// must not succeed having done nothing).
    pub fn select<'a>(&self, letters: &'a [DeadLetter]) -> anyhow::Result<Vec<&'a DeadLetter>> {
        if let Some(stage) = &self.stage {
            if !Stage::ALL.iter().any(|s| s.name() == stage) {
                let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
                anyhow::bail!("--stage {stage}: no such stage ({})", names.join(", "));
            }
        }
        let missing: Vec<&str> = self
            .ids
            .iter()
            .filter(|id| !letters.iter().any(|d| &d.id() == *id))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            anyhow::bail!(
                "no dead letter {} (ids are `partition@offset`, as `cdp dead-letters list` prints them)",
                missing.join(", ")
            );
        }
        // A named dead letter the other filters leave out is a mistake too.
        let filtered: Vec<String> = letters
            .iter()
            .filter(|d| self.ids.contains(&d.id()) && !self.matches(d))
            .map(|d| {
                format!(
                    "{} ({} {})",
                    d.id(),
                    d.stage().unwrap_or("?"),
                    d.reason().unwrap_or("?")
                )
            })
            .collect();
        if !filtered.is_empty() {
            anyhow::bail!(
                "--stage/--reason leave out the dead letters named by --id: {}",
                filtered.join(", ")
            );
        }
        Ok(letters.iter().filter(|d| self.matches(d)).collect())
    }

    pub fn matches(&self, d: &DeadLetter) -> bool {
        self.stage.as_deref().is_none_or(|s| d.stage() == Some(s))
            && self.reason.as_deref().is_none_or(|r| d.reason() == Some(r))
            && (self.ids.is_empty() || self.ids.contains(&d.id()))
    }
}

/// The input topic of the stage that wrote a dead letter.
pub fn input_topic(stage: &str, topics: &Topics) -> Option<String> {
    let stage = Stage::ALL.into_iter().find(|s| s.name() == stage)?;
    Some(match stage {
        Stage::Validate => topics.raw(),
        Stage::Identity => topics.valid(),
        Stage::Traits => topics.identified(),
        Stage::Audiences => topics.traits(),
        Stage::Deliver => topics.audiences(),
    })
}

/// The compacted topic of replay markers.
pub fn replay_log_topic(topics: &Topics) -> String {
    format!("{}-replayed", topics.invalid())
}

/// Every record of `topic` from the beginning to its current end: the
/// end each partition's fetch reports (`PartitionEOF`), not the listed
/// one, which tansu 0.6 answers short of the last records of a batch.
pub(crate) fn read_to_end(
    factory: &ClientFactory,
    topic: &str,
) -> anyhow::Result<Vec<rdkafka::message::OwnedMessage>> {
    let mut out = Vec::new();
    read_each(factory, topic, |m| out.push(m.detach()))?;
    Ok(out)
}

/// [`read_to_end`], handing each record to `each` as it is read instead
/// of keeping them all (a changelog of millions of records). It fails
/// when no record arrives for 60 s before the end, however long the
/// whole read takes.
pub(crate) fn read_each(
    factory: &ClientFactory,
    topic: &str,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> anyhow::Result<()> {
    let consumer = factory.reader(&reader_group(factory))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), READ_TIMEOUT)
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut reading = BTreeSet::new();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, READ_TIMEOUT)
            .with_context(|| format!("reading the end of {topic}[{p}]"))?;
        // An empty partition lists as empty on every broker; a listed end
        // is only too low on tansu, never too high.
        if high > low {
            reading.insert(p);
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
    }
    if reading.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl)?;
    let mut deadline = std::time::Instant::now() + READ_TIMEOUT;
    while !reading.is_empty() {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{topic}: no record for {READ_TIMEOUT:?} before its end");
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                reading.remove(&p);
            }
            Some(message) => {
                each(&message?);
                deadline = std::time::Instant::now() + READ_TIMEOUT;
            }
        }
    }
    Ok(())
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

/// Every dead letter on `<p>.invalid` (records without a stage header,
/// if any, are not dead letters and are left out).
pub fn read(factory: &ClientFactory) -> anyhow::Result<Vec<DeadLetter>> {
    let topic = factory.topics().invalid();
    let messages = read_to_end(factory, &topic)?;
    Ok(messages
        .into_iter()
        .map(|m| DeadLetter {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .filter(|d| d.stage().is_some())
        .collect())
}

/// The ids of the dead letters already replayed.
pub fn replayed(factory: &ClientFactory) -> anyhow::Result<BTreeSet<String>> {
    let topic = replay_log_topic(&factory.topics());
    Ok(read_to_end(factory, &topic)?
        .into_iter()
        .filter_map(|m| m.key().map(|k| String::from_utf8_lossy(k).into_owned()))
        .collect())
}

/// A group id of its own for one command's reader (never joined, nothing
/// committed), under the prefix so ACLs on `<p>.` cover it.
fn reader_group(factory: &ClientFactory) -> String {
    format!(
        "{}.dead-letters-{}",
        factory.config().topic_prefix,
        uuid_like()
    )
}

/// Whether `topic` exists (metadata of all topics: asking for one by name
/// could make a broker with auto-creation create it).
async fn topic_exists(factory: &ClientFactory, topic: &str) -> anyhow::Result<bool> {
    let consumer: BaseConsumer = factory.plain_consumer(&reader_group(factory))?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let metadata = consumer
            .fetch_metadata(None, READ_TIMEOUT)
            .context("reading topic metadata")?;
        Ok(metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none()))
    })
    .await?
}

/// What a replay did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Dead letters put back into their stage's input.
    pub replayed: Vec<String>,
    /// Selected but replayed by an earlier run.
    pub already_replayed: Vec<String>,
    /// Selected but without the original's bytes (too large for the
    /// broker): `id (original at topic[partition]@offset)`, to fetch from
    /// there while its retention lasts.
    pub without_bytes: Vec<String>,
}

/// Replay the selected dead letters into their stages' inputs, in topic
/// order, each once (see the module docs for the guarantee).
pub async fn replay(
    factory: &ClientFactory,
    selection: &Selection,
    dry_run: bool,
) -> anyhow::Result<ReplayReport> {
    let (letters, done) = {
        let f = factory.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> { Ok((read(&f)?, replayed(&f)?)) })
            .await??
    };
    let topics = factory.topics();
    let log = replay_log_topic(&topics);
    if !dry_run && !topic_exists(factory, &log).await? {
        let spec = cdp_pipeline::kafka::TopicSpec {
            name: log.clone(),
            partitions: 1,
            compacted: true,
        };
        // Best effort: a broker that refuses CreateTopics may auto-create.
        if let Err(e) = factory.create_topics(std::slice::from_ref(&spec)).await {
            tracing::warn!(topic = %log, error = %e, "cannot create the replay log; relying on auto-creation");
        }
    }
    let producer = factory.producer()?;
    let mut report = ReplayReport::default();
    for d in selection.select(&letters)? {
        let id = d.id();
        if done.contains(&id) {
            report.already_replayed.push(id);
            continue;
        }
        if d.header(cdp_pipeline::envelope::DLQ_DROPPED_BYTES)
            .is_some()
        {
            let at = d.header("cdp-dlq-input").unwrap_or("unknown");
            report
                .without_bytes
                .push(format!("{id} (original at {at})"));
            continue;
        }
        let stage = d.stage().unwrap_or_default();
        let input = input_topic(stage, &topics)
            .with_context(|| format!("dead letter {id}: unknown stage {stage:?}"))?;
        if !dry_run {
            let from = format!("{}[{}]@{}", topics.invalid(), d.partition, d.offset);
            let mut headers = OwnedHeaders::new();
            for (k, v) in d.replay_headers() {
                headers = headers.insert(Header {
                    key: &k,
                    value: Some(&v),
                });
            }
            headers = headers.insert(Header {
                key: REPLAYED_FROM,
                value: Some(from.as_bytes()),
            });
            let mut record = FutureRecord::to(&input).payload(&d.value).headers(headers);
            if let Some(k) = &d.key {
                record = record.key(k.as_slice());
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| anyhow::anyhow!("replaying {id} into {input}: {e}"))?;
            let marker =
                serde_json::json!({"replayed_to": input, "at": chrono::Utc::now().to_rfc3339()})
                    .to_string();
            producer
                .send(
                    FutureRecord::to(&log)
                        .key(id.as_bytes())
                        .payload(marker.as_bytes()),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| anyhow::anyhow!("marking {id} replayed in {log}: {e}"))?;
        }
        report.replayed.push(id);
    }
    Ok(report)
}

/// One line per dead letter, then counts by stage and reason.
pub fn render_list(letters: &[DeadLetter], replayed: &BTreeSet<String>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for d in letters {
        let (stage, reason) = (d.stage().unwrap_or("?"), d.reason().unwrap_or("?"));
        *counts.entry((stage, reason)).or_default() += 1;
        let mut detail = d.detail().unwrap_or("").to_string();
        if detail.len() > 160 {
            let cut = (0..=160)
                .rev()
                .find(|i| detail.is_char_boundary(*i))
                .unwrap_or(0);
            detail.truncate(cut);
            detail.push('…');
        }
        let state = if replayed.contains(&d.id()) {
            "replayed"
        } else {
            "-"
        };
        let _ = writeln!(
            out,
            "{:<12} {:<10} {:<24} {:<8} {detail}",
            d.id(),
            stage,
            reason,
            state
        );
    }
    let _ = writeln!(out, "\n{:<10} {:<24} count", "stage", "reason");
    for ((stage, reason), n) in counts {
        let _ = writeln!(out, "{stage:<10} {reason:<24} {n}");
    }
    out
}

/// One JSON object per line and dead letter, its detail whole (parsed when
/// it is JSON) and its record's key and value as text: for scripts, and
/// for reading every reason of a plan violation.
pub fn render_json(letters: &[DeadLetter], replayed: &BTreeSet<String>) -> String {
    let mut out = String::new();
    for d in letters {
        let detail = d.detail().map(|text| {
            serde_json::from_str::<serde_json::Value>(text)
                .unwrap_or_else(|_| serde_json::Value::String(text.to_string()))
        });
        let line = serde_json::json!({
            "id": d.id(),
            "stage": d.stage(),
            "reason": d.reason(),
            "replayed": replayed.contains(&d.id()),
            "detail": detail,
            "key": d.key.as_deref().map(String::from_utf8_lossy),
            "value": String::from_utf8_lossy(&d.value),
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reader_has_a_group_of_its_own_under_the_prefix() -> anyhow::Result<()> {
        let factory = ClientFactory::new(cdp_pipeline::KafkaConfig {
            topic_prefix: "shop".into(),
            ..Default::default()
        })?;
        let (a, b) = (reader_group(&factory), reader_group(&factory));
        assert!(a.starts_with("shop.dead-letters-"), "{a}");
        assert_ne!(a, b);
        Ok(())
    }

    fn letter(stage: &str, reason: &str, offset: i64) -> DeadLetter {
        DeadLetter {
            partition: 1,
            offset,
            key: Some(b"k".to_vec()),
            value: b"{}".to_vec(),
            headers: vec![
                (envelope::SOURCE.into(), b"web".to_vec()),
                (envelope::ORIGIN.into(), b"raw:0".to_vec()),
                (envelope::POSITION.into(), b"3".to_vec()),
                (envelope::DLQ_STAGE.into(), stage.as_bytes().to_vec()),
                (envelope::DLQ_REASON.into(), reason.as_bytes().to_vec()),
                ("cdp-dlq-detail".into(), br#"{"source":"web"}"#.to_vec()),
                ("traceparent".into(), b"00-abc".to_vec()),
            ],
        }
    }

    #[test]
    fn a_failed_delivery_is_replayed_to_its_destination_only() {
        let mut d = letter("deliver", "delivery_failed", 4);
        d.headers.retain(|(k, _)| k != "cdp-dlq-detail");
        d.headers.push((
            "cdp-dlq-detail".into(),
            br#"{"destination":"crm","error":"HTTP 500"}"#.to_vec(),
        ));
        let to: Vec<Vec<u8>> = d
            .replay_headers()
            .into_iter()
            .filter(|(k, _)| k == cdp_connectors::deliver::REPLAY_TO)
            .map(|(_, v)| v)
            .collect();
        assert_eq!(to, vec![b"crm".to_vec()]);
        // Other stages' dead letters go back whole.
        let v = letter("validate", "plan_violation", 5);
        assert!(v
            .replay_headers()
            .iter()
            .all(|(k, _)| k != cdp_connectors::deliver::REPLAY_TO));
    }

    /// Why selecting by `stage` and `ids` among `letters` fails, if it does.
    fn refusal(stage: &str, ids: &[&str], letters: &[DeadLetter]) -> Option<String> {
        let selection = Selection {
            stage: Some(stage.into()),
            reason: None,
            ids: ids.iter().map(|id| id.to_string()).collect(),
        };
        selection.select(letters).err().map(|e| e.to_string())
    }

    #[test]
    fn a_named_dead_letter_the_filters_leave_out_is_an_error() {
        let letters = [letter("deliver", "delivery_failed", 3)];
        assert_eq!(
            refusal("validate", &["1@3"], &letters).as_deref(),
            Some("--stage/--reason leave out the dead letters named by --id: 1@3 (deliver delivery_failed)")
        );
    }

    #[test]
    fn a_stage_that_does_not_exist_is_an_error() {
        let letters = [letter("validate", "plan_violation", 1)];
        assert_eq!(
            refusal("bogus", &[], &letters).as_deref(),
            Some("--stage bogus: no such stage (validate, identity, traits, audiences, deliver)")
        );
    }

    #[test]
    fn json_lines_carry_the_whole_detail() -> Result<(), serde_json::Error> {
        let mut long = letter("validate", "plan_violation", 7);
        let reasons: Vec<serde_json::Value> = (0..20)
            .map(|i| serde_json::json!({"pointer": format!("/properties/p{i}"), "reason": "x"}))
            .collect();
        let detail = serde_json::json!({"violations": reasons});
        long.headers.retain(|(k, _)| k != "cdp-dlq-detail");
        long.headers
            .push(("cdp-dlq-detail".into(), detail.to_string().into_bytes()));
        let text = render_json(&[long], &BTreeSet::from(["1@7".to_string()]));
        let line: serde_json::Value = serde_json::from_str(text.trim_end())?;
        assert_eq!(line["id"], "1@7");
        assert_eq!(line["replayed"], true);
        assert_eq!(line["detail"], detail, "not cut as the table cuts it");
        assert_eq!(line["value"], "{}");
        Ok(())
    }

    #[test]
    fn a_replay_keeps_the_source_and_foreign_headers_only() {
        let kept: Vec<String> = letter("validate", "plan_violation", 5)
            .replay_headers()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            kept,
            vec![envelope::SOURCE.to_string(), "traceparent".into()]
        );
    }

    #[test]
    fn selection_by_stage_reason_and_id() {
        let d = letter("validate", "plan_violation", 5);
        assert!(Selection::default().matches(&d));
        let by = |stage: Option<&str>, reason: Option<&str>, ids: &[&str]| Selection {
            stage: stage.map(str::to_string),
            reason: reason.map(str::to_string),
            ids: ids.iter().map(|s| s.to_string()).collect(),
        };
        assert!(by(Some("validate"), Some("plan_violation"), &["1@5"]).matches(&d));
        assert!(!by(Some("deliver"), None, &[]).matches(&d));
        assert!(!by(None, Some("spec_violation"), &[]).matches(&d));
        assert!(!by(None, None, &["1@6"]).matches(&d));
    }

    #[test]
    fn every_stage_replays_into_its_input() {
        let t = Topics::new("cdp");
        assert_eq!(input_topic("validate", &t).as_deref(), Some("cdp.raw"));
        assert_eq!(input_topic("identity", &t).as_deref(), Some("cdp.valid"));
        assert_eq!(input_topic("traits", &t).as_deref(), Some("cdp.identified"));
        assert_eq!(input_topic("audiences", &t).as_deref(), Some("cdp.traits"));
        assert_eq!(input_topic("deliver", &t).as_deref(), Some("cdp.audiences"));
        assert_eq!(input_topic("collect", &t), None);
        assert_eq!(replay_log_topic(&t), "cdp.invalid-replayed");
    }

    #[test]
    fn the_list_counts_by_stage_and_reason() {
        let letters = vec![
            letter("validate", "plan_violation", 1),
            letter("validate", "plan_violation", 2),
            letter("deliver", "delivery_failed", 3),
        ];
        let replayed = ["1@2".to_string()].into_iter().collect();
        let text = render_list(&letters, &replayed);
        assert!(
            text.contains("validate   plan_violation           2"),
            "{text}"
        );
        assert!(
            text.contains("deliver    delivery_failed          1"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("1@2") && l.contains("replayed")),
            "{text}"
        );
    }
}
