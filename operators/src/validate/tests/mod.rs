use std::collections::BTreeMap;
use std::sync::Arc;

use cdp_pipeline::envelope::SOURCE;
use cdp_pipeline::{Emitted, OperatorError, OperatorHarness, Span};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::plan::{escape_pointer_segment, unescape_pointer_segment, VERSION_POINTER};
use super::*;
use crate::config::{ConfigError, SourceConfig};
use crate::messages::outputs;

mod config;
mod dedupe;
mod fast;
mod plan;
mod spec;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn source(id: &str, plan: Option<&str>) -> SourceConfig {
    SourceConfig {
        id: id.into(),
        write_key: format!("wk_{id}"),
        tracking_plan: plan.map(String::from),
        kind: Default::default(),
    }
}

fn shop_plan(unplanned: UnplannedEvents, on_violation: ViolationPolicy) -> TrackingPlan {
    TrackingPlan {
        unplanned_events: unplanned,
        on_violation,
        identify: Some(
            json!({"type": "object", "properties": {"email": {"type": "string", "format": "email"}}}),
        ),
        group: Some(json!({"type": "object", "properties": {"employees": {"type": "integer"}}})),
        events: BTreeMap::from([
            (
                "Order Completed".to_string(),
                json!({
                    "type": "object",
                    "required": ["revenue"],
                    "properties": {"revenue": {"type": "number", "minimum": 0}, "coupon": {"type": "string"}}
                }),
            ),
            (
                "Page Viewed".to_string(),
                json!({"type": "object", "properties": {"path": {"type": "string"}}}),
            ),
        ]),
        ..TrackingPlan::default()
    }
}

fn harness(plan: Option<TrackingPlan>) -> Result<OperatorHarness<ValidateOperator>, ConfigError> {
    let plans: BTreeMap<String, TrackingPlan> =
        plan.into_iter().map(|p| ("shop".to_string(), p)).collect();
    let sources = if plans.is_empty() {
        vec![source("web", None)]
    } else {
        vec![source("web", Some("shop"))]
    };
    let validator = Validator::new(&sources, &plans, DEFAULT_DEDUPE_WINDOW)?;
    Ok(OperatorHarness::new(ValidateOperator::new(Arc::new(
        validator,
    ))))
}

fn web() -> Vec<(String, Vec<u8>)> {
    vec![(SOURCE.to_string(), b"web".to_vec())]
}

fn send(
    h: &mut OperatorHarness<ValidateOperator>,
    event: &Value,
) -> Result<Vec<Emitted>, OperatorError> {
    let bytes = serde_json::to_vec(event)
        .map_err(|e| OperatorError::rejected("test", json!(e.to_string())))?;
    h.process(Some(b"k1"), &bytes, &web())
}

/// The rejection reason and detail, or `None` if the record passed.
fn rejection(result: Result<Vec<Emitted>, OperatorError>) -> Option<(&'static str, Value)> {
    match result {
        Err(OperatorError::Rejected { reason, detail }) => Some((reason, detail)),
        _ => None,
    }
}

fn pointers(detail: &Value) -> Vec<String> {
    detail["violations"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .filter_map(|v| v["pointer"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn single_output(out: &[Emitted]) -> Result<Value, Box<dyn std::error::Error>> {
    match out {
        [one] => Ok(serde_json::from_slice(&one.value)?),
        _ => Err(format!("expected one output, got {}", out.len()).into()),
    }
}

fn track(name: &str, properties: Value) -> Value {
    json!({"type": "track", "event": name, "userId": "u1", "messageId": "m1",
           "timestamp": "2026-11-26T10:00:00Z", "properties": properties})
}

/// A harness for `plan` with dedupe off, so tests may repeat events.
fn plan_harness(plan: TrackingPlan) -> Result<OperatorHarness<ValidateOperator>, ConfigError> {
    let plans = BTreeMap::from([("shop".to_string(), plan)]);
    let validator = Validator::new(&[source("web", Some("shop"))], &plans, Span::from_millis(0))?;
    Ok(OperatorHarness::new(ValidateOperator::new(Arc::new(
        validator,
    ))))
}

fn compile_error(plan: TrackingPlan) -> String {
    let plans = BTreeMap::from([("shop".to_string(), plan)]);
    Validator::new(
        &[source("web", Some("shop"))],
        &plans,
        DEFAULT_DEDUPE_WINDOW,
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default()
}

fn object_with_keys(n: usize) -> Value {
    Value::Object((0..n).map(|i| (format!("k{i}"), json!(i))).collect())
}

fn versioned_plan(on_violation: ViolationPolicy) -> TrackingPlan {
    let mut plan = shop_plan(UnplannedEvents::Block, on_violation);
    plan.event_versions = BTreeMap::from([
        (
            "Order Completed".to_string(),
            BTreeMap::from([(
                EventVersion(2),
                json!({"type": "object", "required": ["revenue", "currency"],
                       "properties": {"currency": {"enum": ["EUR", "USD"]}}}),
            )]),
        ),
        (
            "Refund Issued".to_string(),
            BTreeMap::from([(
                EventVersion(3),
                json!({"type": "object", "required": ["amount"]}),
            )]),
        ),
    ]);
    plan
}

fn versioned(name: &str, properties: Value, version: Value) -> Value {
    let mut e = track(name, properties);
    e["context"] = json!({"protocols": {"event_version": version}});
    e
}

fn common_plan(on_violation: ViolationPolicy) -> TrackingPlan {
    let mut plan = shop_plan(UnplannedEvents::Allow, on_violation);
    plan.common = Some(json!({
        "type": "object",
        "required": ["context"],
        "properties": {"context": {"type": "object", "required": ["app"]}}
    }));
    plan
}

#[test]
fn shared_config_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Validator>();
    assert_send_sync::<ValidateOperator>();
}

#[test]
fn valid_event_passes_with_key_and_source_header() -> TestResult {
    let mut h = harness(None)?;
    let out = send(&mut h, &track("Anything", json!({"a": 1})))?;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].output, outputs::NEXT);
    assert_eq!(out[0].key.as_deref(), Some(&b"k1"[..]));
    assert_eq!(out[0].headers, web());
    assert_eq!(single_output(&out)?["event"], "Anything");
    Ok(())
}

#[test]
fn garbage_and_non_objects_are_invalid_json() -> TestResult {
    let mut h = harness(None)?;
    for bytes in [&b"not json"[..], b"[1,2]", b"\"s\"", b"", b"{\"type\":"] {
        let r = h.process(None, bytes, &web());
        assert_eq!(rejection(r).map(|r| r.0), Some("invalid_json"), "{bytes:?}");
    }
    // A tombstone and a byte order mark say what they are.
    let mut error = |bytes: &[u8]| {
        rejection(h.process(None, bytes, &web()))
            .and_then(|(_, d)| d["error"].as_str().map(String::from))
            .unwrap_or_default()
    };
    assert!(error(b"").starts_with("empty record (a tombstone?)"));
    assert!(error(b" \n").starts_with("empty record (a tombstone?)"));
    let bom = [
        &b"\xEF\xBB\xBF"[..],
        br#"{"type":"track","event":"E","userId":"u"}"#,
    ]
    .concat();
    assert!(error(&bom).contains("byte order mark"), "{}", error(&bom));
    Ok(())
}

#[test]
fn missing_or_unknown_source_is_rejected() -> TestResult {
    let mut h = harness(None)?;
    let bytes = serde_json::to_vec(&track("X", json!({})))?;
    assert_eq!(
        rejection(h.process(None, &bytes, &[])).map(|r| r.0),
        Some("unknown_source")
    );
    let other = vec![(SOURCE.to_string(), b"ios".to_vec())];
    assert_eq!(
        rejection(h.process(None, &bytes, &other)).map(|r| r.0),
        Some("unknown_source")
    );
    Ok(())
}

#[test]
fn rejections_name_the_source_and_the_event() -> TestResult {
    let mut h = plan_harness(shop_plan(UnplannedEvents::Block, ViolationPolicy::Block))?;
    let mut bad_time = track("Order Completed", json!({"revenue": 1}));
    bad_time["timestamp"] = json!("never");
    let detail =
        |r| rejection(r).map(|(reason, d)| (reason, d["source"].clone(), d["event"].clone()));
    assert_eq!(
        detail(send(&mut h, &bad_time)),
        Some(("spec_violation", json!("web"), json!("Order Completed")))
    );
    assert_eq!(
        detail(send(&mut h, &track("Order Completed", json!({})))),
        Some(("plan_violation", json!("web"), json!("Order Completed")))
    );
    assert_eq!(
        detail(send(&mut h, &track("Nope", json!({})))),
        Some(("unplanned_event", json!("web"), json!("Nope")))
    );
    assert_eq!(
        detail(send(&mut h, &json!({"type": "page", "properties": {}}))),
        Some(("spec_violation", json!("web"), json!("Page Viewed")))
    );
    assert_eq!(
        detail(h.process(None, b"{", &web())),
        Some(("invalid_json", json!("web"), Value::Null))
    );
    Ok(())
}

#[test]
fn unchanged_events_are_forwarded_byte_for_byte() -> TestResult {
    let mut h = plan_harness(shop_plan(UnplannedEvents::Allow, ViolationPolicy::Allow))?;
    let bytes = b" {\"type\": \"track\", \"event\": \"Order Completed\",\n \"userId\": \"u\", \"properties\": {\"revenue\": 1.50}} \n";
    let out = h.process(None, bytes, &web())?;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].value, bytes.to_vec());
    // Changed events are re-encoded: a normalized page, a violation.
    let page = single_output(&send(&mut h, &json!({"type": "page", "userId": "u"}))?)?;
    assert_eq!(page["event"], "Page Viewed");
    let annotated = single_output(&send(
        &mut h,
        &track("Order Completed", json!({"revenue": -1})),
    )?)?;
    assert!(annotated["context"]["protocols"]["violations"].is_array());
    Ok(())
}
