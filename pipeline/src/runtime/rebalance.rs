//! The consumer context: rebalance callbacks, which run inside `poll` on
//! the stage's own thread (see the module docs of [`super`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList};

use super::{ownership, RuntimeError, Shared};
use crate::metrics;

pub(super) struct StageContext {
    pub(super) shared: Arc<Shared>,
}

/// How long a stage may be in its group without an assignment before it
/// says so: a rebalance of a healthy group settles within a session
/// timeout or two.
pub(super) const UNSETTLED_WARN_AFTER: Duration = Duration::from_secs(60);

/// Whether the stage holds an assignment, and since when it has not. A
/// stage between a revoke (or its start) and the next assignment owns no
/// partition: it is not ready, and if the group does not settle it says
/// why that may be.
#[derive(Debug)]
pub(super) struct GroupWatch {
    unassigned_since: Option<Instant>,
    warned: bool,
    /// Since when the assignment has held no partition (a member of a
    /// group with more members than partitions, or one a broker stranded).
    empty_since: Option<Instant>,
    warned_empty: bool,
}

impl Default for GroupWatch {
    fn default() -> Self {
        GroupWatch {
            unassigned_since: Some(Instant::now()),
            warned: false,
            empty_since: None,
            warned_empty: false,
        }
    }
}

/// `true` once per stretch (`warned` remembers it): when a stretch that
/// began at `since` has lasted `after` by `now`.
fn once_after(since: Option<Instant>, warned: &mut bool, now: Instant, after: Duration) -> bool {
    match since {
        Some(since) if !*warned && now.duration_since(since) >= after => {
            *warned = true;
            true
        }
        _ => false,
    }
}

impl GroupWatch {
    /// An assignment arrived, of `partitions` partitions.
    pub(super) fn assigned(&mut self, partitions: usize) {
        self.unassigned_since = None;
        self.warned = false;
        if partitions == 0 {
            self.empty_since.get_or_insert_with(Instant::now);
        } else {
            self.empty_since = None;
            self.warned_empty = false;
        }
    }

    /// `true` once per empty stretch, when the stage has held an empty
    /// assignment for `after`.
    pub(super) fn empty_overdue(&mut self, now: Instant, after: Duration) -> bool {
        once_after(self.empty_since, &mut self.warned_empty, now, after)
    }

    pub(super) fn is_assigned(&self) -> bool {
        self.unassigned_since.is_none()
    }

    pub(super) fn revoked(&mut self) {
        self.unassigned_since = Some(Instant::now());
    }

    /// `true` once, when the stage has waited `after` for an assignment.
    pub(super) fn overdue(&mut self, now: Instant, after: Duration) -> bool {
        once_after(self.unassigned_since, &mut self.warned, now, after)
    }

    /// Log the wait once it is overdue.
    pub(super) fn check(&mut self, stage: &str, static_member: bool) {
        if self.empty_overdue(Instant::now(), UNSETTLED_WARN_AFTER) {
            // Ready all the same: a spare replica must not hold up a
            // rollout. But a member a broker stranded after a crash looks
            // just like one, and processes nothing.
            tracing::warn!(
                stage,
                waited_s = UNSETTLED_WARN_AFTER.as_secs(),
                hint = "expected if the group has more members than the input topic has partitions; otherwise the broker left this member without partitions (seen on tansu after a kill -9 and a quick restart): restart this instance, and check cdp_tasks summed over the stage's instances",
                "this instance holds no partition"
            );
        }
        if !self.overdue(Instant::now(), UNSETTLED_WARN_AFTER) {
            return;
        }
        let hint = if static_member {
            "this instance is a static member (--instance-id / $POD_NAME): a broker that does not implement static membership (tansu 0.6) never settles such a group; run without it (helm: staticMembership: false) and use a new consumer group (topic prefix)"
        } else {
            "a member may be stuck or the coordinator unreachable: check the brokers and the other instances of this stage"
        };
        tracing::error!(
            stage,
            waited_s = UNSETTLED_WARN_AFTER.as_secs(),
            hint,
            "no partition assignment from the consumer group yet; /readyz stays false until one arrives"
        );
    }
}

impl ClientContext for StageContext {}

impl ConsumerContext for StageContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let stage = self.shared.spec.name;
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Not ready while restoring (which may wait out a broker).
                self.shared.ready.set(false);
                metrics::REBALANCES
                    .with_label_values(&[stage, "assign"])
                    .inc();
                let assigned = self
                    .assign(tpl)
                    .and_then(|()| consumer.assign(tpl).map_err(RuntimeError::from));
                if assigned.is_ok() {
                    if let Ok(mut watch) = self.shared.group_watch.lock() {
                        watch.assigned(tpl.count());
                    }
                    // Restoring reached the broker: it answers.
                    self.shared
                        .broker_away
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                    self.shared.ready.set(true);
                }
                assigned
            }
            _ => {
                metrics::REBALANCES
                    .with_label_values(&[stage, "revoke"])
                    .inc();
                // Tasks are idle here (see module docs): dropping closes
                // their stores; their progress is already committed.
                if let Ok(mut offsets) = self.shared.group_offsets.lock() {
                    offsets.commit(stage, &self.shared.spec.input_topic, consumer, true);
                }
                if let Ok(mut tasks) = self.shared.tasks.lock() {
                    let partitions: Vec<i32> = tasks.keys().copied().collect();
                    tracing::info!(stage, ?partitions, "partitions revoked");
                    tasks.clear();
                    // A partition's series belong to its owner: left here
                    // they would freeze at their last value and count twice
                    // in `sum by (stage)` once another instance owns it.
                    super::gauges::forget(stage, &partitions);
                }
                metrics::TASKS.with_label_values(&[stage]).set(0);
                // Owning nothing until the group assigns again.
                self.shared.ready.set(false);
                if let Ok(mut watch) = self.shared.group_watch.lock() {
                    watch.revoked();
                }
                consumer.unassign().map_err(RuntimeError::from)
            }
        };
        if let Err(e) = result {
            tracing::error!(stage, error = %e, "rebalance failed");
            if let Ok(mut f) = self.shared.failure.lock() {
                f.get_or_insert(e);
            }
        }
    }
}

impl StageContext {
    /// Open and restore a task per assigned partition and point the
    /// assignment at each task's committed offset.
    fn assign(&self, tpl: &mut TopicPartitionList) -> Result<(), RuntimeError> {
        let shared = &self.shared;
        let mut tasks = shared.tasks.lock().map_err(|_| RuntimeError::Poisoned)?;
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        tracing::info!(stage = shared.spec.name, ?partitions, "partitions assigned");
        for partition in partitions {
            let mut task = ownership::open_task(shared, partition)?;
            let offset = ownership::input_start(shared, &mut task)?;
            tpl.set_partition_offset(&shared.spec.input_topic, partition, offset)?;
            tasks.insert(partition, task);
        }
        metrics::TASKS
            .with_label_values(&[shared.spec.name])
            .set(tasks.len() as i64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_without_an_assignment_is_overdue_once_per_wait() {
        let mut watch = GroupWatch::default();
        let start = Instant::now();
        let after = Duration::from_secs(60);
        assert!(!watch.overdue(start, after));
        let late = start + Duration::from_secs(61);
        assert!(watch.overdue(late, after));
        assert!(!watch.overdue(late + after, after), "said once");
        watch.assigned(2);
        assert!(!watch.overdue(late + after * 3, after), "assigned");
        watch.revoked();
        let revoked_at = Instant::now();
        assert!(!watch.overdue(revoked_at, after));
        assert!(watch.overdue(revoked_at + after, after), "a new wait");
    }

    /// An assignment of no partition is ready (a spare replica) but said
    /// once per empty stretch, so a member a broker stranded shows in the
    /// log; one with partitions never is.
    #[test]
    fn an_empty_assignment_is_said_once_per_stretch() {
        let mut watch = GroupWatch::default();
        let after = Duration::from_secs(60);
        watch.assigned(3);
        let t = Instant::now();
        assert!(
            !watch.empty_overdue(t + after * 2, after),
            "partitions held"
        );
        watch.assigned(0);
        assert!(watch.is_assigned(), "ready");
        let empty_at = Instant::now();
        assert!(!watch.empty_overdue(empty_at, after));
        assert!(watch.empty_overdue(empty_at + after, after));
        assert!(
            !watch.empty_overdue(empty_at + after * 2, after),
            "said once"
        );
        watch.assigned(0);
        assert!(
            !watch.empty_overdue(empty_at + after * 3, after),
            "the same stretch"
        );
        watch.assigned(1);
        watch.assigned(0);
        let again = Instant::now();
        assert!(watch.empty_overdue(again + after, after), "a new stretch");
    }
}
