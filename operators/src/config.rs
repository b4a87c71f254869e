//! Config pieces shared by several operators, and the error every config
//! check returns: the path of the bad field and what is wrong with it.

use serde::{Deserialize, Serialize};

use crate::traits::{Comparison, ValueKind};

/// A place events come from (`sources[]`): one write key each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Source id, carried in the `cdp-source` header of every event.
    pub id: String,
    /// The key SDKs send as the Basic-auth user name (or `writeKey`).
    pub write_key: String,
    /// Name of the tracking plan (under `tracking_plans`) to apply.
    #[serde(default)]
    pub tracking_plan: Option<String>,
    /// What sends from this write key, as Segment's source categories:
    /// for `website` and `mobile` sources the collector fills
    /// `context.ip` from the request when an event has none (Segment does
    /// so for client-side libraries); `server` sources are left as sent.
    #[serde(default)]
    pub kind: SourceKind,
}

/// Segment's source categories.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// A backend: the request's address is the server's, not the user's.
    #[default]
    Server,
    /// A browser (analytics.js): the request comes from the user's device.
    Website,
    /// An app (analytics-ios, analytics-android, …): likewise.
    Mobile,
}

impl SourceKind {
    /// Whether its requests come from the user's own device.
    pub fn is_client_side(self) -> bool {
        !matches!(self, SourceKind::Server)
    }
}

/// A config value that parsed but makes no sense, with the path to it,
/// e.g. `audiences.vip.where.all[1].trait: unknown trait "ltv"`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Top-level fields of a Segment event besides those the validate stage
/// reads (`TOP_LEVEL_PARSED`, `TOP_LEVEL_SHAPED`): a property path starts
/// with one.
const OTHER_EVENT_FIELDS: &[&str] = &["category", "channel", "version"];

/// `Err` at `path` when the dotted event path `property` is empty or does
/// not start at a field a Segment event has: `revenue` is no field of an
/// event, `properties.revenue` is (a condition on it would silently never
/// hold).
pub fn check_event_path(path: &str, property: &str) -> Result<(), ConfigError> {
    if property.is_empty() {
        return Err(ConfigError::new(path, "must not be empty"));
    }
    let (root, rest) = property.split_once('.').unwrap_or((property, ""));
    let fields = || {
        crate::validate::TOP_LEVEL_PARSED
            .iter()
            .chain(&crate::validate::TOP_LEVEL_SHAPED)
            .chain(OTHER_EVENT_FIELDS)
    };
    if fields().any(|f| *f == root) {
        return Ok(());
    }
    // A misspelt field (`propertes.revenue`): name the field it is close to.
    let near = fields()
        .filter(|f| f.len() > 3 && strsim::damerau_levenshtein(f, root) <= 2)
        .min_by_key(|f| strsim::damerau_levenshtein(f, root));
    let hint = match near {
        Some(field) if !rest.is_empty() => format!("did you mean {field}.{rest}?"),
        Some(field) => format!("did you mean {field}?"),
        None => format!(
            "paths start at the event: properties.{property}, traits.{property}, context.{property}, event, …"
        ),
    };
    Err(ConfigError::new(
        path,
        format!("{property:?} is no field of a Segment event ({hint})"),
    ))
}

/// The trait and event names conditions may refer to, so a typo is an
/// error at load (`audiences.vip.where.all[1].trait: unknown trait "ltv"`)
/// rather than a condition that silently never holds. `None`: any name may
/// occur (nothing is checked).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KnownNames {
    /// Computed traits, declared `profile_traits`, and the properties of
    /// every tracking plan's `identify` schema.
    pub traits: Option<std::collections::BTreeSet<String>>,
    /// Event names that can reach traits and audiences: known only when
    /// every source's tracking plan blocks unplanned events (then: the
    /// planned ones, and `Page Viewed` / `Screen Viewed`).
    pub events: Option<std::collections::BTreeSet<String>>,
    /// Traits whose values are always numbers or always lists (computed
    /// traits whose type fixes it, and no other source of the name): a
    /// comparison that cannot tell such values apart is an error.
    pub kinds: std::collections::BTreeMap<String, ValueKind>,
}

impl KnownNames {
    /// Accept every name (tests, and configs that declare nothing).
    pub fn anything() -> Self {
        KnownNames::default()
    }

    /// `Err` at `path` when `name` is no known trait.
    /// A dotted name is known when its first part is (`address.city` of a
    /// known `address`).
    pub fn check_trait(&self, path: &str, name: &str) -> Result<(), ConfigError> {
        let root = name.split('.').next().unwrap_or(name);
        match &self.traits {
            Some(known) if !known.contains(name) && !known.contains(root) => Err(ConfigError::new(
                path,
                format!(
                    "unknown trait {name:?} (not a computed trait, not in `profile_traits`, not in a tracking plan's `identify` schema)"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// `Err` at `path` when `op` cannot tell values of trait `name` apart
    /// (`{trait: orders_30d, gte: "2"}` compares a number with a string,
    /// which never holds).
    pub fn check_comparison(
        &self,
        path: &str,
        name: &str,
        op: &Comparison,
    ) -> Result<(), ConfigError> {
        let Some(kind) = self.kinds.get(name) else {
            return Ok(());
        };
        match op.mistyped_for(*kind) {
            Some(why) => Err(ConfigError::new(format!("{path}.{}", op.key()), why)),
            None => Ok(()),
        }
    }

    /// `Err` at `path` when `name` is an event no source lets through.
    pub fn check_event(&self, path: &str, name: &str) -> Result<(), ConfigError> {
        match &self.events {
            Some(known) if !known.contains(name) => Err(ConfigError::new(
                path,
                format!(
                    "unknown event {name:?} (every source's tracking plan blocks unplanned events and none plans it)"
                ),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_names_are_errors_at_their_path_only_when_names_are_known() {
        let any = KnownNames::anything();
        assert!(any.check_trait("a", "x").is_ok() && any.check_event("a", "X").is_ok());
        let known = KnownNames {
            traits: Some(["ltv_total".to_string()].into()),
            events: Some(["Order Completed".to_string()].into()),
            ..KnownNames::default()
        };
        assert!(known.check_trait("p", "ltv_total").is_ok());
        // A dotted name reaches into a known trait, not into an unknown one.
        assert!(known.check_trait("p", "ltv_total.eur").is_ok());
        assert!(known.check_trait("p", "address.city").is_err());
        let e = known.check_trait("audiences.vip.where.all[1].trait", "ltv");
        assert_eq!(
            e.map_err(|e| e
                .to_string()
                .starts_with(r#"audiences.vip.where.all[1].trait: unknown trait "ltv""#)),
            Err(true)
        );
        assert!(known.check_event("p", "Order Completed").is_ok());
        assert!(known.check_event("p", "Order Complted").is_err());
    }

    #[test]
    fn comparisons_that_cannot_tell_a_typed_traits_values_apart_are_errors() {
        let known = KnownNames {
            kinds: [
                ("orders".to_string(), ValueKind::Number),
                ("brands".to_string(), ValueKind::List),
            ]
            .into(),
            ..KnownNames::default()
        };
        let check = |name: &str, key: &str, value: serde_json::Value| {
            let op = Comparison::from_key(key, value).ok().flatten();
            op.map(|op| known.check_comparison("a.where", name, &op).is_ok())
        };
        use serde_json::json;
        // A number: compared with numbers; strings, lists and `contains`
        // never tell its values apart.
        for (key, value, ok) in [
            ("gte", json!(2), true),
            ("eq", json!(2.5), true),
            ("in", json!([1, 2]), true),
            ("exists", json!(true), true),
            ("gte", json!("2"), false),
            ("ne", json!("2"), false),
            ("in", json!([1, "2"]), false),
            ("contains", json!(2), false),
        ] {
            assert_eq!(
                check("orders", key, value.clone()),
                Some(ok),
                "{key}: {value}"
            );
        }
        // A list: `contains` and list equality; no order.
        for (key, value, ok) in [
            ("contains", json!("nike"), true),
            ("eq", json!(["nike"]), true),
            ("exists", json!(false), true),
            ("eq", json!("nike"), false),
            ("gt", json!("a"), false),
            ("in", json!(["nike"]), false),
        ] {
            assert_eq!(
                check("brands", key, value.clone()),
                Some(ok),
                "{key}: {value}"
            );
        }
        // Untyped traits take anything.
        assert_eq!(check("plan", "gte", json!("pro")), Some(true));
        let e = Comparison::from_key("gte", json!("2"))
            .ok()
            .flatten()
            .map(|op| known.check_comparison("audiences.x.where", "orders", &op));
        assert_eq!(
            e.map(|r| r.map_err(|e| e.path)),
            Some(Err("audiences.x.where.gte".to_string()))
        );
    }
}
