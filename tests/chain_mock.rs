//! The whole chain in one process on librdkafka's mock cluster, driven
//! through the real HTTP collector: DESIGN.md's scenario.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use cdp::dev::Dev;
use common::{entered, ChangeReader, TestResult};
use serde_json::Value;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    current_members_are_what_the_changes_add_up_to(&dev, &reader.changes).await?;
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

/// The memberships the changes add up to, replayed in order (the oracle
/// of `cdp profiles audiences` and `cdp destinations sync`).
fn members_of(changes: &[common::Change]) -> BTreeSet<(String, String)> {
    let mut members = BTreeSet::new();
    for c in changes {
        let key = (c.profile_id.clone(), c.audience.clone());
        match c.action.as_str() {
            "entered" => members.insert(key),
            _ => members.remove(&key),
        };
    }
    members
}

/// A webhook receiver that keeps each request's delivery id and body.
async fn recording_webhook() -> Result<(String, Arc<Mutex<Vec<(String, Value)>>>), BoxError> {
    let seen: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let log = seen.clone();
    let app = Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: String| {
            let log = log.clone();
            async move {
                let id = headers
                    .get("x-cdp-delivery-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                if let Ok(mut l) = log.lock() {
                    l.push((id, serde_json::from_str(&body).unwrap_or(Value::Null)));
                }
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}/hook"), seen))
}

/// `cdp profiles audiences` lists exactly the memberships the change
/// stream adds up to (the merged-away profile in none), and `cdp
/// destinations sync` sends a destination connected now one `entered`
/// each, with delivery ids that a second run repeats.
async fn current_members_are_what_the_changes_add_up_to(
    dev: &Dev,
    changes: &[common::Change],
) -> TestResult {
    let (url, received) = recording_webhook().await?;
    let compiled = cdp::config::Config::from_yaml(&cdp::config::DEMO_CONFIG.replace(
        "destinations: []",
        &format!("destinations:\n  - {{id: late, type: webhook, url: \"{url}\", audiences: [big_spenders, browsed_then_bought]}}"),
    ))?
    .compile()?;
    let expected = members_of(changes);
    assert!(!expected.is_empty(), "{changes:#?}");

    let (factory, set) = (dev.factory.clone(), compiled.audiences.clone());
    let listed = tokio::task::spawn_blocking(move || {
        cdp::profiles::memberships(&factory, &set, None, |_| true)
    })
    .await??;
    let listed_pairs: BTreeSet<(String, String)> = listed
        .iter()
        .map(|c| (c.profile_id.clone(), c.audience.clone()))
        .collect();
    assert_eq!(listed_pairs, expected, "{listed:#?}");
    assert_eq!(listed.len(), expected.len(), "one line per membership");

    let opts = |dry_run| cdp::sync::SyncOptions {
        destination: "late".into(),
        audience: None,
        dry_run,
    };
    let counted = cdp::sync::run(&compiled, &dev.factory, &opts(true)).await?;
    assert_eq!(counted.delivered, 0);
    let taken = |(_, a): &&(String, String)| a == "big_spenders" || a == "browsed_then_bought";
    let synced: BTreeSet<(String, String)> = expected.iter().filter(taken).cloned().collect();
    assert_eq!(
        counted.members.values().sum::<u64>(),
        synced.len() as u64,
        "{counted:?}"
    );
    let report = cdp::sync::run(&compiled, &dev.factory, &opts(false)).await?;
    assert_eq!((report.delivered, report.failed), (synced.len() as u64, 0));
    let first: Vec<(String, Value)> = received.lock().map_err(|e| e.to_string())?.clone();
    let got: BTreeSet<(String, String)> = first
        .iter()
        .map(|(_, b)| {
            assert_eq!(b["action"], "entered", "{b}");
            let field = |f: &str| b[f].as_str().unwrap_or_default().to_string();
            (field("profile_id"), field("audience"))
        })
        .collect();
    assert_eq!(got, synced);
    for (id, b) in &first {
        let expected_id = format!(
            "sync/late/{}/{}",
            b["audience"].as_str().unwrap_or_default(),
            b["profile_id"].as_str().unwrap_or_default()
        );
        assert_eq!(id, &expected_id);
    }
    // A re-run repeats the same ids: a receiver that dedupes ignores it.
    cdp::sync::run(&compiled, &dev.factory, &opts(false)).await?;
    let all: Vec<(String, Value)> = received.lock().map_err(|e| e.to_string())?.clone();
    let ids = |v: &[(String, Value)]| v.iter().map(|(i, _)| i.clone()).collect::<BTreeSet<_>>();
    assert_eq!(all.len(), 2 * first.len());
    assert_eq!(ids(&all), ids(&first));

    let unknown = cdp::sync::SyncOptions {
        destination: "nope".into(),
        ..opts(false)
    };
    let err = cdp::sync::run(&compiled, &dev.factory, &unknown)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("late"), "{err}");
    let not_taken = cdp::sync::SyncOptions {
        audience: Some("lapsing".into()),
        ..opts(false)
    };
    assert!(cdp::sync::run(&compiled, &dev.factory, &not_taken)
        .await
        .is_err());
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
