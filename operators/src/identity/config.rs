//! The `identity` config section, checked and compiled into [`IdentityRules`]:
//! which identifier types count, their limits and priorities, and the values
//! that are never identifiers. Extraction of a Segment event's identifiers
//! lives here too, since it is nothing but these rules applied to the event.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::fields::{EventFields, Leaf};
use crate::config::ConfigError;
use crate::event_time::EventTimeConfig;
use crate::messages::DroppedIdentifier;

/// `(type, value)`, e.g. `("email", "a@example.com")`.
pub type Identifier = (String, String);

/// How many values of one identifier type a profile may hold, how much the
/// type counts when profiles conflict, and values of this type that are
/// never identifiers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentifierRule {
    /// Most distinct values of this type one profile may hold (at least 1).
    pub limit: usize,
    /// Strength of the type: 1 is the strongest. On a conflict the
    /// identifier with the highest number is dropped first; the profile
    /// with the strongest identifier survives a merge.
    pub priority: u32,
    /// Values of this type never used as identifiers (compared trimmed,
    /// ignoring case), on top of the global `blocked_values`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked_values: Vec<String>,
    /// Regular expressions; a value of this type matching any of them is
    /// never used, on top of the global `blocked_patterns`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked_patterns: Vec<String>,
}

impl IdentifierRule {
    pub fn new(limit: usize, priority: u32) -> Self {
        IdentifierRule {
            limit,
            priority,
            blocked_values: Vec::new(),
            blocked_patterns: Vec::new(),
        }
    }
}

/// The `identity` section of the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Identifier type → its rule. Types not listed are ignored. Known
    /// types: `user_id`, `anonymous_id`, `email`, `phone`, `device_id`;
    /// any other name matches `context.externalIds[].type`.
    #[serde(default = "default_identifiers")]
    pub identifiers: BTreeMap<String, IdentifierRule>,
    /// Values never used as identifiers, compared trimmed and ignoring case.
    #[serde(default = "default_blocked_values")]
    pub blocked_values: Vec<String>,
    /// Regular expressions; a (trimmed) value matching any of them is never
    /// used as an identifier.
    #[serde(default = "default_blocked_patterns")]
    pub blocked_patterns: Vec<String>,
    /// Most merges one profile may take part in, counted over its history
    /// (a merge of k profiles counts k - 1, plus what each had).
    #[serde(default = "default_max_merges")]
    pub max_merges: usize,
}

fn default_identifiers() -> BTreeMap<String, IdentifierRule> {
    BTreeMap::from([
        ("user_id".to_string(), IdentifierRule::new(1, 1)),
        ("email".to_string(), IdentifierRule::new(5, 2)),
        ("anonymous_id".to_string(), IdentifierRule::new(1000, 3)),
    ])
}

fn default_blocked_values() -> Vec<String> {
    ["null", "undefined", "anonymous", "0", "-1", ""]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn default_blocked_patterns() -> Vec<String> {
    vec!["^[0-]*$".to_string()]
}

const fn default_max_merges() -> usize {
    100
}

impl Default for IdentityConfig {
    /// The example of DESIGN.md.
    fn default() -> Self {
        IdentityConfig {
            identifiers: default_identifiers(),
            blocked_values: default_blocked_values(),
            blocked_patterns: default_blocked_patterns(),
            max_merges: default_max_merges(),
        }
    }
}

/// Why an identifier of an event was not used. The string form is the
/// `reason` label of `cdp_identity_dropped_identifiers_total` and the
/// `reason` of the profile's audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropReason {
    /// Not a string or a number.
    InvalidType,
    /// In `blocked_values` (global or the type's).
    BlockedValue,
    /// Matches a `blocked_patterns` entry (global or the type's).
    BlockedPattern,
    /// Longer than [`MAX_IDENTIFIER_BYTES`].
    TooLong,
    /// Attaching it would give a profile more values of its type than the
    /// type's `limit`.
    Limit,
    /// Following it would merge past `max_merges`.
    MaxMerges,
}

impl DropReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::InvalidType => "invalid_type",
            DropReason::BlockedValue => "blocked_value",
            DropReason::BlockedPattern => "blocked_pattern",
            DropReason::TooLong => "too_long",
            DropReason::Limit => "limit",
            DropReason::MaxMerges => "max_merges",
        }
    }
}

/// Longest identifier value taken (bytes, after trimming): past any real
/// id (a UUID is 36, an email at most 254), short of what would let one
/// client's values grow a profile's state record past the broker's limit
/// (1000 anonymous ids of 25 KB each stopped the stage).
pub const MAX_IDENTIFIER_BYTES: usize = 512;

/// What the audit trail keeps of a value refused as too long.
const TOO_LONG_KEPT_CHARS: usize = 64;

/// One identifier type's rule, compiled.
#[derive(Debug, Clone)]
struct TypeRule {
    limit: usize,
    priority: u32,
    blocked_values: BTreeSet<String>,
    blocked_patterns: Vec<Regex>,
}

/// The identifiers an event carries, and the ones the rules refused.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Extracted {
    pub ids: BTreeSet<Identifier>,
    pub dropped: Vec<DroppedIdentifier>,
    /// An `alias` call's `previousId`, typed later against the graph.
    pub previous_id: Option<Leaf<'static>>,
}

/// The identity config, checked and compiled.
#[derive(Debug, Clone)]
pub struct IdentityRules {
    identifiers: BTreeMap<String, TypeRule>,
    blocked_values: BTreeSet<String>,
    blocked_patterns: Vec<Regex>,
    max_merges: usize,
    event_time: EventTimeConfig,
}

fn compile_patterns(path: &str, patterns: &[String]) -> Result<Vec<Regex>, ConfigError> {
    patterns
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Regex::new(p).map_err(|e| {
                ConfigError::new(
                    format!("{path}[{i}]"),
                    format!("invalid regular expression: {e}"),
                )
            })
        })
        .collect()
}

/// `text` lowercased (`str::to_lowercase`), copied only when that changes
/// it: ASCII text without capitals is its own lowercase.
fn lowercase(text: Cow<'_, str>) -> Cow<'_, str> {
    if text.is_ascii() && !text.bytes().any(|b| b.is_ascii_uppercase()) {
        text
    } else {
        Cow::Owned(text.to_lowercase())
    }
}

/// A number as an identifier, written in decimal: `777`, `777.0` and `7.77e2`
/// are all `"777"` (as the string `"777"`); a fraction keeps its digits
/// (`12.5`). An integer beyond 2^53 that arrived as a float (JSON readers,
/// ours included, keep integers exactly only up to 64 bits) has lost its
/// last digits: `123456789012345678901` and `…902` would be one person, so
/// it is no identifier at all (`invalid_type`; send such ids as strings).
fn number_id(n: &serde_json::Number) -> Result<String, DropReason> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if n.is_i64() || n.is_u64() {
        return Ok(n.to_string());
    }
    let x = n
        .as_f64()
        .filter(|x| x.is_finite())
        .ok_or(DropReason::InvalidType)?;
    if x.fract() != 0.0 {
        return Ok(n.to_string());
    }
    if x.abs() > EXACT {
        return Err(DropReason::InvalidType);
    }
    Ok(format!("{}", x as i64))
}

fn normalized_set(values: &[String]) -> BTreeSet<String> {
    values.iter().map(|v| v.trim().to_lowercase()).collect()
}

impl IdentityRules {
    /// Check the config and compile its patterns. Errors name the path,
    /// e.g. `identity.blocked_patterns[0]: invalid regular expression: ...`.
    pub fn new(cfg: &IdentityConfig) -> Result<Self, ConfigError> {
        if cfg.identifiers.is_empty() {
            return Err(ConfigError::new(
                "identity.identifiers",
                "at least one identifier type is required",
            ));
        }
        let mut identifiers = BTreeMap::new();
        let mut by_priority: BTreeMap<u32, &str> = BTreeMap::new();
        for (kind, rule) in &cfg.identifiers {
            // A conflict drops the weakest identifier and a merge keeps the
            // strongest profile: a tie would decide by the types' names.
            if let Some(other) = by_priority.insert(rule.priority, kind) {
                return Err(ConfigError::new(
                    format!("identity.identifiers.{kind}.priority"),
                    format!(
                        "{} is also {other}'s: priorities decide which identifier a conflict drops and which profile a merge keeps, so each type needs its own",
                        rule.priority
                    ),
                ));
            }
            let path = format!("identity.identifiers.{kind}");
            // The type is the part before `:` in the `id/<type>:<value>` key.
            if kind.is_empty() || kind.contains(':') {
                return Err(ConfigError::new(
                    path,
                    "identifier type names must be non-empty and contain no \":\"",
                ));
            }
            if rule.limit == 0 {
                return Err(ConfigError::new(
                    format!("{path}.limit"),
                    "must be at least 1",
                ));
            }
            let compiled = TypeRule {
                limit: rule.limit,
                priority: rule.priority,
                blocked_values: normalized_set(&rule.blocked_values),
                blocked_patterns: compile_patterns(
                    &format!("{path}.blocked_patterns"),
                    &rule.blocked_patterns,
                )?,
            };
            identifiers.insert(kind.clone(), compiled);
        }
        Ok(IdentityRules {
            identifiers,
            blocked_values: normalized_set(&cfg.blocked_values),
            blocked_patterns: compile_patterns("identity.blocked_patterns", &cfg.blocked_patterns)?,
            max_merges: cfg.max_merges,
            event_time: EventTimeConfig::default(),
        })
    }

    /// The bound on event times ahead of the stream (`event_time`), for
    /// the times identity writes on its profile records.
    pub fn with_event_time(mut self, event_time: EventTimeConfig) -> Self {
        self.event_time = event_time;
        self
    }

    /// The time identity records for an event (`updated_at`, a merge's
    /// `at`, an audit entry), in ms, and whether it is not the event's own:
    /// the event's own time, unless it is beyond `event_time.max_future`,
    /// then the reference time, whatever the policy. Identity never
    /// refuses an event for its time: its links are real whenever the
    /// event happened, and under `dead_letter` the traits stage is the one
    /// that sets the event aside. `None` when the event has no time it
    /// can read.
    pub(super) fn recorded_time(
        &self,
        at: Option<&str>,
        stream_time: i64,
        record_time: Option<i64>,
    ) -> Option<(i64, bool)> {
        let own = at.and_then(crate::messages::parse_time_ms)?;
        let policy = EventTimeConfig {
            beyond: crate::event_time::FutureTimePolicy::Correct,
            ..self.event_time
        };
        Some(match policy.bound(own, stream_time, record_time) {
            Ok(b) if b.corrected_from.is_some() => (b.time, true),
            _ => (own, false),
        })
    }

    pub(super) fn max_merges(&self) -> usize {
        self.max_merges
    }

    pub(super) fn is_configured(&self, kind: &str) -> bool {
        self.identifiers.contains_key(kind)
    }

    /// Configured types, strongest first (then by name).
    pub(super) fn types_by_priority(&self) -> Vec<&str> {
        let mut types: Vec<(&u32, &str)> = self
            .identifiers
            .iter()
            .map(|(k, r)| (&r.priority, k.as_str()))
            .collect();
        types.sort();
        types.into_iter().map(|(_, k)| k).collect()
    }

    /// Sort key of an identifier: smaller is stronger. Types no longer
    /// configured (state from an older config) are the weakest.
    pub(super) fn strength<'a>(&self, kind: &'a str, value: &'a str) -> (u32, &'a str, &'a str) {
        let priority = self.identifiers.get(kind).map_or(u32::MAX, |r| r.priority);
        (priority, kind, value)
    }

    pub fn limit(&self, kind: &str) -> usize {
        self.identifiers.get(kind).map_or(usize::MAX, |r| r.limit)
    }

    /// The identifier value of `raw` for type `kind`, or why it is not one.
    /// Strings are trimmed, numbers written in decimal, emails lowercased.
    pub(super) fn normalize(&self, kind: &str, raw: &Leaf<'_>) -> Result<String, DropReason> {
        // Borrowed until the end: most identifiers are trimmed and
        // lowercase already, and the value and its folded form were two
        // copies (three for an email) made for every identifier.
        let value = match raw {
            Leaf::Text(s) => Cow::Borrowed(s.trim()),
            Leaf::Other(Value::Number(n)) => Cow::Owned(number_id(n)?),
            _ => return Err(DropReason::InvalidType),
        };
        if value.len() > MAX_IDENTIFIER_BYTES {
            return Err(DropReason::TooLong);
        }
        let value = if kind == "email" {
            lowercase(value)
        } else {
            value
        };
        let folded = lowercase(Cow::Borrowed(&value));
        let rule = self.identifiers.get(kind);
        if value.is_empty()
            || self.blocked_values.contains(folded.as_ref())
            || rule.is_some_and(|r| r.blocked_values.contains(folded.as_ref()))
        {
            return Err(DropReason::BlockedValue);
        }
        let patterns = self
            .blocked_patterns
            .iter()
            .chain(rule.into_iter().flat_map(|r| r.blocked_patterns.iter()));
        if patterns.into_iter().any(|p| p.is_match(&value)) {
            return Err(DropReason::BlockedPattern);
        }
        Ok(value.into_owned())
    }

    /// Add `raw` as an identifier of type `kind`, or record why not. Absent
    /// fields and `null` are no identifier at all, not a drop.
    pub(super) fn add(&self, out: &mut Extracted, kind: &str, raw: Option<&Leaf<'_>>) {
        let Some(raw) = raw.filter(|v| !v.is_null()) else {
            return;
        };
        if !self.is_configured(kind) {
            return;
        }
        match self.normalize(kind, raw) {
            Ok(value) => {
                out.ids.insert((kind.to_string(), value));
            }
            Err(reason) => {
                let mut value = raw.display();
                if reason == DropReason::TooLong {
                    // The audit trail keeps 50 entries: not 50 huge ones.
                    let bytes = value.len();
                    value = value.chars().take(TOO_LONG_KEPT_CHARS).collect();
                    value.push_str(&format!("… ({bytes} bytes)"));
                }
                out.dropped.push(DroppedIdentifier {
                    kind: kind.to_string(),
                    value,
                    reason: reason.as_str().to_string(),
                })
            }
        }
    }

    /// Every identifier of a Segment event, of the configured types, and
    /// the ones a rule refused. An `alias` call's `previousId` is left
    /// untyped in [`Extracted::previous_id`]: its type depends on the graph.
    pub fn extract(&self, event: &EventFields) -> Extracted {
        let mut out = Extracted::default();
        let kind = event.kind();
        self.add(&mut out, "user_id", event.user_id.as_ref());
        self.add(&mut out, "anonymous_id", event.anonymous_id.as_ref());
        if kind == Some("alias") {
            out.previous_id = event
                .previous_id
                .clone()
                .filter(|v| !v.is_null())
                .map(Leaf::into_owned);
        }
        if let Some(t) = event.context_traits() {
            self.add(&mut out, "email", t.email.as_ref());
            self.add(&mut out, "phone", t.phone.as_ref());
        }
        // Group traits describe the group, not the user.
        if let Some(t) = event.traits.as_ref().filter(|_| kind == Some("identify")) {
            self.add(&mut out, "email", t.email.as_ref());
            self.add(&mut out, "phone", t.phone.as_ref());
        }
        self.add(&mut out, "device_id", event.device_id());
        for item in event.external_ids() {
            if let Some(kind) = item.get("type").and_then(Value::as_str) {
                self.add(&mut out, kind, item.get("id").map(Leaf::of).as_ref());
            }
        }
        out
    }
}
