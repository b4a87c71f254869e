//! Processing, dead letters, dedupe by position, ticks and timers, and a
//! restore from the changelog after the local state is lost.

use std::time::Duration;

use cdp_pipeline::envelope::{frame, Position};
use cdp_pipeline::Shutdown;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use super::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_dedupes_dead_letters_ticks_and_restores_after_losing_local_state() -> TestResult
{
    let dir = tempfile::tempdir()?;
    let state = dir.path().display().to_string();
    let s = setup(&state)?;

    for i in 0..10 {
        produce(&s.producer, &format!("k{}", i % 2), "x", None).await?;
    }
    produce(&s.producer, "k0", "bad", None).await?;
    // Upstream replay: the same origin position twice; the second is dropped,
    // as is an older epoch's record after a newer one was seen.
    let pos = |epoch, offset| {
        let p = Position {
            epoch,
            offset,
            index: 0,
            lineage: 1,
        };
        p.to_headers("up:0")
            .iter()
            .fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_slice()),
                })
            })
    };
    produce(&s.producer, "dup", "x", Some(pos(2, 7))).await?;
    produce(&s.producer, "dup", "x", Some(pos(2, 7))).await?;
    produce(&s.producer, "dup", "x", Some(pos(1, 8))).await?;
    produce(&s.producer, "dup", "x", Some(pos(2, 8))).await?;
    // The same from another origin writing an internal topic: the
    // position in one header.
    let at = |epoch, offset| {
        let (k, v) = Position {
            epoch,
            offset,
            index: 0,
            lineage: 1,
        }
        .to_at_header("up:1");
        OwnedHeaders::new().insert(Header {
            key: &k,
            value: Some(v.as_slice()),
        })
    };
    produce(&s.producer, "dup", "x", Some(at(2, 7))).await?;
    produce(&s.producer, "dup", "x", Some(at(2, 7))).await?;
    produce(&s.producer, "dup", "x", Some(at(1, 8))).await?;
    produce(&s.producer, "dup", "x", Some(at(2, 8))).await?;
    // And from a third, its position framed in the value; a framed `bad`
    // is a dead letter like any other.
    for (epoch, offset, value) in [
        (2, 7, "x"),
        (2, 7, "x"),
        (1, 8, "x"),
        (2, 8, "x"),
        (2, 9, "bad"),
    ] {
        let mut framed = Vec::new();
        let position = Position {
            epoch,
            offset,
            index: 0,
            lineage: 1,
        };
        frame::write(&mut framed, "up:2", &position, [], value.as_bytes());
        let key = if value == "bad" { "k9" } else { "dup" };
        let record = FutureRecord::to("t.in").key(key).payload(&framed);
        s.producer
            .send(record, Duration::from_secs(5))
            .await
            .map_err(|(e, _)| e)?;
    }

    let shutdown = Shutdown::default();
    let join = run_stage(&s.factory, &shutdown);
    let f = s.factory.clone();
    let out = tokio::task::spawn_blocking(move || {
        read_all(&f, "t.out", |o| {
            counts(o, "k0").len() >= 5
                && counts(o, "k1").len() >= 5
                && counts(o, "dup").len() >= 6
                && !counts(o, "timer").is_empty()
        })
    })
    .await?;
    assert_eq!(counts(&out, "k0"), ["k0:1", "k0:2", "k0:3", "k0:4", "k0:5"]);
    assert_eq!(counts(&out, "k1"), ["k1:1", "k1:2", "k1:3", "k1:4", "k1:5"]);
    assert_eq!(
        counts(&out, "dup"),
        ["dup:1", "dup:2", "dup:3", "dup:4", "dup:5", "dup:6"],
        "replays must be dropped by position, in four headers, in one or in a frame"
    );
    assert_eq!(
        counts(&out, "timer"),
        ["t"],
        "the timer fires once, driven by ticks"
    );
    let f = s.factory.clone();
    let dlq =
        tokio::task::spawn_blocking(move || read_all(&f, "t.invalid", |o| o.len() >= 2)).await?;
    let mut dlq_keys = dlq.clone();
    dlq_keys.sort();
    assert_eq!(
        dlq_keys,
        [
            ("k0".to_string(), "bad_value".to_string()),
            ("k9".to_string(), "bad_value".to_string())
        ]
    );
    shutdown.trigger();
    join.join().map_err(|_| "stage panicked")??;

    // Lose the disk; the changelog brings the counts back.
    std::fs::remove_dir_all(dir.path())?;
    for _ in 0..3 {
        produce(&s.producer, "k0", "x", None).await?;
    }
    let out = run_until(spec(), &s.factory, "t.out", |o| counts(o, "k0").len() >= 8).await?;
    assert_eq!(
        counts(&out, "k0"),
        ["k0:1", "k0:2", "k0:3", "k0:4", "k0:5", "k0:6", "k0:7", "k0:8"],
        "state restored from the changelog, input resumed after the last commit"
    );
    Ok(())
}
