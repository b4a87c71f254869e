use super::*;
use crate::identity::graph::derived_profile_id;

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
    // Two types of one priority: the second by name is named, with the first.
    cfg.identifiers
        .insert("email".into(), IdentifierRule::new(5, 3));
    let err = IdentityRules::new(&cfg).err();
    assert_eq!(
        err.as_ref().map(|e| e.path.as_str()),
        Some("identity.identifiers.email.priority")
    );
    assert!(err.is_some_and(|e| e.message.contains("also anonymous_id's")));
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
    // `prof_` + the first 20 hex digits of SHA-256("user_id:u1"), as
    // Python's hashlib gives them.
    assert_eq!(profile, "prof_90c5bc873dedef8054fd");
    assert_eq!(profile.len(), "prof_".len() + 20);
    assert_eq!(
        derived_profile_id("email", "ada@example.com"),
        "prof_9b62a3a2bce7c868f30d"
    );
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

/// An identifier past 512 bytes is no identifier (one client's huge ids
/// would grow a profile past the broker's record limit); the audit trail
/// keeps its start and length, not the whole value.
#[test]
fn identifiers_past_512_bytes_are_refused_and_audited_short() -> TestResult {
    let mut h = harness(&IdentityConfig::default())?;
    let long = "a".repeat(513);
    let out = send(
        &mut h,
        &json!({"type": "identify", "userId": "u1", "anonymousId": long}),
    )?;
    assert_eq!(resolved(&out)?.1, ids(&[("user_id", &["u1"])]));
    let records = out;
    let Some(ProfileRecord::Event { dropped, .. }) = records.last() else {
        return Err("no event".into());
    };
    assert_eq!(
        dropped,
        &vec![DroppedIdentifier {
            kind: "anonymous_id".into(),
            value: format!("{}… (513 bytes)", "a".repeat(64)),
            reason: "too_long".into(),
        }]
    );
    let fits = "b".repeat(512);
    let out = send(
        &mut h,
        &json!({"type": "identify", "userId": "u1", "anonymousId": fits}),
    )?;
    assert_eq!(
        resolved(&out)?.1,
        ids(&[("anonymous_id", &[fits.as_str()]), ("user_id", &["u1"])])
    );
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
fn numbers_are_one_decimal_text_and_inexact_ones_are_refused() -> TestResult {
    let mut h = harness(&IdentityConfig::default())?;
    let mut profile_of =
        |id: &str, anon: &str| -> Result<(String, Identifiers), Box<dyn std::error::Error>> {
            let event: Value = serde_json::from_str(&format!(
                r#"{{"type": "identify", "userId": {id}, "anonymousId": "{anon}"}}"#
            ))?;
            resolved(&send(&mut h, &event)?)
        };
    let (seven, ids_777) = profile_of("777", "a1")?;
    assert_eq!(ids_777.get("user_id"), Some(&vec!["777".to_string()]));
    // The same number however it is written.
    for same in ["777.0", "7.77e2", "\"777\""] {
        assert_eq!(profile_of(same, "a1")?.0, seven, "{same}");
    }
    let (_, fraction) = profile_of("12.5", "a2")?;
    assert_eq!(fraction.get("user_id"), Some(&vec!["12.5".to_string()]));
    // Past 2^53 as a float: its last digits are gone, so two people would
    // be one. No user id; the anonymous ids keep them apart.
    let (big_a, ids_a) = profile_of("123456789012345678901", "big-a")?;
    let (big_b, _) = profile_of("123456789012345678902", "big-b")?;
    assert_ne!(big_a, big_b);
    assert_eq!(ids_a.get("user_id"), None);
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

/// The rule as written out plainly: trim, lowercase an email, refuse an
/// empty value, a blocked value (compared lowercased) or a pattern's
/// match.
fn normalize_reference(
    kind: &str,
    raw: &str,
    blocked: &[&str],
    pattern: &regex::Regex,
) -> Result<String, DropReason> {
    let mut value = raw.trim().to_string();
    if kind == "email" {
        value = value.to_lowercase();
    }
    if value.len() > 512 {
        return Err(DropReason::TooLong);
    }
    let folded = value.to_lowercase();
    if value.is_empty() || blocked.iter().any(|b| b.trim().to_lowercase() == folded) {
        return Err(DropReason::BlockedValue);
    }
    if pattern.is_match(&value) {
        return Err(DropReason::BlockedPattern);
    }
    Ok(value)
}

proptest::proptest! {
    /// Whatever the case, spaces and characters (capitals whose lowercase
    /// is longer, like `İ`), an identifier normalizes as the plain rule
    /// says, and is refused for the same reason.
    #[test]
    fn an_identifier_normalizes_as_the_plain_rule_says(
        raw in proptest::prop_oneof![
            "[ aAbBİΣσé0-]{0,8}",
            "[ aé]{505,515}",
        ],
        kind in proptest::sample::select(vec!["email", "user_id", "anonymous_id"]),
    ) {
        let blocked = ["Ab", "null", "σ", "0"];
        let cfg = IdentityConfig {
            blocked_values: blocked.iter().map(|b| b.to_string()).collect(),
            blocked_patterns: vec!["^-+$".into()],
            ..IdentityConfig::default()
        };
        let rules = IdentityRules::new(&cfg).map_err(|e| proptest::test_runner::TestCaseError::fail(e.message))?;
        let pattern = regex::Regex::new("^-+$").map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
        let got = rules.normalize(kind, &crate::identity::fields::Leaf::Text(raw.as_str().into()));
        proptest::prop_assert_eq!(got, normalize_reference(kind, &raw, &blocked, &pattern));
    }
}
