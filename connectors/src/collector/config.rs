//! The `collector` section of the config file and its checks.

use std::net::SocketAddr;

use cdp_operators::config::ConfigError;
use cdp_pipeline::Span;
use serde::{Deserialize, Serialize};

/// The `collector` section of the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Address the HTTP API listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest single event in bytes (the body of a single-event call, or
    /// one item of a batch); larger ones get 413.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// Largest request body in bytes, after gzip decompression; larger
    /// ones get 413.
    #[serde(default = "default_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// Most events in one batch request; more get 413.
    #[serde(default = "default_max_batch_events")]
    pub max_batch_events: usize,
    /// Request bytes held in memory while waiting for the broker, across
    /// all requests; beyond it requests get 503 with `Retry-After`.
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: usize,
    /// Longest time a client may take to send a request body; a slower one
    /// gets 408 and its connection slot back.
    #[serde(default = "default_body_timeout")]
    pub body_timeout: Span,
    /// Most connections open at once; one more is answered 503 with
    /// `Retry-After` and closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A header the proxy in front of the collector sets to the client's
    /// address (`x-forwarded-for`, `x-real-ip`): its last address is the
    /// client's for `context.ip` (website and mobile sources). Unset: the
    /// connection's peer address.
    #[serde(default)]
    pub client_ip_header: Option<String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8088))
}

const fn default_max_event_bytes() -> usize {
    32 * 1024
}

const fn default_max_batch_bytes() -> usize {
    500 * 1024
}

const fn default_max_batch_events() -> usize {
    2500
}

const fn default_max_in_flight_bytes() -> usize {
    64 * 1024 * 1024
}

const fn default_body_timeout() -> Span {
    Span::from_secs(10)
}

const fn default_max_connections() -> usize {
    10_000
}

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            listen: default_listen(),
            max_event_bytes: default_max_event_bytes(),
            max_batch_bytes: default_max_batch_bytes(),
            max_batch_events: default_max_batch_events(),
            max_in_flight_bytes: default_max_in_flight_bytes(),
            body_timeout: default_body_timeout(),
            max_connections: default_max_connections(),
            client_ip_header: None,
        }
    }
}

impl CollectorConfig {
    /// Check limits that only make sense together; errors name the field
    /// (`collector.max_in_flight_bytes: ...`).
    pub fn check(&self) -> Result<(), ConfigError> {
        let positive = [
            ("max_event_bytes", self.max_event_bytes),
            ("max_batch_bytes", self.max_batch_bytes),
            ("max_batch_events", self.max_batch_events),
            ("max_in_flight_bytes", self.max_in_flight_bytes),
            ("max_connections", self.max_connections),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError::new(
                    format!("collector.{field}"),
                    "must be positive",
                ));
            }
        }
        if self.body_timeout.millis() <= 0 {
            return Err(ConfigError::new(
                "collector.body_timeout",
                "must be positive",
            ));
        }
        if let Some(name) = &self.client_ip_header {
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(ConfigError::new(
                    "collector.client_ip_header",
                    format!("{name:?} is no HTTP header name"),
                ));
            }
        }
        if self.max_batch_bytes > u32::MAX as usize {
            return Err(ConfigError::new(
                "collector.max_batch_bytes",
                "must be below 4 GiB",
            ));
        }
        if self.max_batch_bytes < self.max_event_bytes {
            return Err(ConfigError::new(
                "collector.max_batch_bytes",
                "must be at least max_event_bytes: a batch of one event is that large",
            ));
        }
        if self.max_in_flight_bytes < self.max_batch_bytes.max(self.max_event_bytes) {
            return Err(ConfigError::new(
                "collector.max_in_flight_bytes",
                "must be at least max_batch_bytes and max_event_bytes, or large requests never fit",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_checks() {
        let c = CollectorConfig::default();
        assert_eq!(c.listen.port(), 8088);
        assert_eq!(
            (c.max_event_bytes, c.max_batch_bytes, c.max_batch_events),
            (32 * 1024, 500 * 1024, 2500)
        );
        assert!(c.check().is_ok());
        let small = CollectorConfig {
            max_in_flight_bytes: 1024,
            ..Default::default()
        };
        assert_eq!(
            small.check().err().map(|e| e.path),
            Some("collector.max_in_flight_bytes".to_string())
        );
        let parsed: Result<CollectorConfig, _> =
            serde_json::from_str(r#"{"listen": "127.0.0.1:9000"}"#);
        assert_eq!(parsed.ok().map(|c| c.listen.port()), Some(9000));
        assert!(serde_json::from_str::<CollectorConfig>(r#"{"port": 1}"#).is_err());
    }
}
