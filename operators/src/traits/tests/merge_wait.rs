//! The merging event waits for the transfers it names
//! (`crate::profile_keyed::wait`), at the traits stage.

use super::*;
use crate::profile_keyed::MAX_HELD_INPUTS;

const ORDERS: &str = "orders: {event_counter: {event: Order Completed}}\n\
revenue_total: {aggregation: {event: Order Completed, property: properties.revenue, function: sum}}\n\
recent: {event_counter: {event: Order Completed, within: 1d}}";

fn order(t: i64, revenue: i64) -> Value {
    track("Order Completed", t, json!({"revenue": revenue}))
}

fn merging_event(into: &str, from: &[&str], event: Value) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&ProfileRecord::Event {
        profile_id: into.into(),
        identifiers: Identifiers::new(),
        event: event.into(),
        dropped: Vec::new(),
        merged_from: from.iter().map(|f| (*f).to_owned()).collect(),
    })
}

fn merged(from: &str, into: &str) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&ProfileRecord::Merged {
        from: from.into(),
        into: into.into(),
        identifiers: Identifiers::new(),
        cause: Cause {
            message_id: Some("m-merge".into()),
            tick: None,
        },
        announced: true,
        at: None,
    })
}

/// The one transfer `out` writes to the stage's own input: (key, value).
fn one_transfer(out: &[Emitted]) -> Result<(Vec<u8>, Vec<u8>), Box<dyn Error>> {
    match out
        .iter()
        .filter(|e| e.output == outputs::SELF)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [e] => Ok((e.key.clone().unwrap_or_default(), e.value.clone())),
        other => Err(format!("expected one transfer, got {}", other.len()).into()),
    }
}

/// `a` (two orders) is merged into `b` (one) by a third order; returns
/// the harness and the transfer not delivered yet.
fn merge_pending() -> Result<(OperatorHarness<TraitsOperator>, Vec<u8>), Box<dyn Error>> {
    let mut h = harness(ORDERS)?;
    h.tick(DAY)?;
    send(&mut h, "a", order(DAY - 3, 100))?;
    send(&mut h, "a", order(DAY - 2, 300))?;
    send(&mut h, "b", order(DAY - 1, 200))?;
    let out = h.process(Some(b"a"), &merged("a", "b")?, &[])?;
    let (key, transfer) = one_transfer(&out)?;
    assert_eq!(key, b"b");
    Ok((h, transfer))
}

/// An update's changed traits and `merged_from`.
type UpdateParts = (BTreeMap<String, Value>, Vec<String>);

fn one_update(out: &[Emitted]) -> Result<UpdateParts, Box<dyn Error>> {
    match updates(out)?.as_slice() {
        [ProfileUpdate::Update {
            traits,
            merged_from,
            ..
        }] => Ok((traits.clone(), merged_from.clone())),
        other => Err(format!("expected one update, got {other:?}").into()),
    }
}

#[test]
fn an_event_before_its_transfer_is_held_then_evaluated_once_with_the_merge() -> TestResult {
    let (mut h, transfer) = merge_pending()?;
    let held = h.process(
        Some(b"b"),
        &merging_event("b", &["a"], order(DAY, 50))?,
        &[],
    )?;
    assert!(held.is_empty(), "held until a's state is in: {held:?}");
    // Later events for b wait behind it.
    let later = send(&mut h, "b", order(DAY + 1, 1))?;
    assert!(later.is_empty());
    let out = h.process(Some(b"b"), &transfer, &[])?;
    let updates = updates(&out)?;
    assert_eq!(updates.len(), 2, "the merging event, then the later one");
    let (traits, merged_from) = one_update(&out[..1])?;
    assert_eq!(traits.get("orders"), Some(&json!(4)));
    assert_eq!(traits.get("revenue_total"), Some(&json!(650)));
    assert_eq!(merged_from, vec!["a".to_string()]);
    assert_eq!(changed(&out)?.get("orders"), Some(&json!(5)));
    assert!(!h.state.map.contains_key(b"wait/b".as_slice()));
    Ok(())
}

#[test]
fn a_transfer_before_its_event_waits_for_it() -> TestResult {
    let (mut h, transfer) = merge_pending()?;
    let early = h.process(Some(b"b"), &transfer, &[])?;
    assert!(early.is_empty(), "no update before the event: {early:?}");
    let out = h.process(
        Some(b"b"),
        &merging_event("b", &["a"], order(DAY, 50))?,
        &[],
    )?;
    let (traits, _) = one_update(&out)?;
    assert_eq!(traits.get("orders"), Some(&json!(4)));
    assert!(!h.state.map.contains_key(b"wait/b".as_slice()));
    Ok(())
}

#[test]
fn a_profile_never_seen_still_sends_an_empty_transfer() -> TestResult {
    let mut h = harness(ORDERS)?;
    send(&mut h, "b", order(DAY, 200))?;
    let out = h.process(Some(b"x"), &merged("x", "b")?, &[])?;
    let (_, transfer) = one_transfer(&out)?;
    assert!(h
        .process(Some(b"b"), &merging_event("b", &["x"], order(DAY, 1))?, &[])?
        .is_empty());
    let (traits, _) = one_update(&h.process(Some(b"b"), &transfer, &[])?)?;
    assert_eq!(traits.get("orders"), Some(&json!(2)));
    Ok(())
}

#[test]
fn timers_of_a_waiting_profile_wait_too() -> TestResult {
    let (mut h, transfer) = merge_pending()?;
    h.process(
        Some(b"b"),
        &merging_event("b", &["a"], order(DAY, 50))?,
        &[],
    )?;
    // Every order leaves `recent` by now; b is waiting: nothing happens.
    assert!(h.tick(3 * DAY)?.is_empty());
    let (traits, _) = one_update(&h.process(Some(b"b"), &transfer, &[])?)?;
    assert_eq!(traits.get("orders"), Some(&json!(4)));
    assert_eq!(traits.get("recent"), Some(&json!(0)));
    Ok(())
}

/// A merge of the waiting profile itself is held too: the held event is
/// evaluated for it first, then its state (with the merge) moves on.
#[test]
fn a_waiting_profile_is_merged_away_only_after_its_held_event() -> TestResult {
    let (mut h, transfer) = merge_pending()?;
    h.process(
        Some(b"b"),
        &merging_event("b", &["a"], order(DAY, 50))?,
        &[],
    )?;
    assert!(h.process(Some(b"b"), &merged("b", "c")?, &[])?.is_empty());
    let out = h.process(Some(b"b"), &transfer, &[])?;
    let (traits, _) = one_update(&out[..1])?;
    assert_eq!(traits.get("orders"), Some(&json!(4)));
    assert!(
        matches!(updates(&out)?.as_slice(), [_, ProfileUpdate::Merged { from, into, .. }] if from == "b" && into == "c")
    );
    let (key, to_c) = one_transfer(&out)?;
    assert_eq!(key, b"c");
    let out = h.process(Some(b"c"), &merging_event("c", &["b"], order(DAY, 1))?, &[])?;
    assert!(out.is_empty());
    let (traits, _) = one_update(&h.process(Some(b"c"), &to_c, &[])?)?;
    assert_eq!(traits.get("orders"), Some(&json!(5)));
    Ok(())
}

/// Past the bound the oldest held input goes through without the
/// transfer it lacks (counted), and the rest with it (they wait for
/// nothing else); the transfer is folded in when it comes.
#[test]
fn at_most_max_held_inputs_wait_per_profile() -> TestResult {
    let (mut h, transfer) = merge_pending()?;
    h.process(
        Some(b"b"),
        &merging_event("b", &["a"], order(DAY, 50))?,
        &[],
    )?;
    for _ in 1..MAX_HELD_INPUTS {
        assert!(send(&mut h, "b", order(DAY, 1))?.is_empty());
    }
    let out = send(&mut h, "b", order(DAY, 1))?;
    assert_eq!(updates(&out)?.len(), MAX_HELD_INPUTS + 1);
    let (traits, _) = one_update(&out[..1])?;
    assert_eq!(
        traits.get("orders"),
        Some(&json!(2)),
        "b and the event only"
    );
    let limited = out[0]
        .headers
        .iter()
        .find(|(k, _)| k == STATE_LIMIT_HEADER)
        .map(|(_, v)| v.clone());
    assert_eq!(limited.as_deref(), Some(b"merge_wait".as_slice()));
    assert!(!h.state.map.keys().any(|k| k.starts_with(b"wait-held/")));
    // The late transfer is folded in on arrival.
    let out = h.process(Some(b"b"), &transfer, &[])?;
    assert_eq!(
        changed(&out)?.get("orders"),
        Some(&json!(MAX_HELD_INPUTS + 1 + 2 + 1))
    );
    assert!(h.state.map.keys().all(|k| !k.starts_with(b"wait")));
    Ok(())
}

#[test]
fn a_retired_profiles_events_go_on_to_its_survivor_and_a_bad_one_is_refused() -> TestResult {
    let (mut h, _transfer) = merge_pending()?;
    // `a` is retired into `b`: its event is readdressed, not evaluated.
    let mut identifiers = Identifiers::new();
    identifiers.insert("user_id".into(), vec!["u_a".into()]);
    let late = serde_json::to_vec(&ProfileRecord::Event {
        profile_id: "a".into(),
        identifiers: identifiers.clone(),
        event: order(DAY, 50).into(),
        dropped: vec![serde_json::from_value(
            json!({"type": "email", "value": "x", "reason": "blocked_pattern"}),
        )?],
        merged_from: Vec::new(),
    })?;
    let out = h.process(Some(b"a"), &late, &[])?;
    assert!(updates(&out)?.is_empty(), "nothing evaluated for a");
    let (key, forwarded) = one_transfer(&out)?;
    assert_eq!(key, b"b");
    match ProfileRecord::from_bytes(&forwarded)? {
        ProfileRecord::Event {
            profile_id,
            identifiers: got,
            event,
            dropped,
            merged_from,
        } => {
            assert_eq!(profile_id, "b");
            assert_eq!(got, identifiers);
            assert_eq!(event, order(DAY, 50));
            assert!(dropped.is_empty(), "counted at the first hop");
            assert!(merged_from.is_empty());
        }
        other => return Err(format!("expected the event for b, got {other:?}").into()),
    }
    // An event that is not an object is refused, retired profile or not.
    for id in ["a", "b"] {
        match h.process(Some(id.as_bytes()), &event_record(id, json!([1]))?, &[]) {
            Err(OperatorError::Rejected { reason, .. }) => assert_eq!(reason, "invalid_event"),
            other => return Err(format!("expected invalid_event for {id}, got {other:?}").into()),
        }
    }
    Ok(())
}

/// A store an earlier version wrote (a redirect under `redirect/a`, `b`'s
/// wait header under `wait/b` beside a state in postcard version 1) goes
/// on exactly as the same store in the current layout: the late event
/// for `a` follows its redirect, `b`'s held events wait for `a`'s transfer
/// and are evaluated once it is in, and the waits are gone after.
#[test]
fn a_store_of_the_earlier_layout_keeps_its_redirects_and_waits() -> TestResult {
    let (mut current, transfer) = merge_pending()?;
    send(&mut current, "c", order(DAY - 1, 70))?;
    let held = current.process(
        Some(b"b"),
        &merging_event("b", &["a"], order(DAY, 50))?,
        &[],
    )?;
    assert!(held.is_empty());
    let mut earlier = harness(ORDERS)?;
    earlier.now_ms = current.now_ms;
    earlier.state.map =
        crate::profile_keyed::to_earlier_layout::<ProfileState>(&current.state.map)?;
    assert!(earlier.state.map.contains_key(b"redirect/a".as_slice()));
    assert!(earlier.state.map.contains_key(b"wait/b".as_slice()));
    let b = earlier.state.map.get(profile_key("b").as_slice());
    assert_eq!(b.and_then(|v| v.first()), Some(&1), "b in postcard v1");

    let late_for_a = event_record("a", order(DAY + 1, 5))?;
    let later_for_b = event_record("b", order(DAY + 2, 10))?;
    let steps: [(&[u8], &[u8]); 4] = [
        (b"a", &late_for_a),
        (b"b", &later_for_b),
        (b"b", &transfer),
        (b"c", &event_record("c", order(DAY + 3, 1))?),
    ];
    for (i, (key, value)) in steps.into_iter().enumerate() {
        let want = current.process(Some(key), value, &[])?;
        let got = earlier.process(Some(key), value, &[])?;
        assert_eq!(got, want, "step {i}");
        if i == 2 {
            assert_eq!(
                updates(&got)?.len(),
                2,
                "both held events, once the merge is in"
            );
        }
    }
    assert_eq!(current.tick(3 * DAY)?, earlier.tick(3 * DAY)?);
    assert!(earlier.state.map.keys().all(|k| !k.starts_with(b"wait")));
    Ok(())
}
