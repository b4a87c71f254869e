//! Throughput of the audiences stage on one core, on RocksDB, with 1M
//! profiles and 20 audiences: trait thresholds, windowed event counts with
//! property conditions, "did not … within", a sequence, `any`/`all`, and
//! audiences built on audiences.
//!
//! Each iteration runs [`BATCH`] trait updates (`<p>.traits` records: the
//! event and the traits it changed, as the traits stage emits them) for
//! random profiles among the million through the operator and commits them
//! in one write batch, as the runtime does. Stream time advances a minute
//! per batch; event times spread over the last hour. Elements/s = trait
//! updates/s per core (issue 9's goal: ≥ 300k). Bytes on disk per profile
//! are printed after the load and after the measurement.
//!
//! The inputs are built before they are timed. Besides criterion's wall
//! time, the bench prints the process's CPU time (every thread, RocksDB's
//! compactions included) for the load and for a fixed run of
//! [`support::fixed_rounds`] measured-mix batches after it: records per CPU second,
//! the figure that holds on a shared box.
//!
//! Run: `cargo bench -p cdp-operators --bench audiences`.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use cdp_operators::audiences::{AudienceDef, AudienceSet, AudiencesOperator};
use cdp_operators::config::KnownNames;
use cdp_operators::messages::{Cause, Identifiers, ProfileUpdate};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::{json, Value};
use support::{encode_with, mix, profiles, Task};

/// Trait updates per measured iteration (one committed batch).
const BATCH: usize = 1000;
/// 2026-11-26T00:00:00Z.
const START_MS: i64 = 1_795_651_200_000;
const CATEGORIES: [&str; 5] = ["shoes", "shirts", "bags", "hats", "socks"];

const AUDIENCES: &str = r#"
big_spenders:
  where:
    all:
      - {trait: revenue_total, gte: 500}
      - {event: Order Completed, count: {gte: 2}, within: 30d, where: [{property: properties.revenue, gt: 100}]}
lapsing: {where: {all: [{audience: big_spenders}, {not: {event: Order Completed, within: 14d}}]}}
browsed_then_bought: {where: {sequence: [{event: Product Viewed}, {event: Order Completed}], within: 1d}}
shoe_lovers: {where: {trait: favorite_category, eq: shoes}}
repeat_buyers: {where: {trait: orders_30d, gte: 3}}
one_time_buyers: {where: {trait: orders_total, eq: 1}}
window_shoppers: {where: {all: [{event: Product Viewed, count: {gte: 5}, within: 7d}, {not: {event: Order Completed}}]}}
active_7d: {where: {event: Page Viewed, within: 7d}}
dormant: {where: {not: {event: Page Viewed, within: 30d}}}
high_value: {where: {trait: average_order, gt: 150}}
low_value: {where: {trait: average_order, lt: 20}}
newsletter: {where: {trait: first_campaign, eq: newsletter}}
pro_plan: {where: {trait: plan, eq: pro}}
bag_browsers: {where: {event: Product Viewed, count: {gte: 2}, within: 1d, where: [{property: properties.category, eq: bags}]}}
big_order_week: {where: {event: Order Completed, within: 7d, where: [{property: properties.revenue, gte: 250}]}}
any_signal: {where: {any: [{audience: shoe_lovers}, {audience: repeat_buyers}, {audience: high_value}]}}
vip: {where: {all: [{audience: big_spenders}, {audience: active_7d}]}}
at_risk_vip: {where: {all: [{audience: vip}, {not: {event: Order Completed, within: 7d}}]}}
wide_interest: {where: {trait: skus_viewed, gte: 20}}
revenue_90d_top: {where: {trait: revenue_90d, gte: 1000}}
"#;

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The `n`th update, for profile `p`, at event time `at`: the event and
/// the traits it changed (the values a profile plausibly has).
fn update(n: usize, p: usize, at: i64) -> ProfileUpdate {
    let r = mix(n.wrapping_add(11)) % 100;
    let (event, traits) = match r {
        0..=59 => (
            json!({"type": "track", "event": "Product Viewed",
                   "properties": {"sku": format!("sku-{}", mix(n) % 500),
                                  "category": CATEGORIES[mix(n) % 5], "price": 89.5}}),
            json!({"favorite_category": CATEGORIES[mix(p) % 5],
                   "skus_viewed": mix(n) % 40, "last_product": format!("sku-{}", mix(n) % 500)}),
        ),
        60..=84 => (
            json!({"type": "page", "event": "Page Viewed", "properties": {"path": "/"}}),
            json!({"first_campaign": (["newsletter", "ads", "social"][p % 3])}),
        ),
        85..=94 => {
            let revenue = (mix(n) % 30_000) as f64 / 100.0;
            (
                json!({"type": "track", "event": "Order Completed", "properties": {"revenue": revenue}}),
                json!({"orders_30d": mix(n) % 5, "orders_total": mix(n) % 9,
                       "revenue_total": (mix(n) % 2000) as f64, "revenue_90d": (mix(n) % 1500) as f64,
                       "average_order": (mix(n) % 300) as f64}),
            )
        }
        _ => (
            json!({"type": "identify", "traits": {"plan": "pro"}}),
            json!({"plan": (["pro", "free"][n % 2])}),
        ),
    };
    let mut event = event;
    event["messageId"] = json!(format!("m-{n}"));
    event["timestamp"] = json!(rfc3339(at));
    let traits: BTreeMap<String, Value> = traits
        .as_object()
        .map(|m| m.clone().into_iter().collect())
        .unwrap_or_default();
    let identifiers: Identifiers =
        BTreeMap::from([("anonymous_id".into(), vec![format!("a-{p}")])]);
    ProfileUpdate::Update {
        profile_id: format!("p-{p}"),
        identifiers,
        event: Some(event.into()),
        traits,
        event_time: at,
        time_corrected_from: None,
        cause: Cause {
            message_id: Some(format!("m-{n}")),
            tick: None,
        },
        merged_from: Vec::new(),
        traits_until: None,
    }
}

fn operator() -> AudiencesOperator {
    let defs: BTreeMap<String, AudienceDef> =
        serde_yaml::from_str(AUDIENCES).unwrap_or_else(|e| panic!("audiences config: {e}"));
    let set = AudienceSet::new(&defs, &KnownNames::anything())
        .unwrap_or_else(|e| panic!("audiences config: {e}"));
    AudiencesOperator::new(Arc::new(set))
}

/// Round `round`'s batch of updates for random profiles, and its stream
/// time (a minute per round).
fn batch(round: usize) -> (i64, Vec<Vec<u8>>) {
    let now = START_MS + round as i64 * 60_000;
    let updates: Vec<ProfileUpdate> = (0..BATCH)
        .map(|k| {
            let n = round * BATCH + k;
            let at = now - (mix(n.wrapping_add(3)) % 3_600_000) as i64;
            update(n, mix(n.wrapping_add(5)) % profiles(), at)
        })
        .collect();
    (now, encode_with(&updates, ProfileUpdate::to_bytes))
}

/// 1M profiles, each with one update, loaded through the operator itself
/// (the inputs built first, so the load's CPU time is the operator's and
/// the store's).
fn loaded() -> Task<AudiencesOperator> {
    let mut task = Task::new(operator());
    task.now_ms = START_MS;
    let batches: Vec<(i64, Vec<Vec<u8>>)> = (0..profiles() / BATCH)
        .map(|chunk| {
            let updates: Vec<ProfileUpdate> = (0..BATCH)
                .map(|k| {
                    let p = chunk * BATCH + k;
                    update(p, p, START_MS - 60_000)
                })
                .collect();
            (START_MS, encode_with(&updates, ProfileUpdate::to_bytes))
        })
        .collect();
    support::report_cpu("audiences load", profiles(), || task.run_all(&batches));
    report_bytes(&task, "after the load", false);
    task
}

/// Fixed work after the load, timed in CPU: [`support::fixed_rounds`] batches of
/// the measured mix (random profiles among the million), built first.
#[inline(never)] // a symbol for `scripts/instructions.sh` to split its count at
fn fixed_run(task: &mut Task<AudiencesOperator>, round: &mut usize) {
    let batches: Vec<_> = (1..=support::fixed_rounds())
        .map(|i| batch(*round + i))
        .collect();
    *round += support::fixed_rounds();
    support::report_cpu(
        "audiences fixed run",
        support::fixed_rounds() * BATCH,
        || task.run_all(&batches),
    );
}

/// State size on disk; `compact` first compacts the store (only at the
/// end: a compaction before the fixed run would change what it measures).
fn report_bytes(task: &Task<AudiencesOperator>, when: &str, compact: bool) {
    let bytes = if compact {
        task.compacted_bytes_on_disk()
    } else {
        task.bytes_on_disk()
    };
    eprintln!(
        "audiences state {when}: {} profiles, {bytes} bytes of SST files = {:.0} bytes/profile",
        profiles(),
        bytes as f64 / profiles() as f64
    );
}

fn audiences(c: &mut Criterion) {
    let mut task = loaded();
    let mut group = c.benchmark_group("audiences");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(30);
    let mut round = profiles() / BATCH;
    fixed_run(&mut task, &mut round);
    group.bench_function("20_audiences_1m_profiles", |b| {
        b.iter_custom(|iters| support::time_rounds(&mut task, &mut round, iters, batch))
    });
    group.finish();
    report_bytes(&task, "after the measurement, compacted", true);
}

criterion_group!(benches, audiences);
criterion_main!(benches);
