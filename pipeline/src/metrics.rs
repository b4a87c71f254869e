//! Every metric cdp exports, registered once in the default registry.
//!
//! Names live here only; label values come from small fixed sets (stage
//! names, reason codes, destination ids, source ids, planned event names and
//! audience names from the config).

use std::sync::LazyLock;

use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge_vec, HistogramVec,
    IntCounterVec, IntGaugeVec,
};

macro_rules! counter {
    ($name:ident, $metric:literal, $help:literal, [$($label:literal),*]) => {
        pub static $name: LazyLock<IntCounterVec> = LazyLock::new(|| {
            register_int_counter_vec!($metric, $help, &[$($label),*])
                .unwrap_or_else(|e| panic!("metric {} registered twice: {e}", $metric))
        });
    };
}

macro_rules! gauge {
    ($name:ident, $metric:literal, $help:literal, [$($label:literal),*]) => {
        pub static $name: LazyLock<IntGaugeVec> = LazyLock::new(|| {
            register_int_gauge_vec!($metric, $help, &[$($label),*])
                .unwrap_or_else(|e| panic!("metric {} registered twice: {e}", $metric))
        });
    };
}

macro_rules! histogram {
    ($name:ident, $metric:literal, $help:literal, [$($label:literal),*], $buckets:expr) => {
        pub static $name: LazyLock<HistogramVec> = LazyLock::new(|| {
            register_histogram_vec!($metric, $help, &[$($label),*], $buckets)
                .unwrap_or_else(|e| panic!("metric {} registered twice: {e}", $metric))
        });
    };
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

counter!(
    RECORDS_IN,
    "cdp_records_in_total",
    "Input records consumed by a stage",
    ["stage"]
);
counter!(
    RECORDS_OUT,
    "cdp_records_out_total",
    "Records a stage produced, by output",
    ["stage", "output"]
);
counter!(
    DEAD_LETTERS,
    "cdp_dead_letters_total",
    "Records sent to the dead-letter topic, by reason",
    ["stage", "reason"]
);
counter!(
    DUPLICATES_DROPPED,
    "cdp_duplicates_dropped_total",
    "Duplicates dropped: replays by position, and repeated messageIds at validate",
    ["stage"]
);
counter!(
    VALIDATION_FAILURES,
    "cdp_validation_failures_total",
    "Events validate sent to dead letters, by source, planned event name (else other) and reason",
    ["source", "event", "reason"]
);
counter!(
    COMMITS,
    "cdp_commits_total",
    "Batches committed (state + offset + positions)",
    ["stage"]
);
counter!(
    REBALANCES,
    "cdp_rebalances_total",
    "Partition assignments and revocations",
    ["stage", "kind"]
);
counter!(
    RESTORES,
    "cdp_restores_total",
    "Task restores from the changelog",
    ["stage"]
);
counter!(
    RESTORED_RECORDS,
    "cdp_restored_records_total",
    "Changelog records read during restores",
    ["stage"]
);
counter!(
    STATE_RESETS,
    "cdp_state_resets_total",
    "Local task state discarded or input restarted because it did not match the broker, by reason",
    ["stage", "reason"]
);
counter!(
    FENCED,
    "cdp_fenced_total",
    "Batches not committed because another owner claimed the partition",
    ["stage"]
);
counter!(
    CHANGELOG_REPAIRS,
    "cdp_changelog_repairs_total",
    "Changelog keys written again because their latest record was not committed",
    ["stage"]
);
counter!(
    TICKS,
    "cdp_ticks_total",
    "Tick records written into input partitions",
    ["stage"]
);
counter!(
    DELIVERY_ATTEMPTS,
    "cdp_delivery_attempts_total",
    "Attempts to deliver to a destination",
    ["destination"]
);
counter!(
    DELIVERY_FAILURES,
    "cdp_delivery_failures_total",
    "Deliveries that failed after every retry",
    ["destination"]
);
counter!(
    DELIVERIES_SENT,
    "cdp_delivery_sent_total",
    "Audience changes a destination accepted",
    ["destination"]
);
counter!(
    DELIVERY_RETRIES,
    "cdp_delivery_retries_total",
    "Retried delivery attempts (5xx, 429, network errors)",
    ["destination"]
);
gauge!(
    DELIVERY_IN_FLIGHT,
    "cdp_delivery_in_flight",
    "Audience changes handed to a destination and not yet settled",
    ["destination"]
);
counter!(
    IDENTITY_DROPPED_IDENTIFIERS,
    "cdp_identity_dropped_identifiers_total",
    "Identifiers identity refused, by type and rule (blocked_value, blocked_pattern, invalid_type, limit, max_merges)",
    ["type", "reason"]
);
counter!(
    IDENTITY_MERGES,
    "cdp_identity_merges_total",
    "Profiles identity merged away into another",
    []
);
counter!(
    EVENT_TIMES_CORRECTED,
    "cdp_event_times_corrected_total",
    "Events whose time was too far ahead of stream time and was replaced by it (event_time.max_future)",
    ["stage"]
);
counter!(
    STATE_LIMIT_HITS,
    "cdp_state_limit_hits_total",
    "Events that made a per-profile state limit drop something, by kind (most_frequent, unique_count; merge_wait: evaluated before every merge transfer it waited for was in)",
    ["stage", "kind"]
);
counter!(
    AUDIENCE_CHANGES,
    "cdp_audience_changes_total",
    "Audience changes emitted by this process",
    ["audience", "action"]
);
gauge!(
    AUDIENCE_MEMBERS,
    "cdp_audience_members",
    "Profiles in the audience among this instance's tasks (sum over instances: the audience's size)",
    ["audience"]
);
counter!(
    HTTP_REQUESTS,
    "cdp_http_requests_total",
    "Collector requests by route and status",
    ["route", "status"]
);
counter!(
    EVENTS_ACCEPTED,
    "cdp_collector_events_accepted_total",
    "Events the collector wrote to the raw topic",
    ["source"]
);
counter!(
    EVENTS_REJECTED,
    "cdp_collector_events_rejected_total",
    "Events the collector refused, by reason",
    ["reason"]
);
counter!(
    TICKS_REJECTED,
    "cdp_ticks_rejected_total",
    "Tick records ignored: not written by the partition's owner, or too far ahead",
    ["stage", "reason"]
);
counter!(
    BROKER_RETRIES,
    "cdp_broker_retries_total",
    "Writes or reads retried because the broker was away or refused them",
    ["stage", "what"]
);
counter!(
    CLIENT_REBUILDS,
    "cdp_client_rebuilds_total",
    "Kafka clients replaced because they could not recover by themselves",
    ["stage", "client"]
);
gauge!(
    BROKER_REACHABLE,
    "cdp_broker_reachable",
    "1 while the component can reach the broker and produce, else 0",
    ["stage"]
);
gauge!(
    TASKS,
    "cdp_tasks",
    "Tasks (input partitions) this instance owns",
    ["stage"]
);
gauge!(
    INPUT_PARTITIONS,
    "cdp_input_partitions",
    "Partitions of the stage's input topic, as this instance last read them: the stage's instances together should own as many (sum of cdp_tasks)",
    ["stage"]
);
gauge!(
    CONSUMER_LAG,
    "cdp_consumer_lag",
    "High watermark minus the task's next offset",
    ["stage", "partition"]
);
gauge!(
    STATE_BYTES,
    "cdp_state_store_bytes",
    "Estimated live bytes of a task's state store",
    ["stage", "partition"]
);
histogram!(
    BATCH_SECONDS,
    "cdp_batch_duration_seconds",
    "Time to process, produce and commit one batch",
    ["stage"],
    LATENCY_BUCKETS.to_vec()
);
histogram!(
    BATCH_PHASE_SECONDS,
    "cdp_batch_phase_seconds",
    "One committed batch's time by phase: poll_wait (the poll until its first record), process, outputs (sinks, then outputs and changelog records acknowledged), markers (commit markers acknowledged), commit (RocksDB)",
    ["stage", "phase"],
    LATENCY_BUCKETS.to_vec()
);
histogram!(
    END_TO_END_SECONDS,
    "cdp_end_to_end_latency_seconds",
    "Event time to audience change delivery",
    ["destination"],
    LATENCY_BUCKETS.to_vec()
);
histogram!(
    DELIVERY_LAG_SECONDS,
    "cdp_delivery_lag_seconds",
    "Audience change emitted_at to accepted by the destination",
    ["destination"],
    LATENCY_BUCKETS.to_vec()
);
histogram!(
    HTTP_SECONDS,
    "cdp_http_request_duration_seconds",
    "Collector request latency",
    ["route"],
    LATENCY_BUCKETS.to_vec()
);
histogram!(
    BROKER_ACK_SECONDS,
    "cdp_broker_ack_seconds",
    "Collector wait for the broker's acknowledgement",
    [],
    LATENCY_BUCKETS.to_vec()
);

/// A stage's series, at zero before anything happens: `cdp_tasks` is there
/// (0) before the first assignment, so an alert on "no tasks" fires for a
/// stage that never joins its group, and `increase()` sees a counter's
/// first event (a series born at 1 shows no increase).
pub fn init_stage(stage: &str) {
    TASKS.with_label_values(&[stage]).set(0);
    FENCED.with_label_values(&[stage]);
    CHANGELOG_REPAIRS.with_label_values(&[stage]);
    for reason in crate::trust::TickReject::ALL {
        TICKS_REJECTED.with_label_values(&[stage, reason.as_str()]);
    }
    CLIENT_REBUILDS.with_label_values(&[stage, "producer"]);
}

/// Render every registered metric in the Prometheus text format.
pub fn render() -> String {
    let encoder = prometheus::TextEncoder::new();
    encoder
        .encode_to_string(&prometheus::gather())
        .unwrap_or_else(|e| format!("# error encoding metrics: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stages_series_exist_at_zero_before_anything_happens() {
        init_stage("fresh");
        let text = render();
        for series in [
            r#"cdp_tasks{stage="fresh"} 0"#,
            r#"cdp_fenced_total{stage="fresh"} 0"#,
            r#"cdp_changelog_repairs_total{stage="fresh"} 0"#,
            r#"cdp_ticks_rejected_total{reason="too_far_ahead",stage="fresh"} 0"#,
            r#"cdp_client_rebuilds_total{client="producer",stage="fresh"} 0"#,
        ] {
            assert!(text.contains(series), "{series} missing");
        }
    }
}
