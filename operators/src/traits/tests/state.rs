//! The stored state: earlier layouts, the binary encoding, and its bound
//! for a busy profile.

use super::*;

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
    crate::profile_keyed::assert_rewritten_in_binary(&json.state, &binary.state, "p")
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

/// The bytes of profile `id`'s stored state.
fn stored_bytes(h: &OperatorHarness<TraitsOperator>, id: &str) -> usize {
    h.state
        .map
        .get(profile_key(id).as_slice())
        .map_or(0, Vec::len)
}

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
            state_max = state_max.max(stored_bytes(&h, "p"));
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
                event: Some(event.clone().into()),
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

/// Long distinct values (a crawler's 1 KB URLs, 25 KB product ids) keep
/// every value-keeping trait within `MAX_KEPT_BYTES` of text, so the
/// stored state stays far under the broker's record limit (it grew past
/// 1 MB and stopped the stage); a value that keeps coming still wins
/// `most_frequent`, the latest values stay in `unique_list`, and a value
/// longer than the whole budget is not kept (`last` keeps the one before).
#[test]
fn long_values_keep_each_trait_within_its_bytes() -> TestResult {
    let traits = "\
     top: {most_frequent: {event: E, property: properties.u}}\n\
     recent: {unique_list: {event: E, property: properties.u, limit: 100}}\n\
     distinct: {unique_count: {event: E, property: properties.u}}\n\
     top_7d: {most_frequent: {event: E, property: properties.u, within: 7d}}\n\
     last_u: {last: {event: E, property: properties.u}}";
    let mut h = harness(traits)?;
    let url = |i: usize| format!("https://shop.example/{i:06}/{}", "p".repeat(1000));
    // The latest value of every trait, from the changes sent.
    let mut values = BTreeMap::new();
    let mut largest = 0;
    for i in 0..1_100usize {
        let t = DAY + i as i64 * 1000;
        // Every third event is the same page: the clear winner.
        let u = if i % 3 == 0 { url(999_999) } else { url(i) };
        values.extend(changed(&send(
            &mut h,
            "p",
            track("E", t, json!({"u": u})),
        )?)?);
        largest = largest.max(stored_bytes(&h, "p"));
    }
    // Five traits of at most 32 KiB of text each, and the values sent.
    assert!(largest < 400 * 1024, "profile state {largest} bytes");
    assert_eq!(values.get("top"), Some(&json!(url(999_999))));
    assert_eq!(values.get("top_7d"), Some(&json!(url(999_999))));
    let t = DAY + 2_000_000;
    values.extend(changed(&send(
        &mut h,
        "p",
        track("E", t, json!({"u": url(7)})),
    )?)?);
    let huge = "x".repeat(MAX_KEPT_BYTES + 1);
    values.extend(changed(&send(
        &mut h,
        "p",
        track("E", t + 1, json!({"u": huge})),
    )?)?);
    assert_eq!(values.get("last_u"), Some(&json!(url(7))));
    let recent = values.get("recent").ok_or("no unique_list")?;
    assert!(recent
        .as_array()
        .is_some_and(|r| r.contains(&json!(url(7)))));
    assert!(
        recent.as_array().is_some_and(|r| r.len() < 100),
        "{}",
        recent.as_array().map_or(0, Vec::len)
    );
    Ok(())
}
