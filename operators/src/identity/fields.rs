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

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// The fields identity reads. Leaves stay `Value`s: a rule must see a
/// number or a wrong type to count it.
#[derive(Debug, Default, Deserialize)]
pub struct EventFields {
    #[serde(rename = "type", default)]
    pub kind: Option<Value>,
    #[serde(rename = "userId", default)]
    pub user_id: Option<Value>,
    #[serde(rename = "anonymousId", default)]
    pub anonymous_id: Option<Value>,
    #[serde(rename = "previousId", default)]
    pub previous_id: Option<Value>,
    #[serde(rename = "messageId", default)]
    pub message_id: Option<Value>,
    #[serde(default)]
    pub timestamp: Option<Value>,
    #[serde(rename = "receivedAt", default)]
    pub received_at: Option<Value>,
    #[serde(default, deserialize_with = "nested_object")]
    pub traits: Option<Contact>,
    #[serde(default, deserialize_with = "nested_object")]
    pub context: Option<EventContext>,
}

#[derive(Debug, Default)]
pub struct Contact {
    pub email: Option<Value>,
    pub phone: Option<Value>,
}

#[derive(Debug, Default)]
pub struct Device {
    pub id: Option<Value>,
}

#[derive(Debug, Default)]
pub struct EventContext {
    pub traits: Option<Contact>,
    pub device: Option<Device>,
    pub external_ids: Option<Value>,
}

/// A nested object read field by field. Unlike a derived struct it refuses
/// a JSON array (derived structs take their fields from one), so the typed
/// parse fails, and the full parse decides, whenever the shape is odd.
trait FromObject: Default {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error>;
}

/// The value of a field, `null` as absent.
fn leaf<'de, A: MapAccess<'de>>(map: &mut A) -> Result<Option<Value>, A::Error> {
    Ok(Some(map.next_value::<Value>()?).filter(|v| !v.is_null()))
}

fn nested<'de, A: MapAccess<'de>, T: FromObject>(map: &mut A) -> Result<Option<T>, A::Error> {
    Ok(map.next_value::<Option<Object<T>>>()?.map(|o| o.0))
}

impl FromObject for Contact {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
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

impl FromObject for Device {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "id" => self.id = leaf(map)?,
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

impl FromObject for EventContext {
    fn field<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        match key {
            "traits" => self.traits = nested(map)?,
            "device" => self.device = nested(map)?,
            "externalIds" => self.external_ids = leaf(map)?,
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

struct Object<T>(T);

impl<'de, T: FromObject> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: FromObject> Visitor<'de> for Visit<T> {
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
fn nested_object<'de, D: Deserializer<'de>, T: FromObject>(d: D) -> Result<Option<T>, D::Error> {
    Ok(Option::<Object<T>>::deserialize(d)?.map(|o| o.0))
}

/// A field as the typed parse reads it: `null` is absent.
fn get(v: &Value, key: &str) -> Option<Value> {
    v.get(key).filter(|x| !x.is_null()).cloned()
}

/// A nested object as the typed parse reads it (`null` is absent).
fn object<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| x.is_object())
}

fn contact(v: Option<&Value>) -> Option<Contact> {
    let v = v?;
    Some(Contact {
        email: get(v, "email"),
        phone: get(v, "phone"),
    })
}

impl EventFields {
    /// Parse the fields from the event's bytes. `None`: the bytes are not a
    /// JSON object of the expected shape; use [`EventFields::from_value`].
    pub fn parse(bytes: &[u8]) -> Option<EventFields> {
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

    /// The same fields, read from a full parse.
    pub fn from_value(event: &Value) -> EventFields {
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
                external_ids: get(c, "externalIds"),
            }),
        }
    }

    pub fn kind(&self) -> Option<&str> {
        self.kind.as_ref().and_then(Value::as_str)
    }

    pub fn message_id(&self) -> Option<&str> {
        self.message_id.as_ref().and_then(Value::as_str)
    }

    /// The event time as written: `timestamp`, else `receivedAt`.
    pub fn at(&self) -> Option<&str> {
        [&self.timestamp, &self.received_at]
            .into_iter()
            .find_map(|v| v.as_ref().and_then(Value::as_str))
    }

    pub fn context_traits(&self) -> Option<&Contact> {
        self.context.as_ref().and_then(|c| c.traits.as_ref())
    }

    pub fn device_id(&self) -> Option<&Value> {
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
