//! Delivery reports counted per produce round: a batch waits once for all
//! of its records instead of awaiting a future (a oneshot channel) per
//! record.
//!
//! Each record carries `(round, index)` packed into its delivery opaque. The
//! producer's polling thread files every report under its round and wakes
//! the waiter once the round is complete, so a round returns only when
//! every one of its records is acknowledged or has failed — the same
//! guarantee as awaiting each record. Opaque [`UNWATCHED`] is for records
//! nobody waits for (ticks). A round whose waiter left (an enqueue failed)
//! is forgotten, and late reports for it are dropped.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext, ThreadedProducer};

/// The stage runtime's producer: delivery reports go to [`AckContext`].
pub(super) type AckedProducer = ThreadedProducer<AckContext>;

/// The delivery opaque of a record nobody waits for.
pub(super) const UNWATCHED: usize = 0;

// A round id and a record index share one opaque.
const _: () = assert!(usize::BITS >= 64, "delivery opaques pack two u32s");

/// Files delivery reports under their rounds.
#[derive(Default)]
pub(super) struct AckContext {
    rounds: Mutex<Rounds>,
    complete: Condvar,
}

#[derive(Default)]
struct Rounds {
    last: u32,
    open: HashMap<u32, Round>,
}

/// A partition no acknowledgement has: the record's report has not come.
const PENDING: i32 = i32::MIN;
/// A partition no acknowledgement has: the record failed (see `failed`).
const FAILED: i32 = i32::MIN + 1;

struct Round {
    /// Each record's `(partition, offset)` once acknowledged; [`PENDING`]
    /// or [`FAILED`] as its partition until then. 16 bytes a record, handed
    /// to the waiter as it is (a round of 5 000 records is 80 KB; a slot
    /// holding a `KafkaError` was about three times that, and collected again).
    acked: Vec<(i32, i64)>,
    /// The failure of the lowest index among failed records.
    failed: Option<(usize, KafkaError)>,
    pending: usize,
}

/// Why a round did not come back complete and acknowledged.
#[derive(Debug)]
pub(super) enum RoundError {
    /// The record at `index` failed (the first such, in record order).
    Failed {
        index: usize,
        error: KafkaError,
    },
    /// Reports stopped coming (librdkafka reports every record within its
    /// `message.timeout.ms`; this only guards against a lost report).
    TimedOut,
    Poisoned,
}

fn pack(round: u32, index: usize) -> usize {
    ((round as usize) << 32) | (index & 0xffff_ffff)
}

fn unpack(opaque: usize) -> (u32, usize) {
    ((opaque >> 32) as u32, opaque & 0xffff_ffff)
}

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        if opaque == UNWATCHED {
            return;
        }
        self.file(
            opaque,
            match result {
                Ok(m) => Ok((m.partition(), m.offset())),
                Err((e, _)) => Err(e),
            },
        );
    }
}

impl AckContext {
    /// File one record's report under its round; wake the waiter once the
    /// round is complete.
    fn file(&self, opaque: usize, result: Result<(i32, i64), &KafkaError>) {
        let (round, index) = unpack(opaque);
        let Ok(mut rounds) = self.rounds.lock() else {
            return;
        };
        let Some(r) = rounds.open.get_mut(&round) else {
            return; // its waiter left
        };
        let Some(slot) = r.acked.get_mut(index) else {
            return;
        };
        if slot.0 == PENDING {
            r.pending -= 1;
        }
        match result {
            Ok(at) => *slot = at,
            Err(e) => {
                *slot = (FAILED, -1);
                if r.failed.as_ref().is_none_or(|(first, _)| index < *first) {
                    r.failed = Some((index, e.clone()));
                }
            }
        }
        if r.pending == 0 {
            self.complete.notify_all();
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Rounds>, RoundError> {
        self.rounds.lock().map_err(|_| RoundError::Poisoned)
    }

    /// Open a round of `records` records. Send record `i` with opaque
    /// [`Waiter::opaque`]`(i)`, then [`Waiter::wait`].
    pub(super) fn open(&self, records: usize) -> Result<Waiter<'_>, RoundError> {
        let mut rounds = self.lock()?;
        let mut round = rounds.last.wrapping_add(1).max(1);
        while rounds.open.contains_key(&round) {
            round = round.wrapping_add(1).max(1);
        }
        rounds.last = round;
        rounds.open.insert(
            round,
            Round {
                acked: vec![(PENDING, -1); records],
                failed: None,
                pending: records,
            },
        );
        Ok(Waiter { ctx: self, round })
    }
}

/// One open round; dropping it forgets the round.
pub(super) struct Waiter<'a> {
    ctx: &'a AckContext,
    round: u32,
}

impl Waiter<'_> {
    pub(super) fn opaque(&self, index: usize) -> usize {
        pack(self.round, index)
    }

    /// Wait until every record of the round has its report; each record's
    /// `(partition, offset)` in order, or the first failure.
    pub(super) fn wait(self, patience: Duration) -> Result<Vec<(i32, i64)>, RoundError> {
        let deadline = Instant::now() + patience;
        let mut rounds = self.ctx.lock()?;
        loop {
            match rounds.open.get(&self.round) {
                Some(r) if r.pending == 0 => break,
                Some(_) => {}
                None => return Err(RoundError::TimedOut),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RoundError::TimedOut);
            }
            rounds = self
                .ctx
                .complete
                .wait_timeout(rounds, left)
                .map_err(|_| RoundError::Poisoned)?
                .0;
        }
        let round = rounds
            .open
            .remove(&self.round)
            .ok_or(RoundError::TimedOut)?;
        match round.failed {
            Some((index, error)) => Err(RoundError::Failed { index, error }),
            None => Ok(round.acked),
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if let Ok(mut rounds) = self.ctx.rounds.lock() {
            rounds.open.remove(&self.round);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaques_round_trip_and_never_collide_with_unwatched() {
        for (round, index) in [(1, 0), (1, 999), (u32::MAX, 0xffff_ffff), (7, 42)] {
            let opaque = pack(round, index);
            assert_ne!(opaque, UNWATCHED);
            assert_eq!(unpack(opaque), (round, index));
        }
    }

    #[test]
    fn rounds_get_distinct_ids_and_are_forgotten_when_dropped() -> Result<(), String> {
        let ctx = AckContext::default();
        let a = ctx.open(2).map_err(|e| format!("{e:?}"))?;
        let b = ctx.open(1).map_err(|e| format!("{e:?}"))?;
        assert_ne!(unpack(a.opaque(0)).0, unpack(b.opaque(0)).0);
        drop(a);
        let open = ctx.rounds.lock().map_err(|e| e.to_string())?.open.len();
        assert_eq!(open, 1);
        Ok(())
    }

    #[test]
    fn an_empty_round_is_complete_at_once() -> Result<(), String> {
        let ctx = AckContext::default();
        let acks = ctx
            .open(0)
            .map_err(|e| format!("{e:?}"))?
            .wait(Duration::from_millis(10))
            .map_err(|e| format!("{e:?}"))?;
        assert!(acks.is_empty());
        Ok(())
    }

    #[test]
    fn a_complete_round_gives_each_records_position_in_record_order() -> Result<(), String> {
        let ctx = AckContext::default();
        let round = ctx.open(3).map_err(|e| format!("{e:?}"))?;
        // Reports come in any order, and a repeated one counts once.
        ctx.file(round.opaque(2), Ok((1, 30)));
        ctx.file(round.opaque(0), Ok((0, 10)));
        ctx.file(round.opaque(2), Ok((1, 30)));
        ctx.file(round.opaque(1), Ok((0, 11)));
        let acks = round
            .wait(Duration::from_millis(10))
            .map_err(|e| format!("{e:?}"))?;
        assert_eq!(acks, vec![(0, 10), (0, 11), (1, 30)]);
        Ok(())
    }

    #[test]
    fn a_round_with_failures_reports_the_first_in_record_order() -> Result<(), String> {
        let ctx = AckContext::default();
        let round = ctx.open(4).map_err(|e| format!("{e:?}"))?;
        let late = KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::MessageTimedOut);
        let early = KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull);
        ctx.file(round.opaque(3), Err(&late));
        ctx.file(round.opaque(0), Ok((0, 1)));
        ctx.file(round.opaque(1), Err(&early));
        ctx.file(round.opaque(2), Ok((0, 2)));
        match round.wait(Duration::from_millis(10)) {
            Err(RoundError::Failed { index, error }) => {
                assert_eq!(index, 1);
                assert_eq!(error, early);
            }
            other => return Err(format!("expected the failure of record 1, got {other:?}")),
        }
        Ok(())
    }

    #[test]
    fn a_round_without_all_its_reports_times_out() -> Result<(), String> {
        let ctx = AckContext::default();
        let waited = ctx
            .open(1)
            .map_err(|e| format!("{e:?}"))?
            .wait(Duration::from_millis(20));
        assert!(matches!(waited, Err(RoundError::TimedOut)));
        Ok(())
    }
}
