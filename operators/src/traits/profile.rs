//! Everything the traits stage keeps for one profile, and its evaluation.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::{TraitDef, TraitSet};
use super::state::TraitState;
use crate::messages::{self, EventRead, Identifiers};
use crate::profile_keyed::{json_value, json_value_map, sorted_map, union_identifiers};

/// A profile trait set by `identify`, with the event time that set it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct StampedValue {
    pub(super) time: i64,
    #[serde(with = "json_value")]
    pub(super) value: Value,
}

/// Everything the traits stage keeps for one profile, under `profile/<id>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ProfileState {
    /// The profile's identifiers, as of its latest event.
    #[serde(default)]
    pub(super) identifiers: Identifiers,
    /// Time of the last evaluation; never goes backwards.
    #[serde(default)]
    pub(super) clock: i64,
    /// Computed trait name → state.
    #[serde(default, deserialize_with = "sorted_map")]
    pub(super) computed: BTreeMap<String, TraitState>,
    /// Identify traits: last write wins by event time (ties: by arrival).
    #[serde(default, deserialize_with = "sorted_map")]
    pub(super) profile_traits: BTreeMap<String, StampedValue>,
    /// The non-null values last sent downstream, to emit only changes.
    #[serde(default, with = "json_value_map")]
    pub(super) emitted: BTreeMap<String, Value>,
    /// The timer set for this profile's next window expiry.
    #[serde(default)]
    pub(super) timer: Option<i64>,
    /// [`TraitSet::fingerprint`] of the traits `emitted` was computed
    /// under (0: unknown, a state written before it was kept).
    #[serde(default)]
    pub(super) config: u64,
}

/// A profile's identifiers and trait values as the traits stage last sent
/// them downstream, from the stored value of its `profile/<id>` key (in
/// the stage's store or its changelog); `None` for a profile merged away
/// or waiting for its first input, or bytes that are no profile state.
pub fn stored_values(bytes: &[u8]) -> Option<(Identifiers, BTreeMap<String, Value>)> {
    let state: ProfileState = crate::profile_keyed::stored_state(bytes)?;
    Some((state.identifiers, state.emitted))
}

/// What one event did to a profile's state.
#[derive(Debug, Default)]
pub(super) struct Applied<'a> {
    /// Kinds of the traits whose per-profile limit dropped something.
    pub(super) limited: BTreeSet<&'static str>,
    /// The traits whose value the event may have changed: the computed
    /// traits it fed, the identify traits it set.
    pub(super) touched: Vec<&'a str>,
}

impl ProfileState {
    /// Drop states of traits no longer configured, of another type, or
    /// whose definition changed since the state was settled: `settled_under`
    /// gives the definitions' digests of the traits `config` names (see
    /// [`TraitSet::def_fingerprints`]), when the task recorded them; a
    /// state from a config it did not record is checked by type alone.
    /// A state last settled under these very traits (`config` is their
    /// fingerprint) holds none: only settling sets `config`, and between
    /// two settles a state gains computed states only from `apply_event`
    /// (configured traits) and merges (states conformed on arrival).
    pub(super) fn conform(
        &mut self,
        set: &TraitSet,
        settled_under: impl FnOnce(u64) -> Option<Arc<BTreeMap<String, u64>>>,
    ) {
        if self.config == set.fingerprint {
            return;
        }
        let before = settled_under(self.config);
        self.computed.retain(|name, state| {
            set.defs.get(name).is_some_and(|def| state.fits(def))
                && before
                    .as_ref()
                    .is_none_or(|defs| defs.get(name) == set.def_fingerprints.get(name))
        });
    }

    /// Apply one event.
    pub(super) fn apply_event<'a, E: EventRead + ?Sized>(
        &mut self,
        set: &'a TraitSet,
        event: &'a E,
        event_time: i64,
    ) -> Applied<'a> {
        let mut applied = Applied::default();
        let event_name = messages::event_name(event);
        let mut buffer = Vec::new();
        for (name, def) in &set.defs {
            if !def.selects(event_name, event) {
                continue;
            }
            let Some(text) = def.extract_into(event, &mut buffer) else {
                continue;
            };
            // The name is copied only for a trait the profile lacks.
            let state = match self.computed.get_mut(name) {
                Some(state) => state,
                None => self
                    .computed
                    .entry(name.clone())
                    .or_insert_with(|| TraitState::empty(def)),
            };
            let added = state.add(def, event_time, text);
            // A trait whose value the event cannot have changed is not
            // recomputed (see `TraitState::add`).
            if added.changed {
                applied.touched.push(name);
            }
            if added.dropped {
                applied.limited.insert(def.kind());
            }
        }
        if event.field("type").and_then(Value::as_str) == Some("identify") {
            // RudderStack SDKs send identify traits in `context.traits`,
            // Segment's in `traits`; the top-level ones win a clash.
            let places = [event.lookup("context.traits"), event.field("traits")];
            for traits in places.into_iter().flatten().filter_map(Value::as_object) {
                for (name, value) in traits {
                    if self
                        .profile_traits
                        .get(name)
                        .is_some_and(|s| s.time > event_time)
                    {
                        continue;
                    }
                    applied.touched.push(name);
                    self.profile_traits.insert(
                        name.clone(),
                        StampedValue {
                            time: event_time,
                            value: value.clone(),
                        },
                    );
                }
            }
        }
        applied
    }

    /// Fold `other` (a merged-away profile) into this one.
    pub(super) fn merge(&mut self, set: &TraitSet, other: ProfileState) {
        union_identifiers(&mut self.identifiers, &other.identifiers);
        self.clock = self.clock.max(other.clock);
        for (name, def) in &set.defs {
            let merged = match (self.computed.remove(name), other.computed.get(name)) {
                (Some(a), Some(b)) => a.merge(def, b),
                (Some(a), None) => a,
                (None, Some(b)) => b.clone(),
                (None, None) => continue,
            };
            self.computed.insert(name.clone(), merged);
        }
        for (name, theirs) in other.profile_traits {
            // Ties keep the survivor's value.
            if self
                .profile_traits
                .get(&name)
                .is_some_and(|mine| mine.time >= theirs.time)
            {
                continue;
            }
            self.profile_traits.insert(name, theirs);
        }
    }

    /// Every non-null trait value at `now`. Computed traits shadow identify
    /// traits of the same name.
    pub(super) fn values(&self, set: &TraitSet, now: i64) -> BTreeMap<String, Value> {
        let mut out: BTreeMap<String, Value> = self
            .profile_traits
            .iter()
            .filter(|(name, s)| !s.value.is_null() && !set.defs.contains_key(*name))
            .map(|(name, s)| (name.clone(), s.value.clone()))
            .collect();
        for (name, def) in &set.defs {
            let value = match self.computed.get(name) {
                Some(state) => state.value(def, now),
                None => TraitState::empty(def).value(def, now),
            };
            if !value.is_null() {
                out.insert(name.clone(), value);
            }
        }
        out
    }

    /// Prune windows at `now` and return the traits whose value differs from
    /// what was last emitted (`null`: no value any more).
    pub(super) fn refresh(&mut self, set: &TraitSet, now: i64) -> BTreeMap<String, Value> {
        for (name, def) in &set.defs {
            if let Some(state) = self.computed.get_mut(name) {
                state.prune(def, now);
            }
        }
        let current = self.values(set, now);
        let mut changed: BTreeMap<String, Value> = current
            .iter()
            .filter(|(name, value)| self.emitted.get(*name) != Some(*value))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        for name in self.emitted.keys() {
            if !current.contains_key(name) {
                changed.insert(name.clone(), Value::Null);
            }
        }
        self.emitted = current;
        self.config = set.fingerprint;
        changed
    }

    /// [`refresh`](Self::refresh) after an event, computing only the
    /// values that can have changed: the `touched` traits and the windowed
    /// ones that lost a bucket. Every other value is what was last emitted
    /// (values depend on state, and a window's on its buckets only once
    /// pruned) — unless the traits were configured otherwise then, which
    /// takes a full refresh.
    pub(super) fn refresh_touched(
        &mut self,
        set: &TraitSet,
        now: i64,
        touched: &[&str],
    ) -> BTreeMap<String, Value> {
        if self.config != set.fingerprint {
            return self.refresh(set, now);
        }
        // One walk of the computed states (in name order, beside their
        // definitions): each is pruned, and valued again if the event fed
        // it or it lost a bucket. Looking each dirty name up in three maps
        // afterwards was a third of this function.
        let mut changed = BTreeMap::new();
        let mut valued: Vec<&str> = Vec::with_capacity(touched.len());
        for (name, def, state) in with_defs(set, self.computed.iter_mut()) {
            let fed = touched.contains(&name);
            if state.prune(def, now) || fed {
                note_value(&mut self.emitted, &mut changed, name, state.value(def, now));
            }
            if fed {
                valued.push(name);
            }
        }
        // The identify traits the event set (and any touched name without a
        // computed state).
        for &name in touched {
            if !valued.contains(&name) {
                valued.push(name);
                let value = self.value_of(set, name, now);
                note_value(&mut self.emitted, &mut changed, name, value);
            }
        }
        changed
    }

    /// One trait's value at `now` (`null`: none), as [`values`](Self::values)
    /// has it.
    fn value_of(&self, set: &TraitSet, name: &str, now: i64) -> Value {
        match set.defs.get(name) {
            Some(def) => match self.computed.get(name) {
                Some(state) => state.value(def, now),
                None => TraitState::empty(def).value(def, now),
            },
            None => self
                .profile_traits
                .get(name)
                .map_or(Value::Null, |s| s.value.clone()),
        }
    }

    pub(super) fn next_expiry(&self, set: &TraitSet) -> Option<i64> {
        with_defs(set, self.computed.iter())
            .filter_map(|(_, def, state)| state.next_expiry(def))
            .min()
    }
}

/// Record `value` as `name`'s value now: into `changed` if it differs from
/// what was emitted last (`null`: it has none any more), and as emitted.
fn note_value(
    emitted: &mut BTreeMap<String, Value>,
    changed: &mut BTreeMap<String, Value>,
    name: &str,
    value: Value,
) {
    match value {
        Value::Null => {
            if emitted.remove(name).is_some() {
                changed.insert(name.to_owned(), Value::Null);
            }
        }
        // A value emitted before is replaced in place (its name not
        // copied again).
        value => match emitted.get_mut(name) {
            Some(emitted) if *emitted == value => {}
            Some(emitted) => {
                emitted.clone_from(&value);
                changed.insert(name.to_owned(), value);
            }
            None => {
                emitted.insert(name.to_owned(), value.clone());
                changed.insert(name.to_owned(), value);
            }
        },
    }
}

/// Each computed state with its trait's name and definition, in one walk
/// of both maps in name order: `computed` holds configured traits only
/// (see [`ProfileState::conform`]), so no lookup by name is needed.
fn with_defs<'s, 'c, S, I>(
    set: &'s TraitSet,
    computed: I,
) -> impl Iterator<Item = (&'s str, &'s TraitDef, S)> + use<'s, 'c, S, I>
where
    I: IntoIterator<Item = (&'c String, S)>,
{
    let mut defs = set.defs.iter();
    computed.into_iter().map_while(move |(name, state)| {
        defs.by_ref()
            .find(|(def, _)| *def == name)
            .map(|(name, def)| (name.as_str(), def, state))
    })
}

impl crate::profile_keyed::Timed for ProfileState {
    fn clear_timer(&mut self) {
        self.timer = None;
    }

    fn advance_clock(&mut self, now: i64) {
        self.clock = self.clock.max(now);
    }
}
