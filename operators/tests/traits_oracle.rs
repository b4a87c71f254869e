//! The traits operator against a batch recomputation written apart from it.
//!
//! The oracle below recomputes every trait of a profile from the profile's
//! full list of `(event time, value)` at a time `now`, from the rules as
//! documented (README, docs/ARCHITECTURE.md: event times bounded by stream
//! time plus `event_time.max_future`, windows in buckets of `within / 30`
//! that count while their last instant is in the window, `unique_list`
//! the most recent `limit` values emitted sorted, `unique_count` capped at
//! `limit`, first/last by `(time, value)`, most frequent ties to the
//! smallest value). It shares no code with the operator: plain vectors and
//! sorts, no state, no merge.
//!
//! Random streams over three profiles mix ticks, late events, events
//! dated far ahead of the stream, and merges (`a` into `b`, `c` into `b`).
//! After every record, the values a downstream consumer holds for each
//! live profile (its `Update`s applied in order) must equal the oracle's
//! over every event that profile absorbed, at the profile's clock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cdp_operators::messages::{
    outputs, rfc3339_ms, Cause, Identifiers, ProfileRecord, ProfileUpdate,
};
use cdp_operators::traits::{TraitDef, TraitSet, TraitsOperator};
use cdp_pipeline::{Emitted, OperatorHarness};
use proptest::prelude::*;
use serde_json::{json, Value};

/// How far ahead of stream time an event may be (the default, `1h`).
const MAX_FUTURE: i64 = 3_600_000;

const TRAITS: &str = "count: {event_counter: {event: E}}\n\
count_w: {event_counter: {event: E, within: 90s}}\n\
sum: {aggregation: {event: E, property: properties.v, function: sum}}\n\
sum_w: {aggregation: {event: E, property: properties.v, function: sum, within: 300s}}\n\
max_w: {aggregation: {event: E, property: properties.v, function: max, within: 90s}}\n\
mf: {most_frequent: {event: E, property: properties.v}}\n\
mf_w: {most_frequent: {event: E, property: properties.v, within: 300s}}\n\
first: {first: {event: E, property: properties.v}}\n\
last: {last: {event: E, property: properties.v}}\n\
recent: {unique_list: {event: E, property: properties.v, limit: 3}}\n\
distinct: {unique_count: {event: E, property: properties.v, limit: 4}}\n\
distinct_w: {unique_count: {event: E, property: properties.v, within: 90s}}";

// ---- the oracle ---------------------------------------------------------

/// Whether an event at `t` counts at `now` in a window of `w` ms.
fn in_window(t: i64, w: i64, now: i64) -> bool {
    let width = std::cmp::max(1, w / 30);
    let start = t.div_euclid(width) * width;
    start + width - 1 > now - w
}

fn num(x: i64) -> Value {
    json!(x)
}

/// Every trait's value (absent: no value) over `events` at `now`.
fn oracle(events: &[(i64, i64)], now: i64) -> BTreeMap<String, Value> {
    let within = |w: i64| -> Vec<(i64, i64)> {
        events
            .iter()
            .copied()
            .filter(|(t, _)| in_window(*t, w, now))
            .collect()
    };
    let all: Vec<(i64, i64)> = events.to_vec();
    let mut out = BTreeMap::new();
    out.insert("count".into(), num(all.len() as i64));
    out.insert("count_w".into(), num(within(90_000).len() as i64));
    out.insert("sum".into(), num(all.iter().map(|e| e.1).sum()));
    out.insert(
        "sum_w".into(),
        num(within(300_000).iter().map(|e| e.1).sum()),
    );
    if let Some(m) = within(90_000).iter().map(|e| e.1).max() {
        out.insert("max_w".into(), num(m));
    }
    let most_frequent = |evs: &[(i64, i64)]| -> Option<Value> {
        // Values compare as their JSON text (the operator's documented
        // tie-break: the smallest value).
        let mut counts: BTreeMap<String, (usize, i64)> = BTreeMap::new();
        for (_, v) in evs {
            counts.entry(v.to_string()).or_insert((0, *v)).0 += 1;
        }
        let best = counts.values().map(|c| c.0).max()?;
        counts.values().find(|c| c.0 == best).map(|c| num(c.1))
    };
    if let Some(v) = most_frequent(&all) {
        out.insert("mf".into(), v);
    }
    if let Some(v) = most_frequent(&within(300_000)) {
        out.insert("mf_w".into(), v);
    }
    let by_time_value = |e: &(i64, i64)| (e.0, e.1.to_string());
    if let Some(e) = all.iter().min_by_key(|e| by_time_value(e)) {
        out.insert("first".into(), num(e.1));
    }
    if let Some(e) = all.iter().max_by_key(|e| by_time_value(e)) {
        out.insert("last".into(), num(e.1));
    }
    // The 3 distinct values whose latest occurrence is most recent (ties:
    // the larger text), listed sorted by text.
    let mut latest: BTreeMap<String, i64> = BTreeMap::new();
    for (t, v) in &all {
        let e = latest.entry(v.to_string()).or_insert(*t);
        *e = (*e).max(*t);
    }
    let mut ranked: Vec<(i64, String)> = latest.into_iter().map(|(v, t)| (t, v)).collect();
    ranked.sort();
    ranked.reverse();
    let mut recent: Vec<String> = ranked.into_iter().take(3).map(|(_, v)| v).collect();
    recent.sort();
    out.insert(
        "recent".into(),
        Value::Array(
            recent
                .iter()
                .filter_map(|v| serde_json::from_str(v).ok())
                .collect(),
        ),
    );
    let distinct = |evs: &[(i64, i64)]| evs.iter().map(|e| e.1).collect::<BTreeSet<_>>().len();
    out.insert("distinct".into(), num(distinct(&all).min(4) as i64));
    out.insert("distinct_w".into(), num(distinct(&within(90_000)) as i64));
    out
}

// ---- the stream ---------------------------------------------------------

#[derive(Debug, Clone)]
enum Step {
    /// Stream time moves forward by this many ms.
    Tick(i64),
    /// An event for a profile, `offset` ms from stream time (negative:
    /// late; large: a wrong device clock), with a value.
    Event { profile: usize, offset: i64, v: i64 },
    /// Merge profile 0 (`a`) or 2 (`c`) into `b`.
    Merge(usize),
    /// Stream time moves to just around (`delta` ms from) the moment an
    /// absorbed event (the `pick`-th, modulo) stops counting in the 90 s or
    /// the 300 s window: where off-by-one errors live.
    Edge { pick: usize, long: bool, delta: i64 },
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (1i64..40_000).prop_map(Step::Tick),
        6 => (0usize..3, prop_oneof![
                4 => -400_000i64..1_000,
                1 => 1_000i64..MAX_FUTURE,
                1 => MAX_FUTURE + 1..400 * 86_400_000,
             ], -3i64..6)
            .prop_map(|(profile, offset, v)| Step::Event { profile, offset, v }),
        1 => prop::sample::select(vec![0usize, 2]).prop_map(Step::Merge),
        2 => (any::<usize>(), any::<bool>(), -1i64..=1)
            .prop_map(|(pick, long, delta)| Step::Edge { pick, long, delta }),
    ]
}

const IDS: [&str; 3] = ["a", "b", "c"];

struct Run {
    h: OperatorHarness<TraitsOperator>,
    /// What a downstream consumer holds per profile.
    seen: BTreeMap<String, BTreeMap<String, Value>>,
}

impl Run {
    /// Feed a record and every record the operator writes to its own input
    /// (transfers, redirects), applying the updates it emits downstream.
    fn feed(&mut self, key: &str, bytes: Vec<u8>) -> Result<(), String> {
        let mut queue = vec![(key.to_owned(), bytes)];
        while let Some((key, bytes)) = queue.pop() {
            let out = self
                .h
                .process(Some(key.as_bytes()), &bytes, &[])
                .map_err(|e| e.to_string())?;
            self.apply(&out)?;
            for e in out.iter().filter(|e| e.output == outputs::SELF) {
                let key =
                    String::from_utf8_lossy(e.key.as_deref().unwrap_or_default()).into_owned();
                queue.push((key, e.value.clone()));
            }
        }
        Ok(())
    }

    fn apply(&mut self, out: &[Emitted]) -> Result<(), String> {
        for e in out.iter().filter(|e| e.output == outputs::NEXT) {
            let update = ProfileUpdate::from_bytes(&e.value).map_err(|e| e.to_string())?;
            if let ProfileUpdate::Update {
                profile_id, traits, ..
            } = update
            {
                let view = self.seen.entry(profile_id).or_default();
                for (k, v) in traits {
                    if v.is_null() {
                        view.remove(&k);
                    } else {
                        view.insert(k, v);
                    }
                }
            }
        }
        Ok(())
    }
}

/// The `n`th event record: in the binary form identity writes for even
/// `n` (the stage reads a profile's usual one in place), as JSON for odd
/// `n` (the general path), so both readings meet the oracle.
fn event_record(id: &str, t: i64, v: i64, n: usize) -> Result<Vec<u8>, String> {
    let mut identifiers = Identifiers::new();
    identifiers.insert("user_id".into(), vec![format!("u_{id}")]);
    if n.is_multiple_of(3) {
        identifiers.insert("anonymous_id".into(), vec![format!("a_{id}_{}", n % 2)]);
    }
    let record = ProfileRecord::Event {
        profile_id: id.into(),
        identifiers,
        event: json!({"type": "track", "event": "E", "messageId": format!("m{n}"),
                      "timestamp": rfc3339_ms(t), "properties": {"v": v}})
        .into(),
        dropped: Vec::new(),
        merged_from: Vec::new(),
    };
    if n.is_multiple_of(2) {
        record.to_bytes().map_err(|e| e.to_string())
    } else {
        serde_json::to_vec(&record).map_err(|e| e.to_string())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn incremental_traits_equal_the_batch_oracle_after_every_record(
        steps in prop::collection::vec(arb_step(), 1..60),
        // One record per batch, or several: a profile's state pending in
        // memory between its records must change no output.
        batch in prop_oneof![1 => Just(1usize), 2 => 2usize..12],
    ) {
        let defs: BTreeMap<String, TraitDef> =
            serde_yaml::from_str(TRAITS).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let set = TraitSet::new(&defs).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut run = Run { h: OperatorHarness::new(TraitsOperator::new(Arc::new(set))).with_batches(batch), seen: BTreeMap::new() };
        let fail = |e: String| TestCaseError::fail(e);
        // Reference state: per live profile, its absorbed events (time
        // after the bound, value) and its clock; and where merged ones went.
        let mut events: BTreeMap<&str, Vec<(i64, i64)>> = BTreeMap::new();
        let mut clock: BTreeMap<&str, i64> = BTreeMap::new();
        let mut merged_into: BTreeMap<&str, &str> = BTreeMap::new();
        let mut now = 1_000_000_000i64;
        run.h.tick(now).map_err(|e| fail(e.to_string()))?;
        for (n, step) in steps.iter().enumerate() {
            match step {
                Step::Tick(_) | Step::Edge { .. } => {
                    let target = match step {
                        Step::Edge { pick, long, delta } => {
                            let all: Vec<i64> = events.values().flatten().map(|e| e.0).collect();
                            let w: i64 = if *long { 300_000 } else { 90_000 };
                            let width = w / 30;
                            all.get(pick % all.len().max(1)).map_or(now, |t| {
                                t.div_euclid(width) * width + width - 1 + w + delta
                            })
                        }
                        Step::Tick(dt) => now + dt,
                        _ => now,
                    };
                    now = now.max(target);
                    let out = run.h.tick(now).map_err(|e| fail(e.to_string()))?;
                    run.apply(&out).map_err(fail)?;
                    for c in clock.values_mut() {
                        *c = (*c).max(now);
                    }
                }
                Step::Event { profile, offset, v } => {
                    let id = IDS[*profile];
                    let t = now + offset;
                    // Beyond the tolerance, the event happened at stream time.
                    let bounded = if t > now + MAX_FUTURE { now } else { t };
                    let live = merged_into.get(id).copied().unwrap_or(id);
                    events.entry(live).or_default().push((bounded, *v));
                    let c = clock.entry(live).or_insert(now);
                    *c = (*c).max(now).max(bounded);
                    run.feed(id, event_record(id, t, *v, n).map_err(|e| fail(e.to_string()))?)
                        .map_err(fail)?;
                }
                Step::Merge(from) => {
                    let from = IDS[*from];
                    if merged_into.contains_key(from) {
                        continue;
                    }
                    merged_into.insert(from, "b");
                    let moved = events.remove(from).unwrap_or_default();
                    let had_from = clock.remove(from);
                    if !moved.is_empty() {
                        events.entry("b").or_default().extend(moved);
                    }
                    if let Some(c) = had_from {
                        let mine = clock.entry("b").or_insert(now);
                        *mine = (*mine).max(c).max(now);
                    }
                    let record = serde_json::to_vec(&ProfileRecord::Merged {
                        from: from.into(),
                        into: "b".into(),
                        identifiers: Identifiers::new(),
                        cause: Cause::default(),
                        announced: false,
                        at: None,
                    }).map_err(|e| fail(e.to_string()))?;
                    run.feed(from, record).map_err(fail)?;
                }
            }
            for (id, evs) in &events {
                let at = clock.get(id).copied().unwrap_or(now);
                let expected = oracle(evs, at);
                let empty = BTreeMap::new();
                let seen = run.seen.get(*id).unwrap_or(&empty);
                prop_assert_eq!(seen, &expected, "profile {} at step {} ({:?}), clock {}", id, n, step, at);
            }
        }
    }
}
