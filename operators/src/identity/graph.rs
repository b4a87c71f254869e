//! The identity graph in the task's store and the resolution of one event
//! against it.
//!
//! Keys:
//! - `id/<type>:<value>` → the profile id that holds the identifier;
//! - `profile/<id>` → [`ProfileState`]: identifiers, merge count, audit
//!   trail and, once merged away, the survivor it went into (in postcard,
//!   see [`stored`](super::stored)).
//!
//! [`resolve_event`] reads what it needs and returns a [`Resolution`]: every
//! write and every output of the event, computed before anything is written.

use std::collections::{BTreeMap, BTreeSet};

use cdp_pipeline::store::StoreError;
use cdp_pipeline::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::config::{DropReason, Identifier, IdentityRules};
use super::stored;
use crate::messages::{AuditDrop, DroppedIdentifier, Identifiers, MergedFrom};

/// How many refused identifiers a profile's audit trail keeps (the most
/// recent; a repeat of one already listed is not added again).
pub const MAX_AUDIT_DROPS: usize = 50;

/// What the store keeps under `profile/<id>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileState {
    /// Every identifier of the profile, values sorted.
    pub identifiers: Identifiers,
    /// Merges this profile took part in, its history included.
    #[serde(default)]
    pub merges: usize,
    /// Set once the profile was merged away: the survivor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
    /// The profiles merged into this one, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<MergedFrom>,
    /// Identifiers a rule kept off this profile, most recent last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<AuditDrop>,
}

impl ProfileState {
    /// Add `(kind, value)`; whether it was new to the profile.
    pub fn insert(&mut self, kind: &str, value: &str) -> bool {
        let values = match self.identifiers.get_mut(kind) {
            Some(values) => values,
            None => self.identifiers.entry(kind.to_string()).or_default(),
        };
        match values.binary_search_by(|v| v.as_str().cmp(value)) {
            Ok(_) => false,
            Err(at) => {
                values.insert(at, value.to_string());
                true
            }
        }
    }

    /// The profile's strongest identifier as a sort key (smaller wins).
    pub fn strongest<'a>(&'a self, rules: &IdentityRules) -> Option<(u32, &'a str, &'a str)> {
        self.identifiers
            .iter()
            .flat_map(|(kind, values)| values.iter().map(move |v| rules.strength(kind, v)))
            .min()
    }

    /// Put `drop` on the audit trail unless it is already there.
    fn audit(&mut self, drop: AuditDrop) {
        if self.dropped.iter().any(|d| d.identifier == drop.identifier) {
            return;
        }
        self.dropped.push(drop);
        if self.dropped.len() > MAX_AUDIT_DROPS {
            let excess = self.dropped.len() - MAX_AUDIT_DROPS;
            self.dropped.drain(..excess);
        }
    }
}

/// `id/<kind>:<value>` (built by concatenation: `format!` was ~3% of a
/// known visitor's event).
pub fn id_key(kind: &str, value: &str) -> Vec<u8> {
    [b"id/", kind.as_bytes(), b":", value.as_bytes()].concat()
}

/// `profile/<profile_id>`.
pub fn profile_key(profile_id: &str) -> Vec<u8> {
    [b"profile/", profile_id.as_bytes()].concat()
}

/// `prof_` + the first 20 hex chars of SHA-256 of `type:value`.
/// Hashed in parts and written into one buffer: two `format!`s and a
/// `char` at a time were ~40% of a new profile's resolution beside the hash.
pub fn derived_profile_id(kind: &str, value: &str) -> String {
    let digest = Sha256::new()
        .chain_update(kind)
        .chain_update(":")
        .chain_update(value)
        .finalize();
    // 10 bytes = 20 hex chars.
    let mut hex = [0u8; 20];
    let mut id = String::with_capacity(PROFILE_ID_PREFIX.len() + hex.len());
    id.push_str(PROFILE_ID_PREFIX);
    // Cannot fail: the buffer is exactly twice the bytes encoded.
    if hex::encode_to_slice(&digest[..10], &mut hex).is_ok() {
        id.extend(hex.iter().map(|&b| char::from(b)));
    }
    id
}

const PROFILE_ID_PREFIX: &str = "prof_";

/// Redirects are always repointed on a merge; following `merged_into` is a
/// safety net, bounded so a corrupt cycle cannot hang a task.
const MAX_REDIRECT_HOPS: usize = 64;

/// The stored state of `profile_id`, if any.
pub fn load(ctx: &Context<'_>, profile_id: &str) -> Result<Option<ProfileState>, StoreError> {
    let key = profile_key(profile_id);
    match ctx.get(&key)? {
        Some(bytes) => stored::decode(&key, &bytes).map(Some),
        None => Ok(None),
    }
}

/// Store the state of `profile_id`.
pub fn store(
    ctx: &mut Context<'_>,
    profile_id: &str,
    state: &ProfileState,
) -> Result<(), StoreError> {
    ctx.put(&profile_key(profile_id), stored::encode(state)?);
    Ok(())
}

/// The profile id an `id/` key holds: a JSON string. One without escapes
/// (every profile id) is its text between the quotes, taken without a JSON
/// parse (~700 instructions a lookup, 2% of the identity stage); anything
/// else is parsed.
fn pointer(key: &[u8], bytes: &[u8]) -> Result<String, StoreError> {
    if let [b'"', inner @ .., b'"'] = bytes {
        let plain = !inner.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20);
        if let (true, Ok(text)) = (plain, std::str::from_utf8(inner)) {
            return Ok(text.to_owned());
        }
    }
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Decode(format!("{}: {e}", String::from_utf8_lossy(key))))
}

/// The live profile holding `(kind, value)`, if any: its id, and its state
/// unless `known` already holds it (read once per event, however many of
/// the event's identifiers it holds).
fn lookup(
    ctx: &Context<'_>,
    kind: &str,
    value: &str,
    known: &BTreeMap<String, ProfileState>,
) -> Result<Option<(String, Option<ProfileState>)>, StoreError> {
    let key = id_key(kind, value);
    let Some(mut profile_id) = ctx.get(&key)?.map(|b| pointer(&key, &b)).transpose()? else {
        return Ok(None);
    };
    for _ in 0..MAX_REDIRECT_HOPS {
        if known.contains_key(&profile_id) {
            // Only live profiles are kept.
            return Ok(Some((profile_id, None)));
        }
        let Some(state) = load(ctx, &profile_id)? else {
            // A dangling pointer: treat the identifier as new; writing
            // it repairs the pointer.
            return Ok(None);
        };
        match state.merged_into.clone() {
            Some(next) => profile_id = next,
            None => return Ok(Some((profile_id, Some(state)))),
        }
    }
    Ok(None)
}

/// The event's identifiers and what the graph knows of them.
#[derive(Debug)]
pub struct Known {
    /// Identifier → the live profile holding it.
    pub links: BTreeMap<Identifier, String>,
    pub profiles: BTreeMap<String, ProfileState>,
}

impl Known {
    pub fn read(ctx: &Context<'_>, ids: &BTreeSet<Identifier>) -> Result<Known, StoreError> {
        let mut links = BTreeMap::new();
        let mut profiles = BTreeMap::new();
        for id in ids {
            if let Some((profile_id, state)) = lookup(ctx, &id.0, &id.1, &profiles)? {
                links.insert(id.clone(), profile_id.clone());
                if let Some(state) = state {
                    profiles.insert(profile_id, state);
                }
            }
        }
        Ok(Known { links, profiles })
    }

    /// Whether any of `kept` is already in the graph.
    pub fn linked_any(&self, kept: &BTreeSet<Identifier>) -> bool {
        kept.iter().any(|id| self.links.contains_key(id))
    }

    /// The distinct profiles `kept` links, sorted: a list, not a set (an
    /// event links one profile or two; building a `BTreeSet` for them was
    /// ~1% of the identity stage).
    fn linked(&self, kept: &BTreeSet<Identifier>) -> Vec<&str> {
        let mut linked: Vec<&str> = kept
            .iter()
            .filter_map(|id| self.links.get(id).map(String::as_str))
            .collect();
        linked.sort_unstable();
        linked.dedup();
        linked
    }
}

/// A rule that resolving the kept identifiers would break.
struct Conflict<'a> {
    reason: DropReason,
    involved: Vec<&'a Identifier>,
}

/// The identifiers of `kept` that take part in a limit or merge conflict,
/// or `None` when resolving `kept` breaks no rule.
fn conflict<'a>(
    rules: &IdentityRules,
    kept: &'a BTreeSet<Identifier>,
    known: &Known,
) -> Option<Conflict<'a>> {
    let linked = known.linked(kept);
    let mut union: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut largest: BTreeMap<&str, usize> = BTreeMap::new();
    let mut merges: usize = 0;
    for profile in linked.iter().filter_map(|p| known.profiles.get(*p)) {
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
    // A type is over its limit only if this event makes it worse than the
    // fullest profile already is (a lowered limit does not orphan existing
    // profiles).
    let over: BTreeSet<&str> = union
        .iter()
        .filter(|(kind, values)| {
            values.len() > rules.limit(kind)
                && values.len() > largest.get(*kind).copied().unwrap_or(0)
        })
        .map(|(kind, _)| *kind)
        .collect();
    let too_many_merges =
        linked.len() > 1 && merges.saturating_add(linked.len() - 1) > rules.max_merges();
    if over.is_empty() && !too_many_merges {
        return None;
    }
    let involved = kept
        .iter()
        .filter(
            |id| match known.links.get(*id).and_then(|p| known.profiles.get(p)) {
                Some(profile) => {
                    too_many_merges
                        || profile
                            .identifiers
                            .keys()
                            .any(|k| over.contains(k.as_str()))
                }
                None => over.contains(id.0.as_str()),
            },
        )
        .collect();
    let reason = if over.is_empty() {
        DropReason::MaxMerges
    } else {
        DropReason::Limit
    };
    Some(Conflict { reason, involved })
}

/// Whether resolving `kept` certainly breaks no rule, decided without
/// building [`conflict`]'s sets: when the identifiers link at most one
/// profile (no merge), a type is over its limit exactly when the values
/// the event adds take the profile's count past the limit. `false` means
/// "ask [`conflict`]" (several profiles, or a type over its limit). Almost
/// every event links at most one profile, and building the sets was ~6%
/// of the identity stage.
fn conflict_free(rules: &IdentityRules, kept: &BTreeSet<Identifier>, known: &Known) -> bool {
    let mut linked: Option<&str> = None;
    for id in kept {
        match (known.links.get(id), linked) {
            (Some(p), None) => linked = Some(p),
            (Some(p), Some(q)) if p != q => return false,
            _ => {}
        }
    }
    let profile = linked.and_then(|p| known.profiles.get(p));
    let mut ids = kept.iter().peekable();
    while let Some((kind, _)) = ids.peek() {
        let kind = kind.as_str();
        let held: &[String] = profile
            .and_then(|p| p.identifiers.get(kind))
            .map_or(&[], Vec::as_slice);
        let mut count = held.len();
        while let Some((_, value)) = ids.next_if(|(k, _)| k == kind) {
            if !held.iter().any(|h| h == value) {
                count += 1;
            }
        }
        if count > rules.limit(kind) && count > held.len() {
            return false;
        }
    }
    true
}

/// Segment's rule: drop the weakest identifier involved in a conflict until
/// none is left. One identifier alone never conflicts, so at least one
/// always stays. Returns the kept identifiers and the dropped ones.
pub fn settle_conflicts(
    rules: &IdentityRules,
    ids: BTreeSet<Identifier>,
    known: &Known,
) -> (BTreeSet<Identifier>, Vec<DroppedIdentifier>) {
    if conflict_free(rules, &ids, known) {
        return (ids, Vec::new());
    }
    let mut kept = ids;
    let mut dropped = Vec::new();
    while let Some((reason, weakest)) = conflict(rules, &kept, known).map(|found| {
        let weakest = found
            .involved
            .into_iter()
            .max_by(|a, b| rules.strength(&a.0, &a.1).cmp(&rules.strength(&b.0, &b.1)))
            .cloned();
        (found.reason, weakest)
    }) {
        match weakest {
            Some(id) if kept.len() > 1 => {
                kept.remove(&id);
                dropped.push(DroppedIdentifier {
                    kind: id.0,
                    value: id.1,
                    reason: reason.as_str().to_string(),
                });
            }
            _ => break,
        }
    }
    // An identifier the profile the event lands on already holds was not
    // kept off it: it is not for the audit trail.
    let landing = known.linked(&kept);
    dropped.retain(|d| {
        let id = (d.kind.clone(), d.value.clone());
        known
            .links
            .get(&id)
            .is_none_or(|p| !landing.contains(&p.as_str()))
    });
    (kept, dropped)
}

/// Where the event goes and what changes, computed before any write.
pub struct Resolution {
    pub profile_id: String,
    pub profile: ProfileState,
    /// Identifiers whose `id/` key must point at `profile_id`.
    pub repoint: BTreeSet<Identifier>,
    /// Merged-away profiles: their final stored state, and the identifiers
    /// they held when merged (for the audit trail).
    pub merged: BTreeMap<String, (ProfileState, Identifiers)>,
    /// Whether `profile` differs from what the store holds.
    pub changed: bool,
}

/// The cause of a change, for the audit trail.
pub struct Provenance<'a> {
    pub at: Option<&'a str>,
    /// `at` as read (ms), when it reads as a time.
    pub at_ms: Option<i64>,
    pub message_id: Option<&'a str>,
}

/// A new profile for identifiers none of which is known.
pub fn create(
    ctx: &Context<'_>,
    rules: &IdentityRules,
    kept: &BTreeSet<Identifier>,
) -> Result<Option<Resolution>, StoreError> {
    let Some((kind, value)) = kept
        .iter()
        .min_by(|a, b| rules.strength(&a.0, &a.1).cmp(&rules.strength(&b.0, &b.1)))
    else {
        return Ok(None);
    };
    // Unused by construction (the strongest identifier of a new profile is
    // attached to it); the suffix guards a hash collision.
    let base = derived_profile_id(kind, value);
    let mut profile_id = base.clone();
    let mut n = 1;
    while ctx.get(&profile_key(&profile_id))?.is_some() {
        profile_id = format!("{base}_{n}");
        n += 1;
    }
    let mut profile = ProfileState::default();
    for (kind, value) in kept {
        profile.insert(kind, value);
    }
    Ok(Some(Resolution {
        profile_id,
        profile,
        repoint: kept.clone(),
        merged: BTreeMap::new(),
        changed: true,
    }))
}

/// Attach `kept` to the profiles it links, merging them into the one with
/// the strongest identifier. Takes `known` whole: the survivor's state is
/// moved out of it, not copied (a copy and a comparison with it were ~3%
/// of the identity stage), and `changed` is tracked as it is built.
pub fn attach(
    rules: &IdentityRules,
    kept: &BTreeSet<Identifier>,
    mut known: Known,
    cause: &Provenance<'_>,
) -> Option<Resolution> {
    let (survivor_id, others) = survivor_first(rules, kept, &known)?;
    let mut profile = known.profiles.remove(&survivor_id)?;
    let mut repoint: BTreeSet<Identifier> = kept
        .iter()
        .filter(|id| !known.links.contains_key(*id))
        .cloned()
        .collect();
    let mut changed = !others.is_empty();
    let mut merged = BTreeMap::new();
    for other_id in others {
        let Some(other) = known.profiles.remove(&other_id) else {
            continue;
        };
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
        profile.merged_from.push(MergedFrom {
            id: other_id.clone(),
            at: cause.at.map(String::from),
            message_id: cause.message_id.map(String::from),
        });
        let gone = ProfileState {
            identifiers: Identifiers::new(),
            merges: other.merges,
            merged_into: Some(survivor_id.clone()),
            merged_from: other.merged_from,
            dropped: other.dropped,
        };
        merged.insert(other_id, (gone, other.identifiers));
    }
    for (kind, value) in kept {
        changed |= profile.insert(kind, value);
    }
    Some(Resolution {
        profile_id: survivor_id,
        profile,
        repoint,
        merged,
        changed,
    })
}

/// The profiles `kept` links, the survivor first: the one with the
/// strongest identifier (a profile with none last, then by id).
fn survivor_first(
    rules: &IdentityRules,
    kept: &BTreeSet<Identifier>,
    known: &Known,
) -> Option<(String, Vec<String>)> {
    let mut candidates: Vec<(&str, &ProfileState)> = known
        .linked(kept)
        .into_iter()
        .filter_map(|p| known.profiles.get(p).map(|s| (p, s)))
        .collect();
    candidates.sort_by(|a, b| {
        let (sa, sb) = (a.1.strongest(rules), b.1.strongest(rules));
        (sa.is_none(), sa, a.0).cmp(&(sb.is_none(), sb, b.0))
    });
    let mut ids = candidates.into_iter().map(|(id, _)| id.to_string());
    let survivor = ids.next()?;
    Some((survivor, ids.collect()))
}

impl Resolution {
    /// Record the event's refused identifiers on the profile's audit trail.
    pub fn audit(&mut self, dropped: &[DroppedIdentifier], cause: &Provenance<'_>) {
        let before = self.profile.dropped.clone();
        for d in dropped {
            self.profile.audit(AuditDrop {
                identifier: d.clone(),
                at: cause.at.map(String::from),
                message_id: cause.message_id.map(String::from),
            });
        }
        if self.profile.dropped != before {
            self.changed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::identity::{IdentifierRule, IdentityConfig};

    const KINDS: [&str; 3] = ["user_id", "email", "anonymous_id"];

    fn rules() -> Result<IdentityRules, crate::config::ConfigError> {
        let rule = |limit, priority| IdentifierRule::new(limit, priority);
        let config = IdentityConfig {
            identifiers: BTreeMap::from([
                ("user_id".to_string(), rule(1, 1)),
                ("email".to_string(), rule(2, 2)),
                ("anonymous_id".to_string(), rule(3, 3)),
            ]),
            max_merges: 2,
            ..IdentityConfig::default()
        };
        IdentityRules::new(&config)
    }

    fn arb_id() -> impl Strategy<Value = Identifier> {
        (0..KINDS.len(), 0..4u8).prop_map(|(k, v)| (KINDS[k].to_string(), format!("v{v}")))
    }

    /// Up to three profiles, each holding some identifiers; the kept
    /// identifiers, each linked to one of them or to none.
    fn arb_case() -> impl Strategy<Value = (Known, BTreeSet<Identifier>)> {
        let profile = (prop::collection::btree_set(arb_id(), 0..6), 0..3usize);
        let kept = prop::collection::btree_set((arb_id(), prop::option::of(0..3usize)), 1..5);
        (prop::collection::vec(profile, 1..4), kept).prop_map(|(profiles, kept)| {
            let mut known = Known {
                links: BTreeMap::new(),
                profiles: BTreeMap::new(),
            };
            for (i, (ids, merges)) in profiles.iter().enumerate() {
                let mut state = ProfileState {
                    merges: *merges,
                    ..ProfileState::default()
                };
                for (kind, value) in ids {
                    state.insert(kind, value);
                }
                known.profiles.insert(format!("p{i}"), state);
            }
            let mut ids = BTreeSet::new();
            for (id, link) in kept {
                if let Some(p) = link.filter(|p| *p < profiles.len()) {
                    known.links.insert(id.clone(), format!("p{p}"));
                }
                ids.insert(id);
            }
            (known, ids)
        })
    }

    proptest! {
        /// A pointer reads as `serde_json` reads it: any string as written,
        /// any bytes to the same string or to an error.
        #[test]
        fn a_pointer_reads_as_json_does(text in "\\PC{0,16}", bytes in prop::collection::vec(any::<u8>(), 0..12)) {
            let written = serde_json::to_vec(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(pointer(b"id/k", &written).ok(), Some(text));
            let mut quoted = vec![b'"'];
            quoted.extend_from_slice(&bytes);
            quoted.push(b'"');
            for candidate in [bytes, quoted] {
                let ours = pointer(b"id/k", &candidate).ok();
                let theirs = serde_json::from_slice::<String>(&candidate).ok();
                prop_assert_eq!(ours, theirs);
            }
        }

        /// The shortcut never calls a conflicting resolution free, and
        /// without a merge it answers exactly as the full check does.
        #[test]
        fn the_shortcut_agrees_with_the_full_conflict_check((known, kept) in arb_case()) {
            let rules = rules().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let free = conflict_free(&rules, &kept, &known);
            let none = conflict(&rules, &kept, &known).is_none();
            if free {
                prop_assert!(none, "called free, but {kept:?} conflicts");
            }
            if known.linked(&kept).len() <= 1 {
                prop_assert_eq!(free, none);
            }
        }
    }
}
