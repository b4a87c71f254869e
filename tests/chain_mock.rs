//! The whole chain in one process on librdkafka's mock cluster, driven
//! through the real HTTP collector: DESIGN.md's scenario.

mod common;

use std::time::Duration;

use cdp::dev::{Dev, DevOptions};
use common::{entered, ChangeReader, TestResult};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_visitor_who_buys_twice_enters_big_spenders_with_every_identifier(
) -> TestResult {
    let dev = Dev::start(DevOptions {
        config: None,
        listen: "127.0.0.1:0".parse()?,
        admin: None,
        state_dir: None,
        stdout: false,
    })
    .await?;
    dev.wait_ready(Duration::from_secs(60)).await?;
    let client = reqwest::Client::new();
    cdp::demo::send_journey(&client, dev.collector, "alice", None).await?;

    let topics = dev.factory.topics();
    let partitions = dev.factory.config().partitions;
    let factory = dev.factory.clone();
    let reader = tokio::task::spawn_blocking(move || -> Result<ChangeReader, String> {
        let mut r = ChangeReader::new(&factory, &topics.audiences(), partitions)
            .map_err(|e| e.to_string())?;
        r.read_until(Duration::from_secs(60), |c| {
            entered(c, "alice", "big_spenders")
        });
        r.settle(Duration::from_secs(2));
        Ok(r)
    })
    .await??;
    dev.stop().await?;

    let change = reader
        .changes
        .iter()
        .find(|c| c.audience == "big_spenders")
        .ok_or_else(|| format!("no big_spenders change in {:?}", reader.changes))?;
    assert_eq!(change.action, "entered");
    assert_eq!(
        change.identifiers.get("user_id"),
        Some(&vec!["user-alice".to_string()])
    );
    assert_eq!(
        change.identifiers.get("email"),
        Some(&vec!["alice@example.com".to_string()])
    );
    assert_eq!(
        change.identifiers.get("anonymous_id"),
        Some(&vec!["anon-alice".to_string()])
    );
    assert_eq!(
        change.traits.get("revenue_total").and_then(|v| v.as_f64()),
        Some(550.0)
    );
    assert!(entered(&reader.changes, "alice", "browsed_then_bought"));
    // Exactly one entry per audience: nothing duplicated downstream.
    let big: Vec<_> = reader
        .changes
        .iter()
        .filter(|c| c.audience == "big_spenders")
        .collect();
    assert_eq!(big.len(), 1, "{big:?}");
    Ok(())
}
