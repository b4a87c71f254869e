use super::*;
use crate::messages::{AuditDrop, MergedFrom};

/// Feed an event; the profile snapshots it produced, by profile id.
fn snapshots(
    h: &mut OperatorHarness<IdentityOperator>,
    event: &Value,
) -> Result<BTreeMap<String, ProfileSnapshot>, Box<dyn std::error::Error>> {
    let out = h.process(None, &serde_json::to_vec(event)?, &[])?;
    let mut by_id = BTreeMap::new();
    for e in out.iter().filter(|e| e.output == outputs::PROFILES) {
        let s: ProfileSnapshot = serde_json::from_slice(&e.value)?;
        assert_eq!(e.key.as_deref(), Some(s.profile_id.as_bytes()));
        by_id.insert(s.profile_id.clone(), s);
    }
    Ok(by_id)
}

#[test]
fn blocked_values_and_patterns_per_type_refuse_only_that_type() -> TestResult {
    let mut cfg = IdentityConfig::default();
    let mut device = IdentifierRule::new(1, 4);
    device.blocked_values = vec!["Unknown".into()];
    device.blocked_patterns = vec!["^emulator-".into()];
    cfg.identifiers.insert("device_id".into(), device);
    let mut h = harness(&cfg)?;
    let out = h.process(
        None,
        &serde_json::to_vec(&json!({"type": "track", "event": "X", "userId": "unknown",
            "anonymousId": "emulator-1", "context": {"device": {"id": " UNKNOWN "}}}))?,
        &[],
    )?;
    let records = decode(&out)?;
    let Some(ProfileRecord::Event {
        identifiers,
        dropped,
        ..
    }) = records.last()
    else {
        return Err("no event".into());
    };
    // "unknown" is blocked for devices only; the pattern for devices only.
    assert_eq!(
        identifiers,
        &ids(&[("anonymous_id", &["emulator-1"]), ("user_id", &["unknown"])])
    );
    assert_eq!(
        dropped,
        &vec![DroppedIdentifier {
            kind: "device_id".into(),
            value: " UNKNOWN ".into(),
            reason: "blocked_value".into(),
        }]
    );
    let out = h.process(
        None,
        &serde_json::to_vec(&json!({"type": "track", "event": "X", "userId": "u1",
            "context": {"device": {"id": "emulator-5554"}}}))?,
        &[],
    )?;
    let records = decode(&out)?;
    assert!(
        matches!(records.last(), Some(ProfileRecord::Event { dropped, .. })
        if dropped.len() == 1 && dropped[0].reason == "blocked_pattern")
    );
    assert!(IdentityRules::new(&IdentityConfig {
        identifiers: BTreeMap::from([(
            "email".into(),
            IdentifierRule {
                blocked_patterns: vec!["(".into()],
                ..IdentifierRule::new(1, 1)
            }
        )]),
        ..IdentityConfig::default()
    })
    .err()
    .is_some_and(|e| e.path == "identity.identifiers.email.blocked_patterns[0]"));
    Ok(())
}

#[test]
fn alias_previous_id_keeps_the_type_the_graph_knows() -> TestResult {
    let mut cfg = IdentityConfig::default();
    cfg.identifiers
        .insert("user_id".into(), IdentifierRule::new(2, 1));
    let mut h = harness(&cfg)?;
    let (old, _) = resolved(&send(
        &mut h,
        &json!({"type": "identify", "userId": "old-u"}),
    )?)?;
    let (anon, _) = resolved(&send(
        &mut h,
        &json!({"type": "page", "anonymousId": "a1"}),
    )?)?;
    // An old userId as the previous id: a user id, so the profiles merge.
    let out = send(
        &mut h,
        &json!({"type": "alias", "userId": "new-u", "previousId": "old-u"}),
    )?;
    let (profile, identifiers) = resolved(&out)?;
    assert_eq!(profile, old);
    assert_eq!(identifiers, ids(&[("user_id", &["new-u", "old-u"])]));
    // An anonymous id as the previous id.
    let out = send(
        &mut h,
        &json!({"type": "alias", "userId": "new-u", "previousId": "a1"}),
    )?;
    assert!(
        matches!(&out[0], ProfileRecord::Merged { from, into, .. } if *from == anon && *into == old)
    );
    // Never seen before: an anonymous id.
    let (_, identifiers) = resolved(&send(
        &mut h,
        &json!({"type": "alias", "userId": "new-u", "previousId": "fresh"}),
    )?)?;
    assert_eq!(
        identifiers.get("anonymous_id"),
        Some(&vec!["a1".to_string(), "fresh".to_string()])
    );
    Ok(())
}

#[test]
fn profiles_topic_carries_merges_and_the_audit_trail() -> TestResult {
    let mut h = harness(&IdentityConfig::default())?;
    let created = snapshots(
        &mut h,
        &json!({"type": "page", "anonymousId": "a1", "timestamp": "2026-11-26T10:00:00Z"}),
    )?;
    let anon = created.keys().next().cloned().ok_or("no snapshot")?;
    assert_eq!(created[&anon].state, ProfileStatus::Active);
    let user = snapshots(&mut h, &json!({"type": "identify", "userId": "u1"}))?
        .into_keys()
        .next()
        .ok_or("no snapshot")?;
    // Seen again with nothing new: no snapshot.
    assert!(snapshots(&mut h, &json!({"type": "page", "anonymousId": "a1"}))?.is_empty());
    let merge = snapshots(
        &mut h,
        &json!({"type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "m9",
            "timestamp": "2026-11-26T10:00:05Z"}),
    )?;
    let gone = &merge[&anon];
    assert_eq!(gone.state, ProfileStatus::Merged);
    assert_eq!(gone.merged_into.as_deref(), Some(user.as_str()));
    assert_eq!(gone.identifiers, ids(&[("anonymous_id", &["a1"])]));
    let survivor = &merge[&user];
    assert_eq!(survivor.state, ProfileStatus::Active);
    assert_eq!(
        survivor.merged_from,
        vec![MergedFrom {
            id: anon.clone(),
            at: Some("2026-11-26T10:00:05Z".into()),
            message_id: Some("m9".into()),
        }]
    );
    assert_eq!(survivor.merges, 1);
    // A second user id breaks user_id's limit of 1: refused, on the trail,
    // once however often it comes.
    let event =
        json!({"type": "identify", "userId": "u2", "anonymousId": "a1", "messageId": "m10"});
    // a1 (priority 3) is the weakest identifier in the conflict: dropped,
    // and u2 starts a profile of its own that records why.
    let refused = snapshots(&mut h, &event)?;
    assert_eq!(refused.len(), 1, "{refused:?}");
    let (id, own) = refused.iter().next().ok_or("no snapshot")?;
    assert_ne!(id, &user);
    assert_eq!(own.identifiers, ids(&[("user_id", &["u2"])]));
    assert_eq!(
        own.dropped,
        vec![AuditDrop {
            identifier: DroppedIdentifier {
                kind: "anonymous_id".into(),
                value: "a1".into(),
                reason: "limit".into(),
            },
            at: None,
            message_id: Some("m10".into()),
        }]
    );
    let audit: Vec<_> = live_snapshot_drops(
        &mut h,
        &json!({"type": "identify", "userId": "u1",
        "context": {"externalIds": [{"id": "u3", "type": "user_id"}]}}),
    )?;
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0].identifier.reason, "limit");
    assert!(
        snapshots(
            &mut h,
            &json!({"type": "identify", "userId": "u1",
        "context": {"externalIds": [{"id": "u3", "type": "user_id"}]}})
        )?
        .is_empty(),
        "a repeated refusal changes nothing"
    );
    Ok(())
}

/// The audit trail of the profile the event lands on, from its snapshot.
fn live_snapshot_drops(
    h: &mut OperatorHarness<IdentityOperator>,
    event: &Value,
) -> Result<Vec<AuditDrop>, Box<dyn std::error::Error>> {
    let snaps = snapshots(h, event)?;
    let live = snaps
        .into_values()
        .find(|s| s.state == ProfileStatus::Active)
        .ok_or("no live snapshot")?;
    Ok(live.dropped)
}

#[test]
fn the_audit_trail_is_bounded() -> TestResult {
    let mut h = harness(&IdentityConfig::default())?;
    for i in 0..(MAX_AUDIT_DROPS + 20) {
        send(
            &mut h,
            &json!({"type": "identify", "userId": "u1",
                "context": {"externalIds": [{"id": format!("zz-{i}"), "type": "user_id"}]}}),
        )?;
    }
    let state: ProfileState = h
        .state
        .map
        .iter()
        .find_map(|(k, v)| {
            k.starts_with(b"profile/")
                .then(|| super::super::stored::decode(k, v).ok())
                .flatten()
        })
        .ok_or("no profile")?;
    assert_eq!(state.dropped.len(), MAX_AUDIT_DROPS);
    assert_eq!(
        state.dropped.last().map(|d| d.identifier.value.clone()),
        Some(format!("zz-{}", MAX_AUDIT_DROPS + 19))
    );
    Ok(())
}

/// A graph whose profile states were written as JSON (before postcard)
/// resolves exactly as one written in postcard, and each profile is
/// rewritten in postcard the next time it changes.
#[test]
fn states_written_as_json_still_resolve_and_are_rewritten_in_postcard() -> TestResult {
    let before = [
        json!({"type": "track", "event": "X", "anonymousId": "a1"}),
        json!({"type": "track", "event": "X", "anonymousId": "a2"}),
        json!({"type": "identify", "userId": "u1", "anonymousId": "a1"}),
    ];
    let after = [
        // Merges a2's profile into u1's: both change.
        json!({"type": "identify", "userId": "u1", "anonymousId": "a2",
            "traits": {"email": "u1@example.com"}}),
        json!({"type": "track", "event": "Y", "anonymousId": "a1"}),
    ];
    let (mut binary, mut legacy) = (
        harness(&IdentityConfig::default())?,
        harness(&IdentityConfig::default())?,
    );
    for event in &before {
        send(&mut binary, event)?;
        send(&mut legacy, event)?;
    }
    let mut rewritten = 0;
    for (key, value) in legacy.state.map.iter_mut() {
        if key.starts_with(b"profile/") {
            let state = super::super::stored::decode(key, value)?;
            *value = serde_json::to_vec(&state)?;
            rewritten += 1;
        }
    }
    assert_eq!(rewritten, 2, "two profiles before the merge");
    for event in &after {
        let outputs = |h: &mut OperatorHarness<IdentityOperator>| -> Result<Vec<Emitted>, Box<dyn std::error::Error>> {
            let bytes = serde_json::to_vec(event)?;
            Ok(h.process(None, &bytes, &[])?)
        };
        assert_eq!(outputs(&mut legacy)?, outputs(&mut binary)?, "{event}");
    }
    assert_eq!(
        legacy.state.map, binary.state.map,
        "every changed profile rewritten in postcard"
    );
    assert!(legacy
        .state
        .map
        .iter()
        .filter(|(k, _)| k.starts_with(b"profile/"))
        .all(|(_, v)| v.first() == Some(&super::super::stored::POSTCARD)));
    Ok(())
}

#[test]
fn times_beyond_the_tolerance_are_written_at_the_reference_time() -> TestResult {
    let rules = IdentityRules::new(&IdentityConfig::default())?.with_event_time(
        crate::event_time::EventTimeConfig {
            max_future: cdp_pipeline::Span::from_secs(3600),
            beyond: crate::event_time::FutureTimePolicy::DeadLetter,
        },
    );
    let mut h = OperatorHarness::new(IdentityOperator::new(Arc::new(rules)));
    let received = crate::messages::parse_time_ms("2026-11-26T10:00:00Z").ok_or("time")?;
    let send_at = |h: &mut OperatorHarness<IdentityOperator>, event: Value| {
        let bytes = serde_json::to_vec(&event)?;
        let out = h.process_at(None, &bytes, &[], Some(received))?;
        Ok::<_, Box<dyn std::error::Error>>(out)
    };
    // Within the hour: its own time, in one format (written `t…z` with a
    // space-free offset here, read back in RFC 3339 with milliseconds).
    let out = send_at(
        &mut h,
        json!({"type": "page", "anonymousId": "a1", "timestamp": "2026-11-26t11:59:00+01:00"}),
    )?;
    let within: Vec<ProfileSnapshot> = out
        .iter()
        .filter(|e| e.output == outputs::PROFILES)
        .map(|e| serde_json::from_slice(&e.value))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        within[0].updated_at.as_deref(),
        Some("2026-11-26T10:59:00.000Z")
    );
    // A year ahead, merging a1 into u1: the merge, the survivor's history
    // and both snapshots carry the broker's time, and the event still
    // links (identity never refuses for time, even under `dead_letter`).
    h.process_at(
        None,
        &serde_json::to_vec(&json!({"type": "identify", "userId": "u1"}))?,
        &[],
        Some(received),
    )?;
    let out = send_at(
        &mut h,
        json!({"type": "identify", "userId": "u1", "anonymousId": "a1",
            "timestamp": "2027-11-26T10:00:00Z"}),
    )?;
    let corrected = "2026-11-26T10:00:00.000Z";
    let snaps: Vec<ProfileSnapshot> = out
        .iter()
        .filter(|e| e.output == outputs::PROFILES)
        .map(|e| serde_json::from_slice(&e.value))
        .collect::<Result<_, _>>()?;
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    for s in &snaps {
        assert_eq!(s.updated_at.as_deref(), Some(corrected), "{s:?}");
    }
    let survivor = snaps
        .iter()
        .find(|s| s.state == ProfileStatus::Active)
        .ok_or("no survivor")?;
    assert_eq!(survivor.merged_from[0].at.as_deref(), Some(corrected));
    let merged = decode(&out)?
        .into_iter()
        .find_map(|r| match r {
            ProfileRecord::Merged { at, .. } => Some(at),
            _ => None,
        })
        .ok_or("no merge")?;
    assert_eq!(merged, Some(received));
    Ok(())
}
