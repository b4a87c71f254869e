use super::*;

fn spec_pointers(event: Value) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut h = harness(None)?;
    match rejection(send(&mut h, &event)) {
        Some(("spec_violation", detail)) => Ok(pointers(&detail)),
        other => Err(format!("expected spec_violation, got {other:?}").into()),
    }
}

/// The event is refused for breaking the spec at exactly `expected`.
fn assert_spec(event: Value, expected: &[&str]) -> TestResult {
    let got = spec_pointers(event.clone())?;
    assert_eq!(got, expected, "{event}");
    Ok(())
}

#[test]
fn spec_type_must_be_a_known_call() -> TestResult {
    assert_spec(json!({"userId": "u1"}), &["/type"])?;
    assert_spec(json!({"type": "purchase", "userId": "u1"}), &["/type"])?;
    assert_spec(json!({"type": 3, "userId": "u1"}), &["/type"])?;
    Ok(())
}

#[test]
fn spec_needs_user_id_or_anonymous_id() -> TestResult {
    assert_spec(json!({"type": "identify"}), &["/userId"])?;
    assert_spec(
        json!({"type": "identify", "userId": "", "anonymousId": null}),
        &["/userId"],
    )?;
    assert_spec(
        json!({"type": "identify", "anonymousId": {"a": 1}}),
        &["/anonymousId"],
    )?;
    let mut h = harness(None)?;
    assert_eq!(
        send(&mut h, &json!({"type": "identify", "anonymousId": "a1"}))?.len(),
        1
    );
    assert_eq!(
        send(&mut h, &json!({"type": "identify", "userId": 42}))?.len(),
        1
    );
    Ok(())
}

#[test]
fn spec_track_needs_an_event_name() -> TestResult {
    assert_spec(json!({"type": "track", "userId": "u"}), &["/event"])?;
    assert_spec(
        json!({"type": "track", "userId": "u", "event": ""}),
        &["/event"],
    )?;
    assert_spec(
        json!({"type": "track", "userId": "u", "event": 7}),
        &["/event"],
    )?;
    Ok(())
}

#[test]
fn spec_group_needs_group_id_and_alias_needs_previous_id() -> TestResult {
    assert_spec(json!({"type": "group", "userId": "u"}), &["/groupId"])?;
    assert_spec(json!({"type": "alias", "userId": "u"}), &["/previousId"])?;
    let mut h = harness(None)?;
    assert_eq!(
        send(
            &mut h,
            &json!({"type": "group", "userId": "u", "groupId": "g"})
        )?
        .len(),
        1
    );
    assert_eq!(
        send(
            &mut h,
            &json!({"type": "alias", "userId": "u", "previousId": "a"})
        )?
        .len(),
        1
    );
    Ok(())
}

#[test]
fn spec_properties_traits_and_context_must_be_objects() -> TestResult {
    let event =
        json!({"type": "identify", "userId": "u", "properties": [1], "traits": "x", "context": 5});
    assert_spec(event, &["/properties", "/traits", "/context"])?;
    Ok(())
}

#[test]
fn spec_message_id_is_a_short_string() -> TestResult {
    let long = "m".repeat(MAX_MESSAGE_ID_CHARS + 1);
    assert_spec(
        json!({"type": "identify", "userId": "u", "messageId": long}),
        &["/messageId"],
    )?;
    assert_spec(
        json!({"type": "identify", "userId": "u", "messageId": 5}),
        &["/messageId"],
    )?;
    let mut h = harness(None)?;
    let ok =
        json!({"type": "identify", "userId": "u", "messageId": "m".repeat(MAX_MESSAGE_ID_CHARS)});
    assert_eq!(send(&mut h, &ok)?.len(), 1);
    Ok(())
}

#[test]
fn spec_timestamp_must_be_iso_8601() -> TestResult {
    assert_spec(
        json!({"type": "identify", "userId": "u", "timestamp": "yesterday"}),
        &["/timestamp"],
    )?;
    assert_spec(
        json!({"type": "identify", "userId": "u", "timestamp": 1700000000}),
        &["/timestamp"],
    )?;
    // ISO 8601 beyond RFC 3339, and an empty time (as none), pass.
    let mut h = harness(None)?;
    for (i, ts) in ["2026-12-03T16:00:00.000+0000", "2026-12-03", ""]
        .iter()
        .enumerate()
    {
        let ok = json!({"type": "identify", "userId": "u", "messageId": format!("m{i}"), "timestamp": ts});
        assert_eq!(send(&mut h, &ok)?.len(), 1, "{ts}");
    }
    Ok(())
}

#[test]
fn null_objects_are_none() -> TestResult {
    let mut h = harness(None)?;
    let event = json!({"type": "track", "userId": "u", "event": "E", "messageId": "n",
        "properties": null, "context": null, "integrations": null});
    assert_eq!(send(&mut h, &event)?.len(), 1);
    // A plan reads `null` properties as none, as it reads absent ones.
    let mut h = harness(Some(shop_plan(
        UnplannedEvents::Allow,
        ViolationPolicy::Block,
    )))?;
    let page = json!({"type": "track", "userId": "u", "event": "Page Viewed", "messageId": "p",
        "properties": null});
    let out = send(&mut h, &page)?;
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].output,
        outputs::NEXT,
        "{:?}",
        String::from_utf8_lossy(&out[0].value)
    );
    assert_spec(
        json!({"type": "track", "userId": "u", "event": "E", "properties": []}),
        &["/properties"],
    )?;
    Ok(())
}

#[test]
fn spec_violations_are_all_collected() -> TestResult {
    let event = json!({"type": "track", "userId": true, "properties": 1, "timestamp": "x", "messageId": ""});
    assert_spec(
        event,
        &[
            "/userId",
            "/event",
            "/properties",
            "/messageId",
            "/timestamp",
        ],
    )?;
    Ok(())
}

#[test]
fn spec_violations_are_rejected_even_when_the_plan_allows() -> TestResult {
    let mut h = harness(Some(shop_plan(
        UnplannedEvents::Allow,
        ViolationPolicy::Allow,
    )))?;
    let r = send(&mut h, &json!({"type": "track", "userId": "u"}));
    assert_eq!(rejection(r).map(|r| r.0), Some("spec_violation"));
    Ok(())
}

#[test]
fn spec_enforces_segment_trait_and_property_limits() -> TestResult {
    let mut h = plan_harness(TrackingPlan::default())?;
    let identify = |traits: Value| json!({"type": "identify", "userId": "u", "traits": traits});
    assert_eq!(
        send(&mut h, &identify(object_with_keys(TRAITS_LIMIT - 1)))?.len(),
        1
    );
    assert_spec(identify(object_with_keys(TRAITS_LIMIT)), &["/traits"])?;
    let group = json!({"type": "group", "userId": "u", "groupId": "g", "traits": object_with_keys(TRAITS_LIMIT + 5)});
    assert_spec(group, &["/traits"])?;
    assert_spec(track("X", object_with_keys(TRAITS_LIMIT)), &["/properties"])?;
    assert_eq!(
        send(&mut h, &track("X", object_with_keys(TRAITS_LIMIT - 1)))?.len(),
        1
    );
    Ok(())
}

#[test]
fn spec_limits_group_id_length() -> TestResult {
    let mut h = plan_harness(TrackingPlan::default())?;
    let group = |id: String| json!({"type": "group", "userId": "u", "groupId": id});
    assert_eq!(
        send(&mut h, &group("g".repeat(MAX_GROUP_ID_CHARS)))?.len(),
        1
    );
    assert_spec(group("g".repeat(MAX_GROUP_ID_CHARS + 1)), &["/groupId"])?;
    Ok(())
}

#[test]
fn spec_checks_integrations_page_names_and_every_time_field() -> TestResult {
    let base = json!({"type": "page", "userId": "u"});
    let with = |field: &str, value: Value| {
        let mut e = base.clone();
        e[field] = value;
        e
    };
    assert_spec(with("integrations", json!(true)), &["/integrations"])?;
    assert_spec(with("name", json!(5)), &["/name"])?;
    for field in ["timestamp", "originalTimestamp", "sentAt", "receivedAt"] {
        assert_spec(with(field, json!("26/11/2026")), &[&format!("/{field}")])?;
    }
    let mut h = plan_harness(TrackingPlan::default())?;
    let ok = json!({"type": "screen", "userId": "u", "name": "Cart", "integrations": {"All": true},
                    "sentAt": "2026-11-26T10:00:00.120Z", "originalTimestamp": "2026-11-26T10:00:00Z",
                    "receivedAt": "2026-11-26T10:00:00.180+01:00"});
    assert_eq!(send(&mut h, &ok)?.len(), 1);
    Ok(())
}
