//! The operator against a batch recomputation, update by update.

use super::*;
use crate::profile_keyed::{merge_with_transfers, save_or_restore};

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
            // Every way to pick one event per step: each at or after the
            // one before, and steps at one millisecond naming pairwise
            // different events (`same_ms`: the names of the steps picked
            // at `after`).
            let steps: Vec<(&str, Vec<i64>)> = s
                .steps
                .iter()
                .map(|st| (st.event.as_str(), matching(&st.event, &st.r#where)))
                .collect();
            fn chain(
                steps: &[(&str, Vec<i64>)],
                after: i64,
                same_ms: &[&str],
                start: i64,
                within: Option<i64>,
            ) -> bool {
                match steps.split_first() {
                    None => within.is_none_or(|w| after - start <= w),
                    Some(((name, times), rest)) => times.iter().any(|&t| {
                        if t > after {
                            chain(rest, t, &[name], start, within)
                        } else if t == after && !same_ms.contains(name) {
                            let more: Vec<&str> = same_ms.iter().copied().chain([*name]).collect();
                            chain(rest, t, &more, start, within)
                        } else {
                            false
                        }
                    }),
                }
            }
            let within = s.within.map(|w| w.millis());
            match steps.split_first() {
                None => false,
                Some(((name, first), rest)) => {
                    first.iter().any(|&t| chain(rest, t, &[name], t, within))
                }
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
            // The task's counts are the memberships the changes replay to.
            let sizes: BTreeMap<String, i64> = members.iter().map(|a| (a.clone(), 1)).collect();
            prop_assert_eq!(stored_sizes(&h.state).map_err(|e| TestCaseError::fail(e.to_string()))?, sizes);
        }
    }
}

proptest! {
    /// The cache of decoded profiles changes nothing: the same updates,
    /// merges and ticks through an operator with a two-profile cache and
    /// one without give the same outputs and the same store, byte for
    /// byte, at every step — also when the store goes back to an earlier
    /// copy under the live operators (a rollback, a restore).
    #[test]
    fn the_state_cache_changes_no_output_and_no_stored_byte(
        steps in prop::collection::vec((0usize..3, arb_op(), 0u8..12), 1..40),
    ) {
        let fail = |e: &dyn std::fmt::Display| TestCaseError::fail(e.to_string());
        let set = Arc::new(
            AudienceSet::new(&defs(PROP_AUDIENCES).map_err(|e| fail(&e))?, &KnownNames::anything())
                .map_err(|e| fail(&e))?,
        );
        let mut cached = OperatorHarness::new(AudiencesOperator::with_cache(set.clone(), 2));
        let mut plain = OperatorHarness::new(AudiencesOperator::with_cache(set, 0));
        let mut now = 100i64;
        let mut saved = plain.state.clone();
        // Who is in what, by the changes emitted; rolled back with the
        // store (a restore replays from the copy's state).
        let mut members: BTreeSet<(String, String)> = BTreeSet::new();
        let mut saved_members = members.clone();
        for (p, op, action) in steps {
            let id = ["a", "b", "c"][p];
            save_or_restore(action, &mut saved, [&mut cached.state, &mut plain.state]);
            let mut outs = Vec::new();
            for h in [&mut cached, &mut plain] {
                let out = match (&op, action) {
                    (_, 1) if id != "c" => merge_with_transfers::<ProfileUpdate, _>(h, id, "c").map_err(|e| fail(&e))?,
                    (Op::Tick(dt), _) => h.tick(now + dt).map_err(|e| fail(&e))?,
                    (Op::Update { traits, event, offset }, _) => {
                        let traits: serde_json::Map<String, Value> =
                            traits.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
                        let event = event.map(|(name, v)| (name, json!({"v": v})));
                        let bytes = update(id, event, Value::Object(traits), now + offset)
                            .map_err(|e| fail(&e))?;
                        h.process(Some(id.as_bytes()), &bytes, &[]).map_err(|e| fail(&e))?
                    }
                };
                outs.push(out);
            }
            if let Op::Tick(dt) = op {
                now += dt;
            }
            prop_assert_eq!(&outs[0], &outs[1]);
            prop_assert_eq!(&cached.state.map, &plain.state.map);
            // As `save_or_restore` did to the stores before the step.
            match action {
                2 => saved_members = members.clone(),
                3 => members = saved_members.clone(),
                _ => {}
            }
            for c in changes(&outs[1]).map_err(|e| fail(&e))? {
                let at = (c.profile_id.clone(), c.audience.clone());
                match c.action {
                    AudienceAction::Entered => prop_assert!(members.insert(at), "entered twice"),
                    AudienceAction::Exited => prop_assert!(members.remove(&at), "exited while out"),
                }
            }
            let mut sizes: BTreeMap<String, i64> = BTreeMap::new();
            for (_, audience) in &members {
                *sizes.entry(audience.clone()).or_default() += 1;
            }
            prop_assert_eq!(stored_sizes(&plain.state).map_err(|e| fail(&e))?, sizes);
        }
    }
}
