//! What the operator benchmarks share: a task's RocksDB store driven the
//! way the runtime drives it (records through the operator, one committed
//! write batch per batch), a deterministic pseudo-random mix, the state's
//! size on disk, and the process's CPU time.
//!
//! Inputs are generated before they are timed (the load's all at once,
//! the measurement's ahead of the timed loop), so the figures are the
//! operator's and the store's, not the bench's own JSON building.

// Each bench uses a different subset of these helpers.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use cdp_pipeline::store::{TaskMeta, TaskStore};
use cdp_pipeline::{Context, Operator, Record};

/// A task: one operator, its RocksDB store and its committed progress.
pub struct Task<O> {
    pub store: TaskStore,
    pub operator: O,
    pub meta: TaskMeta,
    /// Stream time (ms) the next batch runs at.
    pub now_ms: i64,
    dir: tempfile::TempDir,
}

impl<O: Operator> Task<O> {
    pub fn new(operator: O) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let store = TaskStore::open(dir.path()).unwrap_or_else(|e| panic!("open: {e}"));
        Task {
            store,
            operator,
            meta: TaskMeta::default(),
            now_ms: 0,
            dir,
        }
    }

    /// Run `values` as one batch and commit it; returns the records emitted.
    pub fn batch(&mut self, values: &[Vec<u8>]) -> usize {
        let mut out = Vec::new();
        for (i, value) in values.iter().enumerate() {
            let record = Record {
                key: None,
                value,
                partition: 0,
                offset: self.meta.input_offset + i as i64,
                timestamp_ms: None,
                headers: &[],
            };
            let mut ctx = Context::new(&mut self.store, &mut out, self.now_ms, self.now_ms, 0);
            if let Err(e) = self.operator.process(&record, &mut ctx) {
                panic!("the operator refused a benchmark record: {e}");
            }
        }
        let mut none = Vec::new();
        let mut ctx = Context::new(&mut self.store, &mut none, self.now_ms, self.now_ms, 0);
        if let Err(e) = self.operator.end_batch(&mut ctx) {
            panic!("end of batch: {e}");
        }
        self.meta.input_offset += values.len() as i64;
        // As the runtime commits a processed batch (its values kept for
        // the next reads).
        let changes = self.store.take_changes();
        if let Err(e) = self.store.commit_batch(changes, &self.meta) {
            panic!("commit: {e}");
        }
        out.len()
    }

    /// Flush the memtable and return the bytes of every SST file: what the
    /// state takes on disk, compressed as RocksDB keeps it, overwritten
    /// versions that compactions have not reached yet included.
    pub fn bytes_on_disk(&self) -> u64 {
        if let Err(e) = self.store.flush() {
            panic!("flush: {e}");
        }
        self.sst_bytes()
    }

    /// Compact the whole store, then [`bytes_on_disk`](Self::bytes_on_disk):
    /// the state alone, without versions waiting for a compaction (how
    /// many wait depends on timing, so only this figure compares runs).
    pub fn compacted_bytes_on_disk(&self) -> u64 {
        if let Err(e) = self.store.compact() {
            panic!("compact: {e}");
        }
        self.sst_bytes()
    }

    fn sst_bytes(&self) -> u64 {
        std::fs::read_dir(self.dir.path())
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "sst"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// Profiles a profile-keyed bench loads: [`PROFILES`], or
/// `CDP_BENCH_PROFILES` (a multiple of 1 000). A smaller store lets
/// `scripts/instructions.sh` count the operator's instructions per record
/// under valgrind, which is exact where this box's timings spread ±10%.
pub fn profiles() -> usize {
    static PROFILES_SET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PROFILES_SET.get_or_init(|| {
        std::env::var("CDP_BENCH_PROFILES")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(PROFILES, |p| (p / 1000).max(1) * 1000)
    })
}

/// Batches of the fixed run after the load: 100, or one per 2 000
/// profiles (at least one) when [`profiles`] was made smaller.
pub fn fixed_rounds() -> usize {
    (profiles() / 2_000).clamp(1, 100)
}

/// Profiles a profile-keyed bench loads unless told otherwise.
pub const PROFILES: usize = 1_000_000;

/// A deterministic pseudo-random sequence (no `rand` dependency needed).
pub fn mix(n: usize) -> usize {
    let mut x = n as u64 ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x as usize
}

/// JSON-encode records (benchmark inputs are always encodable).
pub fn encode<T: serde::Serialize>(records: &[T]) -> Vec<Vec<u8>> {
    records
        .iter()
        .map(|r| serde_json::to_vec(r).unwrap_or_default())
        .collect()
}

/// Records each encoded by `encode`: the profile stages' inputs as the
/// stage before writes them (`ProfileRecord::to_bytes`,
/// `ProfileUpdate::to_bytes`: binary, `cdp_operators::messages::wire`).
pub fn encode_with<T, E>(records: &[T], encode: impl Fn(&T) -> Result<Vec<u8>, E>) -> Vec<Vec<u8>> {
    records
        .iter()
        .map(|r| encode(r).unwrap_or_default())
        .collect()
}

/// CPU time of the whole process so far (every thread: the bench's and
/// RocksDB's background flushes and compactions), from `/proc/self/stat`
/// (clock ticks, 10 ms). Zero where that file does not exist.
pub fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 (indices 11 and 12 here).
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Wall and CPU time of `f`, printed as `what`: records per CPU second is
/// the robust figure on a shared box.
pub fn report_cpu<T>(what: &str, records: usize, f: impl FnOnce() -> T) -> T {
    let (wall, cpu) = (Instant::now(), process_cpu());
    let out = f();
    let (wall, cpu) = (wall.elapsed(), process_cpu().saturating_sub(cpu));
    eprintln!(
        "{what}: {records} records, wall {:.2} s, cpu {:.2} s = {:.0} records per cpu second",
        wall.as_secs_f64(),
        cpu.as_secs_f64(),
        records as f64 / cpu.as_secs_f64().max(1e-9)
    );
    out
}

impl<O: Operator> Task<O> {
    /// Run pre-built `(stream time, batch)` pairs in order.
    pub fn run_all(&mut self, batches: &[(i64, Vec<Vec<u8>>)]) -> usize {
        let mut emitted = 0;
        for (now, values) in batches {
            self.now_ms = *now;
            emitted += self.batch(values);
        }
        emitted
    }
}

/// Criterion's timed loop over numbered batches: each iteration runs the
/// next round's batch, built by `make` before the clock starts (all of an
/// iteration count's batches at once, outside the timed part).
pub fn time_rounds<O: Operator>(
    task: &mut Task<O>,
    round: &mut usize,
    iters: u64,
    make: impl Fn(usize) -> (i64, Vec<Vec<u8>>),
) -> Duration {
    let mut elapsed = Duration::ZERO;
    // At most 64 batches built ahead at once, so memory stays bounded.
    let mut left = iters as usize;
    while left > 0 {
        let n = left.min(64);
        let batches: Vec<_> = (0..n).map(|i| make(*round + 1 + i)).collect();
        *round += n;
        left -= n;
        let start = Instant::now();
        std::hint::black_box(task.run_all(&batches));
        elapsed += start.elapsed();
    }
    elapsed
}
