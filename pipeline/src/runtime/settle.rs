//! What one record's operator result becomes: its outputs, or a dead letter.

use rdkafka::message::Message;

use super::{InputObserver, InputOutcome, RuntimeError, DEAD_LETTERS};
use crate::envelope::{self, HeaderRef};
use crate::metrics;
use crate::operator::{Emitted, OperatorError};

/// Turn an operator's result for one record into what the batch produces:
/// its outputs, or a dead letter in their place when it was rejected. Tells
/// `observer` (given for input records, not ticks) what became of it. A
/// store error is fatal for the batch and observed by no one.
pub(super) fn settle<M: Message>(
    stage: &'static str,
    m: &M,
    headers: Vec<HeaderRef<'_>>,
    result: Result<(), OperatorError>,
    emitted: &mut Vec<Emitted>,
    observer: Option<&InputObserver>,
) -> Result<(), RuntimeError> {
    match result {
        Ok(()) => {
            if let Some(observe) = observer {
                observe(&headers, &InputOutcome::Processed(emitted));
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
                    &headers,
                    &InputOutcome::DeadLetter {
                        reason,
                        detail: &detail,
                    },
                );
            }
            emitted.clear();
            emitted.push(dead_letter(stage, m, headers, reason, &detail));
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

/// A dead letter: the original bytes and headers, plus why.
fn dead_letter<M: Message>(
    stage: &str,
    m: &M,
    headers: Vec<HeaderRef<'_>>,
    reason: &'static str,
    detail: &serde_json::Value,
) -> Emitted {
    let mut headers: Vec<(String, Vec<u8>)> = headers
        .into_iter()
        .filter(|(k, _)| !k.starts_with("cdp-dlq-"))
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect();
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
        value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
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

    fn source() -> Vec<HeaderRef<'static>> {
        vec![("cdp-source", b"web")]
    }

    fn source_owned() -> Vec<(String, Vec<u8>)> {
        vec![("cdp-source".to_string(), b"web".to_vec())]
    }

    #[test]
    fn the_observer_sees_processed_records_with_their_outputs() -> Result<(), RuntimeError> {
        let (observer, seen) = recorder();
        let mut out = vec![emitted(b"a")];
        settle("s", &message(), source(), Ok(()), &mut out, Some(&observer))?;
        let mut none = Vec::new();
        settle(
            "s",
            &message(),
            source(),
            Ok(()),
            &mut none,
            Some(&observer),
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
        settle("s", &message(), source(), result, &mut big, None)?;
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

    #[test]
    fn ticks_and_store_errors_are_not_observed() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let observer: InputObserver = Arc::new(move |_, _| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let mut out = Vec::new();
        // The loop passes no observer for ticks.
        let tick = settle("s", &message(), Vec::new(), Ok(()), &mut out, None);
        assert!(tick.is_ok());
        let failed = settle(
            "s",
            &message(),
            source(),
            Err(OperatorError::Store(StoreError::Decode("x".into()))),
            &mut out,
            Some(&observer),
        );
        assert!(matches!(failed, Err(RuntimeError::Store(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
