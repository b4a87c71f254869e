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

/// How many partitions the stage's input topic has (`cdp_input_partitions`),
/// so an alert can compare the partitions owned with the partitions there
/// are: a partition no instance owns (a member a broker stranded) shows in
/// no lag series. One metadata request, at most `timeout` long.
pub(super) fn update_input_partitions(
    shared: &Shared,
    consumer: &BaseConsumer<StageContext>,
    timeout: std::time::Duration,
) {
    let topic = &shared.spec.input_topic;
    let Ok(metadata) = consumer.fetch_metadata(Some(topic), timeout) else {
        return;
    };
    if let Some(t) = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
    {
        metrics::INPUT_PARTITIONS
            .with_label_values(&[shared.spec.name])
            .set(t.partitions().len() as i64);
    }
}

/// Drop the per-partition series of partitions this instance no longer owns.
pub(super) fn forget(stage: &str, partitions: &[i32]) {
    for p in partitions {
        let p = p.to_string();
        // An error only means the series was never set.
        let _ = metrics::STATE_BYTES.remove_label_values(&[stage, &p]);
        let _ = metrics::CONSUMER_LAG.remove_label_values(&[stage, &p]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_partitions_series_are_gone() {
        let stage = "gauges-test";
        for p in ["0", "1"] {
            metrics::CONSUMER_LAG.with_label_values(&[stage, p]).set(7);
            metrics::STATE_BYTES.with_label_values(&[stage, p]).set(9);
        }
        forget(stage, &[1]);
        let series = |name: &str| -> Vec<String> {
            prometheus::gather()
                .into_iter()
                .filter(|f| f.name() == name)
                .flat_map(|f| f.get_metric().to_vec())
                .filter(|m| m.get_label().iter().any(|l| l.value() == stage))
                .flat_map(|m| {
                    m.get_label()
                        .iter()
                        .filter(|l| l.name() == "partition")
                        .map(|l| l.value().to_string())
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        assert_eq!(series("cdp_consumer_lag"), ["0"]);
        assert_eq!(series("cdp_state_store_bytes"), ["0"]);
    }
}
