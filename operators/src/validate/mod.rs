//! The validate stage (Segment Protocols): `<p>.raw` → `<p>.valid`.
//!
//! For every raw event it, in this order:
//! 1. parses the bytes as a JSON object (`invalid_json`) and resolves the
//!    source from the `cdp-source` header (`unknown_source`);
//! 2. checks the Segment spec, Segment's documented limits included, and
//!    collects *every* violation as a JSON pointer and a reason
//!    (`spec_violation`, whatever the plan says; see [`spec_violations`]);
//! 3. normalizes `page` / `screen` calls to `event: "Page Viewed"` /
//!    `"Screen Viewed"`;
//! 4. applies the source's tracking plan: the plan's `common` JSON Schema
//!    on the whole event, the JSON Schema of the `properties` of planned
//!    events (in the version `context.protocols.event_version` names) and
//!    of `identify` / `group` traits, with the policies
//!    `unplanned_events: allow|block` and `on_violation: block|omit|allow`;
//! 5. drops a `messageId` already seen from the same source within the
//!    dedupe window;
//! 6. emits the event to [`outputs::NEXT`] under the input record's key,
//!    with the `cdp-source` header: the input bytes as they came when steps
//!    3–4 changed nothing (a `page` / `screen` call without `event` gets it
//!    prepended), else the event re-encoded.
//!
//! Speed: the operator reads an event in one strict pass that builds only
//! the members the checks read (module `envelope`), and takes the reference
//! path — parse everything, [`Validator::check_event`] — only when the
//! event must change or the plan has a `common` schema. Property tests hold
//! the two paths to the same outcome.
//!
//! Guarantees: one input yields exactly one of {one output, a rejection, a
//! silent duplicate drop}. A rejected record writes no state; its detail
//! names the `source` and, where there is one, the `event`. The output is
//! a function of (state, record): window expiry runs on stream time (ticks)
//! or, before the first tick, on the event's own time, never the wall
//! clock. Schemas are compiled once, in [`Validator::new`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use cdp_pipeline::envelope::SOURCE;
use cdp_pipeline::{Context, Operator, OperatorError, Record, Span};
use serde::de::{self, Unexpected, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Map, Value};

use crate::config::{ConfigError, SourceConfig};
use crate::messages::{self, outputs};

/// How long a `messageId` is remembered per source unless configured.
pub const DEFAULT_DEDUPE_WINDOW: Span = Span::from_secs(24 * 3600);

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

/// Metric label for a record whose source is not a configured one.
pub const UNKNOWN_SOURCE_LABEL: &str = "unknown";

/// Metric label for an event name its source's plan does not list.
pub const OTHER_EVENT_LABEL: &str = "other";

/// State key prefix of remembered message ids: `dedupe/<source>/<messageId>`.
const DEDUPE_PREFIX: &str = "dedupe/";

/// Schema error messages quote the offending value; cap them so one huge
/// value cannot bloat a dead letter.
const MAX_REASON_CHARS: usize = 300;

/// What to do with a `track` event the plan does not list.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum UnplannedEvents {
    /// Forward it unchecked.
    #[default]
    Allow,
    /// Reject it as a dead letter (`unplanned_event`).
    Block,
}

/// What to do with an event that breaks its plan's JSON Schema.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ViolationPolicy {
    /// Reject it as a dead letter (`plan_violation`) with every violation.
    #[default]
    Block,
    /// Remove the offending top-level properties (or traits), list them in
    /// `context.protocols.omitted` and forward the rest. Violations that
    /// removing a key cannot fix (a missing required property, anything
    /// the `common` schema finds, an unknown event version) are attached
    /// as `context.protocols.violations`.
    Omit,
    /// Forward it unchanged with `context.protocols.violations` attached.
    Allow,
}

const fn default_unplanned_events() -> UnplannedEvents {
    UnplannedEvents::Allow
}

const fn default_on_violation() -> ViolationPolicy {
    ViolationPolicy::Block
}

/// A version of a planned event (Segment event versioning): a positive
/// integer, written `2` or `"2"` in the config and in
/// `context.protocols.event_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct EventVersion(pub u32);

impl EventVersion {
    /// The version of an event that names none.
    pub const FIRST: EventVersion = EventVersion(1);

    /// A positive integer, or a string of one.
    pub fn from_value(value: &Value) -> Option<EventVersion> {
        match value {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse::<u64>().ok(),
            _ => None,
        }
        .filter(|n| *n >= 1)
        .and_then(|n| u32::try_from(n).ok())
        .map(EventVersion)
    }
}

impl fmt::Display for EventVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for EventVersion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct VersionVisitor;
        impl Visitor<'_> for VersionVisitor {
            type Value = EventVersion;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an event version (a positive integer)")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<EventVersion, E> {
                EventVersion::from_value(&Value::from(n))
                    .ok_or_else(|| E::invalid_value(Unexpected::Unsigned(n), &self))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<EventVersion, E> {
                EventVersion::from_value(&Value::from(n))
                    .ok_or_else(|| E::invalid_value(Unexpected::Signed(n), &self))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<EventVersion, E> {
                EventVersion::from_value(&Value::from(s))
                    .ok_or_else(|| E::invalid_value(Unexpected::Str(s), &self))
            }
        }
        deserializer.deserialize_any(VersionVisitor)
    }
}

/// A tracking plan (`tracking_plans.<name>`): what a source's events must
/// look like. Schemas may be JSON Schema draft-07 or 2020-12 (also 4, 6
/// and 2019-09), chosen by their `$schema` (2020-12 without one); `format`
/// is checked; `pattern` uses Rust's linear-time regex syntax, so
/// look-around is rejected at load, as in Segment Protocols.
///
/// ```yaml
/// on_violation: block
/// common: {type: object, required: [context], properties: {context: {required: [app]}}}
/// events:
///   Order Completed: {type: object, required: [revenue]}      # version 1
/// event_versions:
///   Order Completed:
///     2: {type: object, required: [revenue, currency]}
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrackingPlan {
    /// What to do with `track` events not listed under `events` or
    /// `event_versions`.
    #[serde(default = "default_unplanned_events")]
    pub unplanned_events: UnplannedEvents,
    /// What to do with events that break their JSON Schema.
    #[serde(default = "default_on_violation")]
    pub on_violation: ViolationPolicy,
    /// JSON Schema of the whole event, checked for every call type before
    /// the schema of its properties or traits (Segment's "common JSON
    /// schema"), e.g. to require `context.app.version`. Its violations
    /// point from the event's root (`/context/app`).
    #[serde(default)]
    pub common: Option<Value>,
    /// JSON Schema of the `traits` of `identify` calls (unchecked if absent).
    #[serde(default)]
    pub identify: Option<Value>,
    /// JSON Schema of the `traits` of `group` calls (unchecked if absent).
    #[serde(default)]
    pub group: Option<Value>,
    /// Event name → JSON Schema of its `properties`: version 1 of the
    /// event. `page` and `screen` calls are checked under `Page Viewed` /
    /// `Screen Viewed` when listed.
    #[serde(default)]
    pub events: BTreeMap<String, Value>,
    /// Event name → version → JSON Schema of its `properties` (Segment event
    /// versioning). An event with `context.protocols.event_version: 2` (or
    /// `"2"`) is checked against `event_versions.<name>.2`; an event with no
    /// version is version 1: `events.<name>`, or `event_versions.<name>.1`
    /// (declare version 1 in one place only). A version the plan does not
    /// list, or one that is not a positive integer, is a violation at
    /// `/context/protocols/event_version`. Names listed only here are
    /// planned events too.
    #[serde(default)]
    #[schemars(schema_with = "event_versions_schema")]
    pub event_versions: BTreeMap<String, BTreeMap<EventVersion, Value>>,
}

/// What [`EventVersion`] accepts as a map key: a positive integer.
const EVENT_VERSION_PATTERN: &str = r"^\+?0*[1-9][0-9]*$";

/// The JSON Schema of `event_versions`: event name → version → any JSON
/// Schema (the versions are map keys, so strings to a JSON Schema).
fn event_versions_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "additionalProperties": {
            "type": "object",
            "patternProperties": { EVENT_VERSION_PATTERN: {} },
            "additionalProperties": false
        }
    })
}

/// One thing wrong with an event: where (JSON pointer) and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub pointer: String,
    pub reason: String,
}

impl Violation {
    fn new(pointer: impl Into<String>, reason: impl Into<String>) -> Self {
        Violation {
            pointer: pointer.into(),
            reason: reason.into(),
        }
    }
}

/// A tracking plan with its schemas compiled.
#[derive(Debug)]
struct CompiledPlan {
    unplanned_events: UnplannedEvents,
    on_violation: ViolationPolicy,
    common: Option<jsonschema::Validator>,
    identify: Option<PlanSchema>,
    group: Option<PlanSchema>,
    /// Planned event name → version → schema of its `properties`.
    events: BTreeMap<String, BTreeMap<EventVersion, PlanSchema>>,
}

/// The schema of an event's `properties` or `traits`: compiled, and as a
/// [`Stream`] when the fast path can check it while reading the event.
#[derive(Debug)]
struct PlanSchema {
    validator: jsonschema::Validator,
    stream: Option<Stream>,
}

impl PlanSchema {
    fn compile(path: &str, schema: &Value) -> Result<Self, ConfigError> {
        Ok(PlanSchema {
            validator: compile_schema(path, schema)?,
            stream: Stream::for_schema(schema),
        })
    }
}

/// A schema the fast path checks while it reads a value, building only
/// the leaves: objects and arrays of `type: object` / `type: array` with
/// only `properties`, `required`, `items`, `minItems`, `maxItems` (and
/// annotations) are walked; any other subschema is a [`Stream::Leaf`],
/// its value parsed and checked by `jsonschema`. Schemas with `$`
/// keywords (`$ref`, `$schema`, ...) are never streamed.
#[derive(Debug)]
enum Stream {
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
    fn for_schema(schema: &Value) -> Option<Stream> {
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
enum Verdict {
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

impl CompiledPlan {
    fn compile(name: &str, plan: &TrackingPlan) -> Result<Self, ConfigError> {
        let path = format!("tracking_plans.{name}");
        let optional = |field: &str, schema: &Option<Value>| {
            schema
                .as_ref()
                .map(|s| compile_schema(&format!("{path}.{field}"), s))
                .transpose()
        };
        let common = optional("common", &plan.common)?;
        let body = |field: &str, schema: &Option<Value>| {
            schema
                .as_ref()
                .map(|s| PlanSchema::compile(&format!("{path}.{field}"), s))
                .transpose()
        };
        let identify = body("identify", &plan.identify)?;
        let group = body("group", &plan.group)?;
        let mut events: BTreeMap<String, BTreeMap<EventVersion, PlanSchema>> = BTreeMap::new();
        for (event, schema) in &plan.events {
            let compiled = PlanSchema::compile(&format!("{path}.events.{event}"), schema)?;
            events
                .entry(event.clone())
                .or_default()
                .insert(EventVersion::FIRST, compiled);
        }
        for (event, versions) in &plan.event_versions {
            let at = format!("{path}.event_versions.{event}");
            if versions.is_empty() {
                return Err(ConfigError::new(at, "list at least one version"));
            }
            let known = events.entry(event.clone()).or_default();
            for (version, schema) in versions {
                let compiled = PlanSchema::compile(&format!("{at}.{version}"), schema)?;
                if known.insert(*version, compiled).is_some() {
                    return Err(ConfigError::new(
                        format!("{at}.{version}"),
                        format!("version 1 is also declared as events.{event}; declare it once"),
                    ));
                }
            }
        }
        Ok(CompiledPlan {
            unplanned_events: plan.unplanned_events,
            on_violation: plan.on_violation,
            common,
            identify,
            group,
            events,
        })
    }
}

fn compile_schema(path: &str, schema: &Value) -> Result<jsonschema::Validator, ConfigError> {
    // Formats are annotations only by default in drafts 2019-09/2020-12;
    // a plan that says `format: email` means it, so they are checked.
    // `regex` patterns run in linear time whatever the event holds.
    jsonschema::options()
        .should_validate_formats(true)
        .with_pattern_options(jsonschema::PatternOptions::regex())
        .build(schema)
        .map_err(|e| ConfigError::new(path, format!("invalid JSON Schema: {e}")))
}

/// Every source's compiled tracking plan and the dedupe window: what the
/// validate operators of all tasks share.
#[derive(Debug)]
pub struct Validator {
    /// Source id → its plan, if it has one.
    sources: BTreeMap<String, Option<Arc<CompiledPlan>>>,
    dedupe_window: Span,
}

impl Validator {
    /// Compile every plan and check that each source's plan exists. Errors
    /// name the config path: `tracking_plans.shop.events.Order Completed:
    /// invalid JSON Schema: ...`, `sources[0].tracking_plan: unknown
    /// tracking plan "x"`. A `dedupe_window` of zero turns dedupe off.
    pub fn new(
        sources: &[SourceConfig],
        plans: &BTreeMap<String, TrackingPlan>,
        dedupe_window: Span,
    ) -> Result<Self, ConfigError> {
        let mut compiled = BTreeMap::new();
        for (name, plan) in plans {
            compiled.insert(name.clone(), Arc::new(CompiledPlan::compile(name, plan)?));
        }
        let mut by_source = BTreeMap::new();
        for (i, source) in sources.iter().enumerate() {
            if source.id.is_empty() {
                return Err(ConfigError::new(
                    format!("sources[{i}].id"),
                    "must not be empty",
                ));
            }
            // The id is part of the dedupe key `dedupe/<source>/<messageId>`.
            if source.id.contains('/') {
                return Err(ConfigError::new(
                    format!("sources[{i}].id"),
                    format!("{:?} must not contain \"/\"", source.id),
                ));
            }
            let plan = match &source.tracking_plan {
                None => None,
                Some(name) => Some(compiled.get(name).cloned().ok_or_else(|| {
                    ConfigError::new(
                        format!("sources[{i}].tracking_plan"),
                        format!("unknown tracking plan {name:?}"),
                    )
                })?),
            };
            if by_source.insert(source.id.clone(), plan).is_some() {
                return Err(ConfigError::new(
                    format!("sources[{i}].id"),
                    format!("duplicate source id {:?}", source.id),
                ));
            }
        }
        if dedupe_window.millis() < 0 {
            return Err(ConfigError::new("dedupe_window", "must not be negative"));
        }
        Ok(Validator {
            sources: by_source,
            dedupe_window,
        })
    }

    /// How long a `messageId` is remembered.
    pub fn dedupe_window(&self) -> Span {
        self.dedupe_window
    }

    /// Whether `source` is a configured source id.
    pub fn has_source(&self, source: &str) -> bool {
        self.sources.contains_key(source)
    }

    /// Steps 2–4 for one parsed event of `source`: the spec check,
    /// normalization and the source's tracking plan. Returns the event to
    /// forward, or the rejection. No state involved. This is the reference
    /// the operator's fast path is tested against.
    pub fn check_event(&self, source: &str, event: Value) -> Result<Value, OperatorError> {
        let mut event = event;
        self.check_in_place(source, &mut event)?;
        Ok(event)
    }

    /// [`Validator::check_event`] on the event in place; `Ok(true)` when it
    /// changed the event (normalized it, omitted values or attached
    /// violations), so the input bytes no longer represent it.
    fn check_in_place(&self, source: &str, event: &mut Value) -> Result<bool, OperatorError> {
        let plan = self.sources.get(source).ok_or_else(|| {
            OperatorError::rejected("unknown_source", json!({ "source": source }))
        })?;
        let Value::Object(map) = event else {
            return Err(OperatorError::rejected(
                "invalid_json",
                json!({ "source": source, "error": "expected a JSON object" }),
            ));
        };
        let kind = call_type(Member::of(map.get("type")));
        let violations = spec_violations(map);
        if !violations.is_empty() {
            return Err(spec_violation(
                source,
                counted_name(kind, Member::of(map.get("event"))),
                violations,
            ));
        }
        let kind = kind.unwrap_or_default();
        let normalized = match kind {
            "page" => Some("Page Viewed"),
            "screen" => Some("Screen Viewed"),
            _ => None,
        };
        let mut changed = false;
        if let Some(name) = normalized {
            if map.get("event").and_then(Value::as_str) != Some(name) {
                map.insert("event".into(), Value::from(name));
                changed = true;
            }
        }
        if let Some(plan) = plan {
            changed |= apply_plan(plan, source, kind, event)?;
        }
        Ok(changed)
    }

    /// The operator's fast path for steps 2–4: the outcome
    /// [`Validator::check_event`] would have on the parsed event, decided
    /// from the envelope alone, or [`Fast::Slow`] when it needs the event.
    fn check_envelope(
        &self,
        plan: Option<&CompiledPlan>,
        source: &str,
        envelope: &envelope::Envelope,
    ) -> Result<Fast, OperatorError> {
        let get = |key: &str| envelope.get(key);
        // An unparsed body's member count may include repeated names; near
        // the limit only the parsed event knows the true count.
        for field in ["properties", "traits"] {
            if let Member::Skipped(Shape::Object(members)) = get(field) {
                if members >= TRAITS_LIMIT {
                    return Ok(Fast::Slow);
                }
            }
        }
        let kind = call_type(get("type"));
        let violations = spec_check(get);
        if !violations.is_empty() {
            return Err(spec_violation(
                source,
                counted_name(kind, get("event")),
                violations,
            ));
        }
        let kind = kind.unwrap_or_default();
        let normalized = match kind {
            "page" => Some("Page Viewed"),
            "screen" => Some("Screen Viewed"),
            _ => None,
        };
        let mut event = None;
        if let Some(name) = normalized {
            match get("event") {
                Member::Absent => event = Some(name),
                member if member.as_str() == Some(name) => {}
                _ => return Ok(Fast::Slow),
            }
        }
        let forward = Ok(Fast::Forward { event });
        let Some(plan) = plan else {
            return forward;
        };
        if plan.common.is_some() {
            return Ok(Fast::Slow);
        }
        let name = counted_name(Some(kind), get("event"));
        let (unversioned, found) = match resolve(plan, kind, name, envelope.event_version.as_ref())
        {
            Resolved::Blocked => return Err(unplanned_event(source, name.unwrap_or_default())),
            Resolved::Unchecked => return forward,
            Resolved::Schema(field, schema) => match get(field) {
                Member::Skipped(_) if envelope.checked(field, schema) => (None, Vec::new()),
                Member::Skipped(_) => return Ok(Fast::Slow),
                body => (
                    None,
                    field_violations(&schema.validator, field, body.value()),
                ),
            },
            Resolved::Unversioned(violation) => (Some(violation), Vec::new()),
        };
        if unversioned.is_none() && found.is_empty() {
            return forward;
        }
        if plan.on_violation != ViolationPolicy::Block {
            return Ok(Fast::Slow);
        }
        let violations: Vec<&Violation> = unversioned
            .iter()
            .chain(found.iter().map(|v| &v.violation))
            .collect();
        Err(plan_violation(source, name, &violations))
    }

    /// Metric labels for a record the validate stage rejected, from
    /// bounded sets so a producer cannot blow up the label space: the
    /// source id when it is configured (else [`UNKNOWN_SOURCE_LABEL`]), and
    /// the rejection detail's `event` when that source's plan lists it
    /// (else [`OTHER_EVENT_LABEL`]).
    pub fn failure_labels<'a>(
        &'a self,
        source: Option<&str>,
        detail: &Value,
    ) -> (&'a str, &'a str) {
        let Some((id, plan)) = source.and_then(|s| self.sources.get_key_value(s)) else {
            return (UNKNOWN_SOURCE_LABEL, OTHER_EVENT_LABEL);
        };
        let event = detail
            .get("event")
            .and_then(Value::as_str)
            .and_then(|name| plan.as_ref()?.events.get_key_value(name))
            .map_or(OTHER_EVENT_LABEL, |(name, _)| name.as_str());
        (id.as_str(), event)
    }
}

/// One top-level member of an event as the checks see it: parsed, or
/// (for the big ones the fast path does not build) only its [`Shape`].
#[derive(Debug, Clone, Copy)]
enum Member<'a> {
    Absent,
    Parsed(&'a Value),
    Skipped(Shape),
}

impl<'a> Member<'a> {
    fn of(value: Option<&'a Value>) -> Self {
        value.map_or(Member::Absent, Member::Parsed)
    }

    /// The value, when it was parsed.
    fn value(self) -> Option<&'a Value> {
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

    fn as_str(self) -> Option<&'a str> {
        self.value().and_then(Value::as_str)
    }
}

/// The call type, if it is one of [`EVENT_TYPES`].
fn call_type(member: Member<'_>) -> Option<&'static str> {
    let t = member.as_str()?;
    EVENT_TYPES.iter().copied().find(|k| *k == t)
}

/// The event name a call counts as (see [`messages::event_name`]).
fn counted_name<'a>(kind: Option<&str>, event: Member<'a>) -> Option<&'a str> {
    match kind {
        Some("track") => event.as_str(),
        Some("page") => Some("Page Viewed"),
        Some("screen") => Some("Screen Viewed"),
        _ => None,
    }
}

fn spec_violation(source: &str, event: Option<&str>, violations: Vec<Violation>) -> OperatorError {
    OperatorError::rejected(
        "spec_violation",
        json!({ "source": source, "event": event, "violations": violations }),
    )
}

fn unplanned_event(source: &str, event: &str) -> OperatorError {
    OperatorError::rejected(
        "unplanned_event",
        json!({ "source": source, "event": event }),
    )
}

/// The type of a JSON value, and the number of members if it is an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
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
    fn of(value: &Value) -> Shape {
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

/// [`spec_violations`] over any view of the top level. It reads the
/// members in [`envelope::PARSED`] by value and the ones in
/// [`envelope::SHAPED`] by shape only.
fn spec_check<'a>(get: impl Fn(&str) -> Member<'a>) -> Vec<Violation> {
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
            None | Some(Shape::Object(_)) => {}
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
            Some(Value::String(t)) if messages::parse_time_ms(t).is_some() => {}
            Some(_) => out.push(Violation::new(
                format!("/{field}"),
                "must be an RFC 3339 date-time",
            )),
        }
    }
    out
}

/// The event time (ms) dedupe remembers, as [`messages::event_time_ms`].
fn event_time_of<'a>(get: impl Fn(&str) -> Member<'a>) -> Option<i64> {
    ["timestamp", "receivedAt", "originalTimestamp"]
        .iter()
        .find_map(|f| get(f).as_str().and_then(messages::parse_time_ms))
}

/// The operator's fast path: an event's top level read in one pass over
/// its bytes that is exactly as strict as parsing it into a [`Value`]
/// (syntax, UTF-8, escapes, number range, nesting depth, trailing bytes:
/// the same `serde_json` deserializer checks them) but builds only what the
/// checks read. Parsing a whole event into a `Value` costs about ten times
/// the pass itself; `context` alone is often half the bytes.
mod envelope {
    use std::fmt;

    use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use serde_json::Value;

    use super::{CompiledPlan, Member, PlanSchema, Shape, Stream, Verdict, STREAM_MAX_KEYS};

    /// Top-level members the checks read by value: always parsed.
    pub(super) const PARSED: [&str; 12] = [
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
    pub(super) const SHAPED: [&str; 4] = ["properties", "traits", "context", "integrations"];
    const TYPE: usize = 0;
    const EVENT: usize = 3;
    const CONTEXT: usize = 2;
    const INTEGRATIONS: usize = 3;

    /// An event's top level: what [`super::spec_check`] and the plan read.
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
        /// check them (see [`super::wants_body`]), or checked while read
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
            let mut de = serde_json::Deserializer::from_slice(bytes);
            let envelope = (&mut de).deserialize_any(TopLevel { plan, stream })?;
            de.end()?;
            Ok(envelope)
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
                            super::wants_body(
                                plan,
                                SHAPED[i],
                                envelope.parsed[TYPE].as_ref(),
                                envelope.parsed[EVENT].as_ref(),
                            )
                        }) =>
                    {
                        let stream = self.plan.filter(|_| self.stream).and_then(|plan| {
                            super::stream_for(
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
        fn deserialize<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
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
        fn deserialize<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
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

    /// A value checked against a [`Stream`] while read: its shape and
    /// the verdict. As strict as parsing it.
    struct Checked<'s>(&'s Stream);

    impl<'de> DeserializeSeed<'de> for Checked<'_> {
        type Value = (Shape, Verdict);
        fn deserialize<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
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
        fn deserialize<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
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

    /// Any value, checked by the deserializer and not built.
    struct Skip(Shape);

    impl<'de> de::Deserialize<'de> for Skip {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Skip, D::Error> {
            deserializer.deserialize_any(SkipVisitor).map(Skip)
        }
    }

    struct SkipVisitor;

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
}

/// Whether `plan` may check the body `field` (`properties` or `traits`)
/// of a call whose `type` and `event` members are, as far as the pass has
/// read, `kind` and `event`. A body it skips but the plan then needs sends
/// the event down the reference path, so a wrong "no" costs time only.
fn wants_body(
    plan: &CompiledPlan,
    field: &str,
    kind: Option<&Value>,
    event: Option<&Value>,
) -> bool {
    if plan.common.is_some() {
        return false; // the reference path parses everything anyway
    }
    let Some(kind) = kind.and_then(Value::as_str) else {
        return true;
    };
    match (kind, field) {
        ("track", "properties") => event
            .and_then(Value::as_str)
            .is_none_or(|name| plan.events.contains_key(name)),
        ("page", "properties") => plan.events.contains_key("Page Viewed"),
        ("screen", "properties") => plan.events.contains_key("Screen Viewed"),
        ("identify", "traits") => plan.identify.is_some(),
        ("group", "traits") => plan.group.is_some(),
        _ => false,
    }
}

/// The [`Stream`] of the schema `plan` checks the body `field` against,
/// for a call whose `type`, `event` and `context.protocols.event_version`
/// are, as far as the pass has read, `kind`, `event` and `version`. The
/// fast path trusts the check only if the whole event resolves to the
/// same schema.
fn stream_for<'p>(
    plan: &'p CompiledPlan,
    field: &str,
    kind: Option<&Value>,
    event: Option<&Value>,
    version: Option<&Value>,
) -> Option<&'p Stream> {
    let kind = call_type(Member::of(kind))?;
    let name = counted_name(Some(kind), Member::of(event));
    match resolve(plan, kind, name, version) {
        Resolved::Schema(f, schema) if f == field => schema.stream.as_ref(),
        _ => None,
    }
}

/// What the fast path decided.
enum Fast {
    /// Forward the input bytes; for a `page` / `screen` call without an
    /// `event`, with `"event": name` added as the first member.
    Forward { event: Option<&'static str> },
    /// The outcome needs the parsed event (it must change, or the plan
    /// has a `common` schema): take the reference path.
    Slow,
}

/// `bytes`, a JSON object with at least one member, with `"event":name`
/// as its first member. `name` needs no escaping.
fn with_event_first(bytes: &[u8], name: &str) -> Vec<u8> {
    let rest = bytes
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| bytes.get(open + 1..))
        .unwrap_or_default();
    let mut out = Vec::with_capacity(bytes.len() + name.len() + 12);
    out.extend_from_slice(b"{\"event\":\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\",");
    out.extend_from_slice(rest);
    out
}

/// A schema violation and the top-level keys (below `properties` /
/// `traits`) that removing would drop the offending value.
struct SchemaViolation {
    violation: Violation,
    keys: Vec<String>,
}

fn escape_pointer_segment(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn unescape_pointer_segment(s: &str) -> String {
    s.replace("~1", "/").replace("~0", "~")
}

fn truncate_reason(reason: String) -> String {
    if reason.chars().count() <= MAX_REASON_CHARS {
        return reason;
    }
    let mut short: String = reason.chars().take(MAX_REASON_CHARS).collect();
    short.push('…');
    short
}

/// Every violation of `schema` by `instance`, which sits at JSON pointer
/// `base` in the event. With `omittable`, each violation names the key of
/// `instance` whose removal drops the offending value.
fn schema_violations(
    schema: &jsonschema::Validator,
    base: &str,
    instance: &Value,
    omittable: bool,
) -> Vec<SchemaViolation> {
    // The common case, and much cheaper than collecting errors.
    if schema.is_valid(instance) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for error in schema.iter_errors(instance) {
        let at = error.instance_path.as_str();
        let pointer = format!("{base}{at}");
        match &error.kind {
            // One violation per unexpected key, so `omit` can drop each.
            jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected }
            | jsonschema::error::ValidationErrorKind::UnevaluatedProperties { unexpected } => {
                for key in unexpected {
                    out.push(SchemaViolation {
                        violation: Violation::new(
                            format!("{pointer}/{}", escape_pointer_segment(key)),
                            "property is not allowed by the tracking plan",
                        ),
                        keys: if omittable && at.is_empty() {
                            vec![key.clone()]
                        } else {
                            Vec::new()
                        },
                    });
                }
                if at.is_empty() {
                    continue;
                }
            }
            _ => {}
        }
        let first = at
            .strip_prefix('/')
            .filter(|_| omittable)
            .map(|rest| unescape_pointer_segment(rest.split('/').next().unwrap_or_default()));
        out.push(SchemaViolation {
            violation: Violation::new(pointer, truncate_reason(error.to_string())),
            keys: first.into_iter().collect(),
        });
    }
    out
}

/// Where an event names its version.
const VERSION_POINTER: &str = "/context/protocols/event_version";

/// The `context.protocols.event_version` of a parsed event.
fn event_version_of(event: &Value) -> Option<&Value> {
    event
        .get("context")
        .and_then(|c| c.get("protocols"))
        .and_then(|p| p.get("event_version"))
}

/// What a plan checks an event's properties or traits against.
enum Resolved<'p> {
    /// Nothing: no schema for this call.
    Unchecked,
    /// A track event the plan does not list, under `unplanned_events: block`.
    Blocked,
    /// `field` (`properties` or `traits`) against `schema`.
    Schema(&'static str, &'p PlanSchema),
    /// A planned event in a version the plan lacks, or in no valid version.
    Unversioned(Violation),
}

/// Which schema of `plan` applies to a spec-valid call of type `kind`
/// counted as `name`, with `context.protocols.event_version` `version`.
fn resolve<'p>(
    plan: &'p CompiledPlan,
    kind: &str,
    name: Option<&str>,
    version: Option<&Value>,
) -> Resolved<'p> {
    match kind {
        "track" | "page" | "screen" => {
            let name = name.unwrap_or_default();
            let Some(versions) = plan.events.get(name) else {
                return if kind == "track" && plan.unplanned_events == UnplannedEvents::Block {
                    Resolved::Blocked
                } else {
                    Resolved::Unchecked
                };
            };
            let version = match version {
                None | Some(Value::Null) => Some(EventVersion::FIRST),
                Some(v) => EventVersion::from_value(v),
            };
            match version {
                None => Resolved::Unversioned(Violation::new(
                    VERSION_POINTER,
                    "must be a positive integer",
                )),
                Some(version) => match versions.get(&version) {
                    Some(schema) => Resolved::Schema("properties", schema),
                    None => Resolved::Unversioned(Violation::new(
                        VERSION_POINTER,
                        format!("version {version} of {name:?} is not in the tracking plan"),
                    )),
                },
            }
        }
        "identify" => plan
            .identify
            .as_ref()
            .map_or(Resolved::Unchecked, |s| Resolved::Schema("traits", s)),
        "group" => plan
            .group
            .as_ref()
            .map_or(Resolved::Unchecked, |s| Resolved::Schema("traits", s)),
        _ => Resolved::Unchecked,
    }
}

/// The plan's schemas for one event: the common one over the whole event,
/// and the one of its properties or traits (`field`), if any.
struct PlanSchemas<'p> {
    common: Option<&'p jsonschema::Validator>,
    field: Option<(&'static str, &'p jsonschema::Validator)>,
}

impl PlanSchemas<'_> {
    fn violations(&self, event: &Value) -> Vec<SchemaViolation> {
        let mut out = Vec::new();
        if let Some(common) = self.common {
            out.extend(schema_violations(common, "", event, false));
        }
        if let Some((field, schema)) = self.field {
            out.extend(field_violations(schema, field, event.get(field)));
        }
        out
    }
}

/// Violations of `schema` by the event's `field`, an empty object if absent.
fn field_violations(
    schema: &jsonschema::Validator,
    field: &str,
    values: Option<&Value>,
) -> Vec<SchemaViolation> {
    let empty = Value::Object(Map::new());
    let values = values.unwrap_or(&empty);
    if schema.is_valid(values) {
        return Vec::new();
    }
    schema_violations(schema, &format!("/{field}"), values, true)
}

/// Step 4 on a spec-valid event of call type `kind`. `Ok(true)` when it
/// changed the event.
fn apply_plan(
    plan: &CompiledPlan,
    source: &str,
    kind: &str,
    event: &mut Value,
) -> Result<bool, OperatorError> {
    let name = event.get("event").and_then(Value::as_str);
    // A violation no schema finds: the event names a version the plan lacks.
    let mut unversioned: Option<Violation> = None;
    let field = match resolve(plan, kind, name, event_version_of(event)) {
        Resolved::Blocked => return Err(unplanned_event(source, name.unwrap_or_default())),
        Resolved::Unchecked => None,
        Resolved::Schema(field, schema) => Some((field, &schema.validator)),
        Resolved::Unversioned(violation) => {
            unversioned = Some(violation);
            None
        }
    };
    let schemas = PlanSchemas {
        common: plan.common.as_ref(),
        field,
    };
    let found = schemas.violations(event);
    if found.is_empty() && unversioned.is_none() {
        return Ok(false);
    }
    let violations: Vec<&Violation> = unversioned
        .iter()
        .chain(found.iter().map(|v| &v.violation))
        .collect();
    match plan.on_violation {
        ViolationPolicy::Block => Err(plan_violation(
            source,
            messages::event_name(event),
            &violations,
        )),
        ViolationPolicy::Allow => {
            let violations = json!(violations);
            annotate(event, "violations", violations);
            Ok(true)
        }
        ViolationPolicy::Omit => {
            let mut keys: Vec<&String> = found.iter().flat_map(|v| v.keys.iter()).collect();
            keys.sort();
            keys.dedup();
            let mut omitted = Vec::new();
            if let Some((field, _)) = schemas.field {
                if let Some(Value::Object(values)) = event.get_mut(field) {
                    for key in keys {
                        if values.shift_remove(key.as_str()).is_some() {
                            omitted.push(Value::from(format!(
                                "/{field}/{}",
                                escape_pointer_segment(key)
                            )));
                        }
                    }
                }
            }
            // Removing keys may leave violations it cannot fix (or cause
            // new ones, e.g. a removed required property): attach those.
            let remaining: Vec<Violation> = unversioned
                .into_iter()
                .chain(schemas.violations(event).into_iter().map(|v| v.violation))
                .collect();
            if !omitted.is_empty() {
                annotate(event, "omitted", Value::Array(omitted));
            }
            if !remaining.is_empty() {
                annotate(event, "violations", json!(remaining));
            }
            Ok(true)
        }
    }
}

fn plan_violation(source: &str, event: Option<&str>, violations: &[&Violation]) -> OperatorError {
    OperatorError::rejected(
        "plan_violation",
        json!({ "source": source, "event": event, "violations": violations }),
    )
}

/// Set `context.protocols.<key>`, creating the objects on the way.
fn annotate(event: &mut Value, key: &str, value: Value) {
    let Value::Object(event) = event else {
        return;
    };
    let context = event
        .entry("context")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(context) = context else {
        return;
    };
    let protocols = context
        .entry("protocols")
        .or_insert_with(|| Value::Object(Map::new()));
    if !protocols.is_object() {
        *protocols = Value::Object(Map::new());
    }
    if let Value::Object(protocols) = protocols {
        protocols.insert(key.to_string(), value);
    }
}

/// What the store remembers per `dedupe/<source>/<messageId>`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct DedupeEntry {
    /// Event time (ms) of the first event with this id, if it had one.
    event_time: Option<i64>,
    /// Stream time (ms) at which the id is forgotten.
    expires_at: i64,
}

fn dedupe_key(source: &str, message_id: &str) -> Vec<u8> {
    format!("{DEDUPE_PREFIX}{source}/{message_id}").into_bytes()
}

/// The validate operator of one task. See the module doc.
#[derive(Debug, Clone)]
pub struct ValidateOperator {
    validator: Arc<Validator>,
}

impl ValidateOperator {
    pub fn new(validator: Arc<Validator>) -> Self {
        ValidateOperator { validator }
    }
}

impl ValidateOperator {
    /// Steps 5–6 for an event that passed: drop a repeated `messageId`,
    /// else remember it and emit `encode()`.
    fn dedupe_and_emit(
        &self,
        record: &Record<'_>,
        ctx: &mut Context<'_>,
        source: &str,
        message_id: Option<&str>,
        event_time: Option<i64>,
        encode: impl FnOnce() -> Result<Vec<u8>, OperatorError>,
    ) -> Result<(), OperatorError> {
        let window = self.validator.dedupe_window.millis();
        let key = match message_id {
            Some(message_id) if window > 0 => {
                let key = dedupe_key(source, message_id);
                if ctx.get(&key)?.is_some() {
                    return Ok(());
                }
                Some(key)
            }
            _ => None,
        };
        let value = encode()?;
        if let Some(key) = key {
            // Stream time when the task has seen a tick; before that the
            // event's own time (then the broker's), so replays agree.
            let base = if ctx.now() > 0 {
                ctx.now()
            } else {
                event_time.or(record.timestamp_ms).unwrap_or(0)
            };
            let entry = DedupeEntry {
                event_time,
                expires_at: base.saturating_add(window),
            };
            ctx.put_json(&key, &entry)?;
            ctx.set_timer(entry.expires_at, &key);
        }
        ctx.emit_with_headers(
            outputs::NEXT,
            record.key.map(<[u8]>::to_vec),
            value,
            vec![(SOURCE.to_string(), source.as_bytes().to_vec())],
        );
        Ok(())
    }
}

impl Operator for ValidateOperator {
    fn process(&mut self, record: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let header = record.header(SOURCE);
        let invalid_json = |error: String| {
            OperatorError::rejected("invalid_json", json!({ "source": header, "error": error }))
        };
        let known = header.and_then(|s| self.validator.sources.get_key_value(s));
        let plan = known.and_then(|(_, plan)| plan.as_deref());
        let envelope = envelope::Envelope::parse(record.value, plan)
            .map_err(|e| invalid_json(e.to_string()))?
            .ok_or_else(|| invalid_json("expected a JSON object".into()))?;
        let Some((source, _)) = known else {
            return Err(OperatorError::rejected(
                "unknown_source",
                json!({ "source": header }),
            ));
        };
        match self.validator.check_envelope(plan, source, &envelope)? {
            Fast::Forward { event } => self.dedupe_and_emit(
                record,
                ctx,
                source,
                envelope.get("messageId").as_str(),
                event_time_of(|key| envelope.get(key)),
                || {
                    // Unchanged events go out as they came: no encoding.
                    Ok(match event {
                        None => record.value.to_vec(),
                        Some(name) => with_event_first(record.value, name),
                    })
                },
            ),
            Fast::Slow => {
                let mut event: Value = serde_json::from_slice(record.value)
                    .map_err(|e| invalid_json(e.to_string()))?;
                let changed = self.validator.check_in_place(source, &mut event)?;
                self.dedupe_and_emit(
                    record,
                    ctx,
                    source,
                    event.get("messageId").and_then(Value::as_str),
                    messages::event_time_ms(&event),
                    || match changed {
                        true => serde_json::to_vec(&event).map_err(|e| invalid_json(e.to_string())),
                        false => Ok(record.value.to_vec()),
                    },
                )
            }
        }
    }

    fn on_timer(&mut self, key: &[u8], ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        if !key.starts_with(DEDUPE_PREFIX.as_bytes()) {
            return Ok(());
        }
        let entry = ctx
            .get(key)?
            .and_then(|bytes| serde_json::from_slice::<DedupeEntry>(&bytes).ok());
        match entry {
            // Re-armed by a later event after an earlier expiry: keep it.
            Some(entry) if entry.expires_at > ctx.now() => {}
            _ => ctx.delete(key),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdp_pipeline::{Emitted, OperatorHarness};
    use proptest::prelude::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn source(id: &str, plan: Option<&str>) -> SourceConfig {
        SourceConfig {
            id: id.into(),
            write_key: format!("wk_{id}"),
            tracking_plan: plan.map(String::from),
        }
    }

    fn shop_plan(unplanned: UnplannedEvents, on_violation: ViolationPolicy) -> TrackingPlan {
        TrackingPlan {
            unplanned_events: unplanned,
            on_violation,
            identify: Some(
                json!({"type": "object", "properties": {"email": {"type": "string", "format": "email"}}}),
            ),
            group: Some(
                json!({"type": "object", "properties": {"employees": {"type": "integer"}}}),
            ),
            events: BTreeMap::from([
                (
                    "Order Completed".to_string(),
                    json!({
                        "type": "object",
                        "required": ["revenue"],
                        "properties": {"revenue": {"type": "number", "minimum": 0}, "coupon": {"type": "string"}}
                    }),
                ),
                (
                    "Page Viewed".to_string(),
                    json!({"type": "object", "properties": {"path": {"type": "string"}}}),
                ),
            ]),
            ..TrackingPlan::default()
        }
    }

    fn harness(
        plan: Option<TrackingPlan>,
    ) -> Result<OperatorHarness<ValidateOperator>, ConfigError> {
        let plans: BTreeMap<String, TrackingPlan> =
            plan.into_iter().map(|p| ("shop".to_string(), p)).collect();
        let sources = if plans.is_empty() {
            vec![source("web", None)]
        } else {
            vec![source("web", Some("shop"))]
        };
        let validator = Validator::new(&sources, &plans, DEFAULT_DEDUPE_WINDOW)?;
        Ok(OperatorHarness::new(ValidateOperator::new(Arc::new(
            validator,
        ))))
    }

    fn web() -> Vec<(String, Vec<u8>)> {
        vec![(SOURCE.to_string(), b"web".to_vec())]
    }

    fn send(
        h: &mut OperatorHarness<ValidateOperator>,
        event: &Value,
    ) -> Result<Vec<Emitted>, OperatorError> {
        let bytes = serde_json::to_vec(event)
            .map_err(|e| OperatorError::rejected("test", json!(e.to_string())))?;
        h.process(Some(b"k1"), &bytes, &web())
    }

    /// The rejection reason and detail, or `None` if the record passed.
    fn rejection(result: Result<Vec<Emitted>, OperatorError>) -> Option<(&'static str, Value)> {
        match result {
            Err(OperatorError::Rejected { reason, detail }) => Some((reason, detail)),
            _ => None,
        }
    }

    fn pointers(detail: &Value) -> Vec<String> {
        detail["violations"]
            .as_array()
            .map(|vs| {
                vs.iter()
                    .filter_map(|v| v["pointer"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn single_output(out: &[Emitted]) -> Result<Value, Box<dyn std::error::Error>> {
        match out {
            [one] => Ok(serde_json::from_slice(&one.value)?),
            _ => Err(format!("expected one output, got {}", out.len()).into()),
        }
    }

    fn track(name: &str, properties: Value) -> Value {
        json!({"type": "track", "event": name, "userId": "u1", "messageId": "m1",
               "timestamp": "2026-11-26T10:00:00Z", "properties": properties})
    }

    #[test]
    fn shared_config_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Validator>();
        assert_send_sync::<ValidateOperator>();
    }

    #[test]
    fn valid_event_passes_with_key_and_source_header() -> TestResult {
        let mut h = harness(None)?;
        let out = send(&mut h, &track("Anything", json!({"a": 1})))?;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].output, outputs::NEXT);
        assert_eq!(out[0].key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(out[0].headers, web());
        assert_eq!(single_output(&out)?["event"], "Anything");
        Ok(())
    }

    #[test]
    fn garbage_and_non_objects_are_invalid_json() -> TestResult {
        let mut h = harness(None)?;
        for bytes in [&b"not json"[..], b"[1,2]", b"\"s\"", b"", b"{\"type\":"] {
            let r = h.process(None, bytes, &web());
            assert_eq!(rejection(r).map(|r| r.0), Some("invalid_json"), "{bytes:?}");
        }
        Ok(())
    }

    #[test]
    fn missing_or_unknown_source_is_rejected() -> TestResult {
        let mut h = harness(None)?;
        let bytes = serde_json::to_vec(&track("X", json!({})))?;
        assert_eq!(
            rejection(h.process(None, &bytes, &[])).map(|r| r.0),
            Some("unknown_source")
        );
        let other = vec![(SOURCE.to_string(), b"ios".to_vec())];
        assert_eq!(
            rejection(h.process(None, &bytes, &other)).map(|r| r.0),
            Some("unknown_source")
        );
        Ok(())
    }

    fn spec_pointers(event: Value) -> Result<Vec<String>, Box<dyn std::error::Error>> {
        let mut h = harness(None)?;
        match rejection(send(&mut h, &event)) {
            Some(("spec_violation", detail)) => Ok(pointers(&detail)),
            other => Err(format!("expected spec_violation, got {other:?}").into()),
        }
    }

    /// The event is refused for breaking the spec at exactly `expected`.
    fn assert_spec(event: Value, expected: &[&str]) -> TestResult {
        let got = spec_pointers(event.clone())?;
        assert_eq!(got, expected, "{event}");
        Ok(())
    }

    #[test]
    fn spec_type_must_be_a_known_call() -> TestResult {
        assert_spec(json!({"userId": "u1"}), &["/type"])?;
        assert_spec(json!({"type": "purchase", "userId": "u1"}), &["/type"])?;
        assert_spec(json!({"type": 3, "userId": "u1"}), &["/type"])?;
        Ok(())
    }

    #[test]
    fn spec_needs_user_id_or_anonymous_id() -> TestResult {
        assert_spec(json!({"type": "identify"}), &["/userId"])?;
        assert_spec(
            json!({"type": "identify", "userId": "", "anonymousId": null}),
            &["/userId"],
        )?;
        assert_spec(
            json!({"type": "identify", "anonymousId": {"a": 1}}),
            &["/anonymousId"],
        )?;
        let mut h = harness(None)?;
        assert_eq!(
            send(&mut h, &json!({"type": "identify", "anonymousId": "a1"}))?.len(),
            1
        );
        assert_eq!(
            send(&mut h, &json!({"type": "identify", "userId": 42}))?.len(),
            1
        );
        Ok(())
    }

    #[test]
    fn spec_track_needs_an_event_name() -> TestResult {
        assert_spec(json!({"type": "track", "userId": "u"}), &["/event"])?;
        assert_spec(
            json!({"type": "track", "userId": "u", "event": ""}),
            &["/event"],
        )?;
        assert_spec(
            json!({"type": "track", "userId": "u", "event": 7}),
            &["/event"],
        )?;
        Ok(())
    }

    #[test]
    fn spec_group_needs_group_id_and_alias_needs_previous_id() -> TestResult {
        assert_spec(json!({"type": "group", "userId": "u"}), &["/groupId"])?;
        assert_spec(json!({"type": "alias", "userId": "u"}), &["/previousId"])?;
        let mut h = harness(None)?;
        assert_eq!(
            send(
                &mut h,
                &json!({"type": "group", "userId": "u", "groupId": "g"})
            )?
            .len(),
            1
        );
        assert_eq!(
            send(
                &mut h,
                &json!({"type": "alias", "userId": "u", "previousId": "a"})
            )?
            .len(),
            1
        );
        Ok(())
    }

    #[test]
    fn spec_properties_traits_and_context_must_be_objects() -> TestResult {
        let event = json!({"type": "identify", "userId": "u", "properties": [1], "traits": "x", "context": 5});
        assert_spec(event, &["/properties", "/traits", "/context"])?;
        Ok(())
    }

    #[test]
    fn spec_message_id_is_a_short_string() -> TestResult {
        let long = "m".repeat(MAX_MESSAGE_ID_CHARS + 1);
        assert_spec(
            json!({"type": "identify", "userId": "u", "messageId": long}),
            &["/messageId"],
        )?;
        assert_spec(
            json!({"type": "identify", "userId": "u", "messageId": 5}),
            &["/messageId"],
        )?;
        let mut h = harness(None)?;
        let ok = json!({"type": "identify", "userId": "u", "messageId": "m".repeat(MAX_MESSAGE_ID_CHARS)});
        assert_eq!(send(&mut h, &ok)?.len(), 1);
        Ok(())
    }

    #[test]
    fn spec_timestamp_must_be_rfc3339() -> TestResult {
        assert_spec(
            json!({"type": "identify", "userId": "u", "timestamp": "yesterday"}),
            &["/timestamp"],
        )?;
        assert_spec(
            json!({"type": "identify", "userId": "u", "timestamp": 1700000000}),
            &["/timestamp"],
        )?;
        Ok(())
    }

    #[test]
    fn spec_violations_are_all_collected() -> TestResult {
        let event = json!({"type": "track", "userId": true, "properties": 1, "timestamp": "x", "messageId": ""});
        assert_spec(
            event,
            &[
                "/userId",
                "/event",
                "/properties",
                "/messageId",
                "/timestamp",
            ],
        )?;
        Ok(())
    }

    #[test]
    fn spec_violations_are_rejected_even_when_the_plan_allows() -> TestResult {
        let mut h = harness(Some(shop_plan(
            UnplannedEvents::Allow,
            ViolationPolicy::Allow,
        )))?;
        let r = send(&mut h, &json!({"type": "track", "userId": "u"}));
        assert_eq!(rejection(r).map(|r| r.0), Some("spec_violation"));
        Ok(())
    }

    #[test]
    fn page_and_screen_are_normalized_and_keep_their_name() -> TestResult {
        let mut h = harness(None)?;
        let page = single_output(&send(
            &mut h,
            &json!({"type": "page", "name": "Home", "anonymousId": "a"}),
        )?)?;
        assert_eq!(
            (page["event"].as_str(), page["name"].as_str()),
            (Some("Page Viewed"), Some("Home"))
        );
        let screen = single_output(&send(
            &mut h,
            &json!({"type": "screen", "name": "Cart", "anonymousId": "a"}),
        )?)?;
        assert_eq!(screen["event"], "Screen Viewed");
        assert_eq!(screen["name"], "Cart");
        Ok(())
    }

    #[test]
    fn plan_block_rejects_with_every_violation() -> TestResult {
        let mut h = harness(Some(shop_plan(
            UnplannedEvents::Allow,
            ViolationPolicy::Block,
        )))?;
        let r = send(
            &mut h,
            &track("Order Completed", json!({"revenue": -5, "coupon": 3})),
        );
        let Some((reason, detail)) = rejection(r) else {
            return Err("expected a rejection".into());
        };
        assert_eq!(reason, "plan_violation");
        let mut ps = pointers(&detail);
        ps.sort();
        assert_eq!(ps, vec!["/properties/coupon", "/properties/revenue"]);
        assert!(h.state.map.is_empty(), "a rejected record writes no state");
        assert_eq!(
            send(&mut h, &track("Order Completed", json!({"revenue": 5})))?.len(),
            1
        );
        Ok(())
    }

    #[test]
    fn plan_omit_removes_offending_properties() -> TestResult {
        let mut h = harness(Some(shop_plan(
            UnplannedEvents::Allow,
            ViolationPolicy::Omit,
        )))?;
        let out = send(
            &mut h,
            &track(
                "Order Completed",
                json!({"revenue": 10, "coupon": 3, "sku": "a"}),
            ),
        )?;
        let event = single_output(&out)?;
        assert_eq!(event["properties"], json!({"revenue": 10, "sku": "a"}));
        assert_eq!(
            event["context"]["protocols"]["omitted"],
            json!(["/properties/coupon"])
        );
        assert!(event["context"]["protocols"].get("violations").is_none());
        Ok(())
    }

    #[test]
    fn plan_omit_attaches_what_removing_cannot_fix() -> TestResult {
        let mut h = harness(Some(shop_plan(
            UnplannedEvents::Allow,
            ViolationPolicy::Omit,
        )))?;
        let event = single_output(&send(
            &mut h,
            &track("Order Completed", json!({"revenue": "ten"})),
        )?)?;
        assert_eq!(event["properties"], json!({}));
        assert_eq!(
            event["context"]["protocols"]["omitted"],
            json!(["/properties/revenue"])
        );
        assert_eq!(
            event["context"]["protocols"]["violations"][0]["pointer"],
            "/properties"
        );
        Ok(())
    }

    #[test]
    fn plan_allow_forwards_with_violations_attached() -> TestResult {
        let mut h = harness(Some(shop_plan(
            UnplannedEvents::Allow,
            ViolationPolicy::Allow,
        )))?;
        let event = single_output(&send(
            &mut h,
            &track("Order Completed", json!({"revenue": -1})),
        )?)?;
        assert_eq!(event["properties"], json!({"revenue": -1}));
        assert_eq!(
            event["context"]["protocols"]["violations"][0]["pointer"],
            "/properties/revenue"
        );
        Ok(())
    }

    #[test]
    fn plan_checks_identify_group_and_page_schemas() -> TestResult {
        let mut h = harness(Some(shop_plan(
            UnplannedEvents::Block,
            ViolationPolicy::Block,
        )))?;
        let identify =
            json!({"type": "identify", "userId": "u", "traits": {"email": "not-an-email"}});
        let r = rejection(send(&mut h, &identify)).map(|(r, d)| (r, pointers(&d)));
        assert_eq!(
            r,
            Some(("plan_violation", vec!["/traits/email".to_string()]))
        );
        let group = json!({"type": "group", "userId": "u", "groupId": "g", "traits": {"employees": "many"}});
        let r = rejection(send(&mut h, &group)).map(|(r, d)| (r, pointers(&d)));
        assert_eq!(
            r,
            Some(("plan_violation", vec!["/traits/employees".to_string()]))
        );
        let page = json!({"type": "page", "userId": "u", "properties": {"path": 1}});
        let r = rejection(send(&mut h, &page)).map(|(r, d)| (r, pointers(&d)));
        assert_eq!(
            r,
            Some(("plan_violation", vec!["/properties/path".to_string()]))
        );
        // Unplanned `block` applies to track calls only.
        assert_eq!(
            send(&mut h, &json!({"type": "screen", "userId": "u"}))?.len(),
            1
        );
        let ok = json!({"type": "identify", "userId": "u", "traits": {"email": "a@example.com"}});
        assert_eq!(send(&mut h, &ok)?.len(), 1);
        Ok(())
    }

    #[test]
    fn unplanned_events_allow_and_block() -> TestResult {
        let mut allow = harness(Some(shop_plan(
            UnplannedEvents::Allow,
            ViolationPolicy::Block,
        )))?;
        assert_eq!(
            send(&mut allow, &track("Product Viewed", json!({"x": 1})))?.len(),
            1
        );
        let mut block = harness(Some(shop_plan(
            UnplannedEvents::Block,
            ViolationPolicy::Block,
        )))?;
        let r = rejection(send(&mut block, &track("Product Viewed", json!({"x": 1}))));
        assert_eq!(
            r,
            Some((
                "unplanned_event",
                json!({"source": "web", "event": "Product Viewed"})
            ))
        );
        Ok(())
    }

    #[test]
    fn duplicates_are_dropped_within_the_window_and_forgotten_after() -> TestResult {
        let mut h = harness(None)?;
        let start = messages::parse_time_ms("2026-11-26T10:00:00Z").ok_or("time")?;
        h.tick(start)?;
        let event = track("X", json!({}));
        assert_eq!(send(&mut h, &event)?.len(), 1);
        assert_eq!(send(&mut h, &event)?.len(), 0, "duplicate dropped");
        let window = DEFAULT_DEDUPE_WINDOW.millis();
        h.tick(start + window - 1)?;
        assert_eq!(send(&mut h, &event)?.len(), 0, "still inside the window");
        h.tick(start + window)?;
        assert!(
            h.state.map.is_empty(),
            "expiry removes the key and its timer"
        );
        assert_eq!(send(&mut h, &event)?.len(), 1, "forgotten after the window");
        Ok(())
    }

    #[test]
    fn dedupe_is_per_source() -> TestResult {
        let sources = [source("web", None), source("ios", None)];
        let validator = Validator::new(&sources, &BTreeMap::new(), DEFAULT_DEDUPE_WINDOW)?;
        let mut h = OperatorHarness::new(ValidateOperator::new(Arc::new(validator)));
        let bytes = serde_json::to_vec(&track("X", json!({})))?;
        let ios = vec![(SOURCE.to_string(), b"ios".to_vec())];
        assert_eq!(h.process(None, &bytes, &web())?.len(), 1);
        assert_eq!(h.process(None, &bytes, &ios)?.len(), 1);
        assert_eq!(h.process(None, &bytes, &ios)?.len(), 0);
        Ok(())
    }

    #[test]
    fn zero_window_turns_dedupe_off() -> TestResult {
        let validator = Validator::new(
            &[source("web", None)],
            &BTreeMap::new(),
            Span::from_millis(0),
        )?;
        let mut h = OperatorHarness::new(ValidateOperator::new(Arc::new(validator)));
        let event = track("X", json!({}));
        assert_eq!(send(&mut h, &event)?.len(), 1);
        assert_eq!(send(&mut h, &event)?.len(), 1);
        assert!(h.state.map.is_empty());
        Ok(())
    }

    #[test]
    fn before_the_first_tick_expiry_is_based_on_event_time() -> TestResult {
        let mut h = harness(None)?;
        let event = track("X", json!({}));
        assert_eq!(send(&mut h, &event)?.len(), 1);
        let at = messages::parse_time_ms("2026-11-26T10:00:00Z").ok_or("time")?
            + DEFAULT_DEDUPE_WINDOW.millis();
        h.tick(at - 1)?;
        assert_eq!(send(&mut h, &event)?.len(), 0);
        h.tick(at)?;
        assert_eq!(send(&mut h, &event)?.len(), 1);
        Ok(())
    }

    #[test]
    fn events_without_message_id_are_not_deduped() -> TestResult {
        let mut h = harness(None)?;
        let event = json!({"type": "identify", "userId": "u"});
        assert_eq!(send(&mut h, &event)?.len(), 1);
        assert_eq!(send(&mut h, &event)?.len(), 1);
        Ok(())
    }

    #[test]
    fn config_errors_name_the_path() {
        let mut plan = shop_plan(UnplannedEvents::Allow, ViolationPolicy::Block);
        plan.events
            .insert("Order Completed".into(), json!({"type": "nonsense"}));
        let plans = BTreeMap::from([("shop".to_string(), plan)]);
        let err = Validator::new(
            &[source("web", Some("shop"))],
            &plans,
            DEFAULT_DEDUPE_WINDOW,
        )
        .err();
        let err = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err.starts_with("tracking_plans.shop.events.Order Completed: invalid JSON Schema: "),
            "{err}"
        );

        let err = Validator::new(
            &[source("web", Some("x"))],
            &BTreeMap::new(),
            DEFAULT_DEDUPE_WINDOW,
        )
        .err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("sources[0].tracking_plan: unknown tracking plan \"x\"")
        );

        let twice = [source("web", None), source("web", None)];
        let err = Validator::new(&twice, &BTreeMap::new(), DEFAULT_DEDUPE_WINDOW).err();
        assert_eq!(err.map(|e| e.path), Some("sources[1].id".to_string()));
    }

    #[test]
    fn tracking_plan_yaml_defaults_and_unknown_fields() -> TestResult {
        let plan: TrackingPlan = serde_yaml::from_str("events: {}")?;
        assert_eq!(plan.unplanned_events, UnplannedEvents::Allow);
        assert_eq!(plan.on_violation, ViolationPolicy::Block);
        assert!(serde_yaml::from_str::<TrackingPlan>("unplanned: block").is_err());
        let plan: TrackingPlan =
            serde_yaml::from_str("unplanned_events: block\non_violation: omit")?;
        assert_eq!(
            (plan.unplanned_events, plan.on_violation),
            (UnplannedEvents::Block, ViolationPolicy::Omit)
        );
        Ok(())
    }

    /// A harness for `plan` with dedupe off, so tests may repeat events.
    fn plan_harness(plan: TrackingPlan) -> Result<OperatorHarness<ValidateOperator>, ConfigError> {
        let plans = BTreeMap::from([("shop".to_string(), plan)]);
        let validator =
            Validator::new(&[source("web", Some("shop"))], &plans, Span::from_millis(0))?;
        Ok(OperatorHarness::new(ValidateOperator::new(Arc::new(
            validator,
        ))))
    }

    fn compile_error(plan: TrackingPlan) -> String {
        let plans = BTreeMap::from([("shop".to_string(), plan)]);
        Validator::new(
            &[source("web", Some("shop"))],
            &plans,
            DEFAULT_DEDUPE_WINDOW,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    }

    fn object_with_keys(n: usize) -> Value {
        Value::Object((0..n).map(|i| (format!("k{i}"), json!(i))).collect())
    }

    #[test]
    fn spec_enforces_segment_trait_and_property_limits() -> TestResult {
        let mut h = plan_harness(TrackingPlan::default())?;
        let identify = |traits: Value| json!({"type": "identify", "userId": "u", "traits": traits});
        assert_eq!(
            send(&mut h, &identify(object_with_keys(TRAITS_LIMIT - 1)))?.len(),
            1
        );
        assert_spec(identify(object_with_keys(TRAITS_LIMIT)), &["/traits"])?;
        let group = json!({"type": "group", "userId": "u", "groupId": "g", "traits": object_with_keys(TRAITS_LIMIT + 5)});
        assert_spec(group, &["/traits"])?;
        assert_spec(track("X", object_with_keys(TRAITS_LIMIT)), &["/properties"])?;
        assert_eq!(
            send(&mut h, &track("X", object_with_keys(TRAITS_LIMIT - 1)))?.len(),
            1
        );
        Ok(())
    }

    #[test]
    fn spec_limits_group_id_length() -> TestResult {
        let mut h = plan_harness(TrackingPlan::default())?;
        let group = |id: String| json!({"type": "group", "userId": "u", "groupId": id});
        assert_eq!(
            send(&mut h, &group("g".repeat(MAX_GROUP_ID_CHARS)))?.len(),
            1
        );
        assert_spec(group("g".repeat(MAX_GROUP_ID_CHARS + 1)), &["/groupId"])?;
        Ok(())
    }

    #[test]
    fn spec_checks_integrations_page_names_and_every_time_field() -> TestResult {
        let base = json!({"type": "page", "userId": "u"});
        let with = |field: &str, value: Value| {
            let mut e = base.clone();
            e[field] = value;
            e
        };
        assert_spec(with("integrations", json!(true)), &["/integrations"])?;
        assert_spec(with("name", json!(5)), &["/name"])?;
        for field in ["timestamp", "originalTimestamp", "sentAt", "receivedAt"] {
            assert_spec(with(field, json!("26/11/2026")), &[&format!("/{field}")])?;
        }
        let mut h = plan_harness(TrackingPlan::default())?;
        let ok = json!({"type": "screen", "userId": "u", "name": "Cart", "integrations": {"All": true},
                        "sentAt": "2026-11-26T10:00:00.120Z", "originalTimestamp": "2026-11-26T10:00:00Z",
                        "receivedAt": "2026-11-26T10:00:00.180+01:00"});
        assert_eq!(send(&mut h, &ok)?.len(), 1);
        Ok(())
    }

    #[test]
    fn rejections_name_the_source_and_the_event() -> TestResult {
        let mut h = plan_harness(shop_plan(UnplannedEvents::Block, ViolationPolicy::Block))?;
        let mut bad_time = track("Order Completed", json!({"revenue": 1}));
        bad_time["timestamp"] = json!("never");
        let detail =
            |r| rejection(r).map(|(reason, d)| (reason, d["source"].clone(), d["event"].clone()));
        assert_eq!(
            detail(send(&mut h, &bad_time)),
            Some(("spec_violation", json!("web"), json!("Order Completed")))
        );
        assert_eq!(
            detail(send(&mut h, &track("Order Completed", json!({})))),
            Some(("plan_violation", json!("web"), json!("Order Completed")))
        );
        assert_eq!(
            detail(send(&mut h, &track("Nope", json!({})))),
            Some(("unplanned_event", json!("web"), json!("Nope")))
        );
        assert_eq!(
            detail(send(&mut h, &json!({"type": "page", "properties": {}}))),
            Some(("spec_violation", json!("web"), json!("Page Viewed")))
        );
        assert_eq!(
            detail(h.process(None, b"{", &web())),
            Some(("invalid_json", json!("web"), Value::Null))
        );
        Ok(())
    }

    #[test]
    fn unchanged_events_are_forwarded_byte_for_byte() -> TestResult {
        let mut h = plan_harness(shop_plan(UnplannedEvents::Allow, ViolationPolicy::Allow))?;
        let bytes = b" {\"type\": \"track\", \"event\": \"Order Completed\",\n \"userId\": \"u\", \"properties\": {\"revenue\": 1.50}} \n";
        let out = h.process(None, bytes, &web())?;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].value, bytes.to_vec());
        // Changed events are re-encoded: a normalized page, a violation.
        let page = single_output(&send(&mut h, &json!({"type": "page", "userId": "u"}))?)?;
        assert_eq!(page["event"], "Page Viewed");
        let annotated = single_output(&send(
            &mut h,
            &track("Order Completed", json!({"revenue": -1})),
        )?)?;
        assert!(annotated["context"]["protocols"]["violations"].is_array());
        Ok(())
    }

    fn versioned_plan(on_violation: ViolationPolicy) -> TrackingPlan {
        let mut plan = shop_plan(UnplannedEvents::Block, on_violation);
        plan.event_versions = BTreeMap::from([
            (
                "Order Completed".to_string(),
                BTreeMap::from([(
                    EventVersion(2),
                    json!({"type": "object", "required": ["revenue", "currency"],
                           "properties": {"currency": {"enum": ["EUR", "USD"]}}}),
                )]),
            ),
            (
                "Refund Issued".to_string(),
                BTreeMap::from([(
                    EventVersion(3),
                    json!({"type": "object", "required": ["amount"]}),
                )]),
            ),
        ]);
        plan
    }

    fn versioned(name: &str, properties: Value, version: Value) -> Value {
        let mut e = track(name, properties);
        e["context"] = json!({"protocols": {"event_version": version}});
        e
    }

    #[test]
    fn event_versions_select_the_schema() -> TestResult {
        let mut h = plan_harness(versioned_plan(ViolationPolicy::Block))?;
        let v1 = json!({"revenue": 1});
        let v2 = json!({"revenue": 1, "currency": "EUR"});
        // No version, or version 1: `events`.
        assert_eq!(
            send(&mut h, &track("Order Completed", v1.clone()))?.len(),
            1
        );
        assert_eq!(
            send(&mut h, &versioned("Order Completed", v1.clone(), json!(1)))?.len(),
            1
        );
        // Version 2, as a number or a string.
        let r = rejection(send(
            &mut h,
            &versioned("Order Completed", v1.clone(), json!(2)),
        ));
        assert_eq!(
            r.map(|(reason, d)| (reason, pointers(&d))),
            Some(("plan_violation", vec!["/properties".to_string()]))
        );
        assert_eq!(
            send(&mut h, &versioned("Order Completed", v2.clone(), json!(2)))?.len(),
            1
        );
        assert_eq!(
            send(
                &mut h,
                &versioned("Order Completed", v2.clone(), json!("2"))
            )?
            .len(),
            1
        );
        // Versions the plan lacks, and values that are no version at all.
        for version in [
            json!(3),
            json!("3"),
            json!(0),
            json!(-2),
            json!(2.5),
            json!("v2"),
            json!({}),
        ] {
            let r = rejection(send(
                &mut h,
                &versioned("Order Completed", v2.clone(), version.clone()),
            ));
            assert_eq!(
                r.map(|(reason, d)| (reason, pointers(&d))),
                Some(("plan_violation", vec![VERSION_POINTER.to_string()])),
                "{version}"
            );
        }
        Ok(())
    }

    #[test]
    fn events_listed_only_under_event_versions_are_planned() -> TestResult {
        let mut h = plan_harness(versioned_plan(ViolationPolicy::Block))?;
        assert_eq!(
            send(
                &mut h,
                &versioned("Refund Issued", json!({"amount": 5}), json!(3))
            )?
            .len(),
            1,
            "planned, so `unplanned_events: block` lets it through"
        );
        // Without a version it is version 1, which this plan does not list.
        let r = rejection(send(&mut h, &track("Refund Issued", json!({"amount": 5}))));
        assert_eq!(
            r.map(|(reason, d)| (reason, d["violations"][0]["reason"].clone())),
            Some((
                "plan_violation",
                json!("version 1 of \"Refund Issued\" is not in the tracking plan")
            ))
        );
        Ok(())
    }

    #[test]
    fn unknown_versions_are_attached_under_allow_and_omit() -> TestResult {
        for policy in [ViolationPolicy::Allow, ViolationPolicy::Omit] {
            let mut h = plan_harness(versioned_plan(policy))?;
            let event = single_output(&send(
                &mut h,
                &versioned("Order Completed", json!({"revenue": 1}), json!(9)),
            )?)?;
            assert_eq!(
                event["context"]["protocols"]["violations"][0]["pointer"],
                VERSION_POINTER
            );
            assert_eq!(event["context"]["protocols"]["event_version"], 9);
            assert_eq!(event["properties"], json!({"revenue": 1}), "{policy:?}");
        }
        Ok(())
    }

    #[test]
    fn event_versions_in_yaml_and_their_config_errors() -> TestResult {
        let plan: TrackingPlan = serde_yaml::from_str(
            "event_versions:\n  Order Completed:\n    2: {type: object}\n    \"3\": {type: object}\n",
        )?;
        let versions: Vec<EventVersion> = plan
            .event_versions
            .get("Order Completed")
            .map(|v| v.keys().copied().collect())
            .unwrap_or_default();
        assert_eq!(versions, vec![EventVersion(2), EventVersion(3)]);
        for bad in ["0", "-1", "v2", "1.5"] {
            let yaml = format!("event_versions: {{A: {{{bad}: {{}}}}}}");
            let err = serde_yaml::from_str::<TrackingPlan>(&yaml)
                .err()
                .map(|e| e.to_string());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.contains("an event version")),
                "{bad}: {err:?}"
            );
        }

        let mut twice = shop_plan(UnplannedEvents::Allow, ViolationPolicy::Block);
        twice.event_versions = BTreeMap::from([(
            "Order Completed".to_string(),
            BTreeMap::from([(EventVersion::FIRST, json!({}))]),
        )]);
        assert_eq!(
            compile_error(twice),
            "tracking_plans.shop.event_versions.Order Completed.1: version 1 is also declared as events.Order Completed; declare it once"
        );
        let empty = TrackingPlan {
            event_versions: BTreeMap::from([("A".to_string(), BTreeMap::new())]),
            ..TrackingPlan::default()
        };
        assert_eq!(
            compile_error(empty),
            "tracking_plans.shop.event_versions.A: list at least one version"
        );
        let broken = TrackingPlan {
            event_versions: BTreeMap::from([(
                "A".to_string(),
                BTreeMap::from([(EventVersion(2), json!({"type": 12}))]),
            )]),
            ..TrackingPlan::default()
        };
        let err = compile_error(broken);
        assert!(
            err.starts_with("tracking_plans.shop.event_versions.A.2: invalid JSON Schema: "),
            "{err}"
        );
        Ok(())
    }

    fn common_plan(on_violation: ViolationPolicy) -> TrackingPlan {
        let mut plan = shop_plan(UnplannedEvents::Allow, on_violation);
        plan.common = Some(json!({
            "type": "object",
            "required": ["context"],
            "properties": {"context": {"type": "object", "required": ["app"]}}
        }));
        plan
    }

    #[test]
    fn the_common_schema_checks_every_call_from_the_root() -> TestResult {
        let mut h = plan_harness(common_plan(ViolationPolicy::Block))?;
        let identify = json!({"type": "identify", "userId": "u"});
        let r = rejection(send(&mut h, &identify)).map(|(reason, d)| (reason, pointers(&d)));
        assert_eq!(r, Some(("plan_violation", vec![String::new()])));
        let mut with_context = identify.clone();
        with_context["context"] = json!({"ip": "1.2.3.4"});
        let r = rejection(send(&mut h, &with_context)).map(|(reason, d)| (reason, pointers(&d)));
        assert_eq!(r, Some(("plan_violation", vec!["/context".to_string()])));
        with_context["context"]["app"] = json!({"version": "1.0"});
        assert_eq!(send(&mut h, &with_context)?.len(), 1);
        // Common first, then the event's own schema; unplanned events too.
        let r = rejection(send(
            &mut h,
            &track("Order Completed", json!({"revenue": -5})),
        ));
        assert_eq!(
            r.map(|(reason, d)| (reason, pointers(&d))),
            Some((
                "plan_violation",
                vec![String::new(), "/properties/revenue".to_string()]
            ))
        );
        assert!(rejection(send(&mut h, &track("Unplanned", json!({})))).is_some());
        Ok(())
    }

    #[test]
    fn omit_never_removes_what_the_common_schema_finds() -> TestResult {
        let mut h = plan_harness(common_plan(ViolationPolicy::Omit))?;
        let mut event = track("Order Completed", json!({"revenue": 2, "coupon": 7}));
        event["context"] = json!({"ip": "1.2.3.4"});
        let event = single_output(&send(&mut h, &event)?)?;
        assert_eq!(event["properties"], json!({"revenue": 2}));
        assert_eq!(
            event["context"]["protocols"]["omitted"],
            json!(["/properties/coupon"])
        );
        assert_eq!(
            event["context"]["protocols"]["violations"],
            json!([{"pointer": "/context", "reason": "\"app\" is a required property"}])
        );
        Ok(())
    }

    fn draft_plan(schema: Value) -> TrackingPlan {
        TrackingPlan {
            events: BTreeMap::from([("Cart Updated".to_string(), schema)]),
            ..TrackingPlan::default()
        }
    }

    #[test]
    fn draft_07_and_2020_12_schemas_are_both_accepted() -> TestResult {
        // The same rules in each draft's own keywords: a [string, number]
        // pair and "coupon needs discount".
        let draft_07 = json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {"pair": {"type": "array", "items": [{"type": "string"}, {"type": "number"}],
                                    "additionalItems": false}},
            "dependencies": {"coupon": ["discount"]}
        });
        let draft_2020_12 = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {"pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "number"}],
                                    "items": false}},
            "dependentRequired": {"coupon": ["discount"]}
        });
        for schema in [draft_07, draft_2020_12] {
            let mut h = plan_harness(draft_plan(schema.clone()))?;
            let draft = &schema["$schema"];
            assert_eq!(
                send(&mut h, &track("Cart Updated", json!({"pair": ["a", 1]})))?.len(),
                1,
                "{draft}"
            );
            for (bad, pointer) in [
                (json!({"pair": [1, "a"]}), "/properties/pair/0"),
                (json!({"pair": ["a", 1, 2]}), "/properties/pair"),
                (json!({"coupon": "X"}), "/properties"),
            ] {
                let r = rejection(send(&mut h, &track("Cart Updated", bad.clone())));
                let found = r.map(|(_, d)| pointers(&d)).unwrap_or_default();
                // draft-07 reports extra items at the array, 2020-12 at the item.
                assert!(
                    found.iter().any(|p| p.starts_with(pointer)),
                    "{draft} {bad}: {found:?}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn the_draft_comes_from_schema_and_unknown_drafts_are_refused() {
        // Array-form `items` is draft-07; under the default (2020-12) it is
        // not a valid schema.
        let tuple =
            json!({"type": "object", "properties": {"pair": {"items": [{"type": "string"}]}}});
        let err = compile_error(draft_plan(tuple));
        assert!(
            err.starts_with("tracking_plans.shop.events.Cart Updated: invalid JSON Schema: "),
            "{err}"
        );
        let unknown = json!({"$schema": "https://example.com/my-draft", "type": "object"});
        let err = compile_error(draft_plan(unknown));
        assert!(
            err.starts_with("tracking_plans.shop.events.Cart Updated: invalid JSON Schema: "),
            "{err}"
        );
    }

    #[test]
    fn patterns_are_linear_time_regexes() -> TestResult {
        let lookahead = json!({"properties": {"sku": {"type": "string", "pattern": "^(?!X)"}}});
        let err = compile_error(draft_plan(lookahead));
        assert!(
            err.starts_with("tracking_plans.shop.events.Cart Updated: "),
            "{err}"
        );
        let sku = json!({"properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-\\d+$"}}});
        let mut h = plan_harness(draft_plan(sku))?;
        assert_eq!(
            send(&mut h, &track("Cart Updated", json!({"sku": "ABC-12"})))?.len(),
            1
        );
        let r = rejection(send(&mut h, &track("Cart Updated", json!({"sku": "abc"}))));
        assert_eq!(
            r.map(|(_, d)| pointers(&d)),
            Some(vec!["/properties/sku".to_string()])
        );
        Ok(())
    }

    #[test]
    fn failure_labels_come_from_bounded_sets() -> TestResult {
        let plans = BTreeMap::from([("shop".to_string(), versioned_plan(ViolationPolicy::Block))]);
        let sources = [source("web", Some("shop")), source("ios", None)];
        let v = Validator::new(&sources, &plans, DEFAULT_DEDUPE_WINDOW)?;
        let event = |name: &str| json!({"event": name});
        assert_eq!(
            v.failure_labels(Some("web"), &event("Order Completed")),
            ("web", "Order Completed")
        );
        assert_eq!(
            v.failure_labels(Some("web"), &event("Refund Issued")),
            ("web", "Refund Issued"),
            "versioned-only events are planned"
        );
        assert_eq!(
            v.failure_labels(Some("web"), &event("Made Up 123")),
            ("web", OTHER_EVENT_LABEL)
        );
        assert_eq!(
            v.failure_labels(Some("ios"), &event("Order Completed")),
            ("ios", OTHER_EVENT_LABEL),
            "ios has no plan"
        );
        assert_eq!(
            v.failure_labels(Some("forged"), &event("Order Completed")),
            (UNKNOWN_SOURCE_LABEL, OTHER_EVENT_LABEL)
        );
        assert_eq!(
            v.failure_labels(None, &json!({"error": "x"})),
            (UNKNOWN_SOURCE_LABEL, OTHER_EVENT_LABEL)
        );
        Ok(())
    }

    fn arb_id() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            "[ab]{0,2}".prop_map(|s| Some(Value::String(s))),
            (0i64..3).prop_map(|n| Some(json!(n))),
            Just(Some(json!({"x": 1}))),
        ]
    }

    fn arb_json_event() -> impl Strategy<Value = Vec<u8>> {
        let kind = prop::sample::select(vec![
            "identify", "track", "page", "screen", "group", "alias", "bogus",
        ]);
        let name = prop::option::of(prop::sample::select(vec![
            "Order Completed",
            "Product Viewed",
            "",
            "Page Viewed",
        ]));
        let props = prop::option::of(prop::sample::select(vec![
            json!({"revenue": 5}),
            json!({"revenue": -1, "coupon": 2}),
            json!({"revenue": "x", "extra": {"deep": [1]}}),
            json!({}),
            json!([1]),
        ]));
        let message_id = prop::option::of(prop_oneof![
            "m[0-3]".prop_map(Value::String),
            Just(json!(7)),
            Just(Value::String("m".repeat(101))),
        ]);
        let timestamp = prop::option::of(prop::sample::select(vec![
            json!("2026-11-26T10:00:00Z"),
            json!("garbage"),
            json!(12),
        ]));
        (
            kind,
            arb_id(),
            arb_id(),
            name,
            props,
            message_id,
            timestamp,
            arb_id(),
        )
            .prop_map(
                |(kind, user, anon, name, props, message_id, timestamp, other)| {
                    let mut e = Map::new();
                    e.insert("type".into(), json!(kind));
                    let fields = [
                        ("userId", user),
                        ("anonymousId", anon),
                        ("event", name.map(Value::from)),
                        ("properties", props.clone()),
                        ("traits", props),
                        ("messageId", message_id),
                        ("timestamp", timestamp),
                        ("groupId", other.clone()),
                        ("previousId", other),
                    ];
                    for (k, v) in fields {
                        if let Some(v) = v {
                            e.insert(k.into(), v);
                        }
                    }
                    serde_json::to_vec(&Value::Object(e)).unwrap_or_default()
                },
            )
    }

    fn arb_input() -> impl Strategy<Value = (Vec<u8>, Option<&'static str>)> {
        let bytes =
            prop_oneof![4 => arb_json_event(), 1 => prop::collection::vec(any::<u8>(), 0..40)];
        let source = prop::sample::select(vec![
            Some("web"),
            Some("web"),
            Some("ios"),
            Some("nope"),
            None,
        ]);
        (bytes, source)
    }

    fn policy() -> impl Strategy<Value = TrackingPlan> {
        (
            prop::sample::select(vec![UnplannedEvents::Allow, UnplannedEvents::Block]),
            prop::sample::select(vec![
                ViolationPolicy::Block,
                ViolationPolicy::Omit,
                ViolationPolicy::Allow,
            ]),
        )
            .prop_map(|(u, v)| shop_plan(u, v))
    }

    type Reference = Result<Value, (&'static str, Value)>;

    /// The reference outcome of one record: the whole event parsed into a
    /// `Value`, then [`Validator::check_event`].
    fn reference(v: &Validator, bytes: &[u8], src: Option<&str>) -> Reference {
        let event: Value = serde_json::from_slice(bytes).map_err(|e| {
            (
                "invalid_json",
                json!({"source": src, "error": e.to_string()}),
            )
        })?;
        if !event.is_object() {
            return Err((
                "invalid_json",
                json!({"source": src, "error": "expected a JSON object"}),
            ));
        }
        let Some(source) = src.filter(|s| v.has_source(s)) else {
            return Err(("unknown_source", json!({ "source": src })));
        };
        v.check_event(source, event).map_err(|e| match e {
            OperatorError::Rejected { reason, detail } => (reason, detail),
            OperatorError::Store(e) => ("store", json!(e.to_string())),
        })
    }

    /// JSON equality where floats may differ in the last place: serde_json
    /// parses floats fast, not exactly, so a value that was re-encoded and
    /// parsed again (the reference path) can move by an ulp.
    fn same_json(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
                match (x.as_f64(), y.as_f64()) {
                    (Some(x), Some(y)) => x == y || ((x - y) / x).abs() < 1e-15,
                    _ => false,
                }
            }
            (Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
            }
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
            }
            _ => a == b,
        }
    }

    fn same_outcome(a: &Reference, b: &Reference) -> bool {
        match (a, b) {
            (Ok(a), Ok(b)) => same_json(a, b),
            _ => a == b,
        }
    }

    /// What the operator did with one record, in the reference's terms
    /// (dedupe must be off).
    fn operator_outcome(
        h: &mut OperatorHarness<ValidateOperator>,
        bytes: &[u8],
        src: Option<&str>,
    ) -> Result<Reference, String> {
        let headers: Vec<(String, Vec<u8>)> = src
            .map(|s| (SOURCE.to_string(), s.as_bytes().to_vec()))
            .into_iter()
            .collect();
        match h.process(None, bytes, &headers) {
            Ok(out) => match out.as_slice() {
                [one] => serde_json::from_slice(&one.value)
                    .map(Ok)
                    .map_err(|e| format!("output is not JSON: {e}")),
                other => Err(format!("{} outputs", other.len())),
            },
            Err(OperatorError::Rejected { reason, detail }) => Ok(Err((reason, detail))),
            Err(e) => Err(e.to_string()),
        }
    }

    fn no_dedupe(plan: TrackingPlan) -> Result<OperatorHarness<ValidateOperator>, ConfigError> {
        let plans = BTreeMap::from([("shop".to_string(), plan)]);
        let sources = [source("web", Some("shop")), source("ios", None)];
        let v = Validator::new(&sources, &plans, Span::from_millis(0))?;
        Ok(OperatorHarness::new(ValidateOperator::new(Arc::new(v))))
    }

    #[test]
    fn the_fast_path_agrees_with_the_reference_on_tricky_bytes() -> TestResult {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let cases: Vec<Vec<u8>> = vec![
            // Repeated names: the last one wins, as in a parsed event.
            br#"{"type":"identify","type":"track","event":"Order Completed","userId":"u","properties":{"revenue":-1}}"#.to_vec(),
            br#"{"type":"track","event":"Order Completed","userId":"u","properties":{"revenue":-1},"properties":{"revenue":1}}"#.to_vec(),
            br#"{"type":"track","event":"Order Completed","userId":"u","properties":{"revenue":1},"context":{"protocols":{"event_version":2},"protocols":{}}}"#.to_vec(),
            br#"{"type":"track","event":"Order Completed","userId":"u","properties":{"revenue":1},"context":{"protocols":{"event_version":2,"event_version":1}}}"#.to_vec(),
            br#"{"type":"track","event":"Order Completed","userId":"u","properties":{"revenue":1},"context":{"protocols":{"event_version":1}},"context":{"protocols":{"event_version":9}}}"#.to_vec(),
            br#"{"type":"page","userId":"u","event":"Home","event":"Page Viewed"}"#.to_vec(),
            // The body comes before the members that say whether it is checked.
            br#"{"type":"identify","userId":"u","properties":{"revenue":-1},"type":"track","event":"Order Completed"}"#.to_vec(),
            br#"{"properties":{"revenue":-1},"traits":{"email":"x"},"type":"track","userId":"u","event":"Order Completed"}"#.to_vec(),
            br#"{"type":"track","event":"Unplanned","userId":"u","properties":{"revenue":-1},"event":"Order Completed"}"#.to_vec(),
            br#"{"type":"page","userId":"u","event":null}"#.to_vec(),
            // Escaped member names are the same names.
            br#"{"typ\u0065":"track","\u0065vent":"Order Completed","userId":"u","properties":{"revenue":"x"}}"#.to_vec(),
            // Strictness inside members the fast path does not build.
            br#"{"type":"track","event":"X","userId":"u","context":{"n":1e400}}"#.to_vec(),
            br#"{"type":"track","event":"X","userId":"u","context":{"s":"\ud800"}}"#.to_vec(),
            b"{\"type\":\"track\",\"event\":\"X\",\"userId\":\"u\",\"context\":{\"s\":\"\xff\"}}".to_vec(),
            b"{\"type\":\"track\",\"event\":\"X\",\"userId\":\"u\",\"integrations\":{\"\xc3\":1}}".to_vec(),
            format!(r#"{{"type":"track","event":"X","userId":"u","context":{{"d":{}}}}}"#, deep(200)).into_bytes(),
            format!(r#"{{"type":"track","event":"X","userId":"u","extra":{}}}"#, deep(120)).into_bytes(),
            br#"{"type":"track","event":"X","userId":"u","extra":[1,2,]}"#.to_vec(),
            br#"{"type":"track","event":"X","userId":"u"} trailing"#.to_vec(),
            b"\xef\xbb\xbf{\"type\":\"track\",\"event\":\"X\",\"userId\":\"u\"}".to_vec(),
            b" \n\t{\"type\":\"screen\",\"userId\":\"u\"}\n ".to_vec(),
            br#"[{"type":"track"}]"#.to_vec(),
            b"null".to_vec(),
            // 300 entries but one distinct name: within the limit.
            format!(
                r#"{{"type":"track","event":"X","userId":"u","properties":{{{}}}}}"#,
                vec![r#""a":1"#; TRAITS_LIMIT].join(",")
            )
            .into_bytes(),
        ];
        for plan in [
            versioned_plan(ViolationPolicy::Block),
            versioned_plan(ViolationPolicy::Omit),
            common_plan(ViolationPolicy::Allow),
        ] {
            let mut h = no_dedupe(plan)?;
            for bytes in &cases {
                for src in [Some("web"), Some("ios"), Some("nope"), None] {
                    let expected = reference(&h.operator.validator, bytes, src);
                    let got = operator_outcome(&mut h, bytes, src)?;
                    assert_eq!(
                        got,
                        expected,
                        "{} from {src:?}",
                        String::from_utf8_lossy(bytes)
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn page_calls_without_an_event_get_it_as_the_first_member() -> TestResult {
        let mut h = plan_harness(TrackingPlan::default())?;
        let bytes = br#" {"type":"page","userId":"u","name":"Home"}"#;
        let out = h.process(None, bytes, &web())?;
        assert_eq!(
            out.first().map(|o| o.value.as_slice()),
            Some(&br#"{"event":"Page Viewed","type":"page","userId":"u","name":"Home"}"#[..])
        );
        Ok(())
    }

    /// What became of one record.
    #[derive(Debug)]
    enum Outcome {
        Forwarded(Value),
        Rejected,
        Duplicate,
    }

    /// Feed one record and check it had exactly one outcome: one output to
    /// `next` (a JSON object that passes the spec and its plan again, and
    /// whose `(source, messageId)` was not forwarded before), a rejection
    /// that wrote no state, or no output at all for a `messageId` this
    /// source already forwarded. Never a store error.
    fn one_outcome(
        h: &mut OperatorHarness<ValidateOperator>,
        forwarded: &mut std::collections::BTreeSet<(String, String)>,
        bytes: &[u8],
        src: Option<&str>,
    ) -> Result<Outcome, TestCaseError> {
        let headers: Vec<(String, Vec<u8>)> = src
            .map(|s| (SOURCE.to_string(), s.as_bytes().to_vec()))
            .into_iter()
            .collect();
        let state_before = h.state.map.clone();
        let id = serde_json::from_slice::<Value>(bytes)
            .ok()
            .and_then(|e| e.get("messageId").and_then(Value::as_str).map(String::from))
            .map(|id| (src.unwrap_or_default().to_string(), id));
        match h.process(None, bytes, &headers) {
            Err(OperatorError::Rejected { .. }) => {
                prop_assert_eq!(&h.state.map, &state_before, "rejection wrote state");
                Ok(Outcome::Rejected)
            }
            Err(e) => Err(TestCaseError::fail(format!("store error {e}"))),
            Ok(out) => match out.as_slice() {
                [] => {
                    prop_assert!(
                        id.is_some_and(|id| forwarded.contains(&id)),
                        "dropped a non-duplicate"
                    );
                    Ok(Outcome::Duplicate)
                }
                [one] => {
                    prop_assert_eq!(one.output, outputs::NEXT);
                    let event: Value = serde_json::from_slice(&one.value)
                        .map_err(|e| TestCaseError::fail(format!("output is not JSON: {e}")))?;
                    let spec = event.as_object().map(spec_violations);
                    prop_assert_eq!(spec, Some(Vec::new()), "forwarded a spec violation");
                    let again = h
                        .operator
                        .validator
                        .check_event(src.unwrap_or_default(), event.clone());
                    prop_assert!(again.is_ok(), "output fails its own check: {:?}", again);
                    if let Some(id) = id {
                        prop_assert!(forwarded.insert(id), "forwarded a duplicate");
                    }
                    Ok(Outcome::Forwarded(event))
                }
                more => Err(TestCaseError::fail(format!("{} outputs", more.len()))),
            },
        }
    }

    fn validator_for(plan: TrackingPlan) -> Result<Validator, TestCaseError> {
        let plans = BTreeMap::from([("shop".to_string(), plan)]);
        let sources = [source("web", Some("shop")), source("ios", None)];
        Validator::new(&sources, &plans, DEFAULT_DEDUPE_WINDOW)
            .map_err(|e| TestCaseError::fail(e.to_string()))
    }

    /// Events as SDKs send them, with every optional part filled in.
    fn realistic_events() -> Vec<Value> {
        let context = json!({
            "app": {"name": "Shop", "version": "4.2.0", "build": "420"},
            "library": {"name": "analytics.js", "version": "4.1.0"},
            "page": {"path": "/checkout", "referrer": "https://example.com/", "url": "https://shop.example.com/checkout"},
            "traits": {"email": "ada@example.com"},
            "externalIds": [{"id": "c_1", "type": "crm_id", "collection": "users", "encoding": "none"}],
            "protocols": {"event_version": 2},
            "ip": "203.0.113.7", "locale": "de-DE", "timezone": "Europe/Berlin"
        });
        let common = |kind: &str, id: &str| {
            json!({"type": kind, "messageId": id, "userId": "u_42", "anonymousId": "a_1",
                   "timestamp": "2026-11-26T10:00:00.000Z", "sentAt": "2026-11-26T10:00:00.120Z",
                   "receivedAt": "2026-11-26T10:00:00.180Z", "context": context.clone(),
                   "integrations": {"All": true, "Mixpanel": false}})
        };
        let mut order = common("track", "m-order");
        order["event"] = json!("Order Completed");
        order["properties"] = json!({"order_id": "o_1", "revenue": 99.5, "currency": "EUR", "coupon": "SPRING",
                                     "products": [{"sku": "SKU-1", "price": 49.75, "quantity": 2}]});
        let mut viewed = common("track", "m-view");
        viewed["event"] = json!("Product Viewed");
        viewed["properties"] = json!({"sku": "SKU-1", "category": "shoes", "price": 49.75});
        let mut identify = common("identify", "m-identify");
        identify["traits"] = json!({"email": "ada@example.com", "plan": "pro", "logins": 5});
        let mut page = common("page", "m-page");
        page["name"] = json!("Checkout");
        page["properties"] = json!({"path": "/checkout", "title": "Checkout"});
        let mut screen = common("screen", "m-screen");
        screen["name"] = json!("Cart");
        let mut group = common("group", "m-group");
        group["groupId"] = json!("g_7");
        group["traits"] = json!({"name": "Acme", "employees": 120});
        let mut alias = common("alias", "m-alias");
        alias["previousId"] = json!("a_1");
        vec![order, viewed, identify, page, screen, group, alias]
    }

    /// Every JSON pointer inside `v` (the root excluded).
    fn pointers_in(v: &Value, at: &str, out: &mut Vec<String>) {
        let children: Vec<(String, &Value)> = match v {
            Value::Object(m) => m
                .iter()
                .map(|(k, v)| (escape_pointer_segment(k), v))
                .collect(),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v))
                .collect(),
            _ => return,
        };
        for (segment, child) in children {
            let here = format!("{at}/{segment}");
            out.push(here.clone());
            pointers_in(child, &here, out);
        }
    }

    #[derive(Debug, Clone)]
    enum JsonMutation {
        /// Remove the value at the `n`-th pointer.
        Delete(usize),
        /// Replace the value at the `n`-th pointer.
        Replace(usize, Value),
        /// Set a key at the root (`true`) or in the `n`-th pointer's object.
        Insert(Option<usize>, String, Value),
    }

    #[derive(Debug, Clone)]
    enum ByteMutation {
        /// Keep the first `n` bytes (modulo the length).
        Truncate(usize),
        /// Overwrite bytes at positions (modulo the length).
        Overwrite(Vec<(usize, u8)>),
        /// Insert bytes at a position (modulo the length).
        Splice(usize, Vec<u8>),
        /// Replace everything with random bytes.
        Random(Vec<u8>),
    }

    fn apply_json(event: &mut Value, mutation: &JsonMutation) {
        let mut all = Vec::new();
        pointers_in(event, "", &mut all);
        let pick = |n: usize| all.get(n % all.len().max(1)).cloned();
        match mutation {
            JsonMutation::Delete(n) => {
                let Some(pointer) = pick(*n) else { return };
                let Some((parent, last)) = pointer.rsplit_once('/') else {
                    return;
                };
                let key = unescape_pointer_segment(last);
                match event.pointer_mut(parent) {
                    Some(Value::Object(m)) => {
                        m.shift_remove(&key);
                    }
                    Some(Value::Array(a)) => {
                        if let Ok(i) = key.parse::<usize>() {
                            if i < a.len() {
                                a.remove(i);
                            }
                        }
                    }
                    _ => {}
                }
            }
            JsonMutation::Replace(n, value) => {
                if let Some(slot) = pick(*n).and_then(|p| event.pointer_mut(&p)) {
                    *slot = value.clone();
                }
            }
            JsonMutation::Insert(at, key, value) => {
                let target = match at {
                    None => Some(&mut *event),
                    Some(n) => pick(*n).and_then(|p| event.pointer_mut(&p)),
                };
                if let Some(Value::Object(m)) = target {
                    m.insert(key.clone(), value.clone());
                }
            }
        }
    }

    fn apply_bytes(bytes: &mut Vec<u8>, mutation: &ByteMutation) {
        let len = bytes.len().max(1);
        match mutation {
            ByteMutation::Truncate(n) => bytes.truncate(n % len),
            ByteMutation::Overwrite(at) => {
                for (i, b) in at {
                    if let Some(slot) = bytes.get_mut(i % len) {
                        *slot = *b;
                    }
                }
            }
            ByteMutation::Splice(at, inserted) => {
                let at = (at % len).min(bytes.len());
                bytes.splice(at..at, inserted.iter().copied());
            }
            ByteMutation::Random(random) => *bytes = random.clone(),
        }
    }

    /// Values that stress the checks: other types, extremes, huge and
    /// exotic strings, deep nesting.
    fn arb_nasty_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from), // NaN and infinities become null
            Just(json!(1e308)),
            "\\PC{0,24}".prop_map(Value::from),
            prop::sample::select(vec![
                "",
                " ",
                "\u{0}",
                "\u{202e}gnp.exe",
                "\u{feff}",
                "👩‍👩‍👧‍👦",
                "ｔｒａｃｋ",
                "track ",
                "TRACK",
                "Order Completed\u{0}",
                "1970-01-01T00:00:00Z",
                "9999-12-31T23:59:59Z",
                "2026-02-30T00:00:00Z",
                "null",
                "undefined",
                "~1/~0",
            ])
            .prop_map(Value::from),
            (
                1usize..5,
                prop::sample::select(vec!["x", "é", "😀", "\u{10ffff}"])
            )
                .prop_map(|(kb, s)| Value::from(s.repeat(kb * 16 * 1024 / s.len()))),
            (1usize..200).prop_map(|depth| {
                (0..depth).fold(json!("leaf"), |inner, i| {
                    if i % 2 == 0 {
                        json!([inner])
                    } else {
                        json!({"d": inner})
                    }
                })
            }),
            prop::collection::vec(any::<u8>(), 0..8).prop_map(|v| json!(v)),
            Just(json!({})),
            Just(json!([])),
        ]
    }

    fn arb_key() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "type",
                "userId",
                "anonymousId",
                "event",
                "messageId",
                "timestamp",
                "sentAt",
                "receivedAt",
                "originalTimestamp",
                "properties",
                "traits",
                "context",
                "integrations",
                "groupId",
                "previousId",
                "name",
                "revenue",
                "protocols",
                "event_version",
                "email",
            ])
            .prop_map(String::from),
            "\\PC{0,12}",
        ]
    }

    fn arb_json_mutation() -> impl Strategy<Value = JsonMutation> {
        prop_oneof![
            any::<usize>().prop_map(JsonMutation::Delete),
            (any::<usize>(), arb_nasty_value()).prop_map(|(n, v)| JsonMutation::Replace(n, v)),
            (
                prop::option::of(any::<usize>()),
                arb_key(),
                arb_nasty_value()
            )
                .prop_map(|(n, k, v)| JsonMutation::Insert(n, k, v)),
        ]
    }

    fn arb_byte_mutation() -> impl Strategy<Value = ByteMutation> {
        prop_oneof![
            any::<usize>().prop_map(ByteMutation::Truncate),
            prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)
                .prop_map(ByteMutation::Overwrite),
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
                .prop_map(|(at, b)| ByteMutation::Splice(at, b)),
            prop::collection::vec(any::<u8>(), 0..64).prop_map(ByteMutation::Random),
        ]
    }

    /// A realistic event (by index), JSON mutations, maybe a byte mutation,
    /// and the source header it comes with.
    type MutatedInput = (
        usize,
        Vec<JsonMutation>,
        Option<ByteMutation>,
        Option<&'static str>,
    );

    fn arb_mutated_input() -> impl Strategy<Value = MutatedInput> {
        (
            any::<usize>(),
            prop::collection::vec(arb_json_mutation(), 0..4),
            prop::option::weighted(0.2, arb_byte_mutation()),
            prop::sample::select(vec![
                Some("web"),
                Some("web"),
                Some("web"),
                Some("ios"),
                None,
            ]),
        )
    }

    fn arb_plan() -> impl Strategy<Value = TrackingPlan> {
        (policy(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(mut plan, common, versions, nested)| {
                if nested {
                    // Arrays of objects with pattern, bounds and required keys:
                    // the shapes the streaming check handles itself.
                    plan.events.insert(
                        "Order Completed".into(),
                        json!({"type": "object", "required": ["revenue"], "properties": {
                        "revenue": {"type": "number", "minimum": 0},
                        "coupon": {"type": "string"},
                        "products": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                            "type": "object", "required": ["sku"], "properties": {
                                "sku": {"type": "string", "pattern": "^SKU-"},
                                "price": {"type": "number"},
                                "quantity": {"type": "integer", "minimum": 1}}}}}}),
                    );
                }
                if common {
                    plan.common = common_plan(plan.on_violation).common;
                }
                if versions {
                    plan.event_versions = versioned_plan(plan.on_violation).event_versions;
                }
                plan
            },
        )
    }

    proptest! {
        /// Every input yields exactly one of: one output, a rejection, or a
        /// silent drop of a `messageId` this source already forwarded.
        #[test]
        fn every_input_has_exactly_one_outcome(plan in policy(), inputs in prop::collection::vec(arb_input(), 1..25)) {
            let mut h = OperatorHarness::new(ValidateOperator::new(Arc::new(validator_for(plan)?)));
            let mut forwarded = std::collections::BTreeSet::new();
            for (bytes, src) in inputs {
                one_outcome(&mut h, &mut forwarded, &bytes, src)?;
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let h = harness(Some(shop_plan(UnplannedEvents::Block, ViolationPolicy::Omit)));
            prop_assert!(h.is_ok());
            if let Ok(mut h) = h {
                let result = h.process(None, &bytes, &web());
                prop_assert!(!matches!(result, Err(OperatorError::Store(_))));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// The operator's fast path decides exactly as the reference path
        /// (parse everything, then `check_event`): same rejection and
        /// detail, or the same event forwarded.
        #[test]
        fn the_fast_path_agrees_with_the_reference(plan in arb_plan(), inputs in prop::collection::vec(arb_mutated_input(), 1..12)) {
            let mut h = no_dedupe(plan).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let events = realistic_events();
            for (index, json_mutations, byte_mutation, src) in inputs {
                let mut event = events[index % events.len()].clone();
                for m in &json_mutations {
                    apply_json(&mut event, m);
                }
                let mut bytes = serde_json::to_vec(&event).map_err(|e| TestCaseError::fail(e.to_string()))?;
                if let Some(m) = &byte_mutation {
                    apply_bytes(&mut bytes, m);
                }
                let expected = reference(&h.operator.validator, &bytes, src);
                let got = operator_outcome(&mut h, &bytes, src).map_err(TestCaseError::fail)?;
                prop_assert!(same_outcome(&got, &expected), "{:?} != {:?}", got, expected);
            }
        }

        /// Fuzz: realistic events with fields deleted, retyped or added
        /// (huge, exotic, deeply nested values) and bytes cut or garbled,
        /// under every policy, with and without a common schema and event
        /// versions. Nothing panics, every record has exactly one outcome,
        /// and under `block` what is forwarded is exactly what a second
        /// check would forward.
        #[test]
        fn mutated_events_have_exactly_one_outcome(plan in arb_plan(), inputs in prop::collection::vec(arb_mutated_input(), 1..12)) {
            let block = plan.on_violation == ViolationPolicy::Block;
            let mut h = OperatorHarness::new(ValidateOperator::new(Arc::new(validator_for(plan)?)));
            let events = realistic_events();
            let mut forwarded = std::collections::BTreeSet::new();
            for (index, json_mutations, byte_mutation, src) in inputs {
                let mut event = events[index % events.len()].clone();
                for m in &json_mutations {
                    apply_json(&mut event, m);
                }
                let mut bytes = serde_json::to_vec(&event).map_err(|e| TestCaseError::fail(e.to_string()))?;
                if let Some(m) = &byte_mutation {
                    apply_bytes(&mut bytes, m);
                }
                if let Outcome::Forwarded(out) = one_outcome(&mut h, &mut forwarded, &bytes, src)? {
                    if block {
                        let again = h.operator.validator.check_event(src.unwrap_or_default(), out.clone());
                        prop_assert_eq!(again.ok(), Some(out));
                    }
                }
            }
        }
    }
}
