//! Config pieces shared by several operators, and the error every config
//! check returns: the path of the bad field and what is wrong with it.

use serde::{Deserialize, Serialize};

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
}

impl KnownNames {
    /// Accept every name (tests, and configs that declare nothing).
    pub fn anything() -> Self {
        KnownNames::default()
    }

    /// `Err` at `path` when `name` is no known trait.
    pub fn check_trait(&self, path: &str, name: &str) -> Result<(), ConfigError> {
        match &self.traits {
            Some(known) if !known.contains(name) => Err(ConfigError::new(
                path,
                format!(
                    "unknown trait {name:?} (not a computed trait, not in `profile_traits`, not in a tracking plan's `identify` schema)"
                ),
            )),
            _ => Ok(()),
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
        };
        assert!(known.check_trait("p", "ltv_total").is_ok());
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
}
