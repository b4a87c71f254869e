use super::*;

#[test]
fn config_errors_name_the_path() {
    let mut plan = shop_plan(UnplannedEvents::Allow, ViolationPolicy::Block);
    plan.events
        .insert("Order Completed".into(), json!({"type": "nonsense"}));
    let plans = BTreeMap::from([("shop".to_string(), plan)]);
    let err = Validator::new(
        &[source("web", Some("shop"))],
        &plans,
        DEFAULT_DEDUPE_WINDOW,
    )
    .err();
    let err = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.starts_with("tracking_plans.shop.events.Order Completed: invalid JSON Schema: "),
        "{err}"
    );

    let err = Validator::new(
        &[source("web", Some("x"))],
        &BTreeMap::new(),
        DEFAULT_DEDUPE_WINDOW,
    )
    .err();
    assert_eq!(
        err.map(|e| e.to_string()).as_deref(),
        Some("sources[0].tracking_plan: unknown tracking plan \"x\"")
    );

    let twice = [source("web", None), source("web", None)];
    let err = Validator::new(&twice, &BTreeMap::new(), DEFAULT_DEDUPE_WINDOW).err();
    assert_eq!(err.map(|e| e.path), Some("sources[1].id".to_string()));
}

#[test]
fn tracking_plan_yaml_defaults_and_unknown_fields() -> TestResult {
    let plan: TrackingPlan = serde_yaml::from_str("events: {}")?;
    assert_eq!(plan.unplanned_events, UnplannedEvents::Allow);
    assert_eq!(plan.on_violation, ViolationPolicy::Block);
    assert!(serde_yaml::from_str::<TrackingPlan>("unplanned: block").is_err());
    let plan: TrackingPlan = serde_yaml::from_str("unplanned_events: block\non_violation: omit")?;
    assert_eq!(
        (plan.unplanned_events, plan.on_violation),
        (UnplannedEvents::Block, ViolationPolicy::Omit)
    );
    Ok(())
}

#[test]
fn failure_labels_come_from_bounded_sets() -> TestResult {
    let plans = BTreeMap::from([("shop".to_string(), versioned_plan(ViolationPolicy::Block))]);
    let sources = [source("web", Some("shop")), source("ios", None)];
    let v = Validator::new(&sources, &plans, DEFAULT_DEDUPE_WINDOW)?;
    let event = |name: &str| json!({"event": name});
    assert_eq!(
        v.failure_labels(Some("web"), &event("Order Completed")),
        ("web", "Order Completed")
    );
    assert_eq!(
        v.failure_labels(Some("web"), &event("Refund Issued")),
        ("web", "Refund Issued"),
        "versioned-only events are planned"
    );
    assert_eq!(
        v.failure_labels(Some("web"), &event("Made Up 123")),
        ("web", OTHER_EVENT_LABEL)
    );
    assert_eq!(
        v.failure_labels(Some("ios"), &event("Order Completed")),
        ("ios", OTHER_EVENT_LABEL),
        "ios has no plan"
    );
    assert_eq!(
        v.failure_labels(Some("forged"), &event("Order Completed")),
        (UNKNOWN_SOURCE_LABEL, OTHER_EVENT_LABEL)
    );
    assert_eq!(
        v.failure_labels(None, &json!({"error": "x"})),
        (UNKNOWN_SOURCE_LABEL, OTHER_EVENT_LABEL)
    );
    Ok(())
}
