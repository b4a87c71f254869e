//! The audiences stage (Engage audiences): `<p>.traits` → `<p>.audiences`.
//!
//! Per profile it keeps the trait values the traits stage reported, the
//! history of events that the audience conditions look at, and the current
//! memberships. After every change it re-evaluates every audience (in
//! topological order, so `{audience: x}` sees x's new value) and emits one
//! [`AudienceChange`] per membership that changed.
//!
//! Guarantees:
//! - Incremental membership equals a batch recomputation over the whole
//!   history at the same time (property test below): conditions that depend
//!   on time (event conditions with `within`) set a timer at the earliest
//!   moment their value can change, so "did not order within 14d" turns true
//!   when the last order ages out, with no event needed.
//! - Time is stream time and event time only; a profile's evaluation clock
//!   is `max(clock, stream time, event time)` and never goes backwards;
//!   event times are bounded by stream time plus `event_time.max_future`
//!   ([`crate::event_time`]).
//! - Event history per *filter* (event name + property conditions, shared by
//!   every condition using the same filter): an all-time count, plus, for
//!   windowed conditions, event counts in time buckets 1/30 of the shortest
//!   window (at most 31 per window: a window counts at most one bucket
//!   width more at its old edge), and for sequences exact event times (at
//!   most [`MAX_SEQUENCE_TIMES`] per filter).
//! - Merges: the merged-away profile exits every audience it was in, its
//!   state travels to the survivor (which then enters what it qualifies
//!   for), and late updates for it are redirected.
//! - Config: unknown audience references and cycles between audiences are
//!   rejected at load with the path of the bad field.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use cdp_pipeline::operator::{Context, Operator, OperatorError, Record};
use cdp_pipeline::Span;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Value};

use crate::config::{ConfigError, KnownNames};
use crate::event_time::{EventTimeConfig, FutureTimePolicy};
use crate::messages::{
    self, outputs, AudienceAction, AudienceChange, Cause, Identifiers, ProfileUpdate,
};
use crate::traits::{bucket_width, keyed_comparison_schema};
use crate::traits::{
    emit_json, profile_key, redirect_key, redirect_of, reschedule, set_comparison, to_json_value,
    union_identifiers, Comparison, PropertyCondition, COMPARISONS,
};
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

/// The `stage` this operator writes on its transfers.
const STAGE: &str = "audiences";

/// Most event times kept per filter that a sequence uses (oldest dropped).
pub const MAX_SEQUENCE_TIMES: usize = 10_000;

// ---------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------

/// One audience (`audiences.<name>`).
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AudienceDef {
    /// The condition a profile must meet to be a member.
    #[serde(rename = "where")]
    pub r#where: Condition,
}

/// A membership condition. Written as a map whose key names the kind:
/// `{all: [..]}`, `{any: [..]}`, `{not: cond}`, `{trait: name, gte: 5}`,
/// `{event: name, count: {gte: 2}, within: 30d, where: [..]}`,
/// `{audience: name}`, `{sequence: [{event: A}, {event: B}], within: 1d}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Every condition holds (true when empty).
    All(Vec<Condition>),
    /// At least one condition holds (false when empty).
    Any(Vec<Condition>),
    /// The condition does not hold: `{not: {event: X, within: 14d}}` is
    /// "did not perform X in the last 14 days".
    Not(Box<Condition>),
    /// A trait (computed or from `identify`) compares as given.
    Trait(TraitCondition),
    /// The profile performed an event, `count` times (default: at least
    /// once), within a window (default: ever).
    Event(EventCondition),
    /// The profile is a member of another audience.
    Audience(String),
    /// Events in order, by event time.
    Sequence(SequenceCondition),
}

/// `{trait: name, <comparison>}`.
#[derive(Debug, Clone, PartialEq)]
pub struct TraitCondition {
    /// The trait's name.
    pub name: String,
    /// How its value must compare.
    pub op: Comparison,
}

/// `{event: name, count?, within?, where?}`.
#[derive(Debug, Clone, PartialEq)]
pub struct EventCondition {
    /// Event name (`page` calls are `Page Viewed`).
    pub event: String,
    /// How many matching events; absent means at least one.
    pub count: Option<CountCondition>,
    /// Only events with event time in the last `within` count.
    pub within: Option<Span>,
    /// Property conditions every counted event must meet.
    pub r#where: Vec<PropertyCondition>,
}

/// A count comparison, `{gte: 2}`; several keys must all hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountCondition {
    /// Exactly this many.
    pub eq: Option<u64>,
    /// Not this many.
    pub ne: Option<u64>,
    /// More than this many.
    pub gt: Option<u64>,
    /// At least this many.
    pub gte: Option<u64>,
    /// Fewer than this many.
    pub lt: Option<u64>,
    /// At most this many.
    pub lte: Option<u64>,
}

impl CountCondition {
    /// Whether `n` passes every given comparison.
    pub fn matches(&self, n: u64) -> bool {
        self.eq.is_none_or(|x| n == x)
            && self.ne.is_none_or(|x| n != x)
            && self.gt.is_none_or(|x| n > x)
            && self.gte.is_none_or(|x| n >= x)
            && self.lt.is_none_or(|x| n < x)
            && self.lte.is_none_or(|x| n <= x)
    }
}

const COUNT_FIELDS: &[&str] = &["eq", "ne", "gt", "gte", "lt", "lte"];

impl<'de> Deserialize<'de> for CountCondition {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct CountVisitor;
        impl<'de> Visitor<'de> for CountVisitor {
            type Value = CountCondition;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map like {gte: 2}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CountCondition, A::Error> {
                let mut c = CountCondition::default();
                let mut any = false;
                while let Some(key) = map.next_key::<String>()? {
                    let slot = match key.as_str() {
                        "eq" => &mut c.eq,
                        "ne" => &mut c.ne,
                        "gt" => &mut c.gt,
                        "gte" => &mut c.gte,
                        "lt" => &mut c.lt,
                        "lte" => &mut c.lte,
                        other => return Err(de::Error::unknown_field(other, COUNT_FIELDS)),
                    };
                    if slot.is_some() {
                        return Err(de::Error::custom(format!("duplicate field `{key}`")));
                    }
                    *slot = Some(map.next_value()?);
                    any = true;
                }
                if !any {
                    return Err(de::Error::custom(
                        "expected at least one of eq, ne, gt, gte, lt, lte",
                    ));
                }
                Ok(c)
            }
        }
        d.deserialize_map(CountVisitor)
    }
}

/// `{sequence: [steps], within?}`.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceCondition {
    /// The events, in the order they must happen (strictly increasing event
    /// time).
    pub steps: Vec<SequenceStep>,
    /// Most time from the first step's event to the last step's event;
    /// unbounded when absent. Once a sequence happened it stays true.
    pub within: Option<Span>,
}

/// One step of a sequence: `{event: Product Viewed, where?: [..]}`.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SequenceStep {
    /// Event name.
    pub event: String,
    /// Property conditions the event must meet.
    #[serde(default, rename = "where")]
    pub r#where: Vec<PropertyCondition>,
}

const CONDITION_KINDS: &[&str] = &[
    "all", "any", "not", "trait", "event", "audience", "sequence",
];
const CONDITION_FIELDS: &[&str] = &[
    "all", "any", "not", "trait", "event", "audience", "sequence", "count", "within", "where",
    "eq", "ne", "gt", "gte", "lt", "lte", "contains", "in", "exists",
];

impl<'de> Deserialize<'de> for Condition {
    // By hand, key by key: every value is read with `next_value`, so
    // `serde_path_to_error` reports paths such as `where.all[1].count`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ConditionVisitor)
    }
}

struct ConditionVisitor;

#[derive(Default)]
struct ConditionFields {
    kinds: Vec<&'static str>,
    all: Option<Vec<Condition>>,
    any: Option<Vec<Condition>>,
    not: Option<Condition>,
    trait_name: Option<String>,
    event: Option<String>,
    audience: Option<String>,
    sequence: Option<Vec<SequenceStep>>,
    count: Option<CountCondition>,
    within: Option<Span>,
    r#where: Option<Vec<PropertyCondition>>,
    op: Option<Comparison>,
}

impl<'de> Visitor<'de> for ConditionVisitor {
    type Value = Condition;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a condition: a map with one of {}",
            CONDITION_KINDS.join(", ")
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Condition, A::Error> {
        let mut f = ConditionFields::default();
        while let Some(key) = map.next_key::<String>()? {
            let key = key.as_str();
            let duplicate = || de::Error::custom(format!("duplicate field `{key}`"));
            if let Some(kind) = CONDITION_KINDS.iter().copied().find(|k| *k == key) {
                if f.kinds.contains(&kind) {
                    return Err(duplicate());
                }
                f.kinds.push(kind);
                match kind {
                    "all" => f.all = Some(map.next_value()?),
                    "any" => f.any = Some(map.next_value()?),
                    "not" => f.not = Some(map.next_value()?),
                    "trait" => f.trait_name = Some(map.next_value()?),
                    "event" => f.event = Some(map.next_value()?),
                    "audience" => f.audience = Some(map.next_value()?),
                    _ => f.sequence = Some(map.next_value()?),
                }
                continue;
            }
            match key {
                "count" if f.count.is_some() => return Err(duplicate()),
                "count" => f.count = Some(map.next_value()?),
                "within" if f.within.is_some() => return Err(duplicate()),
                "within" => f.within = Some(map.next_value()?),
                "where" if f.r#where.is_some() => return Err(duplicate()),
                "where" => f.r#where = Some(map.next_value()?),
                k if COMPARISONS.contains(&k) => {
                    let value: Value = map.next_value()?;
                    set_comparison(&mut f.op, k, value, CONDITION_FIELDS)?;
                }
                other => return Err(de::Error::unknown_field(other, CONDITION_FIELDS)),
            }
        }
        build_condition(f).map_err(de::Error::custom)
    }
}

/// Check which keys go together and build the condition.
fn build_condition(f: ConditionFields) -> Result<Condition, String> {
    let kind = match f.kinds.as_slice() {
        [kind] => *kind,
        [] => return Err(format!("expected one of {}", CONDITION_KINDS.join(", "))),
        many => {
            return Err(format!(
                "a condition has exactly one of {}; found {}",
                CONDITION_KINDS.join(", "),
                many.join(" and ")
            ))
        }
    };
    let allowed: &[&str] = match kind {
        "trait" => &["comparison"],
        "event" => &["count", "within", "where"],
        "sequence" => &["within"],
        _ => &[],
    };
    for (field, present) in [
        ("count", f.count.is_some()),
        ("within", f.within.is_some()),
        ("where", f.r#where.is_some()),
        ("comparison", f.op.is_some()),
    ] {
        if present && !allowed.contains(&field) {
            let field = if field == "comparison" {
                "a comparison"
            } else {
                field
            };
            return Err(format!("`{field}` does not go with `{kind}`"));
        }
    }
    let missing = || format!("`{kind}` is missing its value");
    Ok(match kind {
        "all" => Condition::All(f.all.ok_or_else(missing)?),
        "any" => Condition::Any(f.any.ok_or_else(missing)?),
        "not" => Condition::Not(Box::new(f.not.ok_or_else(missing)?)),
        "trait" => Condition::Trait(TraitCondition {
            name: f.trait_name.ok_or_else(missing)?,
            op: f.op.ok_or_else(|| {
                format!("`trait` needs one comparison ({})", COMPARISONS.join(" "))
            })?,
        }),
        "event" => Condition::Event(EventCondition {
            event: f.event.ok_or_else(missing)?,
            count: f.count,
            within: f.within,
            r#where: f.r#where.unwrap_or_default(),
        }),
        "audience" => Condition::Audience(f.audience.ok_or_else(missing)?),
        _ => Condition::Sequence(SequenceCondition {
            steps: f.sequence.ok_or_else(missing)?,
            within: f.within,
        }),
    })
}

// JSON Schemas of the hand-read shapes above, for `cdp config schema`.

/// `{kind: value}` and nothing else.
fn single_key(kind: &str, description: &str, value: serde_json::Value) -> serde_json::Value {
    json!({
        "description": description,
        "type": "object",
        "properties": { kind: value },
        "required": [kind],
        "additionalProperties": false
    })
}

impl JsonSchema for Condition {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Condition".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let condition = generator.subschema_for::<Condition>().to_value();
        let conditions = json!({ "type": "array", "items": condition });
        json_schema!({
            "description": "A membership condition: a map whose key names the kind (`all`, `any`, `not`, `trait`, `event`, `audience`, `sequence`).",
            "oneOf": [
                single_key("all", "Every condition holds (true when empty).", conditions.clone()),
                single_key("any", "At least one condition holds (false when empty).", conditions),
                single_key(
                    "not",
                    "The condition does not hold: `{not: {event: X, within: 14d}}` is \"did not perform X in the last 14 days\".",
                    condition,
                ),
                generator.subschema_for::<TraitCondition>().to_value(),
                generator.subschema_for::<EventCondition>().to_value(),
                single_key(
                    "audience",
                    "The profile is a member of another audience.",
                    json!({ "type": "string", "description": "The audience's name." }),
                ),
                generator.subschema_for::<SequenceCondition>().to_value(),
            ]
        })
    }
}

impl JsonSchema for TraitCondition {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TraitCondition".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        keyed_comparison_schema(
            "A trait (computed or from `identify`) compares as given, with exactly one comparison: `{trait: ltv, gte: 500}`.",
            "trait",
            "The trait's name.",
        )
    }
}

/// The schema of a `within` duration with its own description.
fn described_span(generator: &mut SchemaGenerator, description: &str) -> Value {
    let mut within = generator.subschema_for::<Span>().to_value();
    within["description"] = json!(description);
    within
}

impl JsonSchema for EventCondition {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "EventCondition".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let within = described_span(
            generator,
            "Only events with event time in the last `within` count.",
        );
        json_schema!({
            "description": "The profile performed an event, `count` times (default: at least once), within a window (default: ever): `{event: name, count?, within?, where?}`.",
            "type": "object",
            "properties": {
                "event": {
                    "type": "string",
                    "description": "Event name (`page` calls are `Page Viewed`)."
                },
                "count": generator.subschema_for::<CountCondition>().to_value(),
                "within": within,
                "where": {
                    "type": "array",
                    "items": generator.subschema_for::<PropertyCondition>().to_value(),
                    "description": "Property conditions every counted event must meet."
                }
            },
            "required": ["event"],
            "additionalProperties": false
        })
    }
}

impl JsonSchema for CountCondition {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "CountCondition".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let count = |description: &str| json!({ "type": "integer", "minimum": 0, "description": description });
        json_schema!({
            "description": "How many matching events, `{gte: 2}`; several keys must all hold.",
            "type": "object",
            "properties": {
                "eq": count("Exactly this many."),
                "ne": count("Not this many."),
                "gt": count("More than this many."),
                "gte": count("At least this many."),
                "lt": count("Fewer than this many."),
                "lte": count("At most this many.")
            },
            "additionalProperties": false,
            "minProperties": 1
        })
    }
}

impl JsonSchema for SequenceCondition {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SequenceCondition".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let within = described_span(generator, "Most time from the first step's event to the last step's event; unbounded when absent. Once a sequence happened it stays true.");
        json_schema!({
            "description": "Events in order, by event time: `{sequence: [steps], within?}`.",
            "type": "object",
            "properties": {
                "sequence": {
                    "type": "array",
                    "items": generator.subschema_for::<SequenceStep>().to_value(),
                    "description": "The events, in the order they must happen (strictly increasing event time)."
                },
                "within": within
            },
            "required": ["sequence"],
            "additionalProperties": false
        })
    }
}

// ---------------------------------------------------------------------------
// Compiled audiences
// ---------------------------------------------------------------------------

/// How long a filter's event times must be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Retention {
    /// Only the all-time count is needed.
    CountOnly,
    /// Times within the longest window of a condition using the filter.
    Window(i64),
    /// Every time (sequences).
    All,
}

/// An event name and property conditions; its history is shared by every
/// condition with the same filter.
#[derive(Debug, Clone, PartialEq)]
struct EventFilter {
    /// Canonical text of the filter: the key of its history in the state.
    key: String,
    event: String,
    conditions: Vec<PropertyCondition>,
    retention: Retention,
    /// Width of the time buckets its windowed counts are kept in: 1/30 of
    /// the shortest window using the filter (see
    /// [`crate::traits::bucket_width`]); `None` when no window uses it.
    width: Option<i64>,
}

impl EventFilter {
    fn selects(&self, name: Option<&str>, event: &Value) -> bool {
        name == Some(self.event.as_str()) && self.conditions.iter().all(|c| c.matches_event(event))
    }
}

/// A condition with its filters resolved to indexes into `AudienceSet::filters`.
#[derive(Debug, Clone, PartialEq)]
enum Compiled {
    All(Vec<Compiled>),
    Any(Vec<Compiled>),
    Not(Box<Compiled>),
    Trait {
        name: String,
        op: Comparison,
    },
    Event {
        filter: usize,
        count: CountCondition,
        within: Option<i64>,
    },
    Audience(String),
    Sequence {
        steps: Vec<usize>,
        within: Option<i64>,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct CompiledAudience {
    condition: Compiled,
    /// Traits the condition references, also through other audiences.
    traits: BTreeSet<String>,
}

/// The audiences of the config, checked and in evaluation order.
#[derive(Debug, Clone, PartialEq)]
pub struct AudienceSet {
    audiences: BTreeMap<String, CompiledAudience>,
    /// Topological order: an audience comes after those it references.
    order: Vec<String>,
    filters: Vec<EventFilter>,
    /// `(filter, window)` of every windowed event condition: what timers
    /// watch.
    windows: BTreeSet<(usize, i64)>,
    /// The bound on event times ahead of the stream.
    event_time: EventTimeConfig,
}

struct Compiler {
    filters: Vec<EventFilter>,
    windows: BTreeSet<(usize, i64)>,
    known: KnownNames,
}

impl Compiler {
    fn filter(
        &mut self,
        event: &str,
        conditions: &[PropertyCondition],
        retention: Retention,
    ) -> Result<usize, String> {
        let key = serde_json::to_string(&json!({"event": event, "where": conditions}))
            .map_err(|e| e.to_string())?;
        let width = match retention {
            Retention::Window(w) => Some(bucket_width(w)),
            _ => None,
        };
        if let Some(i) = self.filters.iter().position(|f| f.key == key) {
            let f = &mut self.filters[i];
            f.retention = match (f.retention, retention) {
                (Retention::Window(a), Retention::Window(b)) => Retention::Window(a.max(b)),
                (a, b) => a.max(b),
            };
            f.width = match (f.width, width) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            return Ok(i);
        }
        self.filters.push(EventFilter {
            key,
            event: event.to_owned(),
            conditions: conditions.to_vec(),
            retention,
            width,
        });
        Ok(self.filters.len() - 1)
    }

    fn compile(
        &mut self,
        c: &Condition,
        path: &str,
        defs: &BTreeMap<String, AudienceDef>,
        traits: &mut BTreeSet<String>,
        refs: &mut BTreeSet<String>,
    ) -> Result<Compiled, ConfigError> {
        let within = |w: Option<Span>, at: String| -> Result<Option<i64>, ConfigError> {
            match w.map(|s| s.millis()) {
                Some(ms) if ms <= 0 => Err(ConfigError::new(at, "must be longer than 0")),
                other => Ok(other),
            }
        };
        let check_where = |conds: &[PropertyCondition], at: &str| -> Result<(), ConfigError> {
            match conds.iter().position(|c| c.property.is_empty()) {
                Some(i) => Err(ConfigError::new(
                    format!("{at}.where[{i}].property"),
                    "must not be empty",
                )),
                None => Ok(()),
            }
        };
        Ok(match c {
            Condition::All(cs) | Condition::Any(cs) => {
                let key = if matches!(c, Condition::All(_)) {
                    "all"
                } else {
                    "any"
                };
                let mut out = Vec::with_capacity(cs.len());
                for (i, sub) in cs.iter().enumerate() {
                    out.push(self.compile(
                        sub,
                        &format!("{path}.{key}[{i}]"),
                        defs,
                        traits,
                        refs,
                    )?);
                }
                if key == "all" {
                    Compiled::All(out)
                } else {
                    Compiled::Any(out)
                }
            }
            Condition::Not(sub) => Compiled::Not(Box::new(self.compile(
                sub,
                &format!("{path}.not"),
                defs,
                traits,
                refs,
            )?)),
            Condition::Trait(t) => {
                if t.name.is_empty() {
                    return Err(ConfigError::new(
                        format!("{path}.trait"),
                        "must not be empty",
                    ));
                }
                self.known.check_trait(&format!("{path}.trait"), &t.name)?;
                traits.insert(t.name.clone());
                Compiled::Trait {
                    name: t.name.clone(),
                    op: t.op.clone(),
                }
            }
            Condition::Event(e) => {
                if e.event.is_empty() {
                    return Err(ConfigError::new(
                        format!("{path}.event"),
                        "must not be empty",
                    ));
                }
                self.known.check_event(&format!("{path}.event"), &e.event)?;
                check_where(&e.r#where, path)?;
                let within = within(e.within, format!("{path}.within"))?;
                let retention = within.map_or(Retention::CountOnly, Retention::Window);
                let filter = self
                    .filter(&e.event, &e.r#where, retention)
                    .map_err(|m| ConfigError::new(path.to_owned(), m))?;
                if let Some(w) = within {
                    self.windows.insert((filter, w));
                }
                Compiled::Event {
                    filter,
                    count: e.count.unwrap_or(CountCondition {
                        gte: Some(1),
                        ..CountCondition::default()
                    }),
                    within,
                }
            }
            Condition::Audience(name) => {
                if !defs.contains_key(name) {
                    return Err(ConfigError::new(
                        format!("{path}.audience"),
                        format!("unknown audience {name:?}"),
                    ));
                }
                refs.insert(name.clone());
                Compiled::Audience(name.clone())
            }
            Condition::Sequence(s) => {
                if s.steps.is_empty() {
                    return Err(ConfigError::new(
                        format!("{path}.sequence"),
                        "needs at least one step",
                    ));
                }
                let mut steps = Vec::with_capacity(s.steps.len());
                for (i, step) in s.steps.iter().enumerate() {
                    let at = format!("{path}.sequence[{i}]");
                    if step.event.is_empty() {
                        return Err(ConfigError::new(format!("{at}.event"), "must not be empty"));
                    }
                    self.known
                        .check_event(&format!("{at}.event"), &step.event)?;
                    check_where(&step.r#where, &at)?;
                    steps.push(
                        self.filter(&step.event, &step.r#where, Retention::All)
                            .map_err(|m| ConfigError::new(at, m))?,
                    );
                }
                Compiled::Sequence {
                    steps,
                    within: within(s.within, format!("{path}.within"))?,
                }
            }
        })
    }
}

impl AudienceSet {
    /// Check the `audiences` section. Trait and event names must be
    /// `known` (`audiences.vip.where.all[1].trait: unknown trait "ltv"`);
    /// audience references must exist and must not form a cycle
    /// (`audiences.a: cycle a -> b -> a`).
    pub fn new(
        defs: &BTreeMap<String, AudienceDef>,
        known: &KnownNames,
    ) -> Result<Self, ConfigError> {
        let mut compiler = Compiler {
            filters: Vec::new(),
            windows: BTreeSet::new(),
            known: known.clone(),
        };
        let mut compiled = BTreeMap::new();
        let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, def) in defs {
            if name.is_empty() {
                return Err(ConfigError::new(
                    "audiences",
                    "an audience name must not be empty",
                ));
            }
            let mut direct_traits = BTreeSet::new();
            let mut refs = BTreeSet::new();
            let path = format!("audiences.{name}.where");
            let condition =
                compiler.compile(&def.r#where, &path, defs, &mut direct_traits, &mut refs)?;
            compiled.insert(
                name.clone(),
                CompiledAudience {
                    condition,
                    traits: direct_traits,
                },
            );
            edges.insert(name.clone(), refs);
        }
        let order = topological_order(&edges)?;
        // Referenced traits through referenced audiences, dependencies first.
        for name in &order {
            let inherited: BTreeSet<String> = edges
                .get(name)
                .into_iter()
                .flatten()
                .filter_map(|r| compiled.get(r))
                .flat_map(|a| a.traits.iter().cloned())
                .collect();
            if let Some(a) = compiled.get_mut(name) {
                a.traits.extend(inherited);
            }
        }
        Ok(AudienceSet {
            audiences: compiled,
            order,
            filters: compiler.filters,
            windows: compiler.windows,
            event_time: EventTimeConfig::default(),
        })
    }

    /// The same audiences with another bound on future event times. This
    /// stage always corrects (the traits stage is where an event is
    /// refused): an update that passed traits is never dead-lettered here.
    pub fn with_event_time(mut self, event_time: EventTimeConfig) -> Self {
        self.event_time = EventTimeConfig {
            beyond: FutureTimePolicy::Correct,
            ..event_time
        };
        self
    }

    /// Audience names in evaluation order.
    pub fn order(&self) -> &[String] {
        &self.order
    }
}

/// Depth-first topological sort; the first cycle found (in name order) is
/// an error at the path of the audience where it starts.
fn topological_order(
    edges: &BTreeMap<String, BTreeSet<String>>,
) -> Result<Vec<String>, ConfigError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        name: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ConfigError> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                let start = stack.iter().position(|n| n == name).unwrap_or(0);
                let mut cycle: Vec<&str> = stack[start..].iter().map(String::as_str).collect();
                cycle.push(name);
                return Err(ConfigError::new(
                    format!("audiences.{name}"),
                    format!("cycle {}", cycle.join(" -> ")),
                ));
            }
            None => {}
        }
        marks.insert(name.to_owned(), Mark::Visiting);
        stack.push(name.to_owned());
        for next in edges.get(name).into_iter().flatten() {
            visit(next, edges, marks, stack, order)?;
        }
        stack.pop();
        marks.insert(name.to_owned(), Mark::Done);
        order.push(name.to_owned());
        Ok(())
    }
    let mut marks = BTreeMap::new();
    let mut order = Vec::with_capacity(edges.len());
    for name in edges.keys() {
        visit(name, edges, &mut marks, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

// ---------------------------------------------------------------------------
// Profile state and evaluation
// ---------------------------------------------------------------------------

/// The events one filter matched for a profile.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct FilterHistory {
    /// Every matching event, all time.
    count: u64,
    /// Event times, sorted, as far back as the filter's retention needs
    /// (sequences; windows in states written before buckets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    times: Vec<i64>,
    /// For windows: `(bucket start, events)`, sorted, at most 31 per
    /// window: what keeps a busy profile's state bounded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    buckets: Vec<(i64, u64)>,
}

/// Whether the bucket starting at `start` still counts at `now`: while its
/// last instant is inside the window `(now - w, ∞)`.
fn bucket_counts(start: i64, width: i64, w: i64, now: i64) -> bool {
    start.saturating_add(width - 1) > now.saturating_sub(w)
}

impl FilterHistory {
    fn record(&mut self, time: i64, filter: &EventFilter, clock: i64) {
        self.count = self.count.saturating_add(1);
        match (filter.retention, filter.width) {
            (Retention::CountOnly, _) => {}
            (Retention::Window(w), Some(width)) => {
                let start = time.div_euclid(width).saturating_mul(width);
                if bucket_counts(start, width, w, clock) {
                    let i = self.buckets.partition_point(|b| b.0 < start);
                    match self.buckets.get_mut(i) {
                        Some(b) if b.0 == start => b.1 = b.1.saturating_add(1),
                        _ => self.buckets.insert(i, (start, 1)),
                    }
                }
            }
            (Retention::Window(_), None) | (Retention::All, _) => {
                let i = self.times.partition_point(|t| *t <= time);
                self.times.insert(i, time);
            }
        }
    }

    fn prune(&mut self, filter: &EventFilter, clock: i64) {
        match filter.retention {
            Retention::CountOnly => {
                self.times.clear();
                self.buckets.clear();
            }
            Retention::Window(w) => {
                if let Some(width) = filter.width {
                    // Times kept before buckets existed move into buckets.
                    for t in std::mem::take(&mut self.times) {
                        let start = t.div_euclid(width).saturating_mul(width);
                        let i = self.buckets.partition_point(|b| b.0 < start);
                        match self.buckets.get_mut(i) {
                            Some(b) if b.0 == start => b.1 = b.1.saturating_add(1),
                            _ => self.buckets.insert(i, (start, 1)),
                        }
                    }
                    self.buckets
                        .retain(|(start, _)| bucket_counts(*start, width, w, clock));
                }
                let horizon = clock.saturating_sub(w);
                let cut = self.times.partition_point(|t| *t <= horizon);
                self.times.drain(..cut);
            }
            Retention::All => {
                let excess = self.times.len().saturating_sub(MAX_SEQUENCE_TIMES);
                self.times.drain(..excess);
            }
        }
    }

    /// Events with time in the window `(now - w, ∞)`; bucketed events by
    /// their bucket's last instant.
    fn count_within(&self, now: i64, w: i64, width: Option<i64>) -> u64 {
        let horizon = now.saturating_sub(w);
        let exact = (self.times.len() - self.times.partition_point(|t| *t <= horizon)) as u64;
        let bucketed: u64 = width.map_or(0, |width| {
            self.buckets
                .iter()
                .filter(|(start, _)| bucket_counts(*start, width, w, now))
                .map(|(_, n)| *n)
                .sum()
        });
        exact.saturating_add(bucketed)
    }

    /// When the oldest event still counted in a window of `w` at `now`
    /// stops counting.
    fn next_expiry(&self, now: i64, w: i64, width: Option<i64>) -> Option<i64> {
        let horizon = now.saturating_sub(w);
        let exact = self
            .times
            .get(self.times.partition_point(|t| *t <= horizon))
            .map(|t| t.saturating_add(w));
        let bucketed = width.and_then(|width| {
            self.buckets
                .iter()
                .find(|(start, _)| bucket_counts(*start, width, w, now))
                .map(|(start, _)| start.saturating_add(width - 1).saturating_add(w))
        });
        match (exact, bucketed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Everything the audiences stage keeps for one profile, under `profile/<id>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct AudienceProfile {
    #[serde(default)]
    identifiers: Identifiers,
    /// Time of the last evaluation; never goes backwards.
    #[serde(default)]
    clock: i64,
    /// Current trait values (computed and identify).
    #[serde(default)]
    traits: BTreeMap<String, Value>,
    /// Filter key → history.
    #[serde(default)]
    events: BTreeMap<String, FilterHistory>,
    /// Audiences the profile is in.
    #[serde(default)]
    members: BTreeSet<String>,
    /// The timer set for the next time-driven change.
    #[serde(default)]
    timer: Option<i64>,
}

impl AudienceProfile {
    fn record_event(&mut self, set: &AudienceSet, event: &Value, time: i64) {
        let name = messages::event_name(event);
        for f in &set.filters {
            if f.selects(name, event) {
                self.events
                    .entry(f.key.clone())
                    .or_default()
                    .record(time, f, self.clock);
            }
        }
    }

    fn prune(&mut self, set: &AudienceSet) {
        let clock = self.clock;
        // Histories of filters no longer configured go too.
        self.events
            .retain(|key, _| set.filters.iter().any(|f| f.key == *key));
        for f in &set.filters {
            if let Some(h) = self.events.get_mut(&f.key) {
                h.prune(f, clock);
            }
        }
    }

    /// Fold a merged-away profile into this one (the survivor's trait
    /// values win where both have one).
    fn merge(&mut self, other: AudienceProfile) {
        self.identifiers = union_identifiers(&self.identifiers, &other.identifiers);
        self.clock = self.clock.max(other.clock);
        for (name, value) in other.traits {
            self.traits.entry(name).or_insert(value);
        }
        for (key, theirs) in other.events {
            let mine = self.events.entry(key).or_default();
            mine.count = mine.count.saturating_add(theirs.count);
            mine.times.extend(theirs.times);
            mine.times.sort_unstable();
            for (start, n) in theirs.buckets {
                let i = mine.buckets.partition_point(|b| b.0 < start);
                match mine.buckets.get_mut(i) {
                    Some(b) if b.0 == start => b.1 = b.1.saturating_add(n),
                    _ => mine.buckets.insert(i, (start, n)),
                }
            }
        }
    }

    fn history(&self, set: &AudienceSet, filter: usize) -> Option<&FilterHistory> {
        set.filters
            .get(filter)
            .and_then(|f| self.events.get(&f.key))
    }

    fn holds(&self, set: &AudienceSet, c: &Compiled, now: i64, members: &BTreeSet<String>) -> bool {
        match c {
            Compiled::All(cs) => cs.iter().all(|c| self.holds(set, c, now, members)),
            Compiled::Any(cs) => cs.iter().any(|c| self.holds(set, c, now, members)),
            Compiled::Not(c) => !self.holds(set, c, now, members),
            Compiled::Trait { name, op } => op.matches(self.traits.get(name)),
            Compiled::Event {
                filter,
                count,
                within,
            } => {
                let h = self.history(set, *filter);
                let n = match (h, within) {
                    (None, _) => 0,
                    (Some(h), None) => h.count,
                    (Some(h), Some(w)) => {
                        h.count_within(now, *w, set.filters.get(*filter).and_then(|f| f.width))
                    }
                };
                count.matches(n)
            }
            Compiled::Audience(name) => members.contains(name),
            Compiled::Sequence { steps, within } => {
                let empty = Vec::new();
                let times: Vec<&[i64]> = steps
                    .iter()
                    .map(|f| {
                        self.history(set, *f)
                            .map_or(empty.as_slice(), |h| h.times.as_slice())
                    })
                    .collect();
                sequence_holds(&times, *within)
            }
        }
    }

    /// Memberships at `now`, every audience in topological order.
    fn evaluate(&self, set: &AudienceSet, now: i64) -> BTreeSet<String> {
        let mut members = BTreeSet::new();
        for name in &set.order {
            if let Some(a) = set.audiences.get(name) {
                if self.holds(set, &a.condition, now, &members) {
                    members.insert(name.clone());
                }
            }
        }
        members
    }

    /// The earliest time after `now` at which a windowed event condition can
    /// change: when its oldest event in the window ages out.
    fn next_change(&self, set: &AudienceSet, now: i64) -> Option<i64> {
        set.windows
            .iter()
            .filter_map(|(filter, w)| {
                let h = self.history(set, *filter)?;
                h.next_expiry(now, *w, set.filters.get(*filter).and_then(|f| f.width))
            })
            .min()
    }
}

/// Whether events happened in the order of `steps` (each step's times
/// sorted), strictly increasing in time, with the last at most `within`
/// after the first. For each first-step time the earliest continuation is
/// the best one, so a greedy scan is exact.
fn sequence_holds(steps: &[&[i64]], within: Option<i64>) -> bool {
    let Some((first, rest)) = steps.split_first() else {
        return false;
    };
    for &start in first.iter() {
        let mut at = start;
        for times in rest {
            match times.get(times.partition_point(|t| *t <= at)) {
                Some(&t) => at = t,
                // No continuation now; a later start cannot have one either.
                None => return false,
            }
        }
        if within.is_none_or(|w| at.saturating_sub(start) <= w) {
            return true;
        }
    }
    false
}

// ---------------------------------------------------------------------------
// Operator
// ---------------------------------------------------------------------------

/// The audiences operator of one task.
pub struct AudiencesOperator {
    set: Arc<AudienceSet>,
}

/// What caused an evaluation, for the changes it emits.
struct Trigger {
    cause: Cause,
    event_time: i64,
}

impl AudiencesOperator {
    pub fn new(set: Arc<AudienceSet>) -> Self {
        AudiencesOperator { set }
    }

    fn load(&self, ctx: &Context<'_>, id: &str) -> Result<Option<AudienceProfile>, OperatorError> {
        Ok(ctx.get_json(&profile_key(id))?)
    }

    fn change(
        &self,
        ctx: &Context<'_>,
        id: &str,
        profile: &AudienceProfile,
        audience: &str,
        action: AudienceAction,
        trigger: &Trigger,
    ) -> AudienceChange {
        let traits = self
            .set
            .audiences
            .get(audience)
            .map(|a| {
                a.traits
                    .iter()
                    .filter_map(|t| profile.traits.get(t).map(|v| (t.clone(), v.clone())))
                    .collect()
            })
            .unwrap_or_default();
        AudienceChange {
            kind: "audience_change".to_owned(),
            audience: audience.to_owned(),
            action,
            profile_id: id.to_owned(),
            identifiers: profile.identifiers.clone(),
            traits,
            event_time: messages::rfc3339_ms(trigger.event_time),
            emitted_at: messages::rfc3339_ms(ctx.processing_time()),
            cause: trigger.cause.clone(),
        }
    }

    /// Prune, re-evaluate at the profile's clock, emit the changes in
    /// evaluation order, reschedule the timer and store the profile.
    fn settle(
        &self,
        ctx: &mut Context<'_>,
        id: &str,
        mut profile: AudienceProfile,
        trigger: &Trigger,
    ) -> Result<(), OperatorError> {
        profile.prune(&self.set);
        let now = profile.clock;
        let members = profile.evaluate(&self.set, now);
        let mut changes = Vec::new();
        for name in &self.set.order {
            let action = match (profile.members.contains(name), members.contains(name)) {
                (false, true) => AudienceAction::Entered,
                (true, false) => AudienceAction::Exited,
                _ => continue,
            };
            changes.push(self.change(ctx, id, &profile, name, action, trigger));
        }
        profile.members = members;
        let next = profile.next_change(&self.set, now);
        reschedule(ctx, id, &mut profile.timer, next);
        ctx.put_json(&profile_key(id), &profile)?;
        for change in &changes {
            emit_json(ctx, outputs::NEXT, id, change)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn on_update(
        &self,
        ctx: &mut Context<'_>,
        profile_id: String,
        identifiers: Identifiers,
        event: Option<Value>,
        traits: BTreeMap<String, Value>,
        event_time: i64,
        record_time: Option<i64>,
        cause: Cause,
    ) -> Result<(), OperatorError> {
        if let Some(survivor) = redirect_of(ctx, &profile_id)? {
            let forwarded = ProfileUpdate::Update {
                profile_id: survivor.clone(),
                identifiers,
                event,
                traits,
                event_time,
                time_corrected_from: None,
                cause,
            };
            return emit_json(ctx, outputs::SELF, &survivor, &forwarded);
        }
        // Traits bounded the event time already; bound it again against
        // this stage's stream time for producers that write here directly.
        let event_time = self
            .set
            .event_time
            .bound(event_time, ctx.now(), record_time)?
            .time;
        let mut profile = self.load(ctx, &profile_id)?.unwrap_or_default();
        profile.clock = profile.clock.max(ctx.now()).max(event_time);
        // Identifiers only grow: a record from a partition that has not
        // seen the latest link must not take identifiers away.
        profile.identifiers = union_identifiers(&profile.identifiers, &identifiers);
        for (name, value) in traits {
            if value.is_null() {
                profile.traits.remove(&name);
            } else {
                profile.traits.insert(name, value);
            }
        }
        if let Some(event) = &event {
            profile.record_event(&self.set, event, event_time);
        }
        self.settle(ctx, &profile_id, profile, &Trigger { cause, event_time })
    }

    fn on_merged(
        &self,
        ctx: &mut Context<'_>,
        from: String,
        into: String,
        identifiers: Identifiers,
        cause: Cause,
    ) -> Result<(), OperatorError> {
        let Some(mut profile) = self.load(ctx, &from)? else {
            ctx.put(&redirect_key(&from), into.as_bytes().to_vec());
            return Ok(());
        };
        let trigger = Trigger {
            cause: cause.clone(),
            event_time: profile.clock.max(ctx.now()),
        };
        // The merged-away profile leaves every audience it was in.
        let exits: Vec<AudienceChange> = self
            .set
            .order
            .iter()
            .filter(|name| profile.members.contains(*name))
            .map(|name| self.change(ctx, &from, &profile, name, AudienceAction::Exited, &trigger))
            .collect();
        if let Some(at) = profile.timer.take() {
            ctx.cancel_timer(at, from.as_bytes());
        }
        profile.members.clear();
        // The merged profile's identifiers (every one the survivor has
        // after the merge) travel with the state, so a membership the
        // transfer completes names them all, even if the merging event's
        // own update reaches the survivor later.
        profile.identifiers = union_identifiers(&profile.identifiers, &identifiers);
        let transfer = ProfileUpdate::Transfer {
            stage: STAGE.to_owned(),
            from: from.clone(),
            into: into.clone(),
            state: to_json_value(&profile)?,
            cause,
        };
        ctx.delete(&profile_key(&from));
        ctx.put(&redirect_key(&from), into.as_bytes().to_vec());
        for change in &exits {
            emit_json(ctx, outputs::NEXT, &from, change)?;
        }
        emit_json(ctx, outputs::SELF, &into, &transfer)
    }

    fn on_transfer(
        &self,
        ctx: &mut Context<'_>,
        from: String,
        into: String,
        state: Value,
        cause: Cause,
    ) -> Result<(), OperatorError> {
        let incoming: AudienceProfile = serde_json::from_value(state.clone()).map_err(|e| {
            OperatorError::rejected(
                "invalid_transfer",
                json!({"from": from, "into": into, "error": e.to_string()}),
            )
        })?;
        if let Some(survivor) = redirect_of(ctx, &into)? {
            let forwarded = ProfileUpdate::Transfer {
                stage: STAGE.to_owned(),
                from,
                into: survivor.clone(),
                state,
                cause,
            };
            return emit_json(ctx, outputs::SELF, &survivor, &forwarded);
        }
        let mut profile = self.load(ctx, &into)?.unwrap_or_default();
        profile.merge(incoming);
        profile.clock = profile.clock.max(ctx.now());
        let trigger = Trigger {
            cause,
            event_time: profile.clock,
        };
        self.settle(ctx, &into, profile, &trigger)
    }
}

impl Operator for AudiencesOperator {
    fn process(&mut self, record: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let input: ProfileUpdate = serde_json::from_slice(record.value).map_err(|e| {
            OperatorError::rejected("invalid_record", json!({"error": e.to_string()}))
        })?;
        match input {
            ProfileUpdate::Update {
                profile_id,
                identifiers,
                event,
                traits,
                event_time,
                cause,
                ..
            } => {
                if profile_id.is_empty() {
                    return Err(OperatorError::rejected(
                        "invalid_record",
                        json!({"error": "empty profile_id"}),
                    ));
                }
                self.on_update(
                    ctx,
                    profile_id,
                    identifiers,
                    event,
                    traits,
                    event_time,
                    record.timestamp_ms,
                    cause,
                )
            }
            ProfileUpdate::Merged {
                from,
                into,
                identifiers,
                cause,
            } => {
                if from.is_empty() || into.is_empty() || from == into {
                    return Err(OperatorError::rejected(
                        "invalid_merge",
                        json!({"from": from, "into": into, "error": "a merge needs two different profile ids"}),
                    ));
                }
                self.on_merged(ctx, from, into, identifiers, cause)
            }
            ProfileUpdate::Transfer {
                stage,
                from,
                into,
                state,
                cause,
            } => {
                if stage != STAGE {
                    return Ok(());
                }
                self.on_transfer(ctx, from, into, state, cause)
            }
        }
    }

    fn on_timer(&mut self, key: &[u8], ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let Ok(id) = std::str::from_utf8(key) else {
            return Ok(());
        };
        let Some(mut profile) = self.load(ctx, id)? else {
            return Ok(());
        };
        // The runtime removed the timer that fired.
        profile.timer = None;
        let now = ctx.now();
        profile.clock = profile.clock.max(now);
        let trigger = Trigger {
            cause: Cause {
                message_id: None,
                tick: Some(now),
            },
            event_time: now,
        };
        self.settle(ctx, id, profile, &trigger)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use cdp_pipeline::operator::{Emitted, OperatorHarness};
    use proptest::prelude::*;

    use super::*;
    use crate::messages::rfc3339_ms;

    type TestResult = Result<(), Box<dyn Error>>;
    const DAY: i64 = 86_400_000;
    const HOUR: i64 = 3_600_000;

    const DESIGN_AUDIENCES: &str = r#"
big_spenders:
  where:
    all:
      - {trait: revenue_total, gte: 500}
      - {event: Order Completed, count: {gte: 2}, within: 30d,
         where: [{property: properties.revenue, gt: 100}]}
lapsing:
  where:
    all:
      - {audience: big_spenders}
      - {not: {event: Order Completed, within: 14d}}
browsed_then_bought:
  where: {sequence: [{event: Product Viewed}, {event: Order Completed}], within: 1d}
"#;

    fn defs(yaml: &str) -> Result<BTreeMap<String, AudienceDef>, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }

    fn harness(yaml: &str) -> Result<OperatorHarness<AudiencesOperator>, Box<dyn Error>> {
        let set = AudienceSet::new(&defs(yaml)?, &KnownNames::anything())?;
        Ok(OperatorHarness::new(AudiencesOperator::new(Arc::new(set))))
    }

    fn update(
        id: &str,
        event: Option<(&str, Value)>,
        traits: Value,
        t: i64,
    ) -> Result<Vec<u8>, Box<dyn Error>> {
        let traits: BTreeMap<String, Value> = serde_json::from_value(traits)?;
        let mut identifiers = Identifiers::new();
        identifiers.insert("user_id".into(), vec![format!("u_{id}")]);
        let record = ProfileUpdate::Update {
            profile_id: id.into(),
            identifiers,
            event: event
                .map(|(name, props)| json!({"type": "track", "event": name, "properties": props})),
            traits,
            event_time: t,
            time_corrected_from: None,
            cause: Cause {
                message_id: Some(format!("m{t}")),
                tick: None,
            },
        };
        Ok(serde_json::to_vec(&record)?)
    }

    fn send(
        h: &mut OperatorHarness<AudiencesOperator>,
        id: &str,
        event: Option<(&str, Value)>,
        traits: Value,
        t: i64,
    ) -> Result<Vec<AudienceChange>, Box<dyn Error>> {
        let bytes = update(id, event, traits, t)?;
        let out = h.process(Some(id.as_bytes()), &bytes, &[])?;
        Ok(changes(&out)?)
    }

    fn changes(out: &[Emitted]) -> Result<Vec<AudienceChange>, serde_json::Error> {
        out.iter()
            .filter(|e| e.output == outputs::NEXT)
            .map(|e| serde_json::from_slice(&e.value))
            .collect()
    }

    fn summary(changes: &[AudienceChange]) -> Vec<(String, AudienceAction)> {
        changes
            .iter()
            .map(|c| (c.audience.clone(), c.action))
            .collect()
    }

    fn entered(name: &str) -> (String, AudienceAction) {
        (name.to_owned(), AudienceAction::Entered)
    }

    fn exited(name: &str) -> (String, AudienceAction) {
        (name.to_owned(), AudienceAction::Exited)
    }

    #[test]
    fn the_design_audiences_load_in_dependency_order() -> TestResult {
        let set = AudienceSet::new(&defs(DESIGN_AUDIENCES)?, &KnownNames::anything())?;
        let order = set.order();
        let pos = |n: &str| order.iter().position(|o| o == n);
        assert!(pos("big_spenders") < pos("lapsing"));
        assert_eq!(order.len(), 3);
        let lapsing = set.audiences.get("lapsing").ok_or("no lapsing")?;
        assert!(
            lapsing.traits.contains("revenue_total"),
            "traits flow through audience refs"
        );
        // Both event conditions on Order Completed without `where` share one
        // filter; the one with `where` has its own.
        assert_eq!(set.filters.len(), 3);
        Ok(())
    }

    /// `not … within 14d` must not turn true because one update carries a
    /// time a year ahead of the stream.
    #[test]
    fn a_future_dated_update_does_not_age_out_recent_events() -> TestResult {
        let mut h = harness(
            "quiet: {where: {not: {event: Order Completed, within: 14d}}}\n\
             active: {where: {event: Order Completed, within: 14d}}",
        )?;
        h.tick(100 * DAY)?;
        let c = send(
            &mut h,
            "p",
            Some(("Order Completed", json!({}))),
            json!({}),
            100 * DAY,
        )?;
        assert_eq!(summary(&c), vec![entered("active")]);
        let c = send(
            &mut h,
            "p",
            Some(("Page Viewed", json!({}))),
            json!({}),
            465 * DAY,
        )?;
        assert!(c.is_empty(), "no change: {:?}", summary(&c));
        // The order's bucket (14d / 30 wide) has left the window by day 115.
        let c = h.tick(115 * DAY)?;
        assert_eq!(
            summary(&changes(&c)?),
            vec![exited("active"), entered("quiet")]
        );
        Ok(())
    }

    /// A bot's events keep at most 31 buckets per windowed filter, not one
    /// time per event, and windowed counts stay right.
    #[test]
    fn windowed_event_history_is_kept_in_buckets() -> TestResult {
        let mut h = harness("busy: {where: {event: A, count: {gte: 3000}, within: 1d}}")?;
        h.tick(DAY)?;
        let mut entered_at = None;
        for i in 0..5_000i64 {
            let t = DAY + i * 20_000;
            let c = send(&mut h, "p", Some(("A", json!({}))), json!({}), t)?;
            if !c.is_empty() && entered_at.is_none() {
                entered_at = Some(i);
            }
        }
        // 3000 events 20 s apart span 16.7 hours: in the window.
        assert_eq!(entered_at, Some(2_999));
        let stored = h
            .state
            .map
            .get(profile_key("p").as_slice())
            .ok_or("no profile")?;
        let profile: AudienceProfile = serde_json::from_slice(stored)?;
        let history = profile.events.values().next().ok_or("no history")?;
        assert!(history.times.is_empty());
        assert!(
            history.buckets.len() <= 31,
            "{} buckets",
            history.buckets.len()
        );
        assert!(stored.len() < 2048, "{} bytes", stored.len());
        Ok(())
    }

    #[test]
    fn big_spenders_and_lapsing_follow_events_and_time() -> TestResult {
        let mut h = harness(DESIGN_AUDIENCES)?;
        let order = |rev: i64| Some(("Order Completed", json!({"revenue": rev})));
        assert!(send(&mut h, "p", order(150), json!({"revenue_total": 150}), DAY)?.is_empty());
        let c = send(
            &mut h,
            "p",
            order(450),
            json!({"revenue_total": 600}),
            2 * DAY,
        )?;
        assert_eq!(summary(&c), vec![entered("big_spenders")]);
        let change = &c[0];
        assert_eq!(change.kind, "audience_change");
        assert_eq!(change.profile_id, "p");
        assert_eq!(
            change.traits,
            BTreeMap::from([("revenue_total".to_string(), json!(600))])
        );
        assert_eq!(change.event_time, rfc3339_ms(2 * DAY));
        assert_eq!(
            change.cause.message_id.as_deref(),
            Some(format!("m{}", 2 * DAY).as_str())
        );
        assert_eq!(
            change.identifiers.get("user_id"),
            Some(&vec!["u_p".to_string()])
        );

        // 14 days after the last order the big spender is lapsing, by time alone.
        h.tick(10 * DAY)?;
        assert!(changes(&h.tick(16 * DAY - 1)?)?.is_empty());
        let c = changes(&h.tick(16 * DAY)?)?;
        assert_eq!(summary(&c), vec![entered("lapsing")]);
        assert_eq!(c[0].cause.tick, Some(16 * DAY));
        assert_eq!(c[0].event_time, rfc3339_ms(16 * DAY));
        // The first order's bucket (day 1: a 30d window keeps buckets of a
        // day) leaves the window when its last instant does, at day 32 less
        // 1 ms: both exit.
        assert!(changes(&h.tick(32 * DAY - 2)?)?.is_empty());
        let c = changes(&h.tick(32 * DAY - 1)?)?;
        assert_eq!(summary(&c), vec![exited("big_spenders"), exited("lapsing")]);
        assert!(changes(&h.tick(400 * DAY)?)?.is_empty());
        Ok(())
    }

    #[test]
    fn a_sequence_needs_the_order_and_the_gap() -> TestResult {
        let mut h = harness(DESIGN_AUDIENCES)?;
        let viewed = Some(("Product Viewed", json!({})));
        let bought = Some(("Order Completed", json!({"revenue": 5})));
        // Bought before viewing: no.
        assert!(send(&mut h, "a", bought.clone(), json!({}), DAY)?.is_empty());
        assert!(send(&mut h, "a", viewed.clone(), json!({}), DAY + HOUR)?.is_empty());
        // Bought two days after viewing: no.
        assert!(send(&mut h, "a", bought.clone(), json!({}), 3 * DAY + 2 * HOUR)?.is_empty());
        // A late view, 2 hours before that purchase: yes, by event time.
        let c = send(&mut h, "a", viewed, json!({}), 3 * DAY)?;
        assert_eq!(summary(&c), vec![entered("browsed_then_bought")]);
        // It stays: nothing expires a sequence.
        assert!(changes(&h.tick(100 * DAY)?)?.is_empty());
        Ok(())
    }

    #[test]
    fn a_merge_exits_the_merged_profile_and_the_survivor_enters() -> TestResult {
        let mut h = harness(DESIGN_AUDIENCES)?;
        let order = |rev: i64| Some(("Order Completed", json!({"revenue": rev})));
        send(&mut h, "a", order(200), json!({"revenue_total": 200}), DAY)?;
        send(
            &mut h,
            "a",
            order(200),
            json!({"revenue_total": 400}),
            DAY + 1,
        )?;
        assert!(send(
            &mut h,
            "b",
            order(300),
            json!({"revenue_total": 700}),
            2 * DAY
        )?
        .is_empty());
        let c = send(&mut h, "a", None, json!({"revenue_total": 500}), 2 * DAY)?;
        assert_eq!(summary(&c), vec![entered("big_spenders")]);

        // Identity names every identifier of the merged profile, including
        // one (the email) whose own update has not reached `b` yet.
        let merged_ids = Identifiers::from([("email".to_string(), vec!["ab@x.com".to_string()])]);
        let merged = serde_json::to_vec(&ProfileUpdate::Merged {
            from: "a".into(),
            into: "b".into(),
            identifiers: merged_ids,
            cause: Cause {
                message_id: Some("m-merge".into()),
                tick: None,
            },
        })?;
        let out = h.process(Some(b"a"), &merged, &[])?;
        let c = changes(&out)?;
        assert_eq!(summary(&c), vec![exited("big_spenders")]);
        assert_eq!(c[0].profile_id, "a");
        assert_eq!(c[0].cause.message_id.as_deref(), Some("m-merge"));
        let transfer = out
            .iter()
            .find(|e| e.output == outputs::SELF)
            .ok_or("no transfer")?;
        assert_eq!(transfer.key.as_deref(), Some(b"b".as_slice()));

        // The survivor keeps its own revenue_total (700) and now has 3 orders.
        let value = transfer.value.clone();
        let c = changes(&h.process(Some(b"b"), &value, &[])?)?;
        assert_eq!(summary(&c), vec![entered("big_spenders")]);
        assert_eq!(c[0].profile_id, "b");
        assert_eq!(c[0].traits.get("revenue_total"), Some(&json!(700)));
        assert_eq!(c[0].identifiers.get("user_id").map(Vec::len), Some(2));
        assert_eq!(
            c[0].identifiers.get("email"),
            Some(&vec!["ab@x.com".to_string()]),
            "the change names every identifier of the merged profile"
        );

        // A late update for `a` is forwarded to `b`.
        let bytes = update("a", order(1), json!({}), 3 * DAY)?;
        let out = h.process(Some(b"a"), &bytes, &[])?;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].output, outputs::SELF);
        match serde_json::from_slice::<ProfileUpdate>(&out[0].value)? {
            ProfileUpdate::Update { profile_id, .. } => assert_eq!(profile_id, "b"),
            other => return Err(format!("unexpected {other:?}").into()),
        }
        Ok(())
    }

    #[test]
    fn cycles_and_unknown_audiences_are_rejected_with_a_path() -> TestResult {
        let cyclic = defs(
            "a: {where: {all: [{trait: x, exists: true}, {audience: b}]}}\n\
             b: {where: {not: {audience: a}}}\n\
             c: {where: {audience: a}}",
        )?;
        let err = AudienceSet::new(&cyclic, &KnownNames::anything())
            .err()
            .ok_or("expected an error")?;
        assert_eq!(err.to_string(), "audiences.a: cycle a -> b -> a");
        let own = defs("s: {where: {any: [{audience: s}]}}")?;
        let err = AudienceSet::new(&own, &KnownNames::anything())
            .err()
            .ok_or("expected an error")?;
        assert_eq!(err.to_string(), "audiences.s: cycle s -> s");
        let unknown = defs("x: {where: {all: [{trait: t, gt: 1}, {any: [{audience: nope}]}]}}")?;
        let err = AudienceSet::new(&unknown, &KnownNames::anything())
            .err()
            .ok_or("expected an error")?;
        assert_eq!(err.path, "audiences.x.where.all[1].any[0].audience");
        assert_eq!(err.message, "unknown audience \"nope\"");
        let zero = defs("z: {where: {event: E, within: 0d}}")?;
        let err = AudienceSet::new(&zero, &KnownNames::anything())
            .err()
            .ok_or("expected an error")?;
        assert_eq!(err.path, "audiences.z.where.within");
        Ok(())
    }

    #[test]
    fn condition_parse_errors_carry_the_serde_path() -> TestResult {
        let path_of = |yaml: &str| -> Result<String, Box<dyn Error>> {
            let de = serde_yaml::Deserializer::from_str(yaml);
            match serde_path_to_error::deserialize::<_, BTreeMap<String, AudienceDef>>(de) {
                Err(e) => Ok(e.to_string()),
                Ok(_) => Err(format!("expected an error for {yaml}").into()),
            }
        };
        let e = path_of("vip: {where: {all: [{trait: t, gt: 1}, {event: E, count: 2}]}}")?;
        assert!(e.starts_with("vip.where.all[1].count: "), "{e}");
        assert!(e.contains("expected a map like {gte: 2}"), "{e}");
        let e = path_of("vip: {where: {all: [{event: E, count: {atleast: 2}}]}}")?;
        assert!(e.starts_with("vip.where.all[0].count"), "{e}");
        let e = path_of("vip: {where: {not: {event: E, within: 2w}}}")?;
        assert!(e.starts_with("vip.where.not.within: "), "{e}");
        let e = path_of("vip: {where: {event: E, where: [{property: p, gt: {}}]}}")?;
        assert!(e.starts_with("vip.where.where[0]"), "{e}");
        for bad in [
            "vip: {where: {trait: t}}",
            "vip: {where: {trait: t, gt: 1, lt: 3}}",
            "vip: {where: {trait: t, event: E}}",
            "vip: {where: {audience: a, within: 1d}}",
            "vip: {where: {sequence: [{event: A, count: {gte: 1}}]}}",
            "vip: {where: {}}",
            "vip: {where: {frobnicate: 1}}",
            "vip: {where: {trait: t, gt: 1}, name: x}",
        ] {
            let e = path_of(bad)?;
            assert!(e.starts_with("vip"), "{bad}: {e}");
        }
        Ok(())
    }

    #[test]
    fn malformed_updates_are_rejected_before_any_state_write() -> TestResult {
        let mut h = harness(DESIGN_AUDIENCES)?;
        for bad in [
            b"{".to_vec(),
            serde_json::to_vec(&json!({"type": "update", "profile_id": "p"}))?,
            serde_json::to_vec(
                &json!({"type": "transfer", "stage": "audiences", "from": "a", "into": "b",
                                        "state": {"events": 5}, "cause": {}}),
            )?,
        ] {
            match h.process(Some(b"p"), &bad, &[]) {
                Err(OperatorError::Rejected { .. }) => {}
                other => return Err(format!("expected a rejection, got {other:?}").into()),
            }
        }
        assert!(h.state.map.is_empty());
        // Another stage's transfer is not ours.
        let other = serde_json::to_vec(
            &json!({"type": "transfer", "stage": "traits", "from": "a", "into": "b",
                                                "state": {}, "cause": {}}),
        )?;
        assert!(h.process(Some(b"b"), &other, &[])?.is_empty());
        Ok(())
    }

    #[test]
    fn sequence_scan_is_exact_on_small_cases() {
        let a = [1, 5, 9];
        let b = [3, 6];
        assert!(sequence_holds(&[&a, &b], Some(1)));
        assert!(!sequence_holds(&[&a, &b], Some(0)));
        assert!(sequence_holds(&[&a, &b], None));
        // B then A then B: 3 -> 5 -> 6 (gap 3); starting at 6 nothing follows.
        assert!(sequence_holds(&[&b, &a, &b], Some(3)));
        assert!(!sequence_holds(&[&b, &a, &b], Some(2)));
        assert!(
            !sequence_holds(&[&a, &a], Some(0)),
            "strictly increasing times"
        );
        assert!(!sequence_holds(&[], None));
    }

    // -- property test: incremental == batch ------------------------------

    const PROP_AUDIENCES: &str = r#"
rich: {where: {trait: score, gte: 5}}
active: {where: {event: A, within: 10ms}}
frequent: {where: {event: A, count: {gte: 2}, within: 20ms, where: [{property: properties.v, gt: 1}]}}
ever_b: {where: {event: B, count: {gte: 2}}}
never_c: {where: {not: {event: C}}}
active_or_rich: {where: {any: [{audience: rich}, {audience: active}]}}
lapsed: {where: {all: [{audience: active_or_rich}, {not: {event: B, within: 15ms}}]}}
few_recent_a: {where: {event: A, count: {lte: 1}, within: 7ms}}
seq: {where: {sequence: [{event: A}, {event: B, where: [{property: properties.v, lte: 2}]}], within: 5ms}}
seq_open: {where: {sequence: [{event: B}, {event: A}, {event: B}]}}
plan: {where: {not: {trait: plan, in: [pro, team]}}}
"#;

    #[derive(Debug, Clone)]
    enum Op {
        Tick(i64),
        Update {
            traits: Vec<(&'static str, Value)>,
            event: Option<(&'static str, i64)>,
            offset: i64,
        },
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let trait_value = prop_oneof![
            Just(("score", Value::Null)),
            (0i64..10).prop_map(|n| ("score", json!(n))),
            prop::sample::select(vec!["free", "pro", "team"]).prop_map(|p| ("plan", json!(p))),
            Just(("plan", Value::Null)),
        ];
        prop_oneof![
            (0i64..8).prop_map(Op::Tick),
            (
                prop::collection::vec(trait_value, 0..3),
                prop::option::of((prop::sample::select(vec!["A", "B", "C"]), 0i64..4)),
                -12i64..4,
            )
                .prop_map(|(traits, event, offset)| Op::Update {
                    traits,
                    event,
                    offset
                }),
        ]
    }

    /// Batch evaluation of a raw condition over the whole history.
    fn batch_holds(
        c: &Condition,
        defs: &BTreeMap<String, AudienceDef>,
        traits: &BTreeMap<String, Value>,
        events: &[(Value, i64)],
        now: i64,
    ) -> bool {
        let matching = |name: &str, conds: &[PropertyCondition]| -> Vec<i64> {
            events
                .iter()
                .filter(|(e, _)| {
                    messages::event_name(e) == Some(name)
                        && conds.iter().all(|c| c.matches_event(e))
                })
                .map(|(_, t)| *t)
                .collect()
        };
        match c {
            Condition::All(cs) => cs.iter().all(|c| batch_holds(c, defs, traits, events, now)),
            Condition::Any(cs) => cs.iter().any(|c| batch_holds(c, defs, traits, events, now)),
            Condition::Not(c) => !batch_holds(c, defs, traits, events, now),
            Condition::Trait(t) => t.op.matches(traits.get(&t.name)),
            Condition::Event(e) => {
                let n = matching(&e.event, &e.r#where)
                    .into_iter()
                    .filter(|t| e.within.is_none_or(|w| *t > now - w.millis()))
                    .count() as u64;
                match e.count {
                    Some(c) => c.matches(n),
                    None => n >= 1,
                }
            }
            Condition::Audience(name) => defs
                .get(name)
                .is_some_and(|d| batch_holds(&d.r#where, defs, traits, events, now)),
            Condition::Sequence(s) => {
                let steps: Vec<Vec<i64>> = s
                    .steps
                    .iter()
                    .map(|st| matching(&st.event, &st.r#where))
                    .collect();
                fn chain(steps: &[Vec<i64>], after: i64, start: i64, within: Option<i64>) -> bool {
                    match steps.split_first() {
                        None => within.is_none_or(|w| after - start <= w),
                        Some((times, rest)) => times
                            .iter()
                            .filter(|t| **t > after)
                            .any(|t| chain(rest, *t, start, within)),
                    }
                }
                let within = s.within.map(|w| w.millis());
                match steps.split_first() {
                    None => false,
                    Some((first, rest)) => first.iter().any(|t| chain(rest, *t, *t, within)),
                }
            }
        }
    }

    proptest! {
        #[test]
        fn incremental_membership_equals_batch_recomputation(ops in prop::collection::vec(arb_op(), 0..40)) {
            let fail = |e: Box<dyn Error>| TestCaseError::fail(e.to_string());
            let all = defs(PROP_AUDIENCES).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut h = harness(PROP_AUDIENCES).map_err(fail)?;
            let mut now = 100i64;
            h.tick(now).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut traits = BTreeMap::new();
            let mut events = Vec::new();
            let mut last_time = now;
            let mut members = BTreeSet::new();
            let mut exists = false;
            for op in &ops {
                let out = match op {
                    Op::Tick(dt) => {
                        now += dt;
                        h.tick(now).map_err(|e| TestCaseError::fail(e.to_string()))?
                    }
                    Op::Update { traits: t, event, offset } => {
                        let time = now + offset;
                        last_time = last_time.max(time);
                        let mut map = serde_json::Map::new();
                        for (k, v) in t {
                            map.insert((*k).to_string(), v.clone());
                            if v.is_null() { traits.remove(*k); } else { traits.insert((*k).to_string(), v.clone()); }
                        }
                        let ev = event.map(|(name, v)| (name, json!({"v": v})));
                        if let Some((name, props)) = &ev {
                            events.push((json!({"type": "track", "event": name, "properties": props}), time));
                        }
                        let bytes = update("p", ev, Value::Object(map), time).map_err(fail)?;
                        h.process(Some(b"p"), &bytes, &[]).map_err(|e| TestCaseError::fail(e.to_string()))?
                    }
                };
                for c in changes(&out).map_err(|e| TestCaseError::fail(e.to_string()))? {
                    match c.action {
                        AudienceAction::Entered => prop_assert!(members.insert(c.audience.clone()), "entered twice"),
                        AudienceAction::Exited => prop_assert!(members.remove(&c.audience), "exited while out"),
                    }
                }
                // After every record, not only at the end: the change
                // stream so far replays into the batch memberships. A
                // profile exists for this stage from its first update on.
                exists |= matches!(op, Op::Update { .. });
                let at = now.max(last_time);
                let expected: BTreeSet<String> = all
                    .iter()
                    .filter(|(_, d)| exists && batch_holds(&d.r#where, &all, &traits, &events, at))
                    .map(|(n, _)| n.clone())
                    .collect();
                if exists {
                    prop_assert_eq!(&members, &expected, "at {} after {:?}", at, op);
                }
            }
        }
    }
}
