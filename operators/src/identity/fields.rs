//! The few fields of a Segment event identity reads, parsed without building
//! the whole event as a `serde_json::Value`.
//!
//! Identity forwards the event's bytes untouched inside its output, so it
//! needs only the identifier fields, `type`, `messageId` and the event time.
//! [`EventFields::parse`] reads just those (everything else is skipped by
//! the parser, not allocated); an event whose shape the typed parse does not
//! take (`context` that is not an object, a repeated top-level key) goes
//! through [`EventFields::from_value`], which reads the same fields from a full
//! parse, so both paths give the same answer.

use std::borrow::Cow;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// A leaf identity reads: text borrowed from the event's bytes (copied
/// only when it holds an escape), anything else as its value. A rule must
/// see a number or a wrong type to count it; a string, by far the usual
/// leaf, was a `Value` with its own allocation (~4% of the identity stage
/// for the six or so an event has).
#[derive(Debug, Clone, PartialEq)]
pub enum Leaf<'a> {
    Text(Cow<'a, str>),
    Other(Value),
}

impl<'a> Leaf<'a> {
    /// `value` as a leaf, its text borrowed.
    pub fn of(value: &'a Value) -> Leaf<'a> {
        match value {
            Value::String(s) => Leaf::Text(Cow::Borrowed(s)),
            other => Leaf::Other(other.clone()),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Leaf::Text(s) => Some(s),
            Leaf::Other(_) => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Leaf::Other(Value::Null))
    }

    /// The leaf as JSON text would show a person (strings unquoted).
    pub fn display(&self) -> String {
        match self {
            Leaf::Text(s) => s.to_string(),
            Leaf::Other(v) => v.to_string(),
        }
    }

    pub fn into_owned(self) -> Leaf<'static> {
        match self {
            Leaf::Text(s) => Leaf::Text(Cow::Owned(s.into_owned())),
            Leaf::Other(v) => Leaf::Other(v),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Leaf<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<'a>(std::marker::PhantomData<Leaf<'a>>);
        impl<'de: 'a, 'a> Visitor<'de> for Visit<'a> {
            type Value = Leaf<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Leaf<'a>, E> {
                Ok(Leaf::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Leaf<'a>, E> {
                Ok(Leaf::Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Leaf<'a>, E> {
                Ok(Leaf::Text(Cow::Owned(v)))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Leaf<'a>, E> {
                Ok(Leaf::Other(Value::from(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Leaf<'a>, E> {
                Ok(Leaf::Other(Value::from(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Leaf<'a>, E> {
                Ok(Leaf::Other(Value::from(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Leaf<'a>, E> {
                Ok(Leaf::Other(Value::from(v)))
            }
            fn visit_unit<E>(self) -> Result<Leaf<'a>, E> {
                Ok(Leaf::Other(Value::Null))
            }
            fn visit_none<E>(self) -> Result<Leaf<'a>, E> {
                Ok(Leaf::Other(Value::Null))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Leaf<'a>, D::Error> {
                Leaf::deserialize(d)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Leaf<'a>, A::Error> {
                Value::deserialize(MapAccessDeserializer::new(map)).map(Leaf::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Leaf<'a>, A::Error> {
                Value::deserialize(SeqAccessDeserializer::new(seq)).map(Leaf::Other)
            }
        }
        deserializer.deserialize_any(Visit(std::marker::PhantomData))
    }
}

/// The fields identity reads, their text borrowed from the event. A
/// `null` leaf is absent (`Option`'s own reading).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EventFields<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Option<Leaf<'a>>,
    #[serde(borrow)]
    pub user_id: Option<Leaf<'a>>,
    #[serde(borrow)]
    pub anonymous_id: Option<Leaf<'a>>,
    #[serde(borrow)]
    pub previous_id: Option<Leaf<'a>>,
    #[serde(borrow)]
    pub message_id: Option<Leaf<'a>>,
    #[serde(borrow)]
    pub timestamp: Option<Leaf<'a>>,
    #[serde(borrow)]
    pub received_at: Option<Leaf<'a>>,
    #[serde(borrow, deserialize_with = "nested_object")]
    pub traits: Option<Contact<'a>>,
    #[serde(borrow, deserialize_with = "nested_object")]
    pub context: Option<EventContext<'a>>,
}

#[derive(Debug, Default)]
pub struct Contact<'a> {
    pub email: Option<Leaf<'a>>,
    pub phone: Option<Leaf<'a>>,
}

#[derive(Debug, Default)]
pub struct Device<'a> {
    pub id: Option<Leaf<'a>>,
}

#[derive(Debug, Default)]
pub struct EventContext<'a> {
    pub traits: Option<Contact<'a>>,
    pub device: Option<Device<'a>>,
    pub external_ids: Option<Value>,
}

/// A nested object read field by field. Unlike a derived struct it refuses
/// a JSON array (derived structs take their fields from one), so the typed
/// parse fails, and the full parse decides, whenever the shape is odd.
trait FromObject<'de>: Default {
    fn field<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error>;
}

/// The leaf of a field, `null` as absent.
fn leaf<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<Leaf<'de>>, A::Error> {
    Ok(Some(map.next_value::<Leaf<'de>>()?).filter(|v| !v.is_null()))
}

/// The value of a field, `null` as absent.
fn value<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<Value>, A::Error> {
    Ok(Some(map.next_value::<Value>()?).filter(|v| !v.is_null()))
}

fn nested<'de, A: MapAccess<'de>, T: FromObject<'de>>(map: &mut A) -> Result<Option<T>, A::Error> {
    Ok(map.next_value::<Option<Object<T>>>()?.map(|o| o.0))
}

impl<'de> FromObject<'de> for Contact<'de> {
    fn field<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "email" => self.email = leaf(map)?,
            "phone" => self.phone = leaf(map)?,
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl<'de> FromObject<'de> for Device<'de> {
    fn field<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "id" => self.id = leaf(map)?,
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl<'de> FromObject<'de> for EventContext<'de> {
    fn field<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "traits" => self.traits = nested(map)?,
            "device" => self.device = nested(map)?,
            "externalIds" => self.external_ids = value(map)?,
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

struct Object<T>(T);

impl<'de, T: FromObject<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: FromObject<'de>> Visitor<'de> for Visit<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object<T>, A::Error> {
                let mut out = T::default();
                // A repeated key overwrites, as in the full parse: the last
                // one wins on both paths.
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    out.field(&key, &mut map)?;
                }
                Ok(Object(out))
            }
        }
        deserializer.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// An optional nested object (`null` as absent).
fn nested_object<'de, D: Deserializer<'de>, T: FromObject<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Ok(Option::<Object<T>>::deserialize(d)?.map(|o| o.0))
}

/// A field as the typed parse reads it: `null` is absent.
fn get(v: &Value, key: &str) -> Option<Leaf<'static>> {
    v.get(key)
        .filter(|x| !x.is_null())
        .map(|x| Leaf::of(x).into_owned())
}

/// A nested object as the typed parse reads it (`null` is absent).
fn object<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| x.is_object())
}

fn contact(v: Option<&Value>) -> Option<Contact<'static>> {
    let v = v?;
    Some(Contact {
        email: get(v, "email"),
        phone: get(v, "phone"),
    })
}

impl<'a> EventFields<'a> {
    /// Parse the fields from the event's bytes. `None`: the bytes are not a
    /// JSON object of the expected shape; use [`EventFields::from_value`].
    pub fn parse(bytes: &'a [u8]) -> Option<EventFields<'a>> {
        // A struct also deserializes from a JSON array; only objects count.
        // The bytes are forwarded as they are, so they must be UTF-8 too.
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace())?;
        if *first != b'{' {
            return None;
        }
        // Checked as UTF-8 once, then read as text: a slice reader would
        // check every string again.
        let text = cdp_pipeline::json::utf8(bytes)?;
        serde_json::from_str(text).ok()
    }

    /// The same fields, read from a full parse (owned: the rare path).
    pub fn from_value(event: &Value) -> EventFields<'static> {
        let context = object(event, "context");
        EventFields {
            kind: get(event, "type"),
            user_id: get(event, "userId"),
            anonymous_id: get(event, "anonymousId"),
            previous_id: get(event, "previousId"),
            message_id: get(event, "messageId"),
            timestamp: get(event, "timestamp"),
            received_at: get(event, "receivedAt"),
            traits: contact(object(event, "traits")),
            context: context.map(|c| EventContext {
                traits: contact(object(c, "traits")),
                device: object(c, "device").map(|d| Device { id: get(d, "id") }),
                external_ids: c.get("externalIds").filter(|x| !x.is_null()).cloned(),
            }),
        }
    }

    pub fn kind(&self) -> Option<&str> {
        self.kind.as_ref().and_then(Leaf::as_str)
    }

    pub fn message_id(&self) -> Option<&str> {
        self.message_id.as_ref().and_then(Leaf::as_str)
    }

    /// The event time as written: `timestamp`, else `receivedAt`.
    pub fn at(&self) -> Option<&str> {
        [&self.timestamp, &self.received_at]
            .into_iter()
            .find_map(|v| v.as_ref().and_then(Leaf::as_str))
    }

    pub fn context_traits(&self) -> Option<&Contact<'a>> {
        self.context.as_ref().and_then(|c| c.traits.as_ref())
    }

    pub fn device_id(&self) -> Option<&Leaf<'a>> {
        self.context
            .as_ref()
            .and_then(|c| c.device.as_ref())
            .and_then(|d| d.id.as_ref())
    }

    pub fn external_ids(&self) -> &[Value] {
        match self.context.as_ref().and_then(|c| c.external_ids.as_ref()) {
            Some(Value::Array(items)) => items,
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn same(a: &EventFields, b: &EventFields) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    #[test]
    fn typed_and_full_parse_agree_and_odd_shapes_fall_back() {
        let event = json!({"type": "identify", "userId": 42, "anonymousId": "a",
            "traits": {"email": "E@x.com", "plan": {"deep": [1, 2]}},
            "context": {"traits": {"phone": "555"}, "device": {"id": "d"},
                        "externalIds": [{"id": "c", "type": "crm"}], "page": {"url": "u"}},
            "properties": {"a": [1, {"b": null}]}, "timestamp": "2026-11-26T10:00:00Z"});
        let bytes = serde_json::to_vec(&event).unwrap_or_default();
        let typed = EventFields::parse(&bytes);
        assert!(typed.is_some());
        assert!(typed.is_some_and(|t| same(&t, &EventFields::from_value(&event))));
        for odd in [
            json!({"userId": "u", "context": "not an object"}),
            json!({"userId": "u", "traits": ["x"]}),
            json!([1, 2]),
        ] {
            let bytes = serde_json::to_vec(&odd).unwrap_or_default();
            assert!(EventFields::parse(&bytes).is_none(), "{odd}");
        }
        assert!(EventFields::parse(br#"{"userId": "a", "userId": "b"}"#).is_none());
        // Inside nested objects a repeated key overwrites on both paths.
        let nested = br#"{"userId": "u", "context": {"device": {"id": "a"}, "device": {"id": "b", "id": null},
            "traits": {"email": "x@y.z"}, "traits": {"phone": "5"}}}"#;
        let full: Value = serde_json::from_slice(nested).unwrap_or_default();
        assert!(
            EventFields::parse(nested).is_some_and(|t| same(&t, &EventFields::from_value(&full)))
        );
    }

    fn arb_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i32>().prop_map(Value::from),
            "[a-z]{0,3}".prop_map(Value::from),
            // Escaped in JSON: read as owned text, not borrowed.
            "[a-z\"\\\\é\n]{0,3}".prop_map(Value::from),
        ]
    }

    proptest! {
        /// Whenever the typed parse takes an event, it reads what the full
        /// parse reads.
        #[test]
        fn typed_parse_equals_full_parse(
            leaves in prop::collection::vec(arb_leaf(), 12),
            shape in 0u8..4,
        ) {
            let mut e = json!({"type": leaves[0], "userId": leaves[1], "anonymousId": leaves[2],
                "previousId": leaves[3], "messageId": leaves[4], "timestamp": leaves[5]});
            if shape > 0 {
                e["context"] = json!({"traits": {"email": leaves[6], "phone": leaves[7]},
                    "device": {"id": leaves[8]}, "externalIds": [{"id": leaves[9], "type": leaves[10]}]});
            }
            if shape > 1 {
                e["traits"] = json!({"email": leaves[11], "other": [1, 2]});
            }
            if shape > 2 {
                e["context"]["device"] = leaves[8].clone();
            }
            let bytes = serde_json::to_vec(&e).map_err(|x| TestCaseError::fail(x.to_string()))?;
            if let Some(typed) = EventFields::parse(&bytes) {
                prop_assert!(same(&typed, &EventFields::from_value(&e)), "{}", e);
            }
        }
    }
}
