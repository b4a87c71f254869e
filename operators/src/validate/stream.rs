//! Body schemas the fast path checks while it reads a value.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::envelope::{Skip, SkipVisitor};
use super::plan::compile_schema;
use super::spec::Shape;

/// A schema the fast path checks while it reads a value, building only
/// the leaves: objects and arrays of `type: object` / `type: array` with
/// only `properties`, `required`, `items`, `minItems`, `maxItems` (and
/// annotations) are walked; any other subschema is a [`Stream::Leaf`],
/// its value parsed and checked by `jsonschema`. Schemas with `$`
/// keywords (`$ref`, `$schema`, ...) are never streamed.
#[derive(Debug)]
pub(super) enum Stream {
    Object {
        properties: Vec<(String, Stream)>,
        required: Vec<String>,
    },
    Array {
        items: Option<Box<Stream>>,
        min_items: Option<u64>,
        max_items: Option<u64>,
    },
    Leaf(jsonschema::Validator),
}

/// Keys per object a [`Stream::Object`] tracks (bit sets of `u64`).
const STREAM_MAX_KEYS: usize = 64;

impl Stream {
    /// The stream of a body schema: only an object node is worth it.
    pub(super) fn for_schema(schema: &Value) -> Option<Stream> {
        if has_dollar_key(schema) {
            return None;
        }
        match Stream::node(schema) {
            Some(node @ Stream::Object { .. }) => Some(node),
            _ => None,
        }
    }

    fn node(schema: &Value) -> Option<Stream> {
        Stream::structural(schema).or_else(|| compile_schema("", schema).ok().map(Stream::Leaf))
    }

    fn structural(schema: &Value) -> Option<Stream> {
        let m = schema.as_object()?;
        let only = |allowed: &[&str]| {
            m.keys().all(|k| {
                allowed.contains(&k.as_str()) || k == "type" || k == "title" || k == "description"
            })
        };
        match m.get("type")?.as_str()? {
            "object" if only(&["properties", "required"]) => {
                let properties = match m.get("properties") {
                    None => Vec::new(),
                    Some(Value::Object(p)) => p
                        .iter()
                        .map(|(k, s)| Some((k.clone(), Stream::node(s)?)))
                        .collect::<Option<Vec<_>>>()?,
                    Some(_) => return None,
                };
                let required = match m.get("required") {
                    None => Vec::new(),
                    Some(Value::Array(r)) => r
                        .iter()
                        .map(|k| k.as_str().map(String::from))
                        .collect::<Option<Vec<_>>>()?,
                    Some(_) => return None,
                };
                if properties.len() > STREAM_MAX_KEYS || required.len() > STREAM_MAX_KEYS {
                    return None;
                }
                Some(Stream::Object {
                    properties,
                    required,
                })
            }
            "array" if only(&["items", "minItems", "maxItems"]) => {
                let items = match m.get("items") {
                    None => None,
                    Some(s @ Value::Object(_)) => Some(Box::new(Stream::node(s)?)),
                    Some(_) => return None,
                };
                let count = |k: &str| match m.get(k) {
                    None => Some(None),
                    Some(v) => v.as_u64().map(Some),
                };
                Some(Stream::Array {
                    items,
                    min_items: count("minItems")?,
                    max_items: count("maxItems")?,
                })
            }
            _ => None,
        }
    }
}

/// Whether any object in `v` has a key starting with `$`.
fn has_dollar_key(v: &Value) -> bool {
    match v {
        Value::Object(m) => m
            .iter()
            .any(|(k, v)| k.starts_with('$') || has_dollar_key(v)),
        Value::Array(a) => a.iter().any(has_dollar_key),
        _ => false,
    }
}

/// What a [`Stream`] found while reading a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Valid,
    Invalid,
    /// Reading alone cannot tell (a repeated member name).
    Unsure,
}

impl Verdict {
    fn and(self, other: Verdict) -> Verdict {
        match (self, other) {
            (Verdict::Unsure, _) | (_, Verdict::Unsure) => Verdict::Unsure,
            (Verdict::Invalid, _) | (_, Verdict::Invalid) => Verdict::Invalid,
            _ => Verdict::Valid,
        }
    }
}

/// A value checked against a [`Stream`] while read: its shape and
/// the verdict. As strict as parsing it.
pub(super) struct Checked<'s>(pub(super) &'s Stream);

impl<'de> DeserializeSeed<'de> for Checked<'_> {
    type Value = (Shape, Verdict);
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        match self.0 {
            Stream::Leaf(schema) => {
                let value = <Value as de::Deserialize>::deserialize(deserializer)?;
                let verdict = if schema.is_valid(&value) {
                    Verdict::Valid
                } else {
                    Verdict::Invalid
                };
                Ok((Shape::of(&value), verdict))
            }
            _ => deserializer.deserialize_any(self),
        }
    }
}

fn invalid(shape: Shape) -> (Shape, Verdict) {
    (shape, Verdict::Invalid)
}

impl<'de> Visitor<'de> for Checked<'_> {
    type Value = (Shape, Verdict);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    // Objects and arrays only: anything else breaks `type`.
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(invalid(Shape::Null))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(invalid(Shape::Bool))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(invalid(Shape::Number))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(invalid(Shape::Number))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(invalid(Shape::Number))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(invalid(Shape::String))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let Stream::Array {
            items,
            min_items,
            max_items,
        } = self.0
        else {
            while seq.next_element::<Skip>()?.is_some() {}
            return Ok(invalid(Shape::Array));
        };
        let (mut count, mut verdict) = (0u64, Verdict::Valid);
        match items {
            Some(items) => {
                while let Some((_, v)) = seq.next_element_seed(Checked(items))? {
                    count += 1;
                    verdict = verdict.and(v);
                }
            }
            None => {
                while seq.next_element::<Skip>()?.is_some() {
                    count += 1;
                }
            }
        }
        if min_items.is_some_and(|n| count < n) || max_items.is_some_and(|n| count > n) {
            verdict = verdict.and(Verdict::Invalid);
        }
        Ok((Shape::Array, verdict))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let Stream::Object {
            properties,
            required,
        } = self.0
        else {
            let shape = SkipVisitor.visit_map(map)?;
            return Ok(invalid(shape));
        };
        let (mut members, mut verdict) = (0, Verdict::Valid);
        let (mut seen, mut present) = (0u64, 0u64);
        while let Some(property) = map.next_key_seed(PropertyName {
            properties,
            required,
            present: &mut present,
        })? {
            members += 1;
            match property {
                Some(i) => {
                    let bit = 1u64 << (i % STREAM_MAX_KEYS);
                    if seen & bit != 0 {
                        verdict = Verdict::Unsure; // the last one counts
                    }
                    seen |= bit;
                    let (_, v) = match properties.get(i) {
                        Some((_, schema)) => map.next_value_seed(Checked(schema))?,
                        None => (map.next_value::<Skip>()?.0, Verdict::Unsure),
                    };
                    verdict = verdict.and(v);
                }
                None => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        let all = if required.len() >= STREAM_MAX_KEYS {
            u64::MAX
        } else {
            (1u64 << required.len()) - 1
        };
        if (present & all) != all {
            verdict = verdict.and(Verdict::Invalid);
        }
        Ok((Shape::Object(members), verdict))
    }
}

/// A member name of an object checked against [`Stream::Object`]: the
/// index of its property schema, if any; marks it in `present` if
/// required.
struct PropertyName<'a> {
    properties: &'a [(String, Stream)],
    required: &'a [String],
    present: &'a mut u64,
}

impl<'de> DeserializeSeed<'de> for PropertyName<'_> {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for PropertyName<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Option<usize>, E> {
        for (i, r) in self.required.iter().enumerate() {
            if r == name {
                *self.present |= 1u64 << (i % STREAM_MAX_KEYS);
            }
        }
        Ok(self.properties.iter().position(|(k, _)| k == name))
    }
}
