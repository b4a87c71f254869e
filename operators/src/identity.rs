//! The identity stage (Segment Unify): `<p>.valid` → `<p>.identified`.
//!
//! Each event's identifiers (user id, anonymous id, email, phone, device id,
//! external ids; only the types configured under `identity.identifiers`)
//! are looked up in an identity graph kept in the task's store:
//! - `id/<type>:<value>` → the profile id that holds the identifier;
//! - `profile/<id>` → the profile's identifiers, its merge count and, once
//!   merged away, the survivor it went into.
//!
//! No known identifier creates a profile whose id is derived from the
//! event's strongest identifier (`prof_` + 20 hex chars of its SHA-256);
//! one profile gets the new identifiers attached; several are merged into
//! one survivor (the profile with the strongest identifier). Segment's rule
//! keeps limits: while resolving the event would give a profile more
//! distinct values of a type than its `limit`, or exceed `max_merges`, the
//! lowest-priority identifier of the event involved in the conflict is
//! dropped (not attached, not followed) and the rest re-resolved.
//!
//! Outputs, to [`outputs::NEXT`]: for a merge, one
//! [`ProfileRecord::Merged`] per merged-away profile (keyed by `from`),
//! then always one [`ProfileRecord::Event`] keyed by the profile id, with
//! every identifier of the profile after the event and the `cdp-source`
//! header passed through.
//!
//! Guarantees: outputs and state are a function of (state, record), with
//! every collection ordered (BTreeMap). Where no limit is hit, the
//! partition of identifiers into profiles equals the connected components
//! of "appear in the same event", whatever the arrival order (property
//! tested below). A merged-away profile id is never emitted again. An event
//! without a usable identifier is rejected (`no_identifier`) before any
//! state is written. The graph lives in one task's store, so the
//! convergence holds for the events that task sees: events that share
//! identifiers must reach the same task for it to hold across partitions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cdp_pipeline::envelope::SOURCE;
use cdp_pipeline::store::StoreError;
use cdp_pipeline::{Context, Operator, OperatorError, Record};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config::ConfigError;
use crate::messages::{lookup, outputs, Cause, Identifiers, ProfileRecord};

/// How many values of one identifier type a profile may hold and how much
/// the type counts when profiles conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentifierRule {
    /// Most distinct values of this type one profile may hold (at least 1).
    pub limit: usize,
    /// Strength of the type: 1 is the strongest. On a conflict the
    /// identifier with the highest number is dropped first; the profile
    /// with the strongest identifier survives a merge.
    pub priority: u32,
}

/// The `identity` section of the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Identifier type → its rule. Types not listed are ignored. Known
    /// types: `user_id`, `anonymous_id`, `email`, `phone`, `device_id`;
    /// any other name matches `context.externalIds[].type`.
    #[serde(default = "default_identifiers")]
    pub identifiers: BTreeMap<String, IdentifierRule>,
    /// Values never used as identifiers, compared trimmed and ignoring case.
    #[serde(default = "default_blocked_values")]
    pub blocked_values: Vec<String>,
    /// Regular expressions; a (trimmed) value matching any of them is never
    /// used as an identifier.
    #[serde(default = "default_blocked_patterns")]
    pub blocked_patterns: Vec<String>,
    /// Most merges one profile may take part in, counted over its history
    /// (a merge of k profiles counts k - 1, plus what each had).
    #[serde(default = "default_max_merges")]
    pub max_merges: usize,
}

fn default_identifiers() -> BTreeMap<String, IdentifierRule> {
    BTreeMap::from([
        (
            "user_id".to_string(),
            IdentifierRule {
                limit: 1,
                priority: 1,
            },
        ),
        (
            "email".to_string(),
            IdentifierRule {
                limit: 5,
                priority: 2,
            },
        ),
        (
            "anonymous_id".to_string(),
            IdentifierRule {
                limit: 1000,
                priority: 3,
            },
        ),
    ])
}

fn default_blocked_values() -> Vec<String> {
    ["null", "undefined", "anonymous", "0", "-1", ""]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn default_blocked_patterns() -> Vec<String> {
    vec!["^[0-]*$".to_string()]
}

const fn default_max_merges() -> usize {
    100
}

impl Default for IdentityConfig {
    /// The example of DESIGN.md.
    fn default() -> Self {
        IdentityConfig {
            identifiers: default_identifiers(),
            blocked_values: default_blocked_values(),
            blocked_patterns: default_blocked_patterns(),
            max_merges: default_max_merges(),
        }
    }
}

/// `(type, value)`, e.g. `("email", "a@example.com")`.
type Identifier = (String, String);

/// The identity config, checked and compiled.
#[derive(Debug, Clone)]
pub struct IdentityRules {
    identifiers: BTreeMap<String, IdentifierRule>,
    blocked_values: BTreeSet<String>,
    blocked_patterns: Vec<Regex>,
    max_merges: usize,
}

impl IdentityRules {
    /// Check the config and compile its patterns. Errors name the path,
    /// e.g. `identity.blocked_patterns[0]: invalid regular expression: ...`.
    pub fn new(cfg: &IdentityConfig) -> Result<Self, ConfigError> {
        if cfg.identifiers.is_empty() {
            return Err(ConfigError::new(
                "identity.identifiers",
                "at least one identifier type is required",
            ));
        }
        for (kind, rule) in &cfg.identifiers {
            // The type is the part before `:` in the `id/<type>:<value>` key.
            if kind.is_empty() || kind.contains(':') {
                return Err(ConfigError::new(
                    format!("identity.identifiers.{kind}"),
                    "identifier type names must be non-empty and contain no \":\"",
                ));
            }
            if rule.limit == 0 {
                return Err(ConfigError::new(
                    format!("identity.identifiers.{kind}.limit"),
                    "must be at least 1",
                ));
            }
        }
        let blocked_patterns = cfg
            .blocked_patterns
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Regex::new(p).map_err(|e| {
                    ConfigError::new(
                        format!("identity.blocked_patterns[{i}]"),
                        format!("invalid regular expression: {e}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(IdentityRules {
            identifiers: cfg.identifiers.clone(),
            blocked_values: cfg
                .blocked_values
                .iter()
                .map(|v| v.trim().to_lowercase())
                .collect(),
            blocked_patterns,
            max_merges: cfg.max_merges,
        })
    }

    fn rule(&self, kind: &str) -> Option<&IdentifierRule> {
        self.identifiers.get(kind)
    }

    /// Sort key of an identifier: smaller is stronger. Types no longer
    /// configured (state from an older config) are the weakest.
    fn strength<'a>(&self, kind: &'a str, value: &'a str) -> (u32, &'a str, &'a str) {
        let priority = self.rule(kind).map_or(u32::MAX, |r| r.priority);
        (priority, kind, value)
    }

    fn limit(&self, kind: &str) -> usize {
        self.rule(kind).map_or(usize::MAX, |r| r.limit)
    }

    /// The identifier value of `raw` for type `kind`, or `None` when it is
    /// not a string or number, empty, or blocked.
    fn normalize(&self, kind: &str, raw: &Value) -> Option<String> {
        let value = match raw {
            Value::String(s) => s.trim().to_string(),
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        let value = if kind == "email" {
            value.to_lowercase()
        } else {
            value
        };
        let blocked = value.is_empty()
            || self.blocked_values.contains(&value.to_lowercase())
            || self.blocked_patterns.iter().any(|p| p.is_match(&value));
        (!blocked).then_some(value)
    }

    fn add(&self, out: &mut BTreeSet<Identifier>, kind: &str, raw: Option<&Value>) {
        if self.rule(kind).is_none() {
            return;
        }
        if let Some(value) = raw.and_then(|raw| self.normalize(kind, raw)) {
            out.insert((kind.to_string(), value));
        }
    }

    /// Every usable identifier of a Segment event, of the configured types.
    pub fn extract(&self, event: &Value) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        let kind = event.get("type").and_then(Value::as_str);
        self.add(&mut out, "user_id", event.get("userId"));
        self.add(&mut out, "anonymous_id", event.get("anonymousId"));
        // An alias's previous id is most often the anonymous id the user
        // had before; its real type is unknown, so it counts as one.
        if kind == Some("alias") {
            self.add(&mut out, "anonymous_id", event.get("previousId"));
        }
        self.add(&mut out, "email", lookup(event, "context.traits.email"));
        self.add(&mut out, "phone", lookup(event, "context.traits.phone"));
        // Group traits describe the group, not the user.
        if kind == Some("identify") {
            self.add(&mut out, "email", lookup(event, "traits.email"));
            self.add(&mut out, "phone", lookup(event, "traits.phone"));
        }
        self.add(&mut out, "device_id", lookup(event, "context.device.id"));
        if let Some(Value::Array(external)) = lookup(event, "context.externalIds") {
            for item in external {
                if let Some(kind) = item.get("type").and_then(Value::as_str) {
                    self.add(&mut out, kind, item.get("id"));
                }
            }
        }
        out
    }
}

/// What the store keeps under `profile/<id>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct ProfileState {
    /// Every identifier of the profile, values sorted.
    identifiers: Identifiers,
    /// Merges this profile took part in, its history included.
    #[serde(default)]
    merges: usize,
    /// Set once the profile was merged away: the survivor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    merged_into: Option<String>,
}

impl ProfileState {
    fn insert(&mut self, kind: &str, value: &str) {
        let values = self.identifiers.entry(kind.to_string()).or_default();
        if let Err(at) = values.binary_search_by(|v| v.as_str().cmp(value)) {
            values.insert(at, value.to_string());
        }
    }

    /// The profile's strongest identifier as a sort key (smaller wins).
    fn strongest<'a>(&'a self, rules: &IdentityRules) -> Option<(u32, &'a str, &'a str)> {
        self.identifiers
            .iter()
            .flat_map(|(kind, values)| values.iter().map(move |v| rules.strength(kind, v)))
            .min()
    }
}

fn id_key(kind: &str, value: &str) -> Vec<u8> {
    format!("id/{kind}:{value}").into_bytes()
}

fn profile_key(profile_id: &str) -> Vec<u8> {
    format!("profile/{profile_id}").into_bytes()
}

/// `prof_` + the first 20 hex chars of SHA-256 of `type:value`.
fn derived_profile_id(kind: &str, value: &str) -> String {
    let digest = Sha256::digest(format!("{kind}:{value}").as_bytes());
    // 10 bytes = 20 hex chars.
    let head: Vec<u8> = digest.iter().take(10).copied().collect();
    format!("prof_{}", hex::encode(head))
}

/// Redirects are always repointed on a merge; following `merged_into` is a
/// safety net, bounded so a corrupt cycle cannot hang a task.
const MAX_REDIRECT_HOPS: usize = 64;

/// The identity operator of one task. See the module doc.
#[derive(Debug, Clone)]
pub struct IdentityOperator {
    rules: Arc<IdentityRules>,
}

impl IdentityOperator {
    pub fn new(rules: Arc<IdentityRules>) -> Self {
        IdentityOperator { rules }
    }

    /// The live profile holding `(kind, value)`, if any, with its state.
    fn resolve(
        &self,
        ctx: &Context<'_>,
        kind: &str,
        value: &str,
    ) -> Result<Option<(String, ProfileState)>, StoreError> {
        let Some(mut profile_id) = ctx.get_json::<String>(&id_key(kind, value))? else {
            return Ok(None);
        };
        for _ in 0..MAX_REDIRECT_HOPS {
            let Some(state) = ctx.get_json::<ProfileState>(&profile_key(&profile_id))? else {
                // A dangling pointer: treat the identifier as new; writing
                // it repairs the pointer.
                return Ok(None);
            };
            match state.merged_into.clone() {
                Some(next) => profile_id = next,
                None => return Ok(Some((profile_id, state))),
            }
        }
        Ok(None)
    }

    /// The identifiers of `kept` that take part in a limit or merge
    /// conflict, or `None` when resolving `kept` breaks no rule.
    fn conflict<'a>(
        &self,
        kept: &'a BTreeSet<Identifier>,
        links: &BTreeMap<Identifier, String>,
        profiles: &BTreeMap<String, ProfileState>,
    ) -> Option<Vec<&'a Identifier>> {
        let linked: BTreeSet<&str> = kept
            .iter()
            .filter_map(|id| links.get(id).map(String::as_str))
            .collect();
        let mut union: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let mut largest: BTreeMap<&str, usize> = BTreeMap::new();
        let mut merges: usize = 0;
        for profile in linked.iter().filter_map(|p| profiles.get(*p)) {
            merges = merges.saturating_add(profile.merges);
            for (kind, values) in &profile.identifiers {
                union
                    .entry(kind)
                    .or_default()
                    .extend(values.iter().map(String::as_str));
                let most = largest.entry(kind).or_default();
                *most = (*most).max(values.len());
            }
        }
        for (kind, value) in kept {
            union.entry(kind).or_default().insert(value);
        }
        // A type is over its limit only if this event makes it worse than
        // the fullest profile already is (a lowered limit does not orphan
        // existing profiles).
        let over: BTreeSet<&str> = union
            .iter()
            .filter(|(kind, values)| {
                values.len() > self.rules.limit(kind)
                    && values.len() > largest.get(*kind).copied().unwrap_or(0)
            })
            .map(|(kind, _)| *kind)
            .collect();
        let too_many_merges =
            linked.len() > 1 && merges.saturating_add(linked.len() - 1) > self.rules.max_merges;
        if over.is_empty() && !too_many_merges {
            return None;
        }
        let involved = kept
            .iter()
            .filter(|id| match links.get(*id).and_then(|p| profiles.get(p)) {
                Some(profile) => {
                    too_many_merges
                        || profile
                            .identifiers
                            .keys()
                            .any(|k| over.contains(k.as_str()))
                }
                None => over.contains(id.0.as_str()),
            })
            .collect();
        Some(involved)
    }
}

/// The state writes and outputs of one event, computed before any write.
struct Resolution {
    profile_id: String,
    profile: ProfileState,
    /// Identifiers whose `id/` key must point at `profile_id`.
    repoint: BTreeSet<Identifier>,
    /// Merged-away profiles and their final state.
    merged: BTreeMap<String, ProfileState>,
    /// Whether `profile` differs from what the store holds.
    changed: bool,
}

impl Operator for IdentityOperator {
    fn process(&mut self, record: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let event: Value = serde_json::from_slice(record.value).map_err(|e| {
            OperatorError::rejected("invalid_json", json!({ "error": e.to_string() }))
        })?;
        if !event.is_object() {
            return Err(OperatorError::rejected(
                "invalid_json",
                json!({ "error": "expected a JSON object" }),
            ));
        }
        let message_id = event
            .get("messageId")
            .and_then(Value::as_str)
            .map(String::from);
        let ids = self.rules.extract(&event);
        if ids.is_empty() {
            return Err(OperatorError::rejected(
                "no_identifier",
                json!({ "message_id": message_id }),
            ));
        }

        // Read phase: where every identifier points today.
        let mut links: BTreeMap<Identifier, String> = BTreeMap::new();
        let mut profiles: BTreeMap<String, ProfileState> = BTreeMap::new();
        for id in &ids {
            if let Some((profile_id, state)) = self.resolve(ctx, &id.0, &id.1)? {
                links.insert(id.clone(), profile_id.clone());
                profiles.insert(profile_id, state);
            }
        }

        // Segment's rule: drop the weakest identifier involved in a
        // conflict until none is left. One identifier alone never
        // conflicts, so at least one always stays.
        let mut kept = ids.clone();
        while let Some(involved) = self.conflict(&kept, &links, &profiles) {
            let weakest = involved
                .into_iter()
                .max_by(|a, b| {
                    self.rules
                        .strength(&a.0, &a.1)
                        .cmp(&self.rules.strength(&b.0, &b.1))
                })
                .cloned();
            match weakest {
                Some(id) if kept.len() > 1 => {
                    kept.remove(&id);
                }
                _ => break,
            }
        }

        let linked: BTreeSet<String> = kept
            .iter()
            .filter_map(|id| links.get(id).cloned())
            .collect();
        let resolution = match linked.len() {
            0 => {
                let Some((kind, value)) = kept.iter().min_by(|a, b| {
                    self.rules
                        .strength(&a.0, &a.1)
                        .cmp(&self.rules.strength(&b.0, &b.1))
                }) else {
                    return Err(OperatorError::rejected(
                        "no_identifier",
                        json!({ "message_id": message_id }),
                    ));
                };
                // Unused by construction (the strongest identifier of a new
                // profile is attached to it); the suffix guards a hash
                // collision.
                let base = derived_profile_id(kind, value);
                let mut profile_id = base.clone();
                let mut n = 1;
                while ctx.get(&profile_key(&profile_id))?.is_some() {
                    profile_id = format!("{base}_{n}");
                    n += 1;
                }
                let mut profile = ProfileState::default();
                for (kind, value) in &kept {
                    profile.insert(kind, value);
                }
                Resolution {
                    profile_id,
                    profile,
                    repoint: kept.clone(),
                    merged: BTreeMap::new(),
                    changed: true,
                }
            }
            _ => {
                // The survivor: the profile with the strongest identifier.
                let mut candidates: Vec<(&String, &ProfileState)> = linked
                    .iter()
                    .filter_map(|p| profiles.get(p).map(|s| (p, s)))
                    .collect();
                candidates.sort_by(|a, b| {
                    let key_a = (
                        a.1.strongest(&self.rules).is_none(),
                        a.1.strongest(&self.rules),
                        a.0,
                    );
                    let key_b = (
                        b.1.strongest(&self.rules).is_none(),
                        b.1.strongest(&self.rules),
                        b.0,
                    );
                    key_a.cmp(&key_b)
                });
                let Some(((survivor_id, survivor), others)) = candidates.split_first() else {
                    return Err(OperatorError::rejected(
                        "no_identifier",
                        json!({ "message_id": message_id }),
                    ));
                };
                let survivor_id = (*survivor_id).clone();
                let mut profile = (*survivor).clone();
                let mut repoint: BTreeSet<Identifier> = kept
                    .iter()
                    .filter(|id| !links.contains_key(*id))
                    .cloned()
                    .collect();
                let mut merged = BTreeMap::new();
                for (other_id, other) in others {
                    for (kind, values) in &other.identifiers {
                        for value in values {
                            profile.insert(kind, value);
                            repoint.insert((kind.clone(), value.clone()));
                        }
                    }
                    profile.merges = profile
                        .merges
                        .saturating_add(other.merges)
                        .saturating_add(1);
                    merged.insert(
                        (*other_id).clone(),
                        ProfileState {
                            identifiers: Identifiers::new(),
                            merges: other.merges,
                            merged_into: Some(survivor_id.clone()),
                        },
                    );
                }
                for (kind, value) in &kept {
                    profile.insert(kind, value);
                }
                let changed = profile != **survivor;
                Resolution {
                    profile_id: survivor_id,
                    profile,
                    repoint,
                    merged,
                    changed,
                }
            }
        };

        // Outputs, encoded before any write.
        let cause = Cause {
            message_id,
            tick: None,
        };
        let mut outputs_in_order = Vec::new();
        for from in resolution.merged.keys() {
            let merged = ProfileRecord::Merged {
                from: from.clone(),
                into: resolution.profile_id.clone(),
                identifiers: resolution.profile.identifiers.clone(),
                cause: cause.clone(),
            };
            outputs_in_order.push((from.clone(), encode(&merged)?, false));
        }
        let resolved = ProfileRecord::Event {
            profile_id: resolution.profile_id.clone(),
            identifiers: resolution.profile.identifiers.clone(),
            event,
        };
        outputs_in_order.push((resolution.profile_id.clone(), encode(&resolved)?, true));

        // Write phase.
        for (kind, value) in &resolution.repoint {
            ctx.put_json(&id_key(kind, value), &resolution.profile_id)?;
        }
        for (from, state) in &resolution.merged {
            ctx.put_json(&profile_key(from), state)?;
        }
        if resolution.changed {
            ctx.put_json(&profile_key(&resolution.profile_id), &resolution.profile)?;
        }

        let source: Vec<(String, Vec<u8>)> = record
            .header(SOURCE)
            .map(|s| (SOURCE.to_string(), s.as_bytes().to_vec()))
            .into_iter()
            .collect();
        for (key, value, is_event) in outputs_in_order {
            let headers = if is_event { source.clone() } else { Vec::new() };
            ctx.emit_with_headers(outputs::NEXT, Some(key.into_bytes()), value, headers);
        }
        Ok(())
    }
}

fn encode(record: &ProfileRecord) -> Result<Vec<u8>, OperatorError> {
    serde_json::to_vec(record).map_err(|e| OperatorError::Store(StoreError::Decode(e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdp_pipeline::{Emitted, OperatorHarness};
    use proptest::prelude::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn harness(cfg: &IdentityConfig) -> Result<OperatorHarness<IdentityOperator>, ConfigError> {
        Ok(OperatorHarness::new(IdentityOperator::new(Arc::new(
            IdentityRules::new(cfg)?,
        ))))
    }

    fn send(
        h: &mut OperatorHarness<IdentityOperator>,
        event: &Value,
    ) -> Result<Vec<ProfileRecord>, Box<dyn std::error::Error>> {
        let bytes = serde_json::to_vec(event)?;
        let headers = vec![(SOURCE.to_string(), b"web".to_vec())];
        let out = h.process(None, &bytes, &headers)?;
        decode(&out)
    }

    fn decode(out: &[Emitted]) -> Result<Vec<ProfileRecord>, Box<dyn std::error::Error>> {
        out.iter()
            .map(|e| Ok(serde_json::from_slice(&e.value)?))
            .collect()
    }

    /// The profile id and identifiers of the (last) Event output.
    fn resolved(
        records: &[ProfileRecord],
    ) -> Result<(String, Identifiers), Box<dyn std::error::Error>> {
        match records.last() {
            Some(ProfileRecord::Event {
                profile_id,
                identifiers,
                ..
            }) => Ok((profile_id.clone(), identifiers.clone())),
            other => Err(format!("expected an event last, got {other:?}").into()),
        }
    }

    fn ids(pairs: &[(&str, &[&str])]) -> Identifiers {
        pairs
            .iter()
            .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
            .collect()
    }

    /// Live profiles in the store: profile id → identifiers.
    fn live_profiles(h: &OperatorHarness<IdentityOperator>) -> BTreeMap<String, Identifiers> {
        h.state
            .map
            .iter()
            .filter_map(|(k, v)| {
                let id = std::str::from_utf8(k).ok()?.strip_prefix("profile/")?;
                let state: ProfileState = serde_json::from_slice(v).ok()?;
                state
                    .merged_into
                    .is_none()
                    .then(|| (id.to_string(), state.identifiers))
            })
            .collect()
    }

    #[test]
    fn shared_config_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<IdentityRules>();
        assert_send_sync::<IdentityOperator>();
    }

    #[test]
    fn default_config_is_designs_example() -> TestResult {
        let yaml = r#"
identifiers:
  user_id: {limit: 1, priority: 1}
  email: {limit: 5, priority: 2}
  anonymous_id: {limit: 1000, priority: 3}
blocked_values: ["null", "undefined", "anonymous", "0", "-1", ""]
blocked_patterns: ["^[0-]*$"]
max_merges: 100
"#;
        let parsed: IdentityConfig = serde_yaml::from_str(yaml)?;
        assert_eq!(parsed, IdentityConfig::default());
        assert_eq!(
            serde_yaml::from_str::<IdentityConfig>("{}")?,
            IdentityConfig::default()
        );
        assert!(serde_yaml::from_str::<IdentityConfig>(
            "identifiers: {email: {limit: 1, priority: 1, x: 2}}"
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn config_errors_name_the_path() {
        let mut cfg = IdentityConfig {
            blocked_patterns: vec!["(".into()],
            ..IdentityConfig::default()
        };
        assert_eq!(
            IdentityRules::new(&cfg).err().map(|e| e.path),
            Some("identity.blocked_patterns[0]".to_string())
        );
        cfg.blocked_patterns.clear();
        cfg.identifiers.insert(
            "email".into(),
            IdentifierRule {
                limit: 0,
                priority: 2,
            },
        );
        assert_eq!(
            IdentityRules::new(&cfg).err().map(|e| e.path),
            Some("identity.identifiers.email.limit".to_string())
        );
    }

    #[test]
    fn profile_ids_derive_from_the_strongest_identifier() -> TestResult {
        let mut h = harness(&IdentityConfig::default())?;
        let out = send(
            &mut h,
            &json!({"type": "identify", "userId": "u1", "anonymousId": "a1"}),
        )?;
        let (profile, identifiers) = resolved(&out)?;
        assert_eq!(profile, derived_profile_id("user_id", "u1"));
        assert_eq!(profile.len(), "prof_".len() + 20);
        assert_eq!(
            identifiers,
            ids(&[("anonymous_id", &["a1"]), ("user_id", &["u1"])])
        );
        let emitted = h.process(None, br#"{"type":"track","event":"X","userId":"u1"}"#, &[])?;
        assert_eq!(emitted.len(), 1);
        assert_eq!(emitted[0].key.as_deref(), Some(profile.as_bytes()));
        assert_eq!(emitted[0].output, outputs::NEXT);
        Ok(())
    }

    #[test]
    fn source_header_passes_through() -> TestResult {
        let mut h = harness(&IdentityConfig::default())?;
        let headers = vec![(SOURCE.to_string(), b"web".to_vec())];
        let out = h.process(
            None,
            br#"{"type":"track","event":"X","userId":"u1"}"#,
            &headers,
        )?;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].headers, headers);
        Ok(())
    }

    #[test]
    fn blocked_values_and_patterns_are_ignored() -> TestResult {
        let mut h = harness(&IdentityConfig::default())?;
        let out = send(
            &mut h,
            &json!({"type": "identify", "userId": "NULL", "anonymousId": " a1 "}),
        )?;
        assert_eq!(resolved(&out)?.1, ids(&[("anonymous_id", &["a1"])]));
        for user in [
            json!("undefined"),
            json!("000"),
            json!("-0-"),
            json!(0),
            json!(""),
            json!(true),
        ] {
            let r = h.process(
                None,
                &serde_json::to_vec(&json!({"type": "track", "event": "X", "userId": user}))?,
                &[],
            );
            assert!(
                matches!(
                    r,
                    Err(OperatorError::Rejected {
                        reason: "no_identifier",
                        ..
                    })
                ),
                "{user}"
            );
        }
        assert_eq!(live_profiles(&h).len(), 1, "rejections write no state");
        Ok(())
    }

    #[test]
    fn emails_are_case_insensitive_and_numbers_become_strings() -> TestResult {
        let mut h = harness(&IdentityConfig::default())?;
        let event = json!({"type": "identify", "userId": 42,
            "traits": {"email": "a@example.com"}, "context": {"traits": {"email": " A@Example.COM "}}});
        let (profile, identifiers) = resolved(&send(&mut h, &event)?)?;
        assert_eq!(
            identifiers,
            ids(&[("email", &["a@example.com"]), ("user_id", &["42"])])
        );
        let again = json!({"type": "track", "event": "X", "anonymousId": "z", "context": {"traits": {"email": "A@EXAMPLE.com"}}});
        assert_eq!(resolved(&send(&mut h, &again)?)?.0, profile);
        Ok(())
    }

    #[test]
    fn unconfigured_types_are_ignored_and_external_ids_are_typed() -> TestResult {
        let mut cfg = IdentityConfig::default();
        cfg.identifiers.insert(
            "crm_id".into(),
            IdentifierRule {
                limit: 1,
                priority: 4,
            },
        );
        let mut h = harness(&cfg)?;
        let event = json!({"type": "track", "event": "X", "userId": "u1",
            "context": {"device": {"id": "d1"}, "traits": {"phone": "555"},
                        "externalIds": [{"id": "c1", "type": "crm_id"}, {"id": "z", "type": "other"}, 5]}});
        let (_, identifiers) = resolved(&send(&mut h, &event)?)?;
        assert_eq!(
            identifiers,
            ids(&[("crm_id", &["c1"]), ("user_id", &["u1"])])
        );
        Ok(())
    }

    #[test]
    fn design_scenario_anonymous_then_identify_then_known_user() -> TestResult {
        let mut h = harness(&IdentityConfig::default())?;
        let view = json!({"type": "track", "event": "Product Viewed", "anonymousId": "a1", "messageId": "m1"});
        let (p1, _) = resolved(&send(&mut h, &view)?)?;
        let identify = json!({"type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "m2",
            "traits": {"email": "a@example.com"}});
        let (p2, _) = resolved(&send(&mut h, &identify)?)?;
        let order =
            json!({"type": "track", "event": "Order Completed", "userId": "u1", "messageId": "m3"});
        let (p3, identifiers) = resolved(&send(&mut h, &order)?)?;
        assert_eq!((p1.as_str(), p2.as_str()), (p3.as_str(), p3.as_str()));
        assert_eq!(
            identifiers,
            ids(&[
                ("anonymous_id", &["a1"]),
                ("email", &["a@example.com"]),
                ("user_id", &["u1"])
            ])
        );
        assert_eq!(live_profiles(&h).len(), 1);
        Ok(())
    }

    #[test]
    fn merge_emits_merged_first_and_the_strongest_profile_survives() -> TestResult {
        let mut h = harness(&IdentityConfig::default())?;
        let (anon, _) = resolved(&send(
            &mut h,
            &json!({"type": "page", "anonymousId": "a1"}),
        )?)?;
        let (user, _) = resolved(&send(&mut h, &json!({"type": "identify", "userId": "u1"}))?)?;
        let bytes = serde_json::to_vec(
            &json!({"type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "m9"}),
        )?;
        let headers = vec![(SOURCE.to_string(), b"web".to_vec())];
        let out = h.process(None, &bytes, &headers)?;
        let both = ids(&[("anonymous_id", &["a1"]), ("user_id", &["u1"])]);
        let expected_merge = ProfileRecord::Merged {
            from: anon.clone(),
            into: user.clone(),
            identifiers: both.clone(),
            cause: Cause {
                message_id: Some("m9".into()),
                tick: None,
            },
        };
        let records = decode(&out)?;
        assert_eq!(records.len(), 2);
        assert_eq!(records[0], expected_merge);
        assert_eq!(out[0].key.as_deref(), Some(anon.as_bytes()));
        assert!(out[0].headers.is_empty());
        assert_eq!(resolved(&records)?, (user.clone(), both));
        assert_eq!(out[1].key.as_deref(), Some(user.as_bytes()));
        assert_eq!(out[1].headers, headers);
        // The old id's identifiers now resolve to the survivor.
        assert_eq!(
            resolved(&send(
                &mut h,
                &json!({"type": "page", "anonymousId": "a1"})
            )?)?
            .0,
            user
        );
        Ok(())
    }

    #[test]
    fn limit_prevents_merge_and_drops_the_shared_anonymous_id() -> TestResult {
        let mut h = harness(&IdentityConfig::default())?;
        let (p1, _) = resolved(&send(
            &mut h,
            &json!({"type": "identify", "userId": "u1", "anonymousId": "a1"}),
        )?)?;
        let out = send(
            &mut h,
            &json!({"type": "identify", "userId": "u2", "anonymousId": "a1"}),
        )?;
        assert_eq!(out.len(), 1, "no merge");
        let (p2, identifiers) = resolved(&out)?;
        assert_ne!(p1, p2);
        assert_eq!(identifiers, ids(&[("user_id", &["u2"])]));
        let profiles = live_profiles(&h);
        assert_eq!(
            profiles.get(&p1),
            Some(&ids(&[("anonymous_id", &["a1"]), ("user_id", &["u1"])]))
        );
        Ok(())
    }

    #[test]
    fn limit_between_two_profiles_keeps_them_apart() -> TestResult {
        let mut h = harness(&IdentityConfig::default())?;
        let (p1, _) = resolved(&send(
            &mut h,
            &json!({"type": "identify", "userId": "u1", "anonymousId": "a1"}),
        )?)?;
        let (p2, _) = resolved(&send(
            &mut h,
            &json!({"type": "identify", "userId": "u2", "anonymousId": "a2"}),
        )?)?;
        // a2 is the weaker of the two linking identifiers: dropped.
        let out = send(
            &mut h,
            &json!({"type": "track", "event": "X", "anonymousId": "a1",
            "context": {"externalIds": [{"id": "a2", "type": "anonymous_id"}]}}),
        )?;
        assert_eq!(out.len(), 1);
        assert_eq!(resolved(&out)?.0, p1);
        assert_eq!(live_profiles(&h).len(), 2);
        assert!(live_profiles(&h).contains_key(&p2));
        Ok(())
    }

    #[test]
    fn a_full_type_keeps_the_event_on_its_profile_without_the_new_value() -> TestResult {
        let cfg = IdentityConfig::default();
        let mut h = harness(&cfg)?;
        let mut profile = String::new();
        for i in 0..6 {
            let event = json!({"type": "identify", "userId": "u1", "traits": {"email": format!("e{i}@x.com")}});
            profile = resolved(&send(&mut h, &event)?)?.0;
        }
        let profiles = live_profiles(&h);
        let emails = profiles
            .get(&profile)
            .and_then(|p| p.get("email"))
            .map(Vec::len);
        assert_eq!(emails, Some(5));
        assert_eq!(profiles.len(), 1);
        Ok(())
    }

    #[test]
    fn max_merges_stops_further_merges() -> TestResult {
        let cfg = IdentityConfig {
            max_merges: 1,
            ..IdentityConfig::default()
        };
        let mut h = harness(&cfg)?;
        for a in ["a1", "a2", "a3"] {
            send(&mut h, &json!({"type": "page", "anonymousId": a}))?;
        }
        let out = send(
            &mut h,
            &json!({"type": "page", "anonymousId": "a1", "context": {"device": {"id": "x"},
            "externalIds": [{"id": "a2", "type": "anonymous_id"}]}}),
        )?;
        assert_eq!(out.len(), 2, "first merge allowed");
        let out = send(
            &mut h,
            &json!({"type": "page", "anonymousId": "a2",
            "context": {"externalIds": [{"id": "a3", "type": "anonymous_id"}]}}),
        )?;
        assert_eq!(out.len(), 1, "second merge refused");
        assert_eq!(live_profiles(&h).len(), 2);
        Ok(())
    }

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
            let mut e =
                json!({"type": "track", "event": "X", "context": {"traits": {}, "device": {}}});
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
        let rule = |priority| IdentifierRule {
            limit: 1_000,
            priority,
        };
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
        let rule = |limit, priority| IdentifierRule { limit, priority };
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
    fn run(
        cfg: &IdentityConfig,
        events: &[Ev],
    ) -> Result<BTreeSet<BTreeSet<String>>, TestCaseError> {
        let mut h = harness(cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut merged_away = BTreeSet::new();
        for event in events {
            let out =
                send(&mut h, &event.json()).map_err(|e| TestCaseError::fail(e.to_string()))?;
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
                    .flat_map(|(kind, values)| {
                        values.into_iter().map(move |v| format!("{kind}:{v}"))
                    })
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
}
