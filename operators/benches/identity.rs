//! Throughput of the identity stage on one core, on RocksDB, with a graph
//! of 1M known identifiers: 400k profiles with a `userId` and an
//! `anonymousId` and 200k anonymous-only profiles.
//!
//! - `mix`: the realistic mix — 90% events from known visitors (no
//!   mutation), 8% from new anonymous visitors (a new profile), 2% logins
//!   that merge an anonymous profile into a known user's. Events are ~0.6 KB
//!   tracks and identifies, as SDKs send them.
//! - `mutations`: only new visitors and merges — the ceiling of the serial
//!   path when every event changes the graph.
//!
//! `CDP_BENCH_PROFILES` scales the graph (default 1M identifiers; 2/5 of
//! the number are known users, 1/5 anonymous-only profiles), for
//! `scripts/instructions.sh`.
//!
//! Each iteration runs [`BATCH`] events through the operator against the
//! task's `TaskStore` (RocksDB plus the batch overlay) and commits them in
//! one write batch, as the runtime does per batch. Elements/s = events/s per
//! core. Bytes on disk per profile are printed once after the load.
//!
//! Run: `cargo bench -p cdp-operators --bench identity`.

mod support;

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cdp_operators::identity::{IdentityConfig, IdentityOperator, IdentityRules};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::{json, Value};
use support::{encode, mix, Task};

/// Events per measured iteration (one committed batch).
const BATCH: usize = 1000;

/// Known users (a `userId` and an `anonymousId` each): 2/5 of
/// [`support::profiles`], 400k by default.
fn known_users() -> usize {
    support::profiles() * 2 / 5
}

/// Anonymous-only profiles: 1/5 of [`support::profiles`], 200k by default.
fn anonymous_only() -> usize {
    support::profiles() / 5
}

fn context() -> Value {
    json!({
        "library": {"name": "analytics.js", "version": "2.11.1"},
        "ip": "203.0.113.7",
        "locale": "en-US",
        "page": {"path": "/products/sku-123", "referrer": "https://www.google.com/",
                 "title": "Running shoes", "url": "https://shop.example.com/products/sku-123"},
        "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
        "campaign": {"source": "newsletter", "medium": "email", "name": "winter"}
    })
}

fn track(anonymous: Option<String>, user: Option<String>, n: usize) -> Value {
    let mut e = json!({
        "type": "track", "event": "Product Viewed", "messageId": format!("m-{n}"),
        "timestamp": "2026-11-26T10:00:00.000Z", "receivedAt": "2026-11-26T10:00:00.120Z",
        "properties": {"product_id": "p-123", "sku": "SKU-123", "category": "shoes",
                       "name": "Trail runner", "price": 89.5, "currency": "USD"},
        "context": context(),
    });
    if let Some(a) = anonymous {
        e["anonymousId"] = json!(a);
    }
    if let Some(u) = user {
        e["userId"] = json!(u);
    }
    e
}

fn login(anonymous: String, user: String, n: usize) -> Value {
    json!({
        "type": "identify", "messageId": format!("m-{n}"), "anonymousId": anonymous,
        "userId": user, "timestamp": "2026-11-26T10:00:00.000Z",
        "traits": {"email": format!("{user}@example.com"), "plan": "pro"},
        "context": context(),
    })
}

/// The graph of 1M identifiers, loaded through the operator itself.
fn loaded() -> Task<IdentityOperator> {
    let rules = match IdentityRules::new(&IdentityConfig::default()) {
        Ok(r) => r,
        Err(e) => panic!("rules: {e}"),
    };
    let mut task = Task::new(IdentityOperator::new(Arc::new(rules)));
    let load: Vec<Value> = (0..known_users())
        .map(|i| json!({"type": "identify", "anonymousId": format!("a-{i}"), "userId": format!("u-{i}")}))
        .chain((0..anonymous_only()).map(|i| json!({"type": "page", "anonymousId": format!("o-{i}")})))
        .collect();
    let batches: Vec<(i64, Vec<Vec<u8>>)> =
        load.chunks(BATCH).map(|chunk| (0, encode(chunk))).collect();
    support::report_cpu("identity load", load.len(), || task.run_all(&batches));
    let bytes = task.bytes_on_disk();
    let compacted = task.compacted_bytes_on_disk();
    let profiles = known_users() + anonymous_only();
    eprintln!(
        "identity graph: {profiles} profiles, {} identifiers, {bytes} bytes of SST files on disk = {:.0} bytes/profile ({:.0} once compacted)",
        2 * known_users() + anonymous_only(),
        bytes as f64 / profiles as f64,
        compacted as f64 / profiles as f64
    );
    task
}

/// Counters shared across iterations: every new visitor is new, every
/// merge takes an anonymous profile not merged before.
static NEXT_NEW: AtomicUsize = AtomicUsize::new(0);
static NEXT_MERGE: AtomicUsize = AtomicUsize::new(0);

fn new_visitor(n: usize) -> Value {
    let id = NEXT_NEW.fetch_add(1, Ordering::Relaxed);
    track(Some(format!("new-{id}")), None, n)
}

fn merge(n: usize) -> Value {
    let j = NEXT_MERGE.fetch_add(1, Ordering::Relaxed) % anonymous_only();
    let user = mix(n) % known_users();
    login(format!("o-{j}"), format!("u-{user}"), n)
}

fn known(n: usize) -> Value {
    let i = mix(n) % known_users();
    match n % 3 {
        0 => track(Some(format!("a-{i}")), None, n),
        1 => track(None, Some(format!("u-{i}")), n),
        _ => track(Some(format!("a-{i}")), Some(format!("u-{i}")), n),
    }
}

fn realistic_batch(round: usize) -> Vec<Vec<u8>> {
    encode(
        &(0..BATCH)
            .map(|k| {
                let n = round * BATCH + k;
                match mix(n.wrapping_add(7)) % 100 {
                    0..=89 => known(n),
                    90..=97 => new_visitor(n),
                    _ => merge(n),
                }
            })
            .collect::<Vec<_>>(),
    )
}

fn mutation_batch(round: usize) -> Vec<Vec<u8>> {
    encode(
        &(0..BATCH)
            .map(|k| {
                let n = round * BATCH + k;
                if n.is_multiple_of(5) {
                    merge(n)
                } else {
                    new_visitor(n)
                }
            })
            .collect::<Vec<_>>(),
    )
}

/// Fixed work after the load, timed in CPU: [`support::fixed_rounds`]
/// batches of the realistic mix, built first.
#[inline(never)] // a symbol for `scripts/instructions.sh` to split its count at
fn fixed_run(task: &mut Task<IdentityOperator>, round: &mut usize) {
    let batches: Vec<_> = (1..=support::fixed_rounds())
        .map(|i| (0, realistic_batch(*round + i)))
        .collect();
    *round += support::fixed_rounds();
    support::report_cpu(
        "identity fixed run",
        support::fixed_rounds() * BATCH,
        || task.run_all(&batches),
    );
}

fn identity(c: &mut Criterion) {
    let mut bench = loaded();
    let mut group = c.benchmark_group("identity");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(30);
    let mut round = 0;
    fixed_run(&mut bench, &mut round);
    group.bench_function("mix", |b| {
        b.iter_batched(
            || {
                round += 1;
                realistic_batch(round)
            },
            |events| black_box(bench.batch(&events)),
            BatchSize::LargeInput,
        )
    });
    group.bench_function("mutations", |b| {
        b.iter_batched(
            || {
                round += 1;
                mutation_batch(round)
            },
            |events| black_box(bench.batch(&events)),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, identity);
criterion_main!(benches);
