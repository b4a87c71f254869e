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

mod config;
mod dedupe;
mod envelope;
mod fast;
mod plan;
mod spec;
mod stream;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use cdp_pipeline::envelope::SOURCE;
use cdp_pipeline::{Context, Operator, OperatorError, Record};
use serde_json::{json, Value};

use crate::messages;

pub use config::{
    EventVersion, TrackingPlan, UnplannedEvents, Validator, ViolationPolicy, OTHER_EVENT_LABEL,
    UNKNOWN_SOURCE_LABEL,
};
pub use dedupe::{dedupe_timer, DEFAULT_DEDUPE_WINDOW};
pub use spec::{
    spec_violations, spec_violations_raw, Violation, EVENT_TYPES, MAX_GROUP_ID_CHARS,
    MAX_MESSAGE_ID_CHARS, TRAITS_LIMIT,
};

use envelope::Envelope;

/// The top-level members the validate stage reads of an event (the
/// Segment spec's common fields and each call's own).
pub(crate) use envelope::{PARSED as TOP_LEVEL_PARSED, SHAPED as TOP_LEVEL_SHAPED};
use fast::{with_event_first, Fast};
use plan::apply_plan;
use spec::{call_type, counted_name, event_time_of, normalized_name, spec_violation, Member};

impl Validator {
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
        let normalized = normalized_name(kind);
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
}

/// A parse error, with what the bytes look like when a common mistake
/// explains it: a UTF-8 byte order mark in front of the JSON.
fn with_hint(error: String, value: &[u8]) -> String {
    if value.starts_with(b"\xEF\xBB\xBF") {
        format!(
            "{error} (the record starts with a UTF-8 byte order mark: write the JSON without one)"
        )
    } else {
        error
    }
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
        let header = record.header(SOURCE);
        let invalid_json = |error: String| {
            OperatorError::rejected("invalid_json", json!({ "source": header, "error": error }))
        };
        let known = header.and_then(|s| self.validator.sources.get_key_value(s));
        let plan = known.and_then(|(_, plan)| plan.as_deref());
        if record.value.iter().all(u8::is_ascii_whitespace) {
            return Err(invalid_json(
                "empty record (a tombstone?): expected one Segment event as a JSON object".into(),
            ));
        }
        let envelope = Envelope::parse(record.value, plan)
            .map_err(|e| invalid_json(with_hint(e.to_string(), record.value)))?
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
        dedupe::on_timer(key, ctx)
    }
}
