//! Memberships as events, traits and time change them.

use super::*;

/// Past the `traits_until` of the traits stage's last update, an audience
/// that reads traits keeps its membership until the next update; one that
/// reads only events goes on with the clock.
#[test]
fn trait_audiences_wait_for_the_traits_update_past_traits_until() -> TestResult {
    let yaml = r#"
viewer: {where: {event: Product Viewed, within: 60s}}
quiet_buyer: {where: {all: [{trait: orders_90s, gte: 1}, {not: {audience: viewer}}]}}
"#;
    for still_ordered in [false, true] {
        let mut h = harness(yaml)?;
        let first = update_until(
            "p",
            Some(("Product Viewed", json!({}))),
            json!({"orders_90s": 1}),
            0,
            Some(50_000),
        )?;
        let out = h.process(Some(b"p"), &first, &[])?;
        assert_eq!(summary(&changes(&out)?), vec![entered("viewer")]);
        // The view leaves its window (2 s buckets) after `orders_90s` may
        // have changed: `quiet_buyer` waits for the traits stage.
        let out = h.tick(62_000)?;
        assert_eq!(summary(&changes(&out)?), vec![exited("viewer")]);
        // The traits stage's update for its expiry at 50 s.
        let traits = if still_ordered {
            json!({})
        } else {
            json!({"orders_90s": 0})
        };
        let next = update_until("p", None, traits, 50_000, None)?;
        let out = h.process(Some(b"p"), &next, &[])?;
        let expected = if still_ordered {
            vec![entered("quiet_buyer")]
        } else {
            Vec::new()
        };
        assert_eq!(summary(&changes(&out)?), expected, "{still_ordered}");
    }
    Ok(())
}

#[test]
fn the_design_audiences_load_in_dependency_order() -> TestResult {
    let set = AudienceSet::new(&defs(DESIGN_AUDIENCES)?, &KnownNames::anything())?;
    let order: Vec<&str> = set.order().collect();
    let pos = |n: &str| order.iter().position(|o| *o == n);
    assert!(pos("big_spenders") < pos("lapsing"));
    assert_eq!(order.len(), 3);
    let lapsing = set.audience("lapsing").ok_or("no lapsing")?;
    assert!(
        lapsing.traits.contains("revenue_total"),
        "traits flow through audience refs"
    );
    // Both event conditions on Order Completed without `where` share one
    // filter; the one with `where` has its own, and the sequence's two
    // steps theirs (exact recent times, not a window's buckets).
    assert_eq!(set.filters.len(), 4);
    assert_eq!(set.sequences.len(), 1);
    Ok(())
}

#[test]
fn big_spenders_and_lapsing_follow_events_and_time() -> TestResult {
    let mut h = harness(DESIGN_AUDIENCES)?;
    let order = |rev: i64| Some(("Order Completed", json!({"revenue": rev})));
    assert!(send(&mut h, "p", order(150), json!({"revenue_total": 150}), DAY)?.is_empty());
    let c = send(
        &mut h,
        "p",
        order(450),
        json!({"revenue_total": 600}),
        2 * DAY,
    )?;
    assert_eq!(summary(&c), vec![entered("big_spenders")]);
    let change = &c[0];
    assert_eq!(change.kind, "audience_change");
    assert_eq!(change.profile_id, "p");
    assert_eq!(
        change.traits,
        BTreeMap::from([("revenue_total".to_string(), json!(600))])
    );
    assert_eq!(change.event_time, rfc3339_ms(2 * DAY));
    assert_eq!(
        change.cause.message_id.as_deref(),
        Some(format!("m{}", 2 * DAY).as_str())
    );
    assert_eq!(
        change.identifiers.get("user_id"),
        Some(&vec!["u_p".to_string()])
    );

    // 14 days after the last order's bucket (14d / 30 wide) the big
    // spender is lapsing, by time alone.
    let width = crate::traits::bucket_width(14 * DAY);
    let lapses = (2 * DAY).div_euclid(width) * width + width - 1 + 14 * DAY;
    h.tick(10 * DAY)?;
    assert!(changes(&h.tick(lapses - 1)?)?.is_empty());
    let c = changes(&h.tick(lapses)?)?;
    assert_eq!(summary(&c), vec![entered("lapsing")]);
    assert_eq!(c[0].cause.tick, Some(lapses));
    assert_eq!(c[0].event_time, rfc3339_ms(lapses));
    // The first order's bucket (day 1: a 30d window keeps buckets of a
    // day) leaves the window when its last instant does, at day 32 less
    // 1 ms: both exit.
    assert!(changes(&h.tick(32 * DAY - 2)?)?.is_empty());
    let c = changes(&h.tick(32 * DAY - 1)?)?;
    assert_eq!(summary(&c), vec![exited("big_spenders"), exited("lapsing")]);
    assert!(changes(&h.tick(400 * DAY)?)?.is_empty());
    Ok(())
}

#[test]
fn a_sequence_needs_the_order_and_the_gap() -> TestResult {
    let mut h = harness(DESIGN_AUDIENCES)?;
    let viewed = Some(("Product Viewed", json!({})));
    let bought = Some(("Order Completed", json!({"revenue": 5})));
    // Bought before viewing: no.
    assert!(send(&mut h, "a", bought.clone(), json!({}), DAY)?.is_empty());
    assert!(send(&mut h, "a", viewed.clone(), json!({}), DAY + HOUR)?.is_empty());
    // Bought two days after viewing: no.
    assert!(send(&mut h, "a", bought.clone(), json!({}), 3 * DAY + 2 * HOUR)?.is_empty());
    // A late view, 2 hours before that purchase: yes, by event time.
    let c = send(&mut h, "a", viewed, json!({}), 3 * DAY)?;
    assert_eq!(summary(&c), vec![entered("browsed_then_bought")]);
    // It stays: nothing expires a sequence.
    assert!(changes(&h.tick(100 * DAY)?)?.is_empty());
    Ok(())
}

#[test]
fn sequence_scan_is_exact_on_small_cases() {
    let step = |event, times| Step { times, event };
    let (a, b) = ([1, 5, 9], [3, 6]);
    let (a, b) = (step("A", &a[..]), step("B", &b[..]));
    assert!(sequence_holds(&[a, b], Some(1)));
    assert!(!sequence_holds(&[a, b], Some(0)));
    assert!(sequence_holds(&[a, b], None));
    // B then A then B: 3 -> 5 -> 6 (gap 3); starting at 6 nothing follows.
    assert!(sequence_holds(&[b, a, b], Some(3)));
    assert!(!sequence_holds(&[b, a, b], Some(2)));
    assert!(!sequence_holds(&[a, a], Some(0)), "one event is one step");
    assert!(!sequence_holds(&[], None));
    // One millisecond, two different events: in order either way.
    let (a, b) = (step("A", &[7][..]), step("B", &[7][..]));
    assert!(sequence_holds(&[a, b], Some(0)));
    assert!(sequence_holds(&[b, a], Some(0)));
    // ... but the A cannot be the first and the third step at once.
    assert!(!sequence_holds(&[a, b, a], None));
    let a2 = step("A", &[7, 8][..]);
    assert!(sequence_holds(&[a2, b, a2], Some(1)));
    // Two steps of one name need two different times, even with two
    // events in that millisecond.
    assert!(!sequence_holds(
        &[step("A", &[7, 7][..]), step("A", &[7, 7][..])],
        None
    ));
    // A step of another name resets what the millisecond has seen.
    let (c, b9) = (step("C", &[9][..]), step("B", &[9][..]));
    assert!(sequence_holds(&[a, b, c, b9], Some(2)));
}

/// A profile's identifiers only grow, and a record's broker time bounds a
/// future-dated update before any tick: whether the update is read in
/// place (the traits stage's binary form, a profile's usual record) or
/// decoded whole (JSON).
#[test]
fn identifiers_grow_and_broker_time_bounds_in_either_reading() -> TestResult {
    let mut h = harness("rich: {where: {trait: revenue_total, gte: 500}}")?;
    let broker = 10 * DAY;
    let year_ahead = broker + 365 * DAY;
    let sent = [
        (vec![("user_id", "u1")], json!({"revenue_total": 100})),
        (vec![("anonymous_id", "a1")], json!({})),
        (vec![("user_id", "u1")], json!({"revenue_total": 600})),
    ];
    for binary in [true, false] {
        let id = if binary { "pb" } else { "pj" };
        let mut last = Vec::new();
        for (n, (pairs, traits)) in sent.iter().enumerate() {
            let mut identifiers = Identifiers::new();
            for (kind, value) in pairs {
                identifiers.insert((*kind).to_owned(), vec![(*value).to_owned()]);
            }
            let record = ProfileUpdate::Update {
                profile_id: id.into(),
                identifiers,
                event: None,
                traits: serde_json::from_value(traits.clone())?,
                event_time: year_ahead,
                time_corrected_from: None,
                cause: Cause {
                    message_id: Some(format!("m{n}")),
                    tick: None,
                },
                merged_from: Vec::new(),
                traits_until: None,
            };
            let bytes = if binary {
                record.to_bytes()?
            } else {
                serde_json::to_vec(&record)?
            };
            let out = h.process_at(Some(id.as_bytes()), &bytes, &[], Some(broker))?;
            last = changes(&out)?;
        }
        let [change] = last.as_slice() else {
            return Err(format!("binary {binary}: expected one change, got {last:?}").into());
        };
        assert_eq!(change.action, AudienceAction::Entered);
        assert_eq!(
            change.identifiers,
            Identifiers::from([
                ("anonymous_id".to_owned(), vec!["a1".to_owned()]),
                ("user_id".to_owned(), vec!["u1".to_owned()]),
            ]),
            "binary {binary}"
        );
        assert_eq!(change.event_time, rfc3339_ms(broker), "binary {binary}");
        assert_eq!(change.cause.message_id.as_deref(), Some("m2"));
    }
    Ok(())
}

#[test]
fn a_late_event_never_dates_a_change_before_the_profiles_earlier_ones() -> TestResult {
    let mut h = harness(
        "exactly_one: {where: {event: Order Completed, count: {eq: 1}}}\n\
         three_step: {where: {sequence: [{event: A}, {event: B}, {event: C}], within: 10s}}",
    )?;
    let order = || Some(("Order Completed", json!({})));
    let c = send(&mut h, "p", order(), json!({}), 10 * HOUR)?;
    assert_eq!(summary(&c), vec![entered("exactly_one")]);
    assert_eq!(c[0].event_time, rfc3339_ms(10 * HOUR));
    // An order from two minutes before makes it two: the exit happens as
    // of the profile's time, not before the entry it undoes.
    let c = send(&mut h, "p", order(), json!({}), 10 * HOUR - 120_000)?;
    assert_eq!(summary(&c), vec![exited("exactly_one")]);
    assert_eq!(c[0].event_time, rfc3339_ms(10 * HOUR));
    // C, then A and B late: the sequence is whole when the last step
    // arrives, dated no earlier than C, which the profile had seen.
    let t = 11 * HOUR;
    for (name, at) in [("C", t + 3), ("A", t + 1)] {
        assert!(send(&mut h, "q", Some((name, json!({}))), json!({}), at)?.is_empty());
    }
    let c = send(&mut h, "q", Some(("B", json!({}))), json!({}), t + 2)?;
    assert_eq!(summary(&c), vec![entered("three_step")]);
    assert_eq!(c[0].event_time, rfc3339_ms(t + 3));
    Ok(())
}

#[test]
fn a_dotted_trait_name_reaches_into_an_object_trait() -> TestResult {
    let mut h = harness("berlin: {where: {trait: address.city, eq: Berlin}}")?;
    let c = send(
        &mut h,
        "p",
        None,
        json!({"address": {"city": "Paris"}}),
        HOUR,
    )?;
    assert!(c.is_empty(), "{c:?}");
    let c = send(
        &mut h,
        "p",
        None,
        json!({"address": {"city": "Berlin", "zip": "10115"}}),
        2 * HOUR,
    )?;
    assert_eq!(summary(&c), vec![entered("berlin")]);
    assert_eq!(
        c[0].traits,
        BTreeMap::from([("address.city".to_string(), json!("Berlin"))])
    );
    let c = send(&mut h, "p", None, json!({"address": null}), 3 * HOUR)?;
    assert_eq!(summary(&c), vec![exited("berlin")]);
    Ok(())
}
