//! The whole chain in one process on librdkafka's mock cluster, driven
//! through the real HTTP collector: DESIGN.md's scenario.

mod common;

use std::time::Duration;

use cdp::dev::Dev;
use common::{entered, ChangeReader, TestResult};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_visitor_who_buys_twice_enters_big_spenders_with_every_identifier(
) -> TestResult {
    let dev = Dev::start_for_tests().await?;
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
    // The traits as `cdp profiles traits` reads them from the changelog.
    let factory = dev.factory.clone();
    let profiles =
        tokio::task::spawn_blocking(move || cdp::profiles::trait_values(&factory, None)).await??;
    dev.stop().await?;
    let alice = profiles
        .iter()
        .find(|p| p["identifiers"]["user_id"] == serde_json::json!(["user-alice"]))
        .ok_or_else(|| format!("no profile of alice in {profiles:?}"))?;
    assert_eq!(
        alice["traits"]["revenue_total"],
        serde_json::json!(550),
        "{alice}"
    );
    assert_eq!(
        alice["traits"]["orders_30d"],
        serde_json::json!(2),
        "{alice}"
    );

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

/// Two profiles in one identity partition that an identify joins: the
/// merged-away profile exits its audiences, the survivor gets its state
/// (through the traits and audiences stages' own input topics) and enters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_moves_state_downstream_and_the_merged_away_profile_exits() -> TestResult {
    let dev = Dev::start_for_tests().await?;
    let partitions = dev.factory.config().partitions;
    // Raw records are keyed by anonymousId, else userId: pick an anonymous
    // id whose key lands in the user id's partition, so one identity task
    // sees both profiles.
    let user = "user-merge";
    let anon = (0..1000)
        .map(|i| format!("merge-anon-{i}"))
        .find(|a| common::partition_of(a, partitions) == common::partition_of(user, partitions))
        .ok_or("no colliding key")?;
    let client = reqwest::Client::new();
    let steps = [
        (
            "track",
            serde_json::json!({"userId": user, "event": "Order Completed", "properties": {"revenue": 300}}),
        ),
        (
            "track",
            serde_json::json!({"anonymousId": anon, "event": "Product Viewed", "properties": {"sku": "s"}}),
        ),
        (
            "track",
            serde_json::json!({"anonymousId": anon, "event": "Order Completed", "properties": {"revenue": 250}}),
        ),
        (
            "identify",
            serde_json::json!({"anonymousId": anon, "userId": user, "traits": {"email": "m@example.com"}}),
        ),
    ];
    for (route, body) in steps {
        let r = client
            .post(format!("http://{}/v1/{route}", dev.collector))
            .basic_auth(cdp::demo::DEMO_WRITE_KEY, Some(""))
            .json(&body)
            .send()
            .await?;
        assert!(r.status().is_success(), "{route}: {}", r.status());
    }

    let topics = dev.factory.topics();
    let factory = dev.factory.clone();
    let reader = tokio::task::spawn_blocking(move || -> Result<ChangeReader, String> {
        let mut r = ChangeReader::new(&factory, &topics.audiences(), partitions)
            .map_err(|e| e.to_string())?;
        r.read_until(Duration::from_secs(60), |c| {
            entered(c, "merge", "big_spenders") && c.iter().any(|c| c.action == "exited")
        });
        r.settle(Duration::from_secs(2));
        Ok(r)
    })
    .await??;
    dev.stop().await?;

    let changes = &reader.changes;
    let anon_only = |c: &&common::Change| !c.identifiers.contains_key("user_id");
    let merged_away: Vec<_> = changes.iter().filter(anon_only).collect();
    assert_eq!(
        merged_away
            .iter()
            .map(|c| (c.audience.as_str(), c.action.as_str()))
            .collect::<Vec<_>>(),
        [
            ("browsed_then_bought", "entered"),
            ("browsed_then_bought", "exited")
        ],
        "{changes:#?}"
    );
    let survivor: Vec<_> = changes.iter().filter(|c| !anon_only(c)).collect();
    let big = survivor
        .iter()
        .find(|c| c.audience == "big_spenders" && c.action == "entered")
        .ok_or_else(|| format!("survivor did not enter big_spenders: {changes:#?}"))?;
    assert_eq!(
        big.traits.get("revenue_total").and_then(|v| v.as_f64()),
        Some(550.0)
    );
    assert_eq!(
        big.identifiers.get("anonymous_id"),
        Some(&vec![anon.clone()])
    );
    assert_eq!(
        big.identifiers.get("email"),
        Some(&vec!["m@example.com".to_string()])
    );
    assert!(
        survivor
            .iter()
            .any(|c| c.audience == "browsed_then_bought" && c.action == "entered"),
        "the survivor inherits the merged-away history: {changes:#?}"
    );
    assert_ne!(merged_away[0].profile_id, big.profile_id);
    Ok(())
}

/// `cdp dev --state-dir D`, stopped and started again: the embedded broker
/// starts empty while D keeps every task's state. Visitors after the
/// restart must come through (they were all dropped: tasks skipped the new
/// broker's input as consumed, and downstream dropped restarted epochs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdp_dev_restarted_on_the_same_state_dir_delivers_new_visitors() -> TestResult {
    let state = tempfile::tempdir()?;
    let start = || {
        Dev::start(cdp::dev::DevOptions {
            config: None,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: None,
            state_dir: Some(state.path().to_path_buf()),
            stdout: false,
            brokers: None,
        })
    };
    let client = reqwest::Client::new();
    for visitor in ["before", "after"] {
        let dev = start().await?;
        dev.wait_ready(Duration::from_secs(60)).await?;
        cdp::demo::send_journey(&client, dev.collector, visitor, None).await?;
        let topics = dev.factory.topics();
        let partitions = dev.factory.config().partitions;
        let factory = dev.factory.clone();
        let who = visitor.to_string();
        let entered_big = tokio::task::spawn_blocking(move || -> Result<bool, String> {
            let mut r = ChangeReader::new(&factory, &topics.audiences(), partitions)
                .map_err(|e| e.to_string())?;
            Ok(r.read_until(Duration::from_secs(60), |c| {
                entered(c, &who, "big_spenders")
            }))
        })
        .await??;
        dev.stop().await?;
        assert!(entered_big, "{visitor} the restart entered big_spenders");
    }
    Ok(())
}
