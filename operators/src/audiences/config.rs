//! The `audiences` config section: audience definitions and conditions.

use std::fmt;

use cdp_pipeline::Span;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use crate::traits::{
    keyed_comparison_schema, set_comparison, Comparison, PropertyCondition, COMPARISONS,
};

/// One audience (`audiences.<name>`).
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AudienceDef {
    /// The condition a profile must meet to be a member.
    #[serde(rename = "where")]
    pub r#where: Condition,
}

/// A membership condition. Written as a map whose key names the kind:
/// `{all: [..]}`, `{any: [..]}`, `{not: cond}`, `{trait: name, gte: 5}`,
/// `{event: name, count: {gte: 2}, within: 30d, where: [..]}`,
/// `{audience: name}`, `{sequence: [{event: A}, {event: B}], within: 1d}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Every condition holds (true when empty).
    All(Vec<Condition>),
    /// At least one condition holds (false when empty).
    Any(Vec<Condition>),
    /// The condition does not hold: `{not: {event: X, within: 14d}}` is
    /// "did not perform X in the last 14 days".
    Not(Box<Condition>),
    /// A trait (computed or from `identify`) compares as given.
    Trait(TraitCondition),
    /// The profile performed an event, `count` times (default: at least
    /// once), within a window (default: ever).
    Event(EventCondition),
    /// The profile is a member of another audience.
    Audience(String),
    /// Events in order, by event time.
    Sequence(SequenceCondition),
}

/// `{trait: name, <comparison>}`.
#[derive(Debug, Clone, PartialEq)]
pub struct TraitCondition {
    /// The trait's name.
    pub name: String,
    /// How its value must compare.
    pub op: Comparison,
}

/// `{event: name, count?, within?, where?}`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventCondition {
    /// Event name (`page` calls are `Page Viewed`).
    pub event: String,
    /// How many matching events; absent means at least one.
    pub count: Option<CountCondition>,
    /// Only events with event time in the last `within` count.
    pub within: Option<Span>,
    /// Property conditions every counted event must meet.
    pub r#where: Vec<PropertyCondition>,
}

/// A count comparison, `{gte: 2}`; several keys must all hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountCondition {
    /// Exactly this many.
    pub eq: Option<u64>,
    /// Not this many.
    pub ne: Option<u64>,
    /// More than this many.
    pub gt: Option<u64>,
    /// At least this many.
    pub gte: Option<u64>,
    /// Fewer than this many.
    pub lt: Option<u64>,
    /// At most this many.
    pub lte: Option<u64>,
}

impl CountCondition {
    /// Whether some count passes every comparison (`{gt: 3, lt: 2}` is
    /// none: a condition that never holds is a mistake).
    pub fn is_satisfiable(&self) -> bool {
        let low = [self.eq, self.gte, self.gt.map(|x| x.saturating_add(1))]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(0);
        let high = [self.eq, self.lte, self.lt.map(|x| x.saturating_sub(1))]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(u64::MAX);
        let empty_below = self.lt == Some(0) || self.gt == Some(u64::MAX);
        // Between `low` and `high`, `ne` rules out one value.
        !empty_below && low <= high && !(low == high && self.ne == Some(low))
    }

    /// Whether `n` passes every given comparison.
    pub fn matches(&self, n: u64) -> bool {
        self.eq.is_none_or(|x| n == x)
            && self.ne.is_none_or(|x| n != x)
            && self.gt.is_none_or(|x| n > x)
            && self.gte.is_none_or(|x| n >= x)
            && self.lt.is_none_or(|x| n < x)
            && self.lte.is_none_or(|x| n <= x)
    }
}

const COUNT_FIELDS: &[&str] = &["eq", "ne", "gt", "gte", "lt", "lte"];

impl<'de> Deserialize<'de> for CountCondition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CountVisitor;
        impl<'de> Visitor<'de> for CountVisitor {
            type Value = CountCondition;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map like {gte: 2}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CountCondition, A::Error> {
                let mut c = CountCondition::default();
                let mut any = false;
                while let Some(key) = map.next_key::<String>()? {
                    let slot = match key.as_str() {
                        "eq" => &mut c.eq,
                        "ne" => &mut c.ne,
                        "gt" => &mut c.gt,
                        "gte" => &mut c.gte,
                        "lt" => &mut c.lt,
                        "lte" => &mut c.lte,
                        other => return Err(de::Error::unknown_field(other, COUNT_FIELDS)),
                    };
                    if slot.is_some() {
                        return Err(de::Error::custom(format!("duplicate field `{key}`")));
                    }
                    *slot = Some(map.next_value()?);
                    any = true;
                }
                if !any {
                    return Err(de::Error::custom(
                        "expected at least one of eq, ne, gt, gte, lt, lte",
                    ));
                }
                Ok(c)
            }
        }
        d.deserialize_map(CountVisitor)
    }
}

/// `{sequence: [steps], within?}`.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceCondition {
    /// The events, in the order they must happen: each at or after the one
    /// before by event time (steps in the same millisecond must name
    /// different events).
    pub steps: Vec<SequenceStep>,
    /// Most time from the first step's event to the last step's event;
    /// unbounded when absent. Once a sequence happened it stays true.
    pub within: Option<Span>,
}

/// One step of a sequence: `{event: Product Viewed, where?: [..]}`.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SequenceStep {
    /// Event name.
    pub event: String,
    /// Property conditions the event must meet.
    #[serde(default, rename = "where")]
    pub r#where: Vec<PropertyCondition>,
}

const CONDITION_KINDS: &[&str] = &[
    "all", "any", "not", "trait", "event", "audience", "sequence",
];
const CONDITION_FIELDS: &[&str] = &[
    "all", "any", "not", "trait", "event", "audience", "sequence", "count", "within", "where",
    "eq", "ne", "gt", "gte", "lt", "lte", "contains", "in", "exists",
];

impl<'de> Deserialize<'de> for Condition {
    // By hand, key by key: every value is read with `next_value`, so
    // `serde_path_to_error` reports paths such as `where.all[1].count`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ConditionVisitor)
    }
}

struct ConditionVisitor;

#[derive(Default)]
struct ConditionFields {
    kinds: Vec<&'static str>,
    all: Option<Vec<Condition>>,
    any: Option<Vec<Condition>>,
    not: Option<Condition>,
    trait_name: Option<String>,
    event: Option<String>,
    audience: Option<String>,
    sequence: Option<Vec<SequenceStep>>,
    count: Option<CountCondition>,
    within: Option<Span>,
    r#where: Option<Vec<PropertyCondition>>,
    op: Option<Comparison>,
}

impl<'de> Visitor<'de> for ConditionVisitor {
    type Value = Condition;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a condition: a map with one of {}",
            CONDITION_KINDS.join(", ")
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Condition, A::Error> {
        let mut f = ConditionFields::default();
        while let Some(key) = map.next_key::<String>()? {
            let key = key.as_str();
            let duplicate = || de::Error::custom(format!("duplicate field `{key}`"));
            if let Some(kind) = CONDITION_KINDS.iter().copied().find(|k| *k == key) {
                if f.kinds.contains(&kind) {
                    return Err(duplicate());
                }
                f.kinds.push(kind);
                match kind {
                    "all" => f.all = Some(map.next_value()?),
                    "any" => f.any = Some(map.next_value()?),
                    "not" => f.not = Some(map.next_value()?),
                    "trait" => f.trait_name = Some(map.next_value()?),
                    "event" => f.event = Some(map.next_value()?),
                    "audience" => f.audience = Some(map.next_value()?),
                    _ => f.sequence = Some(map.next_value()?),
                }
                continue;
            }
            match key {
                "count" if f.count.is_some() => return Err(duplicate()),
                "count" => f.count = Some(map.next_value()?),
                "within" if f.within.is_some() => return Err(duplicate()),
                "within" => f.within = Some(map.next_value()?),
                "where" if f.r#where.is_some() => return Err(duplicate()),
                "where" => f.r#where = Some(map.next_value()?),
                k if COMPARISONS.contains(&k) => {
                    let value: Value = map.next_value()?;
                    set_comparison(&mut f.op, k, value, CONDITION_FIELDS)?;
                }
                other => return Err(de::Error::unknown_field(other, CONDITION_FIELDS)),
            }
        }
        build_condition(f).map_err(de::Error::custom)
    }
}

/// Check which keys go together and build the condition.
fn build_condition(f: ConditionFields) -> Result<Condition, String> {
    let kind = match f.kinds.as_slice() {
        [kind] => *kind,
        [] => return Err(format!("expected one of {}", CONDITION_KINDS.join(", "))),
        many => {
            return Err(format!(
                "a condition has exactly one of {}; found {}",
                CONDITION_KINDS.join(", "),
                many.join(" and ")
            ))
        }
    };
    let allowed: &[&str] = match kind {
        "trait" => &["comparison"],
        "event" => &["count", "within", "where"],
        "sequence" => &["within"],
        _ => &[],
    };
    for (field, present) in [
        ("count", f.count.is_some()),
        ("within", f.within.is_some()),
        ("where", f.r#where.is_some()),
        ("comparison", f.op.is_some()),
    ] {
        if present && !allowed.contains(&field) {
            let field = if field == "comparison" {
                "a comparison"
            } else {
                field
            };
            return Err(format!("`{field}` does not go with `{kind}`"));
        }
    }
    let missing = || format!("`{kind}` is missing its value");
    Ok(match kind {
        "all" => Condition::All(f.all.ok_or_else(missing)?),
        "any" => Condition::Any(f.any.ok_or_else(missing)?),
        "not" => Condition::Not(Box::new(f.not.ok_or_else(missing)?)),
        "trait" => Condition::Trait(TraitCondition {
            name: f.trait_name.ok_or_else(missing)?,
            op: f.op.ok_or_else(|| {
                format!("`trait` needs one comparison ({})", COMPARISONS.join(" "))
            })?,
        }),
        "event" => Condition::Event(EventCondition {
            event: f.event.ok_or_else(missing)?,
            count: f.count,
            within: f.within,
            r#where: f.r#where.unwrap_or_default(),
        }),
        "audience" => Condition::Audience(f.audience.ok_or_else(missing)?),
        _ => Condition::Sequence(SequenceCondition {
            steps: f.sequence.ok_or_else(missing)?,
            within: f.within,
        }),
    })
}

// JSON Schemas of the hand-read shapes above, for `cdp config schema`.

/// `{kind: value}` and nothing else.
fn single_key(kind: &str, description: &str, value: serde_json::Value) -> serde_json::Value {
    json!({
        "description": description,
        "type": "object",
        "properties": { kind: value },
        "required": [kind],
        "additionalProperties": false
    })
}

impl JsonSchema for Condition {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Condition".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let condition = generator.subschema_for::<Condition>().to_value();
        let conditions = json!({ "type": "array", "items": condition });
        json_schema!({
            "description": "A membership condition: a map whose key names the kind (`all`, `any`, `not`, `trait`, `event`, `audience`, `sequence`).",
            "oneOf": [
                single_key("all", "Every condition holds (true when empty).", conditions.clone()),
                single_key("any", "At least one condition holds (false when empty).", conditions),
                single_key(
                    "not",
                    "The condition does not hold: `{not: {event: X, within: 14d}}` is \"did not perform X in the last 14 days\".",
                    condition,
                ),
                generator.subschema_for::<TraitCondition>().to_value(),
                generator.subschema_for::<EventCondition>().to_value(),
                single_key(
                    "audience",
                    "The profile is a member of another audience.",
                    json!({ "type": "string", "description": "The audience's name." }),
                ),
                generator.subschema_for::<SequenceCondition>().to_value(),
            ]
        })
    }
}

impl JsonSchema for TraitCondition {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TraitCondition".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        keyed_comparison_schema(
            "A trait (computed or from `identify`) compares as given, with exactly one comparison: `{trait: ltv, gte: 500}`.",
            "trait",
            "The trait's name.",
        )
    }
}

/// The schema of a `within` duration with its own description.
fn described_span(generator: &mut SchemaGenerator, description: &str) -> Value {
    let mut within = generator.subschema_for::<Span>().to_value();
    within["description"] = json!(description);
    within
}

impl JsonSchema for EventCondition {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "EventCondition".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let within = described_span(
            generator,
            "Only events with event time in the last `within` count.",
        );
        json_schema!({
            "description": "The profile performed an event, `count` times (default: at least once), within a window (default: ever): `{event: name, count?, within?, where?}`.",
            "type": "object",
            "properties": {
                "event": {
                    "type": "string",
                    "description": "Event name (`page` calls are `Page Viewed`)."
                },
                "count": generator.subschema_for::<CountCondition>().to_value(),
                "within": within,
                "where": {
                    "type": "array",
                    "items": generator.subschema_for::<PropertyCondition>().to_value(),
                    "description": "Property conditions every counted event must meet."
                }
            },
            "required": ["event"],
            "additionalProperties": false
        })
    }
}

impl JsonSchema for CountCondition {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "CountCondition".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let count = |description: &str| json!({ "type": "integer", "minimum": 0, "description": description });
        json_schema!({
            "description": "How many matching events, `{gte: 2}`; several keys must all hold.",
            "type": "object",
            "properties": {
                "eq": count("Exactly this many."),
                "ne": count("Not this many."),
                "gt": count("More than this many."),
                "gte": count("At least this many."),
                "lt": count("Fewer than this many."),
                "lte": count("At most this many.")
            },
            "additionalProperties": false,
            "minProperties": 1
        })
    }
}

impl JsonSchema for SequenceCondition {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SequenceCondition".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let within = described_span(generator, "Most time from the first step's event to the last step's event; unbounded when absent. Once a sequence happened it stays true.");
        json_schema!({
            "description": "Events in order, by event time: `{sequence: [steps], within?}`.",
            "type": "object",
            "properties": {
                "sequence": {
                    "type": "array",
                    "items": generator.subschema_for::<SequenceStep>().to_value(),
                    "description": "The events, in the order they must happen: each at or after the one before by event time (steps in the same millisecond must name different events)."
                },
                "within": within
            },
            "required": ["sequence"],
            "additionalProperties": false
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bound() -> impl Strategy<Value = Option<u64>> {
        proptest::option::of(0u64..8)
    }

    proptest! {
        /// Against a search of every count up to past the bounds.
        #[test]
        fn a_count_condition_is_satisfiable_when_some_count_matches(
            eq in bound(), ne in bound(), gt in bound(), gte in bound(), lt in bound(), lte in bound(),
        ) {
            let c = CountCondition { eq, ne, gt, gte, lt, lte };
            let some = (0u64..20).any(|n| c.matches(n));
            prop_assert_eq!(c.is_satisfiable(), some, "{:?}", c);
        }
    }
}
