//! The `destinations` config section: one entry per destination, its
//! kind, and the checks that name the bad field.

use std::collections::HashSet;

use cdp_operators::config::ConfigError;
use cdp_pipeline::kafka::ClientError;
use cdp_pipeline::Span;
use serde::{Deserialize, Serialize};

use crate::avro::registry::RegistryError;
use crate::avro::{CodecError, Format};

/// One entry of the `destinations` config section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Unique name of the destination; used in logs, metric labels and as
    /// the deliver stage's output name.
    pub id: String,
    /// `webhook`, `segment`, `kafka` or `stdout`.
    #[serde(rename = "type")]
    pub kind: DestinationKind,
    /// Webhook: the `http://` or `https://` URL changes are POSTed to.
    /// Segment: the base URL of a Segment-compatible API (e.g.
    /// `https://api.segment.io`); calls go to `<url>/v1/batch`.
    #[serde(default)]
    pub url: Option<String>,
    /// Webhook only: name of the environment variable holding the HMAC
    /// secret that signs each body (`X-CDP-Signature`). Unsigned when unset.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Segment only: name of the environment variable holding the write key
    /// (sent as the Basic-auth user name).
    #[serde(default)]
    pub write_key_env: Option<String>,
    /// Segment only: most calls per `/v1/batch` request (default 100, at
    /// most 2500; every change is two calls).
    #[serde(default)]
    pub batch_size: Option<u32>,
    /// Kafka only: the topic changes are produced to.
    #[serde(default)]
    pub topic: Option<String>,
    /// Kafka only: `json` (default) or `avro`
    /// (`deploy/schemas/audience_change.avsc`).
    #[serde(default)]
    pub format: Option<Format>,
    /// Kafka with `format: avro` only: URL of a Confluent-API schema
    /// registry. The schema is registered under `<topic>-value` on start
    /// and records use the Confluent wire format; without it, Avro
    /// single-object encoding.
    #[serde(default)]
    pub schema_registry: Option<String>,
    /// Audiences whose changes go to this destination; empty means all.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Webhook and segment: timeout of one HTTP attempt (default `10s`).
    #[serde(default)]
    pub timeout: Option<Span>,
    /// Webhook and segment: attempts per request before its changes are
    /// dead-lettered (default 5).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Webhook and segment: longest time one batch of deliveries may take
    /// (default `60s`); changes not delivered by then are dead-lettered.
    #[serde(default)]
    pub batch_deadline: Option<Span>,
    /// Webhook and segment: most changes delivered per second (unlimited
    /// when unset); changes wait for their turn, within `batch_deadline`.
    #[serde(default)]
    pub max_per_second: Option<u32>,
}

impl DestinationConfig {
    /// A destination of `kind` with every optional field unset.
    pub fn new(id: &str, kind: DestinationKind) -> Self {
        DestinationConfig {
            id: id.into(),
            kind,
            url: None,
            secret_env: None,
            write_key_env: None,
            batch_size: None,
            topic: None,
            format: None,
            schema_registry: None,
            audiences: Vec::new(),
            timeout: None,
            max_attempts: None,
            batch_deadline: None,
            max_per_second: None,
        }
    }
}

/// The kind of a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DestinationKind {
    /// HTTP POST of each change to `url`.
    Webhook,
    /// The `identify` and `track` calls Segment Engage sends for each
    /// change, batched to a Segment-compatible `/v1/batch`.
    Segment,
    /// Produce each change to `topic`.
    Kafka,
    /// Print each change as a JSON line on stdout.
    Stdout,
}

/// Why a destination could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("destination {id}: {field} is required for type {kind}")]
    Missing {
        id: String,
        field: &'static str,
        kind: &'static str,
    },
    #[error("destination {id}: environment variable {var} ({field}) is not set")]
    MissingSecret {
        id: String,
        field: &'static str,
        var: String,
    },
    #[error("destination {id}: invalid url {url:?}: {reason}")]
    InvalidUrl {
        id: String,
        url: String,
        reason: String,
    },
    #[error("destination {id}: building the HTTP client: {source}")]
    HttpClient { id: String, source: reqwest::Error },
    #[error("destination {id}: {source}")]
    Kafka { id: String, source: ClientError },
    #[error("destination {id}: {source}")]
    Registry { id: String, source: RegistryError },
    #[error("destination {id}: {source}")]
    Codec { id: String, source: CodecError },
}

impl DestinationKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            DestinationKind::Webhook => "webhook",
            DestinationKind::Segment => "segment",
            DestinationKind::Kafka => "kafka",
            DestinationKind::Stdout => "stdout",
        }
    }

    fn is_http(self) -> bool {
        matches!(self, DestinationKind::Webhook | DestinationKind::Segment)
    }
}

/// Most calls Segment accepts in one batch request is bounded by size
/// (500 KB); 2500 calls of ~200 bytes stay inside it.
pub const MAX_BATCH_SIZE: u32 = 2500;

/// Check the `destinations` section: required fields per type, valid URLs,
/// sane limits, unique ids. Errors name the path of the bad field, e.g.
/// `destinations[0].url: required for webhook`. Audience names are checked
/// by the caller, which knows the `audiences` section.
pub fn check(dests: &[DestinationConfig]) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for (i, d) in dests.iter().enumerate() {
        let at = |field: &str| format!("destinations[{i}].{field}");
        if d.id.trim().is_empty() {
            return Err(ConfigError::new(at("id"), "must not be empty"));
        }
        if !seen.insert(d.id.as_str()) {
            return Err(ConfigError::new(
                at("id"),
                format!("duplicate destination id {:?}", d.id),
            ));
        }
        check_required(d, &at)?;
        check_fields_belong(d, &at)?;
        check_limits(d, &at)?;
        for (j, a) in d.audiences.iter().enumerate() {
            if a.trim().is_empty() {
                return Err(ConfigError::new(
                    format!("destinations[{i}].audiences[{j}]"),
                    "must not be empty",
                ));
            }
        }
    }
    Ok(())
}

/// What each type needs: a URL, a topic, a named environment variable.
fn check_required(d: &DestinationConfig, at: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    let kind = d.kind.name();
    if d.kind.is_http() {
        let Some(url) = &d.url else {
            return Err(ConfigError::new(at("url"), format!("required for {kind}")));
        };
        check_url(url).map_err(|reason| ConfigError::new(at("url"), reason))?;
    }
    for (field, var) in [
        ("secret_env", &d.secret_env),
        ("write_key_env", &d.write_key_env),
    ] {
        if matches!(var, Some(v) if v.trim().is_empty()) {
            return Err(ConfigError::new(
                at(field),
                "must name an environment variable",
            ));
        }
    }
    match d.kind {
        DestinationKind::Segment if d.write_key_env.is_none() => {
            return Err(ConfigError::new(
                at("write_key_env"),
                "required for segment",
            ))
        }
        DestinationKind::Kafka => match &d.topic {
            None => return Err(ConfigError::new(at("topic"), "required for kafka")),
            Some(t) if t.trim().is_empty() => {
                return Err(ConfigError::new(at("topic"), "must not be empty"))
            }
            Some(_) => {}
        },
        _ => {}
    }
    if let Some(url) = &d.schema_registry {
        if d.format != Some(Format::Avro) {
            return Err(ConfigError::new(
                at("schema_registry"),
                "only with format: avro",
            ));
        }
        check_url(url).map_err(|reason| ConfigError::new(at("schema_registry"), reason))?;
    }
    Ok(())
}

/// A field set on a type it means nothing to is a mistake worth naming.
fn check_fields_belong(
    d: &DestinationConfig,
    at: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    use DestinationKind::{Kafka, Segment, Webhook};
    let fields: [(&str, bool, &[DestinationKind]); 11] = [
        ("url", d.url.is_some(), &[Webhook, Segment]),
        ("timeout", d.timeout.is_some(), &[Webhook, Segment]),
        (
            "max_attempts",
            d.max_attempts.is_some(),
            &[Webhook, Segment],
        ),
        (
            "batch_deadline",
            d.batch_deadline.is_some(),
            &[Webhook, Segment],
        ),
        (
            "max_per_second",
            d.max_per_second.is_some(),
            &[Webhook, Segment],
        ),
        ("secret_env", d.secret_env.is_some(), &[Webhook]),
        ("write_key_env", d.write_key_env.is_some(), &[Segment]),
        ("batch_size", d.batch_size.is_some(), &[Segment]),
        ("topic", d.topic.is_some(), &[Kafka]),
        ("format", d.format.is_some(), &[Kafka]),
        ("schema_registry", d.schema_registry.is_some(), &[Kafka]),
    ];
    for (field, set, kinds) in fields {
        if set && !kinds.contains(&d.kind) {
            let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
            return Err(ConfigError::new(
                at(field),
                format!("only for {}, not {}", names.join(" and "), d.kind.name()),
            ));
        }
    }
    Ok(())
}

fn check_limits(d: &DestinationConfig, at: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    if d.max_attempts == Some(0) {
        return Err(ConfigError::new(at("max_attempts"), "must be at least 1"));
    }
    if d.max_per_second == Some(0) {
        return Err(ConfigError::new(at("max_per_second"), "must be at least 1"));
    }
    if matches!(d.batch_size, Some(n) if n == 0 || n > MAX_BATCH_SIZE) {
        return Err(ConfigError::new(
            at("batch_size"),
            format!("must be between 1 and {MAX_BATCH_SIZE}"),
        ));
    }
    if matches!(d.timeout, Some(t) if t.millis() <= 0) {
        return Err(ConfigError::new(at("timeout"), "must be positive"));
    }
    if matches!(d.batch_deadline, Some(t) if t.millis() <= 0) {
        return Err(ConfigError::new(at("batch_deadline"), "must be positive"));
    }
    Ok(())
}

pub(crate) fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    match parsed.scheme() {
        "http" | "https" => Ok(()),
        other => Err(format!("scheme {other:?} is not http or https")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::testing::dest;

    #[test]
    fn config_checks_name_the_bad_field() {
        let err = |dests: &[DestinationConfig]| {
            check(dests)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(check(&[dest("out", DestinationKind::Stdout)]).is_ok());
        assert_eq!(
            err(&[dest("crm", DestinationKind::Webhook)]),
            "destinations[0].url: required for webhook"
        );
        assert_eq!(
            err(&[
                dest("a", DestinationKind::Stdout),
                dest("t", DestinationKind::Kafka)
            ]),
            "destinations[1].topic: required for kafka"
        );
        let dup = [
            dest("a", DestinationKind::Stdout),
            dest("a", DestinationKind::Stdout),
        ];
        assert!(
            err(&dup).starts_with("destinations[1].id: duplicate"),
            "{}",
            err(&dup)
        );
        let mut bad_url = dest("crm", DestinationKind::Webhook);
        bad_url.url = Some("ftp://x/y".into());
        assert!(err(&[bad_url.clone()]).starts_with("destinations[0].url: scheme"));
        bad_url.url = Some("not a url".into());
        assert!(err(&[bad_url.clone()]).starts_with("destinations[0].url:"));
        bad_url.url = Some("https://crm.internal/hooks".into());
        bad_url.max_attempts = Some(0);
        assert_eq!(
            err(&[bad_url]),
            "destinations[0].max_attempts: must be at least 1"
        );
        let mut stray = dest("out", DestinationKind::Stdout);
        stray.url = Some("http://x".into());
        assert_eq!(
            err(&[stray]),
            "destinations[0].url: only for webhook and segment, not stdout"
        );
        let mut avro_webhook = dest("crm", DestinationKind::Webhook);
        avro_webhook.url = Some("http://crm/hook".into());
        avro_webhook.format = Some(Format::Avro);
        assert_eq!(
            err(&[avro_webhook]),
            "destinations[0].format: only for kafka, not webhook"
        );
        let mut registry_without_avro = dest("t", DestinationKind::Kafka);
        registry_without_avro.topic = Some("t".into());
        registry_without_avro.schema_registry = Some("http://registry:8081".into());
        assert_eq!(
            err(&[registry_without_avro.clone()]),
            "destinations[0].schema_registry: only with format: avro"
        );
        registry_without_avro.format = Some(Format::Avro);
        assert!(check(&[registry_without_avro]).is_ok());
        let mut segment = dest("seg", DestinationKind::Segment);
        segment.url = Some("https://api.segment.io".into());
        assert_eq!(
            err(&[segment.clone()]),
            "destinations[0].write_key_env: required for segment"
        );
        segment.write_key_env = Some("SEGMENT_WRITE_KEY".into());
        segment.batch_size = Some(0);
        assert!(err(&[segment.clone()]).starts_with("destinations[0].batch_size: must be between"));
        segment.batch_size = Some(200);
        segment.max_per_second = Some(0);
        assert_eq!(
            err(&[segment.clone()]),
            "destinations[0].max_per_second: must be at least 1"
        );
        segment.max_per_second = Some(50);
        assert!(check(&[segment]).is_ok());
    }

    #[test]
    fn config_parses_from_yaml_shaped_json_and_rejects_unknown_fields() {
        let ok: Result<Vec<DestinationConfig>, _> = serde_json::from_str(
            r#"[{"id":"crm","type":"webhook","url":"http://crm/hook","secret_env":"S","audiences":["vip"],"timeout":"5s","max_attempts":3}]"#,
        );
        let ok = ok.ok().unwrap_or_default();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].kind, DestinationKind::Webhook);
        assert_eq!(ok[0].timeout, Some(Span::from_secs(5)));
        let bad: Result<DestinationConfig, _> =
            serde_json::from_str(r#"{"id":"x","type":"stdout","colour":"red"}"#);
        assert!(bad.is_err());
    }
}
