//! Step 5: a `messageId` already seen from the same source within the
//! dedupe window is dropped; step 6 emits the rest.

use cdp_pipeline::envelope::SOURCE;
use cdp_pipeline::store::StoreError;
use cdp_pipeline::{Context, OperatorError, Record, Span};
use serde::{Deserialize, Serialize};

use crate::messages::outputs;

use super::ValidateOperator;

/// How long a `messageId` is remembered per source unless configured.
pub const DEFAULT_DEDUPE_WINDOW: Span = Span::from_secs(24 * 3600);

/// State key prefix of remembered message ids:
/// `dedupe/<source>/<key length>:<record key>/<messageId>` (before 3 Dec
/// 2026 `dedupe/<source>/<messageId>`: such entries still expire).
const DEDUPE_PREFIX: &str = "dedupe/";

/// What the store remembers per `dedupe/<source>/<messageId>`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct DedupeEntry {
    /// Event time (ms) of the first event with this id, if it had one.
    event_time: Option<i64>,
    /// Stream time (ms) at which the id is forgotten.
    expires_at: i64,
}

/// First byte of an entry in its binary form (then postcard). An entry
/// written as JSON, before, starts with `{`; both read.
const ENTRY_V1: u8 = 1;

impl DedupeEntry {
    /// The binary form: ~14 bytes where JSON took ~55, and ~600
    /// instructions less to write (2% of the validate stage's batch).
    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity(24);
        out.push(ENTRY_V1);
        postcard::to_extend(self, out).map_err(|e| StoreError::Decode(format!("dedupe entry: {e}")))
    }

    /// An entry in either form; `None` for bytes that are neither.
    fn decode(bytes: &[u8]) -> Option<DedupeEntry> {
        match bytes.split_first() {
            Some((&ENTRY_V1, rest)) => postcard::from_bytes(rest).ok(),
            _ => serde_json::from_slice(bytes).ok(),
        }
    }
}

/// A `messageId` is remembered per source and per partition key (the raw
/// record's key: the `anonymousId`, else the `userId`), so an SDK's retry
/// is dropped and the same id sent for another person is not. The key's
/// length goes first, so no key and id can pass for another pair.
///
/// Built by concatenation: `format!` was ~1,100 instructions a key, 3% of
/// the validate stage's batch.
fn dedupe_key(source: &str, record_key: &[u8], message_id: &str) -> Vec<u8> {
    let mut len = itoa::Buffer::new();
    [
        DEDUPE_PREFIX.as_bytes(),
        source.as_bytes(),
        b"/",
        len.format(record_key.len()).as_bytes(),
        b":",
        record_key,
        b"/",
        message_id.as_bytes(),
    ]
    .concat()
}

impl ValidateOperator {
    /// Steps 5–6 for an event that passed: drop a repeated `messageId`,
    /// else remember it and emit `encode()`.
    pub(super) fn dedupe_and_emit(
        &self,
        record: &Record<'_>,
        ctx: &mut Context<'_>,
        source: &str,
        message_id: Option<&str>,
        event_time: Option<i64>,
        encode: impl FnOnce() -> Result<Vec<u8>, OperatorError>,
    ) -> Result<(), OperatorError> {
        let window = self.validator.dedupe_window.millis();
        let key = match message_id {
            Some(message_id) if window > 0 => {
                let key = dedupe_key(source, record.key.unwrap_or_default(), message_id);
                if ctx.get(&key)?.is_some() {
                    return Ok(());
                }
                Some(key)
            }
            _ => None,
        };
        let value = encode()?;
        if let Some(key) = key {
            // Stream time when the task has seen a tick; before that the
            // event's own time (then the broker's), so replays agree.
            let base = if ctx.now() > 0 {
                ctx.now()
            } else {
                event_time.or(record.timestamp_ms).unwrap_or(0)
            };
            let entry = DedupeEntry {
                event_time,
                expires_at: base.saturating_add(window),
            };
            ctx.put(&key, entry.encode()?);
            ctx.set_timer(entry.expires_at, &key);
        }
        ctx.emit_with_headers(
            outputs::NEXT,
            record.key.map(<[u8]>::to_vec),
            value,
            vec![(SOURCE.to_string(), source.as_bytes().to_vec())],
        );
        Ok(())
    }
}

/// Forget a remembered `messageId` whose window has passed.
pub(super) fn on_timer(key: &[u8], ctx: &mut Context<'_>) -> Result<(), OperatorError> {
    if !key.starts_with(DEDUPE_PREFIX.as_bytes()) {
        return Ok(());
    }
    let Some(bytes) = ctx.get(key)? else {
        // Already forgotten: a timer a restore derived from an entry that a
        // later record of the changelog deleted.
        return Ok(());
    };
    match DedupeEntry::decode(&bytes) {
        // Re-armed by a later event after an earlier expiry: keep it.
        Some(entry) if entry.expires_at > ctx.now() => {}
        _ => ctx.delete(key),
    }
    Ok(())
}

/// The timer a remembered `messageId` implies: its expiry. The validate
/// stage's timers are derived from its entries on restore instead of being
/// logged ([`cdp_pipeline::TimersFromState`]): one changelog record per
/// remembered id, not two.
pub fn dedupe_timer(key: &[u8], value: &[u8]) -> Option<i64> {
    if !key.starts_with(DEDUPE_PREFIX.as_bytes()) {
        return None;
    }
    DedupeEntry::decode(value).map(|entry| entry.expires_at)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// An entry reads back from its binary form, and one written as
        /// JSON (by an earlier version) still reads.
        #[test]
        fn an_entry_reads_back_in_either_form(event_time in any::<Option<i64>>(), expires_at in any::<i64>()) {
            let entry = DedupeEntry { event_time, expires_at };
            let binary = entry.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(DedupeEntry::decode(&binary), Some(entry));
            // Marker, option tag and two varints of at most 10 bytes.
            prop_assert!(binary.len() <= 22);
            let json = serde_json::to_vec(&entry).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(DedupeEntry::decode(&json), Some(entry));
        }

        /// The key is the prefix, the source, the record key's length and
        /// the record key, and the id, as this formatted text.
        #[test]
        fn a_dedupe_key_is_its_formatted_text(source in ".{0,12}", key in ".{0,12}", id in ".{0,24}") {
            prop_assert_eq!(
                dedupe_key(&source, key.as_bytes(), &id),
                format!("dedupe/{source}/{}:{key}/{id}", key.len()).into_bytes()
            );
        }

        /// Two different (record key, id) pairs never share a state key.
        #[test]
        fn different_people_or_ids_never_share_a_key(
            k1 in "[a/:1]{0,4}", id1 in "[a/:1]{0,4}", k2 in "[a/:1]{0,4}", id2 in "[a/:1]{0,4}",
        ) {
            prop_assume!((&k1, &id1) != (&k2, &id2));
            prop_assert_ne!(
                dedupe_key("web", k1.as_bytes(), &id1),
                dedupe_key("web", k2.as_bytes(), &id2)
            );
        }
    }
}
