//! The audiences stage (Engage audiences): `<p>.traits` → `<p>.audiences`.
//!
//! Per profile it keeps the trait values the traits stage reported, the
//! history of events that the audience conditions look at, and the current
//! memberships. After every change it re-evaluates every audience (in
//! topological order, so `{audience: x}` sees x's new value) and emits one
//! [`AudienceChange`](crate::messages::AudienceChange) per membership that changed.
//!
//! Guarantees:
//! - Incremental membership equals a batch recomputation over the whole
//!   history at the same time (property test below): conditions that depend
//!   on time (event conditions with `within`) set a timer at the earliest
//!   moment their value can change, so "did not order within 14d" turns true
//!   when the last order ages out, with no event needed.
//! - Time is stream time and event time only; a profile's evaluation clock
//!   is `max(clock, stream time, event time)` and never goes backwards;
//!   event times are bounded by stream time plus `event_time.max_future`
//!   ([`crate::event_time`]).
//! - Event history per *filter* (event name + property conditions, shared by
//!   every condition using the same filter): an all-time count, plus, for
//!   windowed conditions, event counts in time buckets 1/30 of the shortest
//!   window (at most 31 per window: a window counts at most one bucket
//!   width more at its old edge). Sequence steps have filters of their
//!   own (never sharing a window's buckets) keeping the latest
//!   [`MAX_SEQUENCE_TIMES`] event times each, and a sequence that has held
//!   is remembered (a sequence has no horizon: once it happened, it holds
//!   for good). Exact unless a match needs a step time older than the
//!   latest [`MAX_SEQUENCE_TIMES`] of its step when the match's last event
//!   arrives (a very late event whose partners were superseded).
//! - Merges: the merged-away profile exits every audience it was in, its
//!   state travels to the survivor (which then enters what it qualifies
//!   for), and late updates for it are redirected.
//! - Config: unknown audience references and cycles between audiences are
//!   rejected at load with the path of the bad field.

mod compile;
mod config;
mod history;
mod operator;
mod profile;
mod sizes;
mod sync;
#[cfg(test)]
mod tests;

pub use compile::AudienceSet;
pub use config::{
    AudienceDef, Condition, CountCondition, EventCondition, SequenceCondition, SequenceStep,
    TraitCondition,
};
pub use operator::AudiencesOperator;
pub use sizes::SizeReporter;
pub use sync::current_memberships;

/// The `stage` this operator writes on its transfers.
const STAGE: &str = "audiences";

/// Event times kept per sequence step filter: the latest by time.
pub const MAX_SEQUENCE_TIMES: usize = 64;
