use super::*;

#[test]
fn design_scenario_anonymous_then_identify_then_known_user() -> TestResult {
    let mut h = harness(&IdentityConfig::default())?;
    let view =
        json!({"type": "track", "event": "Product Viewed", "anonymousId": "a1", "messageId": "m1"});
    let (p1, _) = resolved(&send(&mut h, &view)?)?;
    let identify = json!({"type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "m2",
        "traits": {"email": "a@example.com"}});
    let (p2, _) = resolved(&send(&mut h, &identify)?)?;
    let order =
        json!({"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "m3"});
    let (p3, identifiers) = resolved(&send(&mut h, &order)?)?;
    assert_eq!((p1.as_str(), p2.as_str()), (p3.as_str(), p3.as_str()));
    assert_eq!(
        identifiers,
        ids(&[
            ("anonymous_id", &["a1"]),
            ("email", &["a@example.com"]),
            ("user_id", &["u1"])
        ])
    );
    assert_eq!(live_profiles(&h).len(), 1);
    Ok(())
}

#[test]
fn merge_emits_merged_first_and_the_strongest_profile_survives() -> TestResult {
    let mut h = harness(&IdentityConfig::default())?;
    let (anon, _) = resolved(&send(
        &mut h,
        &json!({"type": "page", "anonymousId": "a1"}),
    )?)?;
    let (user, _) = resolved(&send(&mut h, &json!({"type": "identify", "userId": "u1"}))?)?;
    let bytes = serde_json::to_vec(
        &json!({"type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "m9",
            "timestamp": "2026-11-26T10:00:00.250Z"}),
    )?;
    let headers = vec![(SOURCE.to_string(), b"web".to_vec())];
    let out = h.process(None, &bytes, &headers)?;
    let both = ids(&[("anonymous_id", &["a1"]), ("user_id", &["u1"])]);
    let expected_merge = ProfileRecord::Merged {
        from: anon.clone(),
        into: user.clone(),
        identifiers: both.clone(),
        cause: Cause {
            message_id: Some("m9".into()),
            tick: None,
        },
        announced: true,
        // The merging event's time, for the exits the merge causes.
        at: crate::messages::parse_time_ms("2026-11-26T10:00:00.250Z"),
    };
    let records = decode(&out)?;
    assert_eq!(records.len(), 2);
    assert_eq!(records[0], expected_merge);
    assert_eq!(out[0].key.as_deref(), Some(anon.as_bytes()));
    assert!(out[0].headers.is_empty());
    assert_eq!(resolved(&records)?, (user.clone(), both));
    assert_eq!(out[1].key.as_deref(), Some(user.as_bytes()));
    assert_eq!(out[1].headers, headers);
    // The merging event names the profile it merged away.
    assert!(
        matches!(&records[1], ProfileRecord::Event { merged_from, .. } if merged_from.as_slice() == std::slice::from_ref(&anon))
    );
    // The old id's identifiers now resolve to the survivor.
    assert_eq!(
        resolved(&send(
            &mut h,
            &json!({"type": "page", "anonymousId": "a1"})
        )?)?
        .0,
        user
    );
    Ok(())
}

#[test]
fn limit_prevents_merge_and_drops_the_shared_anonymous_id() -> TestResult {
    let mut h = harness(&IdentityConfig::default())?;
    let (p1, _) = resolved(&send(
        &mut h,
        &json!({"type": "identify", "userId": "u1", "anonymousId": "a1"}),
    )?)?;
    let out = send(
        &mut h,
        &json!({"type": "identify", "userId": "u2", "anonymousId": "a1"}),
    )?;
    assert_eq!(out.len(), 1, "no merge");
    let (p2, identifiers) = resolved(&out)?;
    assert_ne!(p1, p2);
    assert_eq!(identifiers, ids(&[("user_id", &["u2"])]));
    let profiles = live_profiles(&h);
    assert_eq!(
        profiles.get(&p1),
        Some(&ids(&[("anonymous_id", &["a1"]), ("user_id", &["u1"])]))
    );
    Ok(())
}

#[test]
fn limit_between_two_profiles_keeps_them_apart() -> TestResult {
    let mut h = harness(&IdentityConfig::default())?;
    let (p1, _) = resolved(&send(
        &mut h,
        &json!({"type": "identify", "userId": "u1", "anonymousId": "a1"}),
    )?)?;
    let (p2, _) = resolved(&send(
        &mut h,
        &json!({"type": "identify", "userId": "u2", "anonymousId": "a2"}),
    )?)?;
    // a2 is the weaker of the two linking identifiers: dropped.
    let out = send(
        &mut h,
        &json!({"type": "track", "event": "X", "anonymousId": "a1",
        "context": {"externalIds": [{"id": "a2", "type": "anonymous_id"}]}}),
    )?;
    assert_eq!(out.len(), 1);
    assert_eq!(resolved(&out)?.0, p1);
    assert_eq!(live_profiles(&h).len(), 2);
    assert!(live_profiles(&h).contains_key(&p2));
    Ok(())
}

#[test]
fn a_full_type_keeps_the_event_on_its_profile_without_the_new_value() -> TestResult {
    let cfg = IdentityConfig::default();
    let mut h = harness(&cfg)?;
    let mut profile = String::new();
    for i in 0..6 {
        let event =
            json!({"type": "identify", "userId": "u1", "traits": {"email": format!("e{i}@x.com")}});
        profile = resolved(&send(&mut h, &event)?)?.0;
    }
    let profiles = live_profiles(&h);
    let emails = profiles
        .get(&profile)
        .and_then(|p| p.get("email"))
        .map(Vec::len);
    assert_eq!(emails, Some(5));
    assert_eq!(profiles.len(), 1);
    Ok(())
}

#[test]
fn max_merges_stops_further_merges() -> TestResult {
    let cfg = IdentityConfig {
        max_merges: 1,
        ..IdentityConfig::default()
    };
    let mut h = harness(&cfg)?;
    for a in ["a1", "a2", "a3"] {
        send(&mut h, &json!({"type": "page", "anonymousId": a}))?;
    }
    let out = send(
        &mut h,
        &json!({"type": "page", "anonymousId": "a1", "context": {"device": {"id": "x"},
        "externalIds": [{"id": "a2", "type": "anonymous_id"}]}}),
    )?;
    assert_eq!(out.len(), 2, "first merge allowed");
    let out = send(
        &mut h,
        &json!({"type": "page", "anonymousId": "a2",
        "context": {"externalIds": [{"id": "a3", "type": "anonymous_id"}]}}),
    )?;
    assert_eq!(out.len(), 1, "second merge refused");
    assert_eq!(live_profiles(&h).len(), 2);
    Ok(())
}

#[test]
fn a_refused_merge_audits_only_what_was_kept_off_the_profile() -> TestResult {
    let cfg = IdentityConfig {
        max_merges: 0,
        ..IdentityConfig::default()
    };
    let mut h = harness(&cfg)?;
    send(
        &mut h,
        &json!({"type": "identify", "anonymousId": "k9", "userId": "uK"}),
    )?;
    send(
        &mut h,
        &json!({"type": "identify", "anonymousId": "k1", "traits": {"email": "ek@x.com"}}),
    )?;
    // Joining uK's profile with ek's would be a merge, and none is allowed:
    // the email is kept off; k9, already uK's, was not.
    let out = send(
        &mut h,
        &json!({"type": "identify", "anonymousId": "k9", "userId": "uK",
            "traits": {"email": "ek@x.com"}}),
    )?;
    let dropped = match out.last() {
        Some(ProfileRecord::Event { dropped, .. }) => dropped.clone(),
        other => return Err(format!("expected an event, got {other:?}").into()),
    };
    let kinds: Vec<(&str, &str)> = dropped
        .iter()
        .map(|d| (d.kind.as_str(), d.value.as_str()))
        .collect();
    assert_eq!(kinds, [("email", "ek@x.com")], "{dropped:?}");
    assert_eq!(live_profiles(&h).len(), 2);
    Ok(())
}
