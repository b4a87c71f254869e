//! What one record's operator result becomes: its outputs, or a dead letter.

use rdkafka::message::{Headers, Message};

use super::{InputObserver, InputOutcome, RuntimeError, DEAD_LETTERS};
use crate::envelope::{self, frame, HeaderRef, Position};
use crate::metrics;
use crate::operator::{Emitted, OperatorError};

/// A consumed record as a stage reads it: its headers and value, taken
/// from its frame when it has one (see [`frame`]), else from its Kafka
/// headers and value. Everything is borrowed from the message.
pub(super) struct Input<'a> {
    pub(super) headers: Vec<HeaderRef<'a>>,
    pub(super) value: &'a [u8],
    /// The origin and position a frame carried.
    framed_at: Option<(&'a str, Position)>,
}

impl<'a> Input<'a> {
    /// Read `m`; its frame only when `frames` (an internal input: on a
    /// topic outside producers write, a value is only ever a payload).
    pub(super) fn read<M: Message>(m: &'a M, frames: bool) -> Input<'a> {
        let value = m.payload().unwrap_or_default();
        if let Some(framed) = frames.then(|| frame::read(value)).flatten() {
            return Input {
                headers: framed.headers,
                value: framed.payload,
                framed_at: Some((framed.origin, framed.position)),
            };
        }
        Input {
            headers: borrowed_headers(m),
            value,
            framed_at: None,
        }
    }

    /// The record's origin and position: its frame's, else its headers'.
    pub(super) fn at(&self) -> Option<(&str, Position)> {
        match self.framed_at {
            Some(at) => Some(at),
            None => Position::from_headers_ref(&self.headers),
        }
    }
}

/// A consumed record's Kafka headers, borrowed from it: nothing is copied.
fn borrowed_headers<M: Message>(m: &M) -> Vec<HeaderRef<'_>> {
    m.headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key, h.value.unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

/// Turn an operator's result for one record into what the batch produces:
/// its outputs, or a dead letter in their place when it was rejected. Tells
/// `observer` (given for input records, not ticks) what became of it. A
/// store error is fatal for the batch and observed by no one.
pub(super) fn settle<M: Message>(
    stage: &'static str,
    m: &M,
    input: Input<'_>,
    result: Result<(), OperatorError>,
    emitted: &mut Vec<Emitted>,
    observer: Option<&InputObserver>,
    limit: usize,
) -> Result<(), RuntimeError> {
    match result {
        Ok(()) => {
            if let Some(observe) = observer {
                observe(&input.headers, &InputOutcome::Processed(emitted));
            }
        }
        Err(OperatorError::Rejected { reason, detail }) => {
            metrics::DEAD_LETTERS
                .with_label_values(&[stage, reason])
                .inc();
            tracing::debug!(
                stage,
                partition = m.partition(),
                offset = m.offset(),
                reason,
                "dead letter"
            );
            if let Some(observe) = observer {
                observe(
                    &input.headers,
                    &InputOutcome::DeadLetter {
                        reason,
                        detail: &detail,
                    },
                );
            }
            emitted.clear();
            let mut letter = dead_letter(stage, m, input, reason, &detail);
            fit(&mut letter, limit);
            emitted.push(letter);
        }
        Err(OperatorError::Store(e)) => return Err(e.into()),
    }
    Ok(())
}

/// An operator's `Ok` becomes a rejection (`record_too_large`) when one of
/// its outputs (key, value and headers) is over `limit` bytes: checked
/// before anything is produced, so an oversized output is a dead letter
/// rather than a broker refusal that stops the stage on every replay. The
/// state the operator wrote for the record stays.
pub(super) fn check_sizes(
    result: Result<(), OperatorError>,
    emitted: &[Emitted],
    limit: usize,
) -> Result<(), OperatorError> {
    result?;
    match emitted
        .iter()
        .map(|e| (e.output, emitted_size(e)))
        .find(|(_, bytes)| *bytes > limit)
    {
        Some((output, bytes)) => Err(OperatorError::rejected(
            "record_too_large",
            serde_json::json!({"output": output, "bytes": bytes, "limit": limit}),
        )),
        None => Ok(()),
    }
}

/// What a record weighs against `kafka.max_record_bytes`.
pub(super) fn emitted_size(e: &Emitted) -> usize {
    e.key.as_ref().map_or(0, Vec::len)
        + e.value.len()
        + e.headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// Make a dead letter fit `limit`: one whose original record is too large
/// for the broker (a 1 MB event on `<p>.raw`) keeps its headers, reasons
/// and `cdp-dlq-input` (where the original still is) but not its bytes,
/// and says how many it dropped in `cdp-dlq-dropped-bytes`; a broker
/// refusal of the dead letter itself would stop the stage on every replay.
fn fit(letter: &mut Emitted, limit: usize) {
    if emitted_size(letter) <= limit {
        return;
    }
    let dropped = letter.value.len();
    letter.value = Vec::new();
    letter.headers.push((
        envelope::DLQ_DROPPED_BYTES.into(),
        dropped.to_string().into_bytes(),
    ));
    if emitted_size(letter) > limit {
        // Headers or key past the limit too: keep only ours.
        letter.key = None;
        letter.headers.retain(|(k, _)| k.starts_with("cdp-dlq-"));
    }
}

/// A dead letter: the original bytes and headers, plus why. A framed
/// record's are its payload, and its own headers with its position as the
/// one `cdp-at` header: what the record would have been unframed.
fn dead_letter<M: Message>(
    stage: &str,
    m: &M,
    input: Input<'_>,
    reason: &'static str,
    detail: &serde_json::Value,
) -> Emitted {
    let mut headers: Vec<(String, Vec<u8>)> = input
        .headers
        .into_iter()
        .filter(|(k, _)| !k.starts_with("cdp-dlq-"))
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect();
    if let Some((origin, position)) = input.framed_at {
        headers.push(position.to_at_header(origin));
    }
    headers.push((envelope::DLQ_STAGE.into(), stage.as_bytes().to_vec()));
    headers.push((envelope::DLQ_REASON.into(), reason.as_bytes().to_vec()));
    headers.push(("cdp-dlq-detail".into(), detail.to_string().into_bytes()));
    headers.push((
        "cdp-dlq-input".into(),
        format!("{}[{}]@{}", m.topic(), m.partition(), m.offset()).into_bytes(),
    ));
    Emitted {
        output: DEAD_LETTERS,
        key: m.key().map(<[u8]>::to_vec),
        value: input.value.to_vec(),
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;
    use rdkafka::message::OwnedMessage;
    use rdkafka::Timestamp;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    type Seen = Arc<Mutex<Vec<(Vec<(String, Vec<u8>)>, String)>>>;

    /// An observer that records `(headers, "processed:N" | "dead:reason")`.
    fn recorder() -> (InputObserver, Seen) {
        let seen: Seen = Arc::default();
        let sink = seen.clone();
        let observer: InputObserver = Arc::new(move |headers, outcome| {
            let what = match outcome {
                InputOutcome::Processed(out) => format!("processed:{}", out.len()),
                InputOutcome::DeadLetter { reason, detail } => format!("dead:{reason}:{detail}"),
            };
            if let Ok(mut seen) = sink.lock() {
                let owned = headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_vec()))
                    .collect();
                seen.push((owned, what));
            }
        });
        (observer, seen)
    }

    fn message() -> OwnedMessage {
        OwnedMessage::new(
            Some(b"payload".to_vec()),
            Some(b"k".to_vec()),
            "t.raw".into(),
            Timestamp::NotAvailable,
            3,
            42,
            None,
        )
    }

    fn emitted(value: &[u8]) -> Emitted {
        Emitted {
            output: "next",
            key: None,
            value: value.to_vec(),
            headers: Vec::new(),
        }
    }

    /// A record limit no test record reaches.
    const BIG: usize = 1 << 20;

    fn source() -> Input<'static> {
        unframed(vec![("cdp-source", b"web")])
    }

    fn unframed(headers: Vec<HeaderRef<'static>>) -> Input<'static> {
        Input {
            headers,
            value: b"payload",
            framed_at: None,
        }
    }

    fn source_owned() -> Vec<(String, Vec<u8>)> {
        vec![("cdp-source".to_string(), b"web".to_vec())]
    }

    #[test]
    fn the_observer_sees_processed_records_with_their_outputs() -> Result<(), RuntimeError> {
        let (observer, seen) = recorder();
        let mut out = vec![emitted(b"a")];
        settle(
            "s",
            &message(),
            source(),
            Ok(()),
            &mut out,
            Some(&observer),
            BIG,
        )?;
        let mut none = Vec::new();
        settle(
            "s",
            &message(),
            source(),
            Ok(()),
            &mut none,
            Some(&observer),
            BIG,
        )?;
        assert_eq!(out, vec![emitted(b"a")], "outputs are left alone");
        let seen = seen.lock().map_err(|_| RuntimeError::Poisoned)?;
        assert_eq!(
            *seen,
            vec![
                (source_owned(), "processed:1".to_string()),
                (source_owned(), "processed:0".to_string())
            ]
        );
        Ok(())
    }

    #[test]
    fn a_rejection_becomes_one_dead_letter_and_is_observed() -> Result<(), RuntimeError> {
        let (observer, seen) = recorder();
        let mut out = vec![emitted(b"partial")];
        let rejected = Err(OperatorError::rejected(
            "bad_value",
            serde_json::json!({"why": 1}),
        ));
        settle(
            "s",
            &message(),
            source(),
            rejected,
            &mut out,
            Some(&observer),
            BIG,
        )?;
        assert_eq!(out.len(), 1, "partial outputs are dropped");
        assert_eq!(out[0].output, DEAD_LETTERS);
        assert_eq!(out[0].value, b"payload".to_vec(), "the original bytes");
        let header = |name: &str| {
            out[0]
                .headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header("cdp-source").as_deref(), Some("web"));
        assert_eq!(header(envelope::DLQ_REASON).as_deref(), Some("bad_value"));
        assert_eq!(header("cdp-dlq-input").as_deref(), Some("t.raw[3]@42"));
        let seen = seen.lock().map_err(|_| RuntimeError::Poisoned)?;
        assert_eq!(
            *seen,
            vec![(source_owned(), "dead:bad_value:{\"why\":1}".to_string())]
        );
        Ok(())
    }

    #[test]
    fn a_framed_record_reads_as_its_parts_and_dead_letters_as_if_unframed(
    ) -> Result<(), RuntimeError> {
        let position = Position {
            epoch: 4,
            offset: 17,
            index: 2,
            lineage: 9,
        };
        let mut value = Vec::new();
        assert!(frame::write(
            &mut value,
            "identity:1",
            &position,
            [("cdp-source", &b"web"[..])],
            b"payload"
        ));
        let m = OwnedMessage::new(
            Some(value),
            Some(b"k".to_vec()),
            "t.identified".into(),
            Timestamp::NotAvailable,
            1,
            5,
            None,
        );
        let input = Input::read(&m, true);
        assert_eq!(input.value, b"payload");
        assert_eq!(input.headers, source().headers);
        assert_eq!(input.at(), Some(("identity:1", position)));
        // From a topic outside producers write, the same bytes are a payload.
        let outside = Input::read(&m, false);
        assert_eq!(outside.value, m.payload().unwrap_or_default());
        assert_eq!(outside.at(), None);

        let mut out = Vec::new();
        let rejected = Err(OperatorError::rejected("bad", serde_json::json!({})));
        settle("s", &m, input, rejected, &mut out, None, BIG)?;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].value, b"payload".to_vec(), "the payload, unframed");
        let unframed = &out[0].headers[..2];
        assert_eq!(unframed[0], source_owned()[0]);
        assert_eq!(unframed[1], position.to_at_header("identity:1"));
        Ok(())
    }

    #[test]
    fn an_output_over_the_record_limit_becomes_a_dead_letter() -> Result<(), RuntimeError> {
        let small = vec![emitted(b"0123456789")];
        assert!(check_sizes(Ok(()), &small, 10).is_ok());
        let mut big = vec![emitted(b"0123456789"), emitted(b"0123456789x")];
        let result = check_sizes(Ok(()), &big, 10);
        match &result {
            Err(OperatorError::Rejected { reason, detail }) => {
                assert_eq!(*reason, "record_too_large");
                assert_eq!(detail["bytes"], 11);
                assert_eq!(detail["limit"], 10);
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        settle("s", &message(), source(), result, &mut big, None, BIG)?;
        assert_eq!(big.len(), 1, "one dead letter in place of the outputs");
        assert_eq!(big[0].output, DEAD_LETTERS);
        // A rejection stays what it was.
        let rejected = Err(OperatorError::rejected("bad", serde_json::json!({})));
        assert!(matches!(
            check_sizes(rejected, &[], 10),
            Err(OperatorError::Rejected { reason: "bad", .. })
        ));
        Ok(())
    }

    /// A dead letter whose original is over the record limit keeps where
    /// the original is and why, not its bytes, and fits the limit.
    #[test]
    fn a_dead_letter_over_the_record_limit_leaves_its_bytes_out() -> Result<(), RuntimeError> {
        let huge = vec![b'x'; 5000];
        // The dead letter of `value`, refused as invalid, under 1,000 bytes.
        let letter_of = |value: &[u8]| -> Result<Emitted, RuntimeError> {
            let input = Input {
                headers: vec![("cdp-source", b"web")],
                value,
                framed_at: None,
            };
            let rejected = Err(OperatorError::rejected(
                "invalid_json",
                serde_json::json!({}),
            ));
            let mut out = Vec::new();
            settle("s", &message(), input, rejected, &mut out, None, 1000)?;
            out.pop().ok_or(RuntimeError::Poisoned)
        };
        let letter = &letter_of(&huge)?;
        assert!(letter.value.is_empty());
        assert!(emitted_size(letter) <= 1000, "{}", emitted_size(letter));
        let header = |name: &str| {
            letter
                .headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header(envelope::DLQ_DROPPED_BYTES).as_deref(), Some("5000"));
        assert_eq!(header("cdp-dlq-input").as_deref(), Some("t.raw[3]@42"));
        assert_eq!(
            header(envelope::DLQ_REASON).as_deref(),
            Some("invalid_json")
        );
        assert_eq!(header("cdp-source").as_deref(), Some("web"));
        // One under the limit is left whole.
        assert_eq!(letter_of(&huge[..100])?.value.len(), 100);
        Ok(())
    }

    #[test]
    fn ticks_and_store_errors_are_not_observed() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let observer: InputObserver = Arc::new(move |_, _| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let mut out = Vec::new();
        // The loop passes no observer for ticks.
        let tick = settle(
            "s",
            &message(),
            unframed(Vec::new()),
            Ok(()),
            &mut out,
            None,
            BIG,
        );
        assert!(tick.is_ok());
        let failed = settle(
            "s",
            &message(),
            source(),
            Err(OperatorError::Store(StoreError::Decode("x".into()))),
            &mut out,
            Some(&observer),
            BIG,
        );
        assert!(matches!(failed, Err(RuntimeError::Store(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
