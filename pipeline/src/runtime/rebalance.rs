//! The consumer context: rebalance callbacks, which run inside `poll` on
//! the stage's own thread (see the module docs of [`super`]).

use std::sync::Arc;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList};

use super::{ownership, RuntimeError, Shared};
use crate::metrics;

pub(super) struct StageContext {
    pub(super) shared: Arc<Shared>,
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
                self.assign(tpl)
                    .and_then(|()| consumer.assign(tpl).map_err(RuntimeError::from))
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
                }
                metrics::TASKS.with_label_values(&[stage]).set(0);
                consumer.unassign().map_err(RuntimeError::from)
            }
        };
        if let Err(e) = result {
            tracing::error!(stage, error = %e, "rebalance failed");
            if let Ok(mut f) = self.shared.failure.lock() {
                f.get_or_insert(e);
            }
        }
        self.shared.ready.set(true);
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
