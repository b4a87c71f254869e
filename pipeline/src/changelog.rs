//! The changelog protocol: how task state survives a lost disk or a move to
//! another instance.
//!
//! Per batch a task writes its changed keys (value or tombstone) to its
//! changelog partition, then — after every output and changelog record is
//! acknowledged — a *commit marker* holding its progress. A task taking over
//! a partition first writes a *claim* marker with a new epoch. Replaying a
//! changelog partition applies a batch's records only when its marker
//! follows; records of an older epoch than one already seen are ignored
//! (zombie fencing); a claim drops the uncommitted tail before it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::envelope::{Position, EPOCH};
use crate::store::{Changes, StoreError, TaskMeta, TaskStore};

/// Key of marker records in a changelog partition.
pub const MARKER_KEY: &[u8] = b"\x00cdp/marker";

/// The value of a marker record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    /// A claim opens an epoch and carries no progress of its own.
    #[serde(default)]
    pub claim: bool,
    #[serde(default)]
    pub input_offset: i64,
    #[serde(default)]
    pub stream_time: i64,
    #[serde(default)]
    pub dedupe: BTreeMap<String, Position>,
}

impl Marker {
    pub fn commit(meta: &TaskMeta) -> Self {
        Marker {
            claim: false,
            input_offset: meta.input_offset,
            stream_time: meta.stream_time,
            dedupe: meta.dedupe.clone(),
        }
    }
    pub fn claim() -> Self {
        Marker {
            claim: true,
            input_offset: 0,
            stream_time: 0,
            dedupe: BTreeMap::new(),
        }
    }
}

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

/// Applies changelog records to a store under the marker rules.
pub struct Restorer {
    pub meta: TaskMeta,
    max_epoch: u32,
    pending: Changes,
    pub records_read: u64,
}

impl Restorer {
    pub fn new(meta: TaskMeta) -> Self {
        let max_epoch = meta.epoch;
        Restorer {
            meta,
            max_epoch,
            pending: Changes::new(),
            records_read: 0,
        }
    }

    /// The highest epoch seen so far (local or in the changelog).
    pub fn max_epoch(&self) -> u32 {
        self.max_epoch
    }

    /// Apply one changelog record. When it is a marker that commits a batch,
    /// returns that batch's changes; write them with `self.meta`.
    pub fn apply(
        &mut self,
        offset: i64,
        epoch: u32,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<Option<Changes>, MarkerDecodeError> {
        self.records_read += 1;
        if epoch < self.max_epoch {
            return Ok(None); // a zombie's record: a newer owner already claimed
        }
        if epoch > self.max_epoch {
            self.max_epoch = epoch;
            self.pending.clear(); // the older owner's uncommitted tail
        }
        if key != MARKER_KEY {
            self.pending.insert(key.to_vec(), value.map(<[u8]>::to_vec));
            return Ok(None);
        }
        let marker: Marker = serde_json::from_slice(value.unwrap_or_default())
            .map_err(|e| MarkerDecodeError(e.to_string()))?;
        if !marker.claim {
            self.meta.input_offset = marker.input_offset;
            self.meta.stream_time = marker.stream_time;
            self.meta.dedupe = marker.dedupe;
        }
        self.meta.epoch = epoch;
        self.meta.changelog_offset = offset;
        // A claim commits nothing of its own; the tail before it was dropped
        // when its epoch was first seen.
        Ok(Some(std::mem::take(&mut self.pending)))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MarkerDecodeError(pub String);

/// The epoch header of a changelog record (0 when absent).
pub fn record_epoch<M: Message>(m: &M) -> u32 {
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
            Some(Err(e)) => return Err(kafka_err(e)),
            Some(Ok(m)) => {
                last_progress = Instant::now();
                at = m.offset();
                if at > last {
                    break;
                }
                let epoch = record_epoch(&m);
                let key = m.key().unwrap_or_default();
                let committed = restorer.apply(at, epoch, key, m.payload()).map_err(|e| {
                    RestoreError::BadMarker {
                        topic: topic.to_string(),
                        partition,
                        offset: at,
                        detail: e.0,
                    }
                })?;
                if let Some(changes) = committed {
                    store.commit(&changes, &restorer.meta)?;
                }
            }
        }
        if last_progress.elapsed() > Duration::from_secs(60) {
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

/// Low and high watermarks of a changelog partition.
pub fn watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
) -> Result<(i64, i64), RestoreError> {
    match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
        Ok(w) => Ok(w),
        Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownPartition)) => Ok((0, 0)),
        Err(source) => Err(RestoreError::Kafka {
            topic: topic.to_string(),
            partition,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StateBackend;

    fn marker(input_offset: i64) -> Vec<u8> {
        let meta = TaskMeta {
            input_offset,
            ..TaskMeta::default()
        };
        serde_json::to_vec(&Marker::commit(&meta)).unwrap_or_default()
    }

    /// Drive the restorer the way `replay` does, without a broker.
    /// `(epoch, key, value)` of one changelog record.
    type Entry<'a> = (u32, &'a [u8], Option<Vec<u8>>);

    fn run(store: &mut TaskStore, records: &[Entry<'_>]) -> Restorer {
        let mut r = Restorer::new(TaskMeta::default());
        for (offset, (epoch, key, value)) in records.iter().enumerate() {
            if let Ok(Some(changes)) = r.apply(offset as i64, *epoch, key, value.as_deref()) {
                let _ = store.commit(&changes, &r.meta);
            }
        }
        r
    }

    #[test]
    fn only_batches_followed_by_a_marker_are_applied_and_zombies_are_fenced(
    ) -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Decode(e.to_string()))?;
        let mut store = TaskStore::open(dir.path())?;
        let claim = serde_json::to_vec(&Marker::claim()).unwrap_or_default();
        let r = run(
            &mut store,
            &[
                (1, b"a", Some(b"1".to_vec())),
                (1, MARKER_KEY, Some(marker(10))),
                (1, b"b", Some(b"uncommitted".to_vec())), // crashed before its marker
                (2, MARKER_KEY, Some(claim)),             // new owner claims
                (1, b"a", Some(b"zombie".to_vec())),      // old owner still writing
                (1, MARKER_KEY, Some(marker(99))),
                (2, b"a", None),
                (2, b"c", Some(b"3".to_vec())),
                (2, MARKER_KEY, Some(marker(12))),
                (2, b"d", Some(b"tail".to_vec())),
            ],
        );
        assert_eq!(r.meta.input_offset, 12);
        assert_eq!(r.meta.epoch, 2);
        assert_eq!(r.meta.changelog_offset, 8);
        assert_eq!(store.get(b"a")?, None);
        assert_eq!(store.get(b"b")?, None);
        assert_eq!(store.get(b"c")?, Some(b"3".to_vec()));
        assert_eq!(store.get(b"d")?, None);
        assert_eq!(store.meta()?.input_offset, 12);
        Ok(())
    }
}
