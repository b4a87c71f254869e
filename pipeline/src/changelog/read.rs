//! Reading a changelog partition from the broker.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::Restorer;
use crate::envelope::EPOCH;
use crate::metrics;
use crate::retry::{Backoff, BROKER_PATIENCE};
use crate::service::Shutdown;
use crate::store::{StoreError, TaskStore};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("reading changelog {topic}[{partition}]: {source}")]
    Kafka {
        topic: String,
        partition: i32,
        #[source]
        source: KafkaError,
    },
    #[error("changelog {topic}[{partition}] stalled at offset {at} before reaching {until}")]
    Stalled {
        topic: String,
        partition: i32,
        at: i64,
        until: i64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("bad marker at {topic}[{partition}]@{offset}: {detail}")]
    BadMarker {
        topic: String,
        partition: i32,
        offset: i64,
        detail: String,
    },
}

/// One changelog record as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogRecord {
    pub offset: i64,
    pub epoch: u32,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// The epoch header of a changelog record (0 when absent).
fn record_epoch<M: Message>(m: &M) -> u32 {
    m.headers()
        .and_then(|h| {
            h.iter()
                .find(|h| h.key == EPOCH)
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|s| s.parse().ok())
        })
        .unwrap_or(0)
}

/// Call `f` with every record of `topic[partition]` from `from` up to and
/// including `last` (compaction may leave gaps).
fn scan(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    last: i64,
    mut f: impl FnMut(i64, u32, &[u8], Option<&[u8]>) -> Result<(), RestoreError>,
) -> Result<(), RestoreError> {
    if from > last {
        return Ok(());
    }
    let kafka_err = |source| RestoreError::Kafka {
        topic: topic.to_string(),
        partition,
        source,
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))
        .map_err(kafka_err)?;
    consumer.assign(&tpl).map_err(kafka_err)?;
    let mut at = from - 1;
    let mut last_progress = Instant::now();
    while at < last {
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => {
                // Compaction can leave gaps; EOF past `last` means done.
                if let Ok(pos) = consumer.position() {
                    let reached = pos
                        .find_partition(topic, partition)
                        .and_then(|e| match e.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        })
                        .unwrap_or(at + 1);
                    if reached > last {
                        break;
                    }
                }
            }
            Some(Err(e)) => {
                // A broker that is away or restarting: the client reconnects
                // by itself; only a fatal error or no progress for
                // `BROKER_PATIENCE` ends the read.
                if let Some((_, reason)) = consumer.client().fatal_error() {
                    tracing::error!(topic, partition, %reason, "fatal error reading the changelog");
                    return Err(kafka_err(e));
                }
                metrics::BROKER_RETRIES
                    .with_label_values(&["restore", "changelog"])
                    .inc();
                tracing::warn!(topic, partition, at, error = %e, "changelog read failed; retrying");
            }
            Some(Ok(m)) => {
                last_progress = Instant::now();
                at = m.offset();
                if at > last {
                    break;
                }
                f(
                    at,
                    record_epoch(&m),
                    m.key().unwrap_or_default(),
                    m.payload(),
                )?;
            }
        }
        if last_progress.elapsed() > BROKER_PATIENCE {
            return Err(RestoreError::Stalled {
                topic: topic.to_string(),
                partition,
                at,
                until: last,
            });
        }
    }
    consumer.unassign().map_err(kafka_err)?;
    Ok(())
}

/// Replay `topic[partition]` from `from` up to and including `last`
/// into `store`, committing each completed batch to RocksDB as it goes.
pub fn replay(
    consumer: &BaseConsumer,
    store: &mut TaskStore,
    restorer: &mut Restorer,
    topic: &str,
    partition: i32,
    from: i64,
    last: i64,
) -> Result<(), RestoreError> {
    scan(
        consumer,
        topic,
        partition,
        from,
        last,
        |at, epoch, key, value| {
            let committed =
                restorer
                    .apply(at, epoch, key, value)
                    .map_err(|e| RestoreError::BadMarker {
                        topic: topic.to_string(),
                        partition,
                        offset: at,
                        detail: e.0,
                    })?;
            if let Some(changes) = committed {
                store.commit(&changes, &restorer.meta)?;
            }
            Ok(())
        },
    )
}

/// The records of `topic[partition]` in `from..=last`.
pub fn read_range(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    from: i64,
    last: i64,
) -> Result<Vec<ChangelogRecord>, RestoreError> {
    let mut out = Vec::new();
    scan(
        consumer,
        topic,
        partition,
        from,
        last,
        |offset, epoch, key, value| {
            out.push(ChangelogRecord {
                offset,
                epoch,
                key: key.to_vec(),
                value: value.map(<[u8]>::to_vec),
            });
            Ok(())
        },
    )?;
    Ok(out)
}

/// Whether `topic[partition]` holds offset `end - 1`, asked with a fetch
/// rather than a `ListOffsets`: tansu 0.6 answers `ListOffsets(latest)`
/// with the base offset of the newest record batch plus one, below the
/// real end when that batch holds several records, while its fetch
/// responses are right. A stage asks this before it takes a committed
/// offset past the listed end for lost broker data.
pub fn holds_offset_before(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    end: i64,
) -> Result<bool, RestoreError> {
    if end <= 0 {
        return Ok(true);
    }
    let kafka_err = |source| RestoreError::Kafka {
        topic: topic.to_string(),
        partition,
        source,
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(end - 1))
        .map_err(kafka_err)?;
    consumer.assign(&tpl).map_err(kafka_err)?;
    let started = Instant::now();
    let held = loop {
        match consumer.poll(Duration::from_millis(200)) {
            // tansu answers a fetch past the end with no records and no
            // error; the high watermark of its answer says where it ends.
            // The cached value may predate this assignment, so an end
            // below the one asked for is believed only after a few fetches.
            None => match crate::kafka::fetched_high_watermark(consumer.client(), topic, partition)
            {
                Some(high) if high >= end => break true,
                Some(_) if started.elapsed() > Duration::from_secs(2) => break false,
                _ => {}
            },
            // A fetch past the end resets to the beginning, so a record
            // below the one asked for means the asked one is gone.
            Some(Ok(m)) => break m.offset() >= end - 1,
            Some(Err(KafkaError::PartitionEOF(_))) => {
                let reached = consumer
                    .position()
                    .ok()
                    .and_then(|pos| {
                        pos.find_partition(topic, partition)
                            .and_then(|e| match e.offset() {
                                Offset::Offset(o) => Some(o),
                                _ => None,
                            })
                    })
                    .unwrap_or(0);
                break reached >= end;
            }
            Some(Err(e)) => {
                if consumer.client().fatal_error().is_some() {
                    return Err(kafka_err(e));
                }
                tracing::warn!(topic, partition, end, error = %e, "input end check failed; retrying");
            }
        }
        if started.elapsed() > BROKER_PATIENCE {
            return Err(RestoreError::Stalled {
                topic: topic.to_string(),
                partition,
                at: end - 1,
                until: end - 1,
            });
        }
    };
    consumer.unassign().map_err(kafka_err)?;
    Ok(held)
}

/// Low and high watermarks of a changelog partition, waiting out a broker
/// that is away (with backoff, up to `BROKER_PATIENCE`).
pub fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
) -> Result<(i64, i64), RestoreError> {
    watermarks_until(consumer, topic, partition, None)
}

/// Low and high watermarks of a partition, asked once (a partition that
/// does not exist yet is empty).
pub fn watermarks_now(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> Result<(i64, i64), KafkaError> {
    match consumer.fetch_watermarks(topic, partition, timeout) {
        Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownPartition)) => Ok((0, 0)),
        other => other,
    }
}

/// [`watermarks`], giving up when `shutdown` begins.
pub fn watermarks_until(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    shutdown: Option<&Shutdown>,
) -> Result<(i64, i64), RestoreError> {
    let mut backoff = Backoff::default();
    loop {
        match watermarks_now(consumer, topic, partition, Duration::from_secs(10)) {
            Ok(w) => return Ok(w),
            Err(source) => {
                tracing::warn!(topic, partition, error = %source, "changelog watermarks unavailable; retrying");
                metrics::BROKER_RETRIES
                    .with_label_values(&["restore", "watermarks"])
                    .inc();
                if !backoff.wait(shutdown) {
                    return Err(RestoreError::Kafka {
                        topic: topic.to_string(),
                        partition,
                        source,
                    });
                }
            }
        }
    }
}
