use super::*;
use std::sync::Mutex;

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use base64::Engine as _;
use cdp_operators::messages::Cause;

use crate::destinations::testing::TestResult;
use crate::destinations::HttpSink;

fn change(key: &str, n: u32, action: AudienceAction) -> AudienceChange {
    AudienceChange {
        kind: "audience_change".into(),
        audience: "big_spenders".into(),
        action,
        profile_id: format!("prof_{key}"),
        identifiers: [
            ("user_id".to_string(), vec![format!("user-{key}")]),
            ("anonymous_id".to_string(), vec![format!("anon-{key}")]),
            ("email".to_string(), vec![format!("{key}@example.com")]),
        ]
        .into_iter()
        .collect(),
        traits: [("n".to_string(), Value::from(n))].into_iter().collect(),
        event_time: format!("2026-11-29T10:00:{:02}.000Z", n % 60),
        emitted_at: "2026-11-29T10:00:00.100Z".into(),
        cause: Cause::default(),
        merged_into: None,
    }
}

fn record(key: &str, n: u32) -> SinkRecord {
    let action = if n.is_multiple_of(2) {
        AudienceAction::Exited
    } else {
        AudienceAction::Entered
    };
    SinkRecord {
        delivery_id: format!("audiences:0/1/{n}/0"),
        key: Some(key.as_bytes().to_vec()),
        value: serde_json::to_vec(&change(key, n, action)).unwrap_or_default(),
    }
}

/// One request the recording server saw.
#[derive(Debug, Clone)]
struct Seen {
    at: tokio::time::Instant,
    headers: HeaderMap,
    body: Value,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A Segment-compatible `/v1/batch` that records every request and answers
/// `answers` in turn (status, Retry-After), the last one repeating.
async fn recording_api(
    answers: Vec<(StatusCode, Option<&'static str>)>,
) -> Result<(String, Log), Box<dyn std::error::Error + Send + Sync>> {
    let log: Log = Arc::default();
    let state = log.clone();
    let app = Router::new().route(
        "/v1/batch",
        post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let state = state.clone();
            let answers = answers.clone();
            async move {
                let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let n = match state.lock() {
                    Ok(mut l) => {
                        l.push(Seen {
                            at: tokio::time::Instant::now(),
                            headers,
                            body,
                        });
                        l.len() - 1
                    }
                    Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                };
                let (status, retry_after) = answers
                    .get(n)
                    .or(answers.last())
                    .copied()
                    .unwrap_or((StatusCode::OK, None));
                match retry_after {
                    Some(v) => (status, [("retry-after", v)], "{}").into_response(),
                    None => (status, "{}").into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}"), log))
}

fn seen(log: &Log) -> Vec<Seen> {
    log.lock().map(|l| l.clone()).unwrap_or_default()
}

fn sink(url: &str, batch_size: u32) -> Result<SegmentSink, DestinationError> {
    Ok(SegmentSink::new(
        "segment-test",
        url,
        "wk_test".into(),
        Duration::from_secs(5),
        3,
        batch_size,
    )?
    .with_backoff(Duration::from_millis(5)))
}

#[test]
fn an_entry_and_an_exit_are_the_calls_engage_sends() {
    let [identify, track] = calls(
        &change("a", 1, AudienceAction::Entered),
        "audiences:0/1/1/0",
    );
    assert_eq!(identify["type"], "identify");
    assert_eq!(identify["traits"]["big_spenders"], true);
    assert_eq!(identify["traits"]["email"], "a@example.com");
    assert_eq!(identify["userId"], "user-a");
    assert_eq!(identify["anonymousId"], "anon-a");
    assert_eq!(identify["timestamp"], "2026-11-29T10:00:01.000Z");
    assert_eq!(
        identify["context"]["personas"]["computation_class"],
        "audience"
    );
    assert_eq!(
        identify["context"]["personas"]["computation_key"],
        "big_spenders"
    );
    assert_eq!(track["type"], "track");
    assert_eq!(track["event"], "Audience Entered");
    assert_eq!(track["properties"]["audience_key"], "big_spenders");
    assert_eq!(track["properties"]["big_spenders"], true);
    assert_eq!(track["userId"], "user-a");
    // Stable per delivery id (a retry or replay is the same message),
    // distinct per call and per change.
    let [again, _] = calls(
        &change("a", 1, AudienceAction::Entered),
        "audiences:0/1/1/0",
    );
    assert_eq!(identify["messageId"], again["messageId"]);
    assert_ne!(identify["messageId"], track["messageId"]);
    let [other, _] = calls(
        &change("a", 1, AudienceAction::Entered),
        "audiences:0/1/2/0",
    );
    assert_ne!(identify["messageId"], other["messageId"]);

    let [identify, track] = calls(&change("a", 2, AudienceAction::Exited), "x");
    assert_eq!(identify["traits"]["big_spenders"], false);
    assert_eq!(track["event"], "Audience Exited");
    assert_eq!(track["properties"]["big_spenders"], false);

    // No user id, no anonymous id: the profile id stands in.
    let mut bare = change("b", 3, AudienceAction::Entered);
    bare.identifiers.clear();
    let [identify, _] = calls(&bare, "y");
    assert_eq!(identify["anonymousId"], "prof_b");
    assert!(identify.get("userId").is_none());
}

#[tokio::test]
async fn changes_go_batched_to_v1_batch_in_segment_format_in_order_per_profile() -> TestResult {
    let (url, log) = recording_api(vec![(StatusCode::OK, None)]).await?;
    let batch: Vec<SinkRecord> = [("a", 1), ("a", 2), ("b", 3), ("c", 4), ("a", 5), ("a", 7)]
        .iter()
        .map(|(k, n)| record(k, *n))
        .collect();
    let results = tokio::time::timeout(
        Duration::from_secs(10),
        sink(&url, 4)?.deliver(batch.clone()),
    )
    .await?;
    assert_eq!(results, vec![Ok(()); 6]);
    let requests = seen(&log);
    let expected_auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("wk_test:")
    );
    let mut calls_by_user: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut total = 0;
    for r in &requests {
        assert_eq!(
            r.headers.get("authorization").and_then(|v| v.to_str().ok()),
            Some(expected_auth.as_str())
        );
        let body = r.body.as_object().ok_or("body is not an object")?;
        assert!(body.get("sentAt").and_then(Value::as_str).is_some());
        let calls = body
            .get("batch")
            .and_then(Value::as_array)
            .ok_or("no batch array")?;
        assert!(calls.len() <= 4 && calls.len() % 2 == 0, "{calls:?}");
        total += calls.len();
        for call in calls {
            for field in ["type", "messageId", "timestamp", "userId", "context"] {
                assert!(call.get(field).is_some(), "{field} missing in {call}");
            }
            calls_by_user
                .entry(call["userId"].as_str().unwrap_or_default().to_string())
                .or_default()
                .push((
                    call["type"].as_str().unwrap_or_default().to_string(),
                    call["timestamp"].as_str().unwrap_or_default().to_string(),
                ));
        }
    }
    assert_eq!(total, 12, "two calls per change");
    // Profile a: its four changes in order, identify before track each.
    let a: Vec<(String, String)> = calls_by_user.remove("user-a").unwrap_or_default();
    let expected: Vec<(String, String)> = [1, 2, 5, 7]
        .iter()
        .flat_map(|n| {
            let t = format!("2026-11-29T10:00:{n:02}.000Z");
            [
                ("identify".to_string(), t.clone()),
                ("track".to_string(), t),
            ]
        })
        .collect();
    assert_eq!(a, expected);
    Ok(())
}

#[tokio::test]
async fn a_server_error_is_retried_and_a_client_error_dead_letters_the_request() -> TestResult {
    let (url, log) = recording_api(vec![
        (StatusCode::INTERNAL_SERVER_ERROR, None),
        (StatusCode::OK, None),
    ])
    .await?;
    let results = sink(&url, 100)?
        .deliver(vec![record("a", 1), record("a", 2)])
        .await;
    assert_eq!(results, vec![Ok(()), Ok(())]);
    let requests = seen(&log);
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0].body["batch"], requests[1].body["batch"],
        "same calls retried"
    );

    let (url, log) = recording_api(vec![(StatusCode::BAD_REQUEST, None)]).await?;
    let results = sink(&url, 100)?
        .deliver(vec![record("a", 1), record("b", 2)])
        .await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(e) if e.contains("400"))),
        "{results:?}"
    );
    assert_eq!(seen(&log).len(), results.len(), "no retry after a 4xx");

    let (url, log) = recording_api(vec![(StatusCode::BAD_GATEWAY, None)]).await?;
    let results = sink(&url, 100)?.deliver(vec![record("a", 1)]).await;
    assert!(
        matches!(&results[..], [Err(e)] if e.contains("gave up after 3 attempts")),
        "{results:?}"
    );
    assert_eq!(seen(&log).len(), 3);
    Ok(())
}

#[tokio::test]
async fn retry_after_is_honoured() -> TestResult {
    let (url, log) = recording_api(vec![
        (StatusCode::TOO_MANY_REQUESTS, Some("1")),
        (StatusCode::OK, None),
    ])
    .await?;
    let results = sink(&url, 100)?.deliver(vec![record("a", 1)]).await;
    assert_eq!(results, vec![Ok(())]);
    let requests = seen(&log);
    assert_eq!(requests.len(), 2);
    // The backoff alone would have retried after 5 ms.
    assert!(
        requests[1].at - requests[0].at >= Duration::from_millis(950),
        "retried after {:?}",
        requests[1].at - requests[0].at
    );
    Ok(())
}

#[tokio::test]
async fn max_per_second_spreads_the_requests() -> TestResult {
    let (url, log) = recording_api(vec![(StatusCode::OK, None)]).await?;
    // One change per request, 4 changes a second: 6 changes span >= 1.25 s.
    let sink = sink(&url, 2)?.with_rate_limit(4);
    let batch: Vec<SinkRecord> = (1..=6).map(|n| record("a", n)).collect();
    let results = sink.deliver(batch).await;
    assert_eq!(results, vec![Ok(()); 6]);
    let requests = seen(&log);
    assert_eq!(requests.len(), 6);
    let span = requests[5].at - requests[0].at;
    assert!(
        span >= Duration::from_millis(1200),
        "6 requests within {span:?}"
    );
    Ok(())
}

#[tokio::test]
async fn what_is_not_an_audience_change_fails_alone() -> TestResult {
    let (url, log) = recording_api(vec![(StatusCode::OK, None)]).await?;
    let mut bad = record("a", 1);
    bad.value = b"{\"type\":\"audience_change\"}".to_vec();
    let results = sink(&url, 100)?.deliver(vec![bad, record("b", 3)]).await;
    assert!(matches!(&results[0], Err(e) if e.starts_with("not an audience change")));
    assert_eq!(results[1], Ok(()));
    assert_eq!(seen(&log).len(), 1);
    Ok(())
}

#[tokio::test]
async fn an_exit_by_merge_is_not_sent() -> TestResult {
    let (url, log) = recording_api(vec![(StatusCode::OK, None)]).await?;
    let mut merged = change("a", 2, AudienceAction::Exited);
    merged.merged_into = Some("prof_b".into());
    let merged = SinkRecord {
        delivery_id: "audiences:0/1/2/0".into(),
        key: Some(b"a".to_vec()),
        value: serde_json::to_vec(&merged)?,
    };
    let results = sink(&url, 100)?.deliver(vec![merged, record("b", 3)]).await;
    assert_eq!(results, vec![Ok(()), Ok(())], "delivered: nothing to send");
    let sent = seen(&log);
    assert_eq!(sent.len(), 1);
    let events: Vec<&str> = sent[0].body["batch"]
        .as_array()
        .ok_or("no batch")?
        .iter()
        .filter_map(|c| c["event"].as_str())
        .collect();
    assert_eq!(events, ["Audience Entered"], "only b's entry");
    Ok(())
}
