use std::collections::BTreeMap;
use std::error::Error;
use std::sync::Arc;

use cdp_pipeline::operator::{Emitted, OperatorError, OperatorHarness};
use proptest::prelude::*;
use serde_json::{json, Value};

use super::profile::ProfileState;
use super::state::TraitState;
use super::*;
use crate::event_time::TIME_CORRECTED_HEADER;
use crate::messages::{outputs, rfc3339_ms, Cause, Identifiers, ProfileRecord, ProfileUpdate};
use crate::profile_keyed::profile_key;

type TestResult = Result<(), Box<dyn Error>>;
const DAY: i64 = 86_400_000;

fn trait_set(yaml: &str) -> Result<Arc<TraitSet>, Box<dyn Error>> {
    let defs: BTreeMap<String, TraitDef> = serde_yaml::from_str(yaml)?;
    Ok(Arc::new(TraitSet::new(&defs)?))
}

fn harness(yaml: &str) -> Result<OperatorHarness<TraitsOperator>, Box<dyn Error>> {
    Ok(OperatorHarness::new(TraitsOperator::new(trait_set(yaml)?)))
}

fn track(name: &str, t: i64, properties: Value) -> Value {
    json!({"type": "track", "event": name, "messageId": format!("m{t}"),
               "timestamp": rfc3339_ms(t), "properties": properties})
}

fn identify(t: i64, traits: Value) -> Value {
    json!({"type": "identify", "messageId": format!("i{t}"), "userId": "u1",
               "timestamp": rfc3339_ms(t), "traits": traits})
}

fn event_record(id: &str, event: Value) -> Result<Vec<u8>, serde_json::Error> {
    let mut identifiers = Identifiers::new();
    identifiers.insert("user_id".into(), vec![format!("u_{id}")]);
    serde_json::to_vec(&ProfileRecord::Event {
        profile_id: id.into(),
        identifiers,
        event,
        dropped: Vec::new(),
        merged_from: Vec::new(),
    })
}

fn send(
    h: &mut OperatorHarness<TraitsOperator>,
    id: &str,
    event: Value,
) -> Result<Vec<Emitted>, Box<dyn Error>> {
    let bytes = event_record(id, event)?;
    Ok(h.process(Some(id.as_bytes()), &bytes, &[])?)
}

fn updates(out: &[Emitted]) -> Result<Vec<ProfileUpdate>, serde_json::Error> {
    out.iter()
        .filter(|e| e.output == outputs::NEXT)
        .map(|e| serde_json::from_slice(&e.value))
        .collect()
}

/// The changed traits of every `Update` in `out`, later ones winning.
fn changed(out: &[Emitted]) -> Result<BTreeMap<String, Value>, serde_json::Error> {
    let mut traits = BTreeMap::new();
    for u in updates(out)? {
        if let ProfileUpdate::Update { traits: t, .. } = u {
            traits.extend(t);
        }
    }
    Ok(traits)
}

const DESIGN_TRAITS: &str = r#"
orders_30d: {event_counter: {event: Order Completed, within: 30d}}
orders: {event_counter: {event: Order Completed}}
big_orders: {event_counter: {event: Order Completed, where: [{property: properties.revenue, gt: 100}]}}
revenue_total: {aggregation: {event: Order Completed, property: properties.revenue, function: sum}}
revenue_avg: {aggregation: {event: Order Completed, property: properties.revenue, function: avg}}
revenue_min: {aggregation: {event: Order Completed, property: properties.revenue, function: min}}
revenue_max: {aggregation: {event: Order Completed, property: properties.revenue, function: max}}
favorite_category: {most_frequent: {event: Product Viewed, property: properties.category}}
first_campaign: {first: {event: Page Viewed, property: context.campaign.source}}
last_product: {last: {event: Product Viewed, property: properties.sku}}
categories: {unique_list: {event: Product Viewed, property: properties.category, limit: 2}}
"#;

/// One event dated a year ahead (a wrong device clock) must not move the
/// profile's clock: before the bound it pruned `orders_30d` to nothing.
#[test]
fn a_future_dated_event_does_not_prune_the_windows_of_its_profile() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    h.tick(100 * DAY)?;
    let out = send(
        &mut h,
        "p1",
        track("Order Completed", 100 * DAY, json!({"revenue": 5})),
    )?;
    assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(1)));
    let year_ahead = 465 * DAY;
    let out = send(&mut h, "p1", track("Page Viewed", year_ahead, json!({})))?;
    assert!(
        !changed(&out)?.contains_key("orders_30d"),
        "the order is still in its window: {:?}",
        changed(&out)?
    );
    match updates(&out)?.first() {
        Some(ProfileUpdate::Update {
            event_time,
            time_corrected_from,
            ..
        }) => {
            assert_eq!(*event_time, 100 * DAY, "taken to happen at stream time");
            assert_eq!(*time_corrected_from, Some(year_ahead));
        }
        other => return Err(format!("expected an update, got {other:?}").into()),
    }
    assert!(out
        .iter()
        .any(|e| e.headers.iter().any(|(k, _)| k == TIME_CORRECTED_HEADER)));
    // A late event inside the window still counts; within the tolerance
    // a slightly-ahead clock is kept as is.
    let out = send(
        &mut h,
        "p1",
        track("Order Completed", 80 * DAY, json!({"revenue": 5})),
    )?;
    assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(2)));
    let out = send(
        &mut h,
        "p1",
        track(
            "Order Completed",
            100 * DAY + 1_800_000,
            json!({"revenue": 5}),
        ),
    )?;
    assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(3)));
    // The window then slides with stream time as before.
    let out = h.tick(111 * DAY)?;
    assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(2)));
    Ok(())
}

#[test]
fn a_future_dated_event_can_be_dead_lettered_instead() -> TestResult {
    let set = Arc::new(
        TraitSet::new(&serde_yaml::from_str(DESIGN_TRAITS)?)?.with_event_time(
            crate::event_time::EventTimeConfig {
                beyond: crate::event_time::FutureTimePolicy::DeadLetter,
                ..Default::default()
            },
        ),
    );
    let mut h = OperatorHarness::new(TraitsOperator::new(set));
    h.tick(100 * DAY)?;
    let bytes = event_record("p1", track("Order Completed", 465 * DAY, json!({})))?;
    match h.process(Some(b"p1"), &bytes, &[]) {
        Err(OperatorError::Rejected { reason, .. }) => assert_eq!(reason, "future_event_time"),
        other => return Err(format!("expected a dead letter, got {other:?}").into()),
    }
    assert!(
        cdp_pipeline::store::StateBackend::scan_prefix(&h.state, b"profile/")?.is_empty(),
        "nothing stored"
    );
    Ok(())
}

#[test]
fn counters_and_aggregations_follow_the_events() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    let out = send(
        &mut h,
        "p1",
        track("Order Completed", DAY, json!({"revenue": 19.99})),
    )?;
    let first = changed(&out)?;
    assert_eq!(first.get("orders"), Some(&json!(1)));
    assert_eq!(first.get("orders_30d"), Some(&json!(1)));
    assert_eq!(first.get("big_orders"), Some(&json!(0)));
    assert_eq!(first.get("revenue_total"), Some(&json!(19.99)));
    assert_eq!(first.get("categories"), Some(&json!([])));
    assert_eq!(
        first.get("favorite_category"),
        None,
        "no value yet: not emitted"
    );

    let out = send(
        &mut h,
        "p1",
        track("Order Completed", 2 * DAY, json!({"revenue": 480})),
    )?;
    let second = changed(&out)?;
    assert_eq!(second.get("orders"), Some(&json!(2)));
    assert_eq!(second.get("big_orders"), Some(&json!(1)));
    assert_eq!(second.get("revenue_total"), Some(&json!(499.99)));
    assert_eq!(second.get("revenue_avg"), Some(&json!(249.995)));
    assert_eq!(
        second.get("revenue_min"),
        None,
        "unchanged min is not emitted"
    );
    assert_eq!(second.get("revenue_max"), Some(&json!(480)));
    assert_eq!(second.get("categories"), None);
    Ok(())
}

#[test]
fn every_event_yields_an_update_even_without_changes() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    send(&mut h, "p1", track("Signed Up", DAY, json!({})))?;
    let out = send(&mut h, "p1", track("Signed Up", 2 * DAY, json!({})))?;
    let ups = updates(&out)?;
    assert_eq!(ups.len(), 1);
    match &ups[0] {
        ProfileUpdate::Update {
            profile_id,
            event,
            traits,
            event_time,
            cause,
            identifiers,
            ..
        } => {
            assert_eq!(profile_id, "p1");
            assert!(traits.is_empty());
            assert_eq!(*event_time, 2 * DAY);
            assert_eq!(
                event.as_ref().and_then(|e| e.get("event")),
                Some(&json!("Signed Up"))
            );
            assert_eq!(
                cause.message_id.as_deref(),
                Some(format!("m{}", 2 * DAY).as_str())
            );
            assert_eq!(identifiers.get("user_id"), Some(&vec!["u_p1".to_string()]));
        }
        other => return Err(format!("unexpected {other:?}").into()),
    }
    Ok(())
}

#[test]
fn unique_list_keeps_the_most_recent_and_unique_count_counts_distinct_values() -> TestResult {
    let mut h = harness(
        "recent: {unique_list: {event: V, property: properties.c, limit: 2}}\n\
             skus: {unique_count: {event: V, property: properties.c}}\n\
             skus_3: {unique_count: {event: V, property: properties.c, limit: 3}}\n\
             skus_w: {unique_count: {event: V, property: properties.c, within: 12d}}",
    )?;
    let mut seen = BTreeMap::new();
    for (t, c) in [
        (DAY, "z"),
        (2 * DAY, "a"),
        (2 * DAY + 3_600_000, "m"),
        (4 * DAY, "z"),
        (15 * DAY, "b"),
    ] {
        let out = send(&mut h, "p", track("V", t, json!({"c": c})))?;
        seen.extend(changed(&out)?);
    }
    // "z" seen again at day 4 and "b" at day 15 are the two most recent,
    // even though "a" and "m" sort first.
    assert_eq!(seen.get("recent"), Some(&json!(["b", "z"])));
    assert_eq!(seen.get("skus"), Some(&json!(4)));
    assert_eq!(
        seen.get("skus_3"),
        Some(&json!(3)),
        "counts up to its limit"
    );
    assert_eq!(
        seen.get("skus_w"),
        Some(&json!(2)),
        "z (day 4) and b (day 15) within 12d"
    );
    Ok(())
}

/// A profile stored by the previous layout (one window entry per event,
/// a unique list of values) loads and keeps its values.
#[test]
fn states_of_the_previous_layout_are_upgraded_on_load() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    h.tick(10 * DAY)?;
    let old = json!({
        "identifiers": {"user_id": ["u_p"]}, "clock": 10 * DAY,
        "computed": {
            "orders_30d": {"kind": "window", "entries": [[9 * DAY, ""], [10 * DAY, ""]]},
            "categories": {"kind": "unique_list", "values": ["\"bags\""]}
        },
        "emitted": {"orders_30d": 2, "categories": ["bags"]}
    });
    h.state
        .map
        .insert(profile_key("p"), serde_json::to_vec(&old)?);
    let out = send(
        &mut h,
        "p",
        track("Product Viewed", 10 * DAY, json!({"category": "hats"})),
    )?;
    let values = changed(&out)?;
    assert_eq!(values.get("categories"), Some(&json!(["bags", "hats"])));
    let out = send(&mut h, "p", track("Order Completed", 10 * DAY, json!({})))?;
    assert_eq!(
        super::tests::changed(&out)?.get("orders_30d"),
        Some(&json!(3))
    );
    Ok(())
}

/// A profile state stored as JSON (before the binary encoding) loads, goes
/// on exactly as if it had never been re-encoded, and is written back in
/// the binary encoding.
#[test]
fn json_states_load_and_are_rewritten_in_the_binary_encoding() -> TestResult {
    let config = format!(
        "{DESIGN_TRAITS}\nplan_seen: {{unique_count: {{event: identify, property: traits.plan}}}}"
    );
    let (mut binary, mut json) = (harness(&config)?, harness(&config)?);
    let events = [
        track("Order Completed", DAY, json!({"revenue": 120.5})),
        track(
            "Product Viewed",
            DAY + 1,
            json!({"category": "hats", "sku": "s1"}),
        ),
        identify(DAY + 2, json!({"plan": "pro", "email": "a@b.c"})),
        track("Order Completed", 2 * DAY, json!({"revenue": 7})),
        track(
            "Product Viewed",
            3 * DAY,
            json!({"category": "bags", "sku": "s2"}),
        ),
        track("Order Completed", 40 * DAY, json!({"revenue": 1})),
    ];
    for (i, event) in events.iter().enumerate() {
        if i == 3 {
            // Rewrite the stored state as the previous version did.
            let key = profile_key("p");
            let stored = json.state.map.get(key.as_slice()).ok_or("no state")?;
            assert_eq!(
                stored.first(),
                Some(&crate::profile_keyed::LIVE),
                "stored in the binary encoding"
            );
            let state: ProfileState = crate::profile_keyed::read_state(stored)?;
            json.state.map.insert(key, serde_json::to_vec(&state)?);
        }
        let a = updates(&send(&mut binary, "p", event.clone())?)?;
        let b = updates(&send(&mut json, "p", event.clone())?)?;
        assert_eq!(a, b, "event {i}");
    }
    let stored = json
        .state
        .map
        .get(profile_key("p").as_slice())
        .ok_or("no state")?;
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
fn value_traits_use_event_time_not_arrival() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    let viewed = |t: i64, cat: &str, sku: &str| {
        track("Product Viewed", t, json!({"category": cat, "sku": sku}))
    };
    send(&mut h, "p", viewed(5 * DAY, "shoes", "s5"))?;
    send(&mut h, "p", viewed(3 * DAY, "hats", "s3"))?;
    send(&mut h, "p", viewed(4 * DAY, "hats", "s4"))?;
    let out = send(&mut h, "p", viewed(DAY, "bags", "s1"))?;
    let page = |t: i64, src: &str| {
        json!({"type": "page", "messageId": format!("pg{t}"), "timestamp": rfc3339_ms(t),
                   "context": {"campaign": {"source": src}}})
    };
    let p1 = send(&mut h, "p", page(9 * DAY, "late"))?;
    let p2 = send(&mut h, "p", page(8 * DAY, "early"))?;
    let mut all = BTreeMap::new();
    for o in [&out, &p1, &p2] {
        all.extend(changed(o)?);
    }
    // The last arrival ("bags") is the earliest: last_product stays s5.
    let st = h
        .state
        .map
        .get(profile_key("p").as_slice())
        .ok_or("no state")?;
    let state: ProfileState = crate::profile_keyed::read_state(st)?;
    let set = trait_set(DESIGN_TRAITS)?;
    let values = state.values(&set, state.clock);
    assert_eq!(values.get("last_product"), Some(&json!("s5")));
    assert_eq!(values.get("favorite_category"), Some(&json!("hats")));
    assert_eq!(
        values.get("categories"),
        Some(&json!(["hats", "shoes"])),
        "limit 2 keeps the two most recent by event time (bags, the last to arrive, is the oldest)"
    );
    assert_eq!(values.get("first_campaign"), Some(&json!("early")));
    assert_eq!(all.get("first_campaign"), Some(&json!("early")));
    Ok(())
}

#[test]
fn most_frequent_ties_go_to_the_smallest_value() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    send(
        &mut h,
        "p",
        track("Product Viewed", 2, json!({"category": "b"})),
    )?;
    let out = send(
        &mut h,
        "p",
        track("Product Viewed", 1, json!({"category": "a"})),
    )?;
    assert_eq!(changed(&out)?.get("favorite_category"), Some(&json!("a")));
    Ok(())
}

#[test]
fn identify_traits_are_last_write_wins_by_event_time() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    let out = send(
        &mut h,
        "p",
        identify(10, json!({"plan": "pro", "email": "a@x.io"})),
    )?;
    let t = changed(&out)?;
    assert_eq!(t.get("plan"), Some(&json!("pro")));
    // An older identify does not overwrite.
    let out = send(&mut h, "p", identify(5, json!({"plan": "free"})))?;
    assert_eq!(changed(&out)?.get("plan"), None);
    // A tie goes to the later arrival; null removes the trait.
    let out = send(
        &mut h,
        "p",
        identify(10, json!({"plan": "team", "email": null})),
    )?;
    let t = changed(&out)?;
    assert_eq!(t.get("plan"), Some(&json!("team")));
    assert_eq!(t.get("email"), Some(&Value::Null));
    Ok(())
}

#[test]
fn identify_traits_in_context_count_too_and_top_level_wins() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    let mut event = identify(10, json!({"plan": "pro"}));
    event["context"] = json!({"traits": {"plan": "free", "company": "acme"}});
    let t = changed(&send(&mut h, "p", event)?)?;
    assert_eq!(t.get("plan"), Some(&json!("pro")));
    assert_eq!(t.get("company"), Some(&json!("acme")));
    Ok(())
}

/// Ten traits of every type, with windows and limits.
const BUSY_TRAITS: &str = "orders_30d: {event_counter: {event: E, within: 30d}}\n\
     orders: {event_counter: {event: E}}\n\
     revenue_7d: {aggregation: {event: E, property: properties.r, function: sum, within: 7d}}\n\
     revenue_max: {aggregation: {event: E, property: properties.r, function: max}}\n\
     favorite: {most_frequent: {event: E, property: properties.c, limit: 100}}\n\
     favorite_1d: {most_frequent: {event: E, property: properties.c, within: 1d, limit: 10}}\n\
     recent: {unique_list: {event: E, property: properties.c, limit: 10}}\n\
     distinct: {unique_count: {event: E, property: properties.c, limit: 100}}\n\
     first_c: {first: {event: E, property: properties.c}}\n\
     last_c: {last: {event: E, property: properties.c}}";

/// Every trait type over `n` events of one profile (10k distinct
/// values, one event every 5 min, a tick every 100 events): returns the
/// largest stored profile state and the largest emitted record.
fn one_busy_profile(n: usize) -> Result<(usize, usize), Box<dyn Error>> {
    let mut h = harness(BUSY_TRAITS)?;
    let (mut state_max, mut record_max) = (0, 0);
    let mut limited = 0;
    for i in 0..n {
        let t = 1_000_000 + i as i64 * 300_000;
        if i % 100 == 0 {
            h.tick(t)?;
        }
        let event = json!({"type": "track", "event": "E", "timestamp": rfc3339_ms(t),
                               "properties": {"r": i % 7, "c": format!("c{}", (i * 7919) % 10_000)}});
        let out = send(&mut h, "p", event)?;
        limited += out
            .iter()
            .filter(|e| e.headers.iter().any(|(k, _)| k == STATE_LIMIT_HEADER))
            .count();
        record_max = out
            .iter()
            .map(|e| e.value.len())
            .fold(record_max, usize::max);
        if i % 97 == 0 || i + 1 == n {
            let stored = h
                .state
                .map
                .get(profile_key("p").as_slice())
                .map_or(0, Vec::len);
            state_max = state_max.max(stored);
        }
    }
    assert!(limited > 0, "the most_frequent limit was hit and said so");
    eprintln!("{n} events: state {state_max} bytes, largest record {record_max} bytes");
    Ok((state_max, record_max))
}

/// A bot sending 12k events (six weeks, every window full) to one
/// profile: its state stays bounded (windows in buckets, most_frequent
/// and unique_count capped). The 1M-event run is below.
#[test]
fn a_profile_with_many_events_keeps_its_state_under_the_bound() -> TestResult {
    let (state, record) = one_busy_profile(12_000)?;
    assert!(state < 16 * 1024, "profile state {state} bytes");
    assert!(record < 8 * 1024, "largest record {record} bytes");
    Ok(())
}

/// The same with 1M events for one profile, driven through the operator's
/// per-event step (`apply_event`) without the JSON round trip of the state,
/// so it runs in CI in a debug build. Every 1000 events (and at the end)
/// the profile is settled as a timer or an event would (`refresh`), its
/// state encoded as the changelog record it becomes, and the largest update
/// it could emit measured: one carrying the event and *every* trait value
/// (an update carries only the values that changed). Events come every 5
/// minutes over ~9.5 years with 10k distinct values, so every window fills
/// and slides through its buckets and every limit is hit.
#[test]
fn a_profile_with_a_million_events_keeps_its_state_under_the_bound() -> TestResult {
    let set = trait_set(BUSY_TRAITS)?;
    // Events repeat with period 70k (r: i mod 7, c: 7919 i mod 10k).
    let events: Vec<Value> = (0..70_000usize)
        .map(|i| {
            json!({"type": "track", "event": "E", "messageId": format!("m{i:07}"),
                   "timestamp": rfc3339_ms(0),
                   "properties": {"r": i % 7, "c": format!("c{}", (i * 7919) % 10_000)}})
        })
        .collect();
    let mut state = ProfileState::default();
    let (mut state_max, mut json_max, mut record_max, mut limited) = (0usize, 0, 0, 0usize);
    let n = 1_000_000usize;
    for i in 0..n {
        let t = 1_000_000 + i as i64 * 300_000;
        let event = &events[i % events.len()];
        state.clock = state.clock.max(t);
        if !state.apply_event(&set, event, t).limited.is_empty() {
            limited += 1;
        }
        if i % 1000 == 999 || i + 1 == n {
            state.refresh(&set, state.clock);
            state_max = state_max.max(crate::profile_keyed::encode_state(&state)?.len());
            // A transfer carries the state as JSON.
            json_max = json_max.max(serde_json::to_vec(&state)?.len());
            let update = ProfileUpdate::Update {
                profile_id: "prof_0123456789abcdef0123".into(),
                identifiers: Identifiers::from([("user_id".into(), vec!["u_1".into()])]),
                event: Some(event.clone()),
                traits: state.values(&set, state.clock),
                event_time: t,
                time_corrected_from: None,
                cause: Cause::default(),
                merged_from: Vec::new(),
                traits_until: None,
            };
            record_max = record_max.max(serde_json::to_vec(&update)?.len());
        }
    }
    assert!(limited > 0, "the most_frequent limit was hit and said so");
    eprintln!(
        "{n} events: state {state_max} bytes ({json_max} as JSON), largest record {record_max} bytes"
    );
    assert!(state_max < 16 * 1024, "profile state {state_max} bytes");
    assert!(
        json_max < 16 * 1024,
        "profile state {json_max} bytes as JSON"
    );
    assert!(record_max < 8 * 1024, "largest record {record_max} bytes");
    Ok(())
}

fn traits_until(out: &[Emitted]) -> Result<Vec<Option<i64>>, serde_json::Error> {
    Ok(updates(out)?
        .into_iter()
        .filter_map(|u| match u {
            ProfileUpdate::Update { traits_until, .. } => Some(traits_until),
            _ => None,
        })
        .collect())
}

/// The audiences stage holds trait audiences past `traits_until` until the
/// next update: a window expiry that changes no value still sends one.
#[test]
fn a_window_expiry_that_changes_no_value_still_announces_the_next() -> TestResult {
    let mut h = harness(
        "biggest_30d: {aggregation: {event: Order Completed, property: properties.revenue, \
         function: max, within: 30d}}",
    )?;
    send(
        &mut h,
        "p",
        track("Order Completed", DAY, json!({"revenue": 5})),
    )?;
    let out = send(
        &mut h,
        "p",
        track("Order Completed", 10 * DAY, json!({"revenue": 9})),
    )?;
    assert_eq!(changed(&out)?.get("biggest_30d"), Some(&json!(9)));
    assert_eq!(traits_until(&out)?, vec![Some(32 * DAY - 1)]);
    // The 5 leaves the window; the max is still 9.
    let out = h.tick(32 * DAY - 1)?;
    assert!(changed(&out)?.is_empty());
    assert_eq!(traits_until(&out)?, vec![Some(41 * DAY - 1)]);
    let out = h.tick(41 * DAY - 1)?;
    assert_eq!(changed(&out)?.get("biggest_30d"), Some(&Value::Null));
    assert_eq!(traits_until(&out)?, vec![None]);
    Ok(())
}

#[test]
fn windows_slide_with_stream_time() -> TestResult {
    let mut h = harness("orders_30d: {event_counter: {event: Order Completed, within: 30d}}")?;
    send(&mut h, "p", track("Order Completed", DAY, json!({})))?;
    let out = send(&mut h, "p", track("Order Completed", 10 * DAY, json!({})))?;
    assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(2)));
    // The first order's bucket (day 1; a 30d window has buckets of one
    // day) leaves the window when its last instant does: at day 32 less
    // 1 ms. A window counts at most one bucket width (1/30) more.
    let leaves = 32 * DAY - 1;
    // Every update says until when its windowed values hold.
    assert_eq!(traits_until(&out)?, vec![Some(leaves)]);
    assert!(h.tick(leaves - 1)?.is_empty());
    let out = h.tick(leaves)?;
    let ups = updates(&out)?;
    assert_eq!(ups.len(), 1);
    match &ups[0] {
        ProfileUpdate::Update {
            traits,
            event,
            cause,
            event_time,
            traits_until,
            ..
        } => {
            assert_eq!(traits.get("orders_30d"), Some(&json!(1)));
            assert!(event.is_none());
            assert_eq!(cause.tick, Some(leaves));
            assert_eq!(*event_time, leaves);
            // The day-10 bucket is next.
            assert_eq!(*traits_until, Some(41 * DAY - 1));
        }
        other => return Err(format!("unexpected {other:?}").into()),
    }
    let out = h.tick(45 * DAY)?;
    assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(0)));
    assert_eq!(traits_until(&out)?, vec![None], "nothing left to expire");
    assert!(h.tick(100 * DAY)?.is_empty(), "no timer left");
    // A late event already out of the window changes nothing.
    let out = send(&mut h, "p", track("Order Completed", 2 * DAY, json!({})))?;
    assert!(changed(&out)?.is_empty());
    Ok(())
}

#[test]
fn late_events_for_a_merged_profile_are_redirected() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    let merged = serde_json::to_vec(&ProfileRecord::Merged {
        from: "a".into(),
        into: "b".into(),
        identifiers: Identifiers::new(),
        cause: Cause::default(),
        announced: false,
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
    match serde_json::from_slice::<ProfileRecord>(&out[0].value)? {
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
    })?;
    let out = h.process(Some(b"a"), &merged, &[])?;
    let transfer = out
        .iter()
        .find(|e| e.output == outputs::SELF)
        .ok_or("no transfer")?;
    assert_eq!(transfer.key.as_deref(), Some(b"b".as_slice()));
    let forwarded = updates(&out)?;
    assert!(
        matches!(forwarded.as_slice(), [ProfileUpdate::Merged { from, into, .. }] if from == "a" && into == "b")
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

#[test]
fn malformed_records_are_rejected_without_state() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    for bad in [
        b"not json".to_vec(),
        serde_json::to_vec(
            &json!({"type": "event", "profile_id": "p", "identifiers": {}, "event": 5}),
        )?,
        serde_json::to_vec(
            &json!({"type": "merged", "from": "p", "into": "p", "identifiers": {}, "cause": {}}),
        )?,
    ] {
        match h.process(Some(b"p"), &bad, &[]) {
            Err(OperatorError::Rejected { .. }) => {}
            other => return Err(format!("expected a rejection, got {other:?}").into()),
        }
    }
    assert!(h.state.map.is_empty());
    Ok(())
}

#[test]
fn config_errors_name_the_field() -> TestResult {
    let bad = "t: {event_counter: {event: X, where: [{property: p, gt: [1]}]}}";
    let de = serde_yaml::Deserializer::from_str(bad);
    let err = match serde_path_to_error::deserialize::<_, BTreeMap<String, TraitDef>>(de) {
        Err(e) => e,
        Ok(_) => return Err("expected an error".into()),
    };
    assert!(
        err.path()
            .to_string()
            .starts_with("t.event_counter.where[0]"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("`gt` expects a number or a string"),
        "{err}"
    );
    for bad in [
        "t: {event_counter: {event: X, window: 3d}}",
        "t: {event_counter: {event: X, where: [{property: p, gt: 1, lt: 5}]}}",
        "t: {event_counter: {event: X, where: [{property: p, between: 1}]}}",
        "t: {sum: {event: X}}",
    ] {
        assert!(
            serde_yaml::from_str::<BTreeMap<String, TraitDef>>(bad).is_err(),
            "{bad}"
        );
    }
    let zero: BTreeMap<String, TraitDef> =
        serde_yaml::from_str("t: {event_counter: {event: X, within: 0d}}")?;
    let err = TraitSet::new(&zero).err().ok_or("expected an error")?;
    assert_eq!(err.path, "traits.t.event_counter.within");
    let set = trait_set(DESIGN_TRAITS)?;
    assert!(set.names().contains("orders_30d"));
    Ok(())
}

#[test]
fn comparisons_follow_the_documented_rules() {
    let c = |k: &str, v: Value| Comparison::from_key(k, v).ok().flatten();
    let cases: Vec<(Option<Comparison>, Option<Value>, bool)> = vec![
        (c("eq", json!(1)), Some(json!(1.0)), true),
        (c("eq", json!("a")), None, false),
        (c("ne", json!("a")), None, true),
        (c("ne", json!("a")), Some(json!("b")), true),
        (c("gt", json!(100)), Some(json!(100.5)), true),
        (c("gt", json!(100)), Some(json!("200")), false),
        (
            c("gte", json!("2026-01-01")),
            Some(json!("2026-02-01")),
            true,
        ),
        (c("lt", json!(0)), Some(json!(-1)), true),
        (c("lte", json!(0)), Some(Value::Null), false),
        (c("contains", json!("oe")), Some(json!("shoes")), true),
        (c("contains", json!(2)), Some(json!([1, 2])), true),
        (c("in", json!(["a", "b"])), Some(json!("b")), true),
        (c("in", json!(["a", "b"])), Some(json!("c")), false),
        (c("exists", json!(true)), Some(Value::Null), false),
        (c("exists", json!(false)), None, true),
    ];
    for (i, (cmp, value, want)) in cases.into_iter().enumerate() {
        assert_eq!(
            cmp.map(|c| c.matches(value.as_ref())),
            Some(want),
            "case {i}"
        );
    }
    assert!(Comparison::from_key("in", json!(1)).is_err());
    assert!(Comparison::from_key("exists", json!("yes")).is_err());
    assert_eq!(Comparison::from_key("nope", json!(1)), Ok(None));
}

mod merge_wait;
mod proptests;
