//! The one place Kafka clients are built, and the names of every topic.
//!
//! Every client gets the `kafka.properties` pass-through (security.protocol,
//! sasl.mechanisms, ssl.ca.location, …) and the secrets named in
//! `kafka.secret_env`, read from the environment and never logged.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer, ProducerContext, ThreadedProducer};
use serde::{Deserialize, Serialize};

use crate::duration::Span;

/// Delivery guarantee of the stages.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Outputs deduplicated by position downstream; state, progress and
    /// dedupe positions committed together after outputs are acknowledged.
    #[default]
    EffectivelyOnce,
    /// No dedupe on consume, one produce round-trip per batch: faster, and
    /// a crash may repeat outputs.
    AtLeastOnce,
}

/// The `kafka` section of the config file.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Prefix of every topic name: `<prefix>.raw`, `<prefix>.valid`, ….
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// Partitions of every topic `cdp topics create` makes. The unit of
    /// parallelism of every stage.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor for created topics (-1: the broker's default).
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// `effectively_once` or `at_least_once`.
    #[serde(default)]
    pub guarantee: Guarantee,
    /// How often each task writes a tick record into its input partition.
    #[serde(default = "default_tick")]
    pub tick_interval: Span,
    /// Most records one poll round takes, over all of the instance's
    /// partitions; each partition's share is one task batch (one commit).
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Largest record (key, value and headers) a stage produces, checked
    /// before it is produced. An output over it goes to the dead-letter
    /// topic with reason `record_too_large` in place of its input's
    /// outputs; a state (changelog) record over it stops the stage naming
    /// the key. Keep it at or below the broker's `message.max.bytes`.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// Where task state lives (RocksDB, one directory per task).
    #[serde(default = "default_state_dir")]
    pub state_dir: String,
    /// `min.compaction.lag.ms` of changelog topics: how long uncommitted
    /// changelog records keep older committed values from compaction.
    #[serde(default = "default_compaction_lag")]
    pub changelog_min_compaction_lag: Span,
    /// librdkafka properties applied to every client, e.g.
    /// `security.protocol: SASL_SSL`, `sasl.mechanisms: SCRAM-SHA-512`.
    /// Prefix with `producer.` or `consumer.` to set one kind of client
    /// only (`consumer.session.timeout.ms: "6000"`).
    #[serde(default)]
    #[schemars(schema_with = "librdkafka_properties_schema")]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties whose values come from environment variables,
    /// e.g. `sasl.password: KAFKA_PASSWORD`. Never logged.
    #[serde(default)]
    pub secret_env: BTreeMap<String, String>,
}

/// `properties` as YAML reads them: any scalar value becomes the text
/// librdkafka gets, so `linger.ms: 5` and `enable.idempotence: true` are
/// as good as quoted strings.
fn librdkafka_properties_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "additionalProperties": { "type": ["string", "number", "boolean"] }
    })
}

fn default_brokers() -> String {
    "localhost:9092".into()
}
fn default_prefix() -> String {
    "cdp".into()
}
const fn default_partitions() -> i32 {
    8
}
const fn default_replication() -> i32 {
    -1
}
const fn default_tick() -> Span {
    Span::from_secs(1)
}
const fn default_max_batch() -> usize {
    // 20000: a drain of the whole chain on one tansu broker is ~12% faster
    // than with 5000 and the broker spends ~25% less CPU (fewer
    // partition-batches per event: every round writes each task's changelog
    // and marker), for ~40 MB more peak RSS per stage (docs/performance.md,
    // "Rounds of 20,000"); 5000 was 45-55% faster than 1000. A round is
    // only as big as what is waiting, so latency at low load does not
    // change.
    20000
}
const fn default_max_record_bytes() -> usize {
    // Kafka's default `message.max.bytes` (1048588) less room for the
    // record batch overhead.
    1_000_000
}
fn default_state_dir() -> String {
    "/var/lib/cdp".into()
}
const fn default_compaction_lag() -> Span {
    Span::from_secs(24 * 3600)
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: default_brokers(),
            topic_prefix: default_prefix(),
            partitions: default_partitions(),
            replication_factor: default_replication(),
            guarantee: Guarantee::default(),
            tick_interval: default_tick(),
            max_batch: default_max_batch(),
            max_record_bytes: default_max_record_bytes(),
            state_dir: default_state_dir(),
            changelog_min_compaction_lag: default_compaction_lag(),
            properties: BTreeMap::new(),
            secret_env: BTreeMap::new(),
        }
    }
}

/// Partitions of `<p>.valid`, the identity stage's input: one, so that one
/// task applies every graph mutation in one order (docs/ARCHITECTURE.md,
/// "Identity: one serial graph").
pub const SERIAL_PARTITIONS: i32 = 1;

/// Topic names derived from the prefix.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Topics {
            prefix: prefix.to_string(),
        }
    }
    pub fn raw(&self) -> String {
        format!("{}.raw", self.prefix)
    }
    pub fn valid(&self) -> String {
        format!("{}.valid", self.prefix)
    }
    pub fn invalid(&self) -> String {
        format!("{}.invalid", self.prefix)
    }
    pub fn identified(&self) -> String {
        format!("{}.identified", self.prefix)
    }
    pub fn traits(&self) -> String {
        format!("{}.traits", self.prefix)
    }
    pub fn audiences(&self) -> String {
        format!("{}.audiences", self.prefix)
    }
    /// Identity's profile snapshots (compacted, keyed by profile id).
    pub fn profiles(&self) -> String {
        format!("{}.profiles", self.prefix)
    }
    pub fn changelog(&self, stage: &str) -> String {
        format!("{}.{stage}-changelog", self.prefix)
    }
}

/// One topic `cdp topics create` makes.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub compacted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("environment variable {var} (for kafka property {property}) is not set")]
    MissingSecret { property: String, var: String },
    /// The client's error, said in full here and not again as a cause
    /// (an error chain printed it twice).
    #[error("kafka client: {0}")]
    Kafka(KafkaError),
    #[error("topic {0} does not exist: create it with `cdp topics create`")]
    UnknownTopic(String),
    #[error("creating topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

/// A reader's client context: reaching a partition's end is what a reader
/// waits for, not an error to log (librdkafka also reports it as a global
/// error, which the default context logs at error level).
pub struct EndIsNoError;

impl rdkafka::ClientContext for EndIsNoError {
    fn error(&self, error: KafkaError, reason: &str) {
        let end = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !end {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for EndIsNoError {}

impl From<KafkaError> for ClientError {
    fn from(e: KafkaError) -> Self {
        ClientError::Kafka(e)
    }
}

/// How long [`ClientFactory::producer_ready_for`] waits for the broker to
/// describe the topic.
pub const READY_PATIENCE: Duration = Duration::from_secs(10);

/// Builds every Kafka client of the process from the `kafka` section.
#[derive(Clone)]
pub struct ClientFactory {
    config: KafkaConfig,
    secrets: BTreeMap<String, String>,
}

impl std::fmt::Debug for ClientFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs: print their property names only.
        f.debug_struct("ClientFactory")
            .field("brokers", &self.config.brokers)
            .field(
                "secret_properties",
                &self.secrets.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The session of a static member (`--instance-id`): how long its
/// partitions wait for it to come back before they move.
pub const STATIC_SESSION_TIMEOUT_MS: &str = "45000";

impl ClientFactory {
    pub fn new(config: KafkaConfig) -> Result<Self, ClientError> {
        let mut secrets = BTreeMap::new();
        for (property, var) in &config.secret_env {
            let value = std::env::var(var).map_err(|_| ClientError::MissingSecret {
                property: property.clone(),
                var: var.clone(),
            })?;
            secrets.insert(property.clone(), value);
        }
        Ok(ClientFactory { config, secrets })
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    pub fn topics(&self) -> Topics {
        Topics::new(&self.config.topic_prefix)
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.config.brokers);
        // Small records, latency-bound chain: never wait to coalesce packets.
        c.set("socket.nagle.disable", "true");
        // `producer.*` and `consumer.*` properties apply to that kind only.
        for (k, v) in self.config.properties.iter().chain(self.secrets.iter()) {
            if !k.starts_with("producer.") && !k.starts_with("consumer.") {
                c.set(k, v);
            }
        }
        c
    }

    /// An idempotent producer that waits for all in-sync replicas.
    pub fn producer(&self) -> Result<FutureProducer, ClientError> {
        Ok(self.producer_config().create()?)
    }

    /// [`ClientFactory::producer`], once the broker has described `topic`
    /// to it (at most [`READY_PATIENCE`]).
    ///
    /// An idempotent librdkafka producer asks for its producer id on a
    /// 500 ms timer unless a broker is already up, and holds every record
    /// until it has one: a tool that sends as soon as it starts (`cdp
    /// loadgen`, a benchmark hop) would see its first records wait half a
    /// second, with their timestamps (set at send) counting the wait as
    /// latency. One metadata round trip first brings the broker up and the
    /// id comes at once (docs/performance.md, "The release build, the first
    /// record of a producer"). Blocking: call it off async tasks. The
    /// stages need none of this, they restore their tasks before they
    /// produce.
    pub fn producer_ready_for(&self, topic: &str) -> Result<FutureProducer, ClientError> {
        let producer = self.producer()?;
        let metadata = producer
            .client()
            .fetch_metadata(Some(topic), READY_PATIENCE)?;
        let described = metadata
            .topics()
            .iter()
            .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
        if !described {
            return Err(ClientError::UnknownTopic(topic.to_string()));
        }
        Ok(producer)
    }

    /// [`ClientFactory::producer`] with delivery reports going to
    /// `context` instead of a future per record (the stage runtime counts
    /// a batch's acknowledgements in one place).
    pub fn producer_with_context<C: ProducerContext + 'static>(
        &self,
        context: C,
    ) -> Result<ThreadedProducer<C>, ClientError> {
        Ok(self.producer_config().create_with_context(context)?)
    }

    fn producer_config(&self) -> ClientConfig {
        let mut c = self.base();
        // Idempotence: broker-side dedupe of the producer's own retries, so a
        // retried send never duplicates or reorders within a partition.
        c.set("enable.idempotence", "true");
        c.set("acks", "all");
        c.set("linger.ms", "2");
        // Java-compatible partitioning, so keys land where Kafka Streams,
        // Java producers and our own re-keying stages put them.
        c.set("partitioner", "murmur2_random");
        c.set("message.timeout.ms", "30000");
        // Bound the client's send queue (librdkafka defaults to 1 GiB): a
        // full queue makes the collector answer 503 instead of growing.
        c.set("queue.buffering.max.kbytes", "131072");
        // Properties set in the config win over our defaults.
        for (k, v) in self.config.properties.iter() {
            if k.starts_with("producer.") {
                c.set(k.trim_start_matches("producer."), v);
            }
        }
        c
    }

    /// The group consumer of a stage. Offsets live in the task's state
    /// store; the group offset is committed only as a lag indicator.
    pub fn stage_consumer<C: ConsumerContext>(
        &self,
        group: &str,
        instance_id: Option<&str>,
        context: C,
    ) -> Result<BaseConsumer<C>, ClientError> {
        let mut c = self.base();
        c.set("group.id", group);
        // Progress is committed by the runtime with the state, never by the
        // client on a timer.
        c.set("enable.auto.commit", "false");
        c.set("enable.auto.offset.store", "false");
        c.set("auto.offset.reset", "earliest");
        c.set("session.timeout.ms", "10000");
        c.set("heartbeat.interval.ms", "1000");
        c.set("partition.assignment.strategy", "range");
        // Real time over request economy: an idle fetch returns after 10 ms
        // instead of librdkafka's 500 ms, so each hop of the chain adds
        // milliseconds, not half a second.
        c.set("fetch.wait.max.ms", "10");
        // A stage started before its input topic exists (a supervisor that
        // starts everything before `cdp topics create`) sees the topic
        // within 10 s of its creation, not at librdkafka's 5-minute
        // metadata refresh. One small metadata request per 10 s.
        c.set("topic.metadata.refresh.interval.ms", "10000");
        if let Some(id) = instance_id {
            // Static membership: a restarted pod gets its partitions (and so
            // its local state) back without a rebalance, if it is back
            // within the session: 45 s (Kafka's own default since 3.0)
            // covers a pod's replacement, where 10 s rarely does.
            c.set("group.instance.id", id);
            c.set("session.timeout.ms", STATIC_SESSION_TIMEOUT_MS);
        }
        for (k, v) in self.config.properties.iter() {
            if k.starts_with("consumer.") {
                c.set(k.trim_start_matches("consumer."), v);
            }
        }
        Ok(c.create_with_context(context)?)
    }

    /// A consumer outside any group, for reading changelogs on restore.
    /// Its `group.id` (`<p>.restore`, never joined, nothing committed)
    /// carries the prefix, so ACLs on `<p>.` cover it.
    pub fn restore_consumer(&self) -> Result<BaseConsumer, ClientError> {
        Ok(self.restore_config().create()?)
    }

    fn restore_config(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", format!("{}.restore", self.config.topic_prefix));
        c.set("enable.auto.commit", "false");
        c.set("enable.partition.eof", "true");
        c.set("auto.offset.reset", "earliest");
        c
    }

    /// A plain consumer that reports the end of each assigned partition
    /// (`KafkaError::PartitionEOF`): the end a fetch answers, which is
    /// exact where a broker's `ListOffsets` is not (tansu 0.6, see
    /// README): for tools that read a topic to its end.
    pub fn reader(&self, group: &str) -> Result<BaseConsumer<EndIsNoError>, ClientError> {
        Ok(self
            .plain_config(group)
            .set("enable.partition.eof", "true")
            .create_with_context(EndIsNoError)?)
    }

    /// A plain consumer (no state, no offsets), for tests and tools.
    pub fn plain_consumer(&self, group: &str) -> Result<BaseConsumer, ClientError> {
        Ok(self.plain_config(group).create()?)
    }

    /// A consumer outside the stages' groups: no commits, from the start.
    fn plain_config(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group);
        c.set("enable.auto.commit", "false");
        c.set("auto.offset.reset", "earliest");
        c
    }

    pub fn admin(&self) -> Result<AdminClient<DefaultClientContext>, ClientError> {
        Ok(self.base().create()?)
    }

    /// Every topic of the pipeline with its settings. `stateful_stages`
    /// names each stage that keeps a store with the partition count of its
    /// input (its changelog has one partition per input partition).
    /// `<p>.valid` has [`SERIAL_PARTITIONS`] partition: it is the serial log
    /// the identity graph is built from.
    pub fn topic_specs(&self, stateful_stages: &[(&str, i32)]) -> Vec<TopicSpec> {
        let t = self.topics();
        let p = self.config.partitions;
        let data = |name: String, partitions: i32, compacted: bool| TopicSpec {
            name,
            partitions,
            compacted,
        };
        let mut specs = vec![
            data(t.raw(), p, false),
            data(t.valid(), SERIAL_PARTITIONS, false),
            data(t.invalid(), p, false),
            data(t.identified(), p, false),
            data(t.traits(), p, false),
            data(t.audiences(), p, false),
            data(t.profiles(), p, true),
        ];
        for (stage, partitions) in stateful_stages {
            specs.push(data(t.changelog(stage), *partitions, true));
        }
        specs
    }

    /// Create topics; ones that already exist are left as they are.
    pub async fn create_topics(&self, specs: &[TopicSpec]) -> Result<Vec<String>, ClientError> {
        let admin = self.admin()?;
        let lag = self
            .config
            .changelog_min_compaction_lag
            .millis()
            .to_string();
        let tombstone_retention = crate::changelog::TOMBSTONE_RETENTION_MS.to_string();
        let replication = self.config.replication_factor;
        let topics: Vec<NewTopic<'_>> = specs
            .iter()
            .map(|s| {
                let t = NewTopic::new(&s.name, s.partitions, TopicReplication::Fixed(replication));
                if s.compacted {
                    t.set("cleanup.policy", "compact")
                        .set("min.compaction.lag.ms", &lag)
                        // Restores trust local copies younger than this.
                        .set("delete.retention.ms", &tombstone_retention)
                } else {
                    t
                }
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin.create_topics(topics.iter(), &opts).await?;
        let mut created = Vec::new();
        for r in results {
            match r {
                Ok(name) => created.push(name),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(ClientError::CreateTopic { topic, code }),
            }
        }
        Ok(created)
    }
}

/// The high watermark of the latest fetch answer for `topic[partition]`,
/// as librdkafka caches it (`rd_kafka_get_watermark_offsets`, which
/// rust-rdkafka does not wrap); `None` before any answer.
pub fn fetched_high_watermark<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `client` lives, the topic
    // is a NUL-terminated string that outlives the call, and librdkafka
    // only writes the two offsets it is given.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            client.native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// How long a round waits for its last delivery report. librdkafka reports
/// every record within `message.timeout.ms` (30 s by default), so this only
/// bounds a report that never comes.
pub const ROUND_PATIENCE: Duration = Duration::from_secs(600);

/// Send what `producer` holds now instead of after `linger.ms`, and wait (at
/// most `patience`) until every record it holds has its delivery report:
/// for a sender that has queued a whole round and waits for its acks, where
/// lingering could only delay them. This is librdkafka's flush, whose wait
/// rust-rdkafka's `flush` turns into polls of at least 100 ms. A timeout is
/// left to the caller's own wait for the reports to find.
pub fn send_now<C: ProducerContext, P: Producer<C>>(producer: &P, patience: Duration) {
    let ms = i32::try_from(patience.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the client pointer is valid while `producer` lives, and
    // rd_kafka_flush is thread-safe; its only effect is sending at once and
    // waiting (serving delivery reports the producer's thread would serve).
    unsafe {
        rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Producers writing to `<p>.raw` pick their codec: each one is read
    /// back (without zstd built in, a zstd batch stalled its partition).
    #[test]
    fn every_codec_a_producer_may_use_is_read() -> Result<(), Box<dyn std::error::Error>> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        use rdkafka::Message;

        let mock = rdkafka::mocking::MockCluster::new(1)?;
        mock.create_topic("codecs", 1, 1)?;
        let codecs = ["none", "gzip", "snappy", "lz4", "zstd"];
        for codec in codecs {
            let producer: BaseProducer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", mock.bootstrap_servers())
                .set("compression.type", codec)
                .create()?;
            let payload = format!("{codec} {}", "x".repeat(500));
            producer
                .send(BaseRecord::<(), _>::to("codecs").payload(&payload))
                .map_err(|(e, _)| e)?;
            producer.flush(Duration::from_secs(10))?;
        }
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("group.id", "codecs")
            .set("auto.offset.reset", "earliest")
            .create()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset("codecs", 0, rdkafka::Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let mut read = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while read.len() < codecs.len() && std::time::Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m?;
                let text = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                read.push(text.split(' ').next().unwrap_or_default().to_string());
            }
        }
        assert_eq!(read, codecs);
        Ok(())
    }

    #[test]
    fn secrets_come_from_the_environment_and_stay_out_of_debug_output() {
        let mut config = KafkaConfig::default();
        config.secret_env.insert(
            "sasl.password".into(),
            "CDP_TEST_SECRET_THAT_IS_NOT_SET".into(),
        );
        let err = ClientFactory::new(config.clone())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("CDP_TEST_SECRET_THAT_IS_NOT_SET"), "{err}");
        config.secret_env.clear();
        config
            .secret_env
            .insert("sasl.password".into(), "PATH".into());
        let factory = ClientFactory::new(config).ok();
        let debug = format!("{factory:?}");
        assert!(debug.contains("sasl.password"));
        assert!(!debug.contains(&std::env::var("PATH").unwrap_or_default()));
    }

    #[test]
    fn changelogs_are_compacted_and_data_topics_are_not() {
        let f = ClientFactory::new(KafkaConfig::default()).ok();
        let specs = f
            .map(|f| f.topic_specs(&[("traits", 8), ("identity", 1)]))
            .unwrap_or_default();
        assert_eq!(specs.len(), 9);
        assert!(specs
            .iter()
            .any(|s| s.name == "cdp.traits-changelog" && s.compacted && s.partitions == 8));
        assert!(specs
            .iter()
            .any(|s| s.name == "cdp.identity-changelog" && s.compacted && s.partitions == 1));
        assert!(specs
            .iter()
            .any(|s| s.name == "cdp.valid" && !s.compacted && s.partitions == SERIAL_PARTITIONS));
        assert!(specs
            .iter()
            .any(|s| s.name == "cdp.profiles" && s.compacted && s.partitions == 8));
        assert!(specs.iter().filter(|s| s.compacted).count() == 3);
    }

    #[test]
    fn the_restore_consumers_group_carries_the_prefix_for_acls() {
        let f = ClientFactory::new(KafkaConfig {
            topic_prefix: "shop".into(),
            ..KafkaConfig::default()
        })
        .ok();
        let group = f.map(|f| f.restore_config().get("group.id").map(str::to_owned));
        assert_eq!(group, Some(Some("shop.restore".to_string())));
    }
}
