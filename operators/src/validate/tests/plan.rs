use super::*;

#[test]
fn page_and_screen_are_normalized_and_keep_their_name() -> TestResult {
    let mut h = harness(None)?;
    let page = single_output(&send(
        &mut h,
        &json!({"type": "page", "name": "Home", "anonymousId": "a"}),
    )?)?;
    assert_eq!(
        (page["event"].as_str(), page["name"].as_str()),
        (Some("Page Viewed"), Some("Home"))
    );
    let screen = single_output(&send(
        &mut h,
        &json!({"type": "screen", "name": "Cart", "anonymousId": "a"}),
    )?)?;
    assert_eq!(screen["event"], "Screen Viewed");
    assert_eq!(screen["name"], "Cart");
    Ok(())
}

#[test]
fn plan_block_rejects_with_every_violation() -> TestResult {
    let mut h = harness(Some(shop_plan(
        UnplannedEvents::Allow,
        ViolationPolicy::Block,
    )))?;
    let r = send(
        &mut h,
        &track("Order Completed", json!({"revenue": -5, "coupon": 3})),
    );
    let Some((reason, detail)) = rejection(r) else {
        return Err("expected a rejection".into());
    };
    assert_eq!(reason, "plan_violation");
    let mut ps = pointers(&detail);
    ps.sort();
    assert_eq!(ps, vec!["/properties/coupon", "/properties/revenue"]);
    assert!(h.state.map.is_empty(), "a rejected record writes no state");
    assert_eq!(
        send(&mut h, &track("Order Completed", json!({"revenue": 5})))?.len(),
        1
    );
    Ok(())
}

#[test]
fn plan_omit_removes_offending_properties() -> TestResult {
    let mut h = harness(Some(shop_plan(
        UnplannedEvents::Allow,
        ViolationPolicy::Omit,
    )))?;
    let out = send(
        &mut h,
        &track(
            "Order Completed",
            json!({"revenue": 10, "coupon": 3, "sku": "a"}),
        ),
    )?;
    let event = single_output(&out)?;
    assert_eq!(event["properties"], json!({"revenue": 10, "sku": "a"}));
    assert_eq!(
        event["context"]["protocols"]["omitted"],
        json!(["/properties/coupon"])
    );
    assert!(event["context"]["protocols"].get("violations").is_none());
    Ok(())
}

#[test]
fn plan_omit_attaches_what_removing_cannot_fix() -> TestResult {
    let mut h = harness(Some(shop_plan(
        UnplannedEvents::Allow,
        ViolationPolicy::Omit,
    )))?;
    let event = single_output(&send(
        &mut h,
        &track("Order Completed", json!({"revenue": "ten"})),
    )?)?;
    assert_eq!(event["properties"], json!({}));
    assert_eq!(
        event["context"]["protocols"]["omitted"],
        json!(["/properties/revenue"])
    );
    assert_eq!(
        event["context"]["protocols"]["violations"][0]["pointer"],
        "/properties"
    );
    Ok(())
}

#[test]
fn plan_allow_forwards_with_violations_attached() -> TestResult {
    let mut h = harness(Some(shop_plan(
        UnplannedEvents::Allow,
        ViolationPolicy::Allow,
    )))?;
    let event = single_output(&send(
        &mut h,
        &track("Order Completed", json!({"revenue": -1})),
    )?)?;
    assert_eq!(event["properties"], json!({"revenue": -1}));
    assert_eq!(
        event["context"]["protocols"]["violations"][0]["pointer"],
        "/properties/revenue"
    );
    Ok(())
}

#[test]
fn plan_checks_identify_group_and_page_schemas() -> TestResult {
    let mut h = harness(Some(shop_plan(
        UnplannedEvents::Block,
        ViolationPolicy::Block,
    )))?;
    let identify = json!({"type": "identify", "userId": "u", "traits": {"email": "not-an-email"}});
    let r = rejection(send(&mut h, &identify)).map(|(r, d)| (r, pointers(&d)));
    assert_eq!(
        r,
        Some(("plan_violation", vec!["/traits/email".to_string()]))
    );
    let group =
        json!({"type": "group", "userId": "u", "groupId": "g", "traits": {"employees": "many"}});
    let r = rejection(send(&mut h, &group)).map(|(r, d)| (r, pointers(&d)));
    assert_eq!(
        r,
        Some(("plan_violation", vec!["/traits/employees".to_string()]))
    );
    let page = json!({"type": "page", "userId": "u", "properties": {"path": 1}});
    let r = rejection(send(&mut h, &page)).map(|(r, d)| (r, pointers(&d)));
    assert_eq!(
        r,
        Some(("plan_violation", vec!["/properties/path".to_string()]))
    );
    // Unplanned `block` applies to track calls only.
    assert_eq!(
        send(&mut h, &json!({"type": "screen", "userId": "u"}))?.len(),
        1
    );
    let ok = json!({"type": "identify", "userId": "u", "traits": {"email": "a@example.com"}});
    assert_eq!(send(&mut h, &ok)?.len(), 1);
    Ok(())
}

#[test]
fn unplanned_events_allow_and_block() -> TestResult {
    let mut allow = harness(Some(shop_plan(
        UnplannedEvents::Allow,
        ViolationPolicy::Block,
    )))?;
    assert_eq!(
        send(&mut allow, &track("Product Viewed", json!({"x": 1})))?.len(),
        1
    );
    let mut block = harness(Some(shop_plan(
        UnplannedEvents::Block,
        ViolationPolicy::Block,
    )))?;
    let r = rejection(send(&mut block, &track("Product Viewed", json!({"x": 1}))));
    assert_eq!(
        r,
        Some((
            "unplanned_event",
            json!({"source": "web", "event": "Product Viewed"})
        ))
    );
    Ok(())
}

#[test]
fn event_versions_select_the_schema() -> TestResult {
    let mut h = plan_harness(versioned_plan(ViolationPolicy::Block))?;
    let v1 = json!({"revenue": 1});
    let v2 = json!({"revenue": 1, "currency": "EUR"});
    // No version, or version 1: `events`.
    assert_eq!(
        send(&mut h, &track("Order Completed", v1.clone()))?.len(),
        1
    );
    assert_eq!(
        send(&mut h, &versioned("Order Completed", v1.clone(), json!(1)))?.len(),
        1
    );
    // Version 2, as a number or a string.
    let r = rejection(send(
        &mut h,
        &versioned("Order Completed", v1.clone(), json!(2)),
    ));
    assert_eq!(
        r.map(|(reason, d)| (reason, pointers(&d))),
        Some(("plan_violation", vec!["/properties".to_string()]))
    );
    assert_eq!(
        send(&mut h, &versioned("Order Completed", v2.clone(), json!(2)))?.len(),
        1
    );
    assert_eq!(
        send(
            &mut h,
            &versioned("Order Completed", v2.clone(), json!("2"))
        )?
        .len(),
        1
    );
    // Versions the plan lacks, and values that are no version at all.
    for version in [
        json!(3),
        json!("3"),
        json!(0),
        json!(-2),
        json!(2.5),
        json!("v2"),
        json!({}),
    ] {
        let r = rejection(send(
            &mut h,
            &versioned("Order Completed", v2.clone(), version.clone()),
        ));
        assert_eq!(
            r.map(|(reason, d)| (reason, pointers(&d))),
            Some(("plan_violation", vec![VERSION_POINTER.to_string()])),
            "{version}"
        );
    }
    Ok(())
}

#[test]
fn events_listed_only_under_event_versions_are_planned() -> TestResult {
    let mut h = plan_harness(versioned_plan(ViolationPolicy::Block))?;
    assert_eq!(
        send(
            &mut h,
            &versioned("Refund Issued", json!({"amount": 5}), json!(3))
        )?
        .len(),
        1,
        "planned, so `unplanned_events: block` lets it through"
    );
    // Without a version it is version 1, which this plan does not list.
    let r = rejection(send(&mut h, &track("Refund Issued", json!({"amount": 5}))));
    assert_eq!(
        r.map(|(reason, d)| (reason, d["violations"][0]["reason"].clone())),
        Some((
            "plan_violation",
            json!("version 1 of \"Refund Issued\" is not in the tracking plan")
        ))
    );
    Ok(())
}

#[test]
fn unknown_versions_are_attached_under_allow_and_omit() -> TestResult {
    for policy in [ViolationPolicy::Allow, ViolationPolicy::Omit] {
        let mut h = plan_harness(versioned_plan(policy))?;
        let event = single_output(&send(
            &mut h,
            &versioned("Order Completed", json!({"revenue": 1}), json!(9)),
        )?)?;
        assert_eq!(
            event["context"]["protocols"]["violations"][0]["pointer"],
            VERSION_POINTER
        );
        assert_eq!(event["context"]["protocols"]["event_version"], 9);
        assert_eq!(event["properties"], json!({"revenue": 1}), "{policy:?}");
    }
    Ok(())
}

#[test]
fn event_versions_in_yaml_and_their_config_errors() -> TestResult {
    let plan: TrackingPlan = serde_yaml::from_str(
        "event_versions:\n  Order Completed:\n    2: {type: object}\n    \"3\": {type: object}\n",
    )?;
    let versions: Vec<EventVersion> = plan
        .event_versions
        .get("Order Completed")
        .map(|v| v.keys().copied().collect())
        .unwrap_or_default();
    assert_eq!(versions, vec![EventVersion(2), EventVersion(3)]);
    for bad in ["0", "-1", "v2", "1.5"] {
        let yaml = format!("event_versions: {{A: {{{bad}: {{}}}}}}");
        let err = serde_yaml::from_str::<TrackingPlan>(&yaml)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("an event version")),
            "{bad}: {err:?}"
        );
    }

    let mut twice = shop_plan(UnplannedEvents::Allow, ViolationPolicy::Block);
    twice.event_versions = BTreeMap::from([(
        "Order Completed".to_string(),
        BTreeMap::from([(EventVersion::FIRST, json!({}))]),
    )]);
    assert_eq!(
        compile_error(twice),
        "tracking_plans.shop.event_versions.Order Completed.1: version 1 is also declared as events.Order Completed; declare it once"
    );
    let empty = TrackingPlan {
        event_versions: BTreeMap::from([("A".to_string(), BTreeMap::new())]),
        ..TrackingPlan::default()
    };
    assert_eq!(
        compile_error(empty),
        "tracking_plans.shop.event_versions.A: list at least one version"
    );
    let broken = TrackingPlan {
        event_versions: BTreeMap::from([(
            "A".to_string(),
            BTreeMap::from([(EventVersion(2), json!({"type": 12}))]),
        )]),
        ..TrackingPlan::default()
    };
    let err = compile_error(broken);
    assert!(
        err.starts_with("tracking_plans.shop.event_versions.A.2: invalid JSON Schema: "),
        "{err}"
    );
    Ok(())
}

#[test]
fn the_common_schema_checks_every_call_from_the_root() -> TestResult {
    let mut h = plan_harness(common_plan(ViolationPolicy::Block))?;
    let identify = json!({"type": "identify", "userId": "u"});
    let r = rejection(send(&mut h, &identify)).map(|(reason, d)| (reason, pointers(&d)));
    assert_eq!(r, Some(("plan_violation", vec![String::new()])));
    let mut with_context = identify.clone();
    with_context["context"] = json!({"ip": "1.2.3.4"});
    let r = rejection(send(&mut h, &with_context)).map(|(reason, d)| (reason, pointers(&d)));
    assert_eq!(r, Some(("plan_violation", vec!["/context".to_string()])));
    with_context["context"]["app"] = json!({"version": "1.0"});
    assert_eq!(send(&mut h, &with_context)?.len(), 1);
    // Common first, then the event's own schema; unplanned events too.
    let r = rejection(send(
        &mut h,
        &track("Order Completed", json!({"revenue": -5})),
    ));
    assert_eq!(
        r.map(|(reason, d)| (reason, pointers(&d))),
        Some((
            "plan_violation",
            vec![String::new(), "/properties/revenue".to_string()]
        ))
    );
    assert!(rejection(send(&mut h, &track("Unplanned", json!({})))).is_some());
    Ok(())
}

#[test]
fn omit_never_removes_what_the_common_schema_finds() -> TestResult {
    let mut h = plan_harness(common_plan(ViolationPolicy::Omit))?;
    let mut event = track("Order Completed", json!({"revenue": 2, "coupon": 7}));
    event["context"] = json!({"ip": "1.2.3.4"});
    let event = single_output(&send(&mut h, &event)?)?;
    assert_eq!(event["properties"], json!({"revenue": 2}));
    assert_eq!(
        event["context"]["protocols"]["omitted"],
        json!(["/properties/coupon"])
    );
    assert_eq!(
        event["context"]["protocols"]["violations"],
        json!([{"pointer": "/context", "reason": "\"app\" is a required property"}])
    );
    Ok(())
}

fn draft_plan(schema: Value) -> TrackingPlan {
    TrackingPlan {
        events: BTreeMap::from([("Cart Updated".to_string(), schema)]),
        ..TrackingPlan::default()
    }
}

#[test]
fn draft_07_and_2020_12_schemas_are_both_accepted() -> TestResult {
    // The same rules in each draft's own keywords: a [string, number]
    // pair and "coupon needs discount".
    let draft_07 = json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {"pair": {"type": "array", "items": [{"type": "string"}, {"type": "number"}],
                                "additionalItems": false}},
        "dependencies": {"coupon": ["discount"]}
    });
    let draft_2020_12 = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "number"}],
                                "items": false}},
        "dependentRequired": {"coupon": ["discount"]}
    });
    for schema in [draft_07, draft_2020_12] {
        let mut h = plan_harness(draft_plan(schema.clone()))?;
        let draft = &schema["$schema"];
        assert_eq!(
            send(&mut h, &track("Cart Updated", json!({"pair": ["a", 1]})))?.len(),
            1,
            "{draft}"
        );
        for (bad, pointer) in [
            (json!({"pair": [1, "a"]}), "/properties/pair/0"),
            (json!({"pair": ["a", 1, 2]}), "/properties/pair"),
            (json!({"coupon": "X"}), "/properties"),
        ] {
            let r = rejection(send(&mut h, &track("Cart Updated", bad.clone())));
            let found = r.map(|(_, d)| pointers(&d)).unwrap_or_default();
            // draft-07 reports extra items at the array, 2020-12 at the item.
            assert!(
                found.iter().any(|p| p.starts_with(pointer)),
                "{draft} {bad}: {found:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn the_draft_comes_from_schema_and_unknown_drafts_are_refused() {
    // Array-form `items` is draft-07; under the default (2020-12) it is
    // not a valid schema.
    let tuple = json!({"type": "object", "properties": {"pair": {"items": [{"type": "string"}]}}});
    let err = compile_error(draft_plan(tuple));
    assert!(
        err.starts_with("tracking_plans.shop.events.Cart Updated: invalid JSON Schema: "),
        "{err}"
    );
    let unknown = json!({"$schema": "https://example.com/my-draft", "type": "object"});
    let err = compile_error(draft_plan(unknown));
    assert!(
        err.starts_with("tracking_plans.shop.events.Cart Updated: invalid JSON Schema: "),
        "{err}"
    );
}

#[test]
fn patterns_are_linear_time_regexes() -> TestResult {
    let lookahead = json!({"properties": {"sku": {"type": "string", "pattern": "^(?!X)"}}});
    let err = compile_error(draft_plan(lookahead));
    assert!(
        err.starts_with("tracking_plans.shop.events.Cart Updated: "),
        "{err}"
    );
    let sku = json!({"properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-\\d+$"}}});
    let mut h = plan_harness(draft_plan(sku))?;
    assert_eq!(
        send(&mut h, &track("Cart Updated", json!({"sku": "ABC-12"})))?.len(),
        1
    );
    let r = rejection(send(&mut h, &track("Cart Updated", json!({"sku": "abc"}))));
    assert_eq!(
        r.map(|(_, d)| pointers(&d)),
        Some(vec!["/properties/sku".to_string()])
    );
    Ok(())
}
