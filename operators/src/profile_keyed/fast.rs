//! The fast path of [`decode_event`](super::decode_event) and
//! [`decode_update`](super::decode_update) for the common record of each
//! stage (`event` into traits, `update` into audiences).
//!
//! The input enums are tagged by a `type` field, which serde can only read
//! by buffering the whole record first (every string and map of the event
//! copied once more). Records this crate writes put the tag first
//! (`{"type":"event",`), so for those the variant's fields are read
//! straight from the bytes, the tag skipped as an unknown field. Anything
//! else, and any record the fast path refuses, takes the general path, so
//! errors read the same. The event keeps its text, which is what a stage
//! writes back out (traits' update, a held or forwarded input), and its
//! tree is what the stage's `parse` builds from the text: only the paths
//! the stage reads ([`EventPaths`](super::EventPaths)).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::messages::{
    Cause, DroppedIdentifier, EventJson, Identifiers, ProfileRecord, ProfileUpdate,
};

/// A variant's fields, when the record starts as this crate writes the
/// variant (`prefix`) and parses as it. The record is checked to be UTF-8
/// once, whole, and parsed as text: parsed from bytes, `serde_json` checks
/// each string on its own (a call per string, ~4% of a record's
/// instructions).
fn fields<F: DeserializeOwned>(value: &[u8], prefix: &[u8]) -> Option<F> {
    if !value.starts_with(prefix) {
        return None;
    }
    serde_json::from_str(std::str::from_utf8(value).ok()?).ok()
}

/// The event in `text`: the tree `parse` builds, the text kept to write
/// back out.
fn event(
    text: Box<RawValue>,
    parse: impl FnOnce(&str) -> Result<Value, serde_json::Error>,
) -> Option<EventJson> {
    let tree = parse(text.get()).ok()?;
    Some(EventJson::with_text(tree, text.into()))
}

/// [`ProfileRecord::Event`]'s fields, the event as its text.
#[derive(Deserialize)]
struct EventFields {
    profile_id: String,
    identifiers: Identifiers,
    event: Box<RawValue>,
    #[serde(default)]
    dropped: Vec<DroppedIdentifier>,
    #[serde(default)]
    merged_from: Vec<String>,
}

/// How a [`ProfileRecord::Event`] starts, as this crate writes it.
const EVENT_PREFIX: &[u8] = br#"{"type":"event","#;

/// The traits stage's common record, when it starts as this crate writes
/// it and parses as it (the stage writes the event's text back out in its
/// update instead of encoding the tree again).
pub(crate) fn fast_event(
    value: &[u8],
    parse: impl FnOnce(&str) -> Result<Value, serde_json::Error>,
) -> Option<ProfileRecord> {
    let f: EventFields = fields(value, EVENT_PREFIX)?;
    Some(ProfileRecord::Event {
        profile_id: f.profile_id,
        identifiers: f.identifiers,
        event: event(f.event, parse)?,
        dropped: f.dropped,
        merged_from: f.merged_from,
    })
}

/// [`ProfileUpdate::Update`]'s fields, the event as its text.
#[derive(Deserialize)]
struct UpdateFields {
    profile_id: String,
    identifiers: Identifiers,
    event: Option<Box<RawValue>>,
    traits: BTreeMap<String, Value>,
    event_time: i64,
    #[serde(default)]
    time_corrected_from: Option<i64>,
    cause: Cause,
    #[serde(default)]
    merged_from: Vec<String>,
    #[serde(default)]
    traits_until: Option<i64>,
}

/// How a [`ProfileUpdate::Update`] starts, as this crate writes it.
const UPDATE_PREFIX: &[u8] = br#"{"type":"update","#;

/// The audiences stage's common record, when it starts as this crate
/// writes it and parses as it (a held or forwarded update is written with
/// the whole event, not the partial tree).
pub(crate) fn fast_update(
    value: &[u8],
    parse: impl FnOnce(&str) -> Result<Value, serde_json::Error>,
) -> Option<ProfileUpdate> {
    let f: UpdateFields = fields(value, UPDATE_PREFIX)?;
    let event = match f.event {
        Some(text) => Some(event(text, parse)?),
        None => None,
    };
    Some(ProfileUpdate::Update {
        profile_id: f.profile_id,
        identifiers: f.identifiers,
        event,
        traits: f.traits,
        event_time: f.event_time,
        time_corrected_from: f.time_corrected_from,
        cause: f.cause,
        merged_from: f.merged_from,
        traits_until: f.traits_until,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::messages::wire;

    /// The whole event's tree.
    fn full(text: &str) -> Result<Value, serde_json::Error> {
        serde_json::from_str(text)
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-z\"\\\\é ]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::vec(("[a-z]{1,4}", inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn arb_ids() -> impl Strategy<Value = Identifiers> {
        prop::collection::btree_map(
            "[a-z_]{1,6}",
            prop::collection::vec("[a-z0-9]{1,5}", 0..3),
            0..3,
        )
    }

    proptest! {
        /// The fast path reads exactly what serde's tagged path reads.
        #[test]
        fn the_fast_path_reads_what_the_general_one_does(
            id in "[a-z0-9]{1,8}", ids in arb_ids(), event in arb_json(),
            traits in prop::collection::btree_map("[a-z]{1,5}", arb_json(), 0..4),
            merged_from in prop::collection::vec("[a-z]{1,4}", 0..3),
            time in any::<i64>(), corrected in any::<Option<i64>>(), with_event in any::<bool>(),
            until in any::<Option<i64>>(),
            dropped in prop::collection::vec(("[a-z]{1,3}", "[a-z\"é]{0,4}", "[a-z_]{1,6}"), 0..3),
            tick in any::<Option<i64>>(),
        ) {
            let dropped: Vec<DroppedIdentifier> = dropped
                .into_iter()
                .map(|(kind, value, reason)| DroppedIdentifier { kind, value, reason })
                .collect();
            let record = ProfileRecord::Event {
                profile_id: id.clone(),
                identifiers: ids.clone(),
                event: event.clone().into(),
                dropped: dropped.clone(),
                merged_from: merged_from.clone(),
            };
            let bytes = serde_json::to_vec(&record).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let general: ProfileRecord = serde_json::from_slice(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let fast = fast_event(&bytes, full);
            prop_assert_eq!(fast.as_ref(), Some(&general));
            // The event is written back as the text it was read from: the
            // record encodes to the very bytes it came as.
            let again = serde_json::to_vec(&fast).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(again, bytes);
            // The binary form reads back as the same record, its event the
            // text identity wrote, and says the same to identity's metrics.
            let binary = record.to_bytes().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(binary.first(), Some(&wire::EVENT_V1));
            let read = wire::decode_event(&binary[1..], |_| Ok(Value::Null)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let text = match &read {
                ProfileRecord::Event { event, .. } => event.text().map(str::to_owned),
                _ => None,
            };
            prop_assert_eq!(text, Some(serde_json::to_string(&event).map_err(|e| TestCaseError::fail(e.to_string()))?));
            prop_assert_eq!(ProfileRecord::from_bytes(&binary).ok(), Some(general));
            let summary = crate::messages::ProfileRecordSummary::from_bytes(&binary).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(summary.dropped, dropped.clone());
            let update = ProfileUpdate::Update {
                profile_id: id,
                identifiers: ids,
                event: with_event.then_some(event.clone().into()),
                traits,
                event_time: time,
                time_corrected_from: corrected,
                cause: Cause { message_id: tick.is_none().then(|| "m".into()), tick },
                merged_from,
                traits_until: until,
            };
            let bytes = serde_json::to_vec(&update).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let general: ProfileUpdate = serde_json::from_slice(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let fast = fast_update(&bytes, full);
            prop_assert_eq!(fast.as_ref(), Some(&general));
            // The binary form reads back as the same update (trait values
            // exactly, where JSON may round a float's last digit), its
            // event as the JSON text of the tree written.
            let binary = update.to_bytes().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(binary.first(), Some(&wire::UPDATE_V1));
            let read = wire::decode_update(&binary[1..], 0, |_| Ok(event.clone())).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut expected = update.clone();
            if let ProfileUpdate::Update { event: sent @ Some(_), .. } = &mut expected {
                // As in JSON, an event that is `null` is no event.
                if sent.as_ref().is_some_and(|e| e.is_null()) {
                    *sent = None;
                }
            }
            prop_assert_eq!(&read, &expected);
            if let ProfileUpdate::Update { event: Some(e), .. } = &read {
                let text = serde_json::to_string(&event).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(e.text(), Some(text.as_str()));
            }
            // Held or forwarded, an update is written with the whole event
            // whatever its tree holds: the text it came as.
            let partial = fast_update(&bytes, |_| Ok(Value::Null));
            let written = match &partial {
                Some(ProfileUpdate::Update { event: Some(e), .. }) => {
                    Some(serde_json::to_string(e).map_err(|e| TestCaseError::fail(e.to_string()))?)
                }
                _ => None,
            };
            // (`"event": null` reads as no event, on both paths.)
            let sent = (with_event && !event.is_null())
                .then(|| serde_json::to_string(&event))
                .transpose()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(written, sent);
        }
    }

    #[test]
    fn other_records_take_the_general_path() {
        let merged =
            json!({"type": "merged", "from": "a", "into": "b", "identifiers": {}, "cause": {}});
        let bytes = serde_json::to_vec(&merged).unwrap_or_default();
        assert!(fast_event(&bytes, full).is_none());
        // Spaced out by another producer: still read, by the general path.
        assert!(fast_event(
            br#"{ "type": "event", "profile_id": "p", "identifiers": {}, "event": {}}"#,
            full
        )
        .is_none());
        // Starts right but is missing a field: refused here, and the
        // general path words the error.
        assert!(fast_event(br#"{"type":"event","profile_id":"p"}"#, full).is_none());
    }
}
