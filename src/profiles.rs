//! `cdp profiles traits`: the computed and identify trait values of each
//! profile, as the traits stage last sent them downstream, read from its
//! changelog (`<p>.traits-changelog`, compacted: every profile's latest
//! state). `<p>.traits` carries only changes, in a binary framing, and
//! may have been cut by retention; the changelog is what the stage itself
//! restores from.

use std::collections::BTreeMap;

use cdp_pipeline::ClientFactory;
use rdkafka::Message;
use serde_json::{json, Value};

/// One JSON object per live profile (`profile_id`, `identifiers`,
/// `traits`), by profile id; only `profile` when given. The last record
/// of each key wins, as compaction keeps it: a batch a stage wrote but
/// had not committed when it crashed is repaired within seconds, so a
/// read right after a crash may show it for that long.
pub fn trait_values(factory: &ClientFactory, profile: Option<&str>) -> anyhow::Result<Vec<Value>> {
    let topic = factory.topics().changelog("traits");
    let mut latest: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    for m in crate::dead_letters::read_to_end(factory, &topic)? {
        let Some(id) = m
            .key()
            .and_then(|k| k.strip_prefix(b"profile/"))
            .and_then(|id| std::str::from_utf8(id).ok())
        else {
            continue;
        };
        if profile.is_some_and(|p| p != id) {
            continue;
        }
        latest.insert(id.to_string(), m.payload().map(<[u8]>::to_vec));
    }
    Ok(latest
        .into_iter()
        .filter_map(|(id, value)| {
            let (identifiers, traits) = cdp_operators::traits::stored_values(&value?)?;
            Some(json!({"profile_id": id, "identifiers": identifiers, "traits": traits}))
        })
        .collect())
}
