//! The records that flow between stages, and the public audience-change
//! contract. Everything here is plain serde data; on the wire it is JSON,
//! but for the two records that carry every event between the profile
//! stages, which are binary ([`wire`]).
//!
//! Topics and their records:
//! - `<p>.raw`, `<p>.valid`: a Segment-spec event (JSON object), source id
//!   in the `cdp-source` header. `valid` events are normalized: `page` and
//!   `screen` carry `event: "Page Viewed"` / `"Screen Viewed"`.
//! - `<p>.identified`: [`ProfileRecord`], keyed by profile id
//!   ([`ProfileRecord::to_bytes`], [`ProfileRecord::from_bytes`]).
//! - `<p>.traits`: [`ProfileUpdate`], keyed by profile id (likewise).
//! - `<p>.audiences`: [`AudienceChange`], keyed by profile id.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

pub mod wire;

/// Identifier type → values, e.g. `{"user_id": ["u_42"], "email": [...]}`.
pub type Identifiers = BTreeMap<String, Vec<String>>;

/// A Segment event inside a stage's record: the parsed tree the stage
/// reads, and, when it was read from a record's bytes, those bytes, which
/// is what it writes back out. The traits stage forwards every event it
/// reads in its update; writing the text it came as (valid JSON, checked
/// when read) skips re-encoding the whole event per record.
///
/// The traits and audiences stages keep only the part of the tree they
/// read (`profile_keyed::EventPaths`); the text is always the whole event.
///
/// Equal when the trees are: the text is an encoding of the same event
/// (identity writes it as the collector received it, so it may differ
/// from what `serde_json` would write in spacing or escapes, never in
/// meaning). Deserializing reads the tree alone; the stages' fast input
/// paths ([`crate::profile_keyed`]) keep the text as well.
#[derive(Clone, Default)]
pub struct EventJson {
    value: Value,
    /// JSON text, checked when read (the stage's parse of its tree reads
    /// the whole text).
    text: Option<Box<str>>,
    /// The event filters of the audiences stage it passed, matched by the
    /// traits stage: their fingerprint and the indexes of those passed
    /// (see `EventJson::keep_matched`). Not part of the event's meaning.
    matched: Option<Box<(u64, Vec<u32>)>>,
}

impl EventJson {
    /// The event as `value`, a tree read from `text` (the traits stage's
    /// holds only the paths it reads), written back out as `text`.
    pub(crate) fn with_text(value: Value, text: Box<str>) -> Self {
        EventJson {
            value,
            text: Some(text),
            matched: None,
        }
    }

    /// An event an audiences stage read as matched already: its text, to
    /// write back out, and no tree.
    pub(crate) fn matched_only(text: Box<str>, fingerprint: u64, matched: Vec<u32>) -> Self {
        EventJson {
            value: Value::Null,
            text: Some(text),
            matched: Some(Box::new((fingerprint, matched))),
        }
    }

    /// Keep the indexes of the event filters (fingerprint `fingerprint`)
    /// this event passed: an audiences stage of those very filters reads
    /// them instead of parsing the event. One of other filters (another
    /// config during a rolling change) parses the event's text. (The
    /// traits stage writes its updates from parts, `wire::UpdateOut`, with
    /// the matches beside the event; tests build such events with this.)
    #[cfg(test)]
    pub(crate) fn keep_matched(&mut self, fingerprint: u64, matched: Vec<u32>) {
        self.matched = Some(Box::new((fingerprint, matched)));
    }

    /// The filters kept with `EventJson::keep_matched`, with their
    /// fingerprint.
    pub(crate) fn matched(&self) -> Option<(u64, &[u32])> {
        self.matched.as_deref().map(|(f, m)| (*f, m.as_slice()))
    }

    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The JSON text the event was read from, if it was.
    pub fn text(&self) -> Option<&str> {
        self.text.as_deref()
    }
}

impl From<Value> for EventJson {
    fn from(value: Value) -> Self {
        EventJson {
            value,
            text: None,
            matched: None,
        }
    }
}

impl std::ops::Deref for EventJson {
    type Target = Value;

    fn deref(&self) -> &Value {
        &self.value
    }
}

impl PartialEq for EventJson {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl PartialEq<Value> for EventJson {
    fn eq(&self, other: &Value) -> bool {
        self.value == *other
    }
}

impl std::fmt::Debug for EventJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value.fmt(f)
    }
}

/// As JSON, the text it was read from (checked again here: JSON records
/// that carry an event are the rare ones, [`wire`] writes the common
/// ones), else its tree.
impl Serialize for EventJson {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.text {
            Some(text) => RawValue::from_string(text.to_string())
                .map_err(serde::ser::Error::custom)?
                .serialize(serializer),
            None => self.value.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for EventJson {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(EventJson::from)
    }
}

/// Why a record exists: the event (by `messageId`) or the tick that caused it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Cause {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Stream time (ms) of the tick, for changes caused by time alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tick: Option<i64>,
}

/// On `<p>.identified`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProfileRecord {
    /// An event resolved to its profile. `identifiers` is every identifier
    /// the profile has after this event.
    Event {
        profile_id: String,
        identifiers: Identifiers,
        event: EventJson,
        /// Identifiers of this event that a rule refused (identity counts
        /// them in `cdp_identity_dropped_identifiers_total`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        dropped: Vec<DroppedIdentifier>,
        /// The profiles this event merged into `profile_id`. Every
        /// profile-keyed stage folds in their transferred states before it
        /// evaluates the event (see [`crate::profile_keyed`]).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        merged_from: Vec<String>,
    },
    /// Profile `from` was merged into `into` (keyed by `from`).
    Merged {
        from: String,
        into: String,
        identifiers: Identifiers,
        cause: Cause,
        /// The merging event names `from` in its `merged_from`: the
        /// survivor waits for this merge's transfer. `false` on records
        /// written before events carried `merged_from`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        announced: bool,
        /// The merging event's time (ms, as it came: each stage bounds it
        /// as it bounds event times), so the merged-away profile's exits
        /// carry the time the survivor's entries do. `None` on records
        /// written before merges carried it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<i64>,
    },
    /// A stage moving the state of merged-away `from` to the survivor's
    /// partition (keyed by `into`). Written by the stage into its own input
    /// topic; `stage` names the writer, other stages ignore it.
    Transfer {
        stage: String,
        from: String,
        into: String,
        state: Value,
        cause: Cause,
        /// The survivor's merging event waits for this transfer (see
        /// `Merged::announced`); otherwise it is folded in on arrival.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        announced: bool,
    },
}

/// The kind of a [`ProfileRecord`]: its `type` tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileRecordKind {
    Event,
    Merged,
    Transfer,
}

/// What identity's metrics count in a [`ProfileRecord`], read without
/// building the rest: every other field (the event above all) is skipped
/// unparsed. Reading the whole record through serde's internally tagged
/// enum buffers it twice and was ~18% of identity's stage thread.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ProfileRecordSummary {
    #[serde(rename = "type")]
    pub kind: ProfileRecordKind,
    /// [`ProfileRecord::Event`]'s `dropped`.
    #[serde(default)]
    pub dropped: Vec<DroppedIdentifier>,
}

/// On `<p>.traits`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProfileUpdate {
    /// What changed for a profile: the event (when an event caused it) and
    /// the trait values that changed (computed and identify traits alike;
    /// `null` means the trait no longer has a value).
    Update {
        profile_id: String,
        identifiers: Identifiers,
        #[serde(skip_serializing_if = "Option::is_none")]
        event: Option<EventJson>,
        traits: BTreeMap<String, Value>,
        /// Event time (ms) of the event, or the tick's stream time.
        event_time: i64,
        /// The event's own time when it was too far ahead of the stream and
        /// `event_time` replaced it (see `event_time.max_future`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        time_corrected_from: Option<i64>,
        cause: Cause,
        /// The merging event's `merged_from`, passed on: the audiences
        /// stage folds in those profiles' states before evaluating.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        merged_from: Vec<String>,
        /// Until when (ms, exclusive) the windowed trait values this
        /// profile's updates carried stay right: the traits stage's next
        /// window expiry for the profile, when it sends the next update
        /// whether or not a value changed. `None`: no windowed value can
        /// change with time. The audiences stage does not evaluate an
        /// audience that reads traits at or past it (see
        /// docs/ARCHITECTURE.md, "Windowed traits and the audiences clock").
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traits_until: Option<i64>,
    },
    Merged {
        from: String,
        into: String,
        identifiers: Identifiers,
        cause: Cause,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        announced: bool,
        /// As [`ProfileRecord::Merged`]'s.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<i64>,
    },
    Transfer {
        stage: String,
        from: String,
        into: String,
        state: Value,
        cause: Cause,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        announced: bool,
    },
}

impl ProfileRecord {
    /// The record as a stage writes it to `<p>.identified`: an event in
    /// the binary form ([`wire`]), any other record as JSON.
    pub fn to_bytes(&self) -> Result<Vec<u8>, wire::RecordError> {
        match wire::encode_record(self) {
            Some(bytes) => bytes,
            None => Ok(serde_json::to_vec(self)?),
        }
    }

    /// A record of `<p>.identified` in either form, its event's whole tree.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, wire::RecordError> {
        match bytes.split_first() {
            Some((&wire::EVENT_V1, rest)) => wire::decode_event(rest, |t| serde_json::from_str(t)),
            _ => Ok(serde_json::from_slice(bytes)?),
        }
    }
}

impl ProfileRecordSummary {
    /// The summary of a record of `<p>.identified` in either form.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, wire::RecordError> {
        match bytes.split_first() {
            Some((&wire::EVENT_V1, rest)) => Ok(ProfileRecordSummary {
                kind: ProfileRecordKind::Event,
                dropped: wire::event_dropped(rest)?,
            }),
            _ => Ok(serde_json::from_slice(bytes)?),
        }
    }
}

impl ProfileUpdate {
    /// The record as the traits stage writes it to `<p>.traits`: an
    /// update in the binary form ([`wire`]), any other record as JSON.
    pub fn to_bytes(&self) -> Result<Vec<u8>, wire::RecordError> {
        match wire::encode_update(self) {
            Some(bytes) => bytes,
            None => Ok(serde_json::to_vec(self)?),
        }
    }

    /// A record of `<p>.traits` in either form, its event's whole tree.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, wire::RecordError> {
        match bytes.split_first() {
            Some((&wire::UPDATE_V1, rest)) => {
                wire::decode_update(rest, 0, |t| serde_json::from_str(t))
            }
            _ => Ok(serde_json::from_slice(bytes)?),
        }
    }
}

/// An identifier of an event that an identity rule refused, and why
/// (`blocked_value`, `blocked_pattern`, `invalid_type`, `limit`,
/// `max_merges`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DroppedIdentifier {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
    pub reason: String,
}

/// Whether a profile is live or was merged into another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileStatus {
    Active,
    Merged,
}

/// One merge into a profile: the merged-away profile, the event time of
/// the cause and its `messageId`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedFrom {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

/// One identifier a rule kept off a profile, on the profile's audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditDrop {
    #[serde(flatten)]
    pub identifier: DroppedIdentifier,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

/// The public contract on `<p>.profiles` (compacted, keyed by profile id):
/// the latest state of every profile identity has made. A consumer that
/// keeps the last record per key holds the whole identity graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileSnapshot {
    pub profile_id: String,
    /// `active`, or `merged` (then `merged_into` names the survivor).
    pub state: ProfileStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
    /// Every identifier of the profile (for a merged profile: what it held
    /// when it was merged away; they now belong to `merged_into`).
    pub identifiers: Identifiers,
    /// The profiles merged into this one, oldest first.
    #[serde(default)]
    pub merged_from: Vec<MergedFrom>,
    /// The most recent identifiers a rule kept off this profile.
    #[serde(default)]
    pub dropped: Vec<AuditDrop>,
    /// Merges this profile took part in, its history included (counted
    /// against `identity.max_merges`).
    #[serde(default)]
    pub merges: usize,
    /// Event time (RFC 3339) of the event that last changed the profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    pub cause: Cause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AudienceAction {
    Entered,
    Exited,
}

/// The public contract on `<p>.audiences`: one message per membership
/// change, keyed by profile id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudienceChange {
    /// Always `audience_change`.
    #[serde(rename = "type")]
    pub kind: String,
    pub audience: String,
    pub action: AudienceAction,
    pub profile_id: String,
    pub identifiers: Identifiers,
    /// The traits the audience's conditions reference.
    pub traits: BTreeMap<String, Value>,
    /// RFC 3339 time of the event (or tick) that changed the membership.
    pub event_time: String,
    /// RFC 3339 wall-clock time the change was computed. The only field a
    /// replay may change.
    pub emitted_at: String,
    pub cause: Cause,
    /// For an exit because the profile was merged into another: that
    /// profile (whose own changes follow for the same person).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
}

/// Output names the operators emit to; the binary maps them to topics.
pub mod outputs {
    /// The next stage's topic.
    pub const NEXT: &str = "next";
    /// The stage's own input topic (merge transfers, redirects).
    pub const SELF: &str = "self";
    /// Identity's profile snapshots (`<p>.profiles`).
    pub const PROFILES: &str = "profiles";
}

/// Milliseconds after the last one `humantime` formats (the end of 9999).
const HUMANTIME_END_MS: u64 = 253_402_300_800_000;

/// Milliseconds since the epoch → RFC 3339 with milliseconds, UTC.
///
/// Every audience change carries two of these and the collector stamps
/// every event's `receivedAt`: times from 1970 to 9999 are written by
/// `humantime` (fixed-width digits into a buffer; chrono's formatter,
/// general over formats and time zones, was 4.7% of the audiences
/// operator bench); times before 1970 (`humantime` takes none) and past
/// 9999 by chrono. Both write the same text (a property test compares
/// them).
pub fn rfc3339_ms(ms: i64) -> String {
    if let Some(after) = u64::try_from(ms).ok().filter(|ms| *ms < HUMANTIME_END_MS) {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(after);
        return humantime::format_rfc3339_millis(at).to_string();
    }
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".into())
}

/// Parse a time as milliseconds since the epoch: RFC 3339 (with a `T`,
/// `t` or space between date and time), and the ISO 8601 forms clients
/// send besides (Segment's spec asks only for "ISO 8601"): an offset
/// without a colon (`+0000`, Java's `SimpleDateFormat`, PHP's
/// `DATE_ISO8601`) or with hours only (`+01`), a time without an offset
/// (read as UTC), and a date alone (midnight UTC).
pub fn parse_time_ms(s: &str) -> Option<i64> {
    parse_time(s).map(|(ms, _)| ms)
}

/// [`parse_time_ms`], and whether the text was RFC 3339 already.
pub fn parse_time(s: &str) -> Option<(i64, bool)> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some((t.timestamp_millis(), true));
    }
    iso8601_ms(s.trim()).map(|ms| (ms, false))
}

/// The ISO 8601 forms of [`parse_time_ms`] beyond RFC 3339.
fn iso8601_ms(s: &str) -> Option<i64> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime};
    // `%z` takes `+hhmm` and `+hh:mm`; `%#z` also `+hh`.
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%dT%H:%M%#z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, format) {
            return Some(t.timestamp_millis());
        }
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Some(t.and_utc().timestamp_millis());
        }
    }
    let date = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

/// What the stages read of an event: the value at a dotted path. A whole
/// tree (`serde_json::Value`) answers every path; a profile stage's
/// partial tree ([`crate::profile_keyed::EventTree`]) the paths it was
/// parsed for.
pub trait EventRead {
    /// The value at a dotted path such as `properties.revenue`.
    fn lookup(&self, path: &str) -> Option<&Value>;
    /// The value of a top-level field (its name is not split at dots).
    fn field(&self, key: &str) -> Option<&Value>;
}

impl EventRead for Value {
    fn lookup(&self, path: &str) -> Option<&Value> {
        lookup(self, path)
    }

    fn field(&self, key: &str) -> Option<&Value> {
        field(self, key)
    }
}

/// The event time of a Segment event: `timestamp`, else `receivedAt`.
pub fn event_time_ms<E: EventRead + ?Sized>(event: &E) -> Option<i64> {
    ["timestamp", "receivedAt", "originalTimestamp"]
        .iter()
        .find_map(|f| {
            event
                .field(f)
                .and_then(Value::as_str)
                .and_then(parse_time_ms)
        })
}

/// The event name a Segment event counts as: `event` for track, `Page
/// Viewed` for page, `Screen Viewed` for screen.
pub fn event_name<E: EventRead + ?Sized>(event: &E) -> Option<&str> {
    match event.field("type").and_then(Value::as_str) {
        Some("track") => event.field("event").and_then(Value::as_str),
        Some("page") => Some("Page Viewed"),
        Some("screen") => Some("Screen Viewed"),
        _ => None,
    }
}

/// Look up a dotted path such as `properties.revenue` or
/// `context.campaign.source`.
pub fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    // Split at each `.` by hand: `str::split`'s searcher cost ~90
    // instructions a part, 1.5% of the traits stage's batches (each
    // trait's property and conditions are looked up in every event).
    let mut at = value;
    let mut rest = path;
    loop {
        match split_path(rest) {
            (part, Some(more)) => {
                at = field(at, part)?;
                rest = more;
            }
            (last, None) => return field(at, last),
        }
    }
}

/// A dotted path's first name and what follows its dot (`None`: the name
/// is the last). `.` is one byte: both sides are whole characters.
pub(crate) fn split_path(path: &str) -> (&str, Option<&str>) {
    match path.bytes().position(|b| b == b'.') {
        Some(dot) => (&path[..dot], Some(&path[dot + 1..])),
        None => (path, None),
    }
}

/// The value under `key` of an object (`None` for anything else), found
/// by comparing keys in order. `Value::get` hashes the key with SipHash
/// first (the workspace's `serde_json` keeps key order, so its objects are
/// `IndexMap`s): ~370 instructions a lookup, where an event's objects (a
/// stage's partial tree, or a Segment event's dozen top-level fields) are
/// small enough that comparing lengths, then bytes, finds the key in a
/// fraction of that.
pub fn field<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    value
        .as_object()?
        .iter()
        .find_map(|(k, v)| (k.as_str() == key).then_some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn iso_8601_forms_clients_send_are_read_and_others_are_not() {
        let at = |s: &str| parse_time_ms(s).map(rfc3339_ms);
        let utc = Some("2026-12-03T16:00:00.000Z".to_string());
        for same in [
            "2026-12-03T16:00:00Z",
            "2026-12-03T16:00:00.000+0000",
            "2026-12-03T17:00:00+0100",
            "2026-12-03T17:00:00+01",
            "2026-12-03T11:00:00.000-05:00",
            "2026-12-03 16:00:00Z",
            "2026-12-03t16:00:00z",
            "2026-12-03T16:00:00",
            "2026-12-03 16:00:00.000",
            "2026-12-03T16:00",
            "2026-12-03T16:00Z",
            "2026-12-03T17:00+01:00",
            " 2026-12-03T16:00:00Z ",
        ] {
            assert_eq!(at(same), utc, "{same}");
        }
        assert_eq!(at("2026-12-03"), Some("2026-12-03T00:00:00.000Z".into()));
        assert_eq!(
            at("2026-12-03T16:00:00.123456+0000"),
            Some("2026-12-03T16:00:00.123Z".into())
        );
        for refused in [
            "",
            "yesterday",
            "2026-13-03",
            "2026-12-03T25:00:00Z",
            "1700000000",
            "12/03/2026",
        ] {
            assert_eq!(at(refused), None, "{refused}");
        }
    }

    #[test]
    fn time_helpers_round_trip_and_event_names_follow_segment() {
        let ms = parse_time_ms("2026-11-26T10:00:00.120Z");
        assert_eq!(
            ms.map(rfc3339_ms).as_deref(),
            Some("2026-11-26T10:00:00.120Z")
        );
        assert_eq!(event_name(&json!({"type": "page"})), Some("Page Viewed"));
        assert_eq!(
            event_name(&json!({"type": "track", "event": "X"})),
            Some("X")
        );
        assert_eq!(event_name(&json!({"type": "identify"})), None);
        let e = json!({"properties": {"revenue": 5}});
        assert_eq!(lookup(&e, "properties.revenue"), Some(&json!(5)));
        assert_eq!(lookup(&e, "properties.missing"), None);
    }

    #[test]
    fn profile_records_are_tagged_json() {
        let r = ProfileRecord::Merged {
            from: "a".into(),
            into: "b".into(),
            identifiers: Identifiers::new(),
            cause: Cause::default(),
            announced: false,
            at: None,
        };
        let v = serde_json::to_value(&r).unwrap_or_default();
        assert_eq!(v["type"], "merged");
    }

    proptest! {
        /// Every time, before 1970, in the common range and past 9999,
        /// reads as chrono's RFC 3339 with milliseconds writes it.
        #[test]
        fn a_time_is_written_as_chrono_writes_it(
            ms in prop_oneof![
                0i64..HUMANTIME_END_MS as i64,
                -62_135_596_800_000i64..0,
                HUMANTIME_END_MS as i64 - 5_000..HUMANTIME_END_MS as i64 + 400_000_000_000_000,
            ],
        ) {
            let chrono = chrono::DateTime::from_timestamp_millis(ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
            prop_assert_eq!(Some(rfc3339_ms(ms)), chrono);
        }
    }

    #[test]
    fn the_ends_of_the_common_range_are_written_as_chrono_writes_them() {
        for ms in [
            0,
            1,
            999,
            951_782_400_000,
            HUMANTIME_END_MS as i64 - 1,
            HUMANTIME_END_MS as i64,
            -1,
        ] {
            let chrono = chrono::DateTime::from_timestamp_millis(ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
            assert_eq!(Some(rfc3339_ms(ms)), chrono, "{ms}");
        }
    }

    proptest! {
        /// `field` finds what `serde_json`'s own lookup finds, in objects
        /// and in anything else.
        #[test]
        fn a_field_is_what_the_map_holds_under_its_key(
            pairs in prop::collection::vec(("[a-dé]{0,3}", any::<i64>()), 0..12),
            key in "[a-dé]{0,3}",
            scalar in any::<i64>(),
        ) {
            let object = Value::Object(pairs.into_iter().map(|(k, v)| (k, Value::from(v))).collect());
            prop_assert_eq!(field(&object, &key), object.get(&key));
            let other = json!([scalar, key.clone()]);
            prop_assert_eq!(field(&other, &key), None);
            let number = Value::from(scalar);
            prop_assert_eq!(field(&number, &key), None);
        }

        /// `lookup` walks the dotted path as `serde_json`'s own `get` does,
        /// one part at a time: empty parts, leading, trailing and repeated
        /// dots, non-ASCII names, paths through values that are no objects.
        #[test]
        fn a_path_is_looked_up_part_by_part(
            nested in prop::collection::vec(("[a-cé]{0,2}", "[a-cé]{0,2}", any::<i64>()), 0..8),
            scalars in prop::collection::vec(("[a-cé]{0,2}", any::<i64>()), 0..4),
            path in "[a-cé.]{0,7}",
        ) {
            let mut top = serde_json::Map::new();
            for (k, v) in scalars {
                top.insert(k, Value::from(v));
            }
            for (outer, inner, v) in nested {
                let slot = top.entry(outer).or_insert_with(|| json!({}));
                if let Some(object) = slot.as_object_mut() {
                    object.insert(inner, Value::from(v));
                }
            }
            let event = Value::Object(top);
            let mut expected = Some(&event);
            for part in path.split('.') {
                expected = expected.and_then(|at| at.as_object()).and_then(|o| o.get(part));
            }
            prop_assert_eq!(lookup(&event, &path), expected);
        }
    }

    fn arb_text() -> impl Strategy<Value = String> {
        // Quotes, escapes and the field names the summary looks for, so an
        // event that mentions them cannot pass for the record's own fields.
        prop_oneof![
            "[a-z\"\\\\é ]{0,8}",
            Just("dropped".to_string()),
            Just("type".to_string()),
            Just("merged".to_string()),
        ]
    }

    fn arb_dropped() -> impl Strategy<Value = Vec<DroppedIdentifier>> {
        prop::collection::vec(
            (arb_text(), arb_text(), arb_text()).prop_map(|(kind, value, reason)| {
                DroppedIdentifier {
                    kind,
                    value,
                    reason,
                }
            }),
            0..3,
        )
    }

    fn arb_record() -> impl Strategy<Value = ProfileRecord> {
        let event = || {
            prop::collection::btree_map(arb_text(), arb_text(), 0..4).prop_map(|m| {
                let mut e = serde_json::Map::new();
                for (k, v) in m {
                    // An event may carry fields named like the record's own.
                    e.insert(k, Value::String(v));
                }
                e.insert(
                    "dropped".into(),
                    json!([{"type": "t", "value": "v", "reason": "r"}]),
                );
                Value::Object(e)
            })
        };
        prop_oneof![
            (arb_text(), event(), arb_dropped()).prop_map(|(profile_id, event, dropped)| {
                ProfileRecord::Event {
                    profile_id,
                    identifiers: Identifiers::new(),
                    event: event.into(),
                    dropped,
                    merged_from: Vec::new(),
                }
            }),
            (arb_text(), arb_text()).prop_map(|(from, into)| ProfileRecord::Merged {
                from,
                into,
                identifiers: Identifiers::new(),
                cause: Cause::default(),
                announced: true,
                at: None,
            }),
            (arb_text(), event()).prop_map(|(from, state)| ProfileRecord::Transfer {
                stage: "traits".into(),
                from,
                into: "p".into(),
                state,
                cause: Cause::default(),
                announced: false,
            }),
        ]
    }

    proptest! {
        /// The summary identity's metrics read says what the whole record
        /// says: its kind, and an event's refused identifiers (never those
        /// of a field the event itself carries).
        #[test]
        fn a_summary_reads_what_the_whole_record_says(record in arb_record()) {
            let bytes = serde_json::to_vec(&record).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let summary: ProfileRecordSummary =
                serde_json::from_slice(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let (kind, dropped) = match &record {
                ProfileRecord::Event { dropped, .. } => (ProfileRecordKind::Event, dropped.clone()),
                ProfileRecord::Merged { .. } => (ProfileRecordKind::Merged, Vec::new()),
                ProfileRecord::Transfer { .. } => (ProfileRecordKind::Transfer, Vec::new()),
            };
            prop_assert_eq!(summary.kind, kind);
            prop_assert_eq!(summary.dropped, dropped);
        }
    }
}
