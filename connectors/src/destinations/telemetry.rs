//! What every destination counts, with handles registered once per
//! destination: sent, retried, dead-lettered (`cdp_delivery_failures_total`),
//! attempts, in flight, lag from `emitted_at` and event time to delivery.

use cdp_pipeline::metrics;
use prometheus::{Histogram, IntCounter, IntGauge};
use serde::Deserialize;

/// One destination's metric handles.
#[derive(Clone)]
pub struct DeliveryTelemetry {
    attempts: IntCounter,
    sent: IntCounter,
    retried: IntCounter,
    dead_lettered: IntCounter,
    in_flight: IntGauge,
    lag: Histogram,
    end_to_end: Histogram,
}

impl std::fmt::Debug for DeliveryTelemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryTelemetry").finish_non_exhaustive()
    }
}

/// The two times of a change the delivery metrics read.
#[derive(Deserialize)]
struct Times {
    event_time: Option<String>,
    emitted_at: Option<String>,
}

fn seconds_since(t: &str, now_ms: i64) -> Option<f64> {
    let at = chrono::DateTime::parse_from_rfc3339(t).ok()?;
    Some((now_ms - at.timestamp_millis()).max(0) as f64 / 1000.0)
}

impl DeliveryTelemetry {
    pub fn new(destination: &str) -> Self {
        let d = &[destination];
        DeliveryTelemetry {
            attempts: metrics::DELIVERY_ATTEMPTS.with_label_values(d),
            sent: metrics::DELIVERIES_SENT.with_label_values(d),
            retried: metrics::DELIVERY_RETRIES.with_label_values(d),
            dead_lettered: metrics::DELIVERY_FAILURES.with_label_values(d),
            in_flight: metrics::DELIVERY_IN_FLIGHT.with_label_values(d),
            lag: metrics::DELIVERY_LAG_SECONDS.with_label_values(d),
            end_to_end: metrics::END_TO_END_SECONDS.with_label_values(d),
        }
    }

    /// `n` changes (or requests) tried once more.
    pub fn attempt(&self, n: u64) {
        self.attempts.inc_by(n);
    }

    pub fn retried(&self, n: u64) {
        self.retried.inc_by(n);
    }

    /// A change the destination gave up on (the runtime dead-letters it).
    pub fn dead_lettered(&self, n: u64) {
        self.dead_lettered.inc_by(n);
    }

    /// A change accepted: counts it and observes its lag (from
    /// `emitted_at`) and event time → delivery, when the value says them.
    pub fn delivered(&self, value: &[u8]) {
        self.sent.inc();
        let Ok(times) = serde_json::from_slice::<Times>(value) else {
            return;
        };
        let now_ms = chrono::Utc::now().timestamp_millis();
        if let Some(s) = times
            .emitted_at
            .as_deref()
            .and_then(|t| seconds_since(t, now_ms))
        {
            self.lag.observe(s);
        }
        if let Some(s) = times
            .event_time
            .as_deref()
            .and_then(|t| seconds_since(t, now_ms))
        {
            self.end_to_end.observe(s);
        }
    }

    /// Marks `n` changes in flight until the guard drops.
    pub fn in_flight(&self, n: i64) -> InFlight {
        self.in_flight.add(n);
        InFlight {
            gauge: self.in_flight.clone(),
            n,
        }
    }
}

/// Keeps changes counted in `cdp_delivery_in_flight` while alive.
pub struct InFlight {
    gauge: IntGauge,
    n: i64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.sub(self.n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sent_lag_and_in_flight_per_destination() {
        let t = DeliveryTelemetry::new("telemetry-test");
        let sent = || {
            metrics::DELIVERIES_SENT
                .with_label_values(&["telemetry-test"])
                .get()
        };
        let lag = || {
            metrics::DELIVERY_LAG_SECONDS
                .with_label_values(&["telemetry-test"])
                .get_sample_count()
        };
        let in_flight = || {
            metrics::DELIVERY_IN_FLIGHT
                .with_label_values(&["telemetry-test"])
                .get()
        };
        let (s0, l0) = (sent(), lag());
        {
            let _guard = t.in_flight(3);
            assert_eq!(in_flight(), 3);
            t.delivered(
                br#"{"emitted_at":"2026-01-01T00:00:00Z","event_time":"2026-01-01T00:00:00Z"}"#,
            );
            t.delivered(b"not json");
        }
        assert_eq!(in_flight(), 0);
        assert_eq!(sent(), s0 + 2);
        assert_eq!(lag(), l0 + 1, "only a change with emitted_at has a lag");
    }
}
