//! Tick records: how a stage's stream time moves while its input is idle.

use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;

use super::acks::UNWATCHED;
use super::produce::enqueue;
use super::{now_ms, RuntimeError, Shared};
use crate::metrics;
use crate::trust;

/// Write a tick into each owned input partition whose last tick is due.
pub(super) fn send_ticks(shared: &Shared, every: Duration) -> Result<(), RuntimeError> {
    let producer = shared.producer()?;
    let mut tasks = shared.tasks.lock().map_err(|_| RuntimeError::Poisoned)?;
    for task in tasks.values_mut() {
        if task.last_tick.elapsed() < every {
            continue;
        }
        task.last_tick = Instant::now();
        // Signed with this task's origin and epoch: only the owner's ticks
        // move stream time (see `crate::trust`).
        let headers = trust::tick_headers(&task.origin, task.meta.epoch, now_ms())
            .iter()
            .fold(OwnedHeaders::new_with_capacity(3), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                })
            });
        // Fire and forget: a lost tick is replaced by the next one.
        enqueue(
            &producer,
            BaseRecord::<[u8], [u8], usize>::with_opaque_to(&shared.spec.input_topic, UNWATCHED)
                .partition(task.partition)
                .payload(&[])
                .headers(headers),
        )?;
        metrics::TICKS.with_label_values(&[shared.spec.name]).inc();
    }
    Ok(())
}
