//! Mergeable state of one computed trait.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Value};

use super::config::{AggregateFunction, TraitDef};
use super::window::{bucket_counts, bucket_start, bucket_width};

/// Fixed-point scale of aggregation sums: 10⁻⁹ units.
const UNITS: f64 = 1e9;
const UNITS_INT: i128 = 1_000_000_000;

/// A value in fixed-point units. Rounding happens once per value, before
/// any addition, so sums are exact, commutative and associative. Values are
/// clamped to ±10¹⁸.
fn to_units(x: f64) -> i128 {
    (x.clamp(-1e18, 1e18) * UNITS).round() as i128
}

fn units_to_f64(u: i128) -> f64 {
    u as f64 / UNITS
}

/// A JSON number, integral when the float is.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        json!(x as i64)
    } else {
        serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
}

fn units_value(u: i128) -> Value {
    if u % UNITS_INT == 0 {
        if let Ok(whole) = i64::try_from(u / UNITS_INT) {
            return json!(whole);
        }
    }
    number(units_to_f64(u))
}

/// JSON text back to the value it was made from.
fn parse_text(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// `i128` as a decimal string: JSON numbers (and `serde_json::Value`) stop
/// at 64 bits.
mod units_text {
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &i128, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// The state of one computed trait of one profile. Values are kept as
/// their JSON text so they order and compare exactly. Serialized as
/// [`Tagged`] in JSON and as [`Compact`] in the store's binary encoding
/// (see [`crate::profile_keyed`]'s `encoding`).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum TraitState {
    /// All-time event counter.
    Counter { count: u64 },
    /// All-time aggregation: enough for every function.
    Aggregation {
        count: u64,
        sum: i128,
        min: Option<f64>,
        max: Option<f64>,
    },
    /// All-time value → number of events.
    MostFrequent { counts: BTreeMap<String, u64> },
    /// Earliest `(event time, value)`.
    First { at: Option<(i64, String)> },
    /// Latest `(event time, value)`.
    Last { at: Option<(i64, String)> },
    /// Distinct value → event time of its latest occurrence: the `limit`
    /// most recent (ties: the larger value).
    UniqueList { latest: BTreeMap<String, i64> },
    /// The `limit` smallest distinct values.
    UniqueCount { values: BTreeSet<String> },
    /// Any windowed trait: the all-time state of each time bucket (start →
    /// state) still in the window; see [`bucket_width`]. The value is the
    /// merge of the buckets in the window, folded on demand.
    Window { buckets: BTreeMap<i64, TraitState> },
}

/// The JSON form of a [`TraitState`]: tagged by `kind` (states written
/// before the binary encoding, and transfers).
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Tagged {
    Counter {
        count: u64,
    },
    Aggregation {
        count: u64,
        #[serde(with = "units_text")]
        sum: i128,
        min: Option<f64>,
        max: Option<f64>,
    },
    MostFrequent {
        counts: BTreeMap<String, u64>,
    },
    First {
        at: Option<(i64, String)>,
    },
    Last {
        at: Option<(i64, String)>,
    },
    UniqueList {
        latest: BTreeMap<String, i64>,
    },
    UniqueCount {
        values: BTreeSet<String>,
    },
    Window {
        #[serde(with = "bucket_pairs")]
        buckets: BTreeMap<i64, TraitState>,
    },
}

/// The binary form of a [`TraitState`]: externally tagged by variant
/// index, one field tuple per variant. Serialized by hand from a borrow
/// (in [`TraitState`]'s `Serialize`), in this order.
#[derive(Deserialize)]
enum Compact {
    Counter(u64),
    Aggregation((u64, i128, Option<f64>, Option<f64>)),
    MostFrequent(BTreeMap<String, u64>),
    First(Option<(i64, String)>),
    Last(Option<(i64, String)>),
    UniqueList(BTreeMap<String, i64>),
    UniqueCount(BTreeSet<String>),
    Window(BTreeMap<i64, TraitState>),
}

impl From<Tagged> for TraitState {
    fn from(t: Tagged) -> Self {
        match t {
            Tagged::Counter { count } => TraitState::Counter { count },
            Tagged::Aggregation {
                count,
                sum,
                min,
                max,
            } => TraitState::Aggregation {
                count,
                sum,
                min,
                max,
            },
            Tagged::MostFrequent { counts } => TraitState::MostFrequent { counts },
            Tagged::First { at } => TraitState::First { at },
            Tagged::Last { at } => TraitState::Last { at },
            Tagged::UniqueList { latest } => TraitState::UniqueList { latest },
            Tagged::UniqueCount { values } => TraitState::UniqueCount { values },
            Tagged::Window { buckets } => TraitState::Window { buckets },
        }
    }
}

impl From<TraitState> for Tagged {
    fn from(t: TraitState) -> Self {
        match t {
            TraitState::Counter { count } => Tagged::Counter { count },
            TraitState::Aggregation {
                count,
                sum,
                min,
                max,
            } => Tagged::Aggregation {
                count,
                sum,
                min,
                max,
            },
            TraitState::MostFrequent { counts } => Tagged::MostFrequent { counts },
            TraitState::First { at } => Tagged::First { at },
            TraitState::Last { at } => Tagged::Last { at },
            TraitState::UniqueList { latest } => Tagged::UniqueList { latest },
            TraitState::UniqueCount { values } => Tagged::UniqueCount { values },
            TraitState::Window { buckets } => Tagged::Window { buckets },
        }
    }
}

impl From<Compact> for TraitState {
    fn from(c: Compact) -> Self {
        match c {
            Compact::Counter(count) => TraitState::Counter { count },
            Compact::Aggregation((count, sum, min, max)) => TraitState::Aggregation {
                count,
                sum,
                min,
                max,
            },
            Compact::MostFrequent(counts) => TraitState::MostFrequent { counts },
            Compact::First(at) => TraitState::First { at },
            Compact::Last(at) => TraitState::Last { at },
            Compact::UniqueList(latest) => TraitState::UniqueList { latest },
            Compact::UniqueCount(values) => TraitState::UniqueCount { values },
            Compact::Window(buckets) => TraitState::Window { buckets },
        }
    }
}

impl Serialize for TraitState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            // JSON is for transfers and tests: a copy is cheap enough.
            return Tagged::from(self.clone()).serialize(s);
        }
        // [`Compact`]'s variants, by index.
        const NAME: &str = "Compact";
        match self {
            TraitState::Counter { count } => s.serialize_newtype_variant(NAME, 0, "Counter", count),
            TraitState::Aggregation {
                count,
                sum,
                min,
                max,
            } => s.serialize_newtype_variant(NAME, 1, "Aggregation", &(count, sum, min, max)),
            TraitState::MostFrequent { counts } => {
                s.serialize_newtype_variant(NAME, 2, "MostFrequent", counts)
            }
            TraitState::First { at } => s.serialize_newtype_variant(NAME, 3, "First", at),
            TraitState::Last { at } => s.serialize_newtype_variant(NAME, 4, "Last", at),
            TraitState::UniqueList { latest } => {
                s.serialize_newtype_variant(NAME, 5, "UniqueList", latest)
            }
            TraitState::UniqueCount { values } => {
                s.serialize_newtype_variant(NAME, 6, "UniqueCount", values)
            }
            TraitState::Window { buckets } => {
                s.serialize_newtype_variant(NAME, 7, "Window", buckets)
            }
        }
    }
}

impl<'de> Deserialize<'de> for TraitState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            Tagged::deserialize(d).map(TraitState::from)
        } else {
            Compact::deserialize(d).map(TraitState::from)
        }
    }
}

/// Buckets as `[[start, state], ...]`: JSON object keys are strings, and
/// an internally tagged enum cannot turn them back into numbers.
mod bucket_pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::TraitState;

    pub fn serialize<S: Serializer>(
        buckets: &BTreeMap<i64, TraitState>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(buckets.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<i64, TraitState>, D::Error> {
        Ok(Vec::<(i64, TraitState)>::deserialize(d)?
            .into_iter()
            .collect())
    }
}

/// Most bytes of value text one trait keeps per profile (its all-time
/// state, or all of a window's buckets): with a value-keeping trait's
/// `limit` it bounds a profile's state in bytes, not only in values, so
/// 1,000 distinct 1 KB URLs in a `most_frequent` (a crawler) cannot grow
/// the state record past the broker's limit (that stopped the stage).
/// Values are dropped by the trait's own rule; a single value longer than
/// this is not kept. `cdp_state_limit_hits_total` counts the drops.
pub const MAX_KEPT_BYTES: usize = 32 * 1024;

impl TraitState {
    /// The state of no events.
    pub(super) fn empty(def: &TraitDef) -> Self {
        if def.window().is_some() {
            TraitState::Window {
                buckets: BTreeMap::new(),
            }
        } else {
            Self::all_time(def)
        }
    }

    pub(super) fn all_time(def: &TraitDef) -> Self {
        match def {
            TraitDef::EventCounter(_) => TraitState::Counter { count: 0 },
            TraitDef::Aggregation(_) => TraitState::Aggregation {
                count: 0,
                sum: 0,
                min: None,
                max: None,
            },
            TraitDef::MostFrequent(_) => TraitState::MostFrequent {
                counts: BTreeMap::new(),
            },
            TraitDef::First(_) => TraitState::First { at: None },
            TraitDef::Last(_) => TraitState::Last { at: None },
            TraitDef::UniqueList(_) => TraitState::UniqueList {
                latest: BTreeMap::new(),
            },
            TraitDef::UniqueCount(_) => TraitState::UniqueCount {
                values: BTreeSet::new(),
            },
        }
    }

    /// Whether this state belongs to `def` (a config change may alter a
    /// trait's type; its old state is then dropped).
    pub(super) fn fits(&self, def: &TraitDef) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(&Self::empty(def))
    }

    /// Record one event's value (JSON text, see [`TraitDef::extract`]).
    pub(super) fn add(&mut self, def: &TraitDef, time: i64, text: &str) -> Added {
        let mut added = Added {
            dropped: false,
            changed: true,
            grew: false,
        };
        if text.len() > MAX_KEPT_BYTES && def.keeps_values() {
            // One value past the whole budget is not kept at all.
            return Added {
                dropped: true,
                changed: false,
                grew: false,
            };
        }
        match self {
            TraitState::Counter { count } => *count = count.saturating_add(1),
            TraitState::Aggregation {
                count,
                sum,
                min,
                max,
            } => {
                let x = match text.parse::<f64>() {
                    Ok(x) if x.is_finite() => x,
                    // Not a number: the state is as it was.
                    _ => return Added::NOTHING,
                };
                *count = count.saturating_add(1);
                *sum = sum.saturating_add(to_units(x));
                *min = Some(min.map_or(x, |m| m.min(x)));
                *max = Some(max.map_or(x, |m| m.max(x)));
            }
            TraitState::MostFrequent { counts } => {
                // The value is the most frequent text (ties: the smallest):
                // one more of `text` changes it only if `text` overtakes it
                // (or takes a dropped value's place, then it is looked up).
                let (best_text, best_count) = most_frequent(counts).unwrap_or(("", 0));
                let was_best = best_count > 0 && best_text == text;
                let wins_tie = best_count == 0 || text < best_text;
                // Kept only when a value may be dropped for this one.
                let evicting = counts.len() >= def.limit() && !counts.contains_key(text);
                let best_text = evicting.then(|| best_text.to_owned());
                let count = match counts.get_mut(text) {
                    Some(c) => {
                        *c = c.saturating_add(1);
                        *c
                    }
                    None => {
                        added.grew = true;
                        added.dropped = count_new_value(counts, text, def.limit());
                        counts.get(text).copied().unwrap_or(0)
                    }
                };
                added.changed = if added.dropped {
                    most_frequent(counts).map(|(v, _)| v) != best_text.as_deref()
                } else {
                    !was_best && (count > best_count || (count == best_count && wins_tie))
                };
            }
            TraitState::First { at } => added.changed = keep_if(at, time, text, Ordering::Less),
            TraitState::Last { at } => added.changed = keep_if(at, time, text, Ordering::Greater),
            // The value is the set of kept texts: a text already kept (a
            // newer time for it, nothing evicted) leaves it as it was.
            TraitState::UniqueList { latest } => {
                let known = match latest.get_mut(text) {
                    Some(t) => {
                        *t = (*t).max(time);
                        true
                    }
                    None => {
                        latest.insert(text.to_owned(), time);
                        false
                    }
                };
                keep_most_recent(latest, def.limit());
                added.changed = !known;
                added.grew = !known;
            }
            TraitState::UniqueCount { values } => {
                let before = values.len();
                if !values.contains(text) {
                    values.insert(text.to_owned());
                    added.grew = true;
                }
                added.dropped = truncate(values, def.limit());
                added.changed = values.len() != before;
            }
            // A window's value merges its buckets: a bucket's times count
            // (the latest `last` across buckets), so any add may change it.
            TraitState::Window { buckets } => {
                let width = def.window().map_or(1, bucket_width);
                let inner = buckets
                    .entry(bucket_start(time, width))
                    .or_insert_with(|| Self::all_time(def))
                    .add(def, time, text);
                added.dropped = inner.dropped;
                added.grew = inner.grew;
            }
        }
        // Only a new text can take the kept texts past the budget (`first`
        // and `last` keep one, never longer than it).
        if added.grew && self.fit_bytes() {
            added.dropped = true;
            added.changed = true;
        }
        added
    }

    /// Bytes of value text the state keeps.
    fn kept_bytes(&self) -> usize {
        match self {
            TraitState::Counter { .. } | TraitState::Aggregation { .. } => 0,
            TraitState::MostFrequent { counts } => counts.keys().map(String::len).sum(),
            TraitState::First { at } | TraitState::Last { at } => {
                at.as_ref().map_or(0, |(_, v)| v.len())
            }
            TraitState::UniqueList { latest } => latest.keys().map(String::len).sum(),
            TraitState::UniqueCount { values } => values.iter().map(String::len).sum(),
            TraitState::Window { buckets } => buckets.values().map(TraitState::kept_bytes).sum(),
        }
    }

    /// Drop one kept value by the trait's own rule (the least frequent,
    /// the least recent, the largest; a window's from its oldest bucket
    /// first); `false` when there is none.
    fn evict_one(&mut self) -> bool {
        match self {
            TraitState::Counter { .. } | TraitState::Aggregation { .. } => false,
            TraitState::MostFrequent { counts } => {
                let before = counts.len();
                keep_most_frequent(counts, before.saturating_sub(1));
                counts.len() < before
            }
            TraitState::First { at } | TraitState::Last { at } => at.take().is_some(),
            TraitState::UniqueList { latest } => {
                let before = latest.len();
                keep_most_recent(latest, before.saturating_sub(1));
                latest.len() < before
            }
            TraitState::UniqueCount { values } => values.pop_last().is_some(),
            TraitState::Window { buckets } => buckets.values_mut().any(TraitState::evict_one),
        }
    }

    /// Keep at most [`MAX_KEPT_BYTES`] of value text, dropping values by
    /// the trait's rule; whether any was dropped.
    fn fit_bytes(&mut self) -> bool {
        let mut bytes = self.kept_bytes();
        if bytes <= MAX_KEPT_BYTES {
            return false;
        }
        while bytes > MAX_KEPT_BYTES && self.evict_one() {
            bytes = self.kept_bytes();
        }
        true
    }

    /// The state of the union of both states' events. Commutative and
    /// associative; a state of another type than `self` is ignored.
    pub(super) fn merge(&self, def: &TraitDef, other: &TraitState) -> TraitState {
        let mut merged = self.merge_unbounded(def, other);
        if def.keeps_values() {
            merged.fit_bytes();
        }
        merged
    }

    fn merge_unbounded(&self, def: &TraitDef, other: &TraitState) -> TraitState {
        match (self, other) {
            (TraitState::Counter { count: a }, TraitState::Counter { count: b }) => {
                TraitState::Counter {
                    count: a.saturating_add(*b),
                }
            }
            (
                TraitState::Aggregation {
                    count: c1,
                    sum: s1,
                    min: lo1,
                    max: hi1,
                },
                TraitState::Aggregation {
                    count: c2,
                    sum: s2,
                    min: lo2,
                    max: hi2,
                },
            ) => TraitState::Aggregation {
                count: c1.saturating_add(*c2),
                sum: s1.saturating_add(*s2),
                min: merge_opt(*lo1, *lo2, f64::min),
                max: merge_opt(*hi1, *hi2, f64::max),
            },
            (TraitState::MostFrequent { counts: a }, TraitState::MostFrequent { counts: b }) => {
                let mut counts = a.clone();
                for (value, n) in b {
                    let c = counts.entry(value.clone()).or_insert(0);
                    *c = c.saturating_add(*n);
                }
                keep_most_frequent(&mut counts, def.limit());
                TraitState::MostFrequent { counts }
            }
            (TraitState::First { at: a }, TraitState::First { at: b }) => TraitState::First {
                at: match (a, b) {
                    (Some(x), Some(y)) => Some(x.min(y).clone()),
                    (x, y) => x.clone().or_else(|| y.clone()),
                },
            },
            (TraitState::Last { at: a }, TraitState::Last { at: b }) => TraitState::Last {
                at: match (a, b) {
                    (Some(x), Some(y)) => Some(x.max(y).clone()),
                    (x, y) => x.clone().or_else(|| y.clone()),
                },
            },
            (TraitState::UniqueList { latest: a }, TraitState::UniqueList { latest: b }) => {
                let mut latest = a.clone();
                for (value, t) in b {
                    let mine = latest.entry(value.clone()).or_insert(*t);
                    *mine = (*mine).max(*t);
                }
                keep_most_recent(&mut latest, def.limit());
                TraitState::UniqueList { latest }
            }
            (TraitState::UniqueCount { values: a }, TraitState::UniqueCount { values: b }) => {
                let mut values: BTreeSet<String> = a.union(b).cloned().collect();
                truncate(&mut values, def.limit());
                TraitState::UniqueCount { values }
            }
            (TraitState::Window { buckets: a }, TraitState::Window { buckets: b }) => {
                let mut buckets = a.clone();
                for (start, theirs) in b {
                    let merged = match buckets.get(start) {
                        Some(mine) => mine.merge(def, theirs),
                        None => theirs.clone(),
                    };
                    buckets.insert(*start, merged);
                }
                TraitState::Window { buckets }
            }
            _ => self.clone(),
        }
    }

    /// Drop buckets that are out of the window at `now`; whether any was.
    pub(super) fn prune(&mut self, def: &TraitDef, now: i64) -> bool {
        if let (TraitState::Window { buckets }, Some(w)) = (self, def.window()) {
            let width = bucket_width(w);
            let before = buckets.len();
            buckets.retain(|start, _| bucket_counts(*start, width, w, now));
            return buckets.len() != before;
        }
        false
    }

    /// The trait's value at `now` (`null` when it has none).
    pub(super) fn value(&self, def: &TraitDef, now: i64) -> Value {
        match self {
            TraitState::Counter { count } => json!(count),
            TraitState::Aggregation {
                count,
                sum,
                min,
                max,
            } => match def {
                TraitDef::Aggregation(a) => match a.function {
                    AggregateFunction::Sum => units_value(*sum),
                    AggregateFunction::Avg if *count > 0 => {
                        number(units_to_f64(*sum) / *count as f64)
                    }
                    AggregateFunction::Avg => Value::Null,
                    AggregateFunction::Min => min.map_or(Value::Null, number),
                    AggregateFunction::Max => max.map_or(Value::Null, number),
                },
                _ => Value::Null,
            },
            TraitState::MostFrequent { counts } => {
                most_frequent(counts).map_or(Value::Null, |(v, _)| parse_text(v))
            }
            TraitState::First { at } | TraitState::Last { at } => {
                at.as_ref().map_or(Value::Null, |(_, v)| parse_text(v))
            }
            TraitState::UniqueList { latest } => Value::Array(
                latest
                    .keys()
                    .take(def.limit())
                    .map(|v| parse_text(v))
                    .collect(),
            ),
            TraitState::UniqueCount { values } => json!(values.len().min(def.limit())),
            TraitState::Window { buckets } => {
                let mut acc = Self::all_time(def);
                for (start, state) in buckets {
                    let counts = def
                        .window()
                        .is_none_or(|w| bucket_counts(*start, bucket_width(w), w, now));
                    if counts {
                        acc = acc.merge(def, state);
                    }
                }
                acc.value(def, now)
            }
        }
    }

    /// When the oldest window entry leaves the window (after a prune, every
    /// entry is still inside).
    pub(super) fn next_expiry(&self, def: &TraitDef) -> Option<i64> {
        match (self, def.window()) {
            (TraitState::Window { buckets }, Some(w)) => buckets
                .keys()
                .next()
                .map(|start| start.saturating_add(bucket_width(w) - 1).saturating_add(w)),
            _ => None,
        }
    }
}

/// The most frequent text and its count; ties go to the smallest text
/// (ascending key order and a strict `>`).
fn most_frequent(counts: &BTreeMap<String, u64>) -> Option<(&str, u64)> {
    let mut best: Option<(&str, u64)> = None;
    for (value, n) in counts {
        if best.is_none_or(|(_, m)| *n > m) {
            best = Some((value, *n));
        }
    }
    best
}

fn merge_opt(a: Option<f64>, b: Option<f64>, f: fn(f64, f64) -> f64) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(f(x, y)),
        (x, y) => x.or(y),
    }
}

/// What [`TraitState::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Added {
    /// A per-profile limit dropped something.
    pub(super) dropped: bool,
    /// The trait's value may have changed; `false` only where it cannot
    /// have (the stage then does not recompute it).
    pub(super) changed: bool,
    /// A text not kept before was kept (the kept bytes may have grown).
    grew: bool,
}

impl Added {
    /// The event left the state as it was.
    const NOTHING: Added = Added {
        dropped: false,
        changed: false,
        grew: false,
    };
}

/// A `first` (`Less`) or `last` (`Greater`): keep `(time, text)` if it
/// orders `side` of the kept one. Whether the value (the kept text)
/// changed: an earlier (later) time with the same text leaves it as it was.
fn keep_if(at: &mut Option<(i64, String)>, time: i64, text: &str, side: Ordering) -> bool {
    let replaces = at
        .as_ref()
        .is_none_or(|(t, v)| (time, text).cmp(&(*t, v.as_str())) == side);
    if !replaces {
        return false;
    }
    let changed = at.as_ref().is_none_or(|(_, v)| v != text);
    *at = Some((time, text.to_owned()));
    changed
}

/// Drop the least recent values (smallest `(time, value)`) beyond `limit`.
fn keep_most_recent(latest: &mut BTreeMap<String, i64>, limit: usize) {
    while latest.len() > limit {
        let oldest = latest
            .iter()
            .min_by(|(v1, t1), (v2, t2)| (t1, v1).cmp(&(t2, v2)))
            .map(|(v, _)| v.clone());
        match oldest {
            Some(v) => latest.remove(&v),
            None => return,
        };
    }
}

/// Keep the `limit` smallest values; whether any was dropped.
fn truncate(values: &mut BTreeSet<String>, limit: usize) -> bool {
    let dropped = values.len() > limit;
    while values.len() > limit {
        values.pop_last();
    }
    dropped
}

/// Count a value not in the table. Under `limit` distinct values it
/// starts at 1. At the limit it takes the place of the least frequent
/// value (ties: the largest) with that value's count plus one: the
/// Space-Saving rule (Metwally et al., 2005). Counts then over-estimate a
/// value by at most the count it took over, and every value seen more than
/// `n / limit` times of a profile's `n` stays in the table: a clear winner
/// is found however many other values pass by. Whether one was dropped.
fn count_new_value(counts: &mut BTreeMap<String, u64>, text: &str, limit: usize) -> bool {
    if counts.len() < limit {
        counts.insert(text.to_owned(), 1);
        return false;
    }
    if let Some((value, n)) = least_frequent(counts) {
        counts.remove(&value);
        counts.insert(text.to_owned(), n.saturating_add(1));
    }
    true
}

/// The least frequent value (ties: the largest) and its count.
fn least_frequent(counts: &BTreeMap<String, u64>) -> Option<(String, u64)> {
    counts
        .iter()
        .min_by(|(v1, n1), (v2, n2)| n1.cmp(n2).then_with(|| v2.cmp(v1)))
        .map(|(v, n)| (v.clone(), *n))
}

/// Drop the least frequent values (ties: the largest) beyond `limit`;
/// whether any was dropped.
fn keep_most_frequent(counts: &mut BTreeMap<String, u64>, limit: usize) -> bool {
    let dropped = counts.len() > limit;
    while counts.len() > limit {
        match least_frequent(counts) {
            Some((v, _)) => counts.remove(&v),
            None => break,
        };
    }
    dropped
}
