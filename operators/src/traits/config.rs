//! The `traits` config section: trait definitions and the checked set.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use cdp_pipeline::Span;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::comparison::{PropertyCondition, ValueKind};
use crate::audiences::AudienceSet;
use crate::config::{ConfigError, KnownNames};
use crate::event_time::EventTimeConfig;
use crate::messages::EventRead;
use crate::profile_keyed::EventPaths;
/// Default `limit` of a unique list.
const fn default_limit() -> usize {
    100
}

/// One computed trait (`traits.<name>`), written as a one-key map naming its
/// type: `{event_counter: {event: Order Completed, within: 30d}}`.
///
/// Deserialized by hand from a one-key map: serde_yaml 0.9 would otherwise
/// want a YAML tag (`!event_counter`) for the type.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
#[schemars(
    description = "One computed trait (`traits.<name>`): a one-key map naming its type, e.g. `{event_counter: {event: Order Completed, within: 30d}}`."
)]
pub enum TraitDef {
    /// How many matching events the profile performed.
    EventCounter(EventCounterDef),
    /// Sum, average, minimum or maximum of a numeric property.
    Aggregation(AggregationDef),
    /// The property value seen most often (ties: the smallest value).
    MostFrequent(MostFrequentDef),
    /// The property value of the earliest matching event (by event time).
    First(FirstLastDef),
    /// The property value of the latest matching event (by event time).
    Last(FirstLastDef),
    /// The `limit` most recently seen distinct property values, sorted.
    UniqueList(UniqueListDef),
    /// How many distinct property values (Segment's unique list count).
    UniqueCount(UniqueCountDef),
}

const TRAIT_TYPES: &[&str] = &[
    "event_counter",
    "aggregation",
    "most_frequent",
    "first",
    "last",
    "unique_list",
    "unique_count",
];

impl<'de> Deserialize<'de> for TraitDef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TraitDefVisitor;
        impl<'de> Visitor<'de> for TraitDefVisitor {
            type Value = TraitDef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    "a map with one key naming the trait type ({})",
                    TRAIT_TYPES.join(", ")
                )
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TraitDef, A::Error> {
                let Some(kind) = map.next_key::<String>()? else {
                    return Err(de::Error::invalid_length(0, &self));
                };
                let def = match kind.as_str() {
                    "event_counter" => TraitDef::EventCounter(map.next_value()?),
                    "aggregation" => TraitDef::Aggregation(map.next_value()?),
                    "most_frequent" => TraitDef::MostFrequent(map.next_value()?),
                    "first" => TraitDef::First(map.next_value()?),
                    "last" => TraitDef::Last(map.next_value()?),
                    "unique_list" => TraitDef::UniqueList(map.next_value()?),
                    "unique_count" => TraitDef::UniqueCount(map.next_value()?),
                    other => return Err(de::Error::unknown_variant(other, TRAIT_TYPES)),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "a trait has exactly one type, found `{kind}` and `{extra}`"
                    )));
                }
                Ok(def)
            }
        }
        d.deserialize_map(TraitDefVisitor)
    }
}

/// `event_counter`: counts matching events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventCounterDef {
    /// Event name to count (`page` calls are `Page Viewed`).
    pub event: String,
    /// Sliding window, e.g. `30d`; all time when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<Span>,
    /// Property conditions every counted event must meet.
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub r#where: Vec<PropertyCondition>,
}

/// How an aggregation folds the values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AggregateFunction {
    /// Sum (0 before the first value).
    Sum,
    /// Arithmetic mean.
    Avg,
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
}

/// `aggregation`: folds a numeric property. Events whose property is not a
/// JSON number are skipped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AggregationDef {
    /// Event name to aggregate over.
    pub event: String,
    /// Dotted path of the numeric value, e.g. `properties.revenue`.
    pub property: String,
    /// `sum`, `avg`, `min` or `max`.
    pub function: AggregateFunction,
    /// Sliding window, e.g. `30d`; all time when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<Span>,
    /// Property conditions every aggregated event must meet.
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub r#where: Vec<PropertyCondition>,
}

/// `most_frequent`: the value seen most often. A profile keeps the counts
/// of at most `limit` distinct values: past it, a new value takes the place
/// of the least frequent (ties: the largest) with its count plus one
/// (Space-Saving), so the result is exact while a profile has at most
/// `limit` distinct values, and afterwards any value seen more than
/// `n / limit` times of `n` is still counted
/// (`cdp_state_limit_hits_total{kind="most_frequent"}` counts the drops).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MostFrequentDef {
    /// Event name to look at.
    pub event: String,
    /// Dotted path of the value, e.g. `properties.category`.
    pub property: String,
    /// Most distinct values counted per profile (default 1000).
    #[serde(default = "default_count_limit")]
    pub limit: usize,
    /// Sliding window, e.g. `30d`; all time when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<Span>,
    /// Property conditions every counted event must meet.
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub r#where: Vec<PropertyCondition>,
}

/// `first` / `last`: the value of the earliest / latest matching event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FirstLastDef {
    /// Event name to look at.
    pub event: String,
    /// Dotted path of the value, e.g. `context.campaign.source`.
    pub property: String,
    /// Property conditions the event must meet.
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub r#where: Vec<PropertyCondition>,
}

/// `unique_list`: the `limit` distinct values seen most recently (by event
/// time of their latest occurrence; ties by value), emitted sorted by their
/// JSON text so a repeat of a kept value changes nothing. Exactly
/// mergeable: a value among the `limit` most recent of a union is among
/// the `limit` most recent of the side its latest occurrence came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UniqueListDef {
    /// Event name to look at.
    pub event: String,
    /// Dotted path of the value, e.g. `properties.category`.
    pub property: String,
    /// Most values kept and emitted (default 100).
    #[serde(default = "default_limit")]
    pub limit: usize,
    /// Sliding window, e.g. `30d`; all time when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<Span>,
    /// Property conditions every counted event must meet.
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub r#where: Vec<PropertyCondition>,
}

/// `unique_count`: how many distinct values (Segment's unique list count).
/// It counts up to `limit` and stays there: to be exactly mergeable it
/// keeps the `limit` smallest values (by JSON text), and a union with more
/// than `limit` distinct values has more than `limit` on one side at least
/// or more than `limit` in the union of the kept ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UniqueCountDef {
    /// Event name to look at.
    pub event: String,
    /// Dotted path of the value, e.g. `properties.sku`.
    pub property: String,
    /// Largest count reported (default 1000); values kept per profile.
    #[serde(default = "default_count_limit")]
    pub limit: usize,
    /// Sliding window, e.g. `30d`; all time when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<Span>,
    /// Property conditions every counted event must meet.
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub r#where: Vec<PropertyCondition>,
}

/// Default `limit` of a unique count.
const fn default_count_limit() -> usize {
    1000
}

impl TraitDef {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            TraitDef::EventCounter(_) => "event_counter",
            TraitDef::Aggregation(_) => "aggregation",
            TraitDef::MostFrequent(_) => "most_frequent",
            TraitDef::First(_) => "first",
            TraitDef::Last(_) => "last",
            TraitDef::UniqueList(_) => "unique_list",
            TraitDef::UniqueCount(_) => "unique_count",
        }
    }

    /// What the trait's values always are, when its type fixes it
    /// (`first`, `last` and `most_frequent` take the property's values).
    pub fn value_kind(&self) -> Option<ValueKind> {
        match self {
            TraitDef::EventCounter(_) | TraitDef::Aggregation(_) | TraitDef::UniqueCount(_) => {
                Some(ValueKind::Number)
            }
            TraitDef::UniqueList(_) => Some(ValueKind::List),
            TraitDef::MostFrequent(_) | TraitDef::First(_) | TraitDef::Last(_) => None,
        }
    }

    /// The event the trait reads.
    pub fn event(&self) -> &str {
        match self {
            TraitDef::EventCounter(d) => &d.event,
            TraitDef::Aggregation(d) => &d.event,
            TraitDef::MostFrequent(d) => &d.event,
            TraitDef::First(d) | TraitDef::Last(d) => &d.event,
            TraitDef::UniqueList(d) => &d.event,
            TraitDef::UniqueCount(d) => &d.event,
        }
    }

    /// The property path the trait reads (not for `event_counter`).
    pub fn property(&self) -> Option<&str> {
        match self {
            TraitDef::EventCounter(_) => None,
            TraitDef::Aggregation(d) => Some(&d.property),
            TraitDef::MostFrequent(d) => Some(&d.property),
            TraitDef::First(d) | TraitDef::Last(d) => Some(&d.property),
            TraitDef::UniqueList(d) => Some(&d.property),
            TraitDef::UniqueCount(d) => Some(&d.property),
        }
    }

    /// Whether the trait keeps value texts (not counts or sums): those
    /// [`MAX_KEPT_BYTES`](super::MAX_KEPT_BYTES) bounds per profile.
    pub fn keeps_values(&self) -> bool {
        !matches!(self, TraitDef::EventCounter(_) | TraitDef::Aggregation(_))
    }

    /// The property conditions an event must meet to count.
    pub fn conditions(&self) -> &[PropertyCondition] {
        match self {
            TraitDef::EventCounter(d) => &d.r#where,
            TraitDef::Aggregation(d) => &d.r#where,
            TraitDef::MostFrequent(d) => &d.r#where,
            TraitDef::First(d) | TraitDef::Last(d) => &d.r#where,
            TraitDef::UniqueList(d) => &d.r#where,
            TraitDef::UniqueCount(d) => &d.r#where,
        }
    }

    /// The window in milliseconds, if the trait has one.
    pub(super) fn window(&self) -> Option<i64> {
        match self {
            TraitDef::EventCounter(d) => d.within,
            TraitDef::Aggregation(d) => d.within,
            TraitDef::MostFrequent(d) => d.within,
            TraitDef::First(_) | TraitDef::Last(_) => None,
            TraitDef::UniqueList(d) => d.within,
            TraitDef::UniqueCount(d) => d.within,
        }
        .map(|s| s.millis())
    }

    pub(super) fn limit(&self) -> usize {
        match self {
            TraitDef::UniqueList(d) => d.limit,
            TraitDef::UniqueCount(d) => d.limit,
            TraitDef::MostFrequent(d) => d.limit,
            _ => usize::MAX,
        }
    }

    /// Whether `event` counts for this trait (name and conditions).
    /// `name`: the event's [`crate::messages::event_name`], read once per event
    /// for every trait.
    pub(super) fn selects<E: EventRead + ?Sized>(&self, name: Option<&str>, event: &E) -> bool {
        name == Some(self.event()) && self.conditions().iter().all(|c| c.matches_event(event))
    }

    /// The value this trait records for `event`, as JSON text (empty for a
    /// counter); `None` when the event carries no usable value.
    #[cfg(test)]
    pub(super) fn extract<E: EventRead + ?Sized>(&self, event: &E) -> Option<String> {
        let mut text = Vec::new();
        self.extract_into(event, &mut text)?;
        String::from_utf8(text).ok()
    }

    /// [`extract`](Self::extract) into `text` (cleared first), a buffer
    /// an event's traits share: each trait's value was a `String` of its
    /// own, allocated and dropped per trait per event.
    pub(super) fn extract_into<'t, E: EventRead + ?Sized>(
        &self,
        event: &E,
        text: &'t mut Vec<u8>,
    ) -> Option<&'t str> {
        text.clear();
        let value = match self {
            TraitDef::EventCounter(_) => return Some(""),
            TraitDef::Aggregation(d) => event
                .lookup(&d.property)
                .filter(|v| v.as_f64().is_some_and(f64::is_finite))?,
            _ => self
                .property()
                .and_then(|p| event.lookup(p))
                .filter(|v| !v.is_null())?,
        };
        // `serde_json`'s writer, not `Display`: the same text without the
        // formatter's per-write adapter.
        serde_json::to_writer(&mut *text, value).ok()?;
        std::str::from_utf8(text).ok()
    }
}

/// A digest of the trait definitions, never 0 (the fingerprint of a state
/// written before states carried one).
fn fingerprint<T: serde::Serialize + ?Sized>(defs: &T) -> u64 {
    use sha2::{Digest, Sha256};
    let text = serde_json::to_vec(defs).unwrap_or_default();
    let digest = Sha256::digest(&text);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first).max(1)
}

/// The computed traits of the config, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct TraitSet {
    pub(super) defs: BTreeMap<String, TraitDef>,
    /// The bound on event times ahead of the stream.
    pub(super) event_time: EventTimeConfig,
    /// A digest of `defs`: a profile last evaluated under other traits
    /// (a config change) is refreshed in full once, not incrementally.
    pub(super) fingerprint: u64,
    /// A digest of each definition: a trait whose definition changed
    /// (its event, property, `where`, window or kind) starts over.
    pub(super) def_fingerprints: BTreeMap<String, u64>,
    /// The paths of an event these traits read (the rest is not parsed),
    /// and those the audiences stage reads when forwarding.
    pub(super) reads: EventPaths,
    /// The audiences whose event filters each event is matched against
    /// here, the result sent with the update (see [`TraitSet::forwarding`]).
    pub(super) forward: Option<Arc<AudienceSet>>,
}

impl TraitSet {
    /// Check the `traits` section; errors name the bad field
    /// (`traits.orders_30d.event_counter.within: must be longer than 0`).
    pub fn new(defs: &BTreeMap<String, TraitDef>) -> Result<Self, ConfigError> {
        for (name, def) in defs {
            if name.is_empty() {
                return Err(ConfigError::new("traits", "a trait name must not be empty"));
            }
            let path = format!("traits.{name}.{}", def.kind());
            if def.event().is_empty() {
                return Err(ConfigError::new(
                    format!("{path}.event"),
                    "must not be empty",
                ));
            }
            if let Some(property) = def.property() {
                crate::config::check_event_path(&format!("{path}.property"), property)?;
            }
            if def.window().is_some_and(|w| w <= 0) {
                return Err(ConfigError::new(
                    format!("{path}.within"),
                    "must be longer than 0",
                ));
            }
            if def.limit() == 0 {
                return Err(ConfigError::new(
                    format!("{path}.limit"),
                    "must be at least 1",
                ));
            }
            for (i, c) in def.conditions().iter().enumerate() {
                crate::config::check_event_path(
                    &format!("{path}.where[{i}].property"),
                    &c.property,
                )?;
            }
        }
        Ok(TraitSet {
            defs: defs.clone(),
            event_time: EventTimeConfig::default(),
            fingerprint: fingerprint(defs),
            def_fingerprints: defs
                .iter()
                .map(|(name, def)| (name.clone(), fingerprint(def)))
                .collect(),
            reads: EventPaths::of_traits(defs.values()),
            forward: None,
        })
    }

    /// The same traits, matching each event against the event filters of
    /// `audiences` (the parse reads their paths too): an update carries the
    /// indexes of the filters its event passed and their fingerprint, so
    /// the audiences stage parses nothing of the event. An audiences stage
    /// of other filters (another config, during a rolling change) finds
    /// another fingerprint and parses the event's text, which the update
    /// still carries.
    pub fn forwarding(mut self, audiences: &Arc<AudienceSet>) -> Self {
        self.reads = self.reads.union(&audiences.reads);
        self.forward = Some(audiences.clone());
        self
    }

    /// The same traits with another bound on future event times.
    pub fn with_event_time(mut self, event_time: EventTimeConfig) -> Self {
        self.event_time = event_time;
        self
    }

    /// Check each trait's event name against the `known` ones
    /// (`traits.orders.event_counter.event: unknown event "Ordr Completed"`).
    pub fn check_names(&self, known: &KnownNames) -> Result<(), ConfigError> {
        for (name, def) in &self.defs {
            known.check_event(&format!("traits.{name}.{}.event", def.kind()), def.event())?;
        }
        Ok(())
    }

    /// Names of the computed traits.
    pub fn names(&self) -> BTreeSet<String> {
        self.defs.keys().cloned().collect()
    }

    /// Every trait whose type fixes what its values are.
    pub fn value_kinds(&self) -> BTreeMap<String, ValueKind> {
        self.defs
            .iter()
            .filter_map(|(name, def)| def.value_kind().map(|k| (name.clone(), k)))
            .collect()
    }
}
