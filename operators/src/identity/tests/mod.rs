//! The identity operator's tests, by concern: `rules` (config and
//! extraction), `resolution` (merges and limits), `profiles` (the
//! `<p>.profiles` snapshots, aliases, the audit trail) and `properties`
//! (convergence proptests). Shared helpers live here.

use super::graph::ProfileState;
use super::*;
use crate::config::ConfigError;
use crate::messages::Identifiers;
use cdp_pipeline::{Emitted, OperatorHarness};
use std::collections::BTreeMap;

mod profiles;
mod properties;
mod resolution;
mod rules;

pub(super) type TestResult = Result<(), Box<dyn std::error::Error>>;

pub(super) fn harness(
    cfg: &IdentityConfig,
) -> Result<OperatorHarness<IdentityOperator>, ConfigError> {
    Ok(OperatorHarness::new(IdentityOperator::new(Arc::new(
        IdentityRules::new(cfg)?,
    ))))
}

pub(super) fn send(
    h: &mut OperatorHarness<IdentityOperator>,
    event: &Value,
) -> Result<Vec<ProfileRecord>, Box<dyn std::error::Error>> {
    let bytes = serde_json::to_vec(event)?;
    let headers = vec![(SOURCE.to_string(), b"web".to_vec())];
    let out = h.process(None, &bytes, &headers)?;
    decode(&out)
}

pub(super) fn decode(out: &[Emitted]) -> Result<Vec<ProfileRecord>, Box<dyn std::error::Error>> {
    out.iter()
        .filter(|e| e.output == outputs::NEXT)
        .map(|e| Ok(ProfileRecord::from_bytes(&e.value)?))
        .collect()
}

/// The profile id and identifiers of the (last) Event output.
pub(super) fn resolved(
    records: &[ProfileRecord],
) -> Result<(String, Identifiers), Box<dyn std::error::Error>> {
    match records.last() {
        Some(ProfileRecord::Event {
            profile_id,
            identifiers,
            ..
        }) => Ok((profile_id.clone(), identifiers.clone())),
        other => Err(format!("expected an event last, got {other:?}").into()),
    }
}

pub(super) fn ids(pairs: &[(&str, &[&str])]) -> Identifiers {
    pairs
        .iter()
        .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
        .collect()
}

/// Live profiles in the store: profile id → identifiers.
pub(super) fn live_profiles(
    h: &OperatorHarness<IdentityOperator>,
) -> BTreeMap<String, Identifiers> {
    h.state
        .map
        .iter()
        .filter_map(|(k, v)| {
            let id = std::str::from_utf8(k).ok()?.strip_prefix("profile/")?;
            let state: ProfileState = super::stored::decode(k, v).ok()?;
            state
                .merged_into
                .is_none()
                .then(|| (id.to_string(), state.identifiers))
        })
        .collect()
}
