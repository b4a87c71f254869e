//! Throughput of the validate stage on one core: 1000 realistic events
//! (0.9–2 KB: product events, orders with 1–4 line items, identify, page,
//! search, an unplanned event; 7.5% break their plan) against a tracking
//! plan of 20 events.
//!
//! - `operator/*`: the operator as the runtime calls it, through
//!   `OperatorHarness` (parse, spec, plan, dedupe in an in-memory store,
//!   emit). `block_no_dedupe` without dedupe state; `no_plan_no_dedupe`
//!   for a source without a tracking plan.
//! - `check_event`: the reference path, `Validator::check_event` on the
//!   parsed event plus `serde_json::to_vec`.
//! - `baseline/*`: only parsing (and encoding) the same events.
//!
//! Run: `cargo bench -p cdp-operators --bench validate`. Criterion reports
//! time per batch of [`BATCH`] events and elements/s = events/s per core
//! (an operator runs on one thread per task).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use cdp_operators::config::SourceConfig;
use cdp_operators::validate::{
    TrackingPlan, UnplannedEvents, ValidateOperator, Validator, ViolationPolicy,
    DEFAULT_DEDUPE_WINDOW,
};
use cdp_pipeline::envelope::SOURCE;
use cdp_pipeline::{OperatorHarness, Span};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::{json, Value};

/// Events per measured iteration.
const BATCH: usize = 1000;

/// The 20 planned events: name and the schema of their `properties`.
fn plan(on_violation: ViolationPolicy) -> TrackingPlan {
    let product = json!({
        "type": "object",
        "required": ["product_id", "sku", "price"],
        "properties": {
            "product_id": {"type": "string", "minLength": 1},
            "sku": {"type": "string", "pattern": "^[A-Z0-9-]+$"},
            "category": {"type": "string"},
            "name": {"type": "string", "maxLength": 200},
            "brand": {"type": "string"},
            "variant": {"type": "string"},
            "price": {"type": "number", "minimum": 0},
            "quantity": {"type": "integer", "minimum": 1},
            "currency": {"type": "string", "enum": ["USD", "EUR", "GBP"]},
            "url": {"type": "string"},
            "image_url": {"type": "string"}
        }
    });
    let order = json!({
        "type": "object",
        "required": ["order_id", "revenue", "currency"],
        "properties": {
            "order_id": {"type": "string"},
            "affiliation": {"type": "string"},
            "total": {"type": "number", "minimum": 0},
            "revenue": {"type": "number", "minimum": 0},
            "shipping": {"type": "number", "minimum": 0},
            "tax": {"type": "number", "minimum": 0},
            "discount": {"type": "number", "minimum": 0},
            "coupon": {"type": "string"},
            "currency": {"type": "string", "enum": ["USD", "EUR", "GBP"]},
            "products": {"type": "array", "maxItems": 100, "items": product.clone()}
        }
    });
    let generic = |required: &str| {
        json!({
            "type": "object",
            "required": [required],
            "properties": {
                required: {"type": "string"},
                "label": {"type": "string"},
                "value": {"type": "number"}
            }
        })
    };
    let mut events = BTreeMap::new();
    for name in [
        "Product Viewed",
        "Product Added",
        "Product Removed",
        "Product Clicked",
        "Product Added to Wishlist",
        "Product Shared",
    ] {
        events.insert(name.to_string(), product.clone());
    }
    for name in [
        "Order Completed",
        "Order Updated",
        "Order Refunded",
        "Order Cancelled",
        "Checkout Started",
    ] {
        events.insert(name.to_string(), order.clone());
    }
    for (name, field) in [
        ("Products Searched", "query"),
        ("Product List Viewed", "list_id"),
        ("Cart Viewed", "cart_id"),
        ("Coupon Applied", "coupon_id"),
        ("Promotion Viewed", "promotion_id"),
        ("Signed Up", "method"),
        ("Signed In", "method"),
    ] {
        events.insert(name.to_string(), generic(field));
    }
    events.insert(
        "Page Viewed".to_string(),
        json!({"type": "object", "properties": {"path": {"type": "string"}, "url": {"type": "string"}}}),
    );
    events.insert(
        "Screen Viewed".to_string(),
        json!({"type": "object", "properties": {"name": {"type": "string"}}}),
    );
    TrackingPlan {
        unplanned_events: UnplannedEvents::Allow,
        on_violation,
        identify: Some(json!({
            "type": "object",
            "properties": {
                "email": {"type": "string", "format": "email"},
                "plan": {"type": "string"},
                "age": {"type": "integer", "minimum": 0}
            }
        })),
        group: None,
        events,
        ..TrackingPlan::default()
    }
}

fn context(i: usize) -> Value {
    json!({
        "ip": "203.0.113.7",
        "locale": "en-US",
        "timezone": "Europe/Berlin",
        "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Safari/605.1.15",
        "library": {"name": "analytics.js", "version": "4.1.0"},
        "page": {"path": "/products/42", "referrer": "https://www.google.com/", "title": "Shoes", "url": "https://shop.example.com/products/42"},
        "campaign": {"source": "newsletter", "medium": "email", "name": format!("spring-{}", i % 7)},
        "traits": {"email": format!("user{}@example.com", i % 5000)}
    })
}

fn product(i: usize) -> Value {
    let category = ["shoes", "shirts", "hats", "bags"][i % 4];
    json!({
        "product_id": format!("p_{}", i % 997),
        "sku": format!("SKU-{:05}", i % 997),
        "category": category,
        "name": "Trail running shoe, waterproof",
        "brand": "Acme",
        "variant": "blue / 42",
        "price": 89.9 + (i % 10) as f64,
        "quantity": 1 + i % 3,
        "currency": "EUR",
        "url": "https://shop.example.com/products/42",
        "image_url": "https://cdn.example.com/p/42.jpg"
    })
}

/// A realistic mix, 0.5–2 KB each: product events, orders with 1–4 line
/// items, identify, page; about 1 in 10 breaks its plan.
fn event(i: usize) -> Value {
    let base = |kind: &str| {
        json!({
            "type": kind,
            "messageId": format!("msg-{i:012}-{:08x}", i.wrapping_mul(2654435761) & 0xffff_ffff),
            "anonymousId": format!("anon-{:08}", i % 20000),
            "userId": format!("u_{}", i % 5000),
            "timestamp": "2026-11-26T10:00:00.000Z",
            "sentAt": "2026-11-26T10:00:00.120Z",
            "receivedAt": "2026-11-26T10:00:00.180Z",
            "context": context(i),
            "integrations": {"All": true}
        })
    };
    let mut e = match i % 10 {
        0..=3 => {
            let mut e = base("track");
            let name = ["Product Viewed", "Product Added", "Product Clicked"][i % 3];
            e["event"] = json!(name);
            e["properties"] = product(i);
            if i % 40 == 1 {
                e["properties"]["price"] = json!("free"); // violation
            }
            e
        }
        4 | 5 => {
            let mut e = base("track");
            e["event"] = json!("Order Completed");
            let products: Vec<Value> = (0..1 + i % 4).map(|j| product(i + j)).collect();
            e["properties"] = json!({
                "order_id": format!("o_{i}"), "affiliation": "web", "total": 120.5,
                "revenue": 99.9, "shipping": 4.9, "tax": 15.7, "discount": 0,
                "coupon": "SPRING", "currency": "EUR", "products": products
            });
            if i % 20 == 4 {
                e["properties"]["revenue"] = json!(-1); // violation
            }
            e
        }
        6 => {
            let mut e = base("identify");
            e["traits"] = json!({"email": format!("user{}@example.com", i % 5000), "plan": "pro", "age": 31,
                                 "first_name": "Ada", "last_name": "Lovelace"});
            e
        }
        7 => {
            let mut e = base("page");
            e["name"] = json!("Product");
            e["properties"] = json!({"path": "/products/42", "url": "https://shop.example.com/products/42",
                                     "title": "Shoes", "referrer": "https://www.google.com/"});
            e
        }
        8 => {
            let mut e = base("track");
            e["event"] = json!("Products Searched");
            e["properties"] = json!({"query": "running shoes", "label": "search", "value": 3});
            e
        }
        _ => {
            let mut e = base("track");
            e["event"] = json!("Newsletter Opened"); // unplanned, allowed
            e["properties"] = json!({"newsletter_id": "n_1", "subject": "Spring sale"});
            e
        }
    };
    e["context"]["protocols"] = json!({"sourceId": "web"});
    e
}

fn inputs() -> Vec<Vec<u8>> {
    (0..BATCH)
        .map(|i| serde_json::to_vec(&event(i)).unwrap_or_default())
        .collect()
}

/// Source `web` with the plan under `on_violation`, or with no plan.
fn validator(on_violation: Option<ViolationPolicy>, window: Span) -> Option<Arc<Validator>> {
    let sources = [SourceConfig {
        id: "web".into(),
        write_key: "wk_web".into(),
        tracking_plan: on_violation.map(|_| "shop".into()),
        kind: Default::default(),
    }];
    let on_violation = on_violation.unwrap_or_default();
    let plans = BTreeMap::from([("shop".to_string(), plan(on_violation))]);
    match Validator::new(&sources, &plans, window) {
        Ok(v) => Some(Arc::new(v)),
        Err(e) => {
            eprintln!("bench config does not compile: {e}");
            None
        }
    }
}

fn bench(c: &mut Criterion) {
    let events = inputs();
    let sizes: Vec<usize> = events.iter().map(Vec::len).collect();
    let (min, max) = (
        sizes.iter().copied().min().unwrap_or(0),
        sizes.iter().copied().max().unwrap_or(0),
    );
    let avg = sizes.iter().sum::<usize>() / sizes.len().max(1);
    eprintln!("events: {BATCH}, bytes min {min} avg {avg} max {max}");
    let headers = vec![(SOURCE.to_string(), b"web".to_vec())];

    let mut group = c.benchmark_group("validate");
    group.throughput(Throughput::Elements(BATCH as u64));
    let no_dedupe = Span::from_millis(0);
    for (name, policy, window) in [
        (
            "operator/block",
            Some(ViolationPolicy::Block),
            DEFAULT_DEDUPE_WINDOW,
        ),
        (
            "operator/omit",
            Some(ViolationPolicy::Omit),
            DEFAULT_DEDUPE_WINDOW,
        ),
        (
            "operator/block_no_dedupe",
            Some(ViolationPolicy::Block),
            no_dedupe,
        ),
        ("operator/no_plan_no_dedupe", None, no_dedupe),
    ] {
        let Some(v) = validator(policy, window) else {
            return;
        };
        group.bench_function(name, |b| {
            // A fresh harness per batch so dedupe never sees a repeat and
            // the in-memory store does not grow across iterations.
            b.iter_batched(
                || OperatorHarness::new(ValidateOperator::new(v.clone())),
                |mut h| {
                    let mut outcomes = 0usize;
                    for e in &events {
                        if let Ok(out) = h.process(Some(b"k"), black_box(e), &headers) {
                            outcomes += out.len();
                        } else {
                            outcomes += 1;
                        }
                    }
                    // The state is dropped after the measurement.
                    (h, black_box(outcomes))
                },
                BatchSize::LargeInput,
            )
        });
    }
    let Some(v) = validator(Some(ViolationPolicy::Block), DEFAULT_DEDUPE_WINDOW) else {
        return;
    };
    group.bench_function("check_event", |b| {
        b.iter(|| {
            let mut ok = 0usize;
            for e in &events {
                let Ok(parsed) = serde_json::from_slice::<Value>(black_box(e)) else {
                    continue;
                };
                if let Ok(out) = v.check_event("web", parsed) {
                    ok += serde_json::to_vec(&out).map(|b| b.len()).unwrap_or(0);
                }
            }
            black_box(ok)
        })
    });
    // Baselines in the same run: what any stage pays to read and write an
    // event, without validating it.
    group.bench_function("baseline/parse_value", |b| {
        b.iter(|| {
            let mut n = 0usize;
            for e in &events {
                if let Ok(v) = serde_json::from_slice::<Value>(black_box(e)) {
                    n += v.as_object().map_or(0, |m| m.len());
                }
            }
            black_box(n)
        })
    });
    group.bench_function("baseline/parse_value_encode", |b| {
        b.iter(|| {
            let mut n = 0usize;
            for e in &events {
                if let Ok(v) = serde_json::from_slice::<Value>(black_box(e)) {
                    n += serde_json::to_vec(&v).map_or(0, |b| b.len());
                }
            }
            black_box(n)
        })
    });
    group.bench_function("baseline/syntax_only", |b| {
        b.iter(|| {
            let mut n = 0usize;
            for e in &events {
                if serde_json::from_slice::<serde::de::IgnoredAny>(black_box(e)).is_ok() {
                    n += 1;
                }
            }
            black_box(n)
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
