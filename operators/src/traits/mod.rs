//! The traits stage (Engage computed traits): `<p>.identified` → `<p>.traits`.
//!
//! Per profile it keeps the computed traits the config declares (event
//! counters, aggregations, most frequent, first and last values, unique
//! lists; each with an event filter, property conditions and an optional
//! sliding window) and the profile traits `identify` calls set.
//!
//! Input: [`ProfileRecord`](crate::messages::ProfileRecord), keyed by profile id. Output to `NEXT`: one
//! [`ProfileUpdate::Update`](crate::messages::ProfileUpdate::Update) for *every* event (with the traits whose value
//! changed, possibly none, because the audiences stage needs every event),
//! one for each window expiry or merge that changes a value, and the
//! [`ProfileUpdate::Merged`](crate::messages::ProfileUpdate::Merged) records as they come.
//!
//! Guarantees:
//! - Every trait's state is *mergeable*: `merge(state(A), state(B)) ==
//!   state(A ∪ B)` for any multisets of events A and B; merge is commutative
//!   and associative (property tests below). Sums are kept in fixed point
//!   (10⁻⁹ units, `i128`) so addition is exact, not float-rounded.
//! - Values depend on event time, never on arrival order: `first`/`last`
//!   are by `(event time, value)`, ties of most-frequent go to the smallest
//!   value. Only identify traits break an event-time tie by arrival.
//! - Windows slide in time buckets of at most 1/30 of the window (see
//!   [`bucket_width`]): state per windowed trait is at most 31 bucket
//!   states whatever the traffic; a value counts every event in the window
//!   and at most one bucket width more at its old edge; a timer recomputes
//!   it when the oldest bucket leaves. `most_frequent` and `unique_count`
//!   keep at most `limit` values per profile (drops are counted).
//! - Time is stream time ([`Context::now`](cdp_pipeline::operator::Context::now)) and event time only. A profile's
//!   evaluation clock is `max(clock, stream time, event time)`: it never
//!   goes backwards, so pruning a window never loses an entry a later
//!   evaluation would count. An event time is first bounded by stream time
//!   plus `event_time.max_future` ([`crate::event_time`]), so one event
//!   from a wrong device clock cannot drag the clock into the future.
//! - Merges: on `merged(from, into)` the state of `from` travels to `into`'s
//!   partition as a `transfer`, and a redirect forwards late records for
//!   `from` to `into`. The merging event is evaluated after the transfers
//!   it names are folded in ([`crate::profile_keyed`]): its update carries
//!   the changes from before the merge to after it, and its
//!   `merged_from`, so the audiences stage does the same.

mod comparison;
mod config;
mod operator;
mod profile;
mod state;
#[cfg(test)]
mod tests;
mod window;

pub(crate) use comparison::{keyed_comparison_schema, set_comparison, COMPARISONS};
pub use comparison::{Comparison, PropertyCondition, ValueKind};
pub use config::{
    AggregateFunction, AggregationDef, EventCounterDef, FirstLastDef, MostFrequentDef, TraitDef,
    TraitSet, UniqueCountDef, UniqueListDef,
};
pub use operator::TraitsOperator;
pub use profile::stored_values;
pub use state::MAX_KEPT_BYTES;
pub use window::{bucket_width, BUCKETS_PER_WINDOW};

/// The `stage` this operator writes on its transfers.
const STAGE: &str = "traits";

/// Header on an update whose event made a per-profile limit drop state:
/// the trait kinds, comma-separated (`most_frequent,unique_count`).
pub const STATE_LIMIT_HEADER: &str = "cdp-state-limit";

/// The state-limit kind of an event evaluated before every merge it
/// waited for was in (more than
/// [`MAX_HELD_INPUTS`](crate::profile_keyed::MAX_HELD_INPUTS) held).
const MERGE_WAIT_LIMIT: &str = "merge_wait";
