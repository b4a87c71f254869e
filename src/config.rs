//! The one YAML config file: parsed with the path of every bad field, then
//! checked across sections (schemas compile, tracking plans and audiences
//! exist, no audience cycles) before any stage starts.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use cdp_connectors::collector::CollectorConfig;
use cdp_connectors::destinations::{self, DestinationConfig};
use cdp_operators::audiences::{AudienceDef, AudienceSet};
use cdp_operators::config::SourceConfig;
use cdp_operators::identity::{IdentityConfig, IdentityRules};
use cdp_operators::traits::{TraitDef, TraitSet};
use cdp_operators::validate::{TrackingPlan, Validator, DEFAULT_DEDUPE_WINDOW};
use cdp_pipeline::{KafkaConfig, Span};
use serde::Deserialize;

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Brokers, topic prefix, partitions, guarantee, client properties.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// The HTTP collector's address and limits.
    #[serde(default)]
    pub collector: CollectorConfig,
    /// Where events come from, one write key each.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Tracking plans by name, referenced from `sources[].tracking_plan`.
    #[serde(default)]
    pub tracking_plans: BTreeMap<String, TrackingPlan>,
    /// How long a `messageId` is remembered to drop duplicates.
    #[serde(default = "default_dedupe_window")]
    pub dedupe_window: Span,
    /// Identity resolution rules.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Computed traits by name.
    #[serde(default)]
    pub traits: BTreeMap<String, TraitDef>,
    /// Audiences by name.
    #[serde(default)]
    pub audiences: BTreeMap<String, AudienceDef>,
    /// Where audience changes go besides the `<prefix>.audiences` topic.
    #[serde(default)]
    pub destinations: Vec<DestinationConfig>,
}

const fn default_dedupe_window() -> Span {
    DEFAULT_DEDUPE_WINDOW
}

/// A config that failed to load, with the path of the bad field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigLoadError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error(transparent)]
    Invalid(#[from] cdp_operators::config::ConfigError),
}

/// Everything compiled from the config, shared by the stages.
pub struct Compiled {
    pub config: Config,
    pub validator: Arc<Validator>,
    pub identity: Arc<IdentityRules>,
    pub traits: Arc<TraitSet>,
    pub audiences: Arc<AudienceSet>,
}

impl Config {
    pub fn from_yaml(text: &str) -> Result<Config, ConfigLoadError> {
        let de = serde_yaml::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if path == "." || path.is_empty() {
                return ConfigLoadError::Parse(inner);
            }
            // serde_yaml names a path itself in some errors (unknown
            // variants, bad map keys), ours or its parent's: name ours once.
            let message = match inner.split_once(": ") {
                Some((named, rest))
                    if path == named
                        || path
                            .strip_prefix(named)
                            .is_some_and(|tail| tail.starts_with(['.', '['])) =>
                {
                    rest
                }
                _ => inner.as_str(),
            };
            ConfigLoadError::Parse(format!("{path}: {message}"))
        })
    }

    pub fn load(path: &Path) -> Result<Config, ConfigLoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigLoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Check every cross-field rule and compile what the stages use.
    pub fn compile(self) -> Result<Compiled, ConfigLoadError> {
        use cdp_operators::config::ConfigError;
        if self.kafka.partitions < 1 {
            return Err(ConfigError::new("kafka.partitions", "must be at least 1").into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            if !seen.insert(&s.write_key) {
                return Err(ConfigError::new(
                    format!("sources[{i}].write_key"),
                    "used by two sources",
                )
                .into());
            }
        }
        self.collector.check()?;
        let validator = Validator::new(&self.sources, &self.tracking_plans, self.dedupe_window)?;
        let identity = IdentityRules::new(&self.identity)?;
        let traits = TraitSet::new(&self.traits)?;
        let audiences = AudienceSet::new(&self.audiences, &traits.names())?;
        destinations::check(&self.destinations)?;
        for (i, d) in self.destinations.iter().enumerate() {
            for (j, a) in d.audiences.iter().enumerate() {
                if !self.audiences.contains_key(a) {
                    return Err(ConfigError::new(
                        format!("destinations[{i}].audiences[{j}]"),
                        format!("unknown audience {a:?}"),
                    )
                    .into());
                }
            }
        }
        Ok(Compiled {
            validator: Arc::new(validator),
            identity: Arc::new(identity),
            traits: Arc::new(traits),
            audiences: Arc::new(audiences),
            config: self,
        })
    }
}

/// The built-in demo config of `cdp dev` (DESIGN.md's example).
pub const DEMO_CONFIG: &str = include_str!("../deploy/demo-config.yaml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_config_loads_and_compiles() -> Result<(), ConfigLoadError> {
        let c = Config::from_yaml(DEMO_CONFIG)?.compile()?;
        assert!(c.config.audiences.contains_key("big_spenders"));
        assert_eq!(c.config.sources.len(), 1);
        Ok(())
    }

    #[test]
    fn a_bad_field_is_named_by_its_path() {
        let text = DEMO_CONFIG.replace("partitions: 4", "partitions: many");
        let err = Config::from_yaml(&text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("kafka.partitions:"), "{err}");
        let text = "audiences:\n  vip:\n    where:\n      all:\n        - {trait: x, gte: 1}\n        - {event: A, count: 3}\n";
        let err = Config::from_yaml(text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("audiences.vip.where"), "{err}");
    }

    fn load_error(text: &str) -> String {
        match Config::from_yaml(text).and_then(Config::compile) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_broken_json_schema_is_named_by_its_path() {
        let text = DEMO_CONFIG.replace(
            "properties: {revenue: {type: number, minimum: 0}}",
            "properties: {revenue: {type: money, minimum: 0}}",
        );
        assert_ne!(text, DEMO_CONFIG);
        assert_eq!(
            load_error(&text),
            "tracking_plans.shop.events.Order Completed: invalid JSON Schema: \"money\" is not valid under any of the schemas listed in the 'anyOf' keyword"
        );
    }

    #[test]
    fn an_unknown_policy_is_named_by_its_path() {
        let text = DEMO_CONFIG.replace("on_violation: block", "on_violation: drop");
        assert_ne!(text, DEMO_CONFIG);
        assert_eq!(
            load_error(&text),
            "tracking_plans.shop.on_violation: unknown variant `drop`, expected one of `block`, `omit`, `allow` at line 16 column 19"
        );
    }

    #[test]
    fn tracking_plan_fields_are_checked_with_their_path() {
        let plan = "tracking_plans:\n  shop:\n    event_versions:\n      Order Completed:\n";
        let err = load_error(&format!("{plan}        0: {{type: object}}\n"));
        assert!(
            err.starts_with("tracking_plans.shop.event_versions.Order Completed.0: invalid value: integer `0`, expected an event version"),
            "{err}"
        );
        let err = load_error(&format!("{plan}        2: {{type: 7}}\n"));
        assert!(
            err.starts_with(
                "tracking_plans.shop.event_versions.Order Completed.2: invalid JSON Schema: "
            ),
            "{err}"
        );
        let err = load_error("tracking_plans:\n  shop:\n    common: {required: 5}\n");
        assert!(
            err.starts_with("tracking_plans.shop.common: invalid JSON Schema: "),
            "{err}"
        );
        let err = load_error("tracking_plans:\n  shop:\n    unplaned_events: block\n");
        assert!(
            err.starts_with("tracking_plans.shop.unplaned_events: unknown field `unplaned_events`"),
            "{err}"
        );
    }

    #[test]
    fn unknown_references_are_rejected_with_a_path() -> Result<(), ConfigLoadError> {
        let mut c = Config::from_yaml(DEMO_CONFIG)?;
        c.sources[0].tracking_plan = Some("nope".into());
        let err = c.compile().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("sources[0].tracking_plan"), "{err}");
        Ok(())
    }
}
