//! Starting over: a broker that came back empty, and the documented reset
//! of one stage in a chain.

use std::time::Duration;

use cdp_pipeline::Shutdown;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureRecord;

use super::common::BoxError;
use super::support::*;

/// `cdp dev --state-dir D`, stopped and started again: the embedded broker
/// comes back empty while the local state remains. Every task must notice
/// (its local copy is ahead of the changelog), say so and start over,
/// instead of skipping the new broker's input as already consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_lost_its_data_is_noticed_and_new_input_is_processed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let state = dir.path().display().to_string();
    assert_eq!(
        counted_on_a_new_broker(&state, 3).await?,
        ["k0:1", "k0:2", "k0:3"]
    );
    // What an alert compares the partitions owned with.
    assert_eq!(
        cdp_pipeline::metrics::INPUT_PARTITIONS
            .with_label_values(&["count"])
            .get(),
        2
    );

    // A new, empty broker; the same state directory.
    let resets = || {
        cdp_pipeline::metrics::STATE_RESETS
            .with_label_values(&["count", "ahead_of_changelog"])
            .get()
    };
    let before = resets();
    assert_eq!(
        counted_on_a_new_broker(&state, 2).await?,
        ["k0:1", "k0:2"],
        "the new broker's input is processed from a clean state"
    );
    assert!(resets() >= before + 2, "each task's reset is counted");
    Ok(())
}

/// On a new mock broker, with local state in `state`: `records` records
/// of `k0` through the counting stage, then the stage stopped; its counts.
async fn counted_on_a_new_broker(state: &str, records: usize) -> Result<Vec<String>, BoxError> {
    let s = setup(state)?;
    for _ in 0..records {
        produce(&s.producer, "k0", "x", None).await?;
    }
    let shutdown = Shutdown::default();
    let join = run_stage(&s.factory, &shutdown);
    let out = read_until(&s.factory, "t.out", move |o| {
        counts(o, "k0").len() >= records
    })
    .await?;
    shutdown.trigger();
    join.join().map_err(|_| "stage panicked")??;
    Ok(counts(&out, "k0"))
}

/// The reset of docs/OPERATIONS.md on one stage of a chain: a new changelog,
/// no group offsets, no local state. The reset stage starts again at epoch
/// 1 from offset 0, under a new lineage; the stage downstream must take its
/// output as new, not as replays of what it already applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_reset_as_documented_keeps_the_chain_delivering() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mock = MockCluster::new(1)?;
    for t in [
        "t.in",
        "t.mid",
        "t.out",
        "t.invalid",
        "t.down-changelog",
        "r1.invalid",
        "r1.up-changelog",
        "r2.invalid",
        "r2.up-changelog",
    ] {
        mock.create_topic(t, 2, 1)?;
    }
    let up1 = factory_on(&mock, "r1", &dir.path().join("up1"))?;
    let down = factory_on(&mock, "t", &dir.path().join("down"))?;
    let producer = down.producer()?;
    let send = |key: &'static str| {
        let p = producer.clone();
        async move {
            // One input partition: one origin whose epochs `down` tracks.
            p.send(
                FutureRecord::to("t.in").partition(0).key(key).payload("x"),
                Duration::from_secs(5),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
        }
    };
    let down_stop = Shutdown::default();
    let down_join = start(stage("down", "t.mid", "t.out", false), &down, &down_stop);
    // Run `up` three times so its epoch grows past 1.
    for n in 1..=3usize {
        let stop = Shutdown::default();
        let join = start(stage("up", "t.in", "t.mid", false), &up1, &stop);
        send("k0").await?;
        read_until(&down, "t.out", move |o| counts(o, "k0").len() >= n).await?;
        stop.trigger();
        join.join().map_err(|_| "stage panicked")??;
    }

    // The reset: new changelog and group (prefix r2), no local state.
    let up2 = factory_on(&mock, "r2", &dir.path().join("up2"))?;
    let stop = Shutdown::default();
    let join = start(stage("up", "t.in", "t.mid", false), &up2, &stop);
    // It replays its input (three records) from scratch and then gets one
    // more: four new outputs under the new lineage, counted on by `down`.
    send("k0").await?;
    let out = read_until(&down, "t.out", |o| counts(o, "k0").len() >= 7).await?;
    stop.trigger();
    join.join().map_err(|_| "stage panicked")??;
    down_stop.trigger();
    down_join.join().map_err(|_| "stage panicked")??;
    assert_eq!(
        counts(&out, "k0"),
        ["k0:1", "k0:2", "k0:3", "k0:4", "k0:5", "k0:6", "k0:7"],
        "the reset stage's output after the reset comes through"
    );
    Ok(())
}
