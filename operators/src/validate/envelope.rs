//! The operator's fast path: an event's top level read in one pass over
//! its bytes that is exactly as strict as parsing it into a [`Value`]
//! (syntax, UTF-8, escapes, number range, nesting depth, trailing bytes:
//! the same `serde_json` deserializer checks them) but builds only what the
//! checks read. Parsing a whole event into a `Value` costs about ten times
//! the pass itself; `context` alone is often half the bytes.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::fast::{stream_for, wants_body};
use super::plan::{CompiledPlan, PlanSchema};
use super::spec::{Member, Shape};
use super::stream::{Checked, Stream, Verdict};

/// Top-level members the checks read by value: always parsed.
pub(crate) const PARSED: [&str; 12] = [
    "type",
    "userId",
    "anonymousId",
    "event",
    "groupId",
    "previousId",
    "name",
    "messageId",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "receivedAt",
];

/// Top-level members the checks read by [`Shape`]; `properties` and
/// `traits` are also parsed when a plan may check them.
pub(crate) const SHAPED: [&str; 4] = ["properties", "traits", "context", "integrations"];
const TYPE: usize = 0;
const EVENT: usize = 3;
const CONTEXT: usize = 2;
const INTEGRATIONS: usize = 3;

/// An event's top level: what [`super::spec::spec_check`] and the plan read.
/// Repeated member names resolve as in a parsed event: the last wins.
#[derive(Debug, Default)]
pub(super) struct Envelope<'p> {
    parsed: [Option<Value>; PARSED.len()],
    /// `properties` and `traits`, when parsed.
    bodies: [Option<Value>; 2],
    /// `properties` and `traits`, when a [`Stream`] found them valid
    /// while reading (they are then neither parsed nor in `bodies`).
    checked: [Option<&'p Stream>; 2],
    /// A body a [`Stream`] did not find valid: read again, parsed.
    unchecked: bool,
    shapes: [Option<Shape>; SHAPED.len()],
    /// `context.protocols.event_version`, as a parsed event has it.
    pub(super) event_version: Option<Value>,
}

impl<'p> Envelope<'p> {
    /// Read `bytes`; `Ok(None)` when they hold valid JSON that is not
    /// an object. `properties` and `traits` are parsed when `plan` may
    /// check them (see [`wants_body`]), or checked while read
    /// when their schema streams; if that finds them anything but
    /// valid, `bytes` are read again with them parsed.
    pub(super) fn parse(
        bytes: &[u8],
        plan: Option<&'p CompiledPlan>,
    ) -> serde_json::Result<Option<Envelope<'p>>> {
        let envelope = Envelope::read(bytes, plan, true)?;
        if envelope.as_ref().is_some_and(|e| e.unchecked) {
            return Envelope::read(bytes, plan, false);
        }
        Ok(envelope)
    }

    fn read(
        bytes: &[u8],
        plan: Option<&'p CompiledPlan>,
        stream: bool,
    ) -> serde_json::Result<Option<Envelope<'p>>> {
        let top = TopLevel { plan, stream };
        // Checked as UTF-8 once and read as text: read from bytes,
        // `serde_json` checks each string on its own (a call per string;
        // `parse_str` was ~10% of the stage's batches). Bytes that are not
        // UTF-8 are read as bytes, so the error names the string at fault.
        match cdp_pipeline::json::utf8(bytes) {
            Some(text) => read_whole(serde_json::Deserializer::from_str(text), top),
            None => read_whole(serde_json::Deserializer::from_slice(bytes), top),
        }
    }

    /// Whether the body `field` was found valid against `schema`
    /// while read.
    pub(super) fn checked(&self, field: &str, schema: &PlanSchema) -> bool {
        let Some(i) = SHAPED.iter().position(|k| *k == field) else {
            return false;
        };
        match (self.checked.get(i).copied().flatten(), &schema.stream) {
            (Some(checked), Some(stream)) => std::ptr::eq(checked, stream),
            _ => false,
        }
    }

    pub(super) fn get(&self, key: &str) -> Member<'_> {
        if let Some(i) = PARSED.iter().position(|k| *k == key) {
            return Member::of(self.parsed[i].as_ref());
        }
        let Some(i) = SHAPED.iter().position(|k| *k == key) else {
            return Member::Absent;
        };
        match (self.bodies.get(i).and_then(Option::as_ref), self.shapes[i]) {
            (Some(body), _) => Member::Parsed(body),
            (None, Some(shape)) => Member::Skipped(shape),
            (None, None) => Member::Absent,
        }
    }
}

/// One JSON value with `top`, and nothing after it.
fn read_whole<'de, 'p, R: serde_json::de::Read<'de>>(
    mut de: serde_json::Deserializer<R>,
    top: TopLevel<'p>,
) -> serde_json::Result<Option<Envelope<'p>>> {
    let envelope = (&mut de).deserialize_any(top)?;
    de.end()?;
    Ok(envelope)
}

/// The cases of a visitor that only looks inside objects: any other
/// value is checked by the deserializer and summarized by its shape.
macro_rules! outside_objects {
    ($out:path) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($out(Shape::Null))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($out(Shape::Bool))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($out(Shape::Number))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($out(Shape::Number))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($out(Shape::Number))
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($out(Shape::String))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<Skip>()?.is_some() {}
            Ok($out(Shape::Array))
        }
    };
}

fn shape(shape: Shape) -> Shape {
    shape
}

fn no_version(shape: Shape) -> (Shape, Option<Value>) {
    (shape, None)
}

fn no_value(_: Shape) -> Option<Value> {
    None
}

fn not_an_object<'p>(_: Shape) -> Option<Envelope<'p>> {
    None
}

struct TopLevel<'p> {
    plan: Option<&'p CompiledPlan>,
    /// Check streamable bodies while reading instead of parsing them.
    stream: bool,
}

impl<'de, 'p> Visitor<'de> for TopLevel<'p> {
    type Value = Option<Envelope<'p>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    outside_objects!(not_an_object);

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut envelope = Envelope::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Parsed(i) => envelope.parsed[i] = Some(map.next_value()?),
                Key::Body(i)
                    if self.plan.is_some_and(|plan| {
                        wants_body(
                            plan,
                            SHAPED[i],
                            envelope.parsed[TYPE].as_ref(),
                            envelope.parsed[EVENT].as_ref(),
                        )
                    }) =>
                {
                    let stream = self.plan.filter(|_| self.stream).and_then(|plan| {
                        stream_for(
                            plan,
                            SHAPED[i],
                            envelope.parsed[TYPE].as_ref(),
                            envelope.parsed[EVENT].as_ref(),
                            envelope.event_version.as_ref(),
                        )
                    });
                    envelope.checked[i] = None;
                    if let Some(stream) = stream {
                        let (shape, verdict) = map.next_value_seed(Checked(stream))?;
                        envelope.shapes[i] = Some(shape);
                        envelope.bodies[i] = None;
                        if verdict == Verdict::Valid {
                            envelope.checked[i] = Some(stream);
                        } else {
                            envelope.unchecked = true;
                        }
                    } else {
                        let body: Value = map.next_value()?;
                        envelope.shapes[i] = Some(Shape::of(&body));
                        envelope.bodies[i] = Some(body);
                    }
                }
                Key::Body(i) => {
                    envelope.checked[i] = None;
                    envelope.shapes[i] = Some(map.next_value::<Skip>()?.0)
                }
                Key::Context => {
                    let (shape, version) = map.next_value_seed(Context)?;
                    envelope.shapes[CONTEXT] = Some(shape);
                    envelope.event_version = version;
                }
                Key::Integrations => {
                    envelope.shapes[INTEGRATIONS] = Some(map.next_value::<Skip>()?.0)
                }
                Key::Other => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(Some(envelope))
    }
}

/// What a top-level member name means to the envelope.
enum Key {
    Parsed(usize),
    Body(usize),
    Context,
    Integrations,
    Other,
}

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Key, E> {
        if let Some(i) = PARSED.iter().position(|k| *k == name) {
            return Ok(Key::Parsed(i));
        }
        Ok(match name {
            "properties" => Key::Body(0),
            "traits" => Key::Body(1),
            "context" => Key::Context,
            "integrations" => Key::Integrations,
            _ => Key::Other,
        })
    }
}

/// Whether a member name is the given one.
struct NameIs(&'static str);

impl<'de> DeserializeSeed<'de> for NameIs {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for NameIs {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<bool, E> {
        Ok(name == self.0)
    }
}

/// `context`: its shape and `protocols.event_version`.
struct Context;

impl<'de> DeserializeSeed<'de> for Context {
    type Value = (Shape, Option<Value>);
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Context {
    type Value = (Shape, Option<Value>);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    outside_objects!(no_version);

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut members, mut version) = (0, None);
        while let Some(protocols) = map.next_key_seed(NameIs("protocols"))? {
            members += 1;
            if protocols {
                version = map.next_value_seed(Protocols)?;
            } else {
                map.next_value::<Skip>()?;
            }
        }
        Ok((Shape::Object(members), version))
    }
}

/// `context.protocols`: its `event_version`.
struct Protocols;

impl<'de> DeserializeSeed<'de> for Protocols {
    type Value = Option<Value>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Protocols {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    outside_objects!(no_value);

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut version = None;
        while let Some(is_version) = map.next_key_seed(NameIs("event_version"))? {
            if is_version {
                version = Some(map.next_value()?);
            } else {
                map.next_value::<Skip>()?;
            }
        }
        Ok(version)
    }
}

/// Any value, checked by the deserializer and not built.
pub(super) struct Skip(pub(super) Shape);

impl<'de> de::Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Skip, D::Error> {
        deserializer.deserialize_any(SkipVisitor).map(Skip)
    }
}

pub(super) struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    outside_objects!(shape);

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let mut members = 0;
        while map.next_key::<Skip>()?.is_some() {
            map.next_value::<Skip>()?;
            members += 1;
        }
        Ok(Shape::Object(members))
    }
}
