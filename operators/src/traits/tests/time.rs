//! Event time and windows: future-dated events, late ones, windows that
//! slide with stream time and what each update says about them.

use super::*;

/// One event dated a year ahead (a wrong device clock) must not move the
/// profile's clock: before the bound it pruned `orders_30d` to nothing.
#[test]
fn a_future_dated_event_does_not_prune_the_windows_of_its_profile() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    h.tick(100 * DAY)?;
    let out = send(
        &mut h,
        "p1",
        track("Order Completed", 100 * DAY, json!({"revenue": 5})),
    )?;
    assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(1)));
    let year_ahead = 465 * DAY;
    let out = send(&mut h, "p1", track("Page Viewed", year_ahead, json!({})))?;
    assert!(
        !changed(&out)?.contains_key("orders_30d"),
        "the order is still in its window: {:?}",
        changed(&out)?
    );
    match updates(&out)?.first() {
        Some(ProfileUpdate::Update {
            event_time,
            time_corrected_from,
            ..
        }) => {
            assert_eq!(*event_time, 100 * DAY, "taken to happen at stream time");
            assert_eq!(*time_corrected_from, Some(year_ahead));
        }
        other => return Err(format!("expected an update, got {other:?}").into()),
    }
    assert!(out
        .iter()
        .any(|e| e.headers.iter().any(|(k, _)| k == TIME_CORRECTED_HEADER)));
    // A late event inside the window still counts; within the tolerance
    // a slightly-ahead clock is kept as is.
    let out = send(
        &mut h,
        "p1",
        track("Order Completed", 80 * DAY, json!({"revenue": 5})),
    )?;
    assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(2)));
    let out = send(
        &mut h,
        "p1",
        track(
            "Order Completed",
            100 * DAY + 1_800_000,
            json!({"revenue": 5}),
        ),
    )?;
    assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(3)));
    // The window then slides with stream time as before.
    let out = h.tick(111 * DAY)?;
    assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(2)));
    Ok(())
}

#[test]
fn a_future_dated_event_can_be_dead_lettered_instead() -> TestResult {
    let set = Arc::new(
        TraitSet::new(&serde_yaml::from_str(DESIGN_TRAITS)?)?.with_event_time(
            crate::event_time::EventTimeConfig {
                beyond: crate::event_time::FutureTimePolicy::DeadLetter,
                ..Default::default()
            },
        ),
    );
    let mut h = OperatorHarness::new(TraitsOperator::new(set));
    h.tick(100 * DAY)?;
    let bytes = event_record("p1", track("Order Completed", 465 * DAY, json!({})))?;
    match h.process(Some(b"p1"), &bytes, &[]) {
        Err(OperatorError::Rejected { reason, .. }) => assert_eq!(reason, "future_event_time"),
        other => return Err(format!("expected a dead letter, got {other:?}").into()),
    }
    assert!(
        cdp_pipeline::store::StateBackend::scan_prefix(&h.state, b"profile/")?.is_empty(),
        "nothing stored"
    );
    Ok(())
}

#[test]
fn value_traits_use_event_time_not_arrival() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    let viewed = |t: i64, cat: &str, sku: &str| {
        track("Product Viewed", t, json!({"category": cat, "sku": sku}))
    };
    send(&mut h, "p", viewed(5 * DAY, "shoes", "s5"))?;
    send(&mut h, "p", viewed(3 * DAY, "hats", "s3"))?;
    send(&mut h, "p", viewed(4 * DAY, "hats", "s4"))?;
    let out = send(&mut h, "p", viewed(DAY, "bags", "s1"))?;
    let page = |t: i64, src: &str| {
        json!({"type": "page", "messageId": format!("pg{t}"), "timestamp": rfc3339_ms(t),
                   "context": {"campaign": {"source": src}}})
    };
    let p1 = send(&mut h, "p", page(9 * DAY, "late"))?;
    let p2 = send(&mut h, "p", page(8 * DAY, "early"))?;
    let mut all = BTreeMap::new();
    for o in [&out, &p1, &p2] {
        all.extend(changed(o)?);
    }
    // The last arrival ("bags") is the earliest: last_product stays s5.
    let st = h
        .state
        .map
        .get(profile_key("p").as_slice())
        .ok_or("no state")?;
    let state: ProfileState = crate::profile_keyed::read_state(st)?;
    let set = trait_set(DESIGN_TRAITS)?;
    let values = state.values(&set, state.clock);
    assert_eq!(values.get("last_product"), Some(&json!("s5")));
    assert_eq!(values.get("favorite_category"), Some(&json!("hats")));
    assert_eq!(
        values.get("categories"),
        Some(&json!(["hats", "shoes"])),
        "limit 2 keeps the two most recent by event time (bags, the last to arrive, is the oldest)"
    );
    assert_eq!(values.get("first_campaign"), Some(&json!("early")));
    assert_eq!(all.get("first_campaign"), Some(&json!("early")));
    Ok(())
}

fn traits_until(out: &[Emitted]) -> Result<Vec<Option<i64>>, RecordError> {
    Ok(updates(out)?
        .into_iter()
        .filter_map(|u| match u {
            ProfileUpdate::Update { traits_until, .. } => Some(traits_until),
            _ => None,
        })
        .collect())
}

/// The audiences stage holds trait audiences past `traits_until` until the
/// next update: a window expiry that changes no value still sends one.
#[test]
fn a_window_expiry_that_changes_no_value_still_announces_the_next() -> TestResult {
    let mut h = harness(
        "biggest_30d: {aggregation: {event: Order Completed, property: properties.revenue, \
         function: max, within: 30d}}",
    )?;
    send(
        &mut h,
        "p",
        track("Order Completed", DAY, json!({"revenue": 5})),
    )?;
    let out = send(
        &mut h,
        "p",
        track("Order Completed", 10 * DAY, json!({"revenue": 9})),
    )?;
    assert_eq!(changed(&out)?.get("biggest_30d"), Some(&json!(9)));
    assert_eq!(traits_until(&out)?, vec![Some(32 * DAY - 1)]);
    // The 5 leaves the window; the max is still 9.
    let out = h.tick(32 * DAY - 1)?;
    assert!(changed(&out)?.is_empty());
    assert_eq!(traits_until(&out)?, vec![Some(41 * DAY - 1)]);
    let out = h.tick(41 * DAY - 1)?;
    assert_eq!(changed(&out)?.get("biggest_30d"), Some(&Value::Null));
    assert_eq!(traits_until(&out)?, vec![None]);
    Ok(())
}

#[test]
fn windows_slide_with_stream_time() -> TestResult {
    let mut h = harness("orders_30d: {event_counter: {event: Order Completed, within: 30d}}")?;
    send(&mut h, "p", track("Order Completed", DAY, json!({})))?;
    let out = send(&mut h, "p", track("Order Completed", 10 * DAY, json!({})))?;
    assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(2)));
    // The first order's bucket (day 1; a 30d window has buckets of one
    // day) leaves the window when its last instant does: at day 32 less
    // 1 ms. A window counts at most one bucket width (1/30) more.
    let leaves = 32 * DAY - 1;
    // Every update says until when its windowed values hold.
    assert_eq!(traits_until(&out)?, vec![Some(leaves)]);
    assert!(h.tick(leaves - 1)?.is_empty());
    let out = h.tick(leaves)?;
    let ups = updates(&out)?;
    assert_eq!(ups.len(), 1);
    match &ups[0] {
        ProfileUpdate::Update {
            traits,
            event,
            cause,
            event_time,
            traits_until,
            ..
        } => {
            assert_eq!(traits.get("orders_30d"), Some(&json!(1)));
            assert!(event.is_none());
            assert_eq!(cause.tick, Some(leaves));
            assert_eq!(*event_time, leaves);
            // The day-10 bucket is next.
            assert_eq!(*traits_until, Some(41 * DAY - 1));
        }
        other => return Err(format!("unexpected {other:?}").into()),
    }
    let out = h.tick(45 * DAY)?;
    assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(0)));
    assert_eq!(traits_until(&out)?, vec![None], "nothing left to expire");
    assert!(h.tick(100 * DAY)?.is_empty(), "no timer left");
    // A late event already out of the window changes nothing.
    let out = send(&mut h, "p", track("Order Completed", 2 * DAY, json!({})))?;
    assert!(changed(&out)?.is_empty());
    Ok(())
}
