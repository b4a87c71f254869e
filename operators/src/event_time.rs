//! How far ahead of the stream an event's own time may be.
//!
//! The traits and audiences stages evaluate a profile at its clock,
//! `max(stream time, event time)`. Left unchecked, one event dated a year
//! ahead (a wrong device clock, a direct producer, `/v1/import`) would move
//! that clock a year forward and prune every window of the profile. So an
//! event time is bounded by a **reference time** plus a tolerance:
//!
//! - reference = `max(stream time, broker timestamp of the input record)`
//!   (both deterministic under replay: ticks are input, and the broker
//!   timestamp is stored with the record). Before the first tick of a task
//!   and without a broker timestamp, no reference is known and nothing is
//!   bounded.
//! - an event time `t > reference + max_future` is beyond the tolerance.
//!   With `beyond: correct` (the default) the event is taken to have
//!   happened at the reference time (when cdp received it, the best
//!   estimate left), the `Update` it produces says so in
//!   `time_corrected_from` and the `cdp-time-corrected` header, and
//!   `cdp_event_times_corrected_total{stage}` counts it. With `beyond:
//!   dead_letter` it goes to `<p>.invalid` with reason `future_event_time`.
//! - events in the past are never touched: a late event counts wherever its
//!   time still falls inside a window.

use cdp_pipeline::operator::OperatorError;
use cdp_pipeline::Span;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Default tolerance for event times ahead of the stream: one hour.
pub const DEFAULT_MAX_FUTURE: Span = Span::from_secs(3600);

/// Header set on a record whose event time was corrected.
pub const TIME_CORRECTED_HEADER: &str = "cdp-time-corrected";

/// What happens to an event dated beyond the tolerance.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum FutureTimePolicy {
    /// Take the event to have happened at the reference time (stream time),
    /// and say so on its update (`time_corrected_from`).
    #[default]
    Correct,
    /// Send it to `<p>.invalid` with reason `future_event_time`.
    DeadLetter,
}

/// The `event_time` section: the bound on event times ahead of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventTimeConfig {
    /// How far an event's time may be ahead of stream time (the latest
    /// tick, or the input record's broker timestamp if later), e.g. `1h`.
    #[serde(default = "default_max_future")]
    pub max_future: Span,
    /// What happens beyond it: `correct` (the default) or `dead_letter`.
    #[serde(default)]
    pub beyond: FutureTimePolicy,
}

const fn default_max_future() -> Span {
    DEFAULT_MAX_FUTURE
}

impl Default for EventTimeConfig {
    fn default() -> Self {
        EventTimeConfig {
            max_future: DEFAULT_MAX_FUTURE,
            beyond: FutureTimePolicy::Correct,
        }
    }
}

/// An event time after the bound was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundedTime {
    /// The time to evaluate the event at.
    pub time: i64,
    /// The event's own time, when it was replaced.
    pub corrected_from: Option<i64>,
}

impl EventTimeConfig {
    /// Apply the bound to `event_time`, given the task's stream time and the
    /// input record's broker timestamp. `Err` only under `dead_letter`.
    pub fn bound(
        &self,
        event_time: i64,
        stream_time: i64,
        record_time: Option<i64>,
    ) -> Result<BoundedTime, OperatorError> {
        let reference = stream_time.max(record_time.unwrap_or(i64::MIN));
        let unbounded = BoundedTime {
            time: event_time,
            corrected_from: None,
        };
        // No tick yet and no broker time: nothing to bound against.
        if reference <= 0 {
            return Ok(unbounded);
        }
        if event_time <= reference.saturating_add(self.max_future.millis()) {
            return Ok(unbounded);
        }
        match self.beyond {
            FutureTimePolicy::Correct => Ok(BoundedTime {
                time: reference,
                corrected_from: Some(event_time),
            }),
            FutureTimePolicy::DeadLetter => Err(OperatorError::rejected(
                "future_event_time",
                json!({
                    "error": "event time is ahead of stream time by more than event_time.max_future",
                    "event_time": crate::messages::rfc3339_ms(event_time),
                    "stream_time": crate::messages::rfc3339_ms(reference),
                    "max_future": self.max_future.to_string(),
                }),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    #[test]
    fn times_within_the_tolerance_or_in_the_past_are_kept() {
        let c = EventTimeConfig::default();
        let now = 1_000 * HOUR;
        for t in [now - 400 * HOUR, now, now + HOUR] {
            assert_eq!(c.bound(t, now, None).ok().map(|b| b.time), Some(t));
        }
        // No reference yet: nothing is bounded.
        assert_eq!(
            c.bound(now + 1000 * HOUR, 0, None).ok().map(|b| b.time),
            Some(now + 1000 * HOUR)
        );
    }

    #[test]
    fn times_beyond_the_tolerance_are_corrected_or_dead_lettered() {
        let now = 1_000 * HOUR;
        let far = now + 24 * 365 * HOUR;
        let c = EventTimeConfig::default();
        let b = c.bound(far, now, Some(now + 5)).ok();
        assert_eq!(
            b,
            Some(BoundedTime {
                time: now + 5,
                corrected_from: Some(far)
            })
        );
        let strict = EventTimeConfig {
            beyond: FutureTimePolicy::DeadLetter,
            ..c
        };
        assert!(matches!(
            strict.bound(far, now, None),
            Err(OperatorError::Rejected {
                reason: "future_event_time",
                ..
            })
        ));
        assert!(strict.bound(now + HOUR, now, None).is_ok());
    }
}
