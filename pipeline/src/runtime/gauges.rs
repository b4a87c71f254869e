//! Per-task gauges: state size and consumer lag.

use rdkafka::consumer::{BaseConsumer, Consumer};

use super::rebalance::StageContext;
use super::Shared;
use crate::metrics;

pub(super) fn update_gauges(shared: &Shared, consumer: &BaseConsumer<StageContext>) {
    let stage = shared.spec.name;
    let Ok(tasks) = shared.tasks.lock() else {
        return;
    };
    for task in tasks.values() {
        let p = task.partition.to_string();
        metrics::STATE_BYTES
            .with_label_values(&[stage, &p])
            .set(task.store.approximate_size() as i64);
        // The high watermark of the consumer's own latest fetch: no
        // request, and right on brokers whose `ListOffsets` is not (tansu).
        if let Some(high) = crate::kafka::fetched_high_watermark(
            consumer.client(),
            &shared.spec.input_topic,
            task.partition,
        ) {
            let lag = (high - task.meta.input_offset.max(0)).max(0);
            metrics::CONSUMER_LAG
                .with_label_values(&[stage, &p])
                .set(lag);
        }
    }
}
