//! Profiles as the profile stages keep them, read from their changelogs
//! (`<p>.<stage>-changelog`, compacted: every profile's latest state, what
//! the stage itself restores from):
//!
//! - `cdp profiles traits`: the computed and identify trait values of each
//!   profile, as the traits stage last sent them downstream. `<p>.traits`
//!   carries only changes, in a binary framing, and may have been cut by
//!   retention.
//! - `cdp profiles audiences`: the audiences each profile is in now.
//!   `<p>.audiences` carries changes, not members, and retention cuts it.
//!
//! The last record of each key wins, as compaction keeps it: a batch a
//! stage wrote but had not committed when it crashed is repaired within
//! seconds, so a read right after a crash may show it for that long.

use std::collections::BTreeMap;

use cdp_operators::audiences::{current_memberships, AudienceSet};
use cdp_operators::messages::AudienceChange;
use cdp_pipeline::ClientFactory;
use rdkafka::Message;
use serde_json::{json, Value};

/// The latest stored value of every profile key (`profile/<id>`) in
/// `stage`'s changelog, by profile id; only `profile` when given. A
/// profile whose latest record is a tombstone is left out.
fn latest_states(
    factory: &ClientFactory,
    stage: &str,
    profile: Option<&str>,
) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let topic = factory.topics().changelog(stage);
    let mut latest = BTreeMap::new();
    crate::dead_letters::read_each(factory, &topic, |m| {
        let Some(id) = m
            .key()
            .and_then(|k| k.strip_prefix(b"profile/"))
            .and_then(|id| std::str::from_utf8(id).ok())
        else {
            return;
        };
        if profile.is_some_and(|p| p != id) {
            return;
        }
        match m.payload() {
            Some(value) => latest.insert(id.to_string(), value.to_vec()),
            None => latest.remove(id),
        };
    })?;
    Ok(latest)
}

/// One JSON object per live profile (`profile_id`, `identifiers`,
/// `traits`), by profile id; only `profile` when given.
pub fn trait_values(factory: &ClientFactory, profile: Option<&str>) -> anyhow::Result<Vec<Value>> {
    Ok(latest_states(factory, "traits", profile)?
        .into_iter()
        .filter_map(|(id, value)| {
            let (identifiers, traits) = cdp_operators::traits::stored_values(&value)?;
            Some(json!({"profile_id": id, "identifiers": identifiers, "traits": traits}))
        })
        .collect())
}

/// An `entered` change for every membership a profile has now, by profile
/// id, then in the audiences' evaluation order (see
/// [`current_memberships`]); only `profile`'s when given, only of the
/// audiences `wanted` accepts.
pub fn memberships(
    factory: &ClientFactory,
    set: &AudienceSet,
    profile: Option<&str>,
    wanted: impl Fn(&str) -> bool,
) -> anyhow::Result<Vec<AudienceChange>> {
    let now = chrono::Utc::now().timestamp_millis();
    Ok(latest_states(factory, "audiences", profile)?
        .into_iter()
        .flat_map(|(id, value)| current_memberships(set, &id, &value, now))
        .filter(|change| wanted(&change.audience))
        .collect())
}
