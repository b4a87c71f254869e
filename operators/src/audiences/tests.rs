use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::sync::Arc;

use cdp_pipeline::operator::{Emitted, OperatorHarness};
use cdp_pipeline::OperatorError;
use proptest::prelude::*;
use serde_json::{json, Value};

use super::profile::{sequence_holds, AudienceProfile};
use super::*;
use crate::config::KnownNames;
use crate::messages::{
    self, outputs, rfc3339_ms, AudienceAction, AudienceChange, Cause, Identifiers, ProfileUpdate,
};
use crate::profile_keyed::profile_key;
use crate::traits::PropertyCondition;

type TestResult = Result<(), Box<dyn Error>>;
const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;

const DESIGN_AUDIENCES: &str = r#"
big_spenders:
  where:
    all:
      - {trait: revenue_total, gte: 500}
      - {event: Order Completed, count: {gte: 2}, within: 30d,
         where: [{property: properties.revenue, gt: 100}]}
lapsing:
  where:
    all:
      - {audience: big_spenders}
      - {not: {event: Order Completed, within: 14d}}
browsed_then_bought:
  where: {sequence: [{event: Product Viewed}, {event: Order Completed}], within: 1d}
"#;

fn defs(yaml: &str) -> Result<BTreeMap<String, AudienceDef>, serde_yaml::Error> {
    serde_yaml::from_str(yaml)
}

fn harness(yaml: &str) -> Result<OperatorHarness<AudiencesOperator>, Box<dyn Error>> {
    let set = AudienceSet::new(&defs(yaml)?, &KnownNames::anything())?;
    Ok(OperatorHarness::new(AudiencesOperator::new(Arc::new(set))))
}

fn update(
    id: &str,
    event: Option<(&str, Value)>,
    traits: Value,
    t: i64,
) -> Result<Vec<u8>, Box<dyn Error>> {
    update_until(id, event, traits, t, None)
}

fn update_until(
    id: &str,
    event: Option<(&str, Value)>,
    traits: Value,
    t: i64,
    traits_until: Option<i64>,
) -> Result<Vec<u8>, Box<dyn Error>> {
    let traits: BTreeMap<String, Value> = serde_json::from_value(traits)?;
    let mut identifiers = Identifiers::new();
    identifiers.insert("user_id".into(), vec![format!("u_{id}")]);
    let record = ProfileUpdate::Update {
        profile_id: id.into(),
        identifiers,
        event: event
            .map(|(name, props)| json!({"type": "track", "event": name, "properties": props})),
        traits,
        event_time: t,
        time_corrected_from: None,
        cause: Cause {
            message_id: Some(format!("m{t}")),
            tick: None,
        },
        merged_from: Vec::new(),
        traits_until,
    };
    Ok(serde_json::to_vec(&record)?)
}

fn send(
    h: &mut OperatorHarness<AudiencesOperator>,
    id: &str,
    event: Option<(&str, Value)>,
    traits: Value,
    t: i64,
) -> Result<Vec<AudienceChange>, Box<dyn Error>> {
    let bytes = update(id, event, traits, t)?;
    let out = h.process(Some(id.as_bytes()), &bytes, &[])?;
    Ok(changes(&out)?)
}

fn changes(out: &[Emitted]) -> Result<Vec<AudienceChange>, serde_json::Error> {
    out.iter()
        .filter(|e| e.output == outputs::NEXT)
        .map(|e| serde_json::from_slice(&e.value))
        .collect()
}

fn summary(changes: &[AudienceChange]) -> Vec<(String, AudienceAction)> {
    changes
        .iter()
        .map(|c| (c.audience.clone(), c.action))
        .collect()
}

fn entered(name: &str) -> (String, AudienceAction) {
    (name.to_owned(), AudienceAction::Entered)
}

fn exited(name: &str) -> (String, AudienceAction) {
    (name.to_owned(), AudienceAction::Exited)
}

/// Past the `traits_until` of the traits stage's last update, an audience
/// that reads traits keeps its membership until the next update; one that
/// reads only events goes on with the clock.
#[test]
fn trait_audiences_wait_for_the_traits_update_past_traits_until() -> TestResult {
    let yaml = r#"
viewer: {where: {event: Product Viewed, within: 60s}}
quiet_buyer: {where: {all: [{trait: orders_90s, gte: 1}, {not: {audience: viewer}}]}}
"#;
    for still_ordered in [false, true] {
        let mut h = harness(yaml)?;
        let first = update_until(
            "p",
            Some(("Product Viewed", json!({}))),
            json!({"orders_90s": 1}),
            0,
            Some(50_000),
        )?;
        let out = h.process(Some(b"p"), &first, &[])?;
        assert_eq!(summary(&changes(&out)?), vec![entered("viewer")]);
        // The view leaves its window (2 s buckets) after `orders_90s` may
        // have changed: `quiet_buyer` waits for the traits stage.
        let out = h.tick(62_000)?;
        assert_eq!(summary(&changes(&out)?), vec![exited("viewer")]);
        // The traits stage's update for its expiry at 50 s.
        let traits = if still_ordered {
            json!({})
        } else {
            json!({"orders_90s": 0})
        };
        let next = update_until("p", None, traits, 50_000, None)?;
        let out = h.process(Some(b"p"), &next, &[])?;
        let expected = if still_ordered {
            vec![entered("quiet_buyer")]
        } else {
            Vec::new()
        };
        assert_eq!(summary(&changes(&out)?), expected, "{still_ordered}");
    }
    Ok(())
}

/// A profile stored as JSON (before the binary encoding) loads, goes on
/// exactly as if it had never been re-encoded, and is written back in the
/// binary encoding.
#[test]
fn json_profiles_load_and_are_rewritten_in_the_binary_encoding() -> TestResult {
    let yaml = r#"
seq: {where: {sequence: [{event: A}, {event: B}], within: 1d}}
busy: {where: {event: A, count: {gte: 2}, within: 7d}}
shoes: {where: {trait: favorite, eq: shoes}}
"#;
    let (mut binary, mut json) = (harness(yaml)?, harness(yaml)?);
    type Step<'a> = (Option<(&'a str, Value)>, Value, i64);
    let steps: [Step; 5] = [
        (Some(("A", json!({}))), json!({"favorite": "shoes"}), DAY),
        (Some(("A", json!({}))), json!({"n": [1, 2]}), DAY + HOUR),
        (Some(("B", json!({}))), json!({}), DAY + 2 * HOUR),
        (None, json!({"favorite": null}), 2 * DAY),
        (Some(("A", json!({}))), json!({}), 20 * DAY),
    ];
    for (i, (event, traits, t)) in steps.into_iter().enumerate() {
        if i == 2 {
            let key = profile_key("p");
            let stored = json.state.map.get(key.as_slice()).ok_or("no profile")?;
            assert_eq!(
                stored.first(),
                Some(&crate::profile_keyed::LIVE),
                "stored in the binary encoding"
            );
            let profile: AudienceProfile = crate::profile_keyed::read_state(stored)?;
            json.state.map.insert(key, serde_json::to_vec(&profile)?);
        }
        let a = send(&mut binary, "p", event.clone(), traits.clone(), t)?;
        let b = send(&mut json, "p", event, traits, t)?;
        assert_eq!(summary(&a), summary(&b), "update {i}");
    }
    let stored = json
        .state
        .map
        .get(profile_key("p").as_slice())
        .ok_or("no profile")?;
    assert_eq!(
        stored.first(),
        Some(&crate::profile_keyed::LIVE),
        "rewritten in the binary encoding"
    );
    assert_eq!(
        binary.state.map.get(profile_key("p").as_slice()),
        Some(stored)
    );
    Ok(())
}

#[test]
fn the_design_audiences_load_in_dependency_order() -> TestResult {
    let set = AudienceSet::new(&defs(DESIGN_AUDIENCES)?, &KnownNames::anything())?;
    let order = set.order();
    let pos = |n: &str| order.iter().position(|o| o == n);
    assert!(pos("big_spenders") < pos("lapsing"));
    assert_eq!(order.len(), 3);
    let lapsing = set.audiences.get("lapsing").ok_or("no lapsing")?;
    assert!(
        lapsing.traits.contains("revenue_total"),
        "traits flow through audience refs"
    );
    // Both event conditions on Order Completed without `where` share one
    // filter; the one with `where` has its own, and the sequence's two
    // steps theirs (exact recent times, not a window's buckets).
    assert_eq!(set.filters.len(), 4);
    assert_eq!(set.sequences.len(), 1);
    Ok(())
}

/// `not … within 14d` must not turn true because one update carries a
/// time a year ahead of the stream.
#[test]
fn a_future_dated_update_does_not_age_out_recent_events() -> TestResult {
    let mut h = harness(
        "quiet: {where: {not: {event: Order Completed, within: 14d}}}\n\
             active: {where: {event: Order Completed, within: 14d}}",
    )?;
    h.tick(100 * DAY)?;
    let c = send(
        &mut h,
        "p",
        Some(("Order Completed", json!({}))),
        json!({}),
        100 * DAY,
    )?;
    assert_eq!(summary(&c), vec![entered("active")]);
    let c = send(
        &mut h,
        "p",
        Some(("Page Viewed", json!({}))),
        json!({}),
        465 * DAY,
    )?;
    assert!(c.is_empty(), "no change: {:?}", summary(&c));
    // The order's bucket (14d / 30 wide) has left the window by day 115.
    let c = h.tick(115 * DAY)?;
    assert_eq!(
        summary(&changes(&c)?),
        vec![exited("active"), entered("quiet")]
    );
    Ok(())
}

/// A sequence keeps the latest few times per step, finds a match made by
/// a late event, and once it held holds for good, however many events
/// follow (and through a merge).
#[test]
fn sequences_keep_few_times_and_hold_for_good() -> TestResult {
    let mut h = harness("seq: {where: {sequence: [{event: A}, {event: B}], within: 5ms}}")?;
    h.tick(DAY)?;
    let b = send(&mut h, "p", Some(("B", json!({}))), json!({}), DAY + 10)?;
    assert!(b.is_empty());
    // A late A, 3 ms before the B: the sequence happened.
    let a = send(&mut h, "p", Some(("A", json!({}))), json!({}), DAY + 7)?;
    assert_eq!(summary(&a), vec![entered("seq")]);
    // A flood of both steps, never 5 ms apart in order: the match stays.
    for i in 0..1_000i64 {
        let t = DAY + 1_000 + i * 100;
        let (name, at) = if i % 2 == 0 { ("B", t) } else { ("A", t) };
        let c = send(&mut h, "p", Some((name, json!({}))), json!({}), at)?;
        assert!(c.is_empty(), "{:?}", summary(&c));
    }
    let stored = h
        .state
        .map
        .get(profile_key("p").as_slice())
        .ok_or("no profile")?;
    let profile: AudienceProfile = crate::profile_keyed::read_state(stored)?;
    for history in profile.events.values() {
        assert!(history.times.len() <= MAX_SEQUENCE_TIMES);
    }
    assert_eq!(profile.sequences.len(), 1);
    assert!(stored.len() < 4096, "{} bytes", stored.len());
    // Merged into a profile that never matched, the mark travels.
    let merged = serde_json::to_vec(&ProfileUpdate::Merged {
        from: "p".into(),
        into: "q".into(),
        identifiers: Identifiers::new(),
        cause: Cause::default(),
        announced: false,
    })?;
    let out = h.process(Some(b"p"), &merged, &[])?;
    assert_eq!(summary(&changes(&out)?), vec![exited("seq")]);
    let mut entered_q = Vec::new();
    for t in out.iter().filter(|e| e.output == outputs::SELF) {
        entered_q.extend(changes(&h.process(t.key.as_deref(), &t.value, &[])?)?);
    }
    assert_eq!(summary(&entered_q), vec![entered("seq")]);
    let c = send(
        &mut h,
        "q",
        Some(("C", json!({}))),
        json!({}),
        DAY + 500_000,
    )?;
    assert!(c.is_empty(), "{:?}", summary(&c));
    Ok(())
}

/// A bot's events keep at most 31 buckets per windowed filter, not one
/// time per event, and windowed counts stay right.
#[test]
fn windowed_event_history_is_kept_in_buckets() -> TestResult {
    let mut h = harness("busy: {where: {event: A, count: {gte: 3000}, within: 1d}}")?;
    h.tick(DAY)?;
    let mut entered_at = None;
    for i in 0..5_000i64 {
        let t = DAY + i * 20_000;
        let c = send(&mut h, "p", Some(("A", json!({}))), json!({}), t)?;
        if !c.is_empty() && entered_at.is_none() {
            entered_at = Some(i);
        }
    }
    // 3000 events 20 s apart span 16.7 hours: in the window.
    assert_eq!(entered_at, Some(2_999));
    let stored = h
        .state
        .map
        .get(profile_key("p").as_slice())
        .ok_or("no profile")?;
    let profile: AudienceProfile = crate::profile_keyed::read_state(stored)?;
    let history = profile.events.values().next().ok_or("no history")?;
    assert!(history.times.is_empty());
    assert!(
        history.buckets.len() <= 31,
        "{} buckets",
        history.buckets.len()
    );
    assert!(stored.len() < 2048, "{} bytes", stored.len());
    Ok(())
}

#[test]
fn big_spenders_and_lapsing_follow_events_and_time() -> TestResult {
    let mut h = harness(DESIGN_AUDIENCES)?;
    let order = |rev: i64| Some(("Order Completed", json!({"revenue": rev})));
    assert!(send(&mut h, "p", order(150), json!({"revenue_total": 150}), DAY)?.is_empty());
    let c = send(
        &mut h,
        "p",
        order(450),
        json!({"revenue_total": 600}),
        2 * DAY,
    )?;
    assert_eq!(summary(&c), vec![entered("big_spenders")]);
    let change = &c[0];
    assert_eq!(change.kind, "audience_change");
    assert_eq!(change.profile_id, "p");
    assert_eq!(
        change.traits,
        BTreeMap::from([("revenue_total".to_string(), json!(600))])
    );
    assert_eq!(change.event_time, rfc3339_ms(2 * DAY));
    assert_eq!(
        change.cause.message_id.as_deref(),
        Some(format!("m{}", 2 * DAY).as_str())
    );
    assert_eq!(
        change.identifiers.get("user_id"),
        Some(&vec!["u_p".to_string()])
    );

    // 14 days after the last order's bucket (14d / 30 wide) the big
    // spender is lapsing, by time alone.
    let width = crate::traits::bucket_width(14 * DAY);
    let lapses = (2 * DAY).div_euclid(width) * width + width - 1 + 14 * DAY;
    h.tick(10 * DAY)?;
    assert!(changes(&h.tick(lapses - 1)?)?.is_empty());
    let c = changes(&h.tick(lapses)?)?;
    assert_eq!(summary(&c), vec![entered("lapsing")]);
    assert_eq!(c[0].cause.tick, Some(lapses));
    assert_eq!(c[0].event_time, rfc3339_ms(lapses));
    // The first order's bucket (day 1: a 30d window keeps buckets of a
    // day) leaves the window when its last instant does, at day 32 less
    // 1 ms: both exit.
    assert!(changes(&h.tick(32 * DAY - 2)?)?.is_empty());
    let c = changes(&h.tick(32 * DAY - 1)?)?;
    assert_eq!(summary(&c), vec![exited("big_spenders"), exited("lapsing")]);
    assert!(changes(&h.tick(400 * DAY)?)?.is_empty());
    Ok(())
}

#[test]
fn a_sequence_needs_the_order_and_the_gap() -> TestResult {
    let mut h = harness(DESIGN_AUDIENCES)?;
    let viewed = Some(("Product Viewed", json!({})));
    let bought = Some(("Order Completed", json!({"revenue": 5})));
    // Bought before viewing: no.
    assert!(send(&mut h, "a", bought.clone(), json!({}), DAY)?.is_empty());
    assert!(send(&mut h, "a", viewed.clone(), json!({}), DAY + HOUR)?.is_empty());
    // Bought two days after viewing: no.
    assert!(send(&mut h, "a", bought.clone(), json!({}), 3 * DAY + 2 * HOUR)?.is_empty());
    // A late view, 2 hours before that purchase: yes, by event time.
    let c = send(&mut h, "a", viewed, json!({}), 3 * DAY)?;
    assert_eq!(summary(&c), vec![entered("browsed_then_bought")]);
    // It stays: nothing expires a sequence.
    assert!(changes(&h.tick(100 * DAY)?)?.is_empty());
    Ok(())
}

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
    })?;
    let out = h.process(Some(b"a"), &merged, &[])?;
    let c = changes(&out)?;
    assert_eq!(summary(&c), vec![exited("big_spenders")]);
    assert_eq!(c[0].profile_id, "a");
    assert_eq!(c[0].cause.message_id.as_deref(), Some("m-merge"));
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
    match serde_json::from_slice::<ProfileUpdate>(&out[0].value)? {
        ProfileUpdate::Update { profile_id, .. } => assert_eq!(profile_id, "b"),
        other => return Err(format!("unexpected {other:?}").into()),
    }
    Ok(())
}

#[test]
fn cycles_and_unknown_audiences_are_rejected_with_a_path() -> TestResult {
    let cyclic = defs(
        "a: {where: {all: [{trait: x, exists: true}, {audience: b}]}}\n\
             b: {where: {not: {audience: a}}}\n\
             c: {where: {audience: a}}",
    )?;
    let err = AudienceSet::new(&cyclic, &KnownNames::anything())
        .err()
        .ok_or("expected an error")?;
    assert_eq!(err.to_string(), "audiences.a: cycle a -> b -> a");
    let own = defs("s: {where: {any: [{audience: s}]}}")?;
    let err = AudienceSet::new(&own, &KnownNames::anything())
        .err()
        .ok_or("expected an error")?;
    assert_eq!(err.to_string(), "audiences.s: cycle s -> s");
    let unknown = defs("x: {where: {all: [{trait: t, gt: 1}, {any: [{audience: nope}]}]}}")?;
    let err = AudienceSet::new(&unknown, &KnownNames::anything())
        .err()
        .ok_or("expected an error")?;
    assert_eq!(err.path, "audiences.x.where.all[1].any[0].audience");
    assert_eq!(err.message, "unknown audience \"nope\"");
    let zero = defs("z: {where: {event: E, within: 0d}}")?;
    let err = AudienceSet::new(&zero, &KnownNames::anything())
        .err()
        .ok_or("expected an error")?;
    assert_eq!(err.path, "audiences.z.where.within");
    Ok(())
}

#[test]
fn condition_parse_errors_carry_the_serde_path() -> TestResult {
    let path_of = |yaml: &str| -> Result<String, Box<dyn Error>> {
        let de = serde_yaml::Deserializer::from_str(yaml);
        match serde_path_to_error::deserialize::<_, BTreeMap<String, AudienceDef>>(de) {
            Err(e) => Ok(e.to_string()),
            Ok(_) => Err(format!("expected an error for {yaml}").into()),
        }
    };
    let e = path_of("vip: {where: {all: [{trait: t, gt: 1}, {event: E, count: 2}]}}")?;
    assert!(e.starts_with("vip.where.all[1].count: "), "{e}");
    assert!(e.contains("expected a map like {gte: 2}"), "{e}");
    let e = path_of("vip: {where: {all: [{event: E, count: {atleast: 2}}]}}")?;
    assert!(e.starts_with("vip.where.all[0].count"), "{e}");
    let e = path_of("vip: {where: {not: {event: E, within: 2w}}}")?;
    assert!(e.starts_with("vip.where.not.within: "), "{e}");
    let e = path_of("vip: {where: {event: E, where: [{property: p, gt: {}}]}}")?;
    assert!(e.starts_with("vip.where.where[0]"), "{e}");
    for bad in [
        "vip: {where: {trait: t}}",
        "vip: {where: {trait: t, gt: 1, lt: 3}}",
        "vip: {where: {trait: t, event: E}}",
        "vip: {where: {audience: a, within: 1d}}",
        "vip: {where: {sequence: [{event: A, count: {gte: 1}}]}}",
        "vip: {where: {}}",
        "vip: {where: {frobnicate: 1}}",
        "vip: {where: {trait: t, gt: 1}, name: x}",
    ] {
        let e = path_of(bad)?;
        assert!(e.starts_with("vip"), "{bad}: {e}");
    }
    Ok(())
}

#[test]
fn malformed_updates_are_rejected_before_any_state_write() -> TestResult {
    let mut h = harness(DESIGN_AUDIENCES)?;
    for bad in [
        b"{".to_vec(),
        serde_json::to_vec(&json!({"type": "update", "profile_id": "p"}))?,
        serde_json::to_vec(
            &json!({"type": "transfer", "stage": "audiences", "from": "a", "into": "b",
                                        "state": {"events": 5}, "cause": {}}),
        )?,
    ] {
        match h.process(Some(b"p"), &bad, &[]) {
            Err(OperatorError::Rejected { .. }) => {}
            other => return Err(format!("expected a rejection, got {other:?}").into()),
        }
    }
    assert!(h.state.map.is_empty());
    // Another stage's transfer is not ours.
    let other = serde_json::to_vec(
        &json!({"type": "transfer", "stage": "traits", "from": "a", "into": "b",
                                                "state": {}, "cause": {}}),
    )?;
    assert!(h.process(Some(b"b"), &other, &[])?.is_empty());
    Ok(())
}

#[test]
fn sequence_scan_is_exact_on_small_cases() {
    let a = [1, 5, 9];
    let b = [3, 6];
    assert!(sequence_holds(&[&a, &b], Some(1)));
    assert!(!sequence_holds(&[&a, &b], Some(0)));
    assert!(sequence_holds(&[&a, &b], None));
    // B then A then B: 3 -> 5 -> 6 (gap 3); starting at 6 nothing follows.
    assert!(sequence_holds(&[&b, &a, &b], Some(3)));
    assert!(!sequence_holds(&[&b, &a, &b], Some(2)));
    assert!(
        !sequence_holds(&[&a, &a], Some(0)),
        "strictly increasing times"
    );
    assert!(!sequence_holds(&[], None));
}

// -- property test: incremental == batch ------------------------------

const PROP_AUDIENCES: &str = r#"
rich: {where: {trait: score, gte: 5}}
active: {where: {event: A, within: 10ms}}
frequent: {where: {event: A, count: {gte: 2}, within: 20ms, where: [{property: properties.v, gt: 1}]}}
ever_b: {where: {event: B, count: {gte: 2}}}
never_c: {where: {not: {event: C}}}
active_or_rich: {where: {any: [{audience: rich}, {audience: active}]}}
lapsed: {where: {all: [{audience: active_or_rich}, {not: {event: B, within: 15ms}}]}}
few_recent_a: {where: {event: A, count: {lte: 1}, within: 7ms}}
seq: {where: {sequence: [{event: A}, {event: B, where: [{property: properties.v, lte: 2}]}], within: 5ms}}
seq_open: {where: {sequence: [{event: B}, {event: A}, {event: B}]}}
plan: {where: {not: {trait: plan, in: [pro, team]}}}
"#;

#[derive(Debug, Clone)]
enum Op {
    Tick(i64),
    Update {
        traits: Vec<(&'static str, Value)>,
        event: Option<(&'static str, i64)>,
        offset: i64,
    },
}

fn arb_op() -> impl Strategy<Value = Op> {
    let trait_value = prop_oneof![
        Just(("score", Value::Null)),
        (0i64..10).prop_map(|n| ("score", json!(n))),
        prop::sample::select(vec!["free", "pro", "team"]).prop_map(|p| ("plan", json!(p))),
        Just(("plan", Value::Null)),
    ];
    prop_oneof![
        (0i64..8).prop_map(Op::Tick),
        (
            prop::collection::vec(trait_value, 0..3),
            prop::option::of((prop::sample::select(vec!["A", "B", "C"]), 0i64..4)),
            -12i64..4,
        )
            .prop_map(|(traits, event, offset)| Op::Update {
                traits,
                event,
                offset
            }),
    ]
}

/// Batch evaluation of a raw condition over the whole history.
fn batch_holds(
    c: &Condition,
    defs: &BTreeMap<String, AudienceDef>,
    traits: &BTreeMap<String, Value>,
    events: &[(Value, i64)],
    now: i64,
) -> bool {
    let matching = |name: &str, conds: &[PropertyCondition]| -> Vec<i64> {
        events
            .iter()
            .filter(|(e, _)| {
                messages::event_name(e) == Some(name) && conds.iter().all(|c| c.matches_event(e))
            })
            .map(|(_, t)| *t)
            .collect()
    };
    match c {
        Condition::All(cs) => cs.iter().all(|c| batch_holds(c, defs, traits, events, now)),
        Condition::Any(cs) => cs.iter().any(|c| batch_holds(c, defs, traits, events, now)),
        Condition::Not(c) => !batch_holds(c, defs, traits, events, now),
        Condition::Trait(t) => t.op.matches(traits.get(&t.name)),
        Condition::Event(e) => {
            let n = matching(&e.event, &e.r#where)
                .into_iter()
                .filter(|t| e.within.is_none_or(|w| *t > now - w.millis()))
                .count() as u64;
            match e.count {
                Some(c) => c.matches(n),
                None => n >= 1,
            }
        }
        Condition::Audience(name) => defs
            .get(name)
            .is_some_and(|d| batch_holds(&d.r#where, defs, traits, events, now)),
        Condition::Sequence(s) => {
            let steps: Vec<Vec<i64>> = s
                .steps
                .iter()
                .map(|st| matching(&st.event, &st.r#where))
                .collect();
            fn chain(steps: &[Vec<i64>], after: i64, start: i64, within: Option<i64>) -> bool {
                match steps.split_first() {
                    None => within.is_none_or(|w| after - start <= w),
                    Some((times, rest)) => times
                        .iter()
                        .filter(|t| **t > after)
                        .any(|t| chain(rest, *t, start, within)),
                }
            }
            let within = s.within.map(|w| w.millis());
            match steps.split_first() {
                None => false,
                Some((first, rest)) => first.iter().any(|t| chain(rest, *t, *t, within)),
            }
        }
    }
}

proptest! {
    #[test]
    fn incremental_membership_equals_batch_recomputation(ops in prop::collection::vec(arb_op(), 0..40)) {
        let fail = |e: Box<dyn Error>| TestCaseError::fail(e.to_string());
        let all = defs(PROP_AUDIENCES).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut h = harness(PROP_AUDIENCES).map_err(fail)?;
        let mut now = 100i64;
        h.tick(now).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut traits = BTreeMap::new();
        let mut events = Vec::new();
        let mut last_time = now;
        let mut members = BTreeSet::new();
        let mut exists = false;
        for op in &ops {
            let out = match op {
                Op::Tick(dt) => {
                    now += dt;
                    h.tick(now).map_err(|e| TestCaseError::fail(e.to_string()))?
                }
                Op::Update { traits: t, event, offset } => {
                    let time = now + offset;
                    last_time = last_time.max(time);
                    let mut map = serde_json::Map::new();
                    for (k, v) in t {
                        map.insert((*k).to_string(), v.clone());
                        if v.is_null() { traits.remove(*k); } else { traits.insert((*k).to_string(), v.clone()); }
                    }
                    let ev = event.map(|(name, v)| (name, json!({"v": v})));
                    if let Some((name, props)) = &ev {
                        events.push((json!({"type": "track", "event": name, "properties": props}), time));
                    }
                    let bytes = update("p", ev, Value::Object(map), time).map_err(fail)?;
                    h.process(Some(b"p"), &bytes, &[]).map_err(|e| TestCaseError::fail(e.to_string()))?
                }
            };
            for c in changes(&out).map_err(|e| TestCaseError::fail(e.to_string()))? {
                match c.action {
                    AudienceAction::Entered => prop_assert!(members.insert(c.audience.clone()), "entered twice"),
                    AudienceAction::Exited => prop_assert!(members.remove(&c.audience), "exited while out"),
                }
            }
            // After every record, not only at the end: the change
            // stream so far replays into the batch memberships. A
            // profile exists for this stage from its first update on.
            exists |= matches!(op, Op::Update { .. });
            let at = now.max(last_time);
            let expected: BTreeSet<String> = all
                .iter()
                .filter(|(_, d)| exists && batch_holds(&d.r#where, &all, &traits, &events, at))
                .map(|(n, _)| n.clone())
                .collect();
            if exists {
                prop_assert_eq!(&members, &expected, "at {} after {:?}", at, op);
            }
        }
    }
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
    let merged = serde_json::to_vec(&ProfileUpdate::Merged {
        from: "a".into(),
        into: "b".into(),
        identifiers: Identifiers::new(),
        cause: Cause::default(),
        announced: true,
    })?;
    let out = h.process(Some(b"a"), &merged, &[])?;
    let transfer = out
        .iter()
        .find(|e| e.output == outputs::SELF)
        .ok_or("no transfer")?
        .value
        .clone();
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
