//! The global allocator of every program that links the runtime: the `cdp`
//! binary, the operator and runtime benches, and the tests.
//!
//! mimalloc instead of glibc's malloc: the stages allocate per record (the
//! input's JSON tree, the state's maps and strings, the output), and glibc's
//! allocator took about a third of the traits and audiences benches' CPU
//! (`_int_malloc`, `malloc_consolidate`, `_int_free`); mimalloc cut their
//! CPU per record by 16–21% (docs/performance.md, "mimalloc as the global
//! allocator"). Declared here, in the crate every binary links, so a bench
//! measures the allocator the product runs. RocksDB and librdkafka still
//! allocate through glibc (they call `malloc` from C/C++ directly).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
