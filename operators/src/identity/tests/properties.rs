use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

// ---- property tests -------------------------------------------------

/// A small event: at most one of each identifier field, from small pools.
#[derive(Debug, Clone)]
struct Ev {
    user: Option<u8>,
    anon: Option<u8>,
    email: Option<u8>,
    device: Option<u8>,
}

impl Ev {
    fn identifiers(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(u) = self.user {
            out.push(format!("user_id:u{u}"));
        }
        if let Some(a) = self.anon {
            out.push(format!("anonymous_id:a{a}"));
        }
        if let Some(e) = self.email {
            out.push(format!("email:e{e}@x.com"));
        }
        if let Some(d) = self.device {
            out.push(format!("device_id:d{d}"));
        }
        out
    }

    fn json(&self) -> Value {
        let mut e = json!({"type": "track", "event": "X", "context": {"traits": {}, "device": {}}});
        if let Some(u) = self.user {
            e["userId"] = json!(format!("u{u}"));
        }
        if let Some(a) = self.anon {
            e["anonymousId"] = json!(format!("a{a}"));
        }
        if let Some(m) = self.email {
            // Mixed case: the same email whatever the spelling.
            let email = if m % 2 == 0 {
                format!("E{m}@X.com")
            } else {
                format!("e{m}@x.com")
            };
            e["context"]["traits"]["email"] = json!(email);
        }
        if let Some(d) = self.device {
            e["context"]["device"]["id"] = json!(format!("d{d}"));
        }
        e
    }
}

fn arb_ev() -> impl Strategy<Value = Ev> {
    let slot = |n: u8| prop::option::weighted(0.5, 0..n);
    (slot(3), slot(5), slot(3), slot(3))
        .prop_map(|(user, anon, email, device)| Ev {
            user,
            anon,
            email,
            device,
        })
        .prop_filter("at least one identifier", |e| !e.identifiers().is_empty())
}

fn unlimited() -> IdentityConfig {
    let rule = |priority| IdentifierRule::new(1_000, priority);
    IdentityConfig {
        identifiers: BTreeMap::from([
            ("user_id".to_string(), rule(1)),
            ("email".to_string(), rule(2)),
            ("anonymous_id".to_string(), rule(3)),
            ("device_id".to_string(), rule(4)),
        ]),
        max_merges: 1_000_000,
        ..IdentityConfig::default()
    }
}

/// Small limits and few merges, so that conflicts are frequent.
fn tight() -> IdentityConfig {
    let rule = |limit, priority| IdentifierRule::new(limit, priority);
    IdentityConfig {
        identifiers: BTreeMap::from([
            ("user_id".to_string(), rule(1, 1)),
            ("email".to_string(), rule(2, 2)),
            ("anonymous_id".to_string(), rule(2, 3)),
            ("device_id".to_string(), rule(1, 4)),
        ]),
        max_merges: 3,
        ..IdentityConfig::default()
    }
}

/// Connected components of "appear in the same event".
fn components(events: &[Ev]) -> BTreeSet<BTreeSet<String>> {
    let mut parent: BTreeMap<String, String> = BTreeMap::new();
    fn find(parent: &mut BTreeMap<String, String>, x: &str) -> String {
        let mut root = x.to_string();
        while let Some(p) = parent.get(&root).filter(|p| **p != root) {
            root = p.clone();
        }
        parent.insert(x.to_string(), root.clone());
        root
    }
    for event in events {
        let ids = event.identifiers();
        for id in &ids {
            parent.entry(id.clone()).or_insert_with(|| id.clone());
        }
        for pair in ids.windows(2) {
            let (a, b) = (find(&mut parent, &pair[0]), find(&mut parent, &pair[1]));
            parent.insert(a, b);
        }
    }
    let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let keys: Vec<String> = parent.keys().cloned().collect();
    for id in keys {
        let root = find(&mut parent, &id);
        groups.entry(root).or_default().insert(id);
    }
    groups.into_values().collect()
}

/// Feed `events`; check the merged-away ids never come back; return
/// the partition of identifiers into live profiles.
fn run(cfg: &IdentityConfig, events: &[Ev]) -> Result<BTreeSet<BTreeSet<String>>, TestCaseError> {
    let mut h = harness(cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut merged_away = BTreeSet::new();
    for event in events {
        let out = send(&mut h, &event.json()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(
            matches!(out.last(), Some(ProfileRecord::Event { .. })),
            "the event comes last"
        );
        for record in out {
            match record {
                ProfileRecord::Merged { from, into, .. } => {
                    prop_assert!(!merged_away.contains(&into), "merged into a dead profile");
                    merged_away.insert(from);
                }
                ProfileRecord::Event { profile_id, .. } => {
                    prop_assert!(
                        !merged_away.contains(&profile_id),
                        "event on a merged-away profile"
                    );
                }
                ProfileRecord::Transfer { .. } => {
                    prop_assert!(false, "identity emits no transfers")
                }
            }
        }
    }
    // Every identifier points at the live profile that lists it.
    let profiles = live_profiles(&h);
    for (key, value) in &h.state.map {
        let Some(id) = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix("id/"))
        else {
            continue;
        };
        let owner: Option<String> = serde_json::from_slice(value).ok();
        let (kind, val) = id.split_once(':').unwrap_or_default();
        let listed = owner
            .as_ref()
            .and_then(|o| profiles.get(o))
            .and_then(|p| p.get(kind))
            .is_some_and(|vs| vs.iter().any(|v| v == val));
        prop_assert!(listed, "{id} points to {owner:?}");
    }
    // No profile holds more values of a type than its limit.
    let rules = IdentityRules::new(cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
    for identifiers in profiles.values() {
        for (kind, values) in identifiers {
            prop_assert!(values.len() <= rules.limit(kind), "{kind} over its limit");
        }
    }
    Ok(profiles
        .into_values()
        .map(|identifiers| {
            identifiers
                .into_iter()
                .flat_map(|(kind, values)| values.into_iter().map(move |v| format!("{kind}:{v}")))
                .collect()
        })
        .collect())
}

fn with_shuffles() -> impl Strategy<Value = (Vec<Ev>, Vec<Ev>, Vec<Ev>)> {
    prop::collection::vec(arb_ev(), 1..30).prop_flat_map(|events| {
        (
            Just(events.clone()),
            Just(events.clone()).prop_shuffle(),
            Just(events).prop_shuffle(),
        )
    })
}

proptest! {
    /// With no limit hit, profiles are exactly the connected components
    /// of "appear in the same event", for every arrival order.
    #[test]
    fn profiles_are_connected_components_in_any_order((events, shuffled, reshuffled) in with_shuffles()) {
        let cfg = unlimited();
        let expected = components(&events);
        prop_assert_eq!(&run(&cfg, &events)?, &expected);
        prop_assert_eq!(&run(&cfg, &shuffled)?, &expected);
        prop_assert_eq!(&run(&cfg, &reshuffled)?, &expected);
    }

    /// With tight limits: every identifier belongs to one
    /// live profile, no limit is exceeded, merged ids never come back,
    /// and a replay of the same input yields the same partition.
    #[test]
    fn limits_hold_and_replays_agree(events in prop::collection::vec(arb_ev(), 1..30)) {
        let cfg = tight();
        let first = run(&cfg, &events)?;
        prop_assert_eq!(run(&cfg, &events)?, first);
    }
}
