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
