use super::graph::derived_profile_id;
use super::*;
use crate::config::ConfigError;
use crate::messages::{AuditDrop, Identifiers, MergedFrom};
use cdp_pipeline::{Emitted, OperatorHarness};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn harness(cfg: &IdentityConfig) -> Result<OperatorHarness<IdentityOperator>, ConfigError> {
    Ok(OperatorHarness::new(IdentityOperator::new(Arc::new(
        IdentityRules::new(cfg)?,
    ))))
}

fn send(
    h: &mut OperatorHarness<IdentityOperator>,
    event: &Value,
) -> Result<Vec<ProfileRecord>, Box<dyn std::error::Error>> {
    let bytes = serde_json::to_vec(event)?;
    let headers = vec![(SOURCE.to_string(), b"web".to_vec())];
    let out = h.process(None, &bytes, &headers)?;
    decode(&out)
}

fn decode(out: &[Emitted]) -> Result<Vec<ProfileRecord>, Box<dyn std::error::Error>> {
    out.iter()
        .filter(|e| e.output == outputs::NEXT)
        .map(|e| Ok(serde_json::from_slice(&e.value)?))
        .collect()
}

/// The profile id and identifiers of the (last) Event output.
fn resolved(
    records: &[ProfileRecord],
) -> Result<(String, Identifiers), Box<dyn std::error::Error>> {
    match records.last() {
        Some(ProfileRecord::Event {
            profile_id,
            identifiers,
            ..
        }) => Ok((profile_id.clone(), identifiers.clone())),
        other => Err(format!("expected an event last, got {other:?}").into()),
    }
}

fn ids(pairs: &[(&str, &[&str])]) -> Identifiers {
    pairs
        .iter()
        .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
        .collect()
}

/// Live profiles in the store: profile id → identifiers.
fn live_profiles(h: &OperatorHarness<IdentityOperator>) -> BTreeMap<String, Identifiers> {
    h.state
        .map
        .iter()
        .filter_map(|(k, v)| {
            let id = std::str::from_utf8(k).ok()?.strip_prefix("profile/")?;
            let state: ProfileState = serde_json::from_slice(v).ok()?;
            state
                .merged_into
                .is_none()
                .then(|| (id.to_string(), state.identifiers))
        })
        .collect()
}

#[test]
fn shared_config_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<IdentityRules>();
    assert_send_sync::<IdentityOperator>();
}

#[test]
fn default_config_is_designs_example() -> TestResult {
    let yaml = r#"
identifiers:
  user_id: {limit: 1, priority: 1}
  email: {limit: 5, priority: 2}
  anonymous_id: {limit: 1000, priority: 3}
blocked_values: ["null", "undefined", "anonymous", "0", "-1", ""]
blocked_patterns: ["^[0-]*$"]
max_merges: 100
"#;
    let parsed: IdentityConfig = serde_yaml::from_str(yaml)?;
    assert_eq!(parsed, IdentityConfig::default());
    assert_eq!(
        serde_yaml::from_str::<IdentityConfig>("{}")?,
        IdentityConfig::default()
    );
    assert!(serde_yaml::from_str::<IdentityConfig>(
        "identifiers: {email: {limit: 1, priority: 1, x: 2}}"
    )
    .is_err());
    Ok(())
}

#[test]
fn config_errors_name_the_path() {
    let mut cfg = IdentityConfig {
        blocked_patterns: vec!["(".into()],
        ..IdentityConfig::default()
    };
    assert_eq!(
        IdentityRules::new(&cfg).err().map(|e| e.path),
        Some("identity.blocked_patterns[0]".to_string())
    );
    cfg.blocked_patterns.clear();
    cfg.identifiers
        .insert("email".into(), IdentifierRule::new(0, 2));
    assert_eq!(
        IdentityRules::new(&cfg).err().map(|e| e.path),
        Some("identity.identifiers.email.limit".to_string())
    );
}

#[test]
fn profile_ids_derive_from_the_strongest_identifier() -> TestResult {
    let mut h = harness(&IdentityConfig::default())?;
    let out = send(
        &mut h,
        &json!({"type": "identify", "userId": "u1", "anonymousId": "a1"}),
    )?;
    let (profile, identifiers) = resolved(&out)?;
    assert_eq!(profile, derived_profile_id("user_id", "u1"));
    assert_eq!(profile.len(), "prof_".len() + 20);
    assert_eq!(
        identifiers,
        ids(&[("anonymous_id", &["a1"]), ("user_id", &["u1"])])
    );
    let emitted = h.process(None, br#"{"type":"track","event":"X","userId":"u1"}"#, &[])?;
    assert_eq!(emitted.len(), 1);
    assert_eq!(emitted[0].key.as_deref(), Some(profile.as_bytes()));
    assert_eq!(emitted[0].output, outputs::NEXT);
    Ok(())
}

#[test]
fn source_header_passes_through() -> TestResult {
    let mut h = harness(&IdentityConfig::default())?;
    let headers = vec![(SOURCE.to_string(), b"web".to_vec())];
    let out = h.process(
        None,
        br#"{"type":"track","event":"X","userId":"u1"}"#,
        &headers,
    )?;
    // The event, then the new profile's snapshot (headers are the event's).
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].output, outputs::NEXT);
    assert_eq!(out[0].headers, headers);
    assert_eq!(out[1].output, outputs::PROFILES);
    assert!(out[1].headers.is_empty());
    Ok(())
}

#[test]
fn blocked_values_and_patterns_are_ignored() -> TestResult {
    let mut h = harness(&IdentityConfig::default())?;
    let out = send(
        &mut h,
        &json!({"type": "identify", "userId": "NULL", "anonymousId": " a1 "}),
    )?;
    assert_eq!(resolved(&out)?.1, ids(&[("anonymous_id", &["a1"])]));
    for user in [
        json!("undefined"),
        json!("000"),
        json!("-0-"),
        json!(0),
        json!(""),
        json!(true),
    ] {
        let r = h.process(
            None,
            &serde_json::to_vec(&json!({"type": "track", "event": "X", "userId": user}))?,
            &[],
        );
        assert!(
            matches!(
                r,
                Err(OperatorError::Rejected {
                    reason: "no_identifier",
                    ..
                })
            ),
            "{user}"
        );
    }
    assert_eq!(live_profiles(&h).len(), 1, "rejections write no state");
    Ok(())
}

#[test]
fn emails_are_case_insensitive_and_numbers_become_strings() -> TestResult {
    let mut h = harness(&IdentityConfig::default())?;
    let event = json!({"type": "identify", "userId": 42,
        "traits": {"email": "a@example.com"}, "context": {"traits": {"email": " A@Example.COM "}}});
    let (profile, identifiers) = resolved(&send(&mut h, &event)?)?;
    assert_eq!(
        identifiers,
        ids(&[("email", &["a@example.com"]), ("user_id", &["42"])])
    );
    let again = json!({"type": "track", "event": "X", "anonymousId": "z", "context": {"traits": {"email": "A@EXAMPLE.com"}}});
    assert_eq!(resolved(&send(&mut h, &again)?)?.0, profile);
    Ok(())
}

#[test]
fn unconfigured_types_are_ignored_and_external_ids_are_typed() -> TestResult {
    let mut cfg = IdentityConfig::default();
    cfg.identifiers
        .insert("crm_id".into(), IdentifierRule::new(1, 4));
    let mut h = harness(&cfg)?;
    let event = json!({"type": "track", "event": "X", "userId": "u1",
        "context": {"device": {"id": "d1"}, "traits": {"phone": "555"},
                    "externalIds": [{"id": "c1", "type": "crm_id"}, {"id": "z", "type": "other"}, 5]}});
    let (_, identifiers) = resolved(&send(&mut h, &event)?)?;
    assert_eq!(
        identifiers,
        ids(&[("crm_id", &["c1"]), ("user_id", &["u1"])])
    );
    Ok(())
}

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
        &json!({"type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "m9"}),
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
    };
    let records = decode(&out)?;
    assert_eq!(records.len(), 2);
    assert_eq!(records[0], expected_merge);
    assert_eq!(out[0].key.as_deref(), Some(anon.as_bytes()));
    assert!(out[0].headers.is_empty());
    assert_eq!(resolved(&records)?, (user.clone(), both));
    assert_eq!(out[1].key.as_deref(), Some(user.as_bytes()));
    assert_eq!(out[1].headers, headers);
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
                .then(|| serde_json::from_slice(v).ok())
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

// ---- property tests -------------------------------------------------

/// A small event: at most one of each identifier field, from small pools.
#[derive(Debug, Clone)]
struct Ev {
    user: Option<u8>,
    anon: Option<u8>,
    email: Option<u8>,
    device: Option<u8>,
}

impl Ev {
    fn identifiers(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(u) = self.user {
            out.push(format!("user_id:u{u}"));
        }
        if let Some(a) = self.anon {
            out.push(format!("anonymous_id:a{a}"));
        }
        if let Some(e) = self.email {
            out.push(format!("email:e{e}@x.com"));
        }
        if let Some(d) = self.device {
            out.push(format!("device_id:d{d}"));
        }
        out
    }

    fn json(&self) -> Value {
        let mut e = json!({"type": "track", "event": "X", "context": {"traits": {}, "device": {}}});
        if let Some(u) = self.user {
            e["userId"] = json!(format!("u{u}"));
        }
        if let Some(a) = self.anon {
            e["anonymousId"] = json!(format!("a{a}"));
        }
        if let Some(m) = self.email {
            // Mixed case: the same email whatever the spelling.
            let email = if m % 2 == 0 {
                format!("E{m}@X.com")
            } else {
                format!("e{m}@x.com")
            };
            e["context"]["traits"]["email"] = json!(email);
        }
        if let Some(d) = self.device {
            e["context"]["device"]["id"] = json!(format!("d{d}"));
        }
        e
    }
}

fn arb_ev() -> impl Strategy<Value = Ev> {
    let slot = |n: u8| prop::option::weighted(0.5, 0..n);
    (slot(3), slot(5), slot(3), slot(3))
        .prop_map(|(user, anon, email, device)| Ev {
            user,
            anon,
            email,
            device,
        })
        .prop_filter("at least one identifier", |e| !e.identifiers().is_empty())
}

fn unlimited() -> IdentityConfig {
    let rule = |priority| IdentifierRule::new(1_000, priority);
    IdentityConfig {
        identifiers: BTreeMap::from([
            ("user_id".to_string(), rule(1)),
            ("email".to_string(), rule(2)),
            ("anonymous_id".to_string(), rule(3)),
            ("device_id".to_string(), rule(4)),
        ]),
        max_merges: 1_000_000,
        ..IdentityConfig::default()
    }
}

/// Small limits and few merges, so that conflicts are frequent.
fn tight() -> IdentityConfig {
    let rule = |limit, priority| IdentifierRule::new(limit, priority);
    IdentityConfig {
        identifiers: BTreeMap::from([
            ("user_id".to_string(), rule(1, 1)),
            ("email".to_string(), rule(2, 2)),
            ("anonymous_id".to_string(), rule(2, 3)),
            ("device_id".to_string(), rule(1, 4)),
        ]),
        max_merges: 3,
        ..IdentityConfig::default()
    }
}

/// Connected components of "appear in the same event".
fn components(events: &[Ev]) -> BTreeSet<BTreeSet<String>> {
    let mut parent: BTreeMap<String, String> = BTreeMap::new();
    fn find(parent: &mut BTreeMap<String, String>, x: &str) -> String {
        let mut root = x.to_string();
        while let Some(p) = parent.get(&root).filter(|p| **p != root) {
            root = p.clone();
        }
        parent.insert(x.to_string(), root.clone());
        root
    }
    for event in events {
        let ids = event.identifiers();
        for id in &ids {
            parent.entry(id.clone()).or_insert_with(|| id.clone());
        }
        for pair in ids.windows(2) {
            let (a, b) = (find(&mut parent, &pair[0]), find(&mut parent, &pair[1]));
            parent.insert(a, b);
        }
    }
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let keys: Vec<String> = parent.keys().cloned().collect();
    for id in keys {
        let root = find(&mut parent, &id);
        groups.entry(root).or_default().insert(id);
    }
    groups.into_values().collect()
}

/// Feed `events`; check the merged-away ids never come back; return
/// the partition of identifiers into live profiles.
fn run(cfg: &IdentityConfig, events: &[Ev]) -> Result<BTreeSet<BTreeSet<String>>, TestCaseError> {
    let mut h = harness(cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut merged_away = BTreeSet::new();
    for event in events {
        let out = send(&mut h, &event.json()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(
            matches!(out.last(), Some(ProfileRecord::Event { .. })),
            "the event comes last"
        );
        for record in out {
            match record {
                ProfileRecord::Merged { from, into, .. } => {
                    prop_assert!(!merged_away.contains(&into), "merged into a dead profile");
                    merged_away.insert(from);
                }
                ProfileRecord::Event { profile_id, .. } => {
                    prop_assert!(
                        !merged_away.contains(&profile_id),
                        "event on a merged-away profile"
                    );
                }
                ProfileRecord::Transfer { .. } => {
                    prop_assert!(false, "identity emits no transfers")
                }
            }
        }
    }
    // Every identifier points at the live profile that lists it.
    let profiles = live_profiles(&h);
    for (key, value) in &h.state.map {
        let Some(id) = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix("id/"))
        else {
            continue;
        };
        let owner: Option<String> = serde_json::from_slice(value).ok();
        let (kind, val) = id.split_once(':').unwrap_or_default();
        let listed = owner
            .as_ref()
            .and_then(|o| profiles.get(o))
            .and_then(|p| p.get(kind))
            .is_some_and(|vs| vs.iter().any(|v| v == val));
        prop_assert!(listed, "{id} points to {owner:?}");
    }
    // No profile holds more values of a type than its limit.
    let rules = IdentityRules::new(cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
    for identifiers in profiles.values() {
        for (kind, values) in identifiers {
            prop_assert!(values.len() <= rules.limit(kind), "{kind} over its limit");
        }
    }
    Ok(profiles
        .into_values()
        .map(|identifiers| {
            identifiers
                .into_iter()
                .flat_map(|(kind, values)| values.into_iter().map(move |v| format!("{kind}:{v}")))
                .collect()
        })
        .collect())
}

fn with_shuffles() -> impl Strategy<Value = (Vec<Ev>, Vec<Ev>, Vec<Ev>)> {
    prop::collection::vec(arb_ev(), 1..30).prop_flat_map(|events| {
        (
            Just(events.clone()),
            Just(events.clone()).prop_shuffle(),
            Just(events).prop_shuffle(),
        )
    })
}

proptest! {
    /// With no limit hit, profiles are exactly the connected components
    /// of "appear in the same event", for every arrival order.
    #[test]
    fn profiles_are_connected_components_in_any_order((events, shuffled, reshuffled) in with_shuffles()) {
        let cfg = unlimited();
        let expected = components(&events);
        prop_assert_eq!(&run(&cfg, &events)?, &expected);
        prop_assert_eq!(&run(&cfg, &shuffled)?, &expected);
        prop_assert_eq!(&run(&cfg, &reshuffled)?, &expected);
    }

    /// With tight limits: every identifier belongs to one
    /// live profile, no limit is exceeded, merged ids never come back,
    /// and a replay of the same input yields the same partition.
    #[test]
    fn limits_hold_and_replays_agree(events in prop::collection::vec(arb_ev(), 1..30)) {
        let cfg = tight();
        let first = run(&cfg, &events)?;
        prop_assert_eq!(run(&cfg, &events)?, first);
    }
}
