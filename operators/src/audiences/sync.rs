//! What a destination connected later is sent first: an `entered` for
//! every audience each profile is in now, read from the audiences stage's
//! stored states (its compacted changelog holds every profile's latest),
//! as Segment Engage syncs an audience's current members to a destination
//! connected after the audience was built. `<p>.audiences` cannot serve:
//! it holds changes, not members, and retention cuts it.

use std::collections::BTreeMap;

use serde_json::Value;

use super::compile::AudienceSet;
use super::profile::{trait_value, AudienceProfile};
use crate::messages::{self, AudienceAction, AudienceChange, Cause};
use crate::profile_keyed::stored_state;

/// The values of the traits `audience`'s conditions read (through the
/// audiences it references too), as an audience change carries them.
pub(super) fn referenced_traits(
    set: &AudienceSet,
    audience: &str,
    traits: &BTreeMap<String, Value>,
) -> BTreeMap<String, Value> {
    set.audience(audience)
        .map(|a| {
            a.traits
                .iter()
                .filter_map(|t| trait_value(traits, t).map(|v| (t.clone(), v.clone())))
                .collect()
        })
        .unwrap_or_default()
}

/// The `entered` changes a sync sends for the stored value of
/// `profile/<id>`: one per configured audience the profile is in, in
/// evaluation order, as the audiences stage would have emitted it (the
/// profile's identifiers and the traits the audience reads). `event_time`
/// is the profile's latest change or evaluation, `emitted_at` is `now_ms`,
/// and the cause is empty: no event or tick caused it. None for a profile
/// merged away, or for bytes that are no profile state.
pub fn current_memberships(
    set: &AudienceSet,
    id: &str,
    bytes: &[u8],
    now_ms: i64,
) -> Vec<AudienceChange> {
    let Some(profile) = stored_state::<AudienceProfile>(bytes) else {
        return Vec::new();
    };
    let event_time = messages::rfc3339_ms(profile.changes_from.unwrap_or(profile.clock));
    let emitted_at = messages::rfc3339_ms(now_ms);
    set.order()
        .filter(|name| profile.members.contains(*name))
        .map(|name| AudienceChange {
            kind: "audience_change".to_owned(),
            audience: name.to_owned(),
            action: AudienceAction::Entered,
            profile_id: id.to_owned(),
            identifiers: profile.identifiers.clone(),
            traits: referenced_traits(set, name, &profile.traits),
            event_time: event_time.clone(),
            emitted_at: emitted_at.clone(),
            cause: Cause::default(),
            merged_into: None,
        })
        .collect()
}
