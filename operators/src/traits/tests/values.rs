//! What each trait type computes from the events.

use super::*;

#[test]
fn counters_and_aggregations_follow_the_events() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    let out = send(
        &mut h,
        "p1",
        track("Order Completed", DAY, json!({"revenue": 19.99})),
    )?;
    let first = changed(&out)?;
    assert_eq!(first.get("orders"), Some(&json!(1)));
    assert_eq!(first.get("orders_30d"), Some(&json!(1)));
    assert_eq!(first.get("big_orders"), Some(&json!(0)));
    assert_eq!(first.get("revenue_total"), Some(&json!(19.99)));
    assert_eq!(first.get("categories"), Some(&json!([])));
    assert_eq!(
        first.get("favorite_category"),
        None,
        "no value yet: not emitted"
    );

    let out = send(
        &mut h,
        "p1",
        track("Order Completed", 2 * DAY, json!({"revenue": 480})),
    )?;
    let second = changed(&out)?;
    assert_eq!(second.get("orders"), Some(&json!(2)));
    assert_eq!(second.get("big_orders"), Some(&json!(1)));
    assert_eq!(second.get("revenue_total"), Some(&json!(499.99)));
    assert_eq!(second.get("revenue_avg"), Some(&json!(249.995)));
    assert_eq!(
        second.get("revenue_min"),
        None,
        "unchanged min is not emitted"
    );
    assert_eq!(second.get("revenue_max"), Some(&json!(480)));
    assert_eq!(second.get("categories"), None);
    Ok(())
}

#[test]
fn every_event_yields_an_update_even_without_changes() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    send(&mut h, "p1", track("Signed Up", DAY, json!({})))?;
    let out = send(&mut h, "p1", track("Signed Up", 2 * DAY, json!({})))?;
    let ups = updates(&out)?;
    assert_eq!(ups.len(), 1);
    match &ups[0] {
        ProfileUpdate::Update {
            profile_id,
            event,
            traits,
            event_time,
            cause,
            identifiers,
            ..
        } => {
            assert_eq!(profile_id, "p1");
            assert!(traits.is_empty());
            assert_eq!(*event_time, 2 * DAY);
            assert_eq!(
                event.as_ref().and_then(|e| e.get("event")),
                Some(&json!("Signed Up"))
            );
            assert_eq!(
                cause.message_id.as_deref(),
                Some(format!("m{}", 2 * DAY).as_str())
            );
            assert_eq!(identifiers.get("user_id"), Some(&vec!["u_p1".to_string()]));
        }
        other => return Err(format!("unexpected {other:?}").into()),
    }
    Ok(())
}

#[test]
fn unique_list_keeps_the_most_recent_and_unique_count_counts_distinct_values() -> TestResult {
    let mut h = harness(
        "recent: {unique_list: {event: V, property: properties.c, limit: 2}}\n\
             skus: {unique_count: {event: V, property: properties.c}}\n\
             skus_3: {unique_count: {event: V, property: properties.c, limit: 3}}\n\
             skus_w: {unique_count: {event: V, property: properties.c, within: 12d}}",
    )?;
    let mut seen = BTreeMap::new();
    for (t, c) in [
        (DAY, "z"),
        (2 * DAY, "a"),
        (2 * DAY + 3_600_000, "m"),
        (4 * DAY, "z"),
        (15 * DAY, "b"),
    ] {
        let out = send(&mut h, "p", track("V", t, json!({"c": c})))?;
        seen.extend(changed(&out)?);
    }
    // "z" seen again at day 4 and "b" at day 15 are the two most recent,
    // even though "a" and "m" sort first.
    assert_eq!(seen.get("recent"), Some(&json!(["b", "z"])));
    assert_eq!(seen.get("skus"), Some(&json!(4)));
    assert_eq!(
        seen.get("skus_3"),
        Some(&json!(3)),
        "counts up to its limit"
    );
    assert_eq!(
        seen.get("skus_w"),
        Some(&json!(2)),
        "z (day 4) and b (day 15) within 12d"
    );
    Ok(())
}

#[test]
fn most_frequent_ties_go_to_the_smallest_value() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    send(
        &mut h,
        "p",
        track("Product Viewed", 2, json!({"category": "b"})),
    )?;
    let out = send(
        &mut h,
        "p",
        track("Product Viewed", 1, json!({"category": "a"})),
    )?;
    assert_eq!(changed(&out)?.get("favorite_category"), Some(&json!("a")));
    Ok(())
}

#[test]
fn identify_traits_are_last_write_wins_by_event_time() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    let out = send(
        &mut h,
        "p",
        identify(10, json!({"plan": "pro", "email": "a@x.io"})),
    )?;
    let t = changed(&out)?;
    assert_eq!(t.get("plan"), Some(&json!("pro")));
    // An older identify does not overwrite.
    let out = send(&mut h, "p", identify(5, json!({"plan": "free"})))?;
    assert_eq!(changed(&out)?.get("plan"), None);
    // A tie goes to the later arrival; null removes the trait.
    let out = send(
        &mut h,
        "p",
        identify(10, json!({"plan": "team", "email": null})),
    )?;
    let t = changed(&out)?;
    assert_eq!(t.get("plan"), Some(&json!("team")));
    assert_eq!(t.get("email"), Some(&Value::Null));
    Ok(())
}

#[test]
fn identify_traits_in_context_count_too_and_top_level_wins() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    let mut event = identify(10, json!({"plan": "pro"}));
    event["context"] = json!({"traits": {"plan": "free", "company": "acme"}});
    let t = changed(&send(&mut h, "p", event)?)?;
    assert_eq!(t.get("plan"), Some(&json!("pro")));
    assert_eq!(t.get("company"), Some(&json!("acme")));
    Ok(())
}

#[test]
fn comparisons_follow_the_documented_rules() {
    let c = |k: &str, v: Value| Comparison::from_key(k, v).ok().flatten();
    let cases: Vec<(Option<Comparison>, Option<Value>, bool)> = vec![
        (c("eq", json!(1)), Some(json!(1.0)), true),
        (c("eq", json!("a")), None, false),
        (c("ne", json!("a")), None, true),
        (c("ne", json!("a")), Some(json!("b")), true),
        (c("gt", json!(100)), Some(json!(100.5)), true),
        (c("gt", json!(100)), Some(json!("200")), false),
        (
            c("gte", json!("2026-01-01")),
            Some(json!("2026-02-01")),
            true,
        ),
        (c("lt", json!(0)), Some(json!(-1)), true),
        (c("lte", json!(0)), Some(Value::Null), false),
        (c("contains", json!("oe")), Some(json!("shoes")), true),
        (c("contains", json!(2)), Some(json!([1, 2])), true),
        (c("in", json!(["a", "b"])), Some(json!("b")), true),
        (c("in", json!(["a", "b"])), Some(json!("c")), false),
        (c("exists", json!(true)), Some(Value::Null), false),
        (c("exists", json!(false)), None, true),
    ];
    for (i, (cmp, value, want)) in cases.into_iter().enumerate() {
        assert_eq!(
            cmp.map(|c| c.matches(value.as_ref())),
            Some(want),
            "case {i}"
        );
    }
    assert!(Comparison::from_key("in", json!(1)).is_err());
    assert!(Comparison::from_key("exists", json!("yes")).is_err());
    assert_eq!(Comparison::from_key("nope", json!(1)), Ok(None));
}

/// The update carries the event as the text it came in (identity writes
/// it as the collector received it): not encoded again, same meaning;
/// from identity's binary record and from a JSON one alike.
#[test]
fn the_update_forwards_the_event_text_verbatim() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    let text = format!(
        r#"{{"type":"track", "event":"Order Completed","messageId":"m1","timestamp":"{}","properties":{{"revenue":5.0e1,"note":"caf\u00e9 \/"}}}}"#,
        rfc3339_ms(DAY)
    );
    let expected: Value = serde_json::from_str(&text)?;
    let binary = wire::encode_event("p0", &Identifiers::new(), text.as_bytes(), &[], &[""; 0])?;
    let json = format!(r#"{{"type":"event","profile_id":"p1","identifiers":{{}},"event":{text}}}"#);
    for (id, record) in [("p0", binary), ("p1", json.into_bytes())] {
        let out = h.process(Some(id.as_bytes()), &record, &[])?;
        let [update] = out.as_slice() else {
            return Err(format!("expected one update, got {out:?}").into());
        };
        assert_eq!(update.value.first(), Some(&wire::UPDATE_V1));
        match ProfileUpdate::from_bytes(&update.value)? {
            ProfileUpdate::Update { event, traits, .. } => {
                let event = event.ok_or("no event")?;
                assert_eq!(event.text(), Some(text.as_str()), "{id}");
                assert_eq!(event, expected);
                assert_eq!(traits.get("revenue_total"), Some(&json!(50)));
            }
            other => return Err(format!("expected an update, got {other:?}").into()),
        }
    }
    // A record the fast path does not read (spaced out by another
    // producer) gives the same update, its event encoded from the tree.
    let spaced = format!(
        r#"{{ "type": "event", "profile_id": "p2", "identifiers": {{}}, "event": {text} }}"#
    );
    let out = h.process(Some(b"p2"), spaced.as_bytes(), &[])?;
    match updates(&out)?.pop() {
        Some(ProfileUpdate::Update {
            event: Some(event), ..
        }) => assert_eq!(event, expected),
        other => return Err(format!("expected an update, got {other:?}").into()),
    }
    Ok(())
}

/// A profile's identifiers only grow, and a record's broker time bounds a
/// future-dated event before any tick: whether the record is read in place
/// (identity's binary form, a profile's usual record) or decoded whole
/// (JSON).
#[test]
fn identifiers_grow_and_broker_time_bounds_in_either_reading() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    let ids = |pairs: &[(&str, &str)]| -> Identifiers {
        let mut ids = Identifiers::new();
        for (kind, value) in pairs {
            ids.entry((*kind).to_owned())
                .or_default()
                .push((*value).to_owned());
        }
        ids
    };
    let sent = [
        ids(&[("user_id", "u1")]),
        ids(&[("anonymous_id", "a1"), ("user_id", "u1")]),
        ids(&[("user_id", "u1")]),
        ids(&[("anonymous_id", "a2")]),
    ];
    let expected = [
        ids(&[("user_id", "u1")]),
        ids(&[("anonymous_id", "a1"), ("user_id", "u1")]),
        ids(&[("anonymous_id", "a1"), ("user_id", "u1")]),
        ids(&[
            ("anonymous_id", "a1"),
            ("anonymous_id", "a2"),
            ("user_id", "u1"),
        ]),
    ];
    let broker = 10 * DAY;
    let year_ahead = broker + 365 * DAY;
    for binary in [true, false] {
        let id = if binary { "pb" } else { "pj" };
        for (n, (identifiers, want)) in sent.iter().zip(&expected).enumerate() {
            let event = track("Page Viewed", year_ahead, json!({}));
            let mut event = event;
            event["messageId"] = json!(format!("{id}-{n}"));
            let record = ProfileRecord::Event {
                profile_id: id.into(),
                identifiers: identifiers.clone(),
                event: event.into(),
                dropped: Vec::new(),
                merged_from: Vec::new(),
            };
            let bytes = if binary {
                record.to_bytes()?
            } else {
                serde_json::to_vec(&record)?
            };
            let out = h.process_at(Some(id.as_bytes()), &bytes, &[], Some(broker))?;
            match updates(&out)?.as_slice() {
                [ProfileUpdate::Update {
                    identifiers,
                    event_time,
                    time_corrected_from,
                    ..
                }] => {
                    assert_eq!(identifiers, want, "binary {binary}, record {n}");
                    assert_eq!(*event_time, broker, "binary {binary}, record {n}");
                    assert_eq!(*time_corrected_from, Some(year_ahead));
                }
                other => return Err(format!("expected one update, got {other:?}").into()),
            }
        }
    }
    Ok(())
}

#[test]
fn most_frequent_past_its_limit_still_finds_a_value_that_keeps_coming() -> TestResult {
    let mut h = harness("mf: {most_frequent: {event: E, property: properties.c, limit: 2}}")?;
    let mut last = None;
    for (t, c) in [
        "apple", "banana", "zebra", "zebra", "zebra", "zebra", "zebra",
    ]
    .into_iter()
    .enumerate()
    {
        let out = send(&mut h, "p", track("E", t as i64 + 1, json!({ "c": c })))?;
        if let Some(v) = changed(&out)?.remove("mf") {
            last = Some(v);
        }
    }
    assert_eq!(last, Some(json!("zebra")));
    Ok(())
}

proptest::proptest! {
    /// Space-Saving's guarantee, against a plain count of the stream: a
    /// value that makes up more than half of a profile's events is its
    /// most frequent value, whatever the limit (at least 2) and however
    /// many other values come between.
    #[test]
    fn a_majority_value_is_the_most_frequent_whatever_the_limit(
        others in proptest::collection::vec(0u8..40, 0..30),
        extra in 1usize..5,
        limit in 2usize..6,
        seed in proptest::prelude::any::<u64>(),
    ) {
        use proptest::prelude::*;
        let fail = |e: Box<dyn Error>| TestCaseError::fail(e.to_string());
        // The majority value "zz" (it sorts after the others: ties of the
        // least frequent drop the largest), interleaved by a seeded shuffle.
        let mut stream: Vec<String> = others.iter().map(|o| format!("v{o}")).collect();
        stream.extend(std::iter::repeat_n("zz".to_string(), others.len() + extra));
        let mut x = seed | 1;
        for i in (1..stream.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            stream.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let yaml = format!("mf: {{most_frequent: {{event: E, property: properties.c, limit: {limit}}}}}");
        let mut h = harness(&yaml).map_err(fail)?;
        let mut value = None;
        for (t, c) in stream.iter().enumerate() {
            let out = send(&mut h, "p", track("E", t as i64 + 1, json!({ "c": c }))).map_err(fail)?;
            if let Some(v) = changed(&out).map_err(|e| fail(e.into()))?.remove("mf") {
                value = Some(v);
            }
        }
        prop_assert_eq!(value, Some(json!("zz")));
    }
}
