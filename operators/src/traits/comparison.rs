//! Comparisons and property conditions (shared with the audiences stage).

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};

use crate::messages::EventRead;

/// The comparison keys a condition may use.
pub(crate) const COMPARISONS: &[&str] = &[
    "eq", "ne", "gt", "gte", "lt", "lte", "contains", "in", "exists",
];

const PROPERTY_CONDITION_FIELDS: &[&str] = &[
    "property", "eq", "ne", "gt", "gte", "lt", "lte", "contains", "in", "exists",
];

/// What a trait's values always are, where its definition fixes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// `event_counter`, `aggregation`, `unique_count`.
    Number,
    /// `unique_list`.
    List,
}

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

    /// The config key the comparison is written with (`gt`).
    pub fn key(&self) -> &'static str {
        match self {
            Comparison::Eq(_) => "eq",
            Comparison::Ne(_) => "ne",
            Comparison::Gt(_) => "gt",
            Comparison::Gte(_) => "gte",
            Comparison::Lt(_) => "lt",
            Comparison::Lte(_) => "lte",
            Comparison::Contains(_) => "contains",
            Comparison::In(_) => "in",
            Comparison::Exists(_) => "exists",
        }
    }

    /// Why the comparison can never tell values of `kind` apart (it holds
    /// for all of them or for none), or `None` when it can.
    pub fn mistyped_for(&self, kind: ValueKind) -> Option<String> {
        let fits = |v: &Value| match kind {
            ValueKind::Number => v.is_number(),
            ValueKind::List => v.is_array(),
        };
        let (noun, write) = match kind {
            ValueKind::Number => ("a number", "a number"),
            ValueKind::List => ("a list", "a list, or use `contains`"),
        };
        let key = self.key();
        match self {
            Comparison::Eq(v) | Comparison::Ne(v) if !fits(v) => Some(format!(
                "the trait is {noun}, so `{key}: {v}` never tells its values apart: write {write}"
            )),
            Comparison::Gt(v) | Comparison::Gte(v) | Comparison::Lt(v) | Comparison::Lte(v)
                if kind == ValueKind::List || !fits(v) =>
            {
                Some(format!(
                    "the trait is {noun}, so `{key}: {v}` never holds: {}",
                    match kind {
                        ValueKind::Number => "write a number",
                        ValueKind::List => "a list has no order (use `contains`)",
                    }
                ))
            }
            Comparison::In(items) => items.iter().find(|v| !fits(v)).map(|v| {
                format!("the trait is {noun}, so {v} in `in` never matches it: write {write}")
            }),
            Comparison::Contains(v) if kind == ValueKind::Number => Some(format!(
                "the trait is a number, so `contains: {v}` never holds: compare it with eq, gt, gte, lt or lte"
            )),
            _ => None,
        }
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
    pub fn matches_event<E: EventRead + ?Sized>(&self, event: &E) -> bool {
        self.op.matches(event.lookup(&self.property))
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
