//! The one YAML config file: parsed with the path of every bad field, then
//! checked across sections (schemas compile, tracking plans and audiences
//! exist, no audience cycles) before any stage starts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use cdp_connectors::avro::Format;
use cdp_connectors::collector::CollectorConfig;
use cdp_connectors::destinations::{self, DestinationConfig};
use cdp_operators::audiences::{AudienceDef, AudienceSet};
use cdp_operators::config::{KnownNames, SourceConfig};
use cdp_operators::event_time::EventTimeConfig;
use cdp_operators::identity::{IdentityConfig, IdentityRules};
use cdp_operators::traits::{TraitDef, TraitSet, ValueKind};
use cdp_operators::validate::{TrackingPlan, UnplannedEvents, Validator, DEFAULT_DEDUPE_WINDOW};
use cdp_pipeline::{KafkaConfig, Span};
use serde::Deserialize;

/// The whole config file.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
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
    /// The bound on event times ahead of the stream (traits, audiences).
    #[serde(default)]
    pub event_time: EventTimeConfig,
    /// Profile traits `identify` calls set that conditions may reference,
    /// besides computed traits and the properties of tracking plans'
    /// `identify` schemas (a trait name no list knows is a config error).
    #[serde(default)]
    pub profile_traits: Vec<String>,
    /// Computed traits by name.
    #[serde(default)]
    pub traits: BTreeMap<String, TraitDef>,
    /// Audiences by name.
    #[serde(default)]
    pub audiences: BTreeMap<String, AudienceDef>,
    /// How audience changes are written to `<prefix>.audiences`.
    #[serde(default)]
    pub audience_changes: AudienceChangesConfig,
    /// Where audience changes go besides the `<prefix>.audiences` topic.
    #[serde(default)]
    pub destinations: Vec<DestinationConfig>,
}

/// The format of the `<prefix>.audiences` topic, the public contract.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AudienceChangesConfig {
    /// `json` (default) or `avro` (`deploy/schemas/audience_change.avsc`).
    /// The deliver stage reads both, so the format can change while
    /// records of the other are still on the topic.
    #[serde(default)]
    pub format: Format,
    /// With `format: avro`: URL of a Confluent-API schema registry. The
    /// audiences stage registers the schema under `<prefix>.audiences-value`
    /// on start and writes the Confluent wire format; without it, Avro
    /// single-object encoding.
    #[serde(default)]
    pub schema_registry: Option<String>,
}

impl AudienceChangesConfig {
    fn check(&self) -> Result<(), cdp_operators::config::ConfigError> {
        use cdp_operators::config::ConfigError;
        if let Some(url) = &self.schema_registry {
            if self.format != Format::Avro {
                return Err(ConfigError::new(
                    "audience_changes.schema_registry",
                    "only with format: avro",
                ));
            }
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                Ok(u) => {
                    return Err(ConfigError::new(
                        "audience_changes.schema_registry",
                        format!("scheme {:?} is not http or https", u.scheme()),
                    ))
                }
                Err(e) => {
                    return Err(ConfigError::new(
                        "audience_changes.schema_registry",
                        e.to_string(),
                    ))
                }
            }
        }
        Ok(())
    }
}

const fn default_dedupe_window() -> Span {
    DEFAULT_DEDUPE_WINDOW
}

/// A config that failed to load, with the path of the bad field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigLoadError {
    // The cause is the error's source: `{:#}` prints it once, after this.
    #[error("{path}: cannot read")]
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
        // A key given twice (two `audiences.vip`): the typed maps would keep
        // the last one silently; YAML's own tree refuses it, with its path.
        if let Err(e) = serde_yaml::from_str::<serde_yaml::Value>(text) {
            if e.to_string().contains("duplicate entry") {
                return Err(ConfigLoadError::Parse(e.to_string()));
            }
        }
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
    /// What compiles but likely does not do what its author meant: no
    /// sources, and readings of events or properties the tracking plans in
    /// use rule out ([`cdp_operators::lint`]).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.sources.is_empty() {
            warnings.push(format!(
                "no sources: the collector answers every request 401 (no write key); only producers writing to {}.raw directly get events in",
                self.kafka.topic_prefix
            ));
        }
        warnings.extend(cdp_operators::lint::plan_warnings(
            &self.sources,
            &self.tracking_plans,
            &self.traits,
            &self.audiences,
        ));
        warnings.extend(self.size_warnings());
        warnings
    }

    /// Whether a profile at every bound (each identifier type full of
    /// 512-byte values, each value-keeping trait full of its 32 KiB) could
    /// outgrow `kafka.max_record_bytes`: its state record would then stop
    /// the stage.
    fn size_warnings(&self) -> Vec<String> {
        use cdp_operators::identity::MAX_IDENTIFIER_BYTES;
        let limit = self.kafka.max_record_bytes;
        let mut warnings = Vec::new();
        let identifiers: usize = self
            .identity
            .identifiers
            .values()
            .map(|r| r.limit.saturating_mul(MAX_IDENTIFIER_BYTES + 8))
            .sum();
        if identifiers > limit {
            warnings.push(format!(
                "identity.identifiers: a profile holding every type's limit of identifiers, each {MAX_IDENTIFIER_BYTES} bytes long, would be ~{identifiers} bytes, over kafka.max_record_bytes ({limit}); a client sending such ids would stop the identity stage: lower the limits (anonymous_id's above all) or raise the record limit (and the broker's)"
            ));
        }
        let kept = self.traits.values().filter(|d| d.keeps_values()).count();
        // The kept texts, and the values last sent (the same again).
        let traits = kept.saturating_mul(2 * cdp_operators::traits::MAX_KEPT_BYTES);
        if traits > limit {
            warnings.push(format!(
                "traits: {kept} value-keeping traits (most_frequent, unique_list, unique_count, first, last) may keep up to ~{traits} bytes for one profile with long values, over kafka.max_record_bytes ({limit}); raise the record limit (and the broker's) or keep fewer"
            ));
        }
        warnings
    }

    pub fn compile(self) -> Result<Compiled, ConfigLoadError> {
        use cdp_operators::config::ConfigError;
        check_kafka(&self.kafka)?;
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            if s.write_key.is_empty() {
                return Err(ConfigError::new(
                    format!("sources[{i}].write_key"),
                    "must not be empty (no request can authenticate with it)",
                )
                .into());
            }
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
        let identity = IdentityRules::new(&self.identity)?.with_event_time(self.event_time);
        let traits = TraitSet::new(&self.traits)?.with_event_time(self.event_time);
        if let Some((i, name)) = self
            .profile_traits
            .iter()
            .enumerate()
            .find(|(_, name)| self.traits.contains_key(*name))
        {
            return Err(ConfigError::new(
                format!("profile_traits[{i}]"),
                format!("{name:?} is also a computed trait (traits.{name}): a profile keeps the computed value and ignores the one identify sends; rename one of them"),
            )
            .into());
        }
        let known = self.known_names(&traits.names(), traits.value_kinds());
        traits.check_names(&known)?;
        let audiences =
            Arc::new(AudienceSet::new(&self.audiences, &known)?.with_event_time(self.event_time));
        let traits = traits.forwarding(&audiences);
        self.audience_changes.check()?;
        destinations::check(&self.destinations)?;
        self.check_destination_topics()?;
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
            audiences,
            config: self,
        })
    }
}

/// Longest topic prefix: Kafka names are at most 249 characters, and the
/// longest suffix is `.audiences-changelog`.
const MAX_TOPIC_PREFIX: usize = 200;
/// Smallest `kafka.max_record_bytes`: an event alone may be 32 KB.
const MIN_RECORD_BYTES: usize = 64 * 1024;
/// Shortest `kafka.tick_interval`: ticks are records in every partition.
const MIN_TICK: Span = Span::from_millis(100);

/// The `kafka` section's values that parse but can never work: each would
/// otherwise show up later, as a stage that stops, stalls or floods.
fn check_kafka(k: &KafkaConfig) -> Result<(), cdp_operators::config::ConfigError> {
    use cdp_operators::config::ConfigError;
    let fail = |path: &str, why: String| Err(ConfigError::new(format!("kafka.{path}"), why));
    if k.partitions < 1 {
        return fail("partitions", "must be at least 1".into());
    }
    if k.brokers.split(',').any(|b| b.trim().is_empty()) {
        // librdkafka takes an empty list and retries it forever.
        return fail(
            "brokers",
            "must list at least one host:port, comma-separated, without empty entries".into(),
        );
    }
    if !legal_topic_name(&k.topic_prefix, MAX_TOPIC_PREFIX) {
        return fail(
            "topic_prefix",
            format!(
                "must be 1 to {MAX_TOPIC_PREFIX} characters of a-z, A-Z, 0-9, '.', '_' and '-' (Kafka's topic names), got {:?}",
                k.topic_prefix
            ),
        );
    }
    if k.max_batch < 1 {
        return fail(
            "max_batch",
            "must be at least 1 (records per poll round)".into(),
        );
    }
    if k.tick_interval < MIN_TICK {
        return fail(
            "tick_interval",
            format!("must be at least {MIN_TICK}: every task writes a tick record into its input partition each interval"),
        );
    }
    // Every librdkafka property is set on a client config as a client
    // would be: a typo is refused here with its path, not at start-up.
    for (property, value) in k.properties.iter() {
        let name = property
            .strip_prefix("producer.")
            .or_else(|| property.strip_prefix("consumer."))
            .unwrap_or(property);
        let mut config = rdkafka::ClientConfig::new();
        config.set(name, value);
        if let Err(e) = config.create_native_config() {
            let why = match e {
                rdkafka::error::KafkaError::ClientConfig(_, message, _, _) => message,
                other => other.to_string(),
            };
            return fail(&format!("properties.{property}"), why);
        }
    }
    if k.max_record_bytes < MIN_RECORD_BYTES {
        return fail(
            "max_record_bytes",
            format!("must be at least {MIN_RECORD_BYTES}: an event alone may be 32 KB, and a state record over the limit stops its stage"),
        );
    }
    Ok(())
}

/// A legal Kafka topic name (or prefix): 1 to `max` of `a-zA-Z0-9._-`.
fn legal_topic_name(name: &str, max: usize) -> bool {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    !name.is_empty() && name.len() <= max && name.chars().all(legal)
}

impl Config {
    /// A `kafka` destination's topic must be a legal name and none of the
    /// pipeline's own: deliver reads `<p>.audiences`, so a destination
    /// writing there would deliver its own output again, forever.
    fn check_destination_topics(&self) -> Result<(), cdp_operators::config::ConfigError> {
        use cdp_operators::config::ConfigError;
        let t = cdp_pipeline::Topics::new(&self.kafka.topic_prefix);
        let mut own = vec![
            t.raw(),
            t.valid(),
            t.invalid(),
            t.identified(),
            t.traits(),
            t.audiences(),
            t.profiles(),
            crate::dead_letters::replay_log_topic(&t),
        ];
        own.extend(
            crate::stages::Stage::ALL
                .iter()
                .map(|s| t.changelog(s.name())),
        );
        for (i, d) in self.destinations.iter().enumerate() {
            let Some(topic) = &d.topic else { continue };
            let path = format!("destinations[{i}].topic");
            if !legal_topic_name(topic, 249) {
                return Err(ConfigError::new(
                    path,
                    format!("{topic:?} is no Kafka topic name (1 to 249 of a-z, A-Z, 0-9, '.', '_' and '-')"),
                ));
            }
            if own.contains(topic) {
                return Err(ConfigError::new(
                    path,
                    format!("{topic:?} is one of the pipeline's own topics: a destination writing to `{}` would deliver every change again, forever; name another", t.audiences()),
                ));
            }
        }
        Ok(())
    }

    /// The trait and event names conditions may use. Traits: computed ones,
    /// `profile_traits`, and the properties of every plan's `identify`
    /// schema. Events: only when every source has a tracking plan that
    /// blocks unplanned events are they known (the planned ones, plus
    /// `Page Viewed` and `Screen Viewed`, which page and screen calls count
    /// as); otherwise any event name can arrive and none is refused.
    fn known_names(
        &self,
        computed: &BTreeSet<String>,
        mut kinds: BTreeMap<String, ValueKind>,
    ) -> KnownNames {
        let mut traits = computed.clone();
        // (A computed name is never in `profile_traits`: `compile` refuses it.)
        traits.extend(self.profile_traits.iter().cloned());
        for plan in self.tracking_plans.values() {
            if let Some(props) = plan
                .identify
                .as_ref()
                .and_then(|s| s.get("properties"))
                .and_then(serde_json::Value::as_object)
            {
                traits.extend(props.keys().cloned());
                kinds.retain(|name, _| !props.contains_key(name));
            }
        }
        let plans: Option<Vec<&TrackingPlan>> = self
            .sources
            .iter()
            .map(|s| {
                s.tracking_plan
                    .as_ref()
                    .and_then(|p| self.tracking_plans.get(p))
                    .filter(|p| p.unplanned_events == UnplannedEvents::Block)
            })
            .collect();
        let events = plans.filter(|p| !p.is_empty()).map(|plans| {
            let mut events: BTreeSet<String> = ["Page Viewed", "Screen Viewed"]
                .into_iter()
                .map(str::to_owned)
                .collect();
            for plan in plans {
                events.extend(plan.events.keys().cloned());
                events.extend(plan.event_versions.keys().cloned());
            }
            events
        });
        KnownNames {
            traits: Some(traits),
            events,
            kinds,
        }
    }
}

/// The JSON Schema (draft-07, which every editor plugin reads) of the
/// config file, as `cdp config schema` prints it and
/// `deploy/cdp-config.schema.json` publishes it. It checks shapes, names
/// and types; the cross-field rules ([`Config::compile`]) stay with
/// `cdp config check`.
pub fn config_schema() -> serde_json::Value {
    let mut schema = schemars::generate::SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<Config>();
    schema.insert("title".into(), "cdp config file".into());
    // `$schema`, title and description first, for readers of the file.
    let mut ordered = serde_json::Map::new();
    for key in ["$schema", "title", "description"] {
        if let Some(value) = schema.get(key) {
            ordered.insert(key.to_string(), value.clone());
        }
    }
    match schema.to_value() {
        serde_json::Value::Object(rest) => {
            for (key, value) in rest {
                ordered.entry(key).or_insert(value);
            }
            serde_json::Value::Object(ordered)
        }
        other => other,
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

    #[test]
    fn audience_changes_format_is_checked() {
        let with =
            |section: &str| load_error(&format!("{DEMO_CONFIG}\naudience_changes:\n{section}"));
        assert_eq!(with("  format: avro\n"), "");
        assert_eq!(
            with("  format: avro\n  schema_registry: http://registry:8081\n"),
            ""
        );
        assert_eq!(
            with("  schema_registry: http://registry:8081\n"),
            "audience_changes.schema_registry: only with format: avro"
        );
        assert!(with("  format: avro\n  schema_registry: ftp://r\n")
            .starts_with("audience_changes.schema_registry: scheme"));
        assert!(with("  format: xml\n").starts_with("audience_changes.format:"));
    }

    fn load_error(text: &str) -> String {
        match Config::from_yaml(text).and_then(Config::compile) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unknown_trait_and_event_names_in_conditions_are_named_by_their_path() {
        // A trait no list knows: a typo that would silently never match.
        let text = DEMO_CONFIG.replace(
            "- {trait: revenue_total, gte: 500}",
            "- {trait: revenue_totl, gte: 500}",
        );
        assert_ne!(text, DEMO_CONFIG);
        assert!(
            load_error(&text).starts_with(
                r#"audiences.big_spenders.where.all[0].trait: unknown trait "revenue_totl""#
            ),
            "{}",
            load_error(&text)
        );
        // Identify traits are known from a plan's identify schema or from
        // `profile_traits`.
        let plan_trait = DEMO_CONFIG.replace(
            "- {trait: revenue_total, gte: 500}",
            "- {trait: email, exists: true}",
        );
        assert_eq!(load_error(&plan_trait), "");
        let declared = format!(
            "profile_traits: [plan]\n{}",
            DEMO_CONFIG.replace(
                "- {trait: revenue_total, gte: 500}",
                "- {trait: plan, eq: pro}"
            )
        );
        assert_eq!(load_error(&declared), "");
        // Events are known once every source's plan blocks unplanned ones.
        let blocking = DEMO_CONFIG.replace("unplanned_events: allow", "unplanned_events: block");
        assert!(
            load_error(&blocking).starts_with(
                r#"traits.categories.unique_list.event: unknown event "Product Viewed""#
            ),
            "{}",
            load_error(&blocking)
        );
        let planned = blocking.replace(
            "    events:\n",
            "    events:\n      Product Viewed: {type: object}\n",
        );
        assert_eq!(load_error(&planned), "");
        let typo = planned.replace(
            "{sequence: [{event: Product Viewed}, {event: Order Completed}]",
            "{sequence: [{event: Product Viewed}, {event: Order Complete}]",
        );
        assert!(
            load_error(&typo).starts_with(
                r#"audiences.browsed_then_bought.where.sequence[1].event: unknown event "Order Complete""#
            ),
            "{}",
            load_error(&typo)
        );
        // An unknown audience was already refused.
        let audience =
            DEMO_CONFIG.replace("- {audience: big_spenders}", "- {audience: big_spender}");
        assert!(
            load_error(&audience).starts_with(
                r#"audiences.lapsing.where.all[0].audience: unknown audience "big_spender""#
            ),
            "{}",
            load_error(&audience)
        );
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
            "tracking_plans.shop.on_violation: unknown variant `drop`, expected one of `block`, `omit`, `allow` at line 17 column 19"
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

    /// Where `cdp config schema` is published.
    const SCHEMA_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/cdp-config.schema.json");

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Every section and field, every trait type, every condition kind and
    /// every comparison: what the schema must accept.
    const FULL_CONFIG: &str = r#"
kafka:
  brokers: "b1:9092,b2:9092"
  topic_prefix: shop
  partitions: 3
  replication_factor: 3
  guarantee: at_least_once
  tick_interval: 500ms
  max_batch: 200
  state_dir: /tmp/cdp
  changelog_min_compaction_lag: 12h
  properties: {security.protocol: SASL_SSL, consumer.session.timeout.ms: "6000", linger.ms: 5,
               enable.idempotence: true}
  secret_env: {sasl.password: KAFKA_PASSWORD}
collector:
  listen: 127.0.0.1:8088
  max_event_bytes: 1024
  max_batch_bytes: 4096
  max_batch_events: 10
  max_in_flight_bytes: 8192
sources:
  - {id: web, write_key: wk_web, tracking_plan: shop}
  - {id: ios, write_key: wk_ios}
tracking_plans:
  shop:
    unplanned_events: block
    on_violation: omit
    common: {type: object, required: [context]}
    identify: {type: object}
    group: {type: object}
    events:
      Order Completed: {type: object, required: [revenue]}
    event_versions:
      Order Completed:
        2: {type: object, required: [revenue, currency]}
        "3": {type: object}
dedupe_window: 2d
identity:
  identifiers:
    user_id: {limit: 1, priority: 1}
    crm_id: {limit: 2, priority: 2}
  blocked_values: ["null"]
  blocked_patterns: ["^0+$"]
  max_merges: 10
traits:
  orders: {event_counter: {event: Order Completed, within: 30d, where: [{property: properties.revenue, gt: 10}]}}
  spend: {aggregation: {event: Order Completed, property: properties.revenue, function: avg, within: 7d,
          where: [{property: properties.currency, eq: EUR}, {property: properties.coupon, exists: false}]}}
  category: {most_frequent: {event: Product Viewed, property: properties.category, within: 1h,
             where: [{property: properties.category, ne: none}]}}
  first_source: {first: {event: Page Viewed, property: context.campaign.source,
                 where: [{property: properties.path, contains: /landing}]}}
  last_sku: {last: {event: Product Viewed, property: properties.sku, where: [{property: properties.price, lte: 5.5}]}}
  skus: {unique_list: {event: Product Viewed, property: properties.sku, limit: 5, within: 15m,
         where: [{property: properties.sku, in: [a, b]}, {property: properties.price, gte: 1},
                 {property: properties.price, lt: 1000}]}}
audiences:
  buyers:
    where: {event: Order Completed}
  vip:
    where:
      all:
        - {trait: spend, gte: 500}
        - {trait: category, in: [shoes, bags]}
        - {trait: first_source, exists: true}
        - {any: [{trait: orders, eq: 3}, {trait: orders, ne: 0}, {trait: orders, gt: 1},
                 {trait: orders, lt: 9}, {trait: orders, lte: 8}, {trait: skus, contains: a}]}
        - {event: Order Completed, count: {eq: 2, ne: 3, gt: 1, gte: 2, lt: 5, lte: 4}, within: 30d,
           where: [{property: properties.revenue, gt: 100}]}
        - {audience: buyers}
        - {not: {event: Refund Requested, within: 14d}}
        - {sequence: [{event: Product Viewed, where: [{property: properties.sku, eq: a}]},
                      {event: Order Completed}], within: 1d}
  empty_all: {where: {all: []}}
audience_changes: {format: avro, schema_registry: "http://registry:8081"}
destinations:
  - {id: hook, type: webhook, url: "https://example.com/hook", secret_env: HOOK_SECRET,
     audiences: [vip], timeout: 5s, max_attempts: 3, max_per_second: 50}
  - {id: topic, type: kafka, topic: shop.vip, format: avro, schema_registry: "http://registry:8081"}
  - {id: log, type: stdout}
  - {id: engage, type: segment, url: "https://api.segment.io", write_key_env: SEGMENT_WRITE_KEY,
     batch_size: 200, batch_deadline: 30s, max_per_second: 100}
"#;

    fn schema_validator() -> Result<jsonschema::Validator, Box<dyn std::error::Error>> {
        Ok(jsonschema::validator_for(&config_schema())?)
    }

    /// The schema's complaints about `yaml`, one per line (empty: valid).
    fn schema_errors(
        validator: &jsonschema::Validator,
        yaml: &str,
    ) -> Result<String, Box<dyn std::error::Error>> {
        let instance: serde_json::Value = serde_yaml::from_str(yaml)?;
        Ok(validator
            .iter_errors(&instance)
            .map(|e| format!("{}: {e}", e.instance_path))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    #[test]
    fn the_published_schema_is_current() -> TestResult {
        let published: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(SCHEMA_FILE)?)?;
        assert!(
            published == config_schema(),
            "deploy/cdp-config.schema.json is stale; regenerate it with \
             `cargo run -- config schema > deploy/cdp-config.schema.json`"
        );
        Ok(())
    }

    #[test]
    fn the_schema_is_a_valid_draft_07_schema() -> TestResult {
        let schema = config_schema();
        assert_eq!(
            schema["$schema"],
            serde_json::json!("http://json-schema.org/draft-07/schema#")
        );
        if let Err(e) = jsonschema::meta::validate(&schema) {
            return Err(format!("not a valid JSON Schema: {e}").into());
        }
        Ok(())
    }

    #[test]
    fn the_demo_and_a_full_config_validate_against_the_schema() -> TestResult {
        let validator = schema_validator()?;
        for (name, yaml) in [("demo", DEMO_CONFIG), ("full", FULL_CONFIG)] {
            assert_eq!(schema_errors(&validator, yaml)?, "", "{name} config");
            // The schema and the loader agree.
            Config::from_yaml(yaml)?.compile()?;
        }
        let c = Config::from_yaml(FULL_CONFIG)?;
        assert_eq!(c.traits.len(), 6, "every trait type");
        assert_eq!(c.destinations.len(), 4, "every destination type");
        Ok(())
    }

    #[test]
    fn the_schema_rejects_what_the_loader_rejects() -> TestResult {
        let validator = schema_validator()?;
        let plan = "tracking_plans:\n  p:\n    ";
        let trait_ = "traits:\n  t: ";
        let audience = "audiences:\n  a:\n    where: ";
        let cases = [
            ("unknown top-level field", "kafak: {}\n".to_string()),
            ("unknown nested field", "kafka: {partition: 4}\n".into()),
            ("wrong type", "kafka: {partitions: many}\n".into()),
            ("wrong enum value", "kafka: {guarantee: exactly_once}\n".into()),
            ("bad duration", "dedupe_window: 3w\n".into()),
            ("duration without unit", "dedupe_window: 30\n".into()),
            ("negative size", "collector: {max_batch_events: -1}\n".into()),
            ("source without write key", "sources: [{id: web}]\n".into()),
            ("unknown policy", format!("{plan}on_violation: drop\n")),
            ("event version 0", format!("{plan}event_versions: {{E: {{0: {{}}}}}}\n")),
            ("identifier rule field", "identity: {identifiers: {email: {limit: 1}}}\n".into()),
            ("unknown trait type", format!("{trait_}{{counter: {{event: E}}}}\n")),
            (
                "two trait types",
                format!("{trait_}{{first: {{event: E, property: p}}, last: {{event: E, property: p}}}}\n"),
            ),
            ("trait field of another type", format!("{trait_}{{first: {{event: E, property: p, within: 1d}}}}\n")),
            ("unknown function", format!("{trait_}{{aggregation: {{event: E, property: p, function: median}}}}\n")),
            ("no comparison", format!("{trait_}{{event_counter: {{event: E, where: [{{property: p}}]}}}}\n")),
            (
                "two comparisons",
                format!("{trait_}{{event_counter: {{event: E, where: [{{property: p, gt: 1, lt: 5}}]}}}}\n"),
            ),
            ("gt of a list", format!("{trait_}{{event_counter: {{event: E, where: [{{property: p, gt: [1]}}]}}}}\n")),
            ("in of a scalar", format!("{trait_}{{event_counter: {{event: E, where: [{{property: p, in: 1}}]}}}}\n")),
            ("exists of a string", format!("{trait_}{{event_counter: {{event: E, where: [{{property: p, exists: yes}}]}}}}\n")),
            ("unknown condition", format!("{audience}{{every: []}}\n")),
            ("two condition kinds", format!("{audience}{{trait: t, eq: 1, event: E}}\n")),
            ("trait without comparison", format!("{audience}{{trait: t}}\n")),
            ("count with sequence", format!("{audience}{{sequence: [{{event: E}}], count: {{gte: 1}}}}\n")),
            ("within with trait", format!("{audience}{{trait: t, eq: 1, within: 1d}}\n")),
            ("empty count", format!("{audience}{{event: E, count: {{}}}}\n")),
            ("negative count", format!("{audience}{{event: E, count: {{gte: -1}}}}\n")),
            ("unknown step field", format!("{audience}{{sequence: [{{event: E, within: 1d}}]}}\n")),
            ("nested unknown condition", format!("{audience}{{not: {{any: [{{evnt: E}}]}}}}\n")),
            ("audience without where", "audiences:\n  a: {}\n".into()),
            ("unknown destination type", "destinations: [{id: d, type: email}]\n".into()),
            ("destination max_attempts", "destinations: [{id: d, type: webhook, max_attempts: many}]\n".into()),
        ];
        for (what, yaml) in cases {
            assert_ne!(
                schema_errors(&validator, &yaml)?,
                "",
                "{what}: schema accepts {yaml}"
            );
            assert!(
                Config::from_yaml(&yaml).is_err(),
                "{what}: loader accepts {yaml}"
            );
        }
        Ok(())
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
