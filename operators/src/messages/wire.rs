//! The binary form of the two records that carry every event between the
//! profile stages: [`ProfileRecord::Event`] on `<p>.identified` and
//! [`ProfileUpdate::Update`] on `<p>.traits`.
//!
//! As JSON, a stage's reader scanned the whole event once to find where it
//! ends (it is a field of the record) and again to build the paths it
//! reads, and parsed the record's own fields (identifiers, changed traits)
//! from text: a third of the audiences stage's instructions and a quarter
//! of the traits stage's (docs/performance.md). In this form the record is
//! one marker byte, then [postcard](https://docs.rs/postcard) (positional,
//! varint lengths): the event is a length-prefixed string holding its JSON
//! text as it came, so a reader takes it without scanning and parses only
//! the paths it reads; trait values are the states' binary values
//! ([`json_value_map`]).
//!
//! Compatibility: the marker bytes are never the first byte of UTF-8 text,
//! so a record is binary or JSON by its first byte, and readers take both
//! (records written by an earlier version, or by hand). A form changes by
//! the states' rule (`profile_keyed::encoding`): a field added later goes
//! last, with a default whose encoding is one zero byte (`None`, `0`, an
//! empty collection). A reader ignores bytes after the fields it knows,
//! and reads a record that ends before them as if zero bytes followed, so
//! during a rolling upgrade either version reads the other's records. A
//! change that cannot follow the rule takes a new marker. The other
//! records (merges, transfers) stay JSON: they are rare, and a transfer
//! carries a state as JSON anyway.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use super::{Cause, DroppedIdentifier, EventJson, Identifiers, ProfileRecord, ProfileUpdate};
use crate::profile_keyed::{
    decode_padded, json_value_map, last_wins_pairs, EndedEarly, RECORD_ROOM,
};

/// First byte of a binary [`ProfileRecord::Event`]. `0xF5`–`0xFF` never
/// start (or occur in) UTF-8 text, so no JSON record starts with them.
pub const EVENT_V1: u8 = 0xF5;

/// First byte of a binary [`ProfileUpdate::Update`].
pub const UPDATE_V1: u8 = 0xF6;

/// Why a record could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("binary record: {0}")]
    Decode(#[from] postcard::Error),
    #[error("event: {0}")]
    Event(String),
    #[error("{0}")]
    Json(String),
}

impl From<serde_json::Error> for RecordError {
    fn from(e: serde_json::Error) -> Self {
        RecordError::Json(e.to_string())
    }
}

/// An event's JSON text as a postcard string (the same bytes `&str`
/// writes), from bytes not checked as UTF-8 here: the reader checks them.
struct Text<'a>(&'a [u8]);

impl Serialize for Text<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// [`ProfileRecord::Event`] as written. `dropped` and `merged_from` come
/// first: identity's metrics read them without the rest
/// ([`event_dropped`]).
#[derive(Serialize)]
struct EventOut<'a, M: Serialize> {
    dropped: &'a [DroppedIdentifier],
    merged_from: &'a [M],
    profile_id: &'a str,
    identifiers: &'a Identifiers,
    event: Text<'a>,
}

/// An event record read in place: its ids and identifiers borrowed from
/// the record's bytes, its event's text too. The traits stage reads a
/// profile's usual record this way (see `TraitsOperator::process`): the
/// owned [`ProfileRecord`] allocated every string of it and copied the
/// event's ~0.7 KB, and a record handled at once keeps none of them. The
/// owned decode ([`decode_event`]) is this view made owned, so the
/// record's layout is written down once.
#[derive(Deserialize)]
pub(crate) struct EventView<'a> {
    /// `(type, value, reason)` of each refused identifier (the traits
    /// stage does not use them).
    #[serde(borrow)]
    dropped: Vec<(&'a str, &'a str, &'a str)>,
    #[serde(borrow)]
    pub(crate) merged_from: Vec<&'a str>,
    pub(crate) profile_id: &'a str,
    /// `(type, values)` pairs in the order written; a repeated type keeps
    /// its last values, as the owned decode's map does.
    #[serde(borrow, deserialize_with = "last_wins_pairs")]
    pub(crate) identifiers: Vec<(&'a str, Vec<&'a str>)>,
    /// The event's JSON text as bytes, checked as UTF-8 by its reader
    /// ([`utf8_event`], or `cdp_pipeline::json::utf8`: SIMD, where
    /// postcard's own check of a `&str` is std's).
    pub(crate) event: &'a [u8],
}

impl EventView<'_> {
    /// The owned record; its event's tree is what `parse` builds (see
    /// [`event`]).
    fn into_record<F: FnOnce(&str) -> Result<Value, serde_json::Error>>(
        self,
        parse: &mut Option<F>,
    ) -> Result<ProfileRecord, RecordError> {
        let dropped = self
            .dropped
            .into_iter()
            .map(|(kind, value, reason)| DroppedIdentifier {
                kind: kind.to_owned(),
                value: value.to_owned(),
                reason: reason.to_owned(),
            });
        Ok(ProfileRecord::Event {
            profile_id: self.profile_id.to_owned(),
            identifiers: owned_identifiers(self.identifiers),
            event: event(utf8_event(self.event)?, parse)?,
            dropped: dropped.collect(),
            merged_from: owned_strings(self.merged_from),
        })
    }
}

/// An event's text read as bytes, as text: the check (and the error) the
/// owned form's `&str` made while reading.
fn utf8_event(bytes: &[u8]) -> Result<&str, RecordError> {
    cdp_pipeline::json::utf8(bytes).ok_or(RecordError::Decode(postcard::Error::DeserializeBadUtf8))
}

/// Identifier pairs read in place as the owned map (each type once: the
/// pairs keep a repeated type's last values).
fn owned_identifiers(pairs: Vec<(&str, Vec<&str>)>) -> Identifiers {
    pairs
        .into_iter()
        .map(|(kind, values)| (kind.to_owned(), owned_strings(values)))
        .collect()
}

fn owned_strings(strings: Vec<&str>) -> Vec<String> {
    strings.into_iter().map(str::to_owned).collect()
}

/// A binary event record ([`EVENT_V1`] and its bytes) read in place;
/// `None` for any other record and for one that does not read whole as
/// this version writes it: [`decode_event`] reads those, or says what is
/// wrong.
pub(crate) fn view_event(value: &[u8]) -> Option<EventView<'_>> {
    match value.split_first() {
        Some((&EVENT_V1, rest)) => postcard::from_bytes(rest).ok(),
        _ => None,
    }
}

/// The binary [`ProfileRecord::Event`] of an event given as its JSON text
/// (`event`, written as it is: identity passes on the bytes validate
/// wrote). `merged_from` holds profile ids (`String`s or references).
pub fn encode_event<M: Serialize>(
    profile_id: &str,
    identifiers: &Identifiers,
    event: &[u8],
    dropped: &[DroppedIdentifier],
    merged_from: &[M],
) -> Result<Vec<u8>, RecordError> {
    let record = EventOut {
        dropped,
        merged_from,
        profile_id,
        identifiers,
        event: Text(event),
    };
    let mut out = Vec::with_capacity(event.len() + RECORD_ROOM / 4);
    out.push(EVENT_V1);
    Ok(postcard::to_extend(&record, out)?)
}

/// The binary form of an event record; `None` for any other
/// [`ProfileRecord`].
pub(crate) fn encode_record(record: &ProfileRecord) -> Option<Result<Vec<u8>, RecordError>> {
    let ProfileRecord::Event {
        profile_id,
        identifiers,
        event,
        dropped,
        merged_from,
    } = record
    else {
        return None;
    };
    let encode = || {
        let text = event_text(event)?;
        encode_event(
            profile_id,
            identifiers,
            text.as_bytes(),
            dropped,
            merged_from,
        )
    };
    Some(encode())
}

/// The refused identifiers of a binary event record (its first field),
/// without reading the rest.
pub fn event_dropped(bytes: &[u8]) -> Result<Vec<DroppedIdentifier>, RecordError> {
    Ok(postcard::from_bytes(bytes)?)
}

impl EndedEarly for RecordError {
    fn ended_early(&self) -> bool {
        matches!(self, RecordError::Decode(e) if e.ended_early())
    }
}

/// A binary event record (the bytes after [`EVENT_V1`]); the event's tree
/// is what `parse` builds from its text, which the record keeps.
pub(crate) fn decode_event(
    bytes: &[u8],
    parse: impl FnOnce(&str) -> Result<Value, serde_json::Error>,
) -> Result<ProfileRecord, RecordError> {
    let mut parse = Some(parse);
    decode_padded(bytes, |bytes| {
        let view: EventView<'_> = postcard::from_bytes(bytes)?;
        view.into_record(&mut parse)
    })
}

/// The event in `text`, its tree what `parse` builds (taken: a record is
/// read once, and its event parsed once).
fn event<F: FnOnce(&str) -> Result<Value, serde_json::Error>>(
    text: &str,
    parse: &mut Option<F>,
) -> Result<EventJson, RecordError> {
    let parse = parse
        .take()
        .ok_or_else(|| RecordError::Event("read twice".to_owned()))?;
    let tree = parse(text).map_err(|e| RecordError::Event(e.to_string()))?;
    Ok(EventJson::with_text(tree, text.into()))
}

/// [`event`] for an update. When the traits stage matched the event
/// against the filters the reader matches with (`accepts`, their
/// fingerprint; 0 takes none), the event is its text and those matches,
/// and nothing is parsed; otherwise its tree is what `parse` builds.
fn updated_event<F: FnOnce(&str) -> Result<Value, serde_json::Error>>(
    text: &str,
    matched: Option<(u64, Vec<u32>)>,
    accepts: u64,
    parse: &mut Option<F>,
) -> Result<EventJson, RecordError> {
    match matched {
        Some((filters, matched)) if accepts != 0 && filters == accepts => {
            Ok(EventJson::matched_only(text.into(), filters, matched))
        }
        _ => event(text, parse),
    }
}

/// The event's JSON text: the text it was read from, else its tree
/// written out.
pub(crate) fn event_text(event: &EventJson) -> Result<Cow<'_, str>, RecordError> {
    match event.text() {
        Some(text) => Ok(Cow::Borrowed(text)),
        None => serde_json::to_string(event.value())
            .map(Cow::Owned)
            .map_err(|e| RecordError::Event(e.to_string())),
    }
}

/// The changed traits, each value in the states' binary form.
pub(crate) struct Traits<'a>(pub(crate) &'a BTreeMap<String, Value>);

impl Serialize for Traits<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        json_value_map::serialize(self.0, s)
    }
}

/// [`ProfileUpdate::Update`] as written. [`Cause`]'s two fields are
/// inline: its JSON form skips absent ones, which a positional form
/// cannot.
///
/// The traits stage writes it from borrowed parts ([`write_update`]), so
/// an update of a record read in place copies nothing first.
#[derive(Serialize)]
pub(crate) struct UpdateOut<'a> {
    pub(crate) profile_id: &'a str,
    pub(crate) identifiers: &'a Identifiers,
    pub(crate) traits: Traits<'a>,
    pub(crate) event_time: i64,
    pub(crate) time_corrected_from: Option<i64>,
    pub(crate) message_id: Option<&'a str>,
    pub(crate) tick: Option<i64>,
    pub(crate) merged_from: &'a [String],
    pub(crate) traits_until: Option<i64>,
    pub(crate) event: Option<Cow<'a, str>>,
    /// The audiences stage's event filters the event passed, matched by
    /// the traits stage: their fingerprint and the indexes of those passed
    /// (see [`EventJson::matched`]).
    pub(crate) matched: Option<(u64, &'a [u32])>,
}

/// An update in the binary form, from its parts.
pub(crate) fn write_update(record: &UpdateOut<'_>) -> Result<Vec<u8>, RecordError> {
    let mut out = Vec::with_capacity(RECORD_ROOM);
    out.push(UPDATE_V1);
    Ok(postcard::to_extend(record, out)?)
}

/// A binary update read in place: its ids, names and identifiers
/// borrowed from the record's bytes, its trait values decoded. The
/// audiences stage reads a profile's usual update this way (see
/// `AudiencesOperator::process`): the owned [`ProfileUpdate`] allocated
/// every string of it (~8 a record), and a record handled at once needs
/// none of them kept. The owned decode ([`decode_update`]) is this view
/// made owned, so the record's layout is written down once.
#[derive(Deserialize)]
pub(crate) struct UpdateView<'a> {
    pub(crate) profile_id: &'a str,
    /// `(type, values)` pairs in the order written; a repeated type keeps
    /// its last values, as the owned decode's map does.
    #[serde(borrow, deserialize_with = "last_wins_pairs")]
    pub(crate) identifiers: Vec<(&'a str, Vec<&'a str>)>,
    #[serde(borrow, deserialize_with = "json_value_map::deserialize_borrowed")]
    pub(crate) traits: Vec<(&'a str, Value)>,
    pub(crate) event_time: i64,
    /// The audiences stage does not use it.
    time_corrected_from: Option<i64>,
    #[serde(borrow)]
    pub(crate) message_id: Option<&'a str>,
    pub(crate) tick: Option<i64>,
    #[serde(borrow)]
    pub(crate) merged_from: Vec<&'a str>,
    pub(crate) traits_until: Option<i64>,
    /// The event's text as bytes: an event that comes with its matches
    /// is never read, so its ~0.7 KB are not checked as UTF-8; a reader
    /// checks any text it parses ([`utf8_event`]).
    #[serde(borrow)]
    pub(crate) event: Option<&'a [u8]>,
    pub(crate) matched: Option<(u64, Vec<u32>)>,
}

impl UpdateView<'_> {
    /// The owned update; its event is read as [`updated_event`] reads
    /// it (`accepts`, `parse`).
    fn into_update<F: FnOnce(&str) -> Result<Value, serde_json::Error>>(
        self,
        accepts: u64,
        parse: &mut Option<F>,
    ) -> Result<ProfileUpdate, RecordError> {
        let matched = self.matched;
        let event = self.event.map(|bytes| {
            let text = utf8_event(bytes)?;
            updated_event(text, matched, accepts, parse)
        });
        let traits = self
            .traits
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value));
        Ok(ProfileUpdate::Update {
            profile_id: self.profile_id.to_owned(),
            identifiers: owned_identifiers(self.identifiers),
            event: event.transpose()?,
            traits: traits.collect(),
            event_time: self.event_time,
            time_corrected_from: self.time_corrected_from,
            cause: Cause {
                message_id: self.message_id.map(str::to_owned),
                tick: self.tick,
            },
            merged_from: owned_strings(self.merged_from),
            traits_until: self.traits_until,
        })
    }
}

/// A binary update ([`UPDATE_V1`] and its bytes) read in place; `None`
/// for any other record, and for one that does not read whole as this
/// version writes it (an earlier version's, without its last fields, or a
/// bad one): [`decode_update`] reads those, or says what is wrong.
pub(crate) fn view_update(value: &[u8]) -> Option<UpdateView<'_>> {
    match value.split_first() {
        Some((&UPDATE_V1, rest)) => postcard::from_bytes(rest).ok(),
        _ => None,
    }
}

/// The binary form of an update; `None` for any other [`ProfileUpdate`].
pub(crate) fn encode_update(update: &ProfileUpdate) -> Option<Result<Vec<u8>, RecordError>> {
    let ProfileUpdate::Update {
        profile_id,
        identifiers,
        event,
        traits,
        event_time,
        time_corrected_from,
        cause,
        merged_from,
        traits_until,
    } = update
    else {
        return None;
    };
    let encode = || {
        let record = UpdateOut {
            profile_id,
            identifiers,
            traits: Traits(traits),
            event_time: *event_time,
            time_corrected_from: *time_corrected_from,
            message_id: cause.message_id.as_deref(),
            tick: cause.tick,
            merged_from,
            traits_until: *traits_until,
            // As in JSON, where `"event": null` reads as no event. An
            // event read as matched has its text and no tree.
            event: event
                .as_ref()
                .filter(|e| !e.is_null() || e.matched().is_some())
                .map(event_text)
                .transpose()?,
            matched: event.as_ref().and_then(EventJson::matched),
        };
        write_update(&record)
    };
    Some(encode())
}

/// A binary update (the bytes after [`UPDATE_V1`]); its event's tree is
/// what `parse` builds, as in [`decode_event`], unless the event comes
/// matched against the filters `accepts` (a fingerprint, 0 for none), see
/// [`updated_event`].
pub(crate) fn decode_update(
    bytes: &[u8],
    accepts: u64,
    parse: impl FnOnce(&str) -> Result<Value, serde_json::Error>,
) -> Result<ProfileUpdate, RecordError> {
    let mut parse = Some(parse);
    decode_padded(bytes, |bytes| {
        let view: UpdateView<'_> = postcard::from_bytes(bytes)?;
        view.into_update(accepts, &mut parse)
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn update() -> ProfileUpdate {
        ProfileUpdate::Update {
            profile_id: "p".into(),
            identifiers: Identifiers::from([("user_id".into(), vec!["u1".into()])]),
            event: Some(json!({"type": "track", "event": "X", "messageId": "m"}).into()),
            traits: BTreeMap::from([("n".into(), json!(2)), ("gone".into(), Value::Null)]),
            event_time: 5,
            time_corrected_from: Some(9),
            cause: Cause {
                message_id: Some("m".into()),
                tick: None,
            },
            merged_from: vec!["q".into()],
            traits_until: Some(7),
        }
    }

    /// A field appended by a later version is ignored: the reader takes
    /// the fields it knows.
    #[test]
    fn bytes_after_the_known_fields_are_ignored() -> Result<(), RecordError> {
        let mut bytes = update().to_bytes()?;
        bytes.extend_from_slice(&[3, 1, 2, 3]);
        assert_eq!(ProfileUpdate::from_bytes(&bytes)?, update());
        Ok(())
    }

    /// A record written before its last fields were added (here: an
    /// update without its `traits_until`, event and matches, which encode
    /// as one zero byte each) reads with their defaults.
    #[test]
    fn a_record_without_its_last_fields_reads_with_their_defaults() -> Result<(), RecordError> {
        let mut shorter = update();
        if let ProfileUpdate::Update {
            event,
            traits_until,
            ..
        } = &mut shorter
        {
            *event = None;
            *traits_until = None;
        }
        let bytes = shorter.to_bytes()?;
        assert_eq!(&bytes[bytes.len() - 3..], &[0, 0, 0]);
        let earlier = &bytes[..bytes.len() - 3];
        assert_eq!(ProfileUpdate::from_bytes(earlier)?, shorter);
        Ok(())
    }

    /// An update's event is read as matched when the reader matches with
    /// the filters the traits stage matched it against, and parsed from
    /// its text otherwise (a reader of another config, one that takes no
    /// matches, a record written before matches were sent).
    #[test]
    fn the_matches_are_taken_by_a_reader_of_the_same_filters_only() -> Result<(), RecordError> {
        let text = r#"{"type":"track","event":"X","properties":{"revenue":5}}"#;
        let mut event = EventJson::with_text(serde_json::from_str(text)?, text.into());
        event.keep_matched(42, vec![0, 3]);
        let mut matched = update();
        if let ProfileUpdate::Update { event: e, .. } = &mut matched {
            *e = Some(event);
        }
        let bytes = matched.to_bytes()?;
        let read = |bytes: &[u8], accepts: u64| -> Result<(bool, EventJson), RecordError> {
            let mut parsed = false;
            let update = decode_update(&bytes[1..], accepts, |t| {
                parsed = true;
                serde_json::from_str(t)
            })?;
            match update {
                ProfileUpdate::Update { event: Some(e), .. } => Ok((parsed, e)),
                other => Err(RecordError::Json(format!("no event in {other:?}"))),
            }
        };
        let (parsed, event) = read(&bytes, 42)?;
        assert!(!parsed, "a matched event is not parsed");
        assert_eq!(event.matched(), Some((42, &[0, 3][..])));
        assert_eq!(event.text(), Some(text));
        // Held or passed on, it is written again with its text and matches.
        let mut again = update();
        if let ProfileUpdate::Update { event: e, .. } = &mut again {
            *e = Some(event);
        }
        assert_eq!(again.to_bytes()?, bytes);
        for other in [0, 7] {
            let (parsed, event) = read(&bytes, other)?;
            assert!(parsed, "accepts {other}: parsed");
            assert_eq!(event.value(), &serde_json::from_str::<Value>(text)?);
        }
        // An update written before matches were sent (its last field
        // absent) is parsed.
        let earlier = update().to_bytes()?;
        assert_eq!(&earlier[earlier.len() - 1..], &[0]);
        assert!(read(&earlier[..earlier.len() - 1], 42)?.0);
        Ok(())
    }

    /// A record whose event is not JSON is an error that says so.
    #[test]
    fn an_event_that_is_not_json_is_an_error() -> Result<(), RecordError> {
        let bad = encode_event("p", &Identifiers::new(), b"{\"a\":", &[], &[""; 0])?;
        match ProfileRecord::from_bytes(&bad) {
            Err(RecordError::Event(e)) => assert!(e.contains("EOF"), "{e}"),
            other => panic!("expected an event error, got {other:?}"),
        }
        Ok(())
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            "[a-zé]{0,6}".prop_map(Value::from),
            prop::collection::vec("[a-z]{0,3}", 0..3).prop_map(Value::from),
        ]
    }

    prop_compose! {
        fn arb_update()(
            profile_id in "[a-z0-9_]{0,8}",
            identifiers in prop::collection::btree_map(
                "[a-z_]{1,10}", prop::collection::vec("[a-zé@.0-9]{0,8}", 0..3), 0..4),
            traits in prop::collection::btree_map("[a-z_]{1,8}", arb_value(), 0..6),
            event_time in any::<i64>(),
            time_corrected_from in any::<Option<i64>>(),
            message_id in prop::option::of("[a-z0-9-]{0,12}"),
            tick in any::<Option<i64>>(),
            merged_from in prop::collection::vec("[a-z]{1,4}", 0..3),
            traits_until in any::<Option<i64>>(),
            event in prop::option::of(("[a-zA-Z ]{1,12}", prop::option::of(
                (any::<u64>(), prop::collection::vec(any::<u32>(), 0..4))))),
        ) -> ProfileUpdate {
            ProfileUpdate::Update {
                profile_id,
                identifiers,
                event: event.map(|(name, matched)| {
                    let mut e = EventJson::from(serde_json::json!({"event": name}));
                    if let Some((fingerprint, indexes)) = matched {
                        e.keep_matched(fingerprint, indexes);
                    }
                    e
                }),
                traits,
                event_time,
                time_corrected_from,
                cause: Cause { message_id, tick },
                merged_from,
                traits_until,
            }
        }
    }

    /// The identifiers and changed traits of an update read in place, as
    /// the owned decode's maps.
    fn owned_maps(view: &UpdateView<'_>) -> (Identifiers, BTreeMap<String, Value>) {
        let ids = view
            .identifiers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.iter().map(|v| (*v).to_owned()).collect()))
            .collect();
        let changed = view
            .traits
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        (ids, changed)
    }

    proptest! {
        /// An update read in place holds what the owned decode reads:
        /// every field the audiences stage takes, the maps pair for pair.
        #[test]
        fn an_update_read_in_place_is_the_decoded_one(update in arb_update()) {
            let bytes = update.to_bytes().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let view = view_update(&bytes).ok_or_else(|| TestCaseError::fail("no view"))?;
            let ProfileUpdate::Update {
                profile_id, identifiers, event, traits, event_time, cause,
                merged_from, traits_until, ..
            } = update else {
                return Err(TestCaseError::fail("not an update"));
            };
            prop_assert_eq!(view.profile_id, profile_id.as_str());
            let (ids, changed) = owned_maps(&view);
            prop_assert_eq!(ids, identifiers);
            prop_assert_eq!(changed, traits);
            prop_assert_eq!(view.event_time, event_time);
            prop_assert_eq!(view.message_id, cause.message_id.as_deref());
            prop_assert_eq!(view.tick, cause.tick);
            prop_assert_eq!(view.merged_from, merged_from.iter().map(String::as_str).collect::<Vec<_>>());
            prop_assert_eq!(view.traits_until, traits_until);
            let text = event.as_ref().map(|e| event_text(e).map(Cow::into_owned))
                .transpose().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(view.event, text.as_deref().map(str::as_bytes));
            prop_assert_eq!(
                view.matched.as_ref().map(|(f, m)| (*f, m.as_slice())),
                event.as_ref().and_then(EventJson::matched)
            );
            // Anything else is not an update read in place.
            prop_assert!(view_update(&bytes[1..]).is_none());
        }

        /// Repeated names in a record written by hand: the last wins, in
        /// place as in the owned decode.
        #[test]
        fn a_repeated_name_keeps_its_last_value_in_place(
            a in "[a-z]{1,3}", b in "[a-z]{1,3}", x in "[a-z]{0,3}", y in "[a-z]{0,3}",
        ) {
            /// A trait value as the binary form writes it.
            #[derive(Serialize)]
            struct Bin(#[serde(with = "crate::profile_keyed::json_value")] Value);
            #[derive(Serialize)]
            struct Raw<'a> {
                profile_id: &'a str,
                identifiers: Vec<(&'a str, Vec<&'a str>)>,
                traits: Vec<(&'a str, Bin)>,
            }
            let raw = Raw {
                profile_id: "p",
                identifiers: vec![(&a, vec![&x]), (&b, vec![&y]), (&a, vec![&y])],
                traits: vec![
                    (&a, Bin(Value::from(x.as_str()))),
                    (&b, Bin(Value::from(1))),
                    (&a, Bin(Value::from(y.as_str()))),
                ],
            };
            let mut bytes = vec![UPDATE_V1];
            bytes = postcard::to_extend(&raw, bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            // Every later field absent (zero bytes, their defaults).
            bytes.extend_from_slice(&[0; 8]);
            let view = view_update(&bytes).ok_or_else(|| TestCaseError::fail("no view"))?;
            let owned = ProfileUpdate::from_bytes(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let ProfileUpdate::Update { identifiers, traits, .. } = owned else {
                return Err(TestCaseError::fail("not an update"));
            };
            let (ids, changed) = owned_maps(&view);
            prop_assert_eq!(ids, identifiers);
            prop_assert_eq!(changed, traits);
        }
    }

    proptest! {
        /// Whatever follows a marker byte reads as a record or as an
        /// error: a corrupt record cannot crash a stage.
        #[test]
        fn any_bytes_read_or_fail(body in prop::collection::vec(any::<u8>(), 0..64)) {
            for marker in [EVENT_V1, UPDATE_V1] {
                let mut bytes = vec![marker];
                bytes.extend_from_slice(&body);
                let _ = ProfileRecord::from_bytes(&bytes);
                let _ = ProfileUpdate::from_bytes(&bytes);
                let _ = crate::messages::ProfileRecordSummary::from_bytes(&bytes);
                let _ = view_update(&bytes);
            }
        }
    }
}
