//! Riding out a broker that is away for seconds or minutes.
//!
//! A broker restart shows up as transport failures, timed-out deliveries and
//! refused requests. None of them may end a stage: what the runtime was doing
//! (producing a batch, reading a changelog) is retried with exponential
//! backoff until it succeeds, the process shuts down, or [`BROKER_PATIENCE`]
//! has passed — only then does the stage exit so the orchestrator restarts
//! it. Retrying a batch's produce is safe: its records carry the same
//! positions each time, so consumers drop the repeats.

use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::service::Shutdown;

/// How long a stage keeps retrying against an unreachable or refusing broker
/// before it gives up and exits.
pub const BROKER_PATIENCE: Duration = Duration::from_secs(600);
/// First wait after a failure; doubled per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Exponential backoff bounded by [`BROKER_PATIENCE`].
#[derive(Debug)]
pub struct Backoff {
    started: Instant,
    next: Duration,
    patience: Duration,
    /// Failures so far.
    pub failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::with_patience(BROKER_PATIENCE)
    }
}

impl Backoff {
    pub fn with_patience(patience: Duration) -> Self {
        Backoff {
            started: Instant::now(),
            next: MIN_BACKOFF,
            patience,
            failures: 0,
        }
    }

    /// Record a failure and sleep before the next attempt. `false` when
    /// patience ran out or shutdown began: give up.
    pub fn wait(&mut self, shutdown: Option<&Shutdown>) -> bool {
        self.failures += 1;
        if self.started.elapsed() >= self.patience {
            return false;
        }
        let until = Instant::now() + self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        while Instant::now() < until {
            if shutdown.is_some_and(Shutdown::is_triggered) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
        }
        !shutdown.is_some_and(Shutdown::is_triggered)
    }

    /// How long this wait has lasted so far.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Whether a failed produce can never succeed by trying again (the record
/// itself or the credentials are wrong), as opposed to a broker that is away
/// or restarting.
pub fn is_permanent(error: &KafkaError) -> bool {
    let code = match error {
        KafkaError::MessageProduction(code) => code,
        _ => return false,
    };
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::InvalidTopic
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_gives_up_after_patience_or_on_shutdown() {
        let mut b = Backoff::with_patience(Duration::ZERO);
        assert!(!b.wait(None));
        let shutdown = Shutdown::default();
        shutdown.trigger();
        let mut b = Backoff::with_patience(Duration::from_secs(60));
        assert!(!b.wait(Some(&shutdown)));
        assert_eq!(b.failures, 1);
    }

    #[test]
    fn a_restarting_broker_is_transient_and_a_bad_record_is_not() {
        for transient in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::Unknown,
            RDKafkaErrorCode::NotLeaderForPartition,
        ] {
            assert!(!is_permanent(&KafkaError::MessageProduction(transient)));
        }
        assert!(is_permanent(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
    }
}
