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
    /// (in one header on an internal topic, else four).
    Stamped {
        own: &'a [(String, Vec<u8>)],
        origin: &'a str,
        pos: Position,
        internal: bool,
    },
    /// A changelog record or commit marker: the writer's epoch.
    Epoch(u32),
    /// Built by the caller (dead letters of failed deliveries: rare).
    Owned(OwnedHeaders),
}

impl OutHeaders<'_> {
    fn build(&self) -> OwnedHeaders {
        match self {
            OutHeaders::Stamped {
                own,
                origin,
                pos,
                internal,
            } => {
                let values = pos.header_values();
                let own = own.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
                if *internal {
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
fn insert_all<'h>(headers: impl Iterator<Item = (&'h str, &'h [u8])> + Clone) -> OwnedHeaders {
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
    for (i, r) in records.iter().enumerate() {
        let mut record = BaseRecord::<[u8], [u8], usize>::with_opaque_to(r.topic, round.opaque(i))
            .headers(r.headers.build());
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        if let Some(k) = r.key {
            record = record.key(k);
        }
        if let Some(v) = r.payload {
            record = record.payload(v);
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
        for internal in [false, true] {
            let built = OutHeaders::Stamped {
                own: &own,
                origin: "traits:2",
                pos,
                internal,
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
