use std::collections::BTreeSet;

use super::*;

#[test]
fn duplicates_are_dropped_within_the_window_and_forgotten_after() -> TestResult {
    let mut h = harness(None)?;
    let start = messages::parse_time_ms("2026-11-26T10:00:00Z").ok_or("time")?;
    h.tick(start)?;
    let event = track("X", json!({}));
    assert_eq!(send(&mut h, &event)?.len(), 1);
    assert_eq!(send(&mut h, &event)?.len(), 0, "duplicate dropped");
    let window = DEFAULT_DEDUPE_WINDOW.millis();
    h.tick(start + window - 1)?;
    assert_eq!(send(&mut h, &event)?.len(), 0, "still inside the window");
    h.tick(start + window)?;
    assert!(
        h.state.map.is_empty(),
        "expiry removes the key and its timer"
    );
    assert_eq!(send(&mut h, &event)?.len(), 1, "forgotten after the window");
    Ok(())
}

#[test]
fn dedupe_is_per_source() -> TestResult {
    let sources = [source("web", None), source("ios", None)];
    let validator = Validator::new(&sources, &BTreeMap::new(), DEFAULT_DEDUPE_WINDOW)?;
    let mut h = OperatorHarness::new(ValidateOperator::new(Arc::new(validator)));
    let bytes = serde_json::to_vec(&track("X", json!({})))?;
    let ios = vec![(SOURCE.to_string(), b"ios".to_vec())];
    assert_eq!(h.process(None, &bytes, &web())?.len(), 1);
    assert_eq!(h.process(None, &bytes, &ios)?.len(), 1);
    assert_eq!(h.process(None, &bytes, &ios)?.len(), 0);
    Ok(())
}

#[test]
fn dedupe_is_per_partition_key() -> TestResult {
    let mut h = harness(None)?;
    let bytes = serde_json::to_vec(&track("X", json!({})))?;
    // One `messageId` sent for two people (keys a1, a2) on one partition:
    // both kept; each one's retry dropped.
    for key in [b"a1", b"a2"] {
        assert_eq!(h.process(Some(key), &bytes, &web())?.len(), 1);
    }
    for key in [b"a1", b"a2"] {
        assert_eq!(h.process(Some(key), &bytes, &web())?.len(), 0, "a retry");
    }
    Ok(())
}

#[test]
fn zero_window_turns_dedupe_off() -> TestResult {
    let validator = Validator::new(
        &[source("web", None)],
        &BTreeMap::new(),
        Span::from_millis(0),
    )?;
    let mut h = OperatorHarness::new(ValidateOperator::new(Arc::new(validator)));
    let event = track("X", json!({}));
    assert_eq!(send(&mut h, &event)?.len(), 1);
    assert_eq!(send(&mut h, &event)?.len(), 1);
    assert!(h.state.map.is_empty());
    Ok(())
}

#[test]
fn before_the_first_tick_expiry_is_based_on_event_time() -> TestResult {
    let mut h = harness(None)?;
    let event = track("X", json!({}));
    assert_eq!(send(&mut h, &event)?.len(), 1);
    let at = messages::parse_time_ms("2026-11-26T10:00:00Z").ok_or("time")?
        + DEFAULT_DEDUPE_WINDOW.millis();
    h.tick(at - 1)?;
    assert_eq!(send(&mut h, &event)?.len(), 0);
    h.tick(at)?;
    assert_eq!(send(&mut h, &event)?.len(), 1);
    Ok(())
}

#[test]
fn events_without_message_id_are_not_deduped() -> TestResult {
    let mut h = harness(None)?;
    let event = json!({"type": "identify", "userId": "u"});
    assert_eq!(send(&mut h, &event)?.len(), 1);
    assert_eq!(send(&mut h, &event)?.len(), 1);
    Ok(())
}

/// The runtime's timer key for `(at, key)`, written from its documented
/// layout: prefix, sign-flipped big-endian time, key.
fn timer_key(at: i64, key: &[u8]) -> Vec<u8> {
    let at = ((at as u64) ^ (1 << 63)).to_be_bytes();
    [b"\x00cdp/timer/".as_slice(), &at, key].concat()
}

#[test]
fn the_timers_validate_sets_are_exactly_those_its_entries_imply() -> TestResult {
    let mut h = harness(None)?;
    let start = messages::parse_time_ms("2026-11-26T10:00:00Z").ok_or("time")?;
    h.tick(start)?;
    for i in 0..6 {
        let mut event = track("X", json!({}));
        event["messageId"] = json!(format!("m-{}", i % 4));
        send(&mut h, &event)?;
        h.tick(start + 1000 * i)?;
    }
    let timers: BTreeSet<Vec<u8>> = h
        .state
        .map
        .keys()
        .filter(|k| k.starts_with(b"\x00cdp/timer/"))
        .cloned()
        .collect();
    let derived: BTreeSet<Vec<u8>> = h
        .state
        .map
        .iter()
        .filter_map(|(k, v)| dedupe_timer(k, v).map(|at| timer_key(at, k)))
        .collect();
    assert_eq!(derived.len(), 4, "one entry per distinct messageId");
    assert_eq!(timers, derived, "a restore derives the very timers set");
    Ok(())
}

/// A store an earlier version wrote holds its entries as JSON: they still
/// drop duplicates, imply their timers, and expire.
#[test]
fn entries_written_as_json_still_drop_duplicates_and_expire() -> TestResult {
    let mut h = harness(None)?;
    let start = messages::parse_time_ms("2026-11-26T10:00:00Z").ok_or("time")?;
    h.tick(start)?;
    let expires_at = start + 5_000;
    // `send` keys its records `k1`.
    let key = b"dedupe/web/2:k1/m1".to_vec();
    let entry = serde_json::to_vec(&json!({"event_time": start, "expires_at": expires_at}))?;
    assert_eq!(dedupe_timer(&key, &entry), Some(expires_at));
    h.state.map.insert(timer_key(expires_at, &key), Vec::new());
    h.state.map.insert(key, entry.clone());
    // An entry of the layout before per-person keys still expires.
    let legacy = b"dedupe/web/m1".to_vec();
    h.state
        .map
        .insert(timer_key(expires_at, &legacy), Vec::new());
    h.state.map.insert(legacy, entry);
    let event = track("X", json!({}));
    assert_eq!(
        send(&mut h, &event)?.len(),
        0,
        "a duplicate of the JSON entry"
    );
    h.tick(expires_at)?;
    assert!(h.state.map.is_empty(), "the JSON entry expired");
    assert_eq!(send(&mut h, &event)?.len(), 1);
    // Remembered again, in the binary form.
    let stored = h
        .state
        .map
        .get(b"dedupe/web/2:k1/m1".as_slice())
        .ok_or("entry")?;
    assert_eq!(stored.first(), Some(&1));
    Ok(())
}
