//! The deliver stage's cost per change, on one core, no broker:
//!
//! - `deliver/segment_batched`: [`BATCH`] audience changes of 100 profiles
//!   through the [`DeliverOperator`] (parse, route) and a `segment`
//!   destination (Engage's identify + track per change, 100 calls a
//!   request) to a local HTTP receiver that answers 200 at once.
//! - `deliver/webhook`: the same changes through a `webhook` destination
//!   (one POST per change), for comparison.
//! - `encode/*`, `decode/*`: one realistic change (5 traits, 3 identifier
//!   types) as JSON (`serde_json`) vs Avro single-object (`apache-avro`).
//!
//! The deliver side runs on a current-thread runtime (one core); the
//! receiver has its own thread, so on a 2-core machine the figures include
//! some contention with it. Elements/s = changes/s.
//!
//! Run: `cargo bench -p cdp-connectors --bench deliver`.

use std::hint::black_box;
use std::time::Duration;

use cdp_connectors::avro::{AvroCodec, Framing};
use cdp_connectors::deliver::DeliverOperator;
use cdp_connectors::destinations::{DestinationConfig, DestinationKind, SegmentSink, WebhookSink};
use cdp_operators::messages::{AudienceAction, AudienceChange, Cause};
use cdp_pipeline::{OperatorHarness, Sink, SinkRecord};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;

/// Changes per measured iteration (one deliver batch).
const BATCH: usize = 500;

fn change(n: usize) -> AudienceChange {
    let user = format!("user-{}", n % 100);
    AudienceChange {
        kind: "audience_change".into(),
        audience: "big_spenders".into(),
        action: if n.is_multiple_of(3) {
            AudienceAction::Exited
        } else {
            AudienceAction::Entered
        },
        profile_id: format!("prof_{:020}", n % 100),
        identifiers: [
            ("user_id".to_string(), vec![user.clone()]),
            ("anonymous_id".to_string(), vec![format!("anon-{n}-0c3f9e")]),
            ("email".to_string(), vec![format!("{user}@example.com")]),
        ]
        .into_iter()
        .collect(),
        traits: [
            ("revenue_total".to_string(), json!(550.25)),
            ("orders_30d".to_string(), json!(4)),
            ("favorite_category".to_string(), json!("shoes")),
            ("categories".to_string(), json!(["shoes", "hats", "socks"])),
            ("vip".to_string(), json!(true)),
        ]
        .into_iter()
        .collect(),
        event_time: "2026-11-29T10:00:00.000Z".into(),
        emitted_at: "2026-11-29T10:00:00.120Z".into(),
        cause: Cause {
            message_id: Some(format!("m-{n}")),
            tick: None,
        },
        merged_into: None,
    }
}

/// A receiver on its own thread answering 200 to every POST.
fn receiver() -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let app = axum::Router::new().fallback(axum::routing::post(|| async { "{}" }));
            let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
                return;
            };
            let Ok(addr) = listener.local_addr() else {
                return;
            };
            let _ = tx.send(format!("http://{addr}"));
            let _ = axum::serve(listener, app).await;
        });
    });
    rx.recv().unwrap_or_default()
}

fn records() -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..BATCH)
        .map(|n| {
            let c = change(n);
            (
                c.profile_id.clone().into_bytes(),
                serde_json::to_vec(&c).unwrap_or_default(),
            )
        })
        .collect()
}

/// Route every change through the operator, then deliver the batch.
fn run(
    rt: &tokio::runtime::Runtime,
    op: &mut OperatorHarness<DeliverOperator>,
    sink: &dyn Sink,
    input: &[(Vec<u8>, Vec<u8>)],
) -> usize {
    let mut batch = Vec::with_capacity(input.len());
    for (i, (key, value)) in input.iter().enumerate() {
        let Ok(out) = op.process(Some(key), value, &[]) else {
            continue;
        };
        for e in out {
            batch.push(SinkRecord {
                delivery_id: format!("audiences:0/1/{i}/0"),
                key: e.key,
                value: e.value,
            });
        }
    }
    let results = rt.block_on(sink.deliver(batch));
    results.iter().filter(|r| r.is_ok()).count()
}

fn deliver(c: &mut Criterion) {
    let url = receiver();
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let input = records();
    let dest = DestinationConfig::new("bench", DestinationKind::Stdout);
    let mut op = OperatorHarness::new(DeliverOperator::new(&[dest]));
    let mut group = c.benchmark_group("deliver");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    let (Ok(segment), Ok(webhook)) = (
        SegmentSink::new("bench", &url, "wk".into(), Duration::from_secs(10), 3, 100),
        WebhookSink::new(
            "bench",
            &format!("{url}/hook"),
            None,
            Duration::from_secs(10),
            3,
        ),
    ) else {
        return;
    };
    group.bench_function("segment_batched", |b| {
        b.iter(|| black_box(run(&rt, &mut op, &segment, &input)))
    });
    group.bench_function("webhook", |b| {
        b.iter(|| black_box(run(&rt, &mut op, &webhook, &input)))
    });
    group.finish();
}

fn codecs(c: &mut Criterion) {
    let change = change(1);
    let Ok(codec) = AvroCodec::new(Framing::SingleObject) else {
        return;
    };
    let json = serde_json::to_vec(&change).unwrap_or_default();
    let avro = codec.encode(&change).unwrap_or_default();
    println!(
        "one change: {} bytes as JSON, {} as Avro",
        json.len(),
        avro.len()
    );
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("json", |b| {
        b.iter(|| serde_json::to_vec(black_box(&change)))
    });
    group.bench_function("avro", |b| b.iter(|| codec.encode(black_box(&change))));
    group.finish();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("json", |b| {
        b.iter(|| serde_json::from_slice::<AudienceChange>(black_box(&json)))
    });
    group.bench_function("avro", |b| b.iter(|| codec.decode(black_box(&avro))));
    group.finish();
}

criterion_group!(benches, codecs, deliver);
criterion_main!(benches);
