//! The validate stage (Segment Protocols): `<p>.raw` → `<p>.valid`.
//!
//! For every raw event it, in this order:
//! 1. parses the bytes as a JSON object (`invalid_json`) and resolves the
//!    source from the `cdp-source` header (`unknown_source`);
//! 2. checks the Segment spec and collects *every* violation as a JSON
//!    pointer and a reason (`spec_violation`, whatever the plan says);
//! 3. normalizes `page` / `screen` calls to `event: "Page Viewed"` /
//!    `"Screen Viewed"`;
//! 4. applies the source's tracking plan: JSON Schemas for the `properties`
//!    of planned events and for `identify` / `group` traits, with the
//!    policies `unplanned_events: allow|block` and
//!    `on_violation: block|omit|allow`;
//! 5. drops a `messageId` already seen from the same source within the
//!    dedupe window;
//! 6. emits the event to [`outputs::NEXT`] under the input record's key,
//!    with the `cdp-source` header.
//!
//! Guarantees: one input yields exactly one of {one output, a rejection, a
//! silent duplicate drop}. A rejected record writes no state. The output is
//! a function of (state, record): window expiry runs on stream time (ticks)
//! or, before the first tick, on the event's own time, never the wall
//! clock. Schemas are compiled once, in [`Validator::new`].

use std::collections::BTreeMap;
use std::sync::Arc;

use cdp_pipeline::envelope::SOURCE;
use cdp_pipeline::{Context, Operator, OperatorError, Record, Span};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::config::{ConfigError, SourceConfig};
use crate::messages::{self, outputs};

/// How long a `messageId` is remembered per source unless configured.
pub const DEFAULT_DEDUPE_WINDOW: Span = Span::from_secs(24 * 3600);

/// The longest `messageId` the spec check accepts, in characters.
pub const MAX_MESSAGE_ID_CHARS: usize = 100;

/// The Segment call types.
pub const EVENT_TYPES: [&str; 6] = ["identify", "track", "page", "screen", "group", "alias"];

/// State key prefix of remembered message ids: `dedupe/<source>/<messageId>`.
const DEDUPE_PREFIX: &str = "dedupe/";

/// Schema error messages quote the offending value; cap them so one huge
/// value cannot bloat a dead letter.
const MAX_REASON_CHARS: usize = 300;

/// What to do with a `track` event the plan does not list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnplannedEvents {
    /// Forward it unchecked.
    #[default]
    Allow,
    /// Reject it as a dead letter (`unplanned_event`).
    Block,
}

/// What to do with an event that breaks its plan's JSON Schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationPolicy {
    /// Reject it as a dead letter (`plan_violation`) with every violation.
    #[default]
    Block,
    /// Remove the offending top-level properties (or traits), list them in
    /// `context.protocols.omitted` and forward the rest. Violations that
    /// removing a key cannot fix (a missing required property) are attached
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

/// A tracking plan (`tracking_plans.<name>`): what a source's events must
/// look like.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackingPlan {
    /// What to do with `track` events not listed under `events`.
    #[serde(default = "default_unplanned_events")]
    pub unplanned_events: UnplannedEvents,
    /// What to do with events that break their JSON Schema.
    #[serde(default = "default_on_violation")]
    pub on_violation: ViolationPolicy,
    /// JSON Schema of the `traits` of `identify` calls (unchecked if absent).
    #[serde(default)]
    pub identify: Option<Value>,
    /// JSON Schema of the `traits` of `group` calls (unchecked if absent).
    #[serde(default)]
    pub group: Option<Value>,
    /// Event name → JSON Schema of its `properties`. `page` and `screen`
    /// calls are checked under `Page Viewed` / `Screen Viewed` when listed.
    #[serde(default)]
    pub events: BTreeMap<String, Value>,
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
    identify: Option<jsonschema::Validator>,
    group: Option<jsonschema::Validator>,
    events: BTreeMap<String, jsonschema::Validator>,
}

impl CompiledPlan {
    fn compile(name: &str, plan: &TrackingPlan) -> Result<Self, ConfigError> {
        let path = format!("tracking_plans.{name}");
        let identify = plan
            .identify
            .as_ref()
            .map(|s| compile_schema(&format!("{path}.identify"), s))
            .transpose()?;
        let group = plan
            .group
            .as_ref()
            .map(|s| compile_schema(&format!("{path}.group"), s))
            .transpose()?;
        let mut events = BTreeMap::new();
        for (event, schema) in &plan.events {
            events.insert(
                event.clone(),
                compile_schema(&format!("{path}.events.{event}"), schema)?,
            );
        }
        Ok(CompiledPlan {
            unplanned_events: plan.unplanned_events,
            on_violation: plan.on_violation,
            identify,
            group,
            events,
        })
    }
}

fn compile_schema(path: &str, schema: &Value) -> Result<jsonschema::Validator, ConfigError> {
    // Formats are annotations only by default in drafts 2019-09/2020-12;
    // a plan that says `format: email` means it, so they are checked.
    jsonschema::options()
        .should_validate_formats(true)
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
    /// forward, or the rejection. No state involved.
    pub fn check_event(&self, source: &str, event: Value) -> Result<Value, OperatorError> {
        let plan = self.sources.get(source).ok_or_else(|| {
            OperatorError::rejected("unknown_source", json!({ "source": source }))
        })?;
        let Value::Object(mut event) = event else {
            return Err(OperatorError::rejected(
                "invalid_json",
                json!({ "error": "expected a JSON object" }),
            ));
        };
        let violations = spec_violations(&event);
        if !violations.is_empty() {
            return Err(OperatorError::rejected(
                "spec_violation",
                json!({ "violations": violations }),
            ));
        }
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        match kind.as_str() {
            "page" => {
                event.insert("event".into(), Value::from("Page Viewed"));
            }
            "screen" => {
                event.insert("event".into(), Value::from("Screen Viewed"));
            }
            _ => {}
        }
        if let Some(plan) = plan {
            apply_plan(plan, &kind, &mut event)?;
        }
        Ok(Value::Object(event))
    }
}

/// How an identifier-like field (`userId`, `groupId`, ...) is filled.
enum IdField {
    Absent,
    Valid,
    Invalid,
}

fn id_field(event: &Map<String, Value>, field: &str) -> IdField {
    match event.get(field) {
        None | Some(Value::Null) => IdField::Absent,
        Some(Value::String(s)) if s.trim().is_empty() => IdField::Absent,
        Some(Value::String(_)) | Some(Value::Number(_)) => IdField::Valid,
        Some(_) => IdField::Invalid,
    }
}

/// Every way `event` breaks the Segment spec, in a fixed order. Empty when
/// it is a valid Segment call. The collector may use it to answer `400`.
pub fn spec_violations(event: &Map<String, Value>) -> Vec<Violation> {
    let mut out = Vec::new();
    let kind = match event.get("type") {
        None | Some(Value::Null) => {
            out.push(Violation::new("/type", "is required"));
            None
        }
        Some(Value::String(t)) if EVENT_TYPES.contains(&t.as_str()) => Some(t.as_str()),
        Some(Value::String(t)) => {
            out.push(Violation::new(
                "/type",
                format!(
                    "unknown type {t:?}: expected one of {}",
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
        match id_field(event, field) {
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
        Some("track") => match event.get("event") {
            Some(Value::String(name)) if !name.trim().is_empty() => {}
            _ => out.push(Violation::new(
                "/event",
                "track calls need a non-empty string event name",
            )),
        },
        Some("group") if !matches!(id_field(event, "groupId"), IdField::Valid) => {
            out.push(Violation::new(
                "/groupId",
                "group calls need a groupId (string or number)",
            ));
        }
        Some("alias") if !matches!(id_field(event, "previousId"), IdField::Valid) => {
            out.push(Violation::new(
                "/previousId",
                "alias calls need a previousId (string or number)",
            ));
        }
        _ => {}
    }

    for field in ["properties", "traits", "context"] {
        if let Some(v) = event.get(field) {
            if !v.is_object() {
                out.push(Violation::new(format!("/{field}"), "must be an object"));
            }
        }
    }

    match event.get("messageId") {
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

    match event.get("timestamp") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if messages::parse_time_ms(t).is_some() => {}
        Some(_) => out.push(Violation::new(
            "/timestamp",
            "must be an RFC 3339 date-time",
        )),
    }
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

fn schema_violations(
    schema: &jsonschema::Validator,
    field: &str,
    instance: &Value,
) -> Vec<SchemaViolation> {
    let mut out = Vec::new();
    for error in schema.iter_errors(instance) {
        let at = error.instance_path.as_str();
        let base = format!("/{field}{at}");
        match &error.kind {
            // One violation per unexpected key, so `omit` can drop each.
            jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected }
            | jsonschema::error::ValidationErrorKind::UnevaluatedProperties { unexpected } => {
                for key in unexpected {
                    out.push(SchemaViolation {
                        violation: Violation::new(
                            format!("{base}/{}", escape_pointer_segment(key)),
                            "property is not allowed by the tracking plan",
                        ),
                        keys: if at.is_empty() {
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
            .map(|rest| unescape_pointer_segment(rest.split('/').next().unwrap_or_default()));
        out.push(SchemaViolation {
            violation: Violation::new(base, truncate_reason(error.to_string())),
            keys: first.into_iter().collect(),
        });
    }
    out
}

fn apply_plan(
    plan: &CompiledPlan,
    kind: &str,
    event: &mut Map<String, Value>,
) -> Result<(), OperatorError> {
    let (field, schema) = match kind {
        "track" | "page" | "screen" => {
            let name = event
                .get("event")
                .and_then(Value::as_str)
                .unwrap_or_default();
            match plan.events.get(name) {
                Some(schema) => ("properties", schema),
                None if kind == "track" && plan.unplanned_events == UnplannedEvents::Block => {
                    return Err(OperatorError::rejected(
                        "unplanned_event",
                        json!({ "event": name }),
                    ));
                }
                None => return Ok(()),
            }
        }
        "identify" => match &plan.identify {
            Some(schema) => ("traits", schema),
            None => return Ok(()),
        },
        "group" => match &plan.group {
            Some(schema) => ("traits", schema),
            None => return Ok(()),
        },
        _ => return Ok(()),
    };
    let empty = Value::Object(Map::new());
    let found = schema_violations(schema, field, event.get(field).unwrap_or(&empty));
    if found.is_empty() {
        return Ok(());
    }
    let violations: Vec<Violation> = found.iter().map(|v| v.violation.clone()).collect();
    match plan.on_violation {
        ViolationPolicy::Block => Err(OperatorError::rejected(
            "plan_violation",
            json!({ "event": messages::event_name(&Value::Object(event.clone())), "violations": violations }),
        )),
        ViolationPolicy::Allow => {
            annotate(event, "violations", json!(violations));
            Ok(())
        }
        ViolationPolicy::Omit => {
            let mut keys: Vec<&String> = found.iter().flat_map(|v| v.keys.iter()).collect();
            keys.sort();
            keys.dedup();
            let mut omitted = Vec::new();
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
            // Removing keys may leave violations it cannot fix (or cause
            // new ones, e.g. a removed required property): attach those.
            let remaining: Vec<Violation> =
                schema_violations(schema, field, event.get(field).unwrap_or(&empty))
                    .into_iter()
                    .map(|v| v.violation)
                    .collect();
            if !omitted.is_empty() {
                annotate(event, "omitted", Value::Array(omitted));
            }
            if !remaining.is_empty() {
                annotate(event, "violations", json!(remaining));
            }
            Ok(())
        }
    }
}

/// Set `context.protocols.<key>`, creating the objects on the way.
fn annotate(event: &mut Map<String, Value>, key: &str, value: Value) {
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

impl Operator for ValidateOperator {
    fn process(&mut self, record: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let event: Value = serde_json::from_slice(record.value).map_err(|e| {
            OperatorError::rejected("invalid_json", json!({ "error": e.to_string() }))
        })?;
        if !event.is_object() {
            return Err(OperatorError::rejected(
                "invalid_json",
                json!({ "error": "expected a JSON object" }),
            ));
        }
        let source = match record.header(SOURCE) {
            Some(source) if self.validator.has_source(source) => source,
            other => {
                return Err(OperatorError::rejected(
                    "unknown_source",
                    json!({ "source": other }),
                ));
            }
        };
        let event = self.validator.check_event(source, event)?;
        let value = serde_json::to_vec(&event).map_err(|e| {
            OperatorError::rejected("invalid_json", json!({ "error": e.to_string() }))
        })?;

        let window = self.validator.dedupe_window.millis();
        if let (true, Some(message_id)) =
            (window > 0, event.get("messageId").and_then(Value::as_str))
        {
            let key = dedupe_key(source, message_id);
            if ctx.get(&key)?.is_some() {
                return Ok(());
            }
            let event_time = messages::event_time_ms(&event);
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

    #[test]
    fn spec_type_must_be_a_known_call() -> TestResult {
        assert_eq!(spec_pointers(json!({"userId": "u1"}))?, vec!["/type"]);
        assert_eq!(
            spec_pointers(json!({"type": "purchase", "userId": "u1"}))?,
            vec!["/type"]
        );
        assert_eq!(
            spec_pointers(json!({"type": 3, "userId": "u1"}))?,
            vec!["/type"]
        );
        Ok(())
    }

    #[test]
    fn spec_needs_user_id_or_anonymous_id() -> TestResult {
        assert_eq!(spec_pointers(json!({"type": "identify"}))?, vec!["/userId"]);
        assert_eq!(
            spec_pointers(json!({"type": "identify", "userId": "", "anonymousId": null}))?,
            vec!["/userId"]
        );
        assert_eq!(
            spec_pointers(json!({"type": "identify", "anonymousId": {"a": 1}}))?,
            vec!["/anonymousId"]
        );
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
        assert_eq!(
            spec_pointers(json!({"type": "track", "userId": "u"}))?,
            vec!["/event"]
        );
        assert_eq!(
            spec_pointers(json!({"type": "track", "userId": "u", "event": ""}))?,
            vec!["/event"]
        );
        assert_eq!(
            spec_pointers(json!({"type": "track", "userId": "u", "event": 7}))?,
            vec!["/event"]
        );
        Ok(())
    }

    #[test]
    fn spec_group_needs_group_id_and_alias_needs_previous_id() -> TestResult {
        assert_eq!(
            spec_pointers(json!({"type": "group", "userId": "u"}))?,
            vec!["/groupId"]
        );
        assert_eq!(
            spec_pointers(json!({"type": "alias", "userId": "u"}))?,
            vec!["/previousId"]
        );
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
        assert_eq!(
            spec_pointers(event)?,
            vec!["/properties", "/traits", "/context"]
        );
        Ok(())
    }

    #[test]
    fn spec_message_id_is_a_short_string() -> TestResult {
        let long = "m".repeat(MAX_MESSAGE_ID_CHARS + 1);
        assert_eq!(
            spec_pointers(json!({"type": "identify", "userId": "u", "messageId": long}))?,
            vec!["/messageId"]
        );
        assert_eq!(
            spec_pointers(json!({"type": "identify", "userId": "u", "messageId": 5}))?,
            vec!["/messageId"]
        );
        let mut h = harness(None)?;
        let ok = json!({"type": "identify", "userId": "u", "messageId": "m".repeat(MAX_MESSAGE_ID_CHARS)});
        assert_eq!(send(&mut h, &ok)?.len(), 1);
        Ok(())
    }

    #[test]
    fn spec_timestamp_must_be_rfc3339() -> TestResult {
        assert_eq!(
            spec_pointers(json!({"type": "identify", "userId": "u", "timestamp": "yesterday"}))?,
            vec!["/timestamp"]
        );
        assert_eq!(
            spec_pointers(json!({"type": "identify", "userId": "u", "timestamp": 1700000000}))?,
            vec!["/timestamp"]
        );
        Ok(())
    }

    #[test]
    fn spec_violations_are_all_collected() -> TestResult {
        let event = json!({"type": "track", "userId": true, "properties": 1, "timestamp": "x", "messageId": ""});
        assert_eq!(
            spec_pointers(event)?,
            vec![
                "/userId",
                "/event",
                "/properties",
                "/messageId",
                "/timestamp"
            ]
        );
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
            Some(("unplanned_event", json!({"event": "Product Viewed"})))
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

    proptest! {
        /// Every input yields exactly one of: one output, a rejection, or a
        /// silent drop of a `messageId` this source already forwarded.
        #[test]
        fn every_input_has_exactly_one_outcome(plan in policy(), inputs in prop::collection::vec(arb_input(), 1..25)) {
            let plans = BTreeMap::from([("shop".to_string(), plan)]);
            let sources = [source("web", Some("shop")), source("ios", None)];
            let validator = Validator::new(&sources, &plans, DEFAULT_DEDUPE_WINDOW);
            prop_assert!(validator.is_ok());
            let Ok(validator) = validator else { return Ok(()) };
            let mut h = OperatorHarness::new(ValidateOperator::new(Arc::new(validator)));
            let mut forwarded = std::collections::BTreeSet::new();
            for (bytes, src) in inputs {
                let headers: Vec<(String, Vec<u8>)> =
                    src.map(|s| (SOURCE.to_string(), s.as_bytes().to_vec())).into_iter().collect();
                let state_before = h.state.map.clone();
                match h.process(None, &bytes, &headers) {
                    Err(OperatorError::Rejected { .. }) => {
                        prop_assert_eq!(&h.state.map, &state_before, "rejection wrote state");
                    }
                    Err(e) => prop_assert!(false, "store error {e}"),
                    Ok(out) => {
                        let event: Option<Value> = serde_json::from_slice(&bytes).ok();
                        let id = event
                            .as_ref()
                            .and_then(|e| e.get("messageId"))
                            .and_then(Value::as_str)
                            .map(|id| (src.unwrap_or_default().to_string(), id.to_string()));
                        match out.as_slice() {
                            [] => prop_assert!(id.is_some_and(|id| forwarded.contains(&id)), "dropped a non-duplicate"),
                            [one] => {
                                prop_assert_eq!(one.output, outputs::NEXT);
                                prop_assert!(serde_json::from_slice::<Value>(&one.value).is_ok_and(|v| v.is_object()));
                                if let Some(id) = id {
                                    prop_assert!(forwarded.insert(id), "forwarded a duplicate");
                                }
                            }
                            more => prop_assert!(false, "{} outputs", more.len()),
                        }
                    }
                }
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
}
