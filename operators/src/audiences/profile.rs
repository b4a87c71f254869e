//! Everything the audiences stage keeps for one profile, and its evaluation.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::compile::{AudienceSet, Compiled, EventFilter};
use super::history::FilterHistory;
use crate::messages::{self, EventRead, Identifiers};
use crate::profile_keyed::{json_value_map, union_identifiers};
/// Everything the audiences stage keeps for one profile, under `profile/<id>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct AudienceProfile {
    #[serde(default)]
    pub(super) identifiers: Identifiers,
    /// Time of the last evaluation; never goes backwards.
    #[serde(default)]
    pub(super) clock: i64,
    /// Current trait values (computed and identify).
    #[serde(default, with = "json_value_map")]
    pub(super) traits: BTreeMap<String, Value>,
    /// Filter key → history.
    #[serde(default)]
    pub(super) events: BTreeMap<String, FilterHistory>,
    /// Audiences the profile is in.
    #[serde(default)]
    pub(super) members: BTreeSet<String>,
    /// The timer set for the next time-driven change.
    #[serde(default)]
    pub(super) timer: Option<i64>,
    /// Keys of the sequence conditions that have held: a sequence, once
    /// it happened, holds for good (its step times are only the latest).
    #[serde(default)]
    pub(super) sequences: BTreeSet<String>,
    /// The latest `traits_until` the traits stage announced: from then on
    /// a windowed trait value held here may be stale, so audiences that
    /// read traits keep their membership until the next update. Last in
    /// the struct: a state stored before it decodes with `None`.
    #[serde(default)]
    pub(super) traits_until: Option<i64>,
    /// No change of this profile is dated before this (ms): the latest of
    /// its events' times and its changes' `event_time`s. A function of the
    /// profile's own records, not of ticks, so a replay dates alike. Last
    /// in the struct, after `traits_until`, for the same reason.
    #[serde(default)]
    pub(super) changes_from: Option<i64>,
}

/// A trait's value by name. A dotted name no trait has whole reaches into
/// an object trait, as Segment's audience filters do: `address.city` is
/// the `city` of the `address` an `identify` sent.
pub(super) fn trait_value<'a>(
    traits: &'a BTreeMap<String, Value>,
    name: &str,
) -> Option<&'a Value> {
    if let Some(value) = traits.get(name) {
        return Some(value);
    }
    let mut parts = name.split('.');
    let mut value = traits.get(parts.next()?)?;
    for part in parts {
        value = value.as_object()?.get(part)?;
    }
    Some(value)
}

impl AudienceProfile {
    pub(super) fn record_event<E: EventRead + ?Sized>(
        &mut self,
        set: &AudienceSet,
        event: &E,
        time: i64,
    ) {
        let name = messages::event_name(event);
        for f in &set.filters {
            if f.selects(name, event) {
                self.record(f, time);
            }
        }
    }

    /// [`AudienceProfile::record_event`] for an event the traits stage
    /// matched: `matched` are the indexes of the filters it passed, in
    /// order ([`AudienceSet::matching_filters`]).
    pub(super) fn record_matched(&mut self, set: &AudienceSet, matched: &[u32], time: i64) {
        for &i in matched {
            if let Some(f) = usize::try_from(i).ok().and_then(|i| set.filters.get(i)) {
                self.record(f, time);
            }
        }
    }

    fn record(&mut self, f: &EventFilter, time: i64) {
        self.events
            .entry(f.key.clone())
            .or_default()
            .record(time, f, self.clock);
    }

    pub(super) fn prune(&mut self, set: &AudienceSet) {
        let clock = self.clock;
        // Histories of filters no longer configured go too.
        self.events
            .retain(|key, _| set.filters.iter().any(|f| f.key == *key));
        for f in &set.filters {
            if let Some(h) = self.events.get_mut(&f.key) {
                h.prune(f, clock);
            }
        }
        self.sequences
            .retain(|key| set.sequences.iter().any(|s| s.0 == *key));
    }

    /// A state written when sequence steps shared their filter with
    /// windows keeps exact times under the shared key: give the steps
    /// their copy before the window moves them into buckets.
    pub(super) fn upgrade_sequence_steps(&mut self, set: &AudienceSet) {
        if !self.events.values().any(|h| !h.times.is_empty()) {
            return;
        }
        for f in &set.filters {
            let Some(shared) = &f.shared_key else {
                continue;
            };
            if self.events.contains_key(&f.key) {
                continue;
            }
            let Some(times) = self.events.get(shared).map(|h| h.times.clone()) else {
                continue;
            };
            if !times.is_empty() {
                let count = times.len() as u64;
                let history = FilterHistory {
                    count,
                    times,
                    buckets: Vec::new(),
                };
                self.events.insert(f.key.clone(), history);
            }
        }
    }

    /// Mark every sequence that holds on the times kept now: before they
    /// are pruned, and for good.
    pub(super) fn remember_sequences(&mut self, set: &AudienceSet) {
        for (key, steps, within) in &set.sequences {
            if self.sequences.contains(key) {
                continue;
            }
            if self.sequence_holds(set, steps, *within) {
                self.sequences.insert(key.clone());
            }
        }
    }

    fn sequence_holds(&self, set: &AudienceSet, steps: &[usize], within: Option<i64>) -> bool {
        let empty = Vec::new();
        let steps: Vec<Step<'_>> = steps
            .iter()
            .map(|&f| Step {
                times: self
                    .history(set, f)
                    .map_or(empty.as_slice(), |h| h.times.as_slice()),
                event: set.filters.get(f).map_or("", |f| f.event.as_str()),
            })
            .collect();
        sequence_holds(&steps, within)
    }

    /// Fold a merged-away profile into this one (the survivor's trait
    /// values win where both have one).
    pub(super) fn merge(&mut self, other: AudienceProfile) {
        union_identifiers(&mut self.identifiers, &other.identifiers);
        self.clock = self.clock.max(other.clock);
        self.changes_from = self.changes_from.max(other.changes_from);
        self.sequences.extend(other.sequences);
        self.traits_until = match (self.traits_until, other.traits_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        for (name, value) in other.traits {
            self.traits.entry(name).or_insert(value);
        }
        for (key, theirs) in other.events {
            let mine = self.events.entry(key).or_default();
            mine.count = mine.count.saturating_add(theirs.count);
            mine.times.extend(theirs.times);
            mine.times.sort_unstable();
            for (start, n) in theirs.buckets {
                let i = mine.buckets.partition_point(|b| b.0 < start);
                match mine.buckets.get_mut(i) {
                    Some(b) if b.0 == start => b.1 = b.1.saturating_add(n),
                    _ => mine.buckets.insert(i, (start, n)),
                }
            }
        }
    }

    pub(super) fn history(&self, set: &AudienceSet, filter: usize) -> Option<&FilterHistory> {
        set.filters
            .get(filter)
            .and_then(|f| self.events.get(&f.key))
    }

    /// Whether `c` holds; `held`: the memberships of the audiences before
    /// this one in evaluation order (see [`AudienceProfile::evaluate`]).
    pub(super) fn holds(&self, set: &AudienceSet, c: &Compiled, now: i64, held: &[bool]) -> bool {
        match c {
            Compiled::All(cs) => cs.iter().all(|c| self.holds(set, c, now, held)),
            Compiled::Any(cs) => cs.iter().any(|c| self.holds(set, c, now, held)),
            Compiled::Not(c) => !self.holds(set, c, now, held),
            Compiled::Trait { name, op } => op.matches(trait_value(&self.traits, name)),
            Compiled::Event {
                filter,
                count,
                within,
            } => {
                let h = self.history(set, *filter);
                let n = match (h, within) {
                    (None, _) => 0,
                    (Some(h), None) => h.count,
                    (Some(h), Some(w)) => {
                        h.count_within(now, *w, set.filters.get(*filter).and_then(|f| f.width))
                    }
                };
                count.matches(n)
            }
            // A referenced audience comes earlier in the order.
            Compiled::Audience(name) => set
                .audiences
                .iter()
                .position(|(n, _)| n == name)
                .and_then(|i| held.get(i))
                .copied()
                .unwrap_or(false),
            Compiled::Sequence { key, steps, within } => {
                self.sequences.contains(key) || self.sequence_holds(set, steps, *within)
            }
        }
    }

    /// Memberships at `now`, one per audience in the set's (topological)
    /// order. Past `traits_until` the trait values may be stale (the traits
    /// stage's update for that time is on its way): an audience that reads
    /// traits, directly or through another audience, keeps its membership.
    pub(super) fn evaluate(&self, set: &AudienceSet, now: i64) -> Vec<bool> {
        let stale = self.traits_until.is_some_and(|until| now >= until);
        let mut held = Vec::with_capacity(set.audiences.len());
        for (name, a) in &set.audiences {
            let holds = if stale && !a.traits.is_empty() {
                self.members.contains(name)
            } else {
                self.holds(set, &a.condition, now, &held)
            };
            held.push(holds);
        }
        held
    }

    /// Make `members` the audiences `held` (as [`evaluate`](Self::evaluate)
    /// returned them) says. Unchanged, it is left as it is (no name copied).
    pub(super) fn set_members(&mut self, set: &AudienceSet, held: &[bool]) {
        let members = set
            .audiences
            .iter()
            .zip(held)
            .filter_map(|((name, _), &holds)| holds.then_some(name));
        let unchanged = members.clone().count() == self.members.len()
            && members.clone().all(|name| self.members.contains(name));
        if !unchanged {
            self.members = members.cloned().collect();
        }
    }

    /// The earliest time after `now` at which a windowed event condition can
    /// change: when its oldest event in the window ages out.
    pub(super) fn next_change(&self, set: &AudienceSet, now: i64) -> Option<i64> {
        set.windows
            .iter()
            .filter_map(|(filter, w)| {
                let h = self.history(set, *filter)?;
                h.next_expiry(now, *w, set.filters.get(*filter).and_then(|f| f.width))
            })
            .min()
    }
}

/// One step of a sequence: the times of its events, sorted, and the
/// event it names.
#[derive(Debug, Clone, Copy)]
pub(super) struct Step<'a> {
    pub(super) times: &'a [i64],
    pub(super) event: &'a str,
}

/// Whether events happened in the order of `steps`, each at or after the
/// one before, with the last at most `within` after the first. Steps in
/// the same millisecond must name different events: those are different
/// events for sure (SDKs stamp calls made back to back with the same
/// millisecond), where two steps of one name could be one event counted
/// twice. For each first-step time the earliest continuation is the best
/// one (it leaves every later step at least the choices a later one
/// would), so a greedy scan is exact.
pub(super) fn sequence_holds(steps: &[Step<'_>], within: Option<i64>) -> bool {
    let Some((first, rest)) = steps.split_first() else {
        return false;
    };
    // The events of the steps at the current millisecond.
    let mut same_ms: Vec<&str> = Vec::with_capacity(steps.len());
    for &start in first.times {
        let mut at = start;
        same_ms.clear();
        same_ms.push(first.event);
        for step in rest {
            let times = step.times;
            let next = if same_ms.contains(&step.event) {
                times.partition_point(|t| *t <= at)
            } else {
                times.partition_point(|t| *t < at)
            };
            match times.get(next) {
                Some(&t) => {
                    if t != at {
                        same_ms.clear();
                    }
                    same_ms.push(step.event);
                    at = t;
                }
                // No continuation now; a later start cannot have one either.
                None => return false,
            }
        }
        if within.is_none_or(|w| at.saturating_sub(start) <= w) {
            return true;
        }
    }
    false
}

impl crate::profile_keyed::Timed for AudienceProfile {
    fn clear_timer(&mut self) {
        self.timer = None;
    }

    fn advance_clock(&mut self, now: i64) {
        self.clock = self.clock.max(now);
    }
}
