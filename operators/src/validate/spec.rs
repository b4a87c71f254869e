//! Step 2: the Segment spec, Segment's documented limits included.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use cdp_pipeline::OperatorError;

use crate::messages;

/// The longest `messageId` the spec check accepts, in characters (Segment
/// Unify drops events with a longer one).
pub const MAX_MESSAGE_ID_CHARS: usize = 100;

/// The longest `groupId` the spec check accepts, in characters (Segment
/// Unify drops events whose `groupId` has more than 500).
pub const MAX_GROUP_ID_CHARS: usize = 500;

/// An event whose `traits` or `properties` has this many keys or more
/// breaks the spec. Segment documents it for Unify: "Engage rejects
/// Identify events with 300 or more traits"
/// (segment.com/docs/unify/profile-api-limits).
pub const TRAITS_LIMIT: usize = 300;

/// The Segment call types.
pub const EVENT_TYPES: [&str; 6] = ["identify", "track", "page", "screen", "group", "alias"];

/// Schema error messages quote the offending value; cap them so one huge
/// value cannot bloat a dead letter.
const MAX_REASON_CHARS: usize = 300;

/// One thing wrong with an event: where (JSON pointer) and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub pointer: String,
    pub reason: String,
}

impl Violation {
    pub(super) fn new(pointer: impl Into<String>, reason: impl Into<String>) -> Self {
        Violation {
            pointer: pointer.into(),
            reason: reason.into(),
        }
    }
}

/// One top-level member of an event as the checks see it: parsed, or
/// (for the big ones the fast path does not build) only its [`Shape`].
#[derive(Debug, Clone, Copy)]
pub(super) enum Member<'a> {
    Absent,
    Parsed(&'a Value),
    Skipped(Shape),
}

impl<'a> Member<'a> {
    pub(super) fn of(value: Option<&'a Value>) -> Self {
        value.map_or(Member::Absent, Member::Parsed)
    }

    /// The value, when it was parsed.
    pub(super) fn value(self) -> Option<&'a Value> {
        match self {
            Member::Parsed(v) => Some(v),
            Member::Absent | Member::Skipped(_) => None,
        }
    }

    fn shape(self) -> Option<Shape> {
        match self {
            Member::Absent => None,
            Member::Parsed(v) => Some(Shape::of(v)),
            Member::Skipped(shape) => Some(shape),
        }
    }

    pub(super) fn as_str(self) -> Option<&'a str> {
        self.value().and_then(Value::as_str)
    }
}

/// The call type, if it is one of [`EVENT_TYPES`].
pub(super) fn call_type(member: Member<'_>) -> Option<&'static str> {
    let t = member.as_str()?;
    EVENT_TYPES.iter().copied().find(|k| *k == t)
}

/// The event name a `page` / `screen` call is normalized to (step 3).
pub(super) fn normalized_name(kind: &str) -> Option<&'static str> {
    match kind {
        "page" => Some("Page Viewed"),
        "screen" => Some("Screen Viewed"),
        _ => None,
    }
}

/// The event name a call counts as (see [`messages::event_name`]).
pub(super) fn counted_name<'a>(kind: Option<&str>, event: Member<'a>) -> Option<&'a str> {
    match kind {
        Some("track") => event.as_str(),
        Some(kind) => normalized_name(kind),
        None => None,
    }
}

pub(super) fn spec_violation(
    source: &str,
    event: Option<&str>,
    violations: Vec<Violation>,
) -> OperatorError {
    OperatorError::rejected(
        "spec_violation",
        json!({ "source": source, "event": event, "violations": violations }),
    )
}

/// The type of a JSON value, and the number of members if it is an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    Null,
    Bool,
    Number,
    String,
    Array,
    /// Members as written: duplicate names count once per occurrence, so
    /// it is an upper bound of the keys a parsed object has.
    Object(usize),
}

impl Shape {
    pub(super) fn of(value: &Value) -> Shape {
        match value {
            Value::Null => Shape::Null,
            Value::Bool(_) => Shape::Bool,
            Value::Number(_) => Shape::Number,
            Value::String(_) => Shape::String,
            Value::Array(_) => Shape::Array,
            Value::Object(m) => Shape::Object(m.len()),
        }
    }
}

/// How an identifier-like field (`userId`, `groupId`, ...) is filled.
enum IdField {
    Absent,
    Valid,
    Invalid,
}

fn id_field(member: Member<'_>) -> IdField {
    match member.value() {
        None | Some(Value::Null) => IdField::Absent,
        Some(Value::String(s)) if s.trim().is_empty() => IdField::Absent,
        Some(Value::String(_)) | Some(Value::Number(_)) => IdField::Valid,
        Some(_) => IdField::Invalid,
    }
}

/// Every way `event` breaks the Segment spec, in a fixed order. Empty when
/// it is a valid Segment call. The collector may use it to answer `400`.
///
/// Besides the shape of each call type it enforces Segment's documented
/// limits: `messageId` at most [`MAX_MESSAGE_ID_CHARS`] characters,
/// `groupId` at most [`MAX_GROUP_ID_CHARS`], fewer than [`TRAITS_LIMIT`]
/// `traits` and `properties`; and RFC 3339 times in `timestamp`,
/// `originalTimestamp`, `sentAt` and `receivedAt`.
pub fn spec_violations(event: &Map<String, Value>) -> Vec<Violation> {
    spec_check(|key| Member::of(event.get(key)))
}

/// [`spec_violations`] over an event's top-level members as JSON text (the
/// collector's view, which never builds the event): the members the checks
/// read by value are parsed (ids, names, times: small), the big ones
/// (`properties`, `traits`, `context`, `integrations`) only measured.
pub fn spec_violations_raw<'a>(
    get: impl Fn(&str) -> Option<&'a serde_json::value::RawValue>,
) -> Vec<Violation> {
    use super::envelope::{PARSED, SHAPED};
    // Text a RawValue holds is valid JSON: neither read can fail.
    let parsed: Vec<Option<Value>> = PARSED
        .iter()
        .map(|k| get(k).and_then(|raw| serde_json::from_str(raw.get()).ok()))
        .collect();
    let shapes: Vec<Option<Shape>> = SHAPED
        .iter()
        .map(|k| get(k).map(|raw| raw_shape(raw.get(), *k == "traits" || *k == "properties")))
        .collect();
    spec_check(|key| {
        if let Some(i) = PARSED.iter().position(|k| *k == key) {
            return Member::of(parsed.get(i).and_then(Option::as_ref));
        }
        match SHAPED
            .iter()
            .position(|k| *k == key)
            .and_then(|i| shapes.get(i).copied().flatten())
        {
            Some(shape) => Member::Skipped(shape),
            None => Member::Absent,
        }
    })
}

/// The shape of valid JSON text, read from its first byte. An object's
/// members are counted only where the limit applies (`count`) and only
/// when the text is long enough to hold [`TRAITS_LIMIT`] of them
/// (`"":0,` is the shortest member); otherwise it reads as empty, which
/// no check tells from its real count.
fn raw_shape(text: &str, count: bool) -> Shape {
    use super::envelope::Skip;
    const SHORTEST_OVER_LIMIT: usize = TRAITS_LIMIT * 5 + 1;
    let text = text.trim_start();
    match text.as_bytes().first() {
        Some(b'{') if count && text.len() >= SHORTEST_OVER_LIMIT => {
            serde_json::from_str::<Skip>(text).map_or(Shape::Object(0), |s| s.0)
        }
        Some(b'{') => Shape::Object(0),
        Some(b'[') => Shape::Array,
        Some(b'"') => Shape::String,
        Some(b't' | b'f') => Shape::Bool,
        Some(b'n') => Shape::Null,
        _ => Shape::Number,
    }
}

/// [`spec_violations`] over any view of the top level. It reads the
/// members in [`super::envelope::PARSED`] by value and the ones in
/// [`super::envelope::SHAPED`] by shape only.
pub(super) fn spec_check<'a>(get: impl Fn(&str) -> Member<'a>) -> Vec<Violation> {
    let mut out = Vec::new();
    let kind = match get("type").value() {
        None | Some(Value::Null) => {
            out.push(Violation::new("/type", "is required"));
            None
        }
        Some(Value::String(t)) if EVENT_TYPES.contains(&t.as_str()) => Some(t.as_str()),
        Some(Value::String(t)) => {
            out.push(Violation::new(
                "/type",
                format!(
                    "unknown type {:?}: expected one of {}",
                    truncate_reason(t.clone()),
                    EVENT_TYPES.join(", ")
                ),
            ));
            None
        }
        Some(_) => {
            out.push(Violation::new("/type", "must be a string"));
            None
        }
    };

    let mut any_id = false;
    let mut bad_id = false;
    for field in ["userId", "anonymousId"] {
        match id_field(get(field)) {
            IdField::Valid => any_id = true,
            IdField::Invalid => {
                bad_id = true;
                out.push(Violation::new(
                    format!("/{field}"),
                    "must be a string or a number",
                ));
            }
            IdField::Absent => {}
        }
    }
    if !any_id && !bad_id {
        out.push(Violation::new(
            "/userId",
            "userId or anonymousId is required",
        ));
    }

    match kind {
        Some("track") => match get("event").value() {
            Some(Value::String(name)) if !name.trim().is_empty() => {}
            _ => out.push(Violation::new(
                "/event",
                "track calls need a non-empty string event name",
            )),
        },
        Some("group") if !matches!(id_field(get("groupId")), IdField::Valid) => {
            out.push(Violation::new(
                "/groupId",
                "group calls need a groupId (string or number)",
            ));
        }
        Some("alias") if !matches!(id_field(get("previousId")), IdField::Valid) => {
            out.push(Violation::new(
                "/previousId",
                "alias calls need a previousId (string or number)",
            ));
        }
        Some("page" | "screen") => match get("name").value() {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(_) => out.push(Violation::new("/name", "must be a string")),
        },
        _ => {}
    }
    if let Some(Value::String(id)) = get("groupId").value() {
        if id.chars().count() > MAX_GROUP_ID_CHARS {
            out.push(Violation::new(
                "/groupId",
                format!("must be at most {MAX_GROUP_ID_CHARS} characters"),
            ));
        }
    }

    for field in ["properties", "traits", "context", "integrations"] {
        match get(field).shape() {
            // `null` is none, as for the times (hand-written clients send it).
            None | Some(Shape::Null | Shape::Object(_)) => {}
            Some(_) => out.push(Violation::new(format!("/{field}"), "must be an object")),
        }
    }
    for field in ["traits", "properties"] {
        if let Some(Shape::Object(keys)) = get(field).shape() {
            if keys >= TRAITS_LIMIT {
                out.push(Violation::new(
                    format!("/{field}"),
                    format!("has {keys} keys; Segment accepts fewer than {TRAITS_LIMIT}"),
                ));
            }
        }
    }

    match get("messageId").value() {
        None | Some(Value::Null) => {}
        Some(Value::String(id)) if id.is_empty() => {
            out.push(Violation::new("/messageId", "must not be empty"))
        }
        Some(Value::String(id)) if id.chars().count() > MAX_MESSAGE_ID_CHARS => {
            out.push(Violation::new(
                "/messageId",
                format!("must be at most {MAX_MESSAGE_ID_CHARS} characters"),
            ))
        }
        Some(Value::String(_)) => {}
        Some(_) => out.push(Violation::new("/messageId", "must be a string")),
    }

    for field in ["timestamp", "originalTimestamp", "sentAt", "receivedAt"] {
        match get(field).value() {
            None | Some(Value::Null) => {}
            // As absent (the collector writes `receivedAt` in its place).
            Some(Value::String(t)) if t.is_empty() => {}
            Some(Value::String(t)) if messages::parse_time_ms(t).is_some() => {}
            Some(_) => out.push(Violation::new(
                format!("/{field}"),
                "must be an ISO 8601 date-time (RFC 3339, e.g. 2026-12-03T16:00:00.000Z)",
            )),
        }
    }
    out
}

/// The event time (ms) dedupe remembers, as [`messages::event_time_ms`].
pub(super) fn event_time_of<'a>(get: impl Fn(&str) -> Member<'a>) -> Option<i64> {
    ["timestamp", "receivedAt", "originalTimestamp"]
        .iter()
        .find_map(|f| get(f).as_str().and_then(messages::parse_time_ms))
}

pub(super) fn truncate_reason(reason: String) -> String {
    if reason.chars().count() <= MAX_REASON_CHARS {
        return reason;
    }
    let mut short: String = reason.chars().take(MAX_REASON_CHARS).collect();
    short.push('…');
    short
}
