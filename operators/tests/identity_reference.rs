//! Identity against an independent, sequential reference of its rules.
//!
//! The reference below is written from the rules as documented (README,
//! docs/ARCHITECTURE.md), apart from the operator: plain vectors and maps, no
//! store, no shared code. The tests spread random events over 1, 3 or 8
//! `<p>.raw` partitions, let 1–3 validate instances interleave them into the
//! serial `<p>.valid` log in a random order, and run identity over that log
//! with 1–3 instances that crash at random points (the new owner restores the
//! last committed state and replays the uncommitted tail, whose repeated
//! outputs are dropped downstream by position). At every event, the profile
//! the operator stamps must hold exactly the identifiers the reference's
//! profile holds; at the end, the live profiles of `<p>.profiles` must equal
//! the reference's; no limit is exceeded; no identifier is lost; and where no
//! limit is hit, the profiles are the connected components whatever the
//! order.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cdp_operators::identity::{IdentifierRule, IdentityConfig, IdentityOperator, IdentityRules};
use cdp_operators::messages::{outputs, ProfileRecord, ProfileSnapshot, ProfileStatus};
use cdp_pipeline::{Emitted, OperatorError, OperatorHarness};
use proptest::prelude::*;
use regex::Regex;
use serde_json::{json, Value};

type Id = (String, String);
type IdSet = BTreeSet<Id>;

// ---- the reference ------------------------------------------------------

struct Rule {
    limit: usize,
    priority: u32,
    blocked: Vec<String>,
    patterns: Vec<Regex>,
}

struct Profile {
    ids: IdSet,
    merges: usize,
}

/// One sequential pass of the identity rules.
struct Reference {
    rules: BTreeMap<String, Rule>,
    blocked: Vec<String>,
    patterns: Vec<Regex>,
    max_merges: usize,
    /// Live profiles by a reference-local number; merged ones are removed.
    profiles: BTreeMap<usize, Profile>,
    owner: BTreeMap<Id, usize>,
    next: usize,
}

impl Reference {
    fn new(cfg: &IdentityConfig) -> Self {
        let compile = |ps: &[String]| ps.iter().filter_map(|p| Regex::new(p).ok()).collect();
        Reference {
            rules: cfg
                .identifiers
                .iter()
                .map(|(k, r)| {
                    (
                        k.clone(),
                        Rule {
                            limit: r.limit,
                            priority: r.priority,
                            blocked: r
                                .blocked_values
                                .iter()
                                .map(|v| v.trim().to_lowercase())
                                .collect(),
                            patterns: compile(&r.blocked_patterns),
                        },
                    )
                })
                .collect(),
            blocked: cfg
                .blocked_values
                .iter()
                .map(|v| v.trim().to_lowercase())
                .collect(),
            patterns: compile(&cfg.blocked_patterns),
            max_merges: cfg.max_merges,
            profiles: BTreeMap::new(),
            owner: BTreeMap::new(),
            next: 0,
        }
    }

    fn rank(&self, id: &Id) -> (u32, String, String) {
        let p = self.rules.get(&id.0).map_or(u32::MAX, |r| r.priority);
        (p, id.0.clone(), id.1.clone())
    }

    fn clean(&self, kind: &str, raw: &Value) -> Option<String> {
        let rule = self.rules.get(kind)?;
        let mut v = match raw {
            Value::String(s) => s.trim().to_string(),
            Value::Number(n) if n.is_f64() => {
                // Whole floats read as integers, unless too large to be exact.
                let x = n.as_f64()?;
                match (x.fract() == 0.0, x.abs() <= 2f64.powi(53)) {
                    (true, true) => format!("{x:.0}"),
                    (true, false) => return None,
                    (false, _) => n.to_string(),
                }
            }
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        if kind == "email" {
            v = v.to_lowercase();
        }
        let lower = v.to_lowercase();
        if v.is_empty() || self.blocked.contains(&lower) || rule.blocked.contains(&lower) {
            return None;
        }
        if self
            .patterns
            .iter()
            .chain(&rule.patterns)
            .any(|p| p.is_match(&v))
        {
            return None;
        }
        Some(v)
    }

    fn identifiers(&self, e: &Value) -> IdSet {
        let mut out = IdSet::new();
        let mut take = |kind: &str, raw: Option<&Value>| {
            if let Some(v) = raw.and_then(|r| self.clean(kind, r)) {
                out.insert((kind.to_string(), v));
            }
        };
        let ty = e["type"].as_str().unwrap_or("");
        take("user_id", e.get("userId"));
        take("anonymous_id", e.get("anonymousId"));
        take("email", e.pointer("/context/traits/email"));
        take("phone", e.pointer("/context/traits/phone"));
        if ty == "identify" {
            take("email", e.pointer("/traits/email"));
            take("phone", e.pointer("/traits/phone"));
        }
        take("device_id", e.pointer("/context/device/id"));
        if let Some(list) = e.pointer("/context/externalIds").and_then(Value::as_array) {
            for x in list {
                if let Some(kind) = x["type"].as_str() {
                    take(kind, x.get("id"));
                }
            }
        }
        if ty == "alias" {
            if let Some(prev) = e.get("previousId").filter(|v| !v.is_null()) {
                let mut types: Vec<(u32, &String)> =
                    self.rules.iter().map(|(k, r)| (r.priority, k)).collect();
                types.sort();
                let known = types.iter().find_map(|(_, k)| {
                    let v = self.clean(k, prev)?;
                    self.owner
                        .contains_key(&((*k).clone(), v.clone()))
                        .then(|| ((*k).clone(), v))
                });
                let fallback = if self.rules.contains_key("anonymous_id") {
                    Some("anonymous_id".to_string())
                } else {
                    types.first().map(|(_, k)| (*k).clone())
                };
                let id = known.or_else(|| {
                    let k = fallback?;
                    let v = self.clean(&k, prev)?;
                    Some((k, v))
                });
                out.extend(id);
            }
        }
        out
    }

    /// The profiles `ids` touch, and whether following them breaks a rule.
    fn breaks(&self, ids: &IdSet) -> Option<(Vec<Id>, bool)> {
        let touched: BTreeSet<usize> = ids
            .iter()
            .filter_map(|i| self.owner.get(i).copied())
            .collect();
        let mut all: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let mut fullest: BTreeMap<&str, usize> = BTreeMap::new();
        for p in &touched {
            let mut mine: BTreeMap<&str, usize> = BTreeMap::new();
            for (k, v) in &self.profiles[p].ids {
                all.entry(k).or_default().insert(v);
                *mine.entry(k).or_default() += 1;
            }
            for (k, n) in mine {
                let f = fullest.entry(k).or_default();
                *f = (*f).max(n);
            }
        }
        for (k, v) in ids {
            all.entry(k).or_default().insert(v);
        }
        let over: BTreeSet<&str> = all
            .iter()
            .filter(|(k, vs)| {
                let limit = self.rules.get(**k).map_or(usize::MAX, |r| r.limit);
                vs.len() > limit && vs.len() > fullest.get(**k).copied().unwrap_or(0)
            })
            .map(|(k, _)| *k)
            .collect();
        let merges: usize = touched.iter().map(|p| self.profiles[p].merges).sum();
        let too_many = touched.len() > 1 && merges + touched.len() - 1 > self.max_merges;
        if over.is_empty() && !too_many {
            return None;
        }
        let culprits = ids
            .iter()
            .filter(|id| match self.owner.get(*id) {
                Some(p) => {
                    too_many
                        || self.profiles[p]
                            .ids
                            .iter()
                            .any(|(k, _)| over.contains(k.as_str()))
                }
                None => over.contains(id.0.as_str()),
            })
            .cloned()
            .collect();
        Some((culprits, too_many && over.is_empty()))
    }

    /// Apply one event; the identifiers of the profile it lands on, or
    /// `None` when it has no usable identifier.
    fn apply(&mut self, e: &Value) -> Option<IdSet> {
        let mut ids = self.identifiers(e);
        if ids.is_empty() {
            return None;
        }
        while let Some((culprits, _)) = self.breaks(&ids) {
            let weakest = culprits.iter().max_by_key(|id| self.rank(id)).cloned();
            match weakest {
                Some(w) if ids.len() > 1 => {
                    ids.remove(&w);
                }
                _ => break,
            }
        }
        let touched: BTreeSet<usize> = ids
            .iter()
            .filter_map(|i| self.owner.get(i).copied())
            .collect();
        let target = match touched.iter().min_by_key(|p| {
            let best = self.profiles[p].ids.iter().map(|i| self.rank(i)).min();
            (best.is_none(), best)
        }) {
            None => {
                self.next += 1;
                self.profiles.insert(
                    self.next,
                    Profile {
                        ids: IdSet::new(),
                        merges: 0,
                    },
                );
                self.next
            }
            Some(p) => *p,
        };
        for p in touched.iter().filter(|p| **p != target) {
            if let Some(gone) = self.profiles.remove(p) {
                for id in &gone.ids {
                    self.owner.insert(id.clone(), target);
                }
                if let Some(t) = self.profiles.get_mut(&target) {
                    t.ids.extend(gone.ids);
                    t.merges += gone.merges + 1;
                }
            }
        }
        for id in &ids {
            self.owner.insert(id.clone(), target);
        }
        let t = self.profiles.get_mut(&target)?;
        t.ids.extend(ids);
        Some(t.ids.clone())
    }

    fn live(&self) -> BTreeSet<IdSet> {
        self.profiles.values().map(|p| p.ids.clone()).collect()
    }
}

// ---- events -------------------------------------------------------------

fn arb_event() -> impl Strategy<Value = Value> {
    let pick =
        |pool: &'static [&'static str]| prop::option::weighted(0.5, prop::sample::select(pool));
    (
        prop::sample::select(&["track", "identify", "page", "alias"][..]),
        pick(&["u0", "u1", "u2", "null", " u1 "]),
        pick(&["a0", "a1", "a2", "a3", "a4", "0"]),
        pick(&["E0@x.com", "e0@x.com", "e1@x.com", "e2@x.com"]),
        pick(&["d0", "d1", "d2"]),
        pick(&["c0", "c1", "c9"]),
        pick(&["u0", "u1", "a0", "a3", "a7", "undefined"]),
    )
        .prop_map(|(ty, user, anon, email, device, crm, previous)| {
            let mut e = json!({"type": ty, "messageId": "m", "context": {"traits": {}}});
            if let Some(u) = user {
                e["userId"] = json!(u);
            }
            if let Some(a) = anon {
                e["anonymousId"] = json!(a);
            }
            if let Some(m) = email {
                if ty == "identify" {
                    e["traits"] = json!({"email": m});
                } else {
                    e["context"]["traits"]["email"] = json!(m);
                }
            }
            if let Some(d) = device {
                e["context"]["device"] = json!({"id": d});
            }
            if let Some(c) = crm {
                e["context"]["externalIds"] =
                    json!([{"id": c, "type": "crm_id", "collection": "users"}]);
            }
            if ty == "alias" {
                e["previousId"] = json!(previous.unwrap_or("a1"));
            }
            e
        })
}

fn rule(limit: usize, priority: u32) -> IdentifierRule {
    IdentifierRule::new(limit, priority)
}

/// Nothing is ever limited or blocked by type.
fn unlimited() -> IdentityConfig {
    IdentityConfig {
        identifiers: BTreeMap::from([
            ("user_id".into(), rule(1_000, 1)),
            ("email".into(), rule(1_000, 2)),
            ("crm_id".into(), rule(1_000, 3)),
            ("anonymous_id".into(), rule(1_000, 4)),
            ("device_id".into(), rule(1_000, 5)),
        ]),
        max_merges: 1_000_000,
        ..IdentityConfig::default()
    }
}

/// Small limits, few merges, per-type blocked values and patterns.
fn tight() -> IdentityConfig {
    let mut device = rule(1, 5);
    device.blocked_values = vec!["D2".into()];
    let mut crm = rule(1, 3);
    crm.blocked_patterns = vec!["9$".into()];
    IdentityConfig {
        identifiers: BTreeMap::from([
            ("user_id".into(), rule(1, 1)),
            ("email".into(), rule(2, 2)),
            ("crm_id".into(), crm),
            ("anonymous_id".into(), rule(2, 4)),
            ("device_id".into(), device),
        ]),
        max_merges: 2,
        ..IdentityConfig::default()
    }
}

// ---- the deployment simulation ------------------------------------------

/// How events travel: which raw partition each lands on, how validate
/// instances interleave the partitions into the serial log, how identity
/// batches it and where the instance that owns the log crashes (another
/// instance, or the same one restarted, takes over).
#[derive(Debug, Clone)]
struct Deployment {
    raw_partitions: usize,
    /// Per event: its raw partition (mod `raw_partitions`).
    partition_of: Vec<usize>,
    /// Which non-empty partition queue feeds the serial log next.
    interleave: Vec<usize>,
    /// Records per committed batch.
    batch: usize,
    /// Offsets after which the owner crashes before committing its batch.
    crashes: BTreeSet<usize>,
}

fn arb_deployment(events: usize) -> impl Strategy<Value = Deployment> {
    (
        prop::sample::select(&[1usize, 3, 8][..]),
        prop::collection::vec(0usize..8, events),
        prop::collection::vec(0usize..64, events),
        1usize..5,
        prop::collection::btree_set(1usize..=events.max(1), 0..4),
    )
        .prop_map(
            |(raw_partitions, partition_of, interleave, batch, crashes)| Deployment {
                raw_partitions,
                partition_of,
                interleave,
                batch,
                crashes,
            },
        )
}

/// The serial `<p>.valid` log: partition order kept, partitions interleaved
/// as the deployment says.
fn serial_log(events: &[Value], d: &Deployment) -> Vec<Value> {
    let mut queues: Vec<std::collections::VecDeque<Value>> =
        vec![Default::default(); d.raw_partitions];
    for (i, e) in events.iter().enumerate() {
        queues[d.partition_of[i] % d.raw_partitions].push_back(e.clone());
    }
    let mut log = Vec::new();
    let mut step = 0;
    while queues.iter().any(|q| !q.is_empty()) {
        let live: Vec<usize> = (0..queues.len())
            .filter(|i| !queues[*i].is_empty())
            .collect();
        let pick = live[d.interleave.get(step).copied().unwrap_or(0) % live.len()];
        step += 1;
        log.extend(queues[pick].pop_front());
    }
    log
}

/// What the identity stage produced, as downstream sees it: per input
/// offset, the outputs of the first run that processed it.
struct Run {
    outputs: Vec<Result<Vec<Emitted>, String>>,
}

fn operator(cfg: &IdentityConfig) -> Result<OperatorHarness<IdentityOperator>, TestCaseError> {
    let rules = IdentityRules::new(cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok(OperatorHarness::new(IdentityOperator::new(Arc::new(rules))))
}

fn run_identity(cfg: &IdentityConfig, log: &[Value], d: &Deployment) -> Result<Run, TestCaseError> {
    let bytes: Vec<Vec<u8>> = log
        .iter()
        .map(|e| serde_json::to_vec(e).unwrap_or_default())
        .collect();
    let mut h = operator(cfg)?;
    let mut committed = (h.state.clone(), 0usize);
    let mut first: Vec<Option<Result<Vec<Emitted>, String>>> = vec![None; log.len()];
    let mut crashes = d.crashes.clone();
    let mut offset = 0usize;
    while offset < log.len() {
        let out = match h.process(None, &bytes[offset], &[]) {
            Ok(o) => Ok(o),
            Err(OperatorError::Rejected { reason, .. }) => Err(reason.to_string()),
            Err(e) => return Err(TestCaseError::fail(format!("store error: {e}"))),
        };
        match &first[offset] {
            None => first[offset] = Some(out),
            // A replay of a produced-but-uncommitted record: downstream drops
            // it by position, so it must say what the first run said.
            Some(was) => prop_assert_eq!(was, &out, "replay diverged at {}", offset),
        }
        offset += 1;
        if crashes.remove(&offset) {
            // The batch in progress was produced, never committed: the next
            // owner restores the committed state and replays from there.
            h = operator(cfg)?;
            h.state = committed.0.clone();
            offset = committed.1;
            continue;
        }
        if offset.is_multiple_of(d.batch) || offset == log.len() {
            committed = (h.state.clone(), offset);
        }
    }
    Ok(Run {
        outputs: first
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err("missing".into())))
            .collect(),
    })
}

fn id_set(identifiers: &BTreeMap<String, Vec<String>>) -> IdSet {
    identifiers
        .iter()
        .flat_map(|(k, vs)| vs.iter().map(move |v| (k.clone(), v.clone())))
        .collect()
}

/// Check every step against the reference; return the live profiles of the
/// `<p>.profiles` topic (last snapshot per key, state active).
fn compare(
    cfg: &IdentityConfig,
    log: &[Value],
    run: &Run,
) -> Result<BTreeSet<IdSet>, TestCaseError> {
    let mut reference = Reference::new(cfg);
    let mut snapshots: BTreeMap<String, ProfileSnapshot> = BTreeMap::new();
    for (offset, (event, out)) in log.iter().zip(&run.outputs).enumerate() {
        let expected = reference.apply(event);
        match (expected, out) {
            (None, Err(reason)) => prop_assert_eq!(reason.as_str(), "no_identifier"),
            (Some(want), Ok(emitted)) => {
                let mut stamped = None;
                for e in emitted {
                    match e.output {
                        outputs::NEXT => {
                            let r = ProfileRecord::from_bytes(&e.value)
                                .map_err(|x| TestCaseError::fail(x.to_string()))?;
                            if let ProfileRecord::Event {
                                identifiers,
                                profile_id,
                                ..
                            } = r
                            {
                                stamped = Some((profile_id, id_set(&identifiers)));
                            }
                        }
                        outputs::PROFILES => {
                            let s: ProfileSnapshot = serde_json::from_slice(&e.value)
                                .map_err(|x| TestCaseError::fail(x.to_string()))?;
                            let key = String::from_utf8_lossy(e.key.as_deref().unwrap_or_default())
                                .to_string();
                            prop_assert_eq!(&key, &s.profile_id);
                            snapshots.insert(key, s);
                        }
                        other => prop_assert!(false, "unknown output {}", other),
                    }
                }
                let Some((profile_id, got)) = stamped else {
                    return Err(TestCaseError::fail(format!("no event output at {offset}")));
                };
                prop_assert_eq!(&got, &want, "event {} ({})", offset, event);
                let live = snapshots
                    .get(&profile_id)
                    .map(|s| (s.state, id_set(&s.identifiers)));
                prop_assert_eq!(
                    live,
                    Some((ProfileStatus::Active, want)),
                    "snapshot of {}",
                    profile_id
                );
            }
            (want, got) => {
                return Err(TestCaseError::fail(format!(
                    "event {offset} ({event}): reference {want:?}, operator {got:?}"
                )))
            }
        }
    }
    let live: BTreeSet<IdSet> = snapshots
        .values()
        .filter(|s| s.state == ProfileStatus::Active)
        .map(|s| id_set(&s.identifiers))
        .collect();
    prop_assert_eq!(&live, &reference.live(), "final profiles");
    // No limit exceeded, no identifier in two live profiles.
    let mut seen = IdSet::new();
    for p in &live {
        let mut per_type: BTreeMap<&str, usize> = BTreeMap::new();
        for id in p {
            prop_assert!(seen.insert(id.clone()), "{:?} in two profiles", id);
            *per_type.entry(id.0.as_str()).or_default() += 1;
        }
        for (kind, n) in per_type {
            let limit = cfg.identifiers.get(kind).map_or(usize::MAX, |r| r.limit);
            prop_assert!(n <= limit, "{} values of {} (limit {})", n, kind, limit);
        }
    }
    Ok(live)
}

/// Connected components of "appear in the same event" over the identifiers
/// the rules accept.
fn components(cfg: &IdentityConfig, log: &[Value]) -> BTreeSet<IdSet> {
    let mut groups: Vec<IdSet> = Vec::new();
    let mut reference = Reference::new(cfg);
    for e in log {
        let ids = reference.identifiers(e);
        reference.apply(e);
        let (touching, rest): (Vec<IdSet>, Vec<IdSet>) = groups
            .into_iter()
            .partition(|g| g.iter().any(|i| ids.contains(i)));
        groups = rest;
        let mut merged = ids;
        for g in touching {
            merged.extend(g);
        }
        if !merged.is_empty() {
            groups.push(merged);
        }
    }
    groups.into_iter().collect()
}

fn without_alias(mut e: Value) -> Value {
    if e["type"] == "alias" {
        e["type"] = json!("track");
        e["event"] = json!("X");
        if let Some(o) = e.as_object_mut() {
            o.remove("previousId");
        }
    }
    e
}

fn with_deployment() -> impl Strategy<Value = (Vec<Value>, Deployment)> {
    prop::collection::vec(arb_event(), 1..40).prop_flat_map(|events| {
        let n = events.len();
        (Just(events), arb_deployment(n))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Tight limits, blocked values, aliases and merges: the operator, fed
    /// the serial log of any deployment with crashes, equals the reference
    /// run over that log at every event and at the end.
    #[test]
    fn equals_the_sequential_reference_over_the_serial_log((events, deployment) in with_deployment()) {
        let cfg = tight();
        let log = serial_log(&events, &deployment);
        prop_assert_eq!(log.len(), events.len(), "no event lost on the way");
        let run = run_identity(&cfg, &log, &deployment)?;
        compare(&cfg, &log, &run)?;
    }

    /// Where no limit is hit, the profiles are the connected components,
    /// whatever the partitions, interleaving and crashes.
    #[test]
    fn without_limits_profiles_are_connected_components((events, deployment) in with_deployment()) {
        let cfg = unlimited();
        // An alias's previous id is typed by what the graph knew when it
        // came, so it is order-dependent by design: leave aliases out here.
        let events: Vec<Value> = events.into_iter().map(without_alias).collect();
        let log = serial_log(&events, &deployment);
        let run = run_identity(&cfg, &log, &deployment)?;
        let live = compare(&cfg, &log, &run)?;
        prop_assert_eq!(&live, &components(&cfg, &events));
    }
}

/// The reference itself, on the case of the identity issue: anonymous
/// browsing, a server-side order with only `userId`, then the login.
#[test]
fn reference_joins_the_cross_device_case() {
    let mut r = Reference::new(&IdentityConfig::default());
    r.apply(&json!({"type": "page", "anonymousId": "a1"}));
    r.apply(&json!({"type": "track", "event": "Order Completed", "userId": "u1"}));
    assert_eq!(r.live().len(), 2);
    r.apply(&json!({"type": "identify", "anonymousId": "a1", "userId": "u1"}));
    assert_eq!(r.live().len(), 1);
}
