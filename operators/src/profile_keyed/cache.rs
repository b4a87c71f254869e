//! Decoded states of the profiles a task handled last, so a known
//! visitor's next event skips decoding its state; and the states a batch
//! changed, written once when the batch ends.
//!
//! A profile's events come in sessions: the next event of a profile a task
//! just handled usually follows within seconds. Decoding a traits state
//! (maps of names, values and identifiers, each allocated) was 14% of a
//! known profile's record (docs/performance.md, "A cache of decoded
//! states"). The cache keeps, per profile, the bytes the stage last wrote
//! and the state they encode; a load that reads exactly those bytes from
//! the store takes the state instead of decoding them.
//!
//! It can never be stale: the store stays the source of truth and every
//! load still reads it. Whatever else changed the key (a batch rolled back,
//! a restore from the changelog, a merge, a transfer, a timer) left other
//! bytes there, and a load that finds other bytes drops the entry and
//! decodes. The state is moved out on a hit and back in after the write,
//! so a hit copies nothing but the few bytes compared.
//!
//! **Pending states.** Within a batch, the same profile often has several
//! records (a session's events, a batch of thousands); encoding its state
//! after each was 10–13% of the traits and audiences stages, and all but
//! the last encoding were overwritten before the batch committed. A
//! profile's usual record (live, waiting for nothing, no merge) leaves its
//! state *pending* here instead of encoding it; the profile's next record
//! in the batch takes it from here without reading the store, and
//! [`StateCache::flush`] writes every pending state when the batch ends
//! (`Operator::end_batch`) — or earlier, for one profile, before a record
//! other than its usual one touches it (a merge, a transfer into it:
//! they read and rewrite its value through the store, see
//! `wait::route`). Whatever a record reads or writes is its own
//! profile's (the survivor's, for a transfer), so the others stay
//! pending. Every load takes a pending state first, so a timer (whose
//! profile, if pending, waits for nothing) needs no flush. The store
//! holds exactly what the records wrote whenever something reads it raw,
//! and when the batch commits; the oracle tests run in batches of 1 to
//! 12 records to hold this to account.

use std::cell::RefCell;
use std::collections::HashMap;

use cdp_pipeline::operator::Context;
use cdp_pipeline::store::StoreError;
use serde::Serialize;

use super::{encode_state, profile_key};

/// Profiles a task's cache holds. A traits state of the demo's ten traits
/// takes ~1–2 KB decoded, so ~2–4 MB per task at most.
pub(crate) const CACHED_PROFILES: usize = 2048;

/// See the module docs.
pub(crate) struct StateCache<T> {
    entries: RefCell<HashMap<String, (Vec<u8>, T), foldhash::fast::RandomState>>,
    capacity: usize,
    /// States changed in this batch and not written yet (see the module
    /// docs).
    pending: RefCell<HashMap<String, T, foldhash::fast::RandomState>>,
}

impl<T: Serialize> StateCache<T> {
    /// A cache of at most `capacity` profiles (0: none, every load decodes).
    pub(crate) fn new(capacity: usize) -> Self {
        StateCache {
            entries: RefCell::new(HashMap::default()),
            capacity,
            pending: RefCell::new(HashMap::default()),
        }
    }

    /// Whether `id`'s state is pending: the store holds an older one.
    pub(crate) fn is_pending(&self, id: &str) -> bool {
        self.pending.borrow().contains_key(id)
    }

    /// `id`'s pending state, taken out (its owner puts it back with
    /// [`StateCache::store`]).
    pub(crate) fn take_pending(&self, id: &str) -> Option<T> {
        self.pending.borrow_mut().remove(id)
    }

    /// `state` is `id`'s state now: pending until the batch ends when
    /// `defer` (the record was the profile's usual kind, see `wait::route`),
    /// else written to the store at once (and kept decoded).
    pub(crate) fn store(
        &self,
        ctx: &mut Context<'_>,
        id: &str,
        state: T,
        defer: bool,
    ) -> Result<(), StoreError> {
        if defer {
            let mut pending = self.pending.borrow_mut();
            // A profile pending already keeps its key (not copied again).
            match pending.get_mut(id) {
                Some(slot) => *slot = state,
                None => {
                    pending.insert(id.to_owned(), state);
                }
            }
            return Ok(());
        }
        let bytes = encode_state(&state)?;
        ctx.put(&profile_key(id), bytes.clone());
        self.keep(id, bytes, state);
        Ok(())
    }

    /// Write `id`'s state to the store if it is pending.
    pub(crate) fn flush_one(&self, ctx: &mut Context<'_>, id: &str) -> Result<(), StoreError> {
        match self.take_pending(id) {
            Some(state) => self.store(ctx, id, state, false),
            None => Ok(()),
        }
    }

    /// Write every pending state to the store (and keep it decoded).
    pub(crate) fn flush(&self, ctx: &mut Context<'_>) -> Result<(), StoreError> {
        if self.pending.borrow().is_empty() {
            return Ok(());
        }
        // Drained, not replaced: the map keeps its room for the next batch.
        let pending: Vec<(String, T)> = self.pending.borrow_mut().drain().collect();
        for (id, state) in pending {
            self.store(ctx, &id, state, false)?;
        }
        Ok(())
    }

    /// The state of `id` if the cache holds it as the encoding of `stored`
    /// (what the store holds now), taken out of the cache.
    pub(crate) fn take(&self, id: &str, stored: &[u8]) -> Option<T> {
        match self.entries.borrow_mut().remove(id) {
            Some((bytes, state)) if bytes == stored => Some(state),
            _ => None,
        }
    }

    /// Remember that `bytes`, just written for `id`, encode `state`. A full
    /// cache starts over empty: cheaper per record than finding the entry
    /// to evict, and a task whose active profiles fit (a hit takes the
    /// entry out and the write puts it back) never fills it.
    pub(crate) fn keep(&self, id: &str, bytes: Vec<u8>, state: T) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.borrow_mut();
        if entries.len() >= self.capacity {
            entries.clear();
        }
        entries.insert(id.to_owned(), (bytes, state));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_is_taken_only_for_the_bytes_it_was_kept_with() {
        let cache = StateCache::new(2);
        cache.keep("p", b"one".to_vec(), 1);
        assert_eq!(cache.take("p", b"two"), None, "other bytes in the store");
        assert_eq!(cache.take("p", b"one"), None, "a miss dropped the entry");
        cache.keep("p", b"one".to_vec(), 1);
        assert_eq!(cache.take("p", b"one"), Some(1));
        assert_eq!(cache.take("p", b"one"), None, "taken out on a hit");
    }

    #[test]
    fn the_cache_holds_at_most_its_capacity() {
        let cache = StateCache::new(2);
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            cache.keep(id, vec![i as u8], i);
        }
        // Full at "c": it started over with "c" alone.
        assert_eq!(cache.take("c", &[2]), Some(2));
        assert_eq!(cache.take("a", &[0]), None);
        assert_eq!(cache.take("b", &[1]), None);
        let none = StateCache::new(0);
        none.keep("a", vec![0], 0);
        assert_eq!(none.take("a", &[0]), None);
    }
}
