//! Task state: a RocksDB database per task, written only in whole batches.
//!
//! An operator's writes land in an in-memory overlay; the runtime turns the
//! overlay into changelog records and, once every output and the changelog
//! marker are acknowledged, into one RocksDB write batch together with the
//! task's [`TaskMeta`] (input offset, dedupe positions, epoch, stream time).
//! So local state, progress and dedupe positions always move together.
//! RocksDB's WAL is not fsynced: a process crash keeps it, a machine crash
//! may lose the tail, and the changelog then restores it.
//!
//! Memory: every task's database of a process shares one block cache and
//! one memtable budget ([`shared_memory`]), so a stage's RocksDB memory is
//! bounded by those two numbers whatever the number of tasks it owns, plus
//! the tables' index and filter blocks (~1.3 bytes per key). Tables carry Bloom filters: most lookups of the
//! stateful stages are for keys that do not exist yet (a new `messageId` in
//! validate's dedupe, a new anonymous id in identity), and a filter answers
//! those without reading a data block.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::envelope::Position;

mod overlay;
mod recent;

pub use overlay::Changes;
use overlay::Overlay;
use recent::{RecentValues, RECENT_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    RocksDb {
        path: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("state value could not be decoded: {0}")]
    Decode(String),
}

/// `(key, value)` pairs in key order, as a prefix scan returns them.
pub type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;

/// Where an operator's reads and writes go.
pub trait StateBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn put(&mut self, key: &[u8], value: Vec<u8>);
    fn delete(&mut self, key: &[u8]);
    /// Every live `(key, value)` under `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<KeyValues, StoreError>;
    /// The first live `(key, value)` with `start <= key < end`: a seek, so
    /// its cost does not grow with the keys after it.
    fn first_in_range(&self, start: &[u8], end: &[u8]) -> Result<Option<KeyValue>, StoreError>;
}

/// One `(key, value)`.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// An in-memory state for tests and benchmarks of operators.
#[derive(Debug, Default, Clone)]
pub struct MemoryState {
    pub map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl StateBackend for MemoryState {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.get(key).cloned())
    }
    fn put(&mut self, key: &[u8], value: Vec<u8>) {
        self.map.insert(key.to_vec(), value);
    }
    fn delete(&mut self, key: &[u8]) {
        self.map.remove(key);
    }
    fn scan_prefix(&self, prefix: &[u8]) -> Result<KeyValues, StoreError> {
        Ok(self
            .map
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
    fn first_in_range(&self, start: &[u8], end: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        if start >= end {
            return Ok(None);
        }
        Ok(self
            .map
            .range::<[u8], _>((
                std::ops::Bound::Included(start),
                std::ops::Bound::Excluded(end),
            ))
            .next()
            .map(|(k, v)| (k.clone(), v.clone())))
    }
}

/// A task's progress, committed atomically with its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMeta {
    /// The next input offset to consume.
    pub input_offset: i64,
    /// Offset of the last changelog marker this state includes (-1: none).
    pub changelog_offset: i64,
    /// The epoch under which this task last owned its partition.
    pub epoch: u32,
    /// Stream time (ms) from the last tick consumed.
    pub stream_time: i64,
    /// Epoch of the last tick believed (see [`crate::trust`]): ticks of an
    /// older owner written after it are ignored.
    #[serde(default)]
    pub tick_epoch: u32,
    /// Highest position applied per origin (`stage:partition`).
    pub dedupe: BTreeMap<String, Position>,
    /// The incarnation of this task's changelog (random, chosen by the
    /// first claim of an empty changelog, inherited by every later claim).
    /// Outputs carry it so consumers can tell a reset from a replay.
    #[serde(default)]
    pub lineage: u64,
}

impl Default for TaskMeta {
    fn default() -> Self {
        TaskMeta {
            input_offset: -1,
            changelog_offset: -1,
            epoch: 0,
            stream_time: 0,
            tick_epoch: 0,
            dedupe: BTreeMap::new(),
            lineage: 0,
        }
    }
}

const META_KEY: &[u8] = b"\x00cdp/meta";
/// Wall-clock time (ms, big-endian) of the last commit: how old the copy is.
const SAVED_AT_KEY: &[u8] = b"\x00cdp/saved_at";

/// RocksDB-backed state of one task.
pub struct TaskStore {
    db: rocksdb::DB,
    path: PathBuf,
    /// This batch's writes (see [`overlay`]).
    overlay: Overlay,
    /// Default read options, made once: the crate's `get` builds and frees
    /// a set per call (~2.5% of a lookup).
    read: rocksdb::ReadOptions,
    /// Committed values read or written lately (see [`recent`]).
    recent: RecentValues,
}

/// Block cache shared by every task of a process (data, index and filter
/// blocks).
const BLOCK_CACHE_BYTES: usize = 64 << 20;
/// Memtables of every task of a process together; past it RocksDB flushes
/// the largest. Without it each database may hold 2 × 64 MiB.
const MEMTABLE_BUDGET_BYTES: usize = 64 << 20;
/// One task's memtable before it is flushed.
const MEMTABLE_BYTES: usize = 16 << 20;
/// A write batch's bytes per record besides its key and value (type tag
/// and two length varints), rounded up.
const WRITE_BATCH_RECORD_OVERHEAD: usize = 12;
/// A write batch's header plus the task meta and commit time written with
/// every batch, rounded up.
const WRITE_BATCH_META_BYTES: usize = 512;
/// The memtable's Bloom filter, as a fraction of its size.
const MEMTABLE_BLOOM_RATIO: f64 = 0.05;
/// Bloom filter bits per key: ~1% false positives.
const BLOOM_BITS_PER_KEY: f64 = 10.0;

/// The process-wide block cache and memtable budget.
fn shared_memory() -> &'static (rocksdb::Cache, rocksdb::WriteBufferManager) {
    static SHARED: OnceLock<(rocksdb::Cache, rocksdb::WriteBufferManager)> = OnceLock::new();
    SHARED.get_or_init(|| {
        (
            rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES),
            rocksdb::WriteBufferManager::new_write_buffer_manager(MEMTABLE_BUDGET_BYTES, false),
        )
    })
}

fn db_options() -> rocksdb::Options {
    let (cache, memtables) = shared_memory();
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(BLOOM_BITS_PER_KEY, false);
    // Index and filter blocks stay in the table readers, outside the
    // cache: every lookup consults them, and in a 64 MiB cache shared
    // with data blocks they were evicted and re-read on most lookups — the
    // traits and audiences benches (1M profiles) ran 5–13× slower with
    // them cached. They take ~1.3 bytes per key (10-bit filters plus the
    // index), which the state-size figures in OPERATIONS.md include.
    let mut opts = rocksdb::Options::default();
    opts.set_block_based_table_factory(&table);
    opts.set_write_buffer_manager(memtables);
    opts.set_write_buffer_size(MEMTABLE_BYTES);
    // A Bloom filter over the memtable's whole keys (5% of its size,
    // 0.8 MiB a task): a lookup of a key that is only in the tables skips
    // the skip list (identity −7% instructions per event; a data block
    // hash index was counted too and saved under 0.5%).
    opts.set_memtable_prefix_bloom_ratio(MEMTABLE_BLOOM_RATIO);
    opts.set_memtable_whole_key_filtering(true);
    opts
}

impl TaskStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut opts = db_options();
        opts.create_if_missing(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let db = rocksdb::DB::open(&opts, path).map_err(|source| StoreError::RocksDb {
            path: path.display().to_string(),
            source,
        })?;
        Ok(TaskStore {
            db,
            path: path.to_path_buf(),
            overlay: Overlay::default(),
            read: rocksdb::ReadOptions::default(),
            recent: RecentValues::new(RECENT_BYTES),
        })
    }

    fn err(&self, source: rocksdb::Error) -> StoreError {
        StoreError::RocksDb {
            path: self.path.display().to_string(),
            source,
        }
    }

    pub fn meta(&self) -> Result<TaskMeta, StoreError> {
        match self.db.get(META_KEY).map_err(|e| self.err(e))? {
            None => Ok(TaskMeta::default()),
            Some(b) => serde_json::from_slice(&b)
                .map_err(|e| StoreError::Decode(format!("task meta: {e}"))),
        }
    }

    /// When this copy was last committed (wall clock, ms); `None` for a
    /// copy written before this was recorded.
    pub fn saved_at_ms(&self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .db
            .get(SAVED_AT_KEY)
            .map_err(|e| self.err(e))?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(i64::from_be_bytes))
    }

    /// Take this batch's writes (for the changelog), leaving the overlay
    /// empty. Pass them back to [`TaskStore::commit_batch`].
    pub fn take_changes(&mut self) -> Changes {
        self.overlay.take()
    }

    /// Drop this batch's writes.
    pub fn abort(&mut self) {
        self.overlay.clear();
    }

    /// Write `changes` and `meta` in one atomic RocksDB batch (a restore's,
    /// a claim's: their values are not kept for reads).
    pub fn commit(&mut self, changes: &Changes, meta: &TaskMeta) -> Result<(), StoreError> {
        self.write(changes, meta)?;
        self.recent.forget(changes);
        Ok(())
    }

    /// [`TaskStore::commit`] for a batch the stage processed: the values it
    /// wrote are kept for the next reads of their keys (see [`recent`]).
    pub fn commit_batch(&mut self, changes: Changes, meta: &TaskMeta) -> Result<(), StoreError> {
        self.write(&changes, meta)?;
        self.recent.written(changes);
        Ok(())
    }

    fn write(&self, changes: &Changes, meta: &TaskMeta) -> Result<(), StoreError> {
        // Sized once: grown a put at a time, the batch's buffer was copied
        // over and over (a few % of the validate stage's thread).
        let bytes: usize = changes
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + WRITE_BATCH_RECORD_OVERHEAD)
            .sum();
        let mut batch = rocksdb::WriteBatch::with_capacity_bytes(bytes + WRITE_BATCH_META_BYTES);
        // In key order: the memtable's skip list inserts a run of sorted
        // keys from where the last one went; in the overlay's hash order
        // each insert searched from the top (4× the instructions in the
        // validate stage, docs/performance.md).
        let mut sorted: Vec<(&Vec<u8>, &Option<Vec<u8>>)> = changes.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (k, v) in sorted {
            match v {
                Some(v) => batch.put(k, v),
                None => batch.delete(k),
            }
        }
        let meta = serde_json::to_vec(meta).map_err(|e| StoreError::Decode(e.to_string()))?;
        batch.put(META_KEY, meta);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        batch.put(SAVED_AT_KEY, now.to_be_bytes());
        let mut opts = rocksdb::WriteOptions::default();
        // No fsync: the changelog is the durable copy (see module docs).
        opts.set_sync(false);
        self.db.write_opt(batch, &opts).map_err(|e| self.err(e))
    }

    /// Write the memtables to disk (for measuring size on disk).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| self.err(e))
    }

    /// Flush, then compact every level into one sorted run: what the state
    /// takes once no overwritten version is left (the benches' state-size
    /// figure; RocksDB does the same in the background, later).
    pub fn compact(&self) -> Result<(), StoreError> {
        self.flush()?;
        self.db.compact_range(None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }

    /// Approximate live data size, for the state-store size gauge.
    pub fn approximate_size(&self) -> u64 {
        self.db
            .property_int_value("rocksdb.estimate-live-data-size")
            .ok()
            .flatten()
            .unwrap_or(0)
    }
}

impl StateBackend for TaskStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.recent.get(key) {
            return Ok(Some(v));
        }
        match self.db.get_pinned_opt(key, &self.read) {
            Ok(Some(value)) => {
                self.recent.read(key, &value);
                Ok(Some(value.to_vec()))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    fn put(&mut self, key: &[u8], value: Vec<u8>) {
        self.overlay.insert(key, Some(value));
    }

    fn delete(&mut self, key: &[u8]) {
        self.overlay.insert(key, None);
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<KeyValues, StoreError> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let iter = self.db.iterator(rocksdb::IteratorMode::From(
            prefix,
            rocksdb::Direction::Forward,
        ));
        for item in iter {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !k.starts_with(prefix) {
                break;
            }
            if k.as_ref() == META_KEY || k.as_ref() == SAVED_AT_KEY {
                continue;
            }
            merged.insert(k.to_vec(), v.to_vec());
        }
        for (k, v) in self.overlay.prefix(prefix) {
            match v {
                Some(v) => merged.insert(k.to_vec(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().collect())
    }

    fn first_in_range(&self, start: &[u8], end: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        if start >= end {
            return Ok(None);
        }
        // The first live write of this batch in range...
        let pending = self
            .overlay
            .first_live(start, end)
            .map(|(k, v)| (k.to_vec(), v.to_vec()));
        // ...and the first committed key in range this batch did not touch
        // (a key it rewrote is `pending`'s to report, one it deleted is gone).
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_upper_bound(end.to_vec());
        let iter = self.db.iterator_opt(
            rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward),
            opts,
        );
        let mut committed = None;
        for item in iter {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if pending
                .as_ref()
                .is_some_and(|(p, _)| p.as_slice() <= k.as_ref())
            {
                break;
            }
            if k.as_ref() == META_KEY || self.overlay.contains_key(k.as_ref()) {
                continue;
            }
            committed = Some((k.to_vec(), v.to_vec()));
            break;
        }
        Ok(match (pending, committed) {
            (Some(p), Some(c)) => Some(if c.0 < p.0 { c } else { p }),
            (p, c) => p.or(c),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_is_invisible_to_disk_until_commit_and_scan_merges_both() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Decode(e.to_string()))?;
        let mut store = TaskStore::open(dir.path())?;
        store.put(b"p/a", b"1".to_vec());
        store.put(b"p/b", b"2".to_vec());
        let changes = store.take_changes();
        let meta = TaskMeta {
            input_offset: 7,
            ..TaskMeta::default()
        };
        store.commit(&changes, &meta)?;
        store.put(b"p/c", b"3".to_vec());
        store.delete(b"p/a");
        let keys: Vec<Vec<u8>> = store
            .scan_prefix(b"p/")?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec![b"p/b".to_vec(), b"p/c".to_vec()]);
        assert_eq!(
            store.first_in_range(b"p/", b"p/z")?,
            Some((b"p/b".to_vec(), b"2".to_vec())),
            "a key deleted in the overlay is skipped"
        );
        assert_eq!(
            store.first_in_range(b"p/bb", b"p/z")?,
            Some((b"p/c".to_vec(), b"3".to_vec())),
            "an overlay write comes before a later committed key"
        );
        assert_eq!(store.first_in_range(b"p/d", b"p/z")?, None);
        assert_eq!(
            store.first_in_range(b"p/a", b"p/b")?,
            None,
            "end is exclusive"
        );
        store.abort();
        drop(store);
        let store = TaskStore::open(dir.path())?;
        assert_eq!(store.get(b"p/a")?, Some(b"1".to_vec()));
        assert_eq!(store.get(b"p/c")?, None);
        assert_eq!(store.meta()?.input_offset, 7);
        Ok(())
    }

    /// What a sequence of batches can do to a task's store.
    #[derive(Debug, Clone)]
    enum Op {
        Put(usize, Vec<u8>),
        Delete(usize),
        /// Nothing but the reads every step ends with.
        Get,
        /// The runtime's commit of the batch's writes.
        CommitBatch,
        /// A restore's or claim's commit of writes that never were in the
        /// overlay.
        CommitRestore(Vec<(usize, Option<Vec<u8>>)>),
        Abort,
    }

    /// A few keys, one of them a timer, so reads meet earlier writes.
    fn key(i: usize) -> Vec<u8> {
        let keys: [&[u8]; 5] = [
            b"profile/a",
            b"profile/b",
            b"id/x",
            b"id/y",
            b"\x00cdp/timer/1",
        ];
        keys[i % keys.len()].to_vec()
    }

    /// The model's commit: `changes` applied to the committed values.
    fn apply(
        committed: &mut BTreeMap<Vec<u8>, Vec<u8>>,
        changes: impl IntoIterator<Item = (Vec<u8>, Option<Vec<u8>>)>,
    ) {
        for (k, v) in changes {
            match v {
                Some(v) => committed.insert(k, v),
                None => committed.remove(&k),
            };
        }
    }

    fn arb_op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let value = prop::collection::vec(any::<u8>(), 0..120);
        prop_oneof![
            3 => (0..5usize, value.clone()).prop_map(|(k, v)| Op::Put(k, v)),
            1 => (0..5usize).prop_map(Op::Delete),
            4 => Just(Op::Get),
            2 => Just(Op::CommitBatch),
            1 => prop::collection::vec((0..5usize, prop::option::of(value)), 0..4)
                .prop_map(Op::CommitRestore),
            1 => Just(Op::Abort),
        ]
    }

    proptest::proptest! {
        /// Every read, at every step, answers what a plain model of the
        /// committed values and the batch's writes answers, whatever the
        /// recent values' budget (small here, so it starts over often);
        /// and the database reopened without them holds the model's
        /// committed values.
        #[test]
        fn reads_through_recent_values_equal_the_committed_state(
            ops in proptest::collection::vec(arb_op(), 1..60),
            budget in 0usize..400,
        ) {
            let dir = tempfile::tempdir().map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let mut store = TaskStore::open(dir.path())?;
            store.recent = RecentValues::new(budget);
            let mut committed: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let mut pending: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
            let meta = TaskMeta::default();
            for op in ops {
                match op {
                    Op::Put(k, v) => {
                        store.put(&key(k), v.clone());
                        pending.insert(key(k), Some(v));
                    }
                    Op::Delete(k) => {
                        store.delete(&key(k));
                        pending.insert(key(k), None);
                    }
                    Op::Get => {}
                    Op::CommitBatch => {
                        let changes = store.take_changes();
                        store.commit_batch(changes, &meta)?;
                        apply(&mut committed, std::mem::take(&mut pending));
                    }
                    Op::CommitRestore(writes) => {
                        let changes: Changes = writes.into_iter().map(|(k, v)| (key(k), v)).collect();
                        store.commit(&changes, &meta)?;
                        apply(&mut committed, changes);
                    }
                    Op::Abort => {
                        store.abort();
                        pending.clear();
                    }
                }
                for k in 0..5 {
                    let expected = match pending.get(&key(k)) {
                        Some(v) => v.clone(),
                        None => committed.get(&key(k)).cloned(),
                    };
                    proptest::prop_assert_eq!(store.get(&key(k))?, expected, "key {}", k);
                }
                proptest::prop_assert!(store.recent.bytes() <= budget);
            }
            drop(store);
            let store = TaskStore::open(dir.path())?;
            for k in 0..5 {
                proptest::prop_assert_eq!(store.get(&key(k))?, committed.get(&key(k)).cloned());
            }
        }
    }
}
