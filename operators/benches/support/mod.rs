//! What the operator benchmarks share: a task's RocksDB store driven the
//! way the runtime drives it (records through the operator, one committed
//! write batch per batch), a deterministic pseudo-random mix, and the
//! state's size on disk.

// Each bench uses a different subset of these helpers.
#![allow(dead_code)]

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
        self.meta.input_offset += values.len() as i64;
        let changes = self.store.take_changes();
        if let Err(e) = self.store.commit(&changes, &self.meta) {
            panic!("commit: {e}");
        }
        out.len()
    }

    /// Flush the memtable and return the bytes of every SST file: what the
    /// state takes on disk, compressed as RocksDB keeps it.
    pub fn bytes_on_disk(&self) -> u64 {
        if let Err(e) = self.store.flush() {
            panic!("flush: {e}");
        }
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
