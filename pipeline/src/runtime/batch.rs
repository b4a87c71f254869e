//! One batch through the effectively-once cycle (see the module docs of
//! [`super`]): process, produce and await, mark, commit.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::message::{BorrowedMessage, Message, OwnedHeaders};

use super::produce::{insert_all, produce_acked, OutHeaders, Outgoing, Stamp};
use super::settle::{check_sizes, settle, Input};
use super::{now_ms, ownership, OutputTarget, RuntimeError, Shared, Task, DEAD_LETTERS};
use crate::changelog::{self, commit_key, Marker};
use crate::envelope::{self, Position};
use crate::kafka::Guarantee;
use crate::metrics;
use crate::operator::{is_timer_key, run_tick, Context, Emitted, Record};
use crate::sink::{Sink, SinkRecord};
use crate::store::{Changes, StoreError, TaskMeta};
use crate::trust::{self, TickVerdict};

/// Records for one sink in one batch, with where each came from
/// (`(task batch index, output index)`).
type SinkBatch = (Arc<dyn Sink>, Vec<SinkRecord>, Vec<(usize, usize)>);

/// A task's results for one batch, between processing and commit.
struct TaskBatch {
    partition: i32,
    /// The task's origin, stamped on its outputs.
    origin: String,
    meta: TaskMeta,
    outputs: Vec<(Position, Emitted)>,
    changes: Changes,
}

/// The id a sink's receiver dedupes on: the record's origin, lineage and
/// position without the epoch, so a replay by a new owner (a higher epoch)
/// of the same input offset carries the same id, while a reset stage (a new
/// lineage, offsets from the start again) never reuses an old one.
fn delivery_id(origin: &str, pos: &Position) -> String {
    format!("{origin}/{}/{}/{}", pos.lineage, pos.offset, pos.index)
}

fn to_owned_headers(pairs: &[(String, Vec<u8>)]) -> OwnedHeaders {
    insert_all(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
}

/// Process, produce, mark and commit one polled batch. `poll_wait` is how
/// long the poll waited for its first record (observed with the other
/// phases of a committed batch).
pub(super) fn process_batch(
    shared: &Shared,
    batch: Vec<BorrowedMessage<'_>>,
    poll_wait: Duration,
) -> Result<(), RuntimeError> {
    let started = Instant::now();
    let stage = shared.spec.name;
    let processing_time = now_ms();
    let dedupe = shared.guarantee == Guarantee::EffectivelyOnce;
    // Metric handles once per batch, not a label lookup per record.
    let records_in = metrics::RECORDS_IN.with_label_values(&[stage]);
    let duplicates = metrics::DUPLICATES_DROPPED.with_label_values(&[stage]);
    let mut by_partition: BTreeMap<i32, Vec<BorrowedMessage<'_>>> = BTreeMap::new();
    for m in batch {
        by_partition.entry(m.partition()).or_default().push(m);
    }
    let mut tasks = shared.tasks.lock().map_err(|_| RuntimeError::Poisoned)?;
    let mut work: Vec<TaskBatch> = Vec::new();
    for (partition, messages) in by_partition {
        // Records fetched before a revoke or re-assignment are not ours.
        let Some(task) = tasks.get_mut(&partition) else {
            continue;
        };
        let mut meta = task.meta.clone();
        let mut outputs = Vec::new();
        let mut consumed = false;
        for m in messages {
            if m.offset() < meta.input_offset {
                continue; // fetched before the position (the fetch starts earlier, see `ownership::INPUT_REREAD`)
            }
            consumed = true;
            meta.input_offset = m.offset() + 1;
            records_in.inc();
            let mut input = Input::read(&m, !shared.external_input);
            let mut emitted = Vec::new();
            // Ticks carry no payload: a producer's record on an external
            // input that copied a `cdp-tick` header along is an event.
            let verdict = if shared.external_input && !input.value.is_empty() {
                TickVerdict::NotATick
            } else {
                trust::judge_tick(
                    &input.headers,
                    &task.origin,
                    meta.epoch,
                    meta.tick_epoch,
                    processing_time,
                )
            };
            let result = match verdict {
                TickVerdict::Reject(reason) => {
                    let reason = reason.as_str();
                    metrics::TICKS_REJECTED
                        .with_label_values(&[stage, reason])
                        .inc();
                    tracing::debug!(
                        stage,
                        partition,
                        offset = m.offset(),
                        reason,
                        "tick ignored"
                    );
                    continue;
                }
                TickVerdict::Accept { time, epoch } => {
                    meta.tick_epoch = epoch;
                    meta.stream_time = meta.stream_time.max(time);
                    run_tick(
                        task.operator.as_mut(),
                        &mut task.store,
                        &mut emitted,
                        meta.stream_time,
                        processing_time,
                        partition,
                        &mut task.timer_floor,
                    )
                }
                TickVerdict::NotATick => {
                    if shared.external_input {
                        trust::strip_external(&mut input.headers);
                    }
                    if dedupe {
                        if let Some((origin, pos)) = input.at() {
                            match meta.dedupe.get_mut(origin) {
                                Some(seen) if !pos.is_new_after(seen) => {
                                    duplicates.inc();
                                    continue;
                                }
                                Some(seen) => *seen = pos,
                                None => {
                                    meta.dedupe.insert(origin.to_string(), pos);
                                }
                            }
                        }
                    }
                    let record = Record {
                        key: m.key(),
                        value: input.value,
                        partition,
                        offset: m.offset(),
                        timestamp_ms: m.timestamp().to_millis(),
                        headers: &input.headers,
                    };
                    let mut ctx = Context::new(
                        &mut task.store,
                        &mut emitted,
                        meta.stream_time,
                        processing_time,
                        partition,
                    );
                    let result = task.operator.process(&record, &mut ctx);
                    if let Some(set) = ctx.take_earliest_timer_set() {
                        if set < task.timer_floor {
                            task.timer_floor = set;
                        }
                    }
                    result
                }
            };
            let observer = if verdict == TickVerdict::NotATick {
                shared.on_input.as_ref()
            } else {
                None
            };
            let result = check_sizes(result, &emitted, shared.max_record_bytes);
            settle(
                stage,
                &m,
                input,
                result,
                &mut emitted,
                observer,
                shared.max_record_bytes,
            )?;
            for (index, e) in emitted.into_iter().enumerate() {
                let pos = Position {
                    epoch: meta.epoch,
                    offset: m.offset(),
                    index: index as u32,
                    lineage: meta.lineage,
                };
                outputs.push((pos, e));
            }
        }
        if !consumed {
            continue;
        }
        // What the operator kept in memory for the batch is state too.
        let mut none = Vec::new();
        task.operator.end_batch(&mut Context::new(
            &mut task.store,
            &mut none,
            meta.stream_time,
            processing_time,
            partition,
        ))?;
        let changes = task.store.take_changes();
        if let Some((key, bytes)) = changes
            .iter()
            .map(|(k, v)| (k, k.len() + v.as_ref().map_or(0, Vec::len)))
            .find(|(_, bytes)| *bytes > shared.max_record_bytes)
        {
            return Err(RuntimeError::StateTooLarge {
                stage,
                partition,
                key: String::from_utf8_lossy(key).into_owned(),
                bytes,
                limit: shared.max_record_bytes,
            });
        }
        if outputs.is_empty() && changes.is_empty() {
            // Nothing to make durable (typically an idle partition's ticks):
            // move on in memory only. Replaying these records after a crash
            // yields nothing again, so an idle task costs no writes. The
            // group's offset (read by lag tools only) still moves past
            // them: an idle pipeline shows no lag there either.
            shared
                .group_offsets
                .lock()
                .map_err(|_| RuntimeError::Poisoned)?
                .record(partition, meta.input_offset);
            task.meta = meta;
            continue;
        }
        work.push(TaskBatch {
            partition,
            origin: task.origin.clone(),
            meta,
            outputs,
            changes,
        });
    }
    if work.is_empty() {
        return Ok(());
    }
    let processed = Instant::now();

    // Sinks first: each retries on its own within its deadline and hands
    // back what it gave up on, which becomes a dead letter below.
    let mut sink_batches: BTreeMap<String, SinkBatch> = BTreeMap::new();
    for (wi, w) in work.iter().enumerate() {
        let Some(task) = tasks.get(&w.partition) else {
            continue;
        };
        for (oi, (pos, e)) in w.outputs.iter().enumerate() {
            if e.output == DEAD_LETTERS {
                continue;
            }
            if let Some(OutputTarget::Sink(sink)) = shared.spec.outputs.get(e.output) {
                let entry = sink_batches
                    .entry(e.output.to_string())
                    .or_insert_with(|| (sink.clone(), Vec::new(), Vec::new()));
                entry.1.push(SinkRecord {
                    delivery_id: delivery_id(&task.origin, pos),
                    key: e.key.clone(),
                    value: e.value.clone(),
                });
                entry.2.push((wi, oi));
            }
        }
    }
    let sink_futures = sink_batches
        .values()
        .map(|(sink, records, _)| sink.deliver(records.clone()))
        .collect::<Vec<_>>();
    let sink_results = shared.handle.block_on(join_all(sink_futures));

    // Phase 1: outputs, changelog records and the dead letters of failed
    // deliveries, all acknowledged.
    // Sized once: grown one push at a time, a batch of thousands of
    // records copied (and page-faulted) the vector several times.
    let capacity = work.iter().map(|w| w.outputs.len() + w.changes.len()).sum();
    let mut outgoing: Vec<Outgoing<'_>> = Vec::with_capacity(capacity);
    let derived_timers = shared.spec.timers_from_state.is_some();
    let mut out_counts: BTreeMap<&'static str, u64> = BTreeMap::new();
    for w in &work {
        for (pos, e) in &w.outputs {
            let (topic, stamp) = if e.output == DEAD_LETTERS {
                (shared.dead_letter_topic.as_str(), Stamp::Headers)
            } else {
                match shared.spec.outputs.get(e.output) {
                    Some(OutputTarget::Topic(t)) => (t.as_str(), Stamp::Headers),
                    Some(OutputTarget::Internal(t)) => (t.as_str(), Stamp::At),
                    Some(OutputTarget::Framed(t)) => (t.as_str(), Stamp::Frame),
                    Some(OutputTarget::Sink(_)) => continue,
                    None => return Err(RuntimeError::UnknownOutput(e.output.to_string())),
                }
            };
            outgoing.push(Outgoing {
                topic,
                partition: None,
                key: e.key.as_deref(),
                payload: Some(e.value.as_slice()),
                headers: OutHeaders::Stamped {
                    own: &e.headers,
                    origin: &w.origin,
                    pos: *pos,
                    stamp,
                },
            });
            *out_counts.entry(e.output).or_default() += 1;
        }
        for (k, v) in &w.changes {
            if derived_timers && is_timer_key(k) {
                continue; // kept locally; a restore derives it from its entry
            }
            outgoing.push(Outgoing {
                topic: &shared.changelog_topic,
                partition: Some(w.partition),
                key: Some(k.as_slice()),
                payload: v.as_deref(),
                headers: OutHeaders::Epoch(w.meta.epoch),
            });
        }
    }
    for ((name, (_, records, origins)), results) in sink_batches.iter().zip(&sink_results) {
        for ((record, (wi, oi)), result) in records.iter().zip(origins).zip(results) {
            *out_counts
                .entry(work[*wi].outputs[*oi].1.output)
                .or_default() += 1;
            if let Err(reason) = result {
                metrics::DEAD_LETTERS
                    .with_label_values(&[stage, "delivery_failed"])
                    .inc();
                tracing::warn!(stage, destination = %name, delivery_id = %record.delivery_id, %reason, "delivery failed; sent to dead letters");
                let headers = to_owned_headers(&[
                    (envelope::DLQ_STAGE.into(), stage.as_bytes().to_vec()),
                    (envelope::DLQ_REASON.into(), b"delivery_failed".to_vec()),
                    (
                        "cdp-dlq-detail".into(),
                        serde_json::json!({"destination": name, "error": reason})
                            .to_string()
                            .into_bytes(),
                    ),
                    (
                        "cdp-delivery-id".into(),
                        record.delivery_id.clone().into_bytes(),
                    ),
                ]);
                outgoing.push(Outgoing {
                    topic: &shared.dead_letter_topic,
                    partition: None,
                    key: record.key.as_deref(),
                    payload: Some(record.value.as_slice()),
                    headers: OutHeaders::Owned(headers),
                });
            }
        }
    }
    for (output, n) in out_counts {
        metrics::RECORDS_OUT
            .with_label_values(&[stage, output])
            .inc_by(n);
    }
    let acks = produce_acked(shared, "batch", &outgoing)?;
    let acknowledged = Instant::now();
    // Where our changelog records landed, per partition: any other offset
    // in between is someone else's write (see `ownership`).
    let mut changelog_offsets: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for (record, (partition, offset)) in outgoing.iter().zip(&acks.offsets) {
        if record.topic == shared.changelog_topic {
            changelog_offsets
                .entry(*partition)
                .or_default()
                .push(*offset);
        }
    }
    drop(outgoing);
    if let Some(crash_at) = shared.chaos_crash_after_produce {
        let has_outputs = work.iter().any(|w| !w.outputs.is_empty());
        if has_outputs && shared.batches_with_outputs.fetch_add(1, Ordering::SeqCst) + 1 >= crash_at
        {
            // The worst moment to die: outputs acknowledged, nothing committed.
            tracing::error!(stage, "chaos: aborting after produce, before commit");
            std::process::abort();
        }
    }

    // Phase 2: one commit marker per task.
    let markers = work
        .iter()
        .map(|w| {
            serde_json::to_vec(&Marker::commit(&w.meta))
                .map_err(|e| StoreError::Decode(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let marker_keys: Vec<Vec<u8>> = work.iter().map(|w| commit_key(w.meta.epoch)).collect();
    let marker_records: Vec<Outgoing<'_>> = work
        .iter()
        .zip(&markers)
        .zip(&marker_keys)
        .map(|((w, marker), key)| Outgoing {
            topic: &shared.changelog_topic,
            partition: Some(w.partition),
            key: Some(key.as_slice()),
            payload: Some(marker.as_slice()),
            headers: OutHeaders::Epoch(w.meta.epoch),
        })
        .collect();
    let marker_acks = produce_acked(shared, "marker", &marker_records)?;
    let marker_offsets = marker_acks.offsets;
    let marked = Instant::now();
    drop(marker_records);

    // Phase 3: state + progress + positions, atomically — unless someone
    // else wrote to the changelog partition meanwhile.
    let mut group_offsets = shared
        .group_offsets
        .lock()
        .map_err(|_| RuntimeError::Poisoned)?;
    let mut fenced = None;
    for (mut w, (_, marker_offset)) in work.into_iter().zip(marker_offsets) {
        let Some(task) = tasks.get_mut(&w.partition) else {
            continue;
        };
        let mut mine = changelog_offsets.remove(&w.partition).unwrap_or_default();
        mine.push(marker_offset);
        if !changelog::gaps(task.log_end, marker_offset, &mine).is_empty() {
            // A failed round of ours, or the client's own retry across a
            // broker restart that lost its idempotence state, may have
            // landed copies whose acks we never saw: ours if they are this
            // batch's records under our epoch, not another owner's writes.
            mine.extend(own_unacked_writes(shared, task, &w, marker_offset, &mine)?);
        }
        let foreign = ownership::check_writes(
            shared,
            w.partition,
            w.meta.epoch,
            task.log_end,
            &mine,
            marker_offset,
        )?;
        if let changelog::Foreign::Fenced { epoch } = foreign {
            // Another owner claimed: this batch is not ours to commit.
            tracing::error!(
                stage,
                partition = w.partition,
                epoch = w.meta.epoch,
                claimed_by = epoch,
                "fenced: another owner claimed this partition; not committing"
            );
            metrics::FENCED.with_label_values(&[stage]).inc();
            fenced.get_or_insert(RuntimeError::Fenced {
                stage,
                partition: w.partition,
                epoch: w.meta.epoch,
                by: epoch,
            });
            continue;
        }
        w.meta.changelog_offset = marker_offset;
        task.store
            .commit_batch(std::mem::take(&mut w.changes), &w.meta)?;
        task.meta = w.meta;
        task.log_end = marker_offset + 1;
        ownership::handle_foreign(shared, task, foreign)?;
        metrics::COMMITS.with_label_values(&[stage]).inc();
        if let Some(observe) = &shared.spec.observer {
            for (_, e) in &w.outputs {
                observe(e);
            }
        }
        group_offsets.record(task.partition, task.meta.input_offset);
    }
    drop(group_offsets);
    if let Some(e) = fenced {
        // Stop the stage: the orchestrator restarts it, and the restore
        // then starts from the last batch this task did commit.
        return Err(e);
    }
    metrics::BATCH_SECONDS
        .with_label_values(&[stage])
        .observe(started.elapsed().as_secs_f64());
    let phases = [
        ("poll_wait", poll_wait),
        ("process", processed - started),
        ("outputs", acknowledged - processed),
        ("markers", marked - acknowledged),
        ("commit", marked.elapsed()),
    ];
    for (phase, took) in phases {
        metrics::BATCH_PHASE_SECONDS
            .with_label_values(&[stage, phase])
            .observe(took.as_secs_f64());
    }
    Ok(())
}

/// Offsets in the task's changelog partition, since its last known end, of
/// records that a failed produce round of this batch wrote without an ack:
/// same epoch, and a key and value the batch wrote (a state change or its
/// commit marker).
fn own_unacked_writes(
    shared: &Shared,
    task: &Task,
    w: &TaskBatch,
    marker_offset: i64,
    acked: &[i64],
) -> Result<Vec<i64>, RuntimeError> {
    let marker = serde_json::to_vec(&Marker::commit(&w.meta))
        .map_err(|e| StoreError::Decode(e.to_string()))?;
    let marker_key = commit_key(w.meta.epoch);
    let records = changelog::read_range(
        &shared.restore_consumer,
        &shared.changelog_topic,
        w.partition,
        task.log_end,
        marker_offset,
    )?;
    Ok(records
        .into_iter()
        .filter(|r| r.epoch == w.meta.epoch && !acked.contains(&r.offset))
        .filter(|r| {
            let ours = if r.key == marker_key {
                Some(&marker)
            } else {
                w.changes.get(&r.key).and_then(Option::as_ref)
            };
            match (&r.value, ours) {
                (Some(v), Some(o)) => v == o,
                (None, None) => w.changes.get(&r.key).is_some_and(Option::is_none),
                _ => false,
            }
        })
        .map(|r| r.offset)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_are_the_same_when_a_new_owner_replays_the_same_input() {
        let first = Position {
            epoch: 3,
            offset: 42,
            index: 1,
            lineage: 7,
        };
        let replayed = Position { epoch: 4, ..first };
        assert_eq!(
            delivery_id("deliver:0", &first),
            delivery_id("deliver:0", &replayed)
        );
        assert_eq!(delivery_id("deliver:0", &first), "deliver:0/7/42/1");
        assert_ne!(
            delivery_id("deliver:0", &first),
            delivery_id(
                "deliver:0",
                &Position {
                    lineage: 8,
                    ..first
                }
            ),
            "a reset stage's outputs are new"
        );
        assert_ne!(
            delivery_id("deliver:0", &first),
            delivery_id("deliver:0", &Position { index: 2, ..first })
        );
    }
}
