//! Producing with acknowledgements: retry while the broker is away,
//! rebuild a producer that cannot recover by itself.

use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use super::acks::{AckedProducer, RoundError};
use super::{RuntimeError, Shared};
use crate::envelope::{self, Position};
use crate::kafka::ROUND_PATIENCE;
use crate::metrics;
use crate::retry::Backoff;

/// Where the records of [`produce_acked`] landed, in order.
#[derive(Debug, Default)]
pub(super) struct Acks {
    pub(super) offsets: Vec<(i32, i64)>,
}

/// One record to produce, kept so that a failed produce can be retried.
pub(super) struct Outgoing<'a> {
    pub(super) topic: &'a str,
    pub(super) partition: Option<i32>,
    pub(super) key: Option<&'a [u8]>,
    pub(super) payload: Option<&'a [u8]>,
    pub(super) headers: OutHeaders<'a>,
}

/// The headers of an [`Outgoing`] record, built for each attempt straight
/// into librdkafka's list: an operator's output is not copied first.
pub(super) enum OutHeaders<'a> {
    /// An operator's output: its own headers, then its origin and position
    /// in the form its output takes ([`Stamp`]).
    Stamped {
        own: &'a [(String, Vec<u8>)],
        origin: &'a str,
        pos: Position,
        stamp: Stamp,
    },
    /// A changelog record or commit marker: the writer's epoch.
    Epoch(u32),
    /// Built by the caller (dead letters of failed deliveries: rare).
    Owned(OwnedHeaders),
}

/// How an output carries its origin and position (see [`OutputTarget`]).
///
/// [`OutputTarget`]: super::OutputTarget
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stamp {
    /// The four headers (public topics).
    Headers,
    /// One `cdp-at` header (internal topics of events as JSON).
    At,
    /// Inside the value, with the own headers ([`envelope::frame`]).
    Frame,
}

impl Outgoing<'_> {
    /// The record's value framed with its origin, position and own headers
    /// (see [`envelope::frame`]), written into `buf`: for an operator's
    /// output to a [`Stamp::Frame`] topic. `None`: the record goes as it is, with
    /// its headers built by [`OutHeaders::build`] (also when a frame's head
    /// would not fit).
    fn framed<'b>(&self, buf: &'b mut Vec<u8>) -> Option<&'b [u8]> {
        let OutHeaders::Stamped {
            own,
            origin,
            pos,
            stamp: Stamp::Frame,
        } = &self.headers
        else {
            return None;
        };
        buf.clear();
        let own = own.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
        let payload = self.payload.unwrap_or_default();
        envelope::frame::write(buf, origin, pos, own, payload).then_some(buf.as_slice())
    }
}

impl OutHeaders<'_> {
    fn build(&self) -> OwnedHeaders {
        match self {
            OutHeaders::Stamped {
                own,
                origin,
                pos,
                stamp,
            } => {
                let values = pos.header_values();
                let own = own.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
                // A frame whose head did not fit falls back to `cdp-at`.
                if *stamp != Stamp::Headers {
                    let at = values.at(origin);
                    let stamp = [(envelope::AT, at.as_slice())];
                    return insert_all(own.chain(stamp));
                }
                insert_all(own.chain(values.stamp(origin)))
            }
            OutHeaders::Epoch(epoch) => epoch_header(*epoch),
            OutHeaders::Owned(headers) => headers.clone(),
        }
    }
}

/// `headers` as librdkafka's list.
pub(super) fn insert_all<'h>(
    headers: impl Iterator<Item = (&'h str, &'h [u8])> + Clone,
) -> OwnedHeaders {
    let capacity = headers.clone().count();
    headers.fold(
        OwnedHeaders::new_with_capacity(capacity),
        |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        },
    )
}

/// Produce `records` in order and wait for every acknowledgement; returns
/// each record's `(partition, offset)`. While the broker is away or
/// refusing, the whole set is produced again with backoff (its records keep
/// their positions, so consumers drop the repeats) and the stage reports
/// not ready; a producer that failed three times in a row, or hit a fatal
/// error, is rebuilt. Gives up after [`crate::retry::BROKER_PATIENCE`].
pub(super) fn produce_acked(
    shared: &Shared,
    what: &'static str,
    records: &[Outgoing<'_>],
) -> Result<Acks, RuntimeError> {
    if records.is_empty() {
        return Ok(Acks::default());
    }
    let stage = shared.spec.name;
    let mut backoff = Backoff::default();
    loop {
        let producer = shared.producer()?;
        let error = match produce_round(&producer, records) {
            Ok(acks) => {
                if backoff.failures > 0 {
                    tracing::info!(
                        stage,
                        what,
                        failures = backoff.failures,
                        waited_ms = backoff.elapsed().as_millis() as u64,
                        "broker acknowledges again"
                    );
                    shared.ready.set(true);
                }
                return Ok(Acks { offsets: acks });
            }
            Err(e) => e,
        };
        if error.is_permanent() {
            return Err(error);
        }
        shared.ready.set(false);
        metrics::BROKER_RETRIES
            .with_label_values(&[stage, what])
            .inc();
        tracing::warn!(stage, what, failures = backoff.failures + 1, error = %error, "broker did not acknowledge; retrying");
        let fatal = producer.client().fatal_error();
        drop(producer);
        if let Some((_, reason)) = fatal {
            shared.rebuild_producer(&reason)?;
        } else if backoff.failures % 3 == 2 {
            shared.rebuild_producer("three failed attempts in a row")?;
        }
        if !backoff.wait(Some(&shared.shutdown)) {
            return Err(error);
        }
    }
}

pub(super) fn epoch_header(epoch: u32) -> OwnedHeaders {
    OwnedHeaders::new().insert(Header {
        key: envelope::EPOCH,
        value: Some(epoch.to_string().as_bytes()),
    })
}

/// Produce `records` once and wait for every acknowledgement (one wait for
/// the round, not one per record); returns each record's
/// `(partition, offset)`.
pub(super) fn produce_round(
    producer: &AckedProducer,
    records: &[Outgoing<'_>],
) -> Result<Vec<(i32, i64)>, RuntimeError> {
    let round = producer
        .context()
        .open(records.len())
        .map_err(|_| RuntimeError::Poisoned)?;
    // One buffer for every framed value: librdkafka copies what it is
    // given.
    let mut frame = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let mut record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(r.topic, round.opaque(i));
        match r.framed(&mut frame) {
            Some(framed) => record = record.payload(framed),
            None => {
                record = record.headers(r.headers.build());
                if let Some(v) = r.payload {
                    record = record.payload(v);
                }
            }
        }
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        if let Some(k) = r.key {
            record = record.key(k);
        }
        enqueue(producer, record)?;
    }
    // A round's records are all queued and the stage thread is the
    // producer's one sender: lingering could only delay them.
    crate::kafka::send_now(producer, ROUND_PATIENCE);
    round.wait(ROUND_PATIENCE).map_err(|e| {
        let topic = |index: usize| records.get(index).map_or("", |r| r.topic).to_string();
        match e {
            RoundError::Failed { index, error } => RuntimeError::Produce {
                topic: topic(index),
                error,
            },
            RoundError::TimedOut => RuntimeError::Produce {
                topic: topic(0),
                error: KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
            },
            RoundError::Poisoned => RuntimeError::Poisoned,
        }
    })
}

/// Send without blocking on a full local queue for long: wait and retry.
pub(super) fn enqueue<K, P>(
    producer: &AckedProducer,
    mut record: BaseRecord<'_, K, P, usize>,
) -> Result<(), RuntimeError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    // The clock is read only once the local queue is full (a read per
    // record was ~1% of a stage thread).
    let mut started: Option<Instant> = None;
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                if started.get_or_insert_with(Instant::now).elapsed() < Duration::from_secs(60) =>
            {
                record = r;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((error, r)) => {
                return Err(RuntimeError::Produce {
                    topic: r.topic.to_string(),
                    error,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    fn pairs(h: &OwnedHeaders) -> Vec<(String, Vec<u8>)> {
        h.iter()
            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
            .collect()
    }

    #[test]
    fn an_output_to_an_internal_topic_is_framed_and_reads_back() {
        let own = vec![("cdp-source".to_string(), b"web".to_vec())];
        let pos = Position {
            epoch: 3,
            offset: 42,
            index: 1,
            lineage: 0xabc,
        };
        let out = |stamp| Outgoing {
            topic: "t",
            partition: None,
            key: None,
            payload: Some(b"{}"),
            headers: OutHeaders::Stamped {
                own: &own,
                origin: "traits:2",
                pos,
                stamp,
            },
        };
        let mut buf = b"left over".to_vec();
        let framed = out(Stamp::Frame).framed(&mut buf).map(<[u8]>::to_vec);
        let read = framed.as_deref().and_then(envelope::frame::read);
        assert_eq!(
            read,
            Some(envelope::frame::Framed {
                origin: "traits:2",
                position: pos,
                headers: vec![("cdp-source", &b"web"[..])],
                payload: b"{}",
            })
        );
        // Other topics and changelog records keep Kafka headers.
        assert_eq!(out(Stamp::Headers).framed(&mut buf), None);
        assert_eq!(out(Stamp::At).framed(&mut buf), None);
        let changelog = Outgoing {
            headers: OutHeaders::Epoch(3),
            ..out(Stamp::Frame)
        };
        assert_eq!(changelog.framed(&mut buf), None);
    }

    #[test]
    fn an_output_carries_its_own_headers_then_its_position() {
        let own = vec![
            ("cdp-source".to_string(), b"web".to_vec()),
            ("x-empty".to_string(), Vec::new()),
        ];
        let pos = Position {
            epoch: 3,
            offset: 42,
            index: 1,
            lineage: 0xabc,
        };
        for (stamp, internal) in [
            (Stamp::Headers, false),
            (Stamp::At, true),
            (Stamp::Frame, true),
        ] {
            let built = OutHeaders::Stamped {
                own: &own,
                origin: "traits:2",
                pos,
                stamp,
            }
            .build();
            // The oracle: the owned headers the runtime used to build and
            // copy; on an internal topic the four in one.
            let mut expected = own.clone();
            if internal {
                let at = format!("traits:2 3 42:1 {:016x}", 0xabc);
                expected.push((envelope::AT.to_string(), at.into_bytes()));
            } else {
                expected.extend(pos.to_headers("traits:2"));
            }
            assert_eq!(pairs(&built), expected);
            assert_eq!(
                Position::from_headers(&pairs(&built)),
                Some(("traits:2".to_string(), pos))
            );
        }
    }

    #[test]
    fn changelog_records_carry_the_epoch() {
        let built = OutHeaders::Epoch(7).build();
        assert_eq!(
            pairs(&built),
            vec![(envelope::EPOCH.to_string(), b"7".to_vec())]
        );
    }
}
