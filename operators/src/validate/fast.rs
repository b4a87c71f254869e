//! The operator's fast path for steps 2–4: the outcome the reference
//! path would have, decided from the [`Envelope`] alone.

use serde_json::Value;

use cdp_pipeline::OperatorError;

use super::config::{Validator, ViolationPolicy};
use super::envelope::Envelope;
use super::plan::{
    field_violations, plan_violation, resolve, unplanned_event, CompiledPlan, Resolved,
};
use super::spec::{
    call_type, counted_name, normalized_name, spec_check, spec_violation, Member, Shape, Violation,
    TRAITS_LIMIT,
};
use super::stream::Stream;

impl Validator {
    /// The operator's fast path for steps 2–4: the outcome
    /// [`Validator::check_event`] would have on the parsed event, decided
    /// from the envelope alone, or [`Fast::Slow`] when it needs the event.
    pub(super) fn check_envelope(
        &self,
        plan: Option<&CompiledPlan>,
        source: &str,
        envelope: &Envelope,
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
        let normalized = normalized_name(kind);
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
}

/// Whether `plan` may check the body `field` (`properties` or `traits`)
/// of a call whose `type` and `event` members are, as far as the pass has
/// read, `kind` and `event`. A body it skips but the plan then needs sends
/// the event down the reference path, so a wrong "no" costs time only.
pub(super) fn wants_body(
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
        ("page" | "screen", "properties") => {
            normalized_name(kind).is_some_and(|name| plan.events.contains_key(name))
        }
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
pub(super) fn stream_for<'p>(
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
pub(super) enum Fast {
    /// Forward the input bytes; for a `page` / `screen` call without an
    /// `event`, with `"event": name` added as the first member.
    Forward { event: Option<&'static str> },
    /// The outcome needs the parsed event (it must change, or the plan
    /// has a `common` schema): take the reference path.
    Slow,
}

/// `bytes`, a JSON object with at least one member, with `"event":name`
/// as its first member. `name` needs no escaping.
pub(super) fn with_event_first(bytes: &[u8], name: &str) -> Vec<u8> {
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
