//! Merged profiles: exits, entries and the merging event's wait.

use super::*;

#[test]
fn a_merge_exits_the_merged_profile_and_the_survivor_enters() -> TestResult {
    let mut h = harness(DESIGN_AUDIENCES)?;
    let order = |rev: i64| Some(("Order Completed", json!({"revenue": rev})));
    send(&mut h, "a", order(200), json!({"revenue_total": 200}), DAY)?;
    send(
        &mut h,
        "a",
        order(200),
        json!({"revenue_total": 400}),
        DAY + 1,
    )?;
    assert!(send(
        &mut h,
        "b",
        order(300),
        json!({"revenue_total": 700}),
        2 * DAY
    )?
    .is_empty());
    let c = send(&mut h, "a", None, json!({"revenue_total": 500}), 2 * DAY)?;
    assert_eq!(summary(&c), vec![entered("big_spenders")]);

    // Identity names every identifier of the merged profile, including
    // one (the email) whose own update has not reached `b` yet.
    let merged_ids = Identifiers::from([("email".to_string(), vec!["ab@x.com".to_string()])]);
    let merged = serde_json::to_vec(&ProfileUpdate::Merged {
        from: "a".into(),
        into: "b".into(),
        identifiers: merged_ids,
        cause: Cause {
            message_id: Some("m-merge".into()),
            tick: None,
        },
        announced: false,
        at: Some(2 * DAY + 7),
    })?;
    let out = h.process(Some(b"a"), &merged, &[])?;
    let c = changes(&out)?;
    assert_eq!(summary(&c), vec![exited("big_spenders")]);
    assert_eq!(c[0].profile_id, "a");
    assert_eq!(c[0].cause.message_id.as_deref(), Some("m-merge"));
    assert_eq!(c[0].merged_into.as_deref(), Some("b"), "says where it went");
    // At the merging event's time, as the survivor's entry will be.
    assert_eq!(c[0].event_time, crate::messages::rfc3339_ms(2 * DAY + 7));
    let transfer = out
        .iter()
        .find(|e| e.output == outputs::SELF)
        .ok_or("no transfer")?;
    assert_eq!(transfer.key.as_deref(), Some(b"b".as_slice()));

    // The survivor keeps its own revenue_total (700) and now has 3 orders.
    let value = transfer.value.clone();
    let c = changes(&h.process(Some(b"b"), &value, &[])?)?;
    assert_eq!(summary(&c), vec![entered("big_spenders")]);
    assert_eq!(c[0].profile_id, "b");
    assert_eq!(c[0].traits.get("revenue_total"), Some(&json!(700)));
    assert_eq!(c[0].identifiers.get("user_id").map(Vec::len), Some(2));
    assert_eq!(
        c[0].identifiers.get("email"),
        Some(&vec!["ab@x.com".to_string()]),
        "the change names every identifier of the merged profile"
    );

    // A late update for `a` is forwarded to `b`.
    let bytes = update("a", order(1), json!({}), 3 * DAY)?;
    let out = h.process(Some(b"a"), &bytes, &[])?;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].output, outputs::SELF);
    match ProfileUpdate::from_bytes(&out[0].value)? {
        ProfileUpdate::Update { profile_id, .. } => assert_eq!(profile_id, "b"),
        other => return Err(format!("unexpected {other:?}").into()),
    }
    Ok(())
}

/// `from` merged into `into`, announced (the merging event's update will
/// name it): the transfer `from`'s task sends to `into`'s.
fn announced_merge(
    h: &mut OperatorHarness<AudiencesOperator>,
    from: &str,
    into: &str,
) -> Result<Vec<u8>, Box<dyn Error>> {
    let merged = serde_json::to_vec(&ProfileUpdate::Merged {
        from: from.into(),
        into: into.into(),
        identifiers: Identifiers::new(),
        cause: Cause::default(),
        announced: true,
        at: None,
    })?;
    let out = h.process(Some(from.as_bytes()), &merged, &[])?;
    Ok(out
        .iter()
        .find(|e| e.output == outputs::SELF)
        .ok_or("no transfer")?
        .value
        .clone())
}

/// The merging event's update (traits after the merge, `merged_from:
/// [a]`) is held until `a`'s history is in, then evaluated once, as the
/// event: `b` enters on three orders with the event as the cause. A tick
/// while `b` waits does nothing.
#[test]
fn an_update_naming_a_merge_waits_for_its_transfer() -> TestResult {
    let mut h = harness(
        "cheap_repeat: {where: {all: [{trait: revenue_total, lt: 500}, \
         {event: Order Completed, count: {gte: 3}}]}}",
    )?;
    let order = |rev: i64| Some(("Order Completed", json!({"revenue": rev})));
    assert!(send(&mut h, "b", order(150), json!({"revenue_total": 150}), DAY)?.is_empty());
    assert!(send(&mut h, "a", order(100), json!({"revenue_total": 100}), DAY)?.is_empty());
    let transfer = announced_merge(&mut h, "a", "b")?;
    let mut update: ProfileUpdate = serde_json::from_slice(&update(
        "b",
        order(50),
        json!({"revenue_total": 300}),
        DAY + 1,
    )?)?;
    if let ProfileUpdate::Update { merged_from, .. } = &mut update {
        merged_from.push("a".into());
    }
    let out = h.process(Some(b"b"), &serde_json::to_vec(&update)?, &[])?;
    assert!(out.is_empty(), "held: {out:?}");
    assert!(h.state.map.contains_key(b"wait/b".as_slice()));
    assert!(h.tick(DAY + 2)?.is_empty());
    let c = changes(&h.process(Some(b"b"), &transfer, &[])?)?;
    assert_eq!(summary(&c), vec![entered("cheap_repeat")]);
    let event_id = format!("m{}", DAY + 1);
    assert_eq!(c[0].cause.message_id.as_deref(), Some(event_id.as_str()));
    assert!(h.state.map.keys().all(|k| !k.starts_with(b"wait")));
    Ok(())
}

/// A timer that fires on a survivor between its transfer and the update
/// announcing the merge (nothing held yet, the wait open) keeps the
/// profile's waiting mark: the announcing update then folds the merged
/// profile in and is evaluated. When the timer's write dropped the mark,
/// the update found no wait, held itself under a new one and was never
/// evaluated, nor anything after it (a silent loss, found by reading a
/// stuck run's state).
#[test]
fn a_timer_between_a_transfer_and_its_update_keeps_the_wait() -> TestResult {
    let mut h = harness(
        "recent: {where: {event: Order Completed, within: 1h}}\n\
         three_orders: {where: {event: Order Completed, count: {gte: 3}}}",
    )?;
    let order = |rev: i64| Some(("Order Completed", json!({"revenue": rev})));
    let c = send(&mut h, "b", order(1), json!({}), DAY)?;
    assert_eq!(summary(&c), vec![entered("recent")]);
    send(&mut h, "a", order(1), json!({}), DAY)?;
    let transfer = announced_merge(&mut h, "a", "b")?;
    // The transfer arrives first; then b's window timer fires.
    assert!(changes(&h.process(Some(b"b"), &transfer, &[])?)?.is_empty());
    let c = changes(&h.tick(DAY + 2 * HOUR)?)?;
    assert_eq!(summary(&c), vec![exited("recent")]);
    // The announcing update: b has its own order, a's and this one.
    let mut update: ProfileUpdate =
        serde_json::from_slice(&update("b", order(1), json!({}), DAY + 2 * HOUR + 1)?)?;
    if let ProfileUpdate::Update { merged_from, .. } = &mut update {
        merged_from.push("a".into());
    }
    let c = changes(&h.process(Some(b"b"), &serde_json::to_vec(&update)?, &[])?)?;
    assert_eq!(
        summary(&c),
        vec![entered("recent"), entered("three_orders")],
        "{c:?}"
    );
    assert!(h.state.map.keys().all(|k| !k.starts_with(b"wait")));
    Ok(())
}
