//! `cdp topics check` (the Helm chart's `helm test` pod) as users run it:
//! the built binary against a Kafka-protocol broker — librdkafka's mock
//! cluster, in this process but on a real TCP port. Topics are created in
//! process (the mock cluster takes no CreateTopics from another process).

use std::path::PathBuf;
use std::process::{Command, Output};

use cdp::stages::Stage;
use cdp_pipeline::{ClientFactory, KafkaConfig};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A mock cluster on a real port, its bootstrap address, and a config for
/// it (topic prefix `prefix`, 2 partitions) in a directory of its own.
struct Setup {
    mock: MockCluster<'static, DefaultProducerContext>,
    brokers: String,
    _dir: tempfile::TempDir,
    config: PathBuf,
}

fn cluster_and_config(prefix: &str) -> Result<Setup, Box<dyn std::error::Error>> {
    let mock = MockCluster::new(1)?;
    let brokers = mock.bootstrap_servers();
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("cdp.yaml");
    std::fs::write(
        &config,
        format!("kafka:\n  brokers: {brokers}\n  topic_prefix: {prefix}\n  partitions: 2\n"),
    )?;
    Ok(Setup {
        mock,
        brokers,
        _dir: dir,
        config,
    })
}

#[test]
fn topics_check_names_the_missing_topics_and_passes_once_they_exist() -> TestResult {
    let Setup {
        mock,
        brokers,
        _dir,
        config,
    } = cluster_and_config("hc")?;
    let check = || -> std::io::Result<Output> {
        Command::new(env!("CARGO_BIN_EXE_cdp"))
            .args(["topics", "check", "--config"])
            .arg(&config)
            .env_remove("CDP_LOG_FORMAT")
            .output()
    };
    let text = |o: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    let none = check()?;
    assert!(
        !none.status.success(),
        "passed with no topics: {}",
        text(&none)
    );
    assert!(text(&none).contains("missing  hc.raw"), "{}", text(&none));
    assert!(text(&none).contains("topics missing"), "{}", text(&none));

    // Every topic of the pipeline but one: the check names exactly that one.
    let factory = ClientFactory::new(KafkaConfig {
        brokers: brokers.clone(),
        topic_prefix: "hc".into(),
        partitions: 2,
        ..KafkaConfig::default()
    })?;
    let specs = factory.topic_specs(&Stage::changelogs(factory.config().partitions));
    let (last, rest) = specs.split_last().ok_or("no topics")?;
    for s in rest {
        mock.create_topic(&s.name, s.partitions, 1)?;
    }
    let partial = check()?;
    let out = text(&partial);
    assert!(!partial.status.success(), "{out}");
    assert_eq!(out.matches("missing  ").count(), 1, "{out}");
    assert!(out.contains(&format!("missing  {}", last.name)), "{out}");
    assert!(out.contains("exists   hc.audiences partitions=2"), "{out}");

    mock.create_topic(&last.name, last.partitions, 1)?;
    let all = check()?;
    assert!(all.status.success(), "{}", text(&all));
    assert!(!text(&all).contains("missing"), "{}", text(&all));
    assert!(!text(&all).contains("note:"), "{}", text(&all));

    // kafka.partitions raised after the topics were made: noted, not failed.
    let raised = std::fs::read_to_string(&config)?.replace("partitions: 2", "partitions: 8");
    std::fs::write(&config, raised)?;
    let noted = check()?;
    assert!(noted.status.success(), "{}", text(&noted));
    assert!(
        text(&noted).contains("note: hc.raw has 2 partitions and kafka.partitions says 8"),
        "{}",
        text(&noted)
    );
    Ok(())
}

/// `cdp topics sizes` counts what each topic holds (the benchmark reads it
/// to say where the broker's records come from).
#[test]
fn topics_sizes_counts_each_topics_records_and_names_the_missing() -> TestResult {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

    let Setup {
        mock,
        brokers,
        _dir,
        config,
    } = cluster_and_config("hs")?;
    mock.create_topic("hs.raw", 2, 1)?;
    mock.create_topic("hs.valid", 1, 1)?;
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    for i in 0..7 {
        let key = format!("k{i}");
        producer
            .send(
                BaseRecord::to("hs.raw")
                    .key(&key)
                    .payload("{}")
                    .partition(i % 2),
            )
            .map_err(|(e, _)| e)?;
    }
    producer
        .send(BaseRecord::to("hs.valid").key("k").payload("{}"))
        .map_err(|(e, _)| e)?;
    producer.flush(std::time::Duration::from_secs(10))?;

    let out = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .args(["topics", "sizes", "--config"])
        .arg(&config)
        .env_remove("CDP_LOG_FORMAT")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("hs.raw partitions=2 records=7\n"), "{text}");
    assert!(text.contains("hs.valid partitions=1 records=1\n"), "{text}");
    assert!(text.contains("missing  hs.audiences\n"), "{text}");
    Ok(())
}
