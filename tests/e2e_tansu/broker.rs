//! The broker and the admin commands: tansu's listed ends, dead letters
//! of one batch, producers for unknown topics, topics made by other tools.

use std::process::Command;
use std::time::Duration;

use cdp_pipeline::{ClientFactory, KafkaConfig};

use crate::common::{unique, TestResult};
use crate::support::*;

/// tansu 0.6 lists a partition's end as the base offset of its newest record
/// batch plus one, so a stage whose committed offset lies inside that batch
/// once took it for lost broker data and read its input from the beginning
/// (the kill -9 test above failed that way in CI). The check a stage makes
/// before believing such an end must see the records that are there.
#[test]
fn an_offset_inside_the_newest_record_batch_is_not_taken_for_lost_data() -> TestResult {
    use rdkafka::message::OwnedHeaders;
    let Some(brokers) = brokers() else {
        return Ok(());
    };
    let p = Pipeline::new(&brokers)?;
    let topic = p.factory.topics().raw();
    // Eight records sent together leave in one batch.
    let records: Vec<_> = (0..8)
        .map(|i| (format!("record {i}"), OwnedHeaders::new()))
        .collect();
    send_together(&p.factory, &topic, 0, &records)?;
    let consumer = p.factory.restore_consumer()?;
    let (_, listed) = cdp_pipeline::changelog::watermarks(&consumer, &topic, 0)?;
    eprintln!("listed end of a partition holding 8 records: {listed}");
    let holds = |end| cdp_pipeline::changelog::holds_offset_before(&consumer, &topic, 0, end);
    for end in [1, 5, 8] {
        assert!(holds(end)?, "offset {} is there", end - 1);
    }
    assert!(!holds(9)?, "the partition ends at 8");
    assert!(!holds(40)?, "offset 39 was never written");
    Ok(())
}

#[test]
fn every_dead_letter_of_one_batch_is_listed_and_unknown_ids_are_refused() -> TestResult {
    use rdkafka::message::{Header, OwnedHeaders};
    let Some(brokers) = brokers() else {
        return Ok(());
    };
    let p = Pipeline::new(&brokers)?;
    let topic = p.factory.topics().invalid();
    // Three dead letters sent together leave in one batch: tansu lists the
    // partition's end as the batch's base offset plus one.
    let records: Vec<_> = (0..3)
        .map(|i| {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: cdp_pipeline::envelope::DLQ_STAGE,
                    value: Some("deliver"),
                })
                .insert(Header {
                    key: cdp_pipeline::envelope::DLQ_REASON,
                    value: Some("delivery_failed"),
                });
            (format!("{{\"change\": {i}}}"), headers)
        })
        .collect();
    send_together(&p.factory, &topic, 1, &records)?;
    let letters = cdp::dead_letters::read(&p.factory)?;
    let ids: Vec<String> = letters.iter().map(|d| d.id()).collect();
    assert_eq!(ids, ["1@0", "1@1", "1@2"]);
    // `topics sizes` counts them all too, not to the listed end.
    let sizes = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .args(["topics", "sizes", "--config"])
        .arg(&p.config)
        .output()?;
    let stdout = String::from_utf8_lossy(&sizes.stdout);
    assert!(
        stdout.contains(&format!("{topic} partitions={PARTITIONS} records=3")),
        "{stdout}"
    );
    let selection = cdp::dead_letters::Selection {
        stage: None,
        reason: None,
        ids: vec!["1@2".into(), "1@7".into(), "0@0".into()],
    };
    match selection.select(&letters) {
        Ok(found) => Err(format!("ids that are no dead letters selected: {found:?}").into()),
        Err(e) => {
            assert!(e.to_string().starts_with("no dead letter 1@7, 0@0"), "{e}");
            Ok(())
        }
    }
}

#[test]
fn a_ready_producer_is_refused_for_a_topic_the_broker_does_not_know() -> TestResult {
    let Some(brokers) = brokers() else {
        return Ok(());
    };
    let p = Pipeline::new(&brokers)?;
    let raw = p.factory.topics().raw();
    let producer = p.factory.producer_ready_for(&raw)?;
    let sent = producer
        .send_result(
            rdkafka::producer::FutureRecord::to(&raw)
                .key("k")
                .payload("{}"),
        )
        .map_err(|(e, _)| e)?;
    futures::executor::block_on(sent)?.map_err(|(e, _)| e)?;
    let missing = format!("{}.no-such-topic", p.prefix);
    match p.factory.producer_ready_for(&missing) {
        Ok(_) => Err(format!("a producer ready for {missing}, which was never created").into()),
        Err(e) => {
            assert_eq!(
                e.to_string(),
                format!("topic {missing} does not exist: create it with `cdp topics create`")
            );
            Ok(())
        }
    }
}

#[test]
fn topics_made_by_other_tools_with_the_wrong_settings_are_named() -> TestResult {
    let Some(brokers) = brokers() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let prefix = unique("e2e");
    let config = cdp::config::DEMO_CONFIG
        .replace("brokers: localhost:9092", &format!("brokers: {brokers}"))
        .replace("topic_prefix: cdp", &format!("topic_prefix: {prefix}"))
        .replace(
            "tick_interval: 1s",
            "tick_interval: 1s\n  replication_factor: 1",
        );
    let path = dir.path().join("cdp.yaml");
    std::fs::write(&path, config)?;
    let factory = ClientFactory::new(KafkaConfig {
        brokers: brokers.clone(),
        topic_prefix: prefix.clone(),
        partitions: PARTITIONS,
        replication_factor: 1,
        ..KafkaConfig::default()
    })?;
    // Another tool made two topics first: the traits changelog with one
    // partition and delete cleanup, <p>.valid with two.
    let t = factory.topics();
    let wrong = [
        cdp_pipeline::kafka::TopicSpec {
            name: t.changelog("traits"),
            partitions: 1,
            compacted: false,
        },
        cdp_pipeline::kafka::TopicSpec {
            name: t.valid(),
            partitions: 2,
            compacted: false,
        },
    ];
    futures::executor::block_on(factory.create_topics(&wrong))?;
    let run = |command: &str| {
        Command::new(env!("CARGO_BIN_EXE_cdp"))
            .args(["topics", command, "--config"])
            .arg(&path)
            .env_remove("CDP_LOG_FORMAT")
            .output()
    };
    for command in ["create", "check"] {
        let out = run(command)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {stdout}{stderr}");
        // What is there, not what was wanted.
        assert!(
            stdout.contains(&format!(
                "{}.traits-changelog partitions=1 compacted=false",
                prefix
            )),
            "{command}: {stdout}"
        );
        for problem in [
            format!("{prefix}.traits-changelog: not compacted"),
            format!("{prefix}.valid: 2 partitions; identity needs exactly 1"),
            format!("{prefix}.traits-changelog: 1 partitions for the {PARTITIONS} of {prefix}.identified"),
        ] {
            assert!(stderr.contains(&problem), "{command}: {problem} not in {stderr}");
        }
    }
    Ok(())
}

/// tansu 0.6 answers a fetch that starts inside a stored record batch from
/// the next batch. A stage that stopped in the middle of one (deliver
/// commits every 1,000 records; a crash before the commit of the second
/// round leaves it at 1,000) lost the rest of that batch on restart,
/// silently: 22 to 1,062 audience changes never reached a webhook in one
/// tester's runs. The runtime now re-reads its input from earlier when the
/// first record after its position is past it.
#[test]
fn a_stage_restarted_inside_a_record_batch_reads_the_rest_of_it() -> TestResult {
    use rdkafka::message::OwnedHeaders;
    let Some(brokers) = brokers() else {
        return Ok(());
    };
    let mut p = Pipeline::new(&brokers)?;
    let topic = format!("{}.audiences", p.prefix);
    let change = |i: usize| {
        serde_json::json!({"type": "audience_change", "audience": "a", "action": "entered",
            "profile_id": format!("p{i:05}"), "identifiers": {}, "traits": {},
            "event_time": "2026-01-01T00:00:00.000Z", "emitted_at": "2026-01-01T00:00:00.000Z",
            "cause": {}})
        .to_string()
    };
    // Sent together: a few large batches, far more than a round of 1,000.
    let total = 3000;
    let records: Vec<_> = (0..total)
        .map(|i| (change(i), OwnedHeaders::new()))
        .collect();
    send_together(&p.factory, &topic, 0, &records)?;
    // The first round commits; the second delivers, then the stage dies
    // before committing it: the restart starts at 1,000, inside a batch.
    p.start(
        "deliver",
        "deliver",
        &[("CDP_CHAOS_CRASH_AFTER_PRODUCE", "2")],
    )?;
    assert!(
        p.wait_exit("deliver", Duration::from_secs(90)),
        "deliver did not crash as told\n{}",
        p.logs()
    );
    p.restart("deliver")?;
    let distinct = |p: &Pipeline| {
        p.delivered()
            .into_iter()
            .map(|c| c.profile_id)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while distinct(&p) < total && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        distinct(&p),
        total,
        "changes lost after the restart\n{}",
        p.logs()
    );
    Ok(())
}
