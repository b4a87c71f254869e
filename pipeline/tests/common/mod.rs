//! What the runtime's integration tests share: one stage's topics on
//! librdkafka's mock cluster (in process, real TCP) and a client factory
//! for it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cdp_pipeline::{ClientFactory, KafkaConfig};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A mock cluster with the topics of stage `stage` under prefix `t`, a
/// factory for them and a producer.
pub struct MockStage {
    /// The cluster (some tests make its brokers fail; all keep it alive).
    #[allow(dead_code)]
    pub mock: MockCluster<'static, DefaultProducerContext>,
    pub factory: ClientFactory,
    pub producer: FutureProducer,
    /// The state directory, when the setup made one (kept until dropped).
    pub _dir: Option<tempfile::TempDir>,
}

/// How a test wants its stage's cluster.
pub struct MockOptions<'a> {
    /// The stage's name: its changelog is `t.<stage>-changelog`.
    pub stage: &'a str,
    pub partitions: i32,
    /// Where task state lives; a fresh temporary directory when `None`.
    pub state_dir: Option<PathBuf>,
    /// `kafka.max_batch`; the default when `None`.
    pub max_batch: Option<usize>,
    /// `kafka.properties` besides the short session timeout every test
    /// uses (6 s, heartbeats every 500 ms).
    pub properties: &'a [(&'a str, &'a str)],
}

pub fn mock_stage(o: MockOptions<'_>) -> Result<MockStage, BoxError> {
    let dir = match &o.state_dir {
        Some(_) => None,
        None => Some(tempfile::tempdir()?),
    };
    let state_dir = match (&o.state_dir, &dir) {
        (Some(path), _) => path.display().to_string(),
        (None, Some(d)) => d.path().display().to_string(),
        (None, None) => return Err("no state directory".into()),
    };
    let mock = MockCluster::new(1)?;
    let properties: BTreeMap<String, String> = [
        ("consumer.session.timeout.ms", "6000"),
        ("consumer.heartbeat.interval.ms", "500"),
    ]
    .iter()
    .chain(o.properties)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let defaults = KafkaConfig::default();
    let config = KafkaConfig {
        brokers: mock.bootstrap_servers(),
        topic_prefix: "t".into(),
        partitions: o.partitions,
        state_dir,
        tick_interval: cdp_pipeline::Span::from_millis(100),
        max_batch: o.max_batch.unwrap_or(defaults.max_batch),
        properties,
        ..defaults
    };
    let changelog = format!("t.{}-changelog", o.stage);
    for t in ["t.in", "t.out", "t.invalid", changelog.as_str()] {
        mock.create_topic(t, o.partitions, 1)?;
    }
    let factory = ClientFactory::new(config)?;
    let producer = factory.producer()?;
    Ok(MockStage {
        mock,
        factory,
        producer,
        _dir: dir,
    })
}

/// A stage thread started by a test.
pub type StageJoin = std::thread::JoinHandle<Result<(), cdp_pipeline::runtime::RuntimeError>>;

/// Wait (without blocking the runtime) for a stage thread to end by
/// itself; `None` if it is still running after `within`.
#[allow(dead_code)]
pub async fn ended(join: StageJoin, within: std::time::Duration) -> Option<Result<(), String>> {
    let deadline = std::time::Instant::now() + within;
    while !join.is_finished() {
        if std::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Some(match join.join() {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("stage panicked".into()),
    })
}

/// A plain consumer of `t.out` partition 0 from its beginning.
#[allow(dead_code)]
pub fn out_reader(factory: &ClientFactory) -> Option<rdkafka::consumer::BaseConsumer> {
    use rdkafka::consumer::Consumer;
    let c: rdkafka::consumer::BaseConsumer = factory.plain_consumer("reader").ok()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset("t.out", 0, rdkafka::Offset::Beginning)
        .ok()?;
    c.assign(&tpl).ok()?;
    Some(c)
}

/// The text of the first header called `name` of a consumed record.
#[allow(dead_code)]
pub fn header_text<M: rdkafka::message::Message>(m: &M, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    m.headers()?
        .iter()
        .find(|h| h.key == name)?
        .value
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
