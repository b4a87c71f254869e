//! Batch splitting and per-event normalization: merge batch-level fields,
//! check what the edge must check, enrich.

use std::borrow::Cow;

use cdp_operators::messages::{parse_time, rfc3339_ms};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::error::CollectError;
use super::parse::{identifier, is_null, raw_string, string, BatchField, Fields, Node};
use super::{at, CollectorConfig, EventType, Item, Prepared};

/// Split a batch request into its items, merging batch-level `context`,
/// `integrations` and `sentAt` into each, and enforcing the count and
/// per-event size limits. A bad batch is an `Err`; a bad item is an `Err`
/// in its place (the request's other events still go through).
pub(super) fn split_batch<'a>(
    mut doc: Fields<'a>,
    batch: Option<BatchField<'a>>,
    cfg: &CollectorConfig,
    events: &mut usize,
) -> Result<Vec<Result<Item<'a>, CollectError>>, CollectError> {
    let batch = match batch {
        Some(BatchField::Items(batch)) => batch,
        Some(BatchField::NotAnArray) => {
            return Err(CollectError::invalid(
                "batch",
                "invalid_batch",
                "expected an array",
            ))
        }
        None => return Err(CollectError::invalid("batch", "invalid_batch", "required")),
    };
    *events = batch.len().max(1);
    if batch.len() > cfg.max_batch_events {
        return Err(CollectError::TooManyEvents {
            count: batch.len(),
            limit: cfg.max_batch_events,
        });
    }
    let context = doc.remove("context");
    let integrations = doc.remove("integrations");
    let sent_at = doc.remove("sentAt");
    let batch_fields = [
        ("context", context.as_ref()),
        ("integrations", integrations.as_ref()),
        ("sentAt", sent_at.as_ref()),
    ];
    Ok(batch
        .into_iter()
        .enumerate()
        .map(|(i, item)| batch_item(i, item, cfg, &batch_fields))
        .collect())
}

/// One item of a batch, checked and with the batch's fields merged in.
fn batch_item<'a>(
    i: usize,
    item: Node<'a>,
    cfg: &CollectorConfig,
    batch_fields: &[(&'static str, Option<&Cow<'a, RawValue>>)],
) -> Result<Item<'a>, CollectError> {
    let Node::Object(mut item) = item else {
        return Err(CollectError::invalid(
            at(Some(i)),
            "not_an_object",
            "expected a JSON object",
        ));
    };
    if item
        .get("type")
        .and_then(string)
        .and_then(|t| EventType::parse(&t))
        .is_none()
    {
        return Err(CollectError::invalid(
            format!("{}.type", at(Some(i))),
            "invalid_type",
            "expected identify, track, page, screen, group or alias",
        ));
    }
    for (field, value) in batch_fields {
        merge_missing(&mut item, field, *value)?;
    }
    // Measured as written: with the batch's `context` merged in, which
    // every event of the batch carries on its own from here on.
    if item.json_len() > cfg.max_event_bytes {
        return Err(CollectError::EventTooLarge {
            at: at(Some(i)),
            limit: cfg.max_event_bytes,
        });
    }
    Ok(Item {
        index: Some(i),
        fields: item,
    })
}

/// Give `item[field]` the batch-level value where the item lacks it; for
/// objects, key by key (the item's own keys win).
fn merge_missing<'a>(
    item: &mut Fields<'a>,
    field: &'static str,
    batch_value: Option<&Cow<'a, RawValue>>,
) -> Result<(), CollectError> {
    let Some(batch_value) = batch_value else {
        return Ok(());
    };
    let own = item.get(field);
    if own.is_none_or(is_null) {
        item.set(field, batch_value.clone());
        return Ok(());
    }
    let both_objects =
        own.is_some_and(|v| v.get().starts_with('{')) && batch_value.get().starts_with('{');
    if !both_objects {
        return Ok(());
    }
    // The rare case (a batch-level and an item-level object): merge as trees.
    let parse = |v: &str| {
        serde_json::from_str::<Map<String, Value>>(v)
            .map_err(|e| CollectError::Internal(e.to_string()))
    };
    let mut merged = parse(own.map_or("{}", RawValue::get))?;
    for (k, v) in parse(batch_value.get())? {
        merged.entry(k).or_insert(v);
    }
    let merged = serde_json::value::to_raw_value(&merged)
        .map_err(|e| CollectError::Internal(e.to_string()))?;
    item.set(field, Cow::Owned(merged));
    Ok(())
}

/// What the collector knows of a request when it enriches its events.
pub(super) struct Received<'r> {
    /// When it arrived (ms since the epoch), and that time as a JSON string.
    pub(super) ms: i64,
    pub(super) at: &'r RawValue,
    /// The client's address as a JSON string, for a client-side source's
    /// events without `context.ip`.
    pub(super) client_ip: Option<&'r RawValue>,
}

/// Check what the edge must check, then set `receivedAt`, `messageId`,
/// the skew-corrected `timestamp` and (client-side sources) `context.ip`.
/// The key is the anonymousId if present, else the userId, so one
/// visitor's events share a partition.
pub(super) fn enrich<'a>(
    mut event: Fields<'a>,
    received: &Received<'a>,
    index: Option<usize>,
) -> Result<Prepared, CollectError> {
    let (received_ms, received_at) = (received.ms, received.at);
    let key = identifier(event.get("anonymousId"))
        .or_else(|| identifier(event.get("userId")))
        .map(Cow::into_owned)
        .ok_or_else(|| {
            CollectError::invalid(
                at(index),
                "missing_id",
                "userId or anonymousId is required (a non-empty string or a number)",
            )
        })?;
    let is_track = event
        .get("type")
        .and_then(string)
        .is_some_and(|t| t == EventType::Track.as_str());
    let has_event_name = event
        .get("event")
        .and_then(string)
        .is_some_and(|e| !e.is_empty());
    if is_track && !has_event_name {
        return Err(CollectError::invalid(
            at(index),
            "missing_event",
            "a track call needs an event name",
        ));
    }
    // The write key is a credential: never let it reach the topic.
    event.remove("writeKey");
    if identifier(event.get("messageId")).is_none() {
        let id = format!("api-{}", uuid::Uuid::new_v4());
        event.set("messageId", raw_string(&id)?);
    }
    // An event that arrives with a `receivedAt` was received before: a
    // replayed archive (SDKs never send one). Read before it is replaced.
    let replayed_received = event
        .get("receivedAt")
        .and_then(string)
        .and_then(|s| parse_time(&s))
        .map(|(ms, _)| ms);
    event.set("receivedAt", Cow::Borrowed(received_at));
    // The rest of the spec, as the validate stage checks it (a group
    // without groupId, a bad timestamp, properties that are no object...):
    // refused here, where the sender still hears about it, not accepted and
    // dead-lettered later.
    let mut violations = cdp_operators::validate::spec_violations_raw(|k| event.get(k));
    violations.extend(too_deep(&event));
    violations.extend(out_of_range(&event));
    if !violations.is_empty() {
        let violations = violations
            .iter()
            .map(|v| format!("{}: {}", v.pointer, v.reason))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(CollectError::SpecViolation {
            at: at(index),
            violations,
        });
    }

    settle_timestamp(&mut event, received_ms, received_at, replayed_received)?;
    if let Some(ip) = received.client_ip {
        fill_context_ip(&mut event, ip)?;
    }
    let payload = event
        .to_json()
        .map_err(|e| CollectError::Internal(e.to_string()))?;
    Ok(Prepared { key, payload })
}

/// Set `timestamp`, the event's time, as Segment does:
/// - a client time (`timestamp`, else RudderStack's `originalTimestamp`)
///   with `sentAt` is corrected for the client's clock skew:
///   `receivedAt - (sentAt - client time)`, the client time kept as
///   `originalTimestamp`;
/// - a client time without `sentAt` is kept as sent (in RFC 3339);
/// - no client time: `receivedAt`.
///
/// A replayed event (one that arrived with its own `receivedAt`) was
/// corrected when it was first received: its `timestamp` is kept, and
/// without one the correction counts from that first `receivedAt`, not
/// from now (a backfill of an archive keeps its history's times).
fn settle_timestamp<'a>(
    event: &mut Fields<'a>,
    received_ms: i64,
    received_at: &'a RawValue,
    replayed_received: Option<i64>,
) -> Result<(), CollectError> {
    // (raw text, ms, whether it was RFC 3339 already)
    let time_of = |field: &str, event: &Fields<'a>| {
        event.get_cow(field).and_then(|raw| {
            let (ms, rfc3339) = string(&raw).and_then(|s| parse_time(&s))?;
            Some((raw, ms, rfc3339))
        })
    };
    let sent_ms = time_of("sentAt", event).map(|(_, ms, _)| ms);
    // `null` and `""` are no timestamp.
    let has_timestamp = event
        .get("timestamp")
        .is_some_and(|v| !is_null(v) && v.get() != "\"\"");
    // RudderStack SDKs send `originalTimestamp` instead of `timestamp`.
    let client = if has_timestamp {
        time_of("timestamp", event)
    } else {
        time_of("originalTimestamp", event)
    };
    // A replay's timestamp was corrected already.
    let sent_ms = sent_ms.filter(|_| !(has_timestamp && replayed_received.is_some()));
    let rfc3339 = |ms| raw_string(&rfc3339_ms(ms));
    match (client, sent_ms) {
        (Some((original, client_ms, _)), Some(sent_ms)) => {
            let base = replayed_received.unwrap_or(received_ms);
            let corrected = base.saturating_sub(sent_ms.saturating_sub(client_ms));
            event.set("timestamp", rfc3339(corrected)?);
            event.set("originalTimestamp", original);
        }
        // A client time without sentAt is kept as sent, in RFC 3339: the
        // other ISO 8601 forms the spec check reads (`+0000`, no offset, a
        // date alone) are written in RFC 3339 so that every reader, and
        // `<p>.profiles`' `updated_at`, sees one format.
        (Some((raw, ms, is_rfc3339)), None) => {
            if !is_rfc3339 || !has_timestamp {
                event.set("timestamp", if is_rfc3339 { raw } else { rfc3339(ms)? });
            }
        }
        // No client time: when it was (first) received.
        (None, _) => match replayed_received {
            Some(ms) => event.set("timestamp", rfc3339(ms)?),
            None => event.set("timestamp", Cow::Borrowed(received_at)),
        },
    }
    Ok(())
}

/// Set `context.ip` where the event has none (no `context`, or one without
/// `ip` or with `ip: null`), as Segment fills it for client-side
/// libraries; an `ip` the client sent (`0.0.0.0` to opt out) is kept.
fn fill_context_ip<'a>(event: &mut Fields<'a>, ip: &'a RawValue) -> Result<(), CollectError> {
    let context = match event.get("context") {
        Some(raw) if !is_null(raw) => raw.get(),
        _ => "{}",
    };
    let mut fields: Fields<'_> =
        serde_json::from_str(context).map_err(|e| CollectError::Internal(e.to_string()))?;
    if fields.get("ip").is_some_and(|v| !is_null(v)) {
        return Ok(());
    }
    fields.set("ip", Cow::Borrowed(ip));
    let json = fields
        .to_json()
        .map_err(|e| CollectError::Internal(e.to_string()))?;
    let raw = String::from_utf8(json)
        .map_err(|e| CollectError::Internal(e.to_string()))
        .and_then(|text| {
            RawValue::from_string(text).map_err(|e| CollectError::Internal(e.to_string()))
        })?;
    event.set("context", Cow::Owned(raw));
    Ok(())
}

/// Deepest nesting of objects and arrays the stages' JSON parser reads
/// (serde_json's recursion limit), the event's own object included.
const MAX_DEPTH: usize = 127;

/// The fields nested deeper than [`MAX_DEPTH`]: accepted here, such an
/// event could never pass the validate stage (nor a replay of it).
fn too_deep(event: &Fields<'_>) -> Vec<cdp_operators::validate::Violation> {
    let deep = MAX_DEPTH - 1;
    event
        .iter()
        // A value with fewer opening brackets than the limit (every real
        // event: a SIMD count) cannot nest that deep.
        .filter(|(_, raw)| {
            raw.get().len() >= 2 * deep
                && memchr::memchr2_iter(b'[', b'{', raw.get().as_bytes())
                    .nth(deep)
                    .is_some()
        })
        .filter(|(_, raw)| nesting(raw.get()) > deep)
        .map(|(key, _)| cdp_operators::validate::Violation {
            pointer: format!("/{}", key.replace('~', "~0").replace('/', "~1")),
            reason: format!("nested deeper than {MAX_DEPTH} levels of objects and arrays"),
        })
        .collect()
}

/// The fields holding a number no 64-bit float can hold (`1e400`, or an
/// integer of 310 digits): the body's values are kept as raw text here,
/// but the stages read numbers as floats and would dead-letter the event
/// (and every replay of it) as invalid JSON.
fn out_of_range(event: &Fields<'_>) -> Vec<cdp_operators::validate::Violation> {
    event
        .iter()
        .filter(|(_, raw)| has_out_of_range_number(raw.get()))
        .map(|(key, _)| cdp_operators::validate::Violation {
            pointer: format!("/{}", key.replace('~', "~0").replace('/', "~1")),
            reason: "holds a number out of range (beyond ±1.8e308)".to_string(),
        })
        .collect()
}

/// Whether valid JSON text holds a number that overflows an `f64` (numbers
/// inside strings do not count). Only a number with an exponent or more
/// than 300 digits can: the others are never parsed, the rest are read as
/// the stages read them.
fn has_out_of_range_number(json: &str) -> bool {
    let bytes = json.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // Skip the string: to its closing quote, past escapes.
                i += 1;
                while let Some(at) = memchr::memchr2(b'"', b'\\', &bytes[i..]) {
                    i += at + 1;
                    if bytes[i - 1] == b'"' {
                        break;
                    }
                    i += 1;
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                let mut exponent = false;
                while i < bytes.len()
                    && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    exponent |= matches!(bytes[i], b'e' | b'E');
                    i += 1;
                }
                let number = &json[start..i];
                // serde_json's own reading: it overflows where an exact
                // one would not (`179769313486231570000e288`).
                if (exponent || number.len() > 300) && serde_json::from_str::<f64>(number).is_err()
                {
                    return true;
                }
            }
            _ => i += 1,
        }
    }
    false
}

/// How deep objects and arrays nest in valid JSON text (brackets inside
/// strings do not count).
fn nesting(json: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdp_operators::messages::parse_time_ms;
    use serde_json::json;

    use crate::collector::testkit::*;

    /// Enrich one event given as JSON text, as the collector would.
    fn enrich_text(text: &str, received_ms: i64) -> Result<Prepared, BoxError> {
        let fields: Fields = serde_json::from_str(text)?;
        let received_at = raw_string(&rfc3339_ms(received_ms)).map_err(|e| e.to_string())?;
        let received = Received {
            ms: received_ms,
            at: &received_at,
            client_ip: None,
        };
        Ok(enrich(fields, &received, None).map_err(|e| e.to_string())?)
    }

    #[test]
    fn skew_correction_and_defaults() -> TestResult {
        let received = parse_time_ms("2026-01-01T12:00:00.000Z").ok_or("time")?;
        let run = |v: Value| enrich_text(&v.to_string(), received);
        let decode = |p: Prepared| serde_json::from_slice::<Value>(&p.payload);

        // Client clock 1h behind: sentAt and timestamp both from that clock.
        let skewed = json!({"type": "track", "event": "E", "userId": "u",
            "timestamp": "2026-01-01T10:59:50.000Z", "sentAt": "2026-01-01T11:00:00.000Z"});
        let v = decode(run(skewed)?)?;
        assert_eq!(str_field(&v, "timestamp"), "2026-01-01T11:59:50.000Z");
        assert_eq!(
            str_field(&v, "originalTimestamp"),
            "2026-01-01T10:59:50.000Z"
        );

        // RudderStack style: originalTimestamp + sentAt.
        let rudder = json!({"type": "page", "anonymousId": "a",
            "originalTimestamp": "2026-01-01T11:00:00.000Z", "sentAt": "2026-01-01T11:00:01.000Z"});
        let v = decode(run(rudder)?)?;
        assert_eq!(str_field(&v, "timestamp"), "2026-01-01T11:59:59.000Z");

        // Timestamp without sentAt is kept; none at all becomes receivedAt.
        let kept = json!({"type": "identify", "userId": 42, "timestamp": "2025-05-05T00:00:00Z", "messageId": "m"});
        let p = run(kept)?;
        assert_eq!(p.key, "42");
        let v = decode(p)?;
        assert_eq!(str_field(&v, "timestamp"), "2025-05-05T00:00:00Z");
        assert_eq!(str_field(&v, "messageId"), "m");
        let bare = json!({"type": "identify", "userId": "u", "anonymousId": ""});
        let p = run(bare)?;
        assert_eq!(p.key, "u", "an empty anonymousId does not count");
        let v = decode(p)?;
        assert_eq!(str_field(&v, "timestamp"), "2026-01-01T12:00:00.000Z");
        assert_eq!(str_field(&v, "receivedAt"), "2026-01-01T12:00:00.000Z");
        // A null timestamp counts as none.
        let null = json!({"type": "identify", "userId": "u", "timestamp": null,
            "sentAt": "2026-01-01T11:00:00.000Z"});
        let v = decode(run(null)?)?;
        assert_eq!(str_field(&v, "timestamp"), "2026-01-01T12:00:00.000Z");
        // So does an empty one; RudderStack's originalTimestamp then counts.
        let empty = json!({"type": "identify", "userId": "u", "timestamp": "",
            "originalTimestamp": "2026-01-01T10:59:00.000Z",
            "sentAt": "2026-01-01T11:00:00.000Z"});
        let v = decode(run(empty)?)?;
        assert_eq!(str_field(&v, "timestamp"), "2026-01-01T11:59:00.000Z");
        // originalTimestamp without sentAt is the client's time, as sent.
        let original = json!({"type": "track", "event": "E", "userId": "u",
            "originalTimestamp": "2025-11-01T08:00:00.000Z"});
        let v = decode(run(original)?)?;
        assert_eq!(str_field(&v, "timestamp"), "2025-11-01T08:00:00.000Z");
        Ok(())
    }

    /// An event that arrives with its own `receivedAt` is a replay (an
    /// archive sent again): its times are those of its first receipt, not
    /// moved to now by a second skew correction.
    #[test]
    fn replayed_events_keep_their_history_s_times() -> TestResult {
        let received = parse_time_ms("2026-01-01T12:00:00.000Z").ok_or("time")?;
        let run = |v: Value| -> Result<Value, BoxError> {
            Ok(serde_json::from_slice(
                &enrich_text(&v.to_string(), received)?.payload,
            )?)
        };
        // Segment's archive: a corrected timestamp with every other time.
        let archived = json!({"type": "track", "event": "E", "userId": "u",
            "timestamp": "2025-11-01T08:00:05.000Z", "originalTimestamp": "2025-11-01T08:00:00.000Z",
            "sentAt": "2025-11-01T08:00:01.000Z", "receivedAt": "2025-11-01T08:00:06.000Z"});
        let v = run(archived)?;
        assert_eq!(str_field(&v, "timestamp"), "2025-11-01T08:00:05.000Z");
        assert_eq!(str_field(&v, "receivedAt"), "2026-01-01T12:00:00.000Z");
        // Without a timestamp: corrected from the first receipt.
        let uncorrected = json!({"type": "track", "event": "E", "userId": "u",
            "originalTimestamp": "2025-11-01T08:00:00.000Z",
            "sentAt": "2025-11-01T08:00:01.000Z", "receivedAt": "2025-11-01T08:00:06.000Z"});
        assert_eq!(
            str_field(&run(uncorrected)?, "timestamp"),
            "2025-11-01T08:00:05.000Z"
        );
        // With no client time at all: the first receipt.
        let bare = json!({"type": "track", "event": "E", "userId": "u",
            "receivedAt": "2025-11-01T08:00:06.000Z"});
        assert_eq!(
            str_field(&run(bare)?, "timestamp"),
            "2025-11-01T08:00:06.000Z"
        );
        // A receivedAt that is no time is replaced, as before.
        let junk = json!({"type": "track", "event": "E", "userId": "u", "receivedAt": "never"});
        assert_eq!(
            str_field(&run(junk)?, "timestamp"),
            "2026-01-01T12:00:00.000Z"
        );
        Ok(())
    }

    /// ISO 8601 times beyond RFC 3339 (what Java's `SimpleDateFormat` and
    /// PHP's `DATE_ISO8601` write, no offset, a date alone) are taken and
    /// written in RFC 3339; RFC 3339 itself is kept as sent.
    #[test]
    fn iso_8601_timestamps_are_taken_and_written_in_rfc_3339() -> TestResult {
        let received = parse_time_ms("2026-01-01T12:00:00.000Z").ok_or("time")?;
        let run = |ts: &str| -> Result<String, BoxError> {
            let e = json!({"type": "track", "event": "E", "userId": "u", "timestamp": ts});
            let v: Value = serde_json::from_slice(&enrich_text(&e.to_string(), received)?.payload)?;
            Ok(str_field(&v, "timestamp").to_string())
        };
        for (sent, written) in [
            ("2025-12-03T16:00:00.000+0000", "2025-12-03T16:00:00.000Z"),
            ("2025-12-03T17:00:00+01", "2025-12-03T16:00:00.000Z"),
            ("2025-12-03T16:00:00", "2025-12-03T16:00:00.000Z"),
            ("2025-12-03", "2025-12-03T00:00:00.000Z"),
            (
                "2025-12-03T16:00:00.123456+02:00",
                "2025-12-03T16:00:00.123456+02:00",
            ),
        ] {
            assert_eq!(run(sent)?, written, "{sent}");
        }
        Ok(())
    }

    /// What breaks the spec is refused here with the field's pointer and
    /// reason, as the validate stage would have dead-lettered it.
    #[test]
    fn spec_violations_are_refused_at_the_edge() -> TestResult {
        let received = parse_time_ms("2026-01-01T12:00:00.000Z").ok_or("time")?;
        let cases = [
            (
                json!({"type": "group", "anonymousId": "a"}),
                "/groupId: group calls need a groupId",
            ),
            (
                json!({"type": "alias", "userId": "u"}),
                "/previousId: alias calls need a previousId",
            ),
            (
                json!({"type": "track", "event": "E", "userId": "u", "properties": "x"}),
                "/properties: must be an object",
            ),
            (
                json!({"type": "track", "event": "E", "userId": "u", "messageId": 12}),
                "/messageId: must be a string",
            ),
            (
                json!({"type": "identify", "userId": "u", "timestamp": "yesterday",
                "sentAt": "2026-01-01T11:00:00.000Z"}),
                "/timestamp: must be an ISO 8601 date-time",
            ),
            (
                json!({"type": "identify", "userId": "u", "sentAt": "soon"}),
                "/sentAt: must be an ISO 8601 date-time",
            ),
            (
                json!({"type": "identify", "userId": {"id": 1}, "anonymousId": "a"}),
                "/userId: must be a string or a number",
            ),
        ];
        for (event, expected) in cases {
            let json = event.to_string();
            let fields: Fields = serde_json::from_str(&json)?;
            let received_at = raw_string(&rfc3339_ms(received)).map_err(|e| e.to_string())?;
            let received = Received {
                ms: received,
                at: &received_at,
                client_ip: None,
            };
            match enrich(fields, &received, Some(3)) {
                Err(e) => {
                    assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{event}");
                    assert_eq!(e.reason(), "spec_violation", "{event}");
                    let text = e.to_string();
                    assert!(
                        text.starts_with("batch[3]: breaks the Segment spec: "),
                        "{text}"
                    );
                    assert!(text.contains(expected), "{event}: {text}");
                }
                Ok(_) => return Err(format!("{event} was accepted").into()),
            }
        }
        // Numbers are ids too, and a bad receivedAt is the collector's to set.
        let fine = json!({"type": "group", "userId": 7, "groupId": 9, "receivedAt": "never"});
        enrich_text(&fine.to_string(), received)?;
        Ok(())
    }

    #[test]
    fn events_nested_too_deep_for_the_stages_are_refused_at_the_edge() -> TestResult {
        let received = parse_time_ms("2026-01-01T12:00:00.000Z").ok_or("time")?;
        for depth in 120..134 {
            for (open, close) in [("[", "]"), ("{\"k\":", "}")] {
                // Brackets inside strings do not nest.
                let inner = format!("{}\"[[{{\\\"\"{}", open.repeat(depth), close.repeat(depth));
                let text = format!(
                    r#"{{"type":"track","event":"E","userId":"u","properties":{{"x":{inner}}}}}"#
                );
                // What the validate stage's parser takes is the oracle.
                let stages_take = serde_json::from_str::<serde_json::Value>(&text).is_ok();
                match enrich_text(&text, received) {
                    Ok(_) => assert!(
                        stages_take,
                        "accepted at depth {depth}, which validate refuses"
                    ),
                    Err(e) => {
                        assert!(!stages_take, "refused at depth {depth}: {e}");
                        assert!(
                            e.to_string()
                                .contains("/properties: nested deeper than 127 levels"),
                            "{e}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// A number past `f64` is refused at the edge with its field, as
    /// the stages' parser (serde_json's, the oracle) would refuse the
    /// event; a number inside a string, or one that only underflows, is not.
    #[test]
    fn numbers_out_of_range_are_refused_at_the_edge() -> TestResult {
        let received = parse_time_ms("2026-01-01T12:00:00.000Z").ok_or("time")?;
        let refused = |value: &str| -> Result<Option<String>, BoxError> {
            let text = format!(
                r#"{{"type":"track","event":"E","userId":"u","properties":{{"v":{value},"s":"1e999"}}}}"#
            );
            let stages_take = serde_json::from_str::<serde_json::Value>(&text).is_ok();
            Ok(match enrich_text(&text, received) {
                Ok(_) if stages_take => None,
                Ok(_) => Some(format!("{value}: accepted, which validate refuses")),
                Err(e) if !stages_take => {
                    let e = e.to_string();
                    (!e.contains("/properties: holds a number out of range"))
                        .then(|| format!("{value}: {e}"))
                }
                Err(e) => Some(format!("{value}: refused, which validate takes: {e}")),
            })
        };
        let mut cases: Vec<String> = [
            "1e400",
            "-1e400",
            "1E+309",
            "1.7e308",
            "1e-400",
            "-0.0e-999",
            "[1,2e308]",
            "{\"a\":[0.5e309]}",
            "179769313486231570000e288",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        cases.push("9".repeat(308));
        cases.push("9".repeat(309));
        cases.push(format!("-{}.5", "1".repeat(320)));
        let problems = cases
            .iter()
            .map(|c| refused(c))
            .collect::<Result<Vec<_>, _>>()?;
        let problems: Vec<String> = problems.into_iter().flatten().collect();
        assert!(problems.is_empty(), "{problems:#?}");
        assert!(enrich_text(
            r#"{"type":"track","event":"E","userId":"u","properties":{"v":1e400}}"#,
            received
        )
        .is_err());
        Ok(())
    }

    proptest::proptest! {
        /// Any number text, inside or outside strings and arrays: refused
        /// exactly when serde_json (the stages' parser) refuses the event.
        #[test]
        fn the_range_check_agrees_with_the_stages_parser(
            sign in proptest::bool::ANY,
            int in "[1-9][0-9]{0,330}",
            frac in proptest::option::of("[0-9]{1,20}"),
            exp in proptest::option::of(-700i32..700),
            quoted in proptest::bool::ANY,
        ) {
            let mut number = format!("{}{int}", if sign { "-" } else { "" });
            if let Some(frac) = frac {
                number = format!("{number}.{frac}");
            }
            if let Some(exp) = exp {
                number = format!("{number}e{exp}");
            }
            let value = if quoted { format!("[\"{number}\\\"\"]") } else { format!("[{number}]") };
            let text = format!(r#"{{"type":"track","event":"E","userId":"u","properties":{{"v":{value}}}}}"#);
            let stages_take = serde_json::from_str::<serde_json::Value>(&text).is_ok();
            let received = parse_time_ms("2026-01-01T12:00:00.000Z").unwrap_or_default();
            proptest::prop_assert_eq!(enrich_text(&text, received).is_ok(), stages_take, "{}", text);
        }
    }

    #[test]
    fn events_are_copied_through_verbatim_with_their_field_order() -> TestResult {
        let received = parse_time_ms("2026-01-01T12:00:00.000Z").ok_or("time")?;
        // Whitespace, escapes in keys and values, unicode, deep nesting,
        // numbers that a float would round, and a key sent twice.
        let text = r#" { "userId" : "u\"1\u00e9" , "type":"track", "event": "Caf\u00e9 \u2615",
            "properties": {"big": 12345678901234567890123, "nested": [ {"a": [1, 2.50, null]} ],
            "q\"k": "v"}, "weird\nkey": true, "event": "Second", "writeKey": "wk_secret",
            "messageId": "m7" } "#;
        let p = enrich_text(text, received)?;
        assert_eq!(p.key, "u\"1é");
        let out = std::str::from_utf8(&p.payload)?;
        // Nested values are the client's own text, byte for byte.
        assert!(
            out.contains(r#""properties":{"big": 12345678901234567890123, "nested": [ {"a": [1, 2.50, null]} ],
            "q\"k": "v"}"#),
            "{out}"
        );
        let v: Value = serde_json::from_slice(&p.payload)?;
        let keys: Vec<&str> = v
            .as_object()
            .ok_or("object")?
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "userId",
                "type",
                "event",
                "properties",
                "weird\nkey",
                "messageId",
                "receivedAt",
                "timestamp"
            ]
        );
        assert_eq!(
            str_field(&v, "event"),
            "Second",
            "the last of a repeated key wins"
        );
        assert!(v.get("writeKey").is_none());
        assert_eq!(
            v["messageId"],
            json!("m7"),
            "the client's messageId is kept"
        );
        assert_eq!(v["weird\nkey"], json!(true));
        assert_eq!(v.pointer("/properties/q\"k"), Some(&json!("v")));

        // `set` leaves one occurrence, in place of the last.
        let mut fields: Fields = serde_json::from_str(r#"{"a": 1, "b": 2, "a": 3, "c": 4}"#)?;
        fields.set("a", raw_string("x").map_err(|e| e.to_string())?);
        assert_eq!(
            std::str::from_utf8(&fields.to_json()?)?,
            r#"{"b":2,"a":"x","c":4}"#
        );
        assert_eq!(fields.json_len(), fields.to_json()?.len());
        assert!(serde_json::from_str::<Fields>("[1]").is_err());
        Ok(())
    }
}
