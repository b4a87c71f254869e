//! The operator contract: pure logic over `(state, record) -> (state changes,
//! outputs, timers)`.
//!
//! An operator never touches Kafka, RocksDB or tokio. It reads and writes its
//! task's state through [`Context`], emits keyed records to *named* outputs
//! (the runtime maps a name to a topic or a sink), and asks for timers. Time
//! enters only through tick records: [`Context::now`] is the stream time of
//! the last tick the task consumed, never the wall clock, so a replay of the
//! same input computes the same outputs.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::envelope::{header_str, HeaderRef};
use crate::store::{StateBackend, StoreError};

/// One input record as an operator sees it.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub partition: i32,
    pub offset: i64,
    /// The broker timestamp of the record, milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    /// Borrowed from the consumed message: the runtime copies nothing.
    pub headers: &'a [HeaderRef<'a>],
}

impl<'a> Record<'a> {
    /// The first header with this name, as UTF-8 if it is.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        header_str(self.headers, name)
    }
}

/// Why an operator refused a record. `Rejected` records become dead letters
/// with the reason; `Store` errors stop the task (the batch is not committed
/// and will be replayed).
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("{reason}")]
    Rejected {
        /// A short, fixed reason code used as a metric label (`invalid_json`).
        reason: &'static str,
        /// What a person needs to fix the record, e.g. the list of violations.
        detail: serde_json::Value,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl OperatorError {
    pub fn rejected(reason: &'static str, detail: impl Into<serde_json::Value>) -> Self {
        OperatorError::Rejected {
            reason,
            detail: detail.into(),
        }
    }
}

/// A record an operator emitted, before the runtime stamps its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    pub output: &'static str,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A stateful, deterministic stream operator. One instance per task (input
/// partition); the runtime calls it from one thread at a time.
pub trait Operator: Send {
    /// Process one input record.
    fn process(&mut self, record: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError>;

    /// A timer set with [`Context::set_timer`] is due: stream time reached it.
    fn on_timer(&mut self, _key: &[u8], _ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        Ok(())
    }

    /// A tick moved stream time to [`Context::now`], and the timers due by
    /// then fired. What it emits and writes belongs to the tick's record,
    /// as a timer's does. Most operators need nothing here; one that works
    /// through its whole state in steps (the profile stages evaluating
    /// every profile again after their config changed) takes a step per
    /// tick, so an idle partition gets there too.
    fn on_tick(&mut self, _ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        Ok(())
    }

    /// The task's batch ends: the runtime calls it after the batch's last
    /// record and timer, before it takes the batch's state changes to
    /// commit them. An operator that keeps state in memory within a batch
    /// (the profile stages write a profile touched several times in one
    /// batch once, not once per record) writes it here. It emits nothing;
    /// an error stops the task as a store error does (the batch is not
    /// committed).
    fn end_batch(&mut self, _ctx: &mut Context<'_>) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Builds the operator of one task. The runtime calls it when a partition is
/// assigned, after the task's state has been restored.
pub type OperatorFactory = Box<dyn Fn(i32) -> Box<dyn Operator> + Send + Sync>;

/// Key prefix of the timers the runtime keeps in the task's store.
pub(crate) const TIMER_PREFIX: &[u8] = b"\x00cdp/timer/";

/// How a stage's timers follow from its state, for a stage whose every
/// timer is keyed by a state key whose value names the timer's time (the
/// validate stage's dedupe entries). Given a state key and its value, the
/// time of the timer set with that key, or `None` when the key sets none.
///
/// A stage that declares it ([`StageSpec::timers_from_state`](crate::StageSpec))
/// does not log its timers: the changelog carries one record per entry
/// instead of two, and a restore sets the timer of every committed entry
/// it applies. A timer left behind by a later delete of its key still
/// fires, so `on_timer` must expect a key whose state is gone.
pub type TimersFromState = fn(key: &[u8], value: &[u8]) -> Option<i64>;

/// Whether `key` is a timer the runtime keeps.
pub(crate) fn is_timer_key(key: &[u8]) -> bool {
    key.starts_with(TIMER_PREFIX)
}

/// An operator's window onto its task: state, outputs, timers, stream time.
pub struct Context<'a> {
    state: &'a mut dyn StateBackend,
    emitted: &'a mut Vec<Emitted>,
    now_ms: i64,
    processing_time_ms: i64,
    partition: i32,
    /// The earliest timer set through this context (for [`fire_due_timers`]).
    earliest_timer_set: Option<Vec<u8>>,
}

impl<'a> Context<'a> {
    pub fn new(
        state: &'a mut dyn StateBackend,
        emitted: &'a mut Vec<Emitted>,
        now_ms: i64,
        processing_time_ms: i64,
        partition: i32,
    ) -> Self {
        Context {
            state,
            emitted,
            now_ms,
            processing_time_ms,
            partition,
            earliest_timer_set: None,
        }
    }

    /// Stream time in milliseconds: the time of the last tick this task
    /// consumed (0 before the first tick). Deterministic under replay.
    pub fn now(&self) -> i64 {
        self.now_ms
    }

    /// Wall-clock time when the runtime started this batch. Only for
    /// informational fields such as `emitted_at`: never let it decide an
    /// output, or replays diverge.
    pub fn processing_time(&self) -> i64 {
        self.processing_time_ms
    }

    /// The input partition this task owns.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.state.get(key)
    }

    pub fn put(&mut self, key: &[u8], value: Vec<u8>) {
        self.state.put(key, value)
    }

    pub fn delete(&mut self, key: &[u8]) {
        self.state.delete(key)
    }

    /// Read a JSON-encoded value.
    pub fn get_json<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.state.get(key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Decode(format!("{}: {e}", String::from_utf8_lossy(key)))),
        }
    }

    /// Write a value as JSON.
    pub fn put_json<T: Serialize>(&mut self, key: &[u8], value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Decode(e.to_string()))?;
        self.state.put(key, bytes);
        Ok(())
    }

    /// Every `(key, value)` whose key starts with `prefix`, in key order,
    /// including this batch's uncommitted writes.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<crate::store::KeyValues, StoreError> {
        self.state.scan_prefix(prefix)
    }

    /// The first `(key, value)` with `start <= key < end`, including this
    /// batch's uncommitted writes: a seek, whatever follows in the range.
    pub fn first_in_range(
        &self,
        start: &[u8],
        end: &[u8],
    ) -> Result<Option<crate::store::KeyValue>, StoreError> {
        self.state.first_in_range(start, end)
    }

    /// Emit a record to the named output.
    pub fn emit(&mut self, output: &'static str, key: Option<Vec<u8>>, value: Vec<u8>) {
        self.emit_with_headers(output, key, value, Vec::new())
    }

    pub fn emit_with_headers(
        &mut self,
        output: &'static str,
        key: Option<Vec<u8>>,
        value: Vec<u8>,
        headers: Vec<(String, Vec<u8>)>,
    ) {
        self.emitted.push(Emitted {
            output,
            key,
            value,
            headers,
        });
    }

    /// How many records were emitted through this context's buffer so far.
    pub fn emitted_len(&self) -> usize {
        self.emitted.len()
    }

    /// The records emitted from index `from` on, to rewrite in place: an
    /// operator that wraps another re-encodes what the inner one emitted
    /// (the audiences stage writing Avro).
    pub fn emitted_since(&mut self, from: usize) -> &mut [Emitted] {
        let from = from.min(self.emitted.len());
        &mut self.emitted[from..]
    }

    /// Ask for [`Operator::on_timer`] with `key` once stream time reaches
    /// `at_ms`. Setting the same `(at_ms, key)` twice fires once.
    pub fn set_timer(&mut self, at_ms: i64, key: &[u8]) {
        let k = timer_key(at_ms, key);
        if self.earliest_timer_set.as_ref().is_none_or(|e| &k < e) {
            self.earliest_timer_set = Some(k.clone());
        }
        self.state.put(&k, Vec::new());
    }

    /// The smallest timer key set through this context, taken once (the
    /// runtime lowers its timer floor with it, see [`fire_due_timers_from`]).
    pub(crate) fn take_earliest_timer_set(&mut self) -> Option<Vec<u8>> {
        self.earliest_timer_set.take()
    }

    /// Cancel a timer set with the same `(at_ms, key)`.
    pub fn cancel_timer(&mut self, at_ms: i64, key: &[u8]) {
        self.state.delete(&timer_key(at_ms, key));
    }
}

/// `prefix | at (big endian, sign-flipped so order is numeric) | key`.
pub(crate) fn timer_key(at_ms: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(TIMER_PREFIX.len() + 8 + key.len());
    k.extend_from_slice(TIMER_PREFIX);
    k.extend_from_slice(&((at_ms as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// Inverse of [`timer_key`].
pub(crate) fn parse_timer_key(k: &[u8]) -> Option<(i64, Vec<u8>)> {
    let rest = k.strip_prefix(TIMER_PREFIX)?;
    if rest.len() < 8 {
        return None;
    }
    let mut at = [0u8; 8];
    at.copy_from_slice(&rest[..8]);
    Some((
        (u64::from_be_bytes(at) ^ (1 << 63)) as i64,
        rest[8..].to_vec(),
    ))
}

/// Runs operators without a broker: an in-memory state and a clock you move
/// by hand. For unit tests, property tests and benchmarks of operators.
pub struct OperatorHarness<O: Operator> {
    pub operator: O,
    pub state: crate::store::MemoryState,
    pub now_ms: i64,
    pub partition: i32,
    offset: i64,
    /// Records and ticks per batch ([`Operator::end_batch`] after each
    /// `batch`-th); 1 unless set with [`OperatorHarness::with_batches`].
    batch: usize,
    /// Records and ticks of the open batch.
    in_batch: usize,
}

impl<O: Operator> OperatorHarness<O> {
    pub fn new(operator: O) -> Self {
        OperatorHarness {
            operator,
            state: crate::store::MemoryState::default(),
            now_ms: 0,
            partition: 0,
            offset: 0,
            batch: 1,
            in_batch: 0,
        }
    }

    /// Batches of `records` records and ticks (at least 1), as the runtime
    /// hands a task several at a time: the operator's state is complete
    /// in [`state`](Self::state) only after [`end_batch`](Self::end_batch).
    pub fn with_batches(mut self, records: usize) -> Self {
        self.batch = records.max(1);
        self
    }

    /// End the open batch now ([`Operator::end_batch`]).
    pub fn end_batch(&mut self) -> Result<(), OperatorError> {
        self.in_batch = 0;
        let mut out = Vec::new();
        let mut ctx = harness_context(&mut self.state, &mut out, self.now_ms, self.partition);
        self.operator.end_batch(&mut ctx)?;
        Ok(())
    }

    /// Count one record or tick; end the batch when it is full.
    fn counted(&mut self) -> Result<(), OperatorError> {
        self.in_batch += 1;
        if self.in_batch >= self.batch {
            self.end_batch()?;
        }
        Ok(())
    }

    /// Feed one record; returns what the operator emitted.
    pub fn process(
        &mut self,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(String, Vec<u8>)],
    ) -> Result<Vec<Emitted>, OperatorError> {
        self.process_at(key, value, headers, None)
    }

    /// [`process`](Self::process) a record whose broker timestamp is
    /// `timestamp_ms`.
    pub fn process_at(
        &mut self,
        key: Option<&[u8]>,
        value: &[u8],
        headers: &[(String, Vec<u8>)],
        timestamp_ms: Option<i64>,
    ) -> Result<Vec<Emitted>, OperatorError> {
        let mut out = Vec::new();
        let headers: Vec<HeaderRef<'_>> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let record = Record {
            key,
            value,
            partition: self.partition,
            offset: self.offset,
            timestamp_ms,
            headers: &headers,
        };
        self.offset += 1;
        let mut ctx = harness_context(&mut self.state, &mut out, self.now_ms, self.partition);
        let processed = self.operator.process(&record, &mut ctx);
        // A refused record still counts toward its batch, as in the runtime.
        self.counted()?;
        processed?;
        Ok(out)
    }

    /// Move stream time to `now_ms`, fire due timers and call
    /// [`Operator::on_tick`], as a tick does.
    pub fn tick(&mut self, now_ms: i64) -> Result<Vec<Emitted>, OperatorError> {
        self.now_ms = self.now_ms.max(now_ms);
        let mut out = Vec::new();
        run_tick(
            &mut self.operator,
            &mut self.state,
            &mut out,
            self.now_ms,
            self.now_ms,
            self.partition,
            &mut TIMER_PREFIX.to_vec(),
        )?;
        self.counted()?;
        Ok(out)
    }
}

/// The context a harness hands its operator: stream and processing time
/// are both `now_ms`.
fn harness_context<'c>(
    state: &'c mut crate::store::MemoryState,
    out: &'c mut Vec<Emitted>,
    now_ms: i64,
    partition: i32,
) -> Context<'c> {
    Context::new(state, out, now_ms, now_ms, partition)
}

/// Fire every timer due at `now_ms`, in time order. Timers that a firing
/// timer sets at or before `now_ms` fire in the same call.
///
/// Lazy: it seeks to the next timer in key (= time) order and stops at the
/// first one after `now_ms`, so a tick costs the timers it fires, not the
/// timers the task holds (`validate` keeps one per `messageId` for a day).
pub fn fire_due_timers<O: Operator + ?Sized>(
    operator: &mut O,
    state: &mut dyn StateBackend,
    out: &mut Vec<Emitted>,
    now_ms: i64,
    processing_time_ms: i64,
    partition: i32,
) -> Result<(), OperatorError> {
    let mut floor = TIMER_PREFIX.to_vec();
    fire_due_timers_from(
        operator,
        state,
        out,
        now_ms,
        processing_time_ms,
        partition,
        &mut floor,
    )
}

/// [`fire_due_timers`], starting the walk at `floor` — a key below which
/// every timer has fired — and leaving `floor` at the last timer fired. The
/// runtime keeps a floor per task (lowered when an operator sets an earlier
/// timer), so a tick's seek starts past the deletes earlier ticks left
/// behind instead of stepping over them until RocksDB compacts them.
pub fn fire_due_timers_from<O: Operator + ?Sized>(
    operator: &mut O,
    state: &mut dyn StateBackend,
    out: &mut Vec<Emitted>,
    now_ms: i64,
    processing_time_ms: i64,
    partition: i32,
    floor: &mut Vec<u8>,
) -> Result<(), OperatorError> {
    // Every due timer key sorts below `end`: `prefix | now + 1`.
    let end = match now_ms.checked_add(1) {
        Some(after) => timer_key(after, b""),
        // Past the whole timer range: the prefix with its last byte
        // (`/`) incremented.
        None => {
            let mut all = TIMER_PREFIX.to_vec();
            if let Some(last) = all.last_mut() {
                *last += 1;
            }
            all
        }
    };
    let mut from = if floor.as_slice() > TIMER_PREFIX {
        floor.clone()
    } else {
        TIMER_PREFIX.to_vec()
    };
    while let Some((raw, _)) = state.first_in_range(&from, &end)? {
        let Some((_, key)) = parse_timer_key(&raw) else {
            // Not a timer of ours: step over it.
            from = raw;
            from.push(0);
            continue;
        };
        state.delete(&raw);
        let mut ctx = Context::new(state, out, now_ms, processing_time_ms, partition);
        operator.on_timer(&key, &mut ctx)?;
        let earliest_set = ctx.earliest_timer_set.take();
        // Keys before this one are fired; go on after it — unless the
        // timer just set one before it, which fires in this call too.
        from = match earliest_set {
            Some(set) if set < raw => set,
            _ => raw,
        };
        floor.clone_from(&from);
    }
    Ok(())
}

/// A tick moved stream time to `now_ms`: fire the timers due
/// ([`fire_due_timers_from`], from `floor`), then [`Operator::on_tick`].
/// A timer `on_tick` sets below `floor` lowers it.
pub fn run_tick<O: Operator + ?Sized>(
    operator: &mut O,
    state: &mut dyn StateBackend,
    out: &mut Vec<Emitted>,
    now_ms: i64,
    processing_time_ms: i64,
    partition: i32,
    floor: &mut Vec<u8>,
) -> Result<(), OperatorError> {
    fire_due_timers_from(
        operator,
        state,
        out,
        now_ms,
        processing_time_ms,
        partition,
        floor,
    )?;
    let mut ctx = Context::new(state, out, now_ms, processing_time_ms, partition);
    operator.on_tick(&mut ctx)?;
    if let Some(set) = ctx.earliest_timer_set.take() {
        if set < *floor {
            *floor = set;
        }
    }
    Ok(())
}

/// Helper for operators that keep small maps: sorted, deterministic order.
pub type SortedMap<V> = BTreeMap<String, V>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_keys_order_numerically_including_negative_times() {
        let mut keys = [
            timer_key(5, b"a"),
            timer_key(-3, b"b"),
            timer_key(1_000_000, b"c"),
        ];
        keys.sort();
        let parsed: Vec<i64> = keys
            .iter()
            .map(|k| parse_timer_key(k).map(|p| p.0).unwrap_or(0))
            .collect();
        assert_eq!(parsed, vec![-3, 5, 1_000_000]);
        assert_eq!(
            parse_timer_key(&timer_key(42, b"xy")),
            Some((42, b"xy".to_vec()))
        );
    }

    struct Echo;
    impl Operator for Echo {
        fn process(&mut self, r: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
            ctx.set_timer(ctx.now() + 10, r.value);
            Ok(())
        }
        fn on_timer(&mut self, key: &[u8], ctx: &mut Context<'_>) -> Result<(), OperatorError> {
            ctx.emit("out", None, key.to_vec());
            Ok(())
        }
    }

    /// A state that counts the entries its reads hand out.
    #[derive(Default)]
    struct Counting {
        inner: crate::store::MemoryState,
        read: std::cell::Cell<usize>,
    }

    impl StateBackend for Counting {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.read.set(self.read.get() + 1);
            self.inner.get(key)
        }
        fn put(&mut self, key: &[u8], value: Vec<u8>) {
            self.inner.put(key, value)
        }
        fn delete(&mut self, key: &[u8]) {
            self.inner.delete(key)
        }
        fn scan_prefix(&self, prefix: &[u8]) -> Result<crate::store::KeyValues, StoreError> {
            let all = self.inner.scan_prefix(prefix)?;
            self.read.set(self.read.get() + all.len());
            Ok(all)
        }
        fn first_in_range(
            &self,
            start: &[u8],
            end: &[u8],
        ) -> Result<Option<crate::store::KeyValue>, StoreError> {
            self.read.set(self.read.get() + 1);
            self.inner.first_in_range(start, end)
        }
    }

    /// Fires `key`; the timer `again` re-arms itself at the same time once,
    /// and `early` sets a timer before itself: both fire in the same tick.
    struct Rearm;
    impl Operator for Rearm {
        fn process(&mut self, _: &Record<'_>, _: &mut Context<'_>) -> Result<(), OperatorError> {
            Ok(())
        }
        fn on_timer(&mut self, key: &[u8], ctx: &mut Context<'_>) -> Result<(), OperatorError> {
            ctx.emit("out", None, key.to_vec());
            if key == b"early" {
                ctx.set_timer(1, b"earlier");
            }
            Ok(())
        }
    }

    #[test]
    fn a_tick_reads_the_timers_it_fires_not_the_timers_it_holds() -> Result<(), OperatorError> {
        let mut state = Counting::default();
        for i in 0..10_000u32 {
            state.put(
                &timer_key(1_000_000 + i64::from(i), &i.to_be_bytes()),
                Vec::new(),
            );
        }
        state.put(&timer_key(5, b"a"), Vec::new());
        state.put(&timer_key(7, b"early"), Vec::new());
        state.put(&timer_key(9, b"b"), Vec::new());
        let mut out = Vec::new();
        fire_due_timers(&mut Rearm, &mut state, &mut out, 100, 100, 0)?;
        assert!(
            state.read.get() < 20,
            "a tick firing 4 timers read {} entries",
            state.read.get()
        );
        assert_eq!(
            state.inner.map.len(),
            10_000,
            "only the due timers are gone"
        );
        // In time order, the one set by a firing timer included.
        let fired: Vec<&[u8]> = out.iter().map(|e| e.value.as_slice()).collect();
        assert_eq!(fired, vec![&b"a"[..], b"early", b"earlier", b"b"]);
        Ok(())
    }

    #[test]
    fn timers_fire_once_when_stream_time_reaches_them() {
        let mut h = OperatorHarness::new(Echo);
        assert!(h
            .process(None, b"x", &[])
            .map(|o| o.is_empty())
            .unwrap_or(false));
        assert_eq!(h.tick(9).map(|o| o.len()).ok(), Some(0));
        let fired = h.tick(10).ok().unwrap_or_default();
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].value, b"x".to_vec());
        assert_eq!(h.tick(100).map(|o| o.len()).ok(), Some(0));
    }
}
