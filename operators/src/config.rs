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
