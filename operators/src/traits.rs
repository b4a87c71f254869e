//! The traits stage (Engage computed traits): `<p>.identified` → `<p>.traits`.
//!
//! Per profile it keeps the computed traits the config declares (event
//! counters, aggregations, most frequent, first and last values, unique
//! lists; each with an event filter, property conditions and an optional
//! sliding window) and the profile traits `identify` calls set.
//!
//! Input: [`ProfileRecord`], keyed by profile id. Output to `NEXT`: one
//! [`ProfileUpdate::Update`] for *every* event (with the traits whose value
//! changed, possibly none, because the audiences stage needs every event),
//! one for each window expiry or merge that changes a value, and the
//! [`ProfileUpdate::Merged`] records as they come.
//!
//! Guarantees:
//! - Every trait's state is *mergeable*: `merge(state(A), state(B)) ==
//!   state(A ∪ B)` for any multisets of events A and B; merge is commutative
//!   and associative (property tests below). Sums are kept in fixed point
//!   (10⁻⁹ units, `i128`) so addition is exact, not float-rounded.
//! - Values depend on event time, never on arrival order: `first`/`last`
//!   are by `(event time, value)`, ties of most-frequent go to the smallest
//!   value. Only identify traits break an event-time tie by arrival.
//! - Windows slide in time buckets of at most 1/30 of the window (see
//!   [`bucket_width`]): state per windowed trait is at most 31 bucket
//!   states whatever the traffic; a value counts every event in the window
//!   and at most one bucket width more at its old edge; a timer recomputes
//!   it when the oldest bucket leaves. `most_frequent` and `unique_count`
//!   keep at most `limit` values per profile (drops are counted).
//! - Time is stream time ([`Context::now`]) and event time only. A profile's
//!   evaluation clock is `max(clock, stream time, event time)`: it never
//!   goes backwards, so pruning a window never loses an entry a later
//!   evaluation would count. An event time is first bounded by stream time
//!   plus `event_time.max_future` ([`crate::event_time`]), so one event
//!   from a wrong device clock cannot drag the clock into the future.
//! - Merges: on `merged(from, into)` the state of `from` travels to `into`'s
//!   partition as a `transfer`, and a redirect forwards late records for
//!   `from` to `into`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use cdp_pipeline::operator::{Context, Operator, OperatorError, Record};
use cdp_pipeline::store::StoreError;
use cdp_pipeline::Span;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};

use crate::config::{ConfigError, KnownNames};
use crate::event_time::{EventTimeConfig, TIME_CORRECTED_HEADER};
use crate::messages::{self, outputs, Cause, Identifiers, ProfileRecord, ProfileUpdate};

/// The `stage` this operator writes on its transfers.
const STAGE: &str = "traits";

/// Header on an update whose event made a per-profile limit drop state:
/// the trait kinds, comma-separated (`most_frequent,unique_count`).
pub const STATE_LIMIT_HEADER: &str = "cdp-state-limit";

/// Default `limit` of a unique list.
const fn default_limit() -> usize {
    100
}

// ---------------------------------------------------------------------------
// Comparisons (shared with the audiences stage)
// ---------------------------------------------------------------------------

/// The comparison keys a condition may use.
pub(crate) const COMPARISONS: &[&str] = &[
    "eq", "ne", "gt", "gte", "lt", "lte", "contains", "in", "exists",
];

const PROPERTY_CONDITION_FIELDS: &[&str] = &[
    "property", "eq", "ne", "gt", "gte", "lt", "lte", "contains", "in", "exists",
];

/// One comparison of a value, written as a single key: `{gt: 100}`.
///
/// A missing value and `null` are the same: only `ne` and `exists: false`
/// hold for them. Numbers compare numerically (`1 == 1.0`); `gt`/`gte`/
/// `lt`/`lte` compare two numbers or two strings and are false otherwise.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    /// Equal to the value.
    Eq(Value),
    /// Not equal to the value (a missing value is not equal).
    Ne(Value),
    /// Greater than the number or string.
    Gt(Value),
    /// Greater than or equal to the number or string.
    Gte(Value),
    /// Less than the number or string.
    Lt(Value),
    /// Less than or equal to the number or string.
    Lte(Value),
    /// A string containing the substring, or a list containing the item.
    Contains(Value),
    /// Equal to one of the listed values.
    In(Vec<Value>),
    /// `true`: has a non-null value; `false`: has none.
    Exists(bool),
}

impl Comparison {
    /// The comparison a config key names (`gt` with `100`); `Ok(None)` when
    /// `key` is no comparison, `Err` when the value does not fit the key.
    pub fn from_key(key: &str, value: Value) -> Result<Option<Comparison>, String> {
        let ordered = |v: Value| {
            if v.is_number() || v.is_string() {
                Ok(v)
            } else {
                Err(format!("`{key}` expects a number or a string, found {v}"))
            }
        };
        Ok(Some(match key {
            "eq" => Comparison::Eq(value),
            "ne" => Comparison::Ne(value),
            "gt" => Comparison::Gt(ordered(value)?),
            "gte" => Comparison::Gte(ordered(value)?),
            "lt" => Comparison::Lt(ordered(value)?),
            "lte" => Comparison::Lte(ordered(value)?),
            "contains" => Comparison::Contains(value),
            "in" => match value {
                Value::Array(items) => Comparison::In(items),
                other => return Err(format!("`in` expects a list, found {other}")),
            },
            "exists" => match value {
                Value::Bool(b) => Comparison::Exists(b),
                other => return Err(format!("`exists` expects true or false, found {other}")),
            },
            _ => return Ok(None),
        }))
    }

    /// Whether `value` (absent: `None`) passes the comparison.
    pub fn matches(&self, value: Option<&Value>) -> bool {
        let value = value.filter(|v| !v.is_null());
        let ordering = |bound: &Value| value.and_then(|v| compare_ordered(v, bound));
        match self {
            Comparison::Eq(x) => value.is_some_and(|v| json_eq(v, x)),
            Comparison::Ne(x) => !value.is_some_and(|v| json_eq(v, x)),
            Comparison::Gt(x) => ordering(x).is_some_and(|o| o.is_gt()),
            Comparison::Gte(x) => ordering(x).is_some_and(|o| o.is_ge()),
            Comparison::Lt(x) => ordering(x).is_some_and(|o| o.is_lt()),
            Comparison::Lte(x) => ordering(x).is_some_and(|o| o.is_le()),
            Comparison::Contains(x) => match (value, x) {
                (Some(Value::String(s)), Value::String(needle)) => s.contains(needle.as_str()),
                (Some(Value::Array(items)), _) => items.iter().any(|i| json_eq(i, x)),
                _ => false,
            },
            Comparison::In(list) => value.is_some_and(|v| list.iter().any(|x| json_eq(v, x))),
            Comparison::Exists(want) => value.is_some() == *want,
        }
    }
}

/// JSON equality with numbers compared by value (`1 == 1.0`).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_number() && b.is_number() => x == y,
        _ => a == b,
    }
}

/// Order two numbers or two strings; anything else is unordered.
fn compare_ordered(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Put the comparison `key: value` into `slot`, refusing a second one.
pub(crate) fn set_comparison<E: de::Error>(
    slot: &mut Option<Comparison>,
    key: &str,
    value: Value,
    expected: &'static [&'static str],
) -> Result<(), E> {
    let Some(comparison) = Comparison::from_key(key, value).map_err(E::custom)? else {
        return Err(E::unknown_field(key, expected));
    };
    if slot.is_some() {
        return Err(E::custom(format!(
            "`{key}`: a condition takes exactly one comparison ({})",
            COMPARISONS.join(" ")
        )));
    }
    *slot = Some(comparison);
    Ok(())
}

/// A condition on one property of an event:
/// `{property: properties.revenue, gt: 100}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PropertyCondition {
    /// Dotted path into the event, e.g. `properties.revenue`.
    pub property: String,
    /// How the value at `property` must compare (exactly one key).
    #[serde(flatten)]
    pub op: Comparison,
}

impl PropertyCondition {
    /// Whether the event's value at `property` passes the comparison.
    pub fn matches_event(&self, event: &Value) -> bool {
        self.op.matches(messages::lookup(event, &self.property))
    }
}

impl<'de> Deserialize<'de> for PropertyCondition {
    // By hand rather than `flatten`, so unknown keys are refused and errors
    // keep their path.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PropertyConditionVisitor;
        impl<'de> Visitor<'de> for PropertyConditionVisitor {
            type Value = PropertyCondition;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map like {property: properties.revenue, gt: 100}")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<PropertyCondition, A::Error> {
                let mut property: Option<String> = None;
                let mut op = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "property" {
                        if property.is_some() {
                            return Err(de::Error::duplicate_field("property"));
                        }
                        property = Some(map.next_value()?);
                    } else if COMPARISONS.contains(&key.as_str()) {
                        let value: Value = map.next_value()?;
                        set_comparison(&mut op, &key, value, PROPERTY_CONDITION_FIELDS)?;
                    } else {
                        return Err(de::Error::unknown_field(&key, PROPERTY_CONDITION_FIELDS));
                    }
                }
                let property = property.ok_or_else(|| de::Error::missing_field("property"))?;
                let op = op.ok_or_else(|| {
                    de::Error::custom(format!(
                        "expected one comparison ({})",
                        COMPARISONS.join(" ")
                    ))
                })?;
                Ok(PropertyCondition { property, op })
            }
        }
        d.deserialize_map(PropertyConditionVisitor)
    }
}

/// The JSON Schema of every comparison key, as `properties` of the
/// conditions that take one (see [`Comparison`]).
pub(crate) fn comparison_properties() -> serde_json::Map<String, Value> {
    let any = |description: &str| json!({ "description": description });
    let ordered =
        |description: &str| json!({ "type": ["number", "string"], "description": description });
    let mut properties = serde_json::Map::new();
    for (key, schema) in [
        ("eq", any("Equal to the value.")),
        (
            "ne",
            any("Not equal to the value (a missing value is not equal)."),
        ),
        ("gt", ordered("Greater than the number or string.")),
        (
            "gte",
            ordered("Greater than or equal to the number or string."),
        ),
        ("lt", ordered("Less than the number or string.")),
        (
            "lte",
            ordered("Less than or equal to the number or string."),
        ),
        (
            "contains",
            any("A string containing the substring, or a list containing the item."),
        ),
        (
            "in",
            json!({ "type": "array", "description": "Equal to one of the listed values." }),
        ),
        (
            "exists",
            json!({ "type": "boolean", "description": "`true`: has a non-null value; `false`: has none." }),
        ),
    ] {
        properties.insert(key.to_string(), schema);
    }
    properties
}

/// `oneOf` alternatives that hold when exactly one comparison key is there.
pub(crate) fn exactly_one_comparison() -> Value {
    COMPARISONS
        .iter()
        .map(|k| json!({ "required": [k] }))
        .collect()
}

/// The schema of an object with `key` (a string, required) and exactly one
/// comparison, and nothing else: a property or a trait condition.
pub(crate) fn keyed_comparison_schema(
    description: &str,
    key: &str,
    key_description: &str,
) -> schemars::Schema {
    let mut properties = serde_json::Map::new();
    properties.insert(
        key.to_string(),
        json!({ "type": "string", "description": key_description }),
    );
    properties.extend(comparison_properties());
    schemars::json_schema!({
        "description": description,
        "type": "object",
        "properties": properties,
        "required": [key],
        "additionalProperties": false,
        "oneOf": exactly_one_comparison()
    })
}

impl schemars::JsonSchema for Comparison {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Comparison".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "One comparison of a value, written as a single key: `{gt: 100}`. A missing value and `null` are the same: only `ne` and `exists: false` hold for them.",
            "type": "object",
            "properties": comparison_properties(),
            "additionalProperties": false,
            "minProperties": 1,
            "maxProperties": 1
        })
    }
}

impl schemars::JsonSchema for PropertyCondition {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PropertyCondition".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        keyed_comparison_schema(
            "A condition on one property of an event, with exactly one comparison: `{property: properties.revenue, gt: 100}`.",
            "property",
            "Dotted path into the event, e.g. `properties.revenue`.",
        )
    }
}

// ---------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------

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
/// of at most `limit` distinct values: past it, the least frequent value
/// (ties: the largest) is dropped with its count, so the result is exact
/// while a profile has at most `limit` distinct values, and afterwards
/// still right whenever the winner's lead exceeds the dropped counts
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
    fn kind(&self) -> &'static str {
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

    fn event(&self) -> &str {
        match self {
            TraitDef::EventCounter(d) => &d.event,
            TraitDef::Aggregation(d) => &d.event,
            TraitDef::MostFrequent(d) => &d.event,
            TraitDef::First(d) | TraitDef::Last(d) => &d.event,
            TraitDef::UniqueList(d) => &d.event,
            TraitDef::UniqueCount(d) => &d.event,
        }
    }

    fn property(&self) -> Option<&str> {
        match self {
            TraitDef::EventCounter(_) => None,
            TraitDef::Aggregation(d) => Some(&d.property),
            TraitDef::MostFrequent(d) => Some(&d.property),
            TraitDef::First(d) | TraitDef::Last(d) => Some(&d.property),
            TraitDef::UniqueList(d) => Some(&d.property),
            TraitDef::UniqueCount(d) => Some(&d.property),
        }
    }

    /// The window in milliseconds, if the trait has one.
    fn window(&self) -> Option<i64> {
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

    fn conditions(&self) -> &[PropertyCondition] {
        match self {
            TraitDef::EventCounter(d) => &d.r#where,
            TraitDef::Aggregation(d) => &d.r#where,
            TraitDef::MostFrequent(d) => &d.r#where,
            TraitDef::First(d) | TraitDef::Last(d) => &d.r#where,
            TraitDef::UniqueList(d) => &d.r#where,
            TraitDef::UniqueCount(d) => &d.r#where,
        }
    }

    fn limit(&self) -> usize {
        match self {
            TraitDef::UniqueList(d) => d.limit,
            TraitDef::UniqueCount(d) => d.limit,
            TraitDef::MostFrequent(d) => d.limit,
            _ => usize::MAX,
        }
    }

    /// Whether `event` counts for this trait (name and conditions).
    fn selects(&self, event: &Value) -> bool {
        messages::event_name(event) == Some(self.event())
            && self.conditions().iter().all(|c| c.matches_event(event))
    }

    /// The value this trait records for `event`, as JSON text (empty for a
    /// counter); `None` when the event carries no usable value.
    fn extract(&self, event: &Value) -> Option<String> {
        match self {
            TraitDef::EventCounter(_) => Some(String::new()),
            TraitDef::Aggregation(d) => messages::lookup(event, &d.property)
                .filter(|v| v.as_f64().is_some_and(f64::is_finite))
                .map(Value::to_string),
            _ => self
                .property()
                .and_then(|p| messages::lookup(event, p))
                .filter(|v| !v.is_null())
                .map(Value::to_string),
        }
    }
}

/// The computed traits of the config, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct TraitSet {
    defs: BTreeMap<String, TraitDef>,
    /// The bound on event times ahead of the stream.
    event_time: EventTimeConfig,
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
            if def.property().is_some_and(str::is_empty) {
                return Err(ConfigError::new(
                    format!("{path}.property"),
                    "must not be empty",
                ));
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
                if c.property.is_empty() {
                    return Err(ConfigError::new(
                        format!("{path}.where[{i}].property"),
                        "must not be empty",
                    ));
                }
            }
        }
        Ok(TraitSet {
            defs: defs.clone(),
            event_time: EventTimeConfig::default(),
        })
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
}

// ---------------------------------------------------------------------------
// Mergeable trait state
// ---------------------------------------------------------------------------

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
/// their JSON text so they order and compare exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum TraitState {
    /// All-time event counter.
    Counter { count: u64 },
    /// All-time aggregation: enough for every function.
    Aggregation {
        count: u64,
        #[serde(with = "units_text")]
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
    Window {
        #[serde(with = "bucket_pairs")]
        buckets: BTreeMap<i64, TraitState>,
    },
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

/// Buckets per window: a windowed trait keeps at most this many (+1)
/// bucket states, whatever the traffic.
pub const BUCKETS_PER_WINDOW: i64 = 30;

/// Width of a window's time buckets: at most 1/30 of the window (1 ms at
/// least). An event at `t` falls in the bucket starting at `t - t mod
/// width`, and a bucket counts at `now` while its last instant is inside
/// the window. So a windowed value counts every event of the window and,
/// at most, events up to one bucket width older: a `30d` counter may still
/// count an event 30 days and a few hours old, never miss a recent one.
/// Windows whose length is a multiple of 30 ms with events on bucket
/// boundaries, and windows under 60 ms, are exact.
pub fn bucket_width(window: i64) -> i64 {
    (window / BUCKETS_PER_WINDOW).max(1)
}

fn bucket_start(t: i64, width: i64) -> i64 {
    t.div_euclid(width).saturating_mul(width)
}

/// Whether the bucket starting at `start` still counts at `now`.
fn bucket_counts(start: i64, width: i64, window: i64, now: i64) -> bool {
    start.saturating_add(width - 1) > now.saturating_sub(window)
}

impl TraitState {
    /// The state of no events.
    fn empty(def: &TraitDef) -> Self {
        if def.window().is_some() {
            TraitState::Window {
                buckets: BTreeMap::new(),
            }
        } else {
            Self::all_time(def)
        }
    }

    fn all_time(def: &TraitDef) -> Self {
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
    fn fits(&self, def: &TraitDef) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(&Self::empty(def))
    }

    /// Record one event's value (JSON text, see [`TraitDef::extract`]).
    /// Returns whether a per-profile limit dropped something.
    fn add(&mut self, def: &TraitDef, time: i64, text: &str) -> bool {
        match self {
            TraitState::Counter { count } => *count = count.saturating_add(1),
            TraitState::Aggregation {
                count,
                sum,
                min,
                max,
            } => {
                let Ok(x) = text.parse::<f64>() else {
                    return false;
                };
                if !x.is_finite() {
                    return false;
                }
                *count = count.saturating_add(1);
                *sum = sum.saturating_add(to_units(x));
                *min = Some(min.map_or(x, |m| m.min(x)));
                *max = Some(max.map_or(x, |m| m.max(x)));
            }
            TraitState::MostFrequent { counts } => {
                let c = counts.entry(text.to_owned()).or_insert(0);
                *c = c.saturating_add(1);
                return keep_most_frequent(counts, def.limit());
            }
            TraitState::First { at } => {
                let candidate = (time, text.to_owned());
                if at.as_ref().is_none_or(|a| candidate < *a) {
                    *at = Some(candidate);
                }
            }
            TraitState::Last { at } => {
                let candidate = (time, text.to_owned());
                if at.as_ref().is_none_or(|a| candidate > *a) {
                    *at = Some(candidate);
                }
            }
            TraitState::UniqueList { latest } => {
                let t = latest.entry(text.to_owned()).or_insert(time);
                *t = (*t).max(time);
                keep_most_recent(latest, def.limit());
            }
            TraitState::UniqueCount { values } => {
                values.insert(text.to_owned());
                return truncate(values, def.limit());
            }
            TraitState::Window { buckets } => {
                let width = def.window().map_or(1, bucket_width);
                return buckets
                    .entry(bucket_start(time, width))
                    .or_insert_with(|| Self::all_time(def))
                    .add(def, time, text);
            }
        }
        false
    }

    /// The state of the union of both states' events. Commutative and
    /// associative; a state of another type than `self` is ignored.
    fn merge(&self, def: &TraitDef, other: &TraitState) -> TraitState {
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

    /// Drop buckets that are out of the window at `now`.
    fn prune(&mut self, def: &TraitDef, now: i64) {
        if let (TraitState::Window { buckets }, Some(w)) = (self, def.window()) {
            let width = bucket_width(w);
            buckets.retain(|start, _| bucket_counts(*start, width, w, now));
        }
    }

    /// The trait's value at `now` (`null` when it has none).
    fn value(&self, def: &TraitDef, now: i64) -> Value {
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
                // Ascending key order and a strict `>`: ties go to the
                // smallest value.
                let mut best: Option<(&String, u64)> = None;
                for (value, n) in counts {
                    if best.is_none_or(|(_, m)| *n > m) {
                        best = Some((value, *n));
                    }
                }
                best.map_or(Value::Null, |(v, _)| parse_text(v))
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
    fn next_expiry(&self, def: &TraitDef) -> Option<i64> {
        match (self, def.window()) {
            (TraitState::Window { buckets }, Some(w)) => buckets
                .keys()
                .next()
                .map(|start| start.saturating_add(bucket_width(w) - 1).saturating_add(w)),
            _ => None,
        }
    }
}

fn merge_opt(a: Option<f64>, b: Option<f64>, f: fn(f64, f64) -> f64) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(f(x, y)),
        (x, y) => x.or(y),
    }
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

/// Drop the least frequent values (ties: the largest) beyond `limit`;
/// whether any was dropped.
fn keep_most_frequent(counts: &mut BTreeMap<String, u64>, limit: usize) -> bool {
    let dropped = counts.len() > limit;
    while counts.len() > limit {
        let least = counts
            .iter()
            .min_by(|(v1, n1), (v2, n2)| n1.cmp(n2).then_with(|| v2.cmp(v1)))
            .map(|(v, _)| v.clone());
        match least {
            Some(v) => counts.remove(&v),
            None => break,
        };
    }
    dropped
}

// ---------------------------------------------------------------------------
// Profile state
// ---------------------------------------------------------------------------

/// A profile trait set by `identify`, with the event time that set it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StampedValue {
    time: i64,
    value: Value,
}

/// Everything the traits stage keeps for one profile, under `profile/<id>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct ProfileState {
    /// The profile's identifiers, as of its latest event.
    #[serde(default)]
    identifiers: Identifiers,
    /// Time of the last evaluation; never goes backwards.
    #[serde(default)]
    clock: i64,
    /// Computed trait name → state.
    #[serde(default)]
    computed: BTreeMap<String, TraitState>,
    /// Identify traits: last write wins by event time (ties: by arrival).
    #[serde(default)]
    profile_traits: BTreeMap<String, StampedValue>,
    /// The non-null values last sent downstream, to emit only changes.
    #[serde(default)]
    emitted: BTreeMap<String, Value>,
    /// The timer set for this profile's next window expiry.
    #[serde(default)]
    timer: Option<i64>,
}

impl ProfileState {
    /// Drop states of traits no longer configured or of another type.
    fn conform(&mut self, set: &TraitSet) {
        self.computed
            .retain(|name, state| set.defs.get(name).is_some_and(|def| state.fits(def)));
    }

    /// Apply one event; returns the kinds of the traits whose per-profile
    /// limit dropped something.
    fn apply_event(
        &mut self,
        set: &TraitSet,
        event: &Value,
        event_time: i64,
    ) -> BTreeSet<&'static str> {
        let mut limited = BTreeSet::new();
        for (name, def) in &set.defs {
            if !def.selects(event) {
                continue;
            }
            let Some(text) = def.extract(event) else {
                continue;
            };
            let dropped = self
                .computed
                .entry(name.clone())
                .or_insert_with(|| TraitState::empty(def))
                .add(def, event_time, &text);
            if dropped {
                limited.insert(def.kind());
            }
        }
        if event.get("type").and_then(Value::as_str) == Some("identify") {
            // RudderStack SDKs send identify traits in `context.traits`,
            // Segment's in `traits`; the top-level ones win a clash.
            let places = [
                messages::lookup(event, "context.traits"),
                event.get("traits"),
            ];
            for traits in places.into_iter().flatten().filter_map(Value::as_object) {
                for (name, value) in traits {
                    if self
                        .profile_traits
                        .get(name)
                        .is_some_and(|s| s.time > event_time)
                    {
                        continue;
                    }
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
        limited
    }

    /// Fold `other` (a merged-away profile) into this one.
    fn merge(&mut self, set: &TraitSet, other: ProfileState) {
        self.identifiers = union_identifiers(&self.identifiers, &other.identifiers);
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
    fn values(&self, set: &TraitSet, now: i64) -> BTreeMap<String, Value> {
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
    fn refresh(&mut self, set: &TraitSet, now: i64) -> BTreeMap<String, Value> {
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
        changed
    }

    fn next_expiry(&self, set: &TraitSet) -> Option<i64> {
        set.defs
            .iter()
            .filter_map(|(name, def)| self.computed.get(name).and_then(|s| s.next_expiry(def)))
            .min()
    }
}

// ---------------------------------------------------------------------------
// Helpers shared with the audiences stage
// ---------------------------------------------------------------------------

pub(crate) fn profile_key(id: &str) -> Vec<u8> {
    format!("profile/{id}").into_bytes()
}

pub(crate) fn redirect_key(id: &str) -> Vec<u8> {
    format!("redirect/{id}").into_bytes()
}

/// The profile `id` was merged into, if it was.
pub(crate) fn redirect_of(ctx: &Context<'_>, id: &str) -> Result<Option<String>, OperatorError> {
    Ok(ctx
        .get(&redirect_key(id))?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Emit `value` as JSON, keyed by a profile id.
pub(crate) fn emit_json<T: Serialize>(
    ctx: &mut Context<'_>,
    output: &'static str,
    key: &str,
    value: &T,
) -> Result<(), OperatorError> {
    let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Decode(e.to_string()))?;
    ctx.emit(output, Some(key.as_bytes().to_vec()), bytes);
    Ok(())
}

/// Both profiles' identifiers: `a`'s first, then `b`'s new ones.
pub(crate) fn union_identifiers(a: &Identifiers, b: &Identifiers) -> Identifiers {
    let mut out = a.clone();
    for (kind, values) in b {
        let mine = out.entry(kind.clone()).or_default();
        for v in values {
            if !mine.contains(v) {
                mine.push(v.clone());
            }
        }
    }
    out
}

/// Move a profile's timer from `current` to `next` (either may be none).
pub(crate) fn reschedule(
    ctx: &mut Context<'_>,
    id: &str,
    current: &mut Option<i64>,
    next: Option<i64>,
) {
    if *current == next {
        return;
    }
    if let Some(old) = *current {
        ctx.cancel_timer(old, id.as_bytes());
    }
    if let Some(at) = next {
        ctx.set_timer(at, id.as_bytes());
    }
    *current = next;
}

pub(crate) fn to_json_value<T: Serialize>(value: &T) -> Result<Value, OperatorError> {
    serde_json::to_value(value).map_err(|e| OperatorError::Store(StoreError::Decode(e.to_string())))
}

// ---------------------------------------------------------------------------
// Operator
// ---------------------------------------------------------------------------

/// The traits operator of one task.
pub struct TraitsOperator {
    set: Arc<TraitSet>,
}

impl TraitsOperator {
    pub fn new(set: Arc<TraitSet>) -> Self {
        TraitsOperator { set }
    }

    fn load(&self, ctx: &Context<'_>, id: &str) -> Result<Option<ProfileState>, OperatorError> {
        let Some(bytes) = ctx.get(&profile_key(id))? else {
            return Ok(None);
        };
        let mut state: ProfileState = match serde_json::from_slice(&bytes) {
            Ok(state) => state,
            // A state written before windows had buckets and unique lists
            // kept times: rewrite it once rather than stop the stage.
            Err(_) => self.upgrade(id, &bytes)?,
        };
        state.conform(&self.set);
        Ok(Some(state))
    }

    /// Read a profile state of an older layout: window `entries` (one per
    /// event) become buckets, a unique list's `values` become its most
    /// recent values (all as old as can be).
    fn upgrade(&self, id: &str, bytes: &[u8]) -> Result<ProfileState, OperatorError> {
        let decode = |e: serde_json::Error| {
            OperatorError::Store(StoreError::Decode(format!("profile/{id}: {e}")))
        };
        let mut value: Value = serde_json::from_slice(bytes).map_err(decode)?;
        if let Some(computed) = value.get_mut("computed").and_then(Value::as_object_mut) {
            for (name, state) in computed.iter_mut() {
                let Some(def) = self.set.defs.get(name) else {
                    continue;
                };
                let kind = state
                    .get("kind")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let upgraded = match kind {
                    "window" => {
                        let entries: Vec<(i64, String)> = state
                            .get("entries")
                            .cloned()
                            .and_then(|e| serde_json::from_value(e).ok())
                            .unwrap_or_default();
                        let mut fresh = TraitState::empty(def);
                        for (t, text) in &entries {
                            fresh.add(def, *t, text);
                        }
                        Some(fresh)
                    }
                    "unique_list" if state.get("latest").is_none() => {
                        let values: Vec<String> = state
                            .get("values")
                            .cloned()
                            .and_then(|v| serde_json::from_value(v).ok())
                            .unwrap_or_default();
                        Some(TraitState::UniqueList {
                            latest: values.into_iter().map(|v| (v, i64::MIN)).collect(),
                        })
                    }
                    _ => None,
                };
                if let Some(fresh) = upgraded {
                    *state = to_json_value(&fresh)?;
                }
            }
        }
        serde_json::from_value(value).map_err(decode)
    }

    /// Prune, diff, reschedule and store; returns the changed traits.
    fn settle(
        &self,
        ctx: &mut Context<'_>,
        id: &str,
        state: &mut ProfileState,
    ) -> Result<BTreeMap<String, Value>, OperatorError> {
        let changed = state.refresh(&self.set, state.clock);
        let next = state.next_expiry(&self.set);
        reschedule(ctx, id, &mut state.timer, next);
        ctx.put_json(&profile_key(id), state)?;
        Ok(changed)
    }

    fn on_event(
        &self,
        ctx: &mut Context<'_>,
        profile_id: String,
        identifiers: Identifiers,
        event: Value,
        record_time: Option<i64>,
    ) -> Result<(), OperatorError> {
        if !event.is_object() {
            return Err(OperatorError::rejected(
                "invalid_event",
                json!({"profile_id": profile_id, "error": "event is not a JSON object"}),
            ));
        }
        if let Some(survivor) = redirect_of(ctx, &profile_id)? {
            let forwarded = ProfileRecord::Event {
                profile_id: survivor.clone(),
                identifiers,
                event,
                dropped: Vec::new(),
            };
            return emit_json(ctx, outputs::SELF, &survivor, &forwarded);
        }
        // An event without a time happened "now" in stream time; one too
        // far ahead of the stream is bounded (see `event_time`).
        let own_time = messages::event_time_ms(&event).unwrap_or_else(|| ctx.now());
        let bounded = self
            .set
            .event_time
            .bound(own_time, ctx.now(), record_time)?;
        let event_time = bounded.time;
        let mut state = self.load(ctx, &profile_id)?.unwrap_or_default();
        state.clock = state.clock.max(ctx.now()).max(event_time);
        let limited = state.apply_event(&self.set, &event, event_time);
        // Identifiers only grow: a record from a partition that has not
        // seen the latest link must not take identifiers away.
        state.identifiers = union_identifiers(&state.identifiers, &identifiers);
        let traits = self.settle(ctx, &profile_id, &mut state)?;
        let cause = Cause {
            message_id: event
                .get("messageId")
                .and_then(Value::as_str)
                .map(str::to_owned),
            tick: None,
        };
        let update = ProfileUpdate::Update {
            profile_id: profile_id.clone(),
            identifiers: state.identifiers,
            event: Some(event),
            traits,
            event_time,
            time_corrected_from: bounded.corrected_from,
            cause,
        };
        // What the stage counts (a header, so no record is parsed again).
        let mut headers = Vec::new();
        if bounded.corrected_from.is_some() {
            headers.push((TIME_CORRECTED_HEADER.to_owned(), b"1".to_vec()));
        }
        if !limited.is_empty() {
            let kinds: Vec<&str> = limited.into_iter().collect();
            headers.push((STATE_LIMIT_HEADER.to_owned(), kinds.join(",").into_bytes()));
        }
        let bytes = serde_json::to_vec(&update).map_err(|e| StoreError::Decode(e.to_string()))?;
        ctx.emit_with_headers(outputs::NEXT, Some(profile_id.into_bytes()), bytes, headers);
        Ok(())
    }

    fn on_merged(
        &self,
        ctx: &mut Context<'_>,
        from: String,
        into: String,
        identifiers: Identifiers,
        cause: Cause,
    ) -> Result<(), OperatorError> {
        let transfer = match self.load(ctx, &from)? {
            Some(mut state) => {
                if let Some(at) = state.timer.take() {
                    ctx.cancel_timer(at, from.as_bytes());
                }
                state.emitted.clear();
                state.identifiers = union_identifiers(&state.identifiers, &identifiers);
                Some(ProfileRecord::Transfer {
                    stage: STAGE.to_owned(),
                    from: from.clone(),
                    into: into.clone(),
                    state: to_json_value(&state)?,
                    cause: cause.clone(),
                })
            }
            None => None,
        };
        ctx.delete(&profile_key(&from));
        ctx.put(&redirect_key(&from), into.as_bytes().to_vec());
        if let Some(transfer) = transfer {
            emit_json(ctx, outputs::SELF, &into, &transfer)?;
        }
        let merged = ProfileUpdate::Merged {
            from: from.clone(),
            into,
            identifiers,
            cause,
        };
        emit_json(ctx, outputs::NEXT, &from, &merged)
    }

    fn on_transfer(
        &self,
        ctx: &mut Context<'_>,
        from: String,
        into: String,
        state: Value,
        cause: Cause,
    ) -> Result<(), OperatorError> {
        let mut incoming: ProfileState = match serde_json::from_value(state.clone()) {
            Ok(incoming) => incoming,
            // A transfer written by the previous layout: upgrade it too.
            Err(e) => serde_json::to_vec(&state)
                .ok()
                .and_then(|bytes| self.upgrade(&from, &bytes).ok())
                .ok_or_else(|| {
                    OperatorError::rejected(
                        "invalid_transfer",
                        json!({"from": from, "into": into, "error": e.to_string()}),
                    )
                })?,
        };
        if let Some(survivor) = redirect_of(ctx, &into)? {
            // `into` was itself merged away meanwhile: pass the state on.
            let forwarded = ProfileRecord::Transfer {
                stage: STAGE.to_owned(),
                from,
                into: survivor.clone(),
                state,
                cause,
            };
            return emit_json(ctx, outputs::SELF, &survivor, &forwarded);
        }
        incoming.conform(&self.set);
        let mut current = self.load(ctx, &into)?.unwrap_or_default();
        current.merge(&self.set, incoming);
        current.clock = current.clock.max(ctx.now());
        let traits = self.settle(ctx, &into, &mut current)?;
        if traits.is_empty() {
            return Ok(());
        }
        let update = ProfileUpdate::Update {
            profile_id: into.clone(),
            identifiers: current.identifiers,
            event: None,
            traits,
            event_time: current.clock,
            time_corrected_from: None,
            cause,
        };
        emit_json(ctx, outputs::NEXT, &into, &update)
    }
}

impl Operator for TraitsOperator {
    fn process(&mut self, record: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let input: ProfileRecord = serde_json::from_slice(record.value).map_err(|e| {
            OperatorError::rejected("invalid_record", json!({"error": e.to_string()}))
        })?;
        match input {
            ProfileRecord::Event {
                profile_id,
                identifiers,
                event,
                ..
            } => {
                if profile_id.is_empty() {
                    return Err(OperatorError::rejected(
                        "invalid_record",
                        json!({"error": "empty profile_id"}),
                    ));
                }
                self.on_event(ctx, profile_id, identifiers, event, record.timestamp_ms)
            }
            ProfileRecord::Merged {
                from,
                into,
                identifiers,
                cause,
            } => {
                if from.is_empty() || into.is_empty() || from == into {
                    return Err(OperatorError::rejected(
                        "invalid_merge",
                        json!({"from": from, "into": into, "error": "a merge needs two different profile ids"}),
                    ));
                }
                self.on_merged(ctx, from, into, identifiers, cause)
            }
            ProfileRecord::Transfer {
                stage,
                from,
                into,
                state,
                cause,
            } => {
                if stage != STAGE {
                    return Ok(());
                }
                self.on_transfer(ctx, from, into, state, cause)
            }
        }
    }

    fn on_timer(&mut self, key: &[u8], ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let Ok(id) = std::str::from_utf8(key) else {
            return Ok(());
        };
        let Some(mut state) = self.load(ctx, id)? else {
            return Ok(());
        };
        // The runtime removed the timer that fired.
        state.timer = None;
        let now = ctx.now();
        state.clock = state.clock.max(now);
        let traits = self.settle(ctx, id, &mut state)?;
        if traits.is_empty() {
            return Ok(());
        }
        let update = ProfileUpdate::Update {
            profile_id: id.to_owned(),
            identifiers: state.identifiers,
            event: None,
            traits,
            event_time: now,
            time_corrected_from: None,
            cause: Cause {
                message_id: None,
                tick: Some(now),
            },
        };
        emit_json(ctx, outputs::NEXT, id, &update)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use cdp_pipeline::operator::{Emitted, OperatorHarness};
    use proptest::prelude::*;

    use super::*;
    use crate::messages::rfc3339_ms;

    type TestResult = Result<(), Box<dyn Error>>;
    const DAY: i64 = 86_400_000;

    fn trait_set(yaml: &str) -> Result<Arc<TraitSet>, Box<dyn Error>> {
        let defs: BTreeMap<String, TraitDef> = serde_yaml::from_str(yaml)?;
        Ok(Arc::new(TraitSet::new(&defs)?))
    }

    fn harness(yaml: &str) -> Result<OperatorHarness<TraitsOperator>, Box<dyn Error>> {
        Ok(OperatorHarness::new(TraitsOperator::new(trait_set(yaml)?)))
    }

    fn track(name: &str, t: i64, properties: Value) -> Value {
        json!({"type": "track", "event": name, "messageId": format!("m{t}"),
               "timestamp": rfc3339_ms(t), "properties": properties})
    }

    fn identify(t: i64, traits: Value) -> Value {
        json!({"type": "identify", "messageId": format!("i{t}"), "userId": "u1",
               "timestamp": rfc3339_ms(t), "traits": traits})
    }

    fn event_record(id: &str, event: Value) -> Result<Vec<u8>, serde_json::Error> {
        let mut identifiers = Identifiers::new();
        identifiers.insert("user_id".into(), vec![format!("u_{id}")]);
        serde_json::to_vec(&ProfileRecord::Event {
            profile_id: id.into(),
            identifiers,
            event,
            dropped: Vec::new(),
        })
    }

    fn send(
        h: &mut OperatorHarness<TraitsOperator>,
        id: &str,
        event: Value,
    ) -> Result<Vec<Emitted>, Box<dyn Error>> {
        let bytes = event_record(id, event)?;
        Ok(h.process(Some(id.as_bytes()), &bytes, &[])?)
    }

    fn updates(out: &[Emitted]) -> Result<Vec<ProfileUpdate>, serde_json::Error> {
        out.iter()
            .filter(|e| e.output == outputs::NEXT)
            .map(|e| serde_json::from_slice(&e.value))
            .collect()
    }

    /// The changed traits of every `Update` in `out`, later ones winning.
    fn changed(out: &[Emitted]) -> Result<BTreeMap<String, Value>, serde_json::Error> {
        let mut traits = BTreeMap::new();
        for u in updates(out)? {
            if let ProfileUpdate::Update { traits: t, .. } = u {
                traits.extend(t);
            }
        }
        Ok(traits)
    }

    const DESIGN_TRAITS: &str = r#"
orders_30d: {event_counter: {event: Order Completed, within: 30d}}
orders: {event_counter: {event: Order Completed}}
big_orders: {event_counter: {event: Order Completed, where: [{property: properties.revenue, gt: 100}]}}
revenue_total: {aggregation: {event: Order Completed, property: properties.revenue, function: sum}}
revenue_avg: {aggregation: {event: Order Completed, property: properties.revenue, function: avg}}
revenue_min: {aggregation: {event: Order Completed, property: properties.revenue, function: min}}
revenue_max: {aggregation: {event: Order Completed, property: properties.revenue, function: max}}
favorite_category: {most_frequent: {event: Product Viewed, property: properties.category}}
first_campaign: {first: {event: Page Viewed, property: context.campaign.source}}
last_product: {last: {event: Product Viewed, property: properties.sku}}
categories: {unique_list: {event: Product Viewed, property: properties.category, limit: 2}}
"#;

    /// One event dated a year ahead (a wrong device clock) must not move the
    /// profile's clock: before the bound it pruned `orders_30d` to nothing.
    #[test]
    fn a_future_dated_event_does_not_prune_the_windows_of_its_profile() -> TestResult {
        let mut h = harness(DESIGN_TRAITS)?;
        h.tick(100 * DAY)?;
        let out = send(
            &mut h,
            "p1",
            track("Order Completed", 100 * DAY, json!({"revenue": 5})),
        )?;
        assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(1)));
        let year_ahead = 465 * DAY;
        let out = send(&mut h, "p1", track("Page Viewed", year_ahead, json!({})))?;
        assert!(
            !changed(&out)?.contains_key("orders_30d"),
            "the order is still in its window: {:?}",
            changed(&out)?
        );
        match updates(&out)?.first() {
            Some(ProfileUpdate::Update {
                event_time,
                time_corrected_from,
                ..
            }) => {
                assert_eq!(*event_time, 100 * DAY, "taken to happen at stream time");
                assert_eq!(*time_corrected_from, Some(year_ahead));
            }
            other => return Err(format!("expected an update, got {other:?}").into()),
        }
        assert!(out
            .iter()
            .any(|e| e.headers.iter().any(|(k, _)| k == TIME_CORRECTED_HEADER)));
        // A late event inside the window still counts; within the tolerance
        // a slightly-ahead clock is kept as is.
        let out = send(
            &mut h,
            "p1",
            track("Order Completed", 80 * DAY, json!({"revenue": 5})),
        )?;
        assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(2)));
        let out = send(
            &mut h,
            "p1",
            track(
                "Order Completed",
                100 * DAY + 1_800_000,
                json!({"revenue": 5}),
            ),
        )?;
        assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(3)));
        // The window then slides with stream time as before.
        let out = h.tick(111 * DAY)?;
        assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(2)));
        Ok(())
    }

    #[test]
    fn a_future_dated_event_can_be_dead_lettered_instead() -> TestResult {
        let set = Arc::new(
            TraitSet::new(&serde_yaml::from_str(DESIGN_TRAITS)?)?.with_event_time(
                crate::event_time::EventTimeConfig {
                    beyond: crate::event_time::FutureTimePolicy::DeadLetter,
                    ..Default::default()
                },
            ),
        );
        let mut h = OperatorHarness::new(TraitsOperator::new(set));
        h.tick(100 * DAY)?;
        let bytes = event_record("p1", track("Order Completed", 465 * DAY, json!({})))?;
        match h.process(Some(b"p1"), &bytes, &[]) {
            Err(OperatorError::Rejected { reason, .. }) => assert_eq!(reason, "future_event_time"),
            other => return Err(format!("expected a dead letter, got {other:?}").into()),
        }
        assert!(
            cdp_pipeline::store::StateBackend::scan_prefix(&h.state, b"profile/")?.is_empty(),
            "nothing stored"
        );
        Ok(())
    }

    #[test]
    fn counters_and_aggregations_follow_the_events() -> TestResult {
        let mut h = harness(DESIGN_TRAITS)?;
        let out = send(
            &mut h,
            "p1",
            track("Order Completed", DAY, json!({"revenue": 19.99})),
        )?;
        let first = changed(&out)?;
        assert_eq!(first.get("orders"), Some(&json!(1)));
        assert_eq!(first.get("orders_30d"), Some(&json!(1)));
        assert_eq!(first.get("big_orders"), Some(&json!(0)));
        assert_eq!(first.get("revenue_total"), Some(&json!(19.99)));
        assert_eq!(first.get("categories"), Some(&json!([])));
        assert_eq!(
            first.get("favorite_category"),
            None,
            "no value yet: not emitted"
        );

        let out = send(
            &mut h,
            "p1",
            track("Order Completed", 2 * DAY, json!({"revenue": 480})),
        )?;
        let second = changed(&out)?;
        assert_eq!(second.get("orders"), Some(&json!(2)));
        assert_eq!(second.get("big_orders"), Some(&json!(1)));
        assert_eq!(second.get("revenue_total"), Some(&json!(499.99)));
        assert_eq!(second.get("revenue_avg"), Some(&json!(249.995)));
        assert_eq!(
            second.get("revenue_min"),
            None,
            "unchanged min is not emitted"
        );
        assert_eq!(second.get("revenue_max"), Some(&json!(480)));
        assert_eq!(second.get("categories"), None);
        Ok(())
    }

    #[test]
    fn every_event_yields_an_update_even_without_changes() -> TestResult {
        let mut h = harness(DESIGN_TRAITS)?;
        send(&mut h, "p1", track("Signed Up", DAY, json!({})))?;
        let out = send(&mut h, "p1", track("Signed Up", 2 * DAY, json!({})))?;
        let ups = updates(&out)?;
        assert_eq!(ups.len(), 1);
        match &ups[0] {
            ProfileUpdate::Update {
                profile_id,
                event,
                traits,
                event_time,
                cause,
                identifiers,
                ..
            } => {
                assert_eq!(profile_id, "p1");
                assert!(traits.is_empty());
                assert_eq!(*event_time, 2 * DAY);
                assert_eq!(
                    event.as_ref().and_then(|e| e.get("event")),
                    Some(&json!("Signed Up"))
                );
                assert_eq!(
                    cause.message_id.as_deref(),
                    Some(format!("m{}", 2 * DAY).as_str())
                );
                assert_eq!(identifiers.get("user_id"), Some(&vec!["u_p1".to_string()]));
            }
            other => return Err(format!("unexpected {other:?}").into()),
        }
        Ok(())
    }

    #[test]
    fn unique_list_keeps_the_most_recent_and_unique_count_counts_distinct_values() -> TestResult {
        let mut h = harness(
            "recent: {unique_list: {event: V, property: properties.c, limit: 2}}\n\
             skus: {unique_count: {event: V, property: properties.c}}\n\
             skus_3: {unique_count: {event: V, property: properties.c, limit: 3}}\n\
             skus_w: {unique_count: {event: V, property: properties.c, within: 12d}}",
        )?;
        let mut seen = BTreeMap::new();
        for (t, c) in [
            (DAY, "z"),
            (2 * DAY, "a"),
            (2 * DAY + 3_600_000, "m"),
            (4 * DAY, "z"),
            (15 * DAY, "b"),
        ] {
            let out = send(&mut h, "p", track("V", t, json!({"c": c})))?;
            seen.extend(changed(&out)?);
        }
        // "z" seen again at day 4 and "b" at day 15 are the two most recent,
        // even though "a" and "m" sort first.
        assert_eq!(seen.get("recent"), Some(&json!(["b", "z"])));
        assert_eq!(seen.get("skus"), Some(&json!(4)));
        assert_eq!(
            seen.get("skus_3"),
            Some(&json!(3)),
            "counts up to its limit"
        );
        assert_eq!(
            seen.get("skus_w"),
            Some(&json!(2)),
            "z (day 4) and b (day 15) within 12d"
        );
        Ok(())
    }

    /// A profile stored by the previous layout (one window entry per event,
    /// a unique list of values) loads and keeps its values.
    #[test]
    fn states_of_the_previous_layout_are_upgraded_on_load() -> TestResult {
        let mut h = harness(DESIGN_TRAITS)?;
        h.tick(10 * DAY)?;
        let old = json!({
            "identifiers": {"user_id": ["u_p"]}, "clock": 10 * DAY,
            "computed": {
                "orders_30d": {"kind": "window", "entries": [[9 * DAY, ""], [10 * DAY, ""]]},
                "categories": {"kind": "unique_list", "values": ["\"bags\""]}
            },
            "emitted": {"orders_30d": 2, "categories": ["bags"]}
        });
        h.state
            .map
            .insert(profile_key("p"), serde_json::to_vec(&old)?);
        let out = send(
            &mut h,
            "p",
            track("Product Viewed", 10 * DAY, json!({"category": "hats"})),
        )?;
        let values = changed(&out)?;
        assert_eq!(values.get("categories"), Some(&json!(["bags", "hats"])));
        let out = send(&mut h, "p", track("Order Completed", 10 * DAY, json!({})))?;
        assert_eq!(
            super::tests::changed(&out)?.get("orders_30d"),
            Some(&json!(3))
        );
        Ok(())
    }

    #[test]
    fn value_traits_use_event_time_not_arrival() -> TestResult {
        let mut h = harness(DESIGN_TRAITS)?;
        let viewed = |t: i64, cat: &str, sku: &str| {
            track("Product Viewed", t, json!({"category": cat, "sku": sku}))
        };
        send(&mut h, "p", viewed(5 * DAY, "shoes", "s5"))?;
        send(&mut h, "p", viewed(3 * DAY, "hats", "s3"))?;
        send(&mut h, "p", viewed(4 * DAY, "hats", "s4"))?;
        let out = send(&mut h, "p", viewed(DAY, "bags", "s1"))?;
        let page = |t: i64, src: &str| {
            json!({"type": "page", "messageId": format!("pg{t}"), "timestamp": rfc3339_ms(t),
                   "context": {"campaign": {"source": src}}})
        };
        let p1 = send(&mut h, "p", page(9 * DAY, "late"))?;
        let p2 = send(&mut h, "p", page(8 * DAY, "early"))?;
        let mut all = BTreeMap::new();
        for o in [&out, &p1, &p2] {
            all.extend(changed(o)?);
        }
        // The last arrival ("bags") is the earliest: last_product stays s5.
        let st = h
            .state
            .map
            .get(profile_key("p").as_slice())
            .ok_or("no state")?;
        let state: ProfileState = serde_json::from_slice(st)?;
        let set = trait_set(DESIGN_TRAITS)?;
        let values = state.values(&set, state.clock);
        assert_eq!(values.get("last_product"), Some(&json!("s5")));
        assert_eq!(values.get("favorite_category"), Some(&json!("hats")));
        assert_eq!(
            values.get("categories"),
            Some(&json!(["hats", "shoes"])),
            "limit 2 keeps the two most recent by event time (bags, the last to arrive, is the oldest)"
        );
        assert_eq!(values.get("first_campaign"), Some(&json!("early")));
        assert_eq!(all.get("first_campaign"), Some(&json!("early")));
        Ok(())
    }

    #[test]
    fn most_frequent_ties_go_to_the_smallest_value() -> TestResult {
        let mut h = harness(DESIGN_TRAITS)?;
        send(
            &mut h,
            "p",
            track("Product Viewed", 2, json!({"category": "b"})),
        )?;
        let out = send(
            &mut h,
            "p",
            track("Product Viewed", 1, json!({"category": "a"})),
        )?;
        assert_eq!(changed(&out)?.get("favorite_category"), Some(&json!("a")));
        Ok(())
    }

    #[test]
    fn identify_traits_are_last_write_wins_by_event_time() -> TestResult {
        let mut h = harness(DESIGN_TRAITS)?;
        let out = send(
            &mut h,
            "p",
            identify(10, json!({"plan": "pro", "email": "a@x.io"})),
        )?;
        let t = changed(&out)?;
        assert_eq!(t.get("plan"), Some(&json!("pro")));
        // An older identify does not overwrite.
        let out = send(&mut h, "p", identify(5, json!({"plan": "free"})))?;
        assert_eq!(changed(&out)?.get("plan"), None);
        // A tie goes to the later arrival; null removes the trait.
        let out = send(
            &mut h,
            "p",
            identify(10, json!({"plan": "team", "email": null})),
        )?;
        let t = changed(&out)?;
        assert_eq!(t.get("plan"), Some(&json!("team")));
        assert_eq!(t.get("email"), Some(&Value::Null));
        Ok(())
    }

    #[test]
    fn identify_traits_in_context_count_too_and_top_level_wins() -> TestResult {
        let mut h = harness(DESIGN_TRAITS)?;
        let mut event = identify(10, json!({"plan": "pro"}));
        event["context"] = json!({"traits": {"plan": "free", "company": "acme"}});
        let t = changed(&send(&mut h, "p", event)?)?;
        assert_eq!(t.get("plan"), Some(&json!("pro")));
        assert_eq!(t.get("company"), Some(&json!("acme")));
        Ok(())
    }

    /// Every trait type over `n` events of one profile (10k distinct
    /// values, one event every 5 min, a tick every 100 events): returns the
    /// largest stored profile state and the largest emitted record.
    fn one_busy_profile(n: usize) -> Result<(usize, usize), Box<dyn Error>> {
        let mut h = harness(
            "orders_30d: {event_counter: {event: E, within: 30d}}\n\
             orders: {event_counter: {event: E}}\n\
             revenue_7d: {aggregation: {event: E, property: properties.r, function: sum, within: 7d}}\n\
             revenue_max: {aggregation: {event: E, property: properties.r, function: max}}\n\
             favorite: {most_frequent: {event: E, property: properties.c, limit: 100}}\n\
             favorite_1d: {most_frequent: {event: E, property: properties.c, within: 1d, limit: 10}}\n\
             recent: {unique_list: {event: E, property: properties.c, limit: 10}}\n\
             distinct: {unique_count: {event: E, property: properties.c, limit: 100}}\n\
             first_c: {first: {event: E, property: properties.c}}\n\
             last_c: {last: {event: E, property: properties.c}}",
        )?;
        let (mut state_max, mut record_max) = (0, 0);
        let mut limited = 0;
        for i in 0..n {
            let t = 1_000_000 + i as i64 * 300_000;
            if i % 100 == 0 {
                h.tick(t)?;
            }
            let event = json!({"type": "track", "event": "E", "timestamp": rfc3339_ms(t),
                               "properties": {"r": i % 7, "c": format!("c{}", (i * 7919) % 10_000)}});
            let out = send(&mut h, "p", event)?;
            limited += out
                .iter()
                .filter(|e| e.headers.iter().any(|(k, _)| k == STATE_LIMIT_HEADER))
                .count();
            record_max = out
                .iter()
                .map(|e| e.value.len())
                .fold(record_max, usize::max);
            if i % 97 == 0 || i + 1 == n {
                let stored = h
                    .state
                    .map
                    .get(profile_key("p").as_slice())
                    .map_or(0, Vec::len);
                state_max = state_max.max(stored);
            }
        }
        assert!(limited > 0, "the most_frequent limit was hit and said so");
        eprintln!("{n} events: state {state_max} bytes, largest record {record_max} bytes");
        Ok((state_max, record_max))
    }

    /// A bot sending 12k events (six weeks, every window full) to one
    /// profile: its state stays bounded (windows in buckets, most_frequent
    /// and unique_count capped). The 1M-event run is below.
    #[test]
    fn a_profile_with_many_events_keeps_its_state_under_the_bound() -> TestResult {
        let (state, record) = one_busy_profile(12_000)?;
        assert!(state < 16 * 1024, "profile state {state} bytes");
        assert!(record < 8 * 1024, "largest record {record} bytes");
        Ok(())
    }

    /// The same with 1M events (slow in a debug build: run with
    /// `cargo nextest run --release -p cdp-operators --run-ignored all million`).
    #[test]
    #[ignore]
    fn a_profile_with_a_million_events_keeps_its_state_under_the_bound() -> TestResult {
        let (state, record) = one_busy_profile(1_000_000)?;
        assert!(state < 16 * 1024, "profile state {state} bytes");
        assert!(record < 8 * 1024, "largest record {record} bytes");
        Ok(())
    }

    #[test]
    fn windows_slide_with_stream_time() -> TestResult {
        let mut h = harness("orders_30d: {event_counter: {event: Order Completed, within: 30d}}")?;
        send(&mut h, "p", track("Order Completed", DAY, json!({})))?;
        let out = send(&mut h, "p", track("Order Completed", 10 * DAY, json!({})))?;
        assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(2)));
        // The first order's bucket (day 1; a 30d window has buckets of one
        // day) leaves the window when its last instant does: at day 32 less
        // 1 ms. A window counts at most one bucket width (1/30) more.
        let leaves = 32 * DAY - 1;
        assert!(h.tick(leaves - 1)?.is_empty());
        let out = h.tick(leaves)?;
        let ups = updates(&out)?;
        assert_eq!(ups.len(), 1);
        match &ups[0] {
            ProfileUpdate::Update {
                traits,
                event,
                cause,
                event_time,
                ..
            } => {
                assert_eq!(traits.get("orders_30d"), Some(&json!(1)));
                assert!(event.is_none());
                assert_eq!(cause.tick, Some(leaves));
                assert_eq!(*event_time, leaves);
            }
            other => return Err(format!("unexpected {other:?}").into()),
        }
        let out = h.tick(45 * DAY)?;
        assert_eq!(changed(&out)?.get("orders_30d"), Some(&json!(0)));
        assert!(h.tick(100 * DAY)?.is_empty(), "no timer left");
        // A late event already out of the window changes nothing.
        let out = send(&mut h, "p", track("Order Completed", 2 * DAY, json!({})))?;
        assert!(changed(&out)?.is_empty());
        Ok(())
    }

    #[test]
    fn late_events_for_a_merged_profile_are_redirected() -> TestResult {
        let mut h = harness(DESIGN_TRAITS)?;
        let merged = serde_json::to_vec(&ProfileRecord::Merged {
            from: "a".into(),
            into: "b".into(),
            identifiers: Identifiers::new(),
            cause: Cause::default(),
        })?;
        h.process(Some(b"a"), &merged, &[])?;
        let out = send(
            &mut h,
            "a",
            track("Order Completed", DAY, json!({"revenue": 5})),
        )?;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].output, outputs::SELF);
        assert_eq!(out[0].key.as_deref(), Some(b"b".as_slice()));
        match serde_json::from_slice::<ProfileRecord>(&out[0].value)? {
            ProfileRecord::Event { profile_id, .. } => assert_eq!(profile_id, "b"),
            other => return Err(format!("unexpected {other:?}").into()),
        }
        assert!(!h.state.map.contains_key(profile_key("a").as_slice()));
        Ok(())
    }

    #[test]
    fn a_merge_transfers_state_and_emits_the_merged_values() -> TestResult {
        let mut h = harness(DESIGN_TRAITS)?;
        send(
            &mut h,
            "a",
            track("Order Completed", DAY, json!({"revenue": 100})),
        )?;
        send(
            &mut h,
            "a",
            track("Order Completed", 2 * DAY, json!({"revenue": 300})),
        )?;
        send(
            &mut h,
            "b",
            track("Order Completed", 3 * DAY, json!({"revenue": 200})),
        )?;
        let merged = serde_json::to_vec(&ProfileRecord::Merged {
            from: "a".into(),
            into: "b".into(),
            identifiers: Identifiers::new(),
            cause: Cause {
                message_id: Some("m-merge".into()),
                tick: None,
            },
        })?;
        let out = h.process(Some(b"a"), &merged, &[])?;
        let transfer = out
            .iter()
            .find(|e| e.output == outputs::SELF)
            .ok_or("no transfer")?;
        assert_eq!(transfer.key.as_deref(), Some(b"b".as_slice()));
        let forwarded = updates(&out)?;
        assert!(
            matches!(forwarded.as_slice(), [ProfileUpdate::Merged { from, into, .. }] if from == "a" && into == "b")
        );
        assert!(!h.state.map.contains_key(profile_key("a").as_slice()));

        let value = transfer.value.clone();
        let out = h.process(Some(b"b"), &value, &[])?;
        let t = changed(&out)?;
        assert_eq!(t.get("orders"), Some(&json!(3)));
        assert_eq!(t.get("revenue_total"), Some(&json!(600)));
        assert_eq!(t.get("revenue_max"), Some(&json!(300)));
        assert_eq!(t.get("revenue_min"), Some(&json!(100)));
        assert_eq!(
            t.get("categories"),
            None,
            "unchanged values are not emitted"
        );
        Ok(())
    }

    #[test]
    fn malformed_records_are_rejected_without_state() -> TestResult {
        let mut h = harness(DESIGN_TRAITS)?;
        for bad in [
            b"not json".to_vec(),
            serde_json::to_vec(
                &json!({"type": "event", "profile_id": "p", "identifiers": {}, "event": 5}),
            )?,
            serde_json::to_vec(
                &json!({"type": "merged", "from": "p", "into": "p", "identifiers": {}, "cause": {}}),
            )?,
        ] {
            match h.process(Some(b"p"), &bad, &[]) {
                Err(OperatorError::Rejected { .. }) => {}
                other => return Err(format!("expected a rejection, got {other:?}").into()),
            }
        }
        assert!(h.state.map.is_empty());
        Ok(())
    }

    #[test]
    fn config_errors_name_the_field() -> TestResult {
        let bad = "t: {event_counter: {event: X, where: [{property: p, gt: [1]}]}}";
        let de = serde_yaml::Deserializer::from_str(bad);
        let err = match serde_path_to_error::deserialize::<_, BTreeMap<String, TraitDef>>(de) {
            Err(e) => e,
            Ok(_) => return Err("expected an error".into()),
        };
        assert!(
            err.path()
                .to_string()
                .starts_with("t.event_counter.where[0]"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("`gt` expects a number or a string"),
            "{err}"
        );
        for bad in [
            "t: {event_counter: {event: X, window: 3d}}",
            "t: {event_counter: {event: X, where: [{property: p, gt: 1, lt: 5}]}}",
            "t: {event_counter: {event: X, where: [{property: p, between: 1}]}}",
            "t: {sum: {event: X}}",
        ] {
            assert!(
                serde_yaml::from_str::<BTreeMap<String, TraitDef>>(bad).is_err(),
                "{bad}"
            );
        }
        let zero: BTreeMap<String, TraitDef> =
            serde_yaml::from_str("t: {event_counter: {event: X, within: 0d}}")?;
        let err = TraitSet::new(&zero).err().ok_or("expected an error")?;
        assert_eq!(err.path, "traits.t.event_counter.within");
        let set = trait_set(DESIGN_TRAITS)?;
        assert!(set.names().contains("orders_30d"));
        Ok(())
    }

    #[test]
    fn comparisons_follow_the_documented_rules() {
        let c = |k: &str, v: Value| Comparison::from_key(k, v).ok().flatten();
        let cases: Vec<(Option<Comparison>, Option<Value>, bool)> = vec![
            (c("eq", json!(1)), Some(json!(1.0)), true),
            (c("eq", json!("a")), None, false),
            (c("ne", json!("a")), None, true),
            (c("ne", json!("a")), Some(json!("b")), true),
            (c("gt", json!(100)), Some(json!(100.5)), true),
            (c("gt", json!(100)), Some(json!("200")), false),
            (
                c("gte", json!("2026-01-01")),
                Some(json!("2026-02-01")),
                true,
            ),
            (c("lt", json!(0)), Some(json!(-1)), true),
            (c("lte", json!(0)), Some(Value::Null), false),
            (c("contains", json!("oe")), Some(json!("shoes")), true),
            (c("contains", json!(2)), Some(json!([1, 2])), true),
            (c("in", json!(["a", "b"])), Some(json!("b")), true),
            (c("in", json!(["a", "b"])), Some(json!("c")), false),
            (c("exists", json!(true)), Some(Value::Null), false),
            (c("exists", json!(false)), None, true),
        ];
        for (i, (cmp, value, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                cmp.map(|c| c.matches(value.as_ref())),
                Some(want),
                "case {i}"
            );
        }
        assert!(Comparison::from_key("in", json!(1)).is_err());
        assert!(Comparison::from_key("exists", json!("yes")).is_err());
        assert_eq!(Comparison::from_key("nope", json!(1)), Ok(None));
    }

    // -- property tests: mergeable state, order independence --------------

    /// One definition per trait type, windowed and not.
    fn every_def() -> Result<Vec<TraitDef>, serde_yaml::Error> {
        [
            "{event_counter: {event: E}}",
            "{event_counter: {event: E, within: 30ms}}",
            "{aggregation: {event: E, property: v, function: sum}}",
            "{aggregation: {event: E, property: v, function: avg, within: 30ms}}",
            "{aggregation: {event: E, property: v, function: min}}",
            "{aggregation: {event: E, property: v, function: max, within: 30ms}}",
            "{most_frequent: {event: E, property: v}}",
            "{most_frequent: {event: E, property: v, within: 30ms}}",
            "{first: {event: E, property: v}}",
            "{last: {event: E, property: v}}",
            "{unique_list: {event: E, property: v, limit: 3}}",
            "{unique_list: {event: E, property: v, limit: 3, within: 30ms}}",
            "{unique_count: {event: E, property: v, limit: 4}}",
            "{unique_count: {event: E, property: v, within: 30ms}}",
        ]
        .iter()
        .map(|y| serde_yaml::from_str(y))
        .collect()
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            (-20i64..20).prop_map(|n| json!(n)),
            // Halves are exact in binary: float sums compare exactly.
            (-40i64..40).prop_map(|n| json!(n as f64 / 2.0 + 0.25)),
            prop::sample::select(vec!["a", "b", "c", "d", "e"]).prop_map(|s| json!(s)),
        ]
    }

    fn arb_events() -> impl Strategy<Value = Vec<(i64, Value)>> {
        prop::collection::vec((0i64..100, arb_value()), 0..12)
    }

    fn fold(def: &TraitDef, events: &[(i64, Value)]) -> TraitState {
        let mut state = TraitState::empty(def);
        for (t, v) in events {
            if let Some(text) = def.extract(&json!({ "v": v })) {
                state.add(def, *t, &text);
            }
        }
        state
    }

    /// Every trait type, windowed where it can be.
    const EVERY_TYPE: &str = "counter: {event_counter: {event: E}}\n\
                              counter_w: {event_counter: {event: E, within: 30ms}}\n\
                              sum: {aggregation: {event: E, property: properties.v, function: sum}}\n\
                              avg_w: {aggregation: {event: E, property: properties.v, function: avg, within: 30ms}}\n\
                              min: {aggregation: {event: E, property: properties.v, function: min}}\n\
                              max: {aggregation: {event: E, property: properties.v, function: max}}\n\
                              mf: {most_frequent: {event: E, property: properties.v}}\n\
                              mf_w: {most_frequent: {event: E, property: properties.v, within: 30ms}}\n\
                              first: {first: {event: E, property: properties.v}}\n\
                              last: {last: {event: E, property: properties.v}}\n\
                              uniq: {unique_list: {event: E, property: properties.v, limit: 3}}\n\
                              uniq_w: {unique_list: {event: E, property: properties.v, limit: 3, within: 30ms}}\n\
                              ucount: {unique_count: {event: E, property: properties.v, limit: 4}}\n\
                              ucount_w: {unique_count: {event: E, property: properties.v, within: 30ms}}\n\
                              other: {event_counter: {event: E, where: [{property: properties.flag, eq: true}]}}";

    /// Downstream view of profile `id`: its `Update`s applied in order.
    fn apply_updates(
        seen: &mut BTreeMap<String, Value>,
        id: &str,
        out: &[Emitted],
    ) -> Result<(), String> {
        for u in updates(out).map_err(|e| e.to_string())? {
            if let ProfileUpdate::Update {
                profile_id, traits, ..
            } = u
            {
                if profile_id != id {
                    continue;
                }
                for (k, v) in traits {
                    if v.is_null() {
                        seen.remove(&k);
                    } else {
                        seen.insert(k, v);
                    }
                }
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn trait_states_merge_like_the_union_of_their_events(
            a in arb_events(), b in arb_events(), c in arb_events(), now in 0i64..130,
        ) {
            let defs = every_def().map_err(|e| TestCaseError::fail(e.to_string()))?;
            for def in &defs {
                let (sa, sb, sc) = (fold(def, &a), fold(def, &b), fold(def, &c));
                let union: Vec<(i64, Value)> = a.iter().chain(&b).cloned().collect();
                let su = fold(def, &union);
                prop_assert_eq!(&sa.merge(def, &sb), &su, "union law for {:?}", def);
                prop_assert_eq!(sa.merge(def, &sb), sb.merge(def, &sa), "commutative for {:?}", def);
                prop_assert_eq!(
                    sa.merge(def, &sb).merge(def, &sc),
                    sa.merge(def, &sb.merge(def, &sc)),
                    "associative for {:?}", def
                );
                // Pruning at the same time commutes with merging.
                let (mut pa, mut pb, mut pu) = (sa.clone(), sb.clone(), su.clone());
                pa.prune(def, now);
                pb.prune(def, now);
                pu.prune(def, now);
                let mut pm = pa.merge(def, &pb);
                pm.prune(def, now);
                prop_assert_eq!(&pm, &pu, "prune then merge for {:?}", def);
                prop_assert_eq!(pm.value(def, now), su.value(def, now), "pruned value for {:?}", def);
            }
        }

        #[test]
        fn trait_values_do_not_depend_on_arrival_order(
            events in prop::collection::vec((0i64..100, arb_value(), any::<bool>()), 1..12)
                .prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle())),
        ) {
            let (ordered, shuffled) = events;
            let run = |events: &[(i64, Value, bool)]| -> Result<BTreeMap<String, Value>, String> {
                let mut h = harness(EVERY_TYPE).map_err(|e| e.to_string())?;
                let mut seen = BTreeMap::new();
                for (t, v, flag) in events {
                    let out = send(&mut h, "p", track("E", *t, json!({"v": v, "flag": flag})))
                        .map_err(|e| e.to_string())?;
                    for (k, v) in changed(&out).map_err(|e| e.to_string())? {
                        if v.is_null() { seen.remove(&k); } else { seen.insert(k, v); }
                    }
                }
                Ok(seen)
            };
            let a = run(&ordered).map_err(TestCaseError::fail)?;
            let b = run(&shuffled).map_err(TestCaseError::fail)?;
            prop_assert_eq!(a, b);
        }

        #[test]
        fn a_profile_merge_gives_the_values_of_one_profile_with_every_event(
            events in prop::collection::vec((0i64..100, arb_value(), any::<bool>(), any::<bool>()), 0..12),
        ) {
            let fail = |e: Box<dyn Error>| TestCaseError::fail(e.to_string());
            let record = |t: i64, v: &Value, flag: bool| track("E", t, json!({"v": v, "flag": flag}));
            // One profile with every event.
            let mut one = harness(EVERY_TYPE).map_err(fail)?;
            let mut expected = BTreeMap::new();
            for (t, v, flag, _) in &events {
                let out = send(&mut one, "b", record(*t, v, *flag)).map_err(fail)?;
                apply_updates(&mut expected, "b", &out).map_err(TestCaseError::fail)?;
            }
            // The same events split over `a` and `b`, then `a` merged into `b`.
            let mut two = harness(EVERY_TYPE).map_err(fail)?;
            let mut seen = BTreeMap::new();
            for (t, v, flag, to_a) in &events {
                let id = if *to_a { "a" } else { "b" };
                let out = send(&mut two, id, record(*t, v, *flag)).map_err(fail)?;
                apply_updates(&mut seen, "b", &out).map_err(TestCaseError::fail)?;
            }
            let merged = serde_json::to_vec(&ProfileRecord::Merged {
                from: "a".into(),
                into: "b".into(),
                identifiers: Identifiers::new(),
                cause: Cause::default(),
            }).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let out = two.process(Some(b"a"), &merged, &[]).map_err(|e| TestCaseError::fail(e.to_string()))?;
            for transfer in out.iter().filter(|e| e.output == outputs::SELF) {
                let out = two
                    .process(transfer.key.as_deref(), &transfer.value, &[])
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                apply_updates(&mut seen, "b", &out).map_err(TestCaseError::fail)?;
            }
            prop_assert_eq!(seen, expected);
        }
    }
}
