//! Producing with acknowledgements: retry while the broker is away,
//! rebuild a producer that cannot recover by itself.

use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::DeliveryFuture;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use super::{RuntimeError, Shared};
use crate::envelope::{self, Position};
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
    /// An operator's output: its own headers, then its origin and position.
    Stamped {
        own: &'a [(String, Vec<u8>)],
        origin: &'a str,
        pos: Position,
    },
    /// A changelog record or commit marker: the writer's epoch.
    Epoch(u32),
    /// Built by the caller (dead letters of failed deliveries: rare).
    Owned(OwnedHeaders),
}

impl OutHeaders<'_> {
    fn build(&self) -> OwnedHeaders {
        match self {
            OutHeaders::Stamped { own, origin, pos } => {
                let (epoch, position, lineage) = pos.header_values();
                let stamp = [
                    (envelope::ORIGIN, origin.as_bytes()),
                    (envelope::EPOCH, epoch.as_bytes()),
                    (envelope::POSITION, position.as_bytes()),
                    (envelope::LINEAGE, lineage.as_bytes()),
                ];
                let capacity = own.len() + stamp.len();
                let own = own.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
                own.chain(stamp).fold(
                    OwnedHeaders::new_with_capacity(capacity),
                    |h, (key, value)| {
                        h.insert(Header {
                            key,
                            value: Some(value),
                        })
                    },
                )
            }
            OutHeaders::Epoch(epoch) => epoch_header(*epoch),
            OutHeaders::Owned(headers) => headers.clone(),
        }
    }
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
        let attempt = records
            .iter()
            .map(|r| {
                let mut record = FutureRecord::<[u8], [u8]>::to(r.topic).headers(r.headers.build());
                if let Some(p) = r.partition {
                    record = record.partition(p);
                }
                if let Some(k) = r.key {
                    record = record.key(k);
                }
                if let Some(v) = r.payload {
                    record = record.payload(v);
                }
                enqueue(&producer, record).map(|f| (r.topic, f))
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(|futures| await_deliveries(&shared.handle, futures));
        let error = match attempt {
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

/// Send without blocking on a full local queue for long: wait and retry.
pub(super) fn enqueue<K, P>(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, K, P>,
) -> Result<DeliveryFuture, RuntimeError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    let topic = record.topic.to_string();
    let started = Instant::now();
    loop {
        match producer.send_result(record) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                if started.elapsed() < Duration::from_secs(60) =>
            {
                record = r;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((error, _)) => return Err(RuntimeError::Produce { topic, error }),
        }
    }
}

/// Await deliveries; returns each record's `(partition, offset)`.
pub(super) fn await_deliveries(
    handle: &tokio::runtime::Handle,
    futures: Vec<(&str, DeliveryFuture)>,
) -> Result<Vec<(i32, i64)>, RuntimeError> {
    let (topics, futs): (Vec<&str>, Vec<DeliveryFuture>) = futures.into_iter().unzip();
    let results = handle.block_on(join_all(futs));
    topics
        .into_iter()
        .zip(results)
        .map(|(topic, r)| match r {
            Ok(Ok(d)) => Ok((d.partition, d.offset)),
            Ok(Err((error, _))) => Err(RuntimeError::Produce {
                topic: topic.to_string(),
                error,
            }),
            Err(_) => Err(RuntimeError::Produce {
                topic: topic.to_string(),
                error: KafkaError::Canceled,
            }),
        })
        .collect()
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
        let built = OutHeaders::Stamped {
            own: &own,
            origin: "traits:2",
            pos,
        }
        .build();
        // The oracle: the owned headers the runtime used to build and copy.
        let mut expected = own.clone();
        expected.extend(pos.to_headers("traits:2"));
        assert_eq!(pairs(&built), expected);
        assert_eq!(
            Position::from_headers(&pairs(&built)),
            Some(("traits:2".to_string(), pos))
        );
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
