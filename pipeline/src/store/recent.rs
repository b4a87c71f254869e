//! The committed values of the keys a task read or wrote lately, kept in
//! memory so the next read of one skips RocksDB.
//!
//! A profile's events come in sessions, and each event reads the keys the
//! profile's previous event wrote: identity its identifiers' pointers and
//! the profile, traits and audiences the profile's state. In RocksDB each
//! such read walks the memtable's skip list (or a table's index and block)
//! — ~14% of identity's stage thread and ~7% of traits' in the chain
//! (docs/performance.md, "Recent values"). A hash lookup answers it here.
//!
//! It can never be stale: [`TaskStore`](super::TaskStore) is the only
//! writer of its database and every write goes through its `commit`, which
//! either puts the values written here ([`RecentValues::written`]) or drops
//! the keys it wrote ([`RecentValues::forget`]). Reads that hit the overlay
//! (this batch's uncommitted writes) never get here, and an aborted batch
//! never reached the database, so there is nothing to undo.
//!
//! Bounded by [`RECENT_BYTES`] per task (keys, values and ~64 bytes of
//! bookkeeping each); when full it starts over empty, which costs less per
//! record than finding an entry to evict and keeps whatever is read again
//! soon. Absent keys are not kept (most are read once: a new `messageId`,
//! a new visitor), and neither are timers, which are scanned, never read.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use crate::operator::is_timer_key;

use super::Changes;

/// Bytes of recent values a task keeps at most.
pub(crate) const RECENT_BYTES: usize = 4 << 20;
/// What an entry costs besides its key and value: the map's slot, the two
/// vectors' headers and the allocator's rounding, roughly.
const ENTRY_OVERHEAD: usize = 64;

/// See the module docs.
#[derive(Default)]
pub(crate) struct RecentValues {
    map: RefCell<HashMap<Vec<u8>, Vec<u8>, foldhash::fast::RandomState>>,
    bytes: Cell<usize>,
    budget: usize,
}

impl RecentValues {
    pub(crate) fn new(budget: usize) -> Self {
        RecentValues {
            budget,
            ..Default::default()
        }
    }

    /// The committed value of `key`, if it is kept.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.map.borrow().get(key).cloned()
    }

    /// `value` was just read from the database for `key`.
    pub(crate) fn read(&self, key: &[u8], value: &[u8]) {
        self.keep(key.to_vec(), value.to_vec());
    }

    /// `changes` were just committed: their values are the database's now.
    pub(crate) fn written(&self, changes: Changes) {
        for (key, value) in changes {
            match value {
                Some(value) if !is_timer_key(&key) => self.keep(key, value),
                _ => self.remove(&key),
            }
        }
    }

    /// `changes` were just committed and are not worth keeping (a
    /// restore's): drop what was kept of their keys.
    pub(crate) fn forget(&self, changes: &Changes) {
        if self.map.borrow().is_empty() {
            return;
        }
        for key in changes.keys() {
            self.remove(key);
        }
    }

    /// Bytes kept now (for tests and the docs' sizing).
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.get()
    }

    /// Bytes an entry of a `key`-byte key and a `value`-byte value counts for.
    fn cost(key: usize, value: usize) -> usize {
        key + value + ENTRY_OVERHEAD
    }

    fn keep(&self, key: Vec<u8>, value: Vec<u8>) {
        let cost = Self::cost(key.len(), value.len());
        if cost > self.budget {
            self.remove(&key);
            return;
        }
        let mut map = self.map.borrow_mut();
        if self.bytes.get() + cost > self.budget {
            map.clear();
            self.bytes.set(0);
        }
        let key_len = key.len();
        let mut bytes = self.bytes.get() + cost;
        if let Some(old) = map.insert(key, value) {
            bytes -= Self::cost(key_len, old.len());
        }
        self.bytes.set(bytes);
    }

    fn remove(&self, key: &[u8]) {
        if let Some((key, value)) = self.map.borrow_mut().remove_entry(key) {
            self.bytes
                .set(self.bytes.get() - Self::cost(key.len(), value.len()));
        }
    }
}
