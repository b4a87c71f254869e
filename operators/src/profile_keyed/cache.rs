//! Decoded states of the profiles a task handled last, so a known
//! visitor's next event skips decoding its state.
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

use std::cell::RefCell;
use std::collections::HashMap;

/// Profiles a task's cache holds. A traits state of the demo's ten traits
/// takes ~1–2 KB decoded, so ~2–4 MB per task at most.
pub(crate) const CACHED_PROFILES: usize = 2048;

/// See the module docs.
pub(crate) struct StateCache<T> {
    entries: RefCell<HashMap<String, (Vec<u8>, T), foldhash::fast::RandomState>>,
    capacity: usize,
}

impl<T> StateCache<T> {
    /// A cache of at most `capacity` profiles (0: none, every load decodes).
    pub(crate) fn new(capacity: usize) -> Self {
        StateCache {
            entries: RefCell::new(HashMap::default()),
            capacity,
        }
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
