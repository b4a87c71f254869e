//! Owners that overlap: a fenced owner, two claimers of one changelog, and
//! an idle owner repairing what a zombie wrote.

use std::time::{Duration, Instant};

use cdp_pipeline::{ClientFactory, Shutdown};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};

use super::common::{ended, header_text, BoxError, MockStage, StageJoin};
use super::support::*;

/// The counter without ticks, started once two records are in partition 0
/// and returned once it has counted them.
async fn counting_two_records(s: &MockStage, shutdown: &Shutdown) -> Result<StageJoin, BoxError> {
    for _ in 0..2 {
        produce_to_p0(&s.producer).await?;
    }
    let join = run_counter(&s.factory, shutdown);
    let out = read_until(&s.factory, "t.out", |o| counts(o, "k0").len() >= 2).await?;
    assert_eq!(counts(&out, "k0"), ["k0:1", "k0:2"]);
    Ok(join)
}

/// An owner that another instance fenced (it claimed the changelog and
/// committed a batch) must not commit its own batch; when the partition
/// comes back, the restore must include the other owner's batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_owner_does_not_commit_and_later_restores_the_new_owners_batches() -> TestResult {
    use cdp_pipeline::changelog::{claim_key, commit_key, Claim, Marker};
    use cdp_pipeline::store::TaskMeta;

    let dir = tempfile::tempdir()?;
    let s = setup(&dir.path().display().to_string())?;
    let shutdown = Shutdown::default();
    let join = counting_two_records(&s, &shutdown).await?;

    // Another owner claims partition 0 (at the changelog's end, so its claim
    // is valid) and commits a batch that sets the count to 100.
    let reader = s.factory.plain_consumer("probe")?;
    let (_, end) = reader.fetch_watermarks("t.count-changelog", 0, Duration::from_secs(5))?;
    let progress = TaskMeta {
        input_offset: 2,
        changelog_offset: end - 1,
        ..TaskMeta::default()
    };
    let epoch = 50u32;
    let header = || {
        OwnedHeaders::new().insert(Header {
            key: "cdp-epoch",
            value: Some(epoch.to_string().as_bytes()),
        })
    };
    let claim = serde_json::to_vec(&Claim::new(end, &progress))?;
    let marker = serde_json::to_vec(&Marker::commit(&progress))?;
    for (key, value) in [
        (claim_key(epoch), claim),
        (b"count/k0".to_vec(), b"100".to_vec()),
        (commit_key(epoch), marker),
    ] {
        s.producer
            .send(
                FutureRecord::to("t.count-changelog")
                    .partition(0)
                    .key(&key)
                    .payload(&value)
                    .headers(header()),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    // The old owner gets one more record: it must find itself fenced.
    produce_to_p0(&s.producer).await?;
    let result = ended(join, Duration::from_secs(30)).await;
    assert!(
        matches!(&result, Some(Err(e)) if e.contains("fenced")),
        "the fenced owner stops without committing: {result:?}"
    );

    // The partition comes back to it: the restore sees the other owner's
    // claim and batch, so the replayed record counts from 100.
    let shutdown = Shutdown::default();
    let join = run_counter(&s.factory, &shutdown);
    let out = read_until(&s.factory, "t.out", |o| {
        counts(o, "k0").iter().any(|v| v == "k0:101")
    })
    .await?;
    shutdown.trigger();
    join.join().map_err(|_| "stage panicked")??;
    assert!(
        counts(&out, "k0").iter().any(|v| v == "k0:101"),
        "restored the new owner's batch: {:?}",
        counts(&out, "k0")
    );
    Ok(())
}

/// Two instances that both believe they own the same partitions (here: two
/// consumer groups over one changelog, the worst case of a stale
/// assignment) claim at the same time. The log decides: no two valid
/// claims share an epoch, and the loser stops at its first batch instead of
/// interleaving its state with the winner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_claimers_of_one_changelog_never_share_an_epoch() -> TestResult {
    use cdp_pipeline::changelog::{Claim, RecordKind};

    let dir = tempfile::tempdir()?;
    let mock = MockCluster::new(1)?;
    for t in ["t.in", "t.out", "t.invalid", "t.count-changelog"] {
        mock.create_topic(t, 2, 1)?;
    }
    let group = |name: &str,
                 state: &str|
     -> Result<ClientFactory, Box<dyn std::error::Error + Send + Sync>> {
        let f = factory_on(&mock, "t", &dir.path().join(state))?;
        let mut config = f.config().clone();
        config
            .properties
            .insert("consumer.group.id".into(), name.into());
        Ok(ClientFactory::new(config)?)
    };
    let a = group("group-a", "a")?;
    let b = group("group-b", "b")?;
    let (stop_a, stop_b) = (Shutdown::default(), Shutdown::default());
    let join_a = run_counter(&a, &stop_a);
    let join_b = run_counter(&b, &stop_b);
    let producer = a.producer()?;
    // Keep feeding both partitions until one instance gives up.
    let deadline = Instant::now() + Duration::from_secs(40);
    while !(join_a.is_finished() || join_b.is_finished()) && Instant::now() < deadline {
        for p in 0..2 {
            producer
                .send(
                    FutureRecord::to("t.in").partition(p).key("k").payload("x"),
                    Duration::from_secs(5),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (loser, winner, stop_winner) = if join_a.is_finished() {
        (join_a, join_b, stop_b)
    } else {
        (join_b, join_a, stop_a)
    };
    let lost = ended(loser, Duration::from_secs(1)).await;
    stop_winner.trigger();
    let won = ended(winner, Duration::from_secs(30)).await;
    // Fenced at its first batch, or (claiming second against a busy owner)
    // every claim voided: either way it stops instead of interleaving.
    assert!(
        matches!(&lost, Some(Err(e)) if e.contains("fenced") || e.contains("voided")),
        "one instance gives up: {lost:?}"
    );
    assert!(matches!(won, Some(Ok(()))), "the other runs on: {won:?}");

    // The log: valid claims (at their own offset) have distinct epochs.
    let reader = a.plain_consumer("claims")?;
    for p in 0..2 {
        let (_, end) = reader.fetch_watermarks("t.count-changelog", p, Duration::from_secs(5))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t.count-changelog", p, Offset::Beginning)?;
        reader.assign(&tpl)?;
        let mut epochs = Vec::new();
        let mut seen = 0;
        let until = Instant::now() + Duration::from_secs(20);
        while seen < end && Instant::now() < until {
            let Some(Ok(m)) = reader.poll(Duration::from_millis(200)) else {
                continue;
            };
            seen = m.offset() + 1;
            let key = m.key().unwrap_or_default();
            if RecordKind::of(key) != RecordKind::Claim {
                continue;
            }
            let claim: Claim = serde_json::from_slice(m.payload().unwrap_or_default())?;
            if claim.at == m.offset() {
                epochs.push(key.to_vec());
            }
        }
        let mut unique = epochs.clone();
        unique.sort();
        unique.dedup();
        assert!(!epochs.is_empty(), "partition {p} was claimed");
        assert_eq!(
            epochs.len(),
            unique.len(),
            "one valid claim per epoch in partition {p}"
        );
    }
    Ok(())
}

/// A zombie (an older epoch) writes into an idle owner's changelog. Restores
/// ignore its record, but compaction would let it hide the committed value
/// of its key: the owner notices within seconds and writes that value again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_owner_repairs_what_a_zombie_wrote_into_its_changelog() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = setup(&dir.path().display().to_string())?;
    let shutdown = Shutdown::default();
    let join = counting_two_records(&s, &shutdown).await?;

    // Epoch 0 (no header): older than any claim.
    let zombie_at = s
        .producer
        .send(
            FutureRecord::to("t.count-changelog")
                .partition(0)
                .key("count/k0")
                .payload("999"),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)?
        .offset;
    let f = s.factory.clone();
    let repaired = tokio::task::spawn_blocking(move || -> Option<(String, String)> {
        let c: BaseConsumer = f.plain_consumer("repair-reader").ok()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t.count-changelog", 0, Offset::Offset(zombie_at + 1))
            .ok()?;
        c.assign(&tpl).ok()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                if m.key() == Some(b"count/k0".as_slice()) {
                    let epoch = header_text(&m, "cdp-epoch").unwrap_or_default();
                    let value = String::from_utf8_lossy(m.payload().unwrap_or_default());
                    return Some((epoch, value.to_string()));
                }
            }
        }
        None
    })
    .await?;
    assert_eq!(
        repaired,
        Some(("1".to_string(), "2".to_string())),
        "the owner (epoch 1) wrote the committed count again after the zombie's record"
    );
    // And it goes on owning the partition.
    produce_to_p0(&s.producer).await?;
    let out = read_until(&s.factory, "t.out", |o| counts(o, "k0").len() >= 3).await?;
    shutdown.trigger();
    join.join().map_err(|_| "stage panicked")??;
    assert_eq!(counts(&out, "k0"), ["k0:1", "k0:2", "k0:3"]);
    Ok(())
}
