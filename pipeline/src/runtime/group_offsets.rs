//! The consumer group's committed offsets. They only feed lag tools
//! (`kafka-consumer-groups`, dashboards): a task starts from its store's
//! offset, never from the group's. So they are committed once per
//! [`GROUP_OFFSET_EVERY`], and when the stage gives up partitions or stops,
//! instead of once per batch — one request per batch less for the broker.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::rebalance::StageContext;

/// How often the group's offsets are committed.
pub(super) const GROUP_OFFSET_EVERY: Duration = Duration::from_secs(1);

/// Input offsets committed to the store and not yet to the group.
pub(super) struct GroupOffsets {
    pending: BTreeMap<i32, i64>,
    last_commit: Instant,
}

impl Default for GroupOffsets {
    fn default() -> Self {
        GroupOffsets {
            pending: BTreeMap::new(),
            last_commit: Instant::now(),
        }
    }
}

impl GroupOffsets {
    /// A task committed its input up to `offset` (the next to read).
    pub(super) fn record(&mut self, partition: i32, offset: i64) {
        self.pending.insert(partition, offset);
    }

    /// Commit what is pending if [`GROUP_OFFSET_EVERY`] has passed (or
    /// `now`). A failure is logged: the next commit carries the same
    /// offsets or later ones.
    pub(super) fn commit(
        &mut self,
        stage: &'static str,
        topic: &str,
        consumer: &BaseConsumer<StageContext>,
        now: bool,
    ) {
        if self.pending.is_empty() || !(now || self.last_commit.elapsed() >= GROUP_OFFSET_EVERY) {
            return;
        }
        let mut offsets = TopicPartitionList::new();
        for (partition, offset) in std::mem::take(&mut self.pending) {
            let _ = offsets.add_partition_offset(topic, partition, Offset::Offset(offset));
        }
        self.last_commit = Instant::now();
        if let Err(e) = consumer.commit(&offsets, CommitMode::Async) {
            tracing::debug!(stage, error = %e, "group offset commit failed");
        }
    }
}
