//! What a tick costs when a task holds many timers: 1 000 due timers among
//! 10 000 000 stored, against 1 000 due timers alone, on the RocksDB task
//! store (the runtime's own). `validate` keeps a timer per `messageId` for
//! its dedupe window, so the first case is a busy partition's steady state.
//!
//! Each iteration fires the 1 000 due timers (each a seek, a delete in the
//! batch overlay and an `on_timer` call) and then drops the batch's writes,
//! so the next iteration finds the same timers due. Committed deletes (the
//! tombstones a real tick leaves until RocksDB compacts them) are not in
//! this measurement.
//!
//! Run: `cargo bench -p cdp-pipeline --bench timers`
//! (`CDP_BENCH_STORED_TIMERS=N` to change the 10 000 000).

use std::time::Duration;

use cdp_pipeline::operator::{fire_due_timers, Context, Operator, OperatorError, Record};
use cdp_pipeline::store::{Changes, StateBackend, TaskMeta, TaskStore};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const DUE: i64 = 1_000;
/// The stream time of the tick: timers at 1..=DUE are due.
const NOW: i64 = DUE;

struct Fire;

impl Operator for Fire {
    fn process(&mut self, _: &Record<'_>, _: &mut Context<'_>) -> Result<(), OperatorError> {
        Ok(())
    }
    fn on_timer(&mut self, key: &[u8], ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        ctx.emit("out", None, key.to_vec());
        Ok(())
    }
}

/// A store with `DUE` due timers and `stored - DUE` timers far in the
/// future, committed in batches like the runtime commits them.
fn store_with(dir: &std::path::Path, stored: i64) -> Result<TaskStore, Box<dyn std::error::Error>> {
    let mut store = TaskStore::open(dir)?;
    let put = |store: &mut TaskStore, from: i64, to: i64, at: &dyn Fn(i64) -> i64| {
        let mut i = from;
        while i < to {
            let end = (i + 100_000).min(to);
            let mut ctx_out = Vec::new();
            {
                let mut ctx = Context::new(&mut *store, &mut ctx_out, 0, 0, 0);
                for n in i..end {
                    ctx.set_timer(at(n), format!("message-{n:012}").as_bytes());
                }
            }
            let changes: Changes = store.take_changes();
            store.commit_batch(changes, &TaskMeta::default())?;
            i = end;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    put(&mut store, 0, DUE, &|n| n + 1)?;
    // A day of dedupe window ahead: none of these is due.
    put(&mut store, DUE, stored, &|n| 86_400_000 + n)?;
    Ok(store)
}

fn tick(c: &mut Criterion) {
    let big: i64 = std::env::var("CDP_BENCH_STORED_TIMERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let mut group = c.benchmark_group("tick_firing_1000_timers");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    for stored in [DUE, big] {
        let Ok(dir) = tempfile::tempdir() else {
            eprintln!("no temporary directory");
            return;
        };
        let mut store = match store_with(dir.path(), stored) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot build the store: {e}");
                return;
            }
        };
        let mut op = Fire;
        group.bench_with_input(BenchmarkId::new("stored", stored), &stored, |b, _| {
            b.iter(|| {
                let mut out = Vec::new();
                let fired = fire_due_timers(
                    &mut op,
                    &mut store as &mut dyn StateBackend,
                    &mut out,
                    NOW,
                    NOW,
                    0,
                );
                assert!(fired.is_ok() && out.len() == DUE as usize);
                store.abort();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, tick);
criterion_main!(benches);
