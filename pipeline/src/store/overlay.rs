//! A batch's writes before they are committed: a hash map, sorted only
//! when a batch asks for ranges often.
//!
//! Every write of a batch lands here and every read looks here first. As a
//! B-tree, each of them compared its key with ~15 others (`memcmp` over a
//! common prefix such as `dedupe/<source>/`): ~1,500 instructions a write
//! in the validate stage, which writes two keys per event (its entry and
//! the entry's timer), 9% of its batch (docs/performance.md). A hash map
//! finds a key in one hash and one compare. Nothing needs the writes in
//! order but the range reads ([`Overlay::prefix`], [`Overlay::first_live`]):
//! the timers a tick fires, held inputs, a task's first look for keys of an
//! older layout. The first [`SCANS_BEFORE_SORTING`] of a batch scan the
//! writes; after that the batch's keys are sorted once and kept sorted as
//! it writes new ones, so a tick that fires many timers over a large batch
//! costs a B-tree lookup per timer, as before, not a scan.

use std::cell::{Cell, Ref, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::ops::Bound;

/// The pending writes of one batch, in no order: `None` deletes.
pub type Changes = HashMap<Vec<u8>, Option<Vec<u8>>, foldhash::fast::RandomState>;

/// Range reads a batch answers by scanning its writes before it sorts them.
const SCANS_BEFORE_SORTING: u32 = 4;

/// See the module docs.
#[derive(Default)]
pub(crate) struct Overlay {
    writes: Changes,
    /// Every key in `writes`, sorted, once a batch read ranges more than
    /// [`SCANS_BEFORE_SORTING`] times.
    sorted: RefCell<Option<BTreeSet<Vec<u8>>>>,
    scans: Cell<u32>,
}

impl Overlay {
    pub(crate) fn get(&self, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.writes.get(key)
    }

    pub(crate) fn contains_key(&self, key: &[u8]) -> bool {
        self.writes.contains_key(key)
    }

    /// Write `value` (`None`: delete) at `key`.
    pub(crate) fn insert(&mut self, key: &[u8], value: Option<Vec<u8>>) {
        if let Some(slot) = self.writes.get_mut(key) {
            *slot = value;
            return;
        }
        if let Some(sorted) = self.sorted.get_mut() {
            sorted.insert(key.to_vec());
        }
        self.writes.insert(key.to_vec(), value);
    }

    /// The batch's writes, leaving the overlay empty.
    pub(crate) fn take(&mut self) -> Changes {
        self.reset();
        // Sized for a batch like this one: grown from empty, the table
        // was rehashed a dozen times per batch.
        let room = Changes::with_capacity_and_hasher(self.writes.len(), Default::default());
        std::mem::replace(&mut self.writes, room)
    }

    /// Drop the batch's writes.
    pub(crate) fn clear(&mut self) {
        self.reset();
        self.writes.clear();
    }

    fn reset(&mut self) {
        *self.sorted.get_mut() = None;
        self.scans.set(0);
    }

    /// The writes (deletes too) whose key starts with `prefix`, in key
    /// order.
    pub(crate) fn prefix(&self, prefix: &[u8]) -> Vec<(&[u8], &Option<Vec<u8>>)> {
        self.in_range(prefix, |k| k.starts_with(prefix))
    }

    /// The first write in `[start, end)` that is not a delete.
    pub(crate) fn first_live(&self, start: &[u8], end: &[u8]) -> Option<(&[u8], &[u8])> {
        if start >= end {
            return None;
        }
        if let Some(sorted) = self.sorted_after_scans() {
            return sorted
                .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
                .find_map(|k| self.live(k));
        }
        self.writes
            .iter()
            .filter(|(k, v)| v.is_some() && start <= k.as_slice() && k.as_slice() < end)
            .min_by(|a, b| a.0.cmp(b.0))
            .and_then(|(k, _)| self.live(k))
    }

    /// The writes with keys from `start` on that `keep` accepts, in key
    /// order, where the keys `keep` accepts are one run of the sorted keys
    /// (a prefix): sorted, the walk stops at the first key it refuses.
    fn in_range(
        &self,
        start: &[u8],
        keep: impl Fn(&[u8]) -> bool,
    ) -> Vec<(&[u8], &Option<Vec<u8>>)> {
        if let Some(sorted) = self.sorted_after_scans() {
            return sorted
                .range::<[u8], _>((Bound::Included(start), Bound::Unbounded))
                .take_while(|k| keep(k))
                .filter_map(|k| self.writes.get_key_value(k.as_slice()))
                .map(|(k, v)| (k.as_slice(), v))
                .collect();
        }
        let mut found: Vec<(&[u8], &Option<Vec<u8>>)> = self
            .writes
            .iter()
            .map(|(k, v)| (k.as_slice(), v))
            .filter(|(k, _)| start <= *k && keep(k))
            .collect();
        found.sort_unstable_by(|a, b| a.0.cmp(b.0));
        found
    }

    /// Count a range read; the sorted keys once there were enough of them.
    fn sorted_after_scans(&self) -> Option<Ref<'_, BTreeSet<Vec<u8>>>> {
        let scans = self.scans.get().saturating_add(1);
        self.scans.set(scans);
        if self.sorted.borrow().is_none() {
            if scans <= SCANS_BEFORE_SORTING {
                return None;
            }
            *self.sorted.borrow_mut() = Some(self.writes.keys().cloned().collect());
        }
        Ref::filter_map(self.sorted.borrow(), Option::as_ref).ok()
    }

    fn live(&self, key: &[u8]) -> Option<(&[u8], &[u8])> {
        match self.writes.get_key_value(key)? {
            (k, Some(v)) => Some((k.as_slice(), v.as_slice())),
            (_, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Put(Vec<u8>, u8),
        Delete(Vec<u8>),
        Prefix(Vec<u8>),
        First(Vec<u8>, Vec<u8>),
        Take,
    }

    fn key() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(prop::sample::select(vec![b'a', b'b', b'c', 0, 255]), 0..4)
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (key(), any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
            2 => key().prop_map(Op::Delete),
            2 => key().prop_map(Op::Prefix),
            3 => (key(), key()).prop_map(|(a, b)| Op::First(a, b)),
            1 => Just(Op::Take),
        ]
    }

    proptest! {
        /// Every read answers what a B-tree of the same writes answers
        /// (written here as the plain map the overlay was), before and
        /// after it sorts its keys, across batches.
        #[test]
        fn reads_answer_as_an_ordered_map_of_the_writes(ops in prop::collection::vec(op(), 0..80)) {
            let mut overlay = Overlay::default();
            let mut model: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Put(k, v) => {
                        overlay.insert(&k, Some(vec![v]));
                        model.insert(k, Some(vec![v]));
                    }
                    Op::Delete(k) => {
                        overlay.insert(&k, None);
                        model.insert(k, None);
                    }
                    Op::Prefix(p) => {
                        let want: Vec<(&[u8], &Option<Vec<u8>>)> = model
                            .iter()
                            .filter(|(k, _)| k.starts_with(&p))
                            .map(|(k, v)| (k.as_slice(), v))
                            .collect();
                        prop_assert_eq!(overlay.prefix(&p), want);
                    }
                    Op::First(a, b) => {
                        let want = model
                            .iter()
                            .filter(|(k, v)| v.is_some() && a.as_slice() <= k.as_slice() && k.as_slice() < b.as_slice())
                            .find_map(|(k, v)| v.as_deref().map(|v| (k.as_slice(), v)));
                        prop_assert_eq!(overlay.first_live(&a, &b), want);
                    }
                    Op::Take => {
                        let taken: BTreeMap<Vec<u8>, Option<Vec<u8>>> = overlay.take().into_iter().collect();
                        prop_assert_eq!(taken, std::mem::take(&mut model));
                    }
                }
                for (k, v) in &model {
                    prop_assert_eq!(overlay.get(k), Some(v));
                }
            }
        }
    }
}
