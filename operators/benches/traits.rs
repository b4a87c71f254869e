//! Throughput of the traits stage on one core, on RocksDB, with 1M
//! profiles and 10 computed traits (the demo's six plus an all-time
//! counter, an average, a 90-day windowed sum and a unique count).
//!
//! Each iteration runs [`BATCH`] resolved events (`<p>.identified` records,
//! ~0.7 KB: the event as identity forwards it) for random profiles among
//! the million through the operator and commits them in one write batch, as
//! the runtime does. The mix is what a shop sends: 60% `Product Viewed`,
//! 25% `Page Viewed`, 10% `Order Completed`, 5% `identify`. Stream time
//! advances a minute per batch; event times spread over the last hour, so
//! windows roll and late events count. Elements/s = events/s per core
//! (issue 9's goal: ≥ 200k). Bytes on disk per profile are printed after
//! the load and after the measurement.
//!
//! The inputs are built before they are timed. Besides criterion's wall
//! time, the bench prints the process's CPU time (every thread, RocksDB's
//! compactions included) for the load and for a fixed run of
//! [`support::fixed_rounds`] measured-mix batches after it: records per CPU second,
//! the figure that holds on a shared box.
//!
//! Run: `cargo bench -p cdp-operators --bench traits`.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use cdp_operators::messages::{Identifiers, ProfileRecord};
use cdp_operators::traits::{TraitDef, TraitSet, TraitsOperator};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Value};
use support::{encode_with, mix, profiles, Task};

/// Events per measured iteration (one committed batch).
const BATCH: usize = 1000;
/// 2026-11-26T00:00:00Z.
const START_MS: i64 = 1_795_651_200_000;
const CATEGORIES: [&str; 8] = [
    "shoes", "shirts", "bags", "hats", "socks", "jackets", "watches", "gloves",
];

const TRAITS: &str = r#"
orders_30d: {event_counter: {event: Order Completed, within: 30d}}
orders_total: {event_counter: {event: Order Completed}}
revenue_total: {aggregation: {event: Order Completed, property: properties.revenue, function: sum}}
revenue_90d: {aggregation: {event: Order Completed, property: properties.revenue, function: sum, within: 90d}}
average_order: {aggregation: {event: Order Completed, property: properties.revenue, function: avg}}
favorite_category: {most_frequent: {event: Product Viewed, property: properties.category}}
first_campaign: {first: {event: Page Viewed, property: context.campaign.source}}
last_product: {last: {event: Product Viewed, property: properties.sku}}
categories: {unique_list: {event: Product Viewed, property: properties.category, limit: 50}}
skus_viewed: {unique_count: {event: Product Viewed, property: properties.sku}}
"#;

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A skewed category: the first ones are the most viewed.
fn category(n: usize) -> &'static str {
    let r = mix(n) % 100;
    CATEGORIES[match r {
        0..=39 => 0,
        40..=64 => 1,
        65..=79 => 2,
        80..=89 => 3,
        _ => 4 + r % 4,
    }]
}

/// The `n`th event, for profile `p`, at event time `at`.
fn event(n: usize, p: usize, at: i64) -> Value {
    let context = json!({
        "library": {"name": "analytics.js", "version": "2.11.1"},
        "ip": "203.0.113.7", "locale": "en-US",
        "page": {"path": "/products/sku-123", "url": "https://shop.example.com/products/sku-123"},
        "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
        "campaign": {"source": (["newsletter", "ads", "social"][n % 3]), "medium": "email"}
    });
    let common = json!({"messageId": format!("m-{n}"), "anonymousId": format!("a-{p}"),
                        "timestamp": rfc3339(at), "context": context});
    let mut e = match mix(n.wrapping_add(11)) % 100 {
        0..=59 => json!({"type": "track", "event": "Product Viewed",
            "properties": {"sku": format!("sku-{}", mix(n) % 500), "category": category(n), "price": 89.5}}),
        60..=84 => json!({"type": "page", "event": "Page Viewed", "name": "Home",
            "properties": {"path": "/"}}),
        85..=94 => json!({"type": "track", "event": "Order Completed",
            "properties": {"revenue": (mix(n) % 30_000) as f64 / 100.0, "currency": "USD"}}),
        _ => json!({"type": "identify", "userId": format!("u-{p}"),
            "traits": {"email": format!("u-{p}@example.com"), "plan": "pro"}}),
    };
    if let (Some(e), Some(c)) = (e.as_object_mut(), common.as_object()) {
        e.extend(c.clone());
    }
    e
}

fn record(n: usize, p: usize, at: i64) -> ProfileRecord {
    let identifiers: Identifiers =
        BTreeMap::from([("anonymous_id".into(), vec![format!("a-{p}")])]);
    ProfileRecord::Event {
        profile_id: format!("p-{p}"),
        identifiers,
        event: event(n, p, at).into(),
        dropped: Vec::new(),
        merged_from: Vec::new(),
    }
}

fn operator() -> TraitsOperator {
    let defs: BTreeMap<String, TraitDef> =
        serde_yaml::from_str(TRAITS).unwrap_or_else(|e| panic!("traits config: {e}"));
    let set = TraitSet::new(&defs).unwrap_or_else(|e| panic!("traits config: {e}"));
    TraitsOperator::new(Arc::new(set))
}

/// Round `round`'s batch of events for random profiles, and its stream
/// time (a minute per round).
fn batch(round: usize) -> (i64, Vec<Vec<u8>>) {
    let now = START_MS + round as i64 * 60_000;
    let records: Vec<ProfileRecord> = (0..BATCH)
        .map(|k| {
            let n = round * BATCH + k;
            let at = now - (mix(n.wrapping_add(3)) % 3_600_000) as i64;
            record(n, mix(n.wrapping_add(5)) % profiles(), at)
        })
        .collect();
    (now, encode_with(&records, ProfileRecord::to_bytes))
}

/// 1M profiles, each with one record, loaded through the operator itself
/// (the inputs built first, so the load's CPU time is the operator's and
/// the store's).
fn loaded() -> Task<TraitsOperator> {
    let mut task = Task::new(operator());
    task.now_ms = START_MS;
    let batches: Vec<(i64, Vec<Vec<u8>>)> = (0..profiles() / BATCH)
        .map(|chunk| {
            let records: Vec<ProfileRecord> = (0..BATCH)
                .map(|k| {
                    let p = chunk * BATCH + k;
                    record(p, p, START_MS - 60_000)
                })
                .collect();
            (START_MS, encode_with(&records, ProfileRecord::to_bytes))
        })
        .collect();
    support::report_cpu("traits load", profiles(), || task.run_all(&batches));
    report_bytes(&task, "after the load", false);
    task
}

/// Fixed work after the load, timed in CPU: [`support::fixed_rounds`] batches of
/// the measured mix (random profiles among the million), built first.
#[inline(never)] // a symbol for `scripts/instructions.sh` to split its count at
fn fixed_run(task: &mut Task<TraitsOperator>, round: &mut usize) {
    let batches: Vec<_> = (1..=support::fixed_rounds())
        .map(|i| batch(*round + i))
        .collect();
    *round += support::fixed_rounds();
    support::report_cpu("traits fixed run", support::fixed_rounds() * BATCH, || {
        task.run_all(&batches)
    });
}

/// State size on disk; `compact` first compacts the store (only at the
/// end: a compaction before the fixed run would change what it measures).
fn report_bytes(task: &Task<TraitsOperator>, when: &str, compact: bool) {
    let bytes = if compact {
        task.compacted_bytes_on_disk()
    } else {
        task.bytes_on_disk()
    };
    eprintln!(
        "traits state {when}: {} profiles, {bytes} bytes of SST files = {:.0} bytes/profile",
        profiles(),
        bytes as f64 / profiles() as f64
    );
}

fn traits(c: &mut Criterion) {
    let mut task = loaded();
    let mut group = c.benchmark_group("traits");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(30);
    let mut round = profiles() / BATCH;
    fixed_run(&mut task, &mut round);
    group.bench_function("10_traits_1m_profiles", |b| {
        b.iter_custom(|iters| support::time_rounds(&mut task, &mut round, iters, batch))
    });
    group.finish();
    report_bytes(&task, "after the measurement, compacted", true);
}

criterion_group!(benches, traits);
criterion_main!(benches);
