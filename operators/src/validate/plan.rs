//! Step 4: tracking plans compiled, the schema that applies to an event
//! (event versions), and the policies applied to its violations.

use std::collections::BTreeMap;

use cdp_pipeline::OperatorError;
use serde_json::{json, Map, Value};

use crate::config::ConfigError;
use crate::messages;

use super::config::{EventVersion, TrackingPlan, UnplannedEvents, ViolationPolicy};
use super::spec::{truncate_reason, Violation};
use super::stream::Stream;

/// A tracking plan with its schemas compiled.
#[derive(Debug)]
pub(super) struct CompiledPlan {
    unplanned_events: UnplannedEvents,
    pub(super) on_violation: ViolationPolicy,
    pub(super) common: Option<jsonschema::Validator>,
    pub(super) identify: Option<PlanSchema>,
    pub(super) group: Option<PlanSchema>,
    /// Planned event name → version → schema of its `properties`.
    pub(super) events: BTreeMap<String, BTreeMap<EventVersion, PlanSchema>>,
}

/// The schema of an event's `properties` or `traits`: compiled, and as a
/// [`Stream`] when the fast path can check it while reading the event.
#[derive(Debug)]
pub(super) struct PlanSchema {
    pub(super) validator: jsonschema::Validator,
    pub(super) stream: Option<Stream>,
}

impl PlanSchema {
    fn compile(path: &str, schema: &Value) -> Result<Self, ConfigError> {
        Ok(PlanSchema {
            validator: compile_schema(path, schema)?,
            stream: Stream::for_schema(schema),
        })
    }
}

impl CompiledPlan {
    pub(super) fn compile(name: &str, plan: &TrackingPlan) -> Result<Self, ConfigError> {
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

pub(super) fn compile_schema(
    path: &str,
    schema: &Value,
) -> Result<jsonschema::Validator, ConfigError> {
    // Formats are annotations only by default in drafts 2019-09/2020-12;
    // a plan that says `format: email` means it, so they are checked.
    // `regex` patterns run in linear time whatever the event holds.
    jsonschema::options()
        .should_validate_formats(true)
        .with_pattern_options(jsonschema::PatternOptions::regex())
        .build(schema)
        .map_err(|e| ConfigError::new(path, format!("invalid JSON Schema: {e}")))
}

pub(super) fn unplanned_event(source: &str, event: &str) -> OperatorError {
    OperatorError::rejected(
        "unplanned_event",
        json!({ "source": source, "event": event }),
    )
}

/// A schema violation and the top-level keys (below `properties` /
/// `traits`) that removing would drop the offending value.
pub(super) struct SchemaViolation {
    pub(super) violation: Violation,
    keys: Vec<String>,
}

pub(super) fn escape_pointer_segment(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

pub(super) fn unescape_pointer_segment(s: &str) -> String {
    s.replace("~1", "/").replace("~0", "~")
}

/// Every violation of `schema` by `instance`, which sits at JSON pointer
/// `base` in the event. With `omittable`, each violation names the key of
/// `instance` whose removal drops the offending value. Callers check
/// `is_valid` first: the common case, and much cheaper than collecting
/// errors.
fn schema_violations(
    schema: &jsonschema::Validator,
    base: &str,
    instance: &Value,
    omittable: bool,
) -> Vec<SchemaViolation> {
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
pub(super) const VERSION_POINTER: &str = "/context/protocols/event_version";

/// The `context.protocols.event_version` of a parsed event.
fn event_version_of(event: &Value) -> Option<&Value> {
    event
        .get("context")
        .and_then(|c| c.get("protocols"))
        .and_then(|p| p.get("event_version"))
}

/// What a plan checks an event's properties or traits against.
pub(super) enum Resolved<'p> {
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
pub(super) fn resolve<'p>(
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
        if let Some(common) = self.common.filter(|common| !common.is_valid(event)) {
            out.extend(schema_violations(common, "", event, false));
        }
        if let Some((field, schema)) = self.field {
            out.extend(field_violations(schema, field, event.get(field)));
        }
        out
    }
}

/// Violations of `schema` by the event's `field`, an empty object if absent
/// or `null`.
pub(super) fn field_violations(
    schema: &jsonschema::Validator,
    field: &str,
    values: Option<&Value>,
) -> Vec<SchemaViolation> {
    let empty = Value::Object(Map::new());
    let values = values.filter(|v| !v.is_null()).unwrap_or(&empty);
    if schema.is_valid(values) {
        return Vec::new();
    }
    schema_violations(schema, &format!("/{field}"), values, true)
}

/// Step 4 on a spec-valid event of call type `kind`. `Ok(true)` when it
/// changed the event.
pub(super) fn apply_plan(
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

pub(super) fn plan_violation(
    source: &str,
    event: Option<&str>,
    violations: &[&Violation],
) -> OperatorError {
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
