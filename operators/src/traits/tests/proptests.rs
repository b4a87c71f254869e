//! Property tests: mergeable state, order independence.

use super::*;
use crate::profile_keyed::{merge_with_transfers, save_or_restore};

/// One definition per trait type, windowed and not.
fn every_def() -> Result<Vec<TraitDef>, serde_yaml::Error> {
    [
        "{event_counter: {event: E}}",
        "{event_counter: {event: E, within: 30ms}}",
        "{aggregation: {event: E, property: v, function: sum}}",
        "{aggregation: {event: E, property: v, function: avg, within: 30ms}}",
        "{aggregation: {event: E, property: v, function: min}}",
        "{aggregation: {event: E, property: v, function: max, within: 30ms}}",
        "{most_frequent: {event: E, property: v}}",
        "{most_frequent: {event: E, property: v, within: 30ms}}",
        "{first: {event: E, property: v}}",
        "{last: {event: E, property: v}}",
        "{unique_list: {event: E, property: v, limit: 3}}",
        "{unique_list: {event: E, property: v, limit: 3, within: 30ms}}",
        "{unique_count: {event: E, property: v, limit: 4}}",
        "{unique_count: {event: E, property: v, within: 30ms}}",
    ]
    .iter()
    .map(|y| serde_yaml::from_str(y))
    .collect()
}

fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-20i64..20).prop_map(|n| json!(n)),
        // Halves are exact in binary: float sums compare exactly.
        (-40i64..40).prop_map(|n| json!(n as f64 / 2.0 + 0.25)),
        prop::sample::select(vec!["a", "b", "c", "d", "e"]).prop_map(|s| json!(s)),
    ]
}

fn arb_events() -> impl Strategy<Value = Vec<(i64, Value)>> {
    prop::collection::vec((0i64..100, arb_value()), 0..12)
}

fn fold(def: &TraitDef, events: &[(i64, Value)]) -> TraitState {
    let mut state = TraitState::empty(def);
    for (t, v) in events {
        if let Some(text) = def.extract(&json!({ "v": v })) {
            state.add(def, *t, &text);
        }
    }
    state
}

/// Every trait type, windowed where it can be.
const EVERY_TYPE: &str = "counter: {event_counter: {event: E}}\n\
                              counter_w: {event_counter: {event: E, within: 30ms}}\n\
                              sum: {aggregation: {event: E, property: properties.v, function: sum}}\n\
                              avg_w: {aggregation: {event: E, property: properties.v, function: avg, within: 30ms}}\n\
                              min: {aggregation: {event: E, property: properties.v, function: min}}\n\
                              max: {aggregation: {event: E, property: properties.v, function: max}}\n\
                              mf: {most_frequent: {event: E, property: properties.v}}\n\
                              mf_w: {most_frequent: {event: E, property: properties.v, within: 30ms}}\n\
                              first: {first: {event: E, property: properties.v}}\n\
                              last: {last: {event: E, property: properties.v}}\n\
                              uniq: {unique_list: {event: E, property: properties.v, limit: 3}}\n\
                              uniq_w: {unique_list: {event: E, property: properties.v, limit: 3, within: 30ms}}\n\
                              ucount: {unique_count: {event: E, property: properties.v, limit: 4}}\n\
                              ucount_w: {unique_count: {event: E, property: properties.v, within: 30ms}}\n\
                              other: {event_counter: {event: E, where: [{property: properties.flag, eq: true}]}}";

/// Downstream view of profile `id`: its `Update`s applied in order.
fn apply_updates(
    seen: &mut BTreeMap<String, Value>,
    id: &str,
    out: &[Emitted],
) -> Result<(), String> {
    for u in updates(out).map_err(|e| e.to_string())? {
        if let ProfileUpdate::Update {
            profile_id, traits, ..
        } = u
        {
            if profile_id != id {
                continue;
            }
            for (k, v) in traits {
                if v.is_null() {
                    seen.remove(&k);
                } else {
                    seen.insert(k, v);
                }
            }
        }
    }
    Ok(())
}

/// An event for [`EVERY_TYPE`] and identify traits: a track `E` with `v`
/// (maybe flagged), or an identify setting `other`/`plan` (maybe null).
fn arb_profile_event() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => (arb_value(), any::<bool>()).prop_map(|(v, flag)| {
            json!({"type": "track", "event": "E", "properties": {"v": v, "flag": flag}})
        }),
        1 => (prop::sample::select(vec!["other", "plan"]), prop::option::of(arb_value()))
            .prop_map(|(name, v)| json!({"type": "identify", "traits": {name: v}})),
    ]
}

proptest! {
    #[test]
    fn trait_states_merge_like_the_union_of_their_events(
        a in arb_events(), b in arb_events(), c in arb_events(), now in 0i64..130,
    ) {
        let defs = every_def().map_err(|e| TestCaseError::fail(e.to_string()))?;
        for def in &defs {
            let (sa, sb, sc) = (fold(def, &a), fold(def, &b), fold(def, &c));
            let union: Vec<(i64, Value)> = a.iter().chain(&b).cloned().collect();
            let su = fold(def, &union);
            prop_assert_eq!(&sa.merge(def, &sb), &su, "union law for {:?}", def);
            prop_assert_eq!(sa.merge(def, &sb), sb.merge(def, &sa), "commutative for {:?}", def);
            prop_assert_eq!(
                sa.merge(def, &sb).merge(def, &sc),
                sa.merge(def, &sb.merge(def, &sc)),
                "associative for {:?}", def
            );
            // Pruning at the same time commutes with merging.
            let (mut pa, mut pb, mut pu) = (sa.clone(), sb.clone(), su.clone());
            pa.prune(def, now);
            pb.prune(def, now);
            pu.prune(def, now);
            let mut pm = pa.merge(def, &pb);
            pm.prune(def, now);
            prop_assert_eq!(&pm, &pu, "prune then merge for {:?}", def);
            prop_assert_eq!(pm.value(def, now), su.value(def, now), "pruned value for {:?}", def);
        }
    }

    #[test]
    fn trait_values_do_not_depend_on_arrival_order(
        events in prop::collection::vec((0i64..100, arb_value(), any::<bool>()), 1..12)
            .prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle())),
    ) {
        let (ordered, shuffled) = events;
        let run = |events: &[(i64, Value, bool)]| -> Result<BTreeMap<String, Value>, String> {
            let mut h = harness(EVERY_TYPE).map_err(|e| e.to_string())?;
            let mut seen = BTreeMap::new();
            for (t, v, flag) in events {
                let out = send(&mut h, "p", track("E", *t, json!({"v": v, "flag": flag})))
                    .map_err(|e| e.to_string())?;
                for (k, v) in changed(&out).map_err(|e| e.to_string())? {
                    if v.is_null() { seen.remove(&k); } else { seen.insert(k, v); }
                }
            }
            Ok(seen)
        };
        let a = run(&ordered).map_err(TestCaseError::fail)?;
        let b = run(&shuffled).map_err(TestCaseError::fail)?;
        prop_assert_eq!(a, b);
    }

    #[test]
    fn a_profile_merge_gives_the_values_of_one_profile_with_every_event(
        events in prop::collection::vec((0i64..100, arb_value(), any::<bool>(), any::<bool>()), 0..12),
    ) {
        let fail = |e: Box<dyn Error>| TestCaseError::fail(e.to_string());
        let record = |t: i64, v: &Value, flag: bool| track("E", t, json!({"v": v, "flag": flag}));
        // One profile with every event.
        let mut one = harness(EVERY_TYPE).map_err(fail)?;
        let mut expected = BTreeMap::new();
        for (t, v, flag, _) in &events {
            let out = send(&mut one, "b", record(*t, v, *flag)).map_err(fail)?;
            apply_updates(&mut expected, "b", &out).map_err(TestCaseError::fail)?;
        }
        // The same events split over `a` and `b`, then `a` merged into `b`.
        let mut two = harness(EVERY_TYPE).map_err(fail)?;
        let mut seen = BTreeMap::new();
        for (t, v, flag, to_a) in &events {
            let id = if *to_a { "a" } else { "b" };
            let out = send(&mut two, id, record(*t, v, *flag)).map_err(fail)?;
            apply_updates(&mut seen, "b", &out).map_err(TestCaseError::fail)?;
        }
        let merged = serde_json::to_vec(&ProfileRecord::Merged {
            from: "a".into(),
            into: "b".into(),
            identifiers: Identifiers::new(),
            cause: Cause::default(),
            announced: false,
            at: None,
        }).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let out = two.process(Some(b"a"), &merged, &[]).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for transfer in out.iter().filter(|e| e.output == outputs::SELF) {
            let out = two
                .process(transfer.key.as_deref(), &transfer.value, &[])
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            apply_updates(&mut seen, "b", &out).map_err(TestCaseError::fail)?;
        }
        prop_assert_eq!(seen, expected);
    }

    /// The incremental refresh after an event (only the traits it touched
    /// and the windows it pruned) says exactly what a full recomputation
    /// and diff of every value says, at every step; and a config change
    /// falls back to the full refresh.
    #[test]
    fn the_incremental_refresh_equals_the_full_one(
        steps in prop::collection::vec((0i64..100, arb_profile_event()), 1..40),
    ) {
        let set = trait_set(EVERY_TYPE).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (mut full, mut incremental) = (ProfileState::default(), ProfileState::default());
        for (dt, event) in &steps {
            for state in [&mut full, &mut incremental] {
                state.clock += dt;
            }
            let t = full.clock - dt / 2;
            full.apply_event(&set, event, t);
            let expected = full.refresh(&set, full.clock);
            let applied = incremental.apply_event(&set, event, t);
            let got = incremental.refresh_touched(&set, incremental.clock, &applied.touched);
            prop_assert_eq!(&got, &expected);
            prop_assert_eq!(&incremental, &full);
        }
        // Other traits: the next event refreshes in full.
        let fewer = trait_set("counter: {event_counter: {event: E}}")
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let event = json!({"type": "track", "event": "E", "properties": {"v": 1}});
        let mut expected = full.clone();
        expected.conform(&fewer, |_| None);
        expected.apply_event(&fewer, &event, full.clock);
        let expected_changed = expected.refresh(&fewer, full.clock);
        incremental.conform(&fewer, |_| None);
        let applied = incremental.apply_event(&fewer, &event, full.clock);
        let got = incremental.refresh_touched(&fewer, full.clock, &applied.touched);
        prop_assert_eq!(got, expected_changed);
        prop_assert_eq!(incremental, expected);
    }

    /// The cache of decoded states changes nothing: the same records,
    /// merges and ticks through an operator with a two-profile cache (so
    /// profiles also leave it) and one without give the same outputs and
    /// the same store, byte for byte, at every step — also when the store
    /// goes back to an earlier copy under a live operator (a batch rolled
    /// back, a restore), which leaves the cache holding states the store
    /// no longer has.
    #[test]
    fn the_state_cache_changes_no_output_and_no_stored_byte(
        steps in prop::collection::vec((0usize..3, arb_profile_event(), 0i64..25, 0u8..12), 1..40),
    ) {
        let fail = |e: &dyn std::fmt::Display| TestCaseError::fail(e.to_string());
        let set = trait_set(EVERY_TYPE).map_err(|e| fail(&e))?;
        let mut cached = OperatorHarness::new(TraitsOperator::with_cache(set.clone(), 2));
        let mut plain = OperatorHarness::new(TraitsOperator::with_cache(set, 0));
        let mut now = 0;
        let mut saved = plain.state.clone();
        for (p, mut event, dt, action) in steps {
            let id = ["a", "b", "c"][p];
            now += dt;
            save_or_restore(action, &mut saved, [&mut cached.state, &mut plain.state]);
            let mut outs = Vec::new();
            for h in [&mut cached, &mut plain] {
                let out = match action {
                    0 => h.tick(now).map_err(|e| fail(&e))?,
                    1 if id != "c" => merge_with_transfers::<ProfileRecord, _>(h, id, "c").map_err(|e| fail(&e))?,
                    _ => {
                        event["timestamp"] = json!(rfc3339_ms(now));
                        send(h, id, event.clone()).map_err(|e| fail(&e))?
                    }
                };
                outs.push(out);
            }
            prop_assert_eq!(&outs[0], &outs[1]);
            prop_assert_eq!(&cached.state.map, &plain.state.map);
        }
    }
}
