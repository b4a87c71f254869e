//! Merged profiles: redirects and transferred state.

use super::*;

#[test]
fn late_events_for_a_merged_profile_are_redirected() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    let merged = serde_json::to_vec(&ProfileRecord::Merged {
        from: "a".into(),
        into: "b".into(),
        identifiers: Identifiers::new(),
        cause: Cause::default(),
        announced: false,
        at: None,
    })?;
    h.process(Some(b"a"), &merged, &[])?;
    let out = send(
        &mut h,
        "a",
        track("Order Completed", DAY, json!({"revenue": 5})),
    )?;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].output, outputs::SELF);
    assert_eq!(out[0].key.as_deref(), Some(b"b".as_slice()));
    match ProfileRecord::from_bytes(&out[0].value)? {
        ProfileRecord::Event { profile_id, .. } => assert_eq!(profile_id, "b"),
        other => return Err(format!("unexpected {other:?}").into()),
    }
    assert_eq!(
        h.state.map.get(profile_key("a").as_slice()),
        Some(&crate::profile_keyed::retired_value("b")),
        "a's state gave way to its redirect"
    );
    Ok(())
}

#[test]
fn a_merge_transfers_state_and_emits_the_merged_values() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    send(
        &mut h,
        "a",
        track("Order Completed", DAY, json!({"revenue": 100})),
    )?;
    send(
        &mut h,
        "a",
        track("Order Completed", 2 * DAY, json!({"revenue": 300})),
    )?;
    send(
        &mut h,
        "b",
        track("Order Completed", 3 * DAY, json!({"revenue": 200})),
    )?;
    let merged = serde_json::to_vec(&ProfileRecord::Merged {
        from: "a".into(),
        into: "b".into(),
        identifiers: Identifiers::new(),
        cause: Cause {
            message_id: Some("m-merge".into()),
            tick: None,
        },
        announced: false,
        at: Some(3 * DAY + 5),
    })?;
    let out = h.process(Some(b"a"), &merged, &[])?;
    let transfer = out
        .iter()
        .find(|e| e.output == outputs::SELF)
        .ok_or("no transfer")?;
    assert_eq!(transfer.key.as_deref(), Some(b"b".as_slice()));
    let forwarded = updates(&out)?;
    assert!(
        matches!(forwarded.as_slice(), [ProfileUpdate::Merged { from, into, at, .. }] if from == "a" && into == "b" && *at == Some(3 * DAY + 5))
    );
    assert_eq!(
        h.state.map.get(profile_key("a").as_slice()),
        Some(&crate::profile_keyed::retired_value("b")),
        "a's state gave way to its redirect"
    );

    let value = transfer.value.clone();
    let out = h.process(Some(b"b"), &value, &[])?;
    let t = changed(&out)?;
    assert_eq!(t.get("orders"), Some(&json!(3)));
    assert_eq!(t.get("revenue_total"), Some(&json!(600)));
    assert_eq!(t.get("revenue_max"), Some(&json!(300)));
    assert_eq!(t.get("revenue_min"), Some(&json!(100)));
    assert_eq!(
        t.get("categories"),
        None,
        "unchanged values are not emitted"
    );
    Ok(())
}
