//! What a profile keeps: the binary encoding, bounded sequences and
//! windows, and a future-dated update.

use super::*;

/// A profile stored as JSON (before the binary encoding) loads, goes on
/// exactly as if it had never been re-encoded, and is written back in the
/// binary encoding.
#[test]
fn json_profiles_load_and_are_rewritten_in_the_binary_encoding() -> TestResult {
    let yaml = r#"
seq: {where: {sequence: [{event: A}, {event: B}], within: 1d}}
busy: {where: {event: A, count: {gte: 2}, within: 7d}}
shoes: {where: {trait: favorite, eq: shoes}}
"#;
    let (mut binary, mut json) = (harness(yaml)?, harness(yaml)?);
    type Step<'a> = (Option<(&'a str, Value)>, Value, i64);
    let steps: [Step; 5] = [
        (Some(("A", json!({}))), json!({"favorite": "shoes"}), DAY),
        (Some(("A", json!({}))), json!({"n": [1, 2]}), DAY + HOUR),
        (Some(("B", json!({}))), json!({}), DAY + 2 * HOUR),
        (None, json!({"favorite": null}), 2 * DAY),
        (Some(("A", json!({}))), json!({}), 20 * DAY),
    ];
    for (i, (event, traits, t)) in steps.into_iter().enumerate() {
        if i == 2 {
            let key = profile_key("p");
            let stored = json.state.map.get(key.as_slice()).ok_or("no profile")?;
            assert_eq!(
                stored.first(),
                Some(&crate::profile_keyed::LIVE),
                "stored in the binary encoding"
            );
            let profile: AudienceProfile = crate::profile_keyed::read_state(stored)?;
            json.state.map.insert(key, serde_json::to_vec(&profile)?);
        }
        let a = send(&mut binary, "p", event.clone(), traits.clone(), t)?;
        let b = send(&mut json, "p", event, traits, t)?;
        assert_eq!(summary(&a), summary(&b), "update {i}");
    }
    crate::profile_keyed::assert_rewritten_in_binary(&json.state, &binary.state, "p")
}

/// `not … within 14d` must not turn true because one update carries a
/// time a year ahead of the stream.
#[test]
fn a_future_dated_update_does_not_age_out_recent_events() -> TestResult {
    let mut h = harness(
        "quiet: {where: {not: {event: Order Completed, within: 14d}}}\n\
             active: {where: {event: Order Completed, within: 14d}}",
    )?;
    h.tick(100 * DAY)?;
    let c = send(
        &mut h,
        "p",
        Some(("Order Completed", json!({}))),
        json!({}),
        100 * DAY,
    )?;
    assert_eq!(summary(&c), vec![entered("active")]);
    let c = send(
        &mut h,
        "p",
        Some(("Page Viewed", json!({}))),
        json!({}),
        465 * DAY,
    )?;
    assert!(c.is_empty(), "no change: {:?}", summary(&c));
    // The order's bucket (14d / 30 wide) has left the window by day 115.
    let c = h.tick(115 * DAY)?;
    assert_eq!(
        summary(&changes(&c)?),
        vec![exited("active"), entered("quiet")]
    );
    Ok(())
}

/// A sequence keeps the latest few times per step, finds a match made by
/// a late event, and once it held holds for good, however many events
/// follow (and through a merge).
#[test]
fn sequences_keep_few_times_and_hold_for_good() -> TestResult {
    let mut h = harness("seq: {where: {sequence: [{event: A}, {event: B}], within: 5ms}}")?;
    h.tick(DAY)?;
    let b = send(&mut h, "p", Some(("B", json!({}))), json!({}), DAY + 10)?;
    assert!(b.is_empty());
    // A late A, 3 ms before the B: the sequence happened.
    let a = send(&mut h, "p", Some(("A", json!({}))), json!({}), DAY + 7)?;
    assert_eq!(summary(&a), vec![entered("seq")]);
    // A flood of both steps, never 5 ms apart in order: the match stays.
    for i in 0..1_000i64 {
        let t = DAY + 1_000 + i * 100;
        let (name, at) = if i % 2 == 0 { ("B", t) } else { ("A", t) };
        let c = send(&mut h, "p", Some((name, json!({}))), json!({}), at)?;
        assert!(c.is_empty(), "{:?}", summary(&c));
    }
    let stored = h
        .state
        .map
        .get(profile_key("p").as_slice())
        .ok_or("no profile")?;
    let profile: AudienceProfile = crate::profile_keyed::read_state(stored)?;
    for history in profile.events.values() {
        assert!(history.times.len() <= MAX_SEQUENCE_TIMES);
    }
    assert_eq!(profile.sequences.len(), 1);
    assert!(stored.len() < 4096, "{} bytes", stored.len());
    // Merged into a profile that never matched, the mark travels.
    let merged = serde_json::to_vec(&ProfileUpdate::Merged {
        from: "p".into(),
        into: "q".into(),
        identifiers: Identifiers::new(),
        cause: Cause::default(),
        announced: false,
        at: None,
    })?;
    let out = h.process(Some(b"p"), &merged, &[])?;
    assert_eq!(summary(&changes(&out)?), vec![exited("seq")]);
    let mut entered_q = Vec::new();
    for t in out.iter().filter(|e| e.output == outputs::SELF) {
        entered_q.extend(changes(&h.process(t.key.as_deref(), &t.value, &[])?)?);
    }
    assert_eq!(summary(&entered_q), vec![entered("seq")]);
    let c = send(
        &mut h,
        "q",
        Some(("C", json!({}))),
        json!({}),
        DAY + 500_000,
    )?;
    assert!(c.is_empty(), "{:?}", summary(&c));
    Ok(())
}

/// A bot's events keep at most 31 buckets per windowed filter, not one
/// time per event, and windowed counts stay right.
#[test]
fn windowed_event_history_is_kept_in_buckets() -> TestResult {
    let mut h = harness("busy: {where: {event: A, count: {gte: 3000}, within: 1d}}")?;
    h.tick(DAY)?;
    let mut entered_at = None;
    for i in 0..5_000i64 {
        let t = DAY + i * 20_000;
        let c = send(&mut h, "p", Some(("A", json!({}))), json!({}), t)?;
        if !c.is_empty() && entered_at.is_none() {
            entered_at = Some(i);
        }
    }
    // 3000 events 20 s apart span 16.7 hours: in the window.
    assert_eq!(entered_at, Some(2_999));
    let stored = h
        .state
        .map
        .get(profile_key("p").as_slice())
        .ok_or("no profile")?;
    let profile: AudienceProfile = crate::profile_keyed::read_state(stored)?;
    let history = profile.events.values().next().ok_or("no history")?;
    assert!(history.times.is_empty());
    assert!(
        history.buckets.len() <= 31,
        "{} buckets",
        history.buckets.len()
    );
    assert!(stored.len() < 2048, "{} bytes", stored.len());
    Ok(())
}

/// A state written when a sequence step shared its history with a count
/// of the same event (its times under the count's key) gives the step
/// those times when it is loaded: the sequence completes on its next
/// step, as it would have before. A profile without them does not.
#[test]
fn a_step_takes_its_times_from_a_state_written_before_steps_had_their_own() -> TestResult {
    let yaml = "seq: {where: {sequence: [{event: A}, {event: B}], within: 1d}}";
    let (mut upgraded, mut fresh) = (harness(yaml)?, harness(yaml)?);
    let legacy: AudienceProfile = serde_json::from_value(json!({
        "clock": DAY,
        "events": {r#"{"event":"A","where":[]}"#: {"count": 1, "times": [DAY]}},
    }))?;
    upgraded
        .state
        .map
        .insert(profile_key("p"), serde_json::to_vec(&legacy)?);
    let b = Some(("B", json!({})));
    let c = send(&mut upgraded, "p", b.clone(), json!({}), DAY + HOUR)?;
    assert_eq!(summary(&c), vec![entered("seq")]);
    let c = send(&mut fresh, "p", b, json!({}), DAY + HOUR)?;
    assert_eq!(summary(&c), vec![]);
    Ok(())
}

/// The members per audience go to the reporter as they move; a task that
/// goes away takes its members back out, and the next owner of its state
/// reports them again at its first batch (a tick will do).
#[test]
fn the_size_reporter_follows_the_stored_members() -> TestResult {
    use std::sync::Mutex;
    let told: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
    let reporter = |told: &Arc<Mutex<BTreeMap<String, i64>>>| -> crate::audiences::SizeReporter {
        let told = told.clone();
        Arc::new(move |audience: &str, delta: i64| {
            if let Ok(mut t) = told.lock() {
                *t.entry(audience.to_owned()).or_default() += delta;
            }
        })
    };
    let told_now = |told: &Arc<Mutex<BTreeMap<String, i64>>>| -> BTreeMap<String, i64> {
        told.lock()
            .map(|t| {
                t.iter()
                    .filter(|(_, n)| **n != 0)
                    .map(|(k, n)| (k.clone(), *n))
                    .collect()
            })
            .unwrap_or_default()
    };
    let yaml = "rich: {where: {trait: score, gte: 5}}\npoor: {where: {trait: score, lt: 5}}";
    let set = Arc::new(AudienceSet::new(&defs(yaml)?, &KnownNames::anything())?);
    let mut h = OperatorHarness::new(
        AudiencesOperator::new(set.clone()).with_size_reporter(reporter(&told)),
    );
    h.tick(100)?;
    for (id, score) in [("a", 7), ("b", 9), ("c", 1), ("a", 2)] {
        h.process(
            Some(id.as_bytes()),
            &update(id, None, json!({"score": score}), 100)?,
            &[],
        )?;
        assert_eq!(told_now(&told), stored_sizes(&h.state)?);
    }
    let expected: BTreeMap<String, i64> = [("poor".to_string(), 2), ("rich".to_string(), 1)].into();
    assert_eq!(stored_sizes(&h.state)?, expected);
    let state = h.state.clone();
    drop(h);
    assert!(
        told_now(&told).is_empty(),
        "a dropped task lets go: {:?}",
        told_now(&told)
    );
    let mut next =
        OperatorHarness::new(AudiencesOperator::new(set).with_size_reporter(reporter(&told)));
    next.state = state;
    next.tick(101)?;
    assert_eq!(told_now(&told), expected);
    Ok(())
}
