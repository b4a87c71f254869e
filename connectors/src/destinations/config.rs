//! The `destinations` config section: one entry per destination, its
//! kind, and the checks that name the bad field.

use std::collections::HashSet;

use cdp_operators::config::ConfigError;
use cdp_pipeline::kafka::ClientError;
use cdp_pipeline::Span;
use serde::{Deserialize, Serialize};

/// One entry of the `destinations` config section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// Unique name of the destination; used in logs, metric labels and as
    /// the deliver stage's output name.
    pub id: String,
    /// `webhook`, `kafka` or `stdout`.
    #[serde(rename = "type")]
    pub kind: DestinationKind,
    /// Webhook only: the `http://` or `https://` URL changes are POSTed to.
    #[serde(default)]
    pub url: Option<String>,
    /// Webhook only: name of the environment variable holding the HMAC
    /// secret that signs each body (`X-CDP-Signature`). Unsigned when unset.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Kafka only: the topic changes are produced to.
    #[serde(default)]
    pub topic: Option<String>,
    /// Audiences whose changes go to this destination; empty means all.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Webhook only: timeout of one HTTP attempt (default `10s`).
    #[serde(default)]
    pub timeout: Option<Span>,
    /// Webhook only: attempts per record before it is dead-lettered
    /// (default 5).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Webhook only: longest time one batch of deliveries may take (default
    /// `60s`); records not delivered by then are dead-lettered.
    #[serde(default)]
    pub batch_deadline: Option<Span>,
}

impl DestinationConfig {
    /// A destination of `kind` with every optional field unset.
    pub fn new(id: &str, kind: DestinationKind) -> Self {
        DestinationConfig {
            id: id.into(),
            kind,
            url: None,
            secret_env: None,
            topic: None,
            audiences: Vec::new(),
            timeout: None,
            max_attempts: None,
            batch_deadline: None,
        }
    }
}

/// The kind of a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DestinationKind {
    /// HTTP POST of each change to `url`.
    Webhook,
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
    #[error("destination {id}: environment variable {var} (secret_env) is not set")]
    MissingSecret { id: String, var: String },
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
}

impl DestinationKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            DestinationKind::Webhook => "webhook",
            DestinationKind::Kafka => "kafka",
            DestinationKind::Stdout => "stdout",
        }
    }
}

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
        let kind = d.kind.name();
        match d.kind {
            DestinationKind::Webhook => {
                let Some(url) = &d.url else {
                    return Err(ConfigError::new(at("url"), "required for webhook"));
                };
                check_url(url).map_err(|reason| ConfigError::new(at("url"), reason))?;
                if let Some(var) = &d.secret_env {
                    if var.trim().is_empty() {
                        return Err(ConfigError::new(
                            at("secret_env"),
                            "must name an environment variable",
                        ));
                    }
                }
            }
            DestinationKind::Kafka => match &d.topic {
                None => return Err(ConfigError::new(at("topic"), "required for kafka")),
                Some(t) if t.trim().is_empty() => {
                    return Err(ConfigError::new(at("topic"), "must not be empty"))
                }
                Some(_) => {}
            },
            DestinationKind::Stdout => {}
        }
        if d.kind != DestinationKind::Webhook {
            for (field, set) in [
                ("url", d.url.is_some()),
                ("secret_env", d.secret_env.is_some()),
                ("timeout", d.timeout.is_some()),
                ("max_attempts", d.max_attempts.is_some()),
                ("batch_deadline", d.batch_deadline.is_some()),
            ] {
                if set {
                    return Err(ConfigError::new(
                        at(field),
                        format!("only for webhook, not {kind}"),
                    ));
                }
            }
        }
        if d.kind != DestinationKind::Kafka && d.topic.is_some() {
            return Err(ConfigError::new(
                at("topic"),
                format!("only for kafka, not {kind}"),
            ));
        }
        if d.max_attempts == Some(0) {
            return Err(ConfigError::new(at("max_attempts"), "must be at least 1"));
        }
        if matches!(d.timeout, Some(t) if t.millis() <= 0) {
            return Err(ConfigError::new(at("timeout"), "must be positive"));
        }
        if matches!(d.batch_deadline, Some(t) if t.millis() <= 0) {
            return Err(ConfigError::new(at("batch_deadline"), "must be positive"));
        }
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
            "destinations[0].url: only for webhook, not stdout"
        );
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
