//! The global allocator of every program that links the runtime: the `cdp`
//! binary, the operator and runtime benches, and the tests.
//!
//! mimalloc instead of glibc's malloc: the stages allocate per record (the
//! input's JSON tree, the state's maps and strings, the output), and glibc's
//! allocator took about a third of the traits and audiences benches' CPU
//! (`_int_malloc`, `malloc_consolidate`, `_int_free`); mimalloc cut their
//! CPU per record by 16–21% (docs/performance.md, "mimalloc as the global
//! allocator"). Declared here, in the crate every binary links, so a bench
//! measures the allocator the product runs.
//!
//! mimalloc is built with its `override` feature, so it also answers the C
//! `malloc`/`free` that RocksDB and librdkafka call (every produced
//! record's copy, every write batch): glibc's allocator there was ~12% of
//! the validate stage's instructions in the chain, and the stage counts
//! 9.5% fewer with mimalloc (identity 5%). mimalloc keeps freed memory for
//! a while before it gives it back (its `purge_delay`, 1 s, ten times that
//! for whole arenas): with librdkafka's buffers and RocksDB's blocks through
//! it, that made every stage's RSS 10–25% larger and jumpy.
//! [`release_freed_memory_at_once`] sets the delay to 0: RSS then stays
//! below what it was with glibc (docs/performance.md, "Records read in
//! place, one allocator"). `MIMALLOC_PURGE_DELAY` in the environment
//! still wins.

use std::ffi::c_long;

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (the crate's
/// constants are v2's).
const PURGE_DELAY: mi_option_t = 15;

/// mimalloc v3's default purge delay (ms): what the option reads when
/// nothing set it, and how a wrong index would show.
const DEFAULT_PURGE_DELAY_MS: c_long = 1_000;

/// Give freed memory back to the OS at once (see the module docs). Called
/// once, first thing, by the `cdp` binary. Leaves the option alone when
/// the environment set it, or when it does not read mimalloc's default
/// (another mimalloc version, whose table this index may not fit).
pub fn release_freed_memory_at_once() -> bool {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return false;
    }
    // SAFETY: both only read and write an entry of mimalloc's option
    // table; any index is checked against the table's bounds by mimalloc.
    unsafe {
        if mi_option_get(PURGE_DELAY) != DEFAULT_PURGE_DELAY_MS {
            return false;
        }
        mi_option_set(PURGE_DELAY, 0);
        mi_option_get(PURGE_DELAY) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index and default this relies on are mimalloc's: an upgrade
    /// that moves them fails here rather than setting another option.
    #[test]
    fn the_purge_delay_is_where_mimalloc_keeps_it() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads one entry of mimalloc's option table.
        assert_eq!(
            unsafe { mi_option_get(PURGE_DELAY) },
            DEFAULT_PURGE_DELAY_MS
        );
        assert!(release_freed_memory_at_once());
        // SAFETY: as above.
        assert_eq!(unsafe { mi_option_get(PURGE_DELAY) }, 0);
    }
}
