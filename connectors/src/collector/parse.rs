//! One pass over a request body: the top-level fields of every event,
//! each value left as the raw JSON text of the body.

use std::borrow::Cow;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use cdp_pipeline::json::CowStr;

use super::error::CollectError;

/// A JSON object's top-level fields in the order sent, each value the raw
/// JSON text borrowed from the request body. The edge parses only the few
/// fields it reads (ids, type, event, times), and writes the event out by
/// copying the rest verbatim instead of building and re-serializing a tree.
///
/// JSON allows a key twice; like `serde_json::Value`, lookups see the last
/// one, and `set` leaves the key once.
#[derive(Debug, Default)]
pub(super) struct Fields<'a>(Vec<(Cow<'a, str>, Cow<'a, RawValue>)>);

impl<'a> Fields<'a> {
    /// Every field, in the order sent.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &RawValue)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub(super) fn get(&self, key: &str) -> Option<&RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| &**v)
    }

    pub(super) fn get_cow(&self, key: &str) -> Option<Cow<'a, RawValue>> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    /// Remove every occurrence of `key`; the value of the last one.
    pub(super) fn remove(&mut self, key: &str) -> Option<Cow<'a, RawValue>> {
        let mut removed = None;
        let mut i = 0;
        while i < self.0.len() {
            if self.0[i].0 == key {
                removed = Some(self.0.remove(i).1);
            } else {
                i += 1;
            }
        }
        removed
    }

    /// Set `key`, in place if it is there (keeping the field order), else
    /// at the end.
    pub(super) fn set(&mut self, key: &'static str, value: Cow<'a, RawValue>) {
        let count = self.0.iter().filter(|(k, _)| k == key).count();
        if count > 1 {
            let mut left = count;
            self.0.retain(|(k, _)| {
                if k != key {
                    return true;
                }
                left -= 1;
                left == 0
            });
        }
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.0.push((Cow::Borrowed(key), value)),
        }
    }

    /// Length of [`Fields::to_json`] for keys without escapes (exact for
    /// every real event; a close estimate otherwise).
    pub(super) fn json_len(&self) -> usize {
        let commas = self.0.len().saturating_sub(1);
        2 + commas
            + self
                .0
                .iter()
                .map(|(k, v)| k.len() + 3 + v.get().len())
                .sum::<usize>()
    }

    pub(super) fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut out = Vec::with_capacity(self.json_len() + 16);
        out.push(b'{');
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            if k.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
                out.push(b'"');
                out.extend_from_slice(k.as_bytes());
                out.push(b'"');
            } else {
                serde_json::to_writer(&mut out, k)?;
            }
            out.push(b':');
            out.extend_from_slice(v.get().as_bytes());
        }
        out.push(b'}');
        Ok(out)
    }
}

/// A JSON string as a raw value.
pub(super) fn raw_string(s: &str) -> Result<Cow<'static, RawValue>, CollectError> {
    serde_json::value::to_raw_value(s)
        .map(Cow::Owned)
        .map_err(|e| CollectError::Internal(e.to_string()))
}

/// The value as a string, if it is a JSON string.
pub(super) fn string(value: &RawValue) -> Option<Cow<'_, str>> {
    let text = value.get();
    if !text.starts_with('"') {
        return None;
    }
    serde_json::from_str::<CowStr>(text).ok().map(|s| s.0)
}

/// A usable identifier: a non-empty string or a number.
pub(super) fn identifier(value: Option<&RawValue>) -> Option<Cow<'_, str>> {
    let value = value?;
    match value.get().as_bytes().first()? {
        b'"' => string(value).filter(|s| !s.is_empty()),
        b'-' | b'0'..=b'9' => serde_json::from_str::<serde_json::Number>(value.get())
            .ok()
            .map(|n| Cow::Owned(n.to_string())),
        _ => None,
    }
}

pub(super) fn is_null(value: &RawValue) -> bool {
    value.get() == "null"
}

/// The parsed body of a request.
pub(super) enum Doc<'a> {
    /// A JSON object; with `batch` parsed for a batch call.
    Object {
        fields: Fields<'a>,
        batch: Option<BatchField<'a>>,
    },
    NotAnObject,
}

/// The `batch` field of a batch call.
pub(super) enum BatchField<'a> {
    Items(Vec<Node<'a>>),
    NotAnArray,
}

/// One item of a batch.
pub(super) enum Node<'a> {
    Object(Fields<'a>),
    NotAnObject,
}

/// The body of a single-event call.
pub(super) struct SingleDoc<'a>(pub(super) Doc<'a>);

/// The body of a batch call.
pub(super) struct BatchDoc<'a>(pub(super) Doc<'a>);

impl<'de> Deserialize<'de> for SingleDoc<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DocVisitor { batch: false })
            .map(SingleDoc)
    }
}

impl<'de> Deserialize<'de> for BatchDoc<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DocVisitor { batch: true }).map(BatchDoc)
    }
}

impl<'de> Deserialize<'de> for Node<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

impl<'de> Deserialize<'de> for BatchField<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BatchVisitor)
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(NodeVisitor)? {
            Node::Object(fields) => Ok(fields),
            Node::NotAnObject => Err(de::Error::custom("expected a JSON object")),
        }
    }
}

/// Read a map's entries: values raw, except `batch` when `batch` is set.
fn read_fields<'de, A: MapAccess<'de>>(
    mut map: A,
    batch: bool,
) -> Result<(Fields<'de>, Option<BatchField<'de>>), A::Error> {
    let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(16));
    let mut items = None;
    while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
        if batch && key == "batch" {
            items = Some(map.next_value::<BatchField<'de>>()?);
        } else {
            let value: &'de RawValue = map.next_value()?;
            fields.push((key, Cow::Borrowed(value)));
        }
    }
    Ok((Fields(fields), items))
}

/// Values that are not what the visitor looks for still have to be read
/// (and so validated) to the end.
fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<de::IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Implement the visits of everything but a map (or, with `seq`, an
/// array) as "not what we want".
macro_rules! visit_others {
    ($other:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($other)
        }
    };
}

struct DocVisitor {
    batch: bool,
}

impl<'de> Visitor<'de> for DocVisitor {
    type Value = Doc<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Doc<'de>, A::Error> {
        let (fields, batch) = read_fields(map, self.batch)?;
        Ok(Doc::Object { fields, batch })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Doc<'de>, A::Error> {
        skip_seq(seq)?;
        Ok(Doc::NotAnObject)
    }
    visit_others!(Doc::NotAnObject);
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Node<'de>, A::Error> {
        Ok(Node::Object(read_fields(map, false)?.0))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Node<'de>, A::Error> {
        skip_seq(seq)?;
        Ok(Node::NotAnObject)
    }
    visit_others!(Node::NotAnObject);
}

struct BatchVisitor;

impl<'de> Visitor<'de> for BatchVisitor {
    type Value = BatchField<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<BatchField<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(128).min(4096));
        while let Some(item) = seq.next_element::<Node<'de>>()? {
            items.push(item);
        }
        Ok(BatchField::Items(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BatchField<'de>, A::Error> {
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        Ok(BatchField::NotAnArray)
    }
    visit_others!(BatchField::NotAnArray);
}
