//! The validate stage's config: tracking plans and their policies, and
//! [`Validator`], every source's compiled plan, checked at load.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use cdp_pipeline::Span;
use serde::de::{self, Unexpected, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::config::{ConfigError, SourceConfig};

use super::plan::CompiledPlan;

/// Metric label for a record whose source is not a configured one.
pub const UNKNOWN_SOURCE_LABEL: &str = "unknown";

/// Metric label for an event name its source's plan does not list.
pub const OTHER_EVENT_LABEL: &str = "other";

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

/// Every source's compiled tracking plan and the dedupe window: what the
/// validate operators of all tasks share.
#[derive(Debug)]
pub struct Validator {
    /// Source id → its plan, if it has one.
    pub(super) sources: BTreeMap<String, Option<Arc<CompiledPlan>>>,
    pub(super) dedupe_window: Span,
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
            // The id is part of the dedupe key `dedupe/<source>/<n>:<key>/<messageId>`.
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
