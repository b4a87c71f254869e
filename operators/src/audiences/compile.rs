//! Compiled audiences: filters, windows and the evaluation order.

use std::collections::{BTreeMap, BTreeSet};

use cdp_pipeline::Span;
use serde_json::json;

use super::config::{AudienceDef, Condition, CountCondition};
use crate::config::{ConfigError, KnownNames};
use crate::event_time::{EventTimeConfig, FutureTimePolicy};
use crate::messages::{self, EventRead};
use crate::profile_keyed::EventPaths;
use crate::traits::{bucket_width, Comparison, PropertyCondition};

/// How long a filter's event times must be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Retention {
    /// Only the all-time count is needed.
    CountOnly,
    /// Times within the longest window of a condition using the filter.
    Window(i64),
    /// The latest [`MAX_SEQUENCE_TIMES`](super::MAX_SEQUENCE_TIMES) times
    /// (sequence steps; a filter of its own, never shared with a window or
    /// a count, so those keep buckets).
    All,
}

/// An event name and property conditions; its history is shared by every
/// condition with the same filter.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct EventFilter {
    /// Canonical text of the filter: the key of its history in the state.
    pub(super) key: String,
    pub(super) event: String,
    pub(super) conditions: Vec<PropertyCondition>,
    pub(super) retention: Retention,
    /// Width of the time buckets its windowed counts are kept in: 1/30 of
    /// the shortest window using the filter (see
    /// [`crate::traits::bucket_width`]); `None` when no window uses it.
    pub(super) width: Option<i64>,
    /// For a sequence step: the key a state written before steps had
    /// histories of their own keeps its times under (the key of a count
    /// or window on the same event and conditions); made once here, not
    /// on every load (see `AudienceProfile::upgrade_sequence_steps`).
    pub(super) shared_key: Option<String>,
}

impl EventFilter {
    pub(super) fn selects<E: EventRead + ?Sized>(&self, name: Option<&str>, event: &E) -> bool {
        name == Some(self.event.as_str()) && self.conditions.iter().all(|c| c.matches_event(event))
    }
}

/// A condition with its filters resolved to indexes into `AudienceSet::filters`.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Compiled {
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
        /// Canonical text of the condition: the key of its "has held" mark.
        key: String,
        steps: Vec<usize>,
        within: Option<i64>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct CompiledAudience {
    pub(super) condition: Compiled,
    /// Traits the condition references, also through other audiences.
    pub(super) traits: BTreeSet<String>,
}

/// The audiences of the config, checked and in evaluation order.
#[derive(Debug, Clone, PartialEq)]
pub struct AudienceSet {
    /// Every audience with its name, in topological order: an audience
    /// comes after those it references. A list, not a map: evaluation
    /// walks it in this order for every update, and a map looked each name
    /// up again (string compares were ~10% of the stage's instructions).
    pub(super) audiences: Vec<(String, CompiledAudience)>,
    pub(super) filters: Vec<EventFilter>,
    /// `(filter, window)` of every windowed event condition: what timers
    /// watch.
    pub(super) windows: BTreeSet<(usize, i64)>,
    /// The bound on event times ahead of the stream.
    pub(super) event_time: EventTimeConfig,
    /// Every sequence condition: `(key, steps, within)`.
    pub(super) sequences: Vec<(String, Vec<usize>, Option<i64>)>,
    /// The paths of an event these audiences read (the rest is not
    /// parsed; the traits stage reads them too, to match events against
    /// these filters, see
    /// [`TraitSet::forwarding`](crate::traits::TraitSet::forwarding)).
    pub(crate) reads: EventPaths,
    /// A digest of `filters` (the event names and conditions, in order),
    /// never 0: an update whose event the traits stage matched against
    /// these very filters carries their indexes, not a tree to match.
    pub(super) filters_fingerprint: u64,
    /// A digest of the audiences and their filters: a task whose state was
    /// written under another re-evaluates every profile (`sweep`).
    pub(super) fingerprint: u64,
}

/// A digest of the filters an event is matched against, in order (never
/// 0). Two sets with the same digest number the same filters alike.
fn filters_fingerprint(filters: &[EventFilter]) -> u64 {
    digest(
        filters
            .iter()
            .map(|f| format!("{:?}", (&f.event, &f.conditions))),
    )
}

/// A digest of the audiences (names and compiled conditions, in order)
/// and of their filters (never 0).
fn audiences_fingerprint(audiences: &[(String, CompiledAudience)], filters: u64) -> u64 {
    digest(std::iter::once(filters.to_string()).chain(audiences.iter().map(|a| format!("{a:?}"))))
}

/// The first 8 bytes of the SHA-256 of `texts`, each length-prefixed so
/// no text can make two lists alike (never 0).
fn digest(texts: impl Iterator<Item = String>) -> u64 {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for text in texts {
        hasher.update((text.len() as u64).to_le_bytes());
        hasher.update(text.as_bytes());
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first).max(1)
}

struct Compiler {
    filters: Vec<EventFilter>,
    windows: BTreeSet<(usize, i64)>,
    sequences: Vec<(String, Vec<usize>, Option<i64>)>,
    known: KnownNames,
}

impl Compiler {
    fn filter(
        &mut self,
        event: &str,
        conditions: &[PropertyCondition],
        retention: Retention,
    ) -> Result<usize, String> {
        // Sequence steps keep exact (recent) times, windows buckets: a
        // step never shares its history with a window or a count.
        let shared = serde_json::to_string(&json!({"event": event, "where": conditions}))
            .map_err(|e| e.to_string())?;
        let (key, shared_key) = match retention {
            Retention::All => (
                serde_json::to_string(&json!({"sequence_step": event, "where": conditions}))
                    .map_err(|e| e.to_string())?,
                Some(shared),
            ),
            _ => (shared, None),
        };
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
            shared_key,
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
            for (i, c) in conds.iter().enumerate() {
                crate::config::check_event_path(&format!("{at}.where[{i}].property"), &c.property)?;
            }
            Ok(())
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
                self.known.check_comparison(path, &t.name, &t.op)?;
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
                if e.count.is_some_and(|c| !c.is_satisfiable()) {
                    return Err(ConfigError::new(
                        format!("{path}.count"),
                        "no count meets all of these comparisons: the condition would never hold",
                    ));
                }
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
                let within = within(s.within, format!("{path}.within"))?;
                let key = serde_json::to_string(&json!({"steps": steps
                    .iter()
                    .filter_map(|i| self.filters.get(*i).map(|f| f.key.as_str()))
                    .collect::<Vec<_>>(), "within": within}))
                .map_err(|e| ConfigError::new(path.to_owned(), e.to_string()))?;
                if !self.sequences.iter().any(|s| s.0 == key) {
                    self.sequences.push((key.clone(), steps.clone(), within));
                }
                Compiled::Sequence { key, steps, within }
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
            sequences: Vec::new(),
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
        let reads = EventPaths::of_conditions(compiler.filters.iter().flat_map(|f| &f.conditions));
        let audiences: Vec<_> = order
            .into_iter()
            .filter_map(|name| compiled.remove(&name).map(|a| (name, a)))
            .collect();
        let filters_fingerprint = filters_fingerprint(&compiler.filters);
        Ok(AudienceSet {
            fingerprint: audiences_fingerprint(&audiences, filters_fingerprint),
            audiences,
            windows: compiler.windows,
            event_time: EventTimeConfig::default(),
            sequences: compiler.sequences,
            filters_fingerprint,
            filters: compiler.filters,
            reads,
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

    /// The indexes of the event filters `event` passes, in order: what
    /// the traits stage sends with an update (see
    /// [`TraitSet::forwarding`](crate::traits::TraitSet::forwarding)).
    /// `event` holds at least the paths these audiences read.
    pub(crate) fn matching_filters<E: EventRead + ?Sized>(&self, event: &E) -> Vec<u32> {
        let name = messages::event_name(event);
        (0u32..)
            .zip(&self.filters)
            .filter(|(_, f)| f.selects(name, event))
            .map(|(i, _)| i)
            .collect()
    }

    /// A digest of the event filters (never 0).
    pub(crate) fn filters_fingerprint(&self) -> u64 {
        self.filters_fingerprint
    }

    /// Audience names in evaluation order.
    pub fn order(&self) -> impl Iterator<Item = &str> {
        self.audiences.iter().map(|(name, _)| name.as_str())
    }

    /// The audience named `name`.
    pub(super) fn audience(&self, name: &str) -> Option<&CompiledAudience> {
        self.audiences
            .iter()
            .find_map(|(n, a)| (n == name).then_some(a))
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
