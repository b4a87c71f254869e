//! Taking and keeping ownership of a task's changelog partition.
//!
//! - **Open**: the local copy is checked against the changelog first (a
//!   copy ahead of the broker, older than what compaction retains, or whose
//!   last marker is not in the log is discarded, loudly); then the task
//!   restores, claims a new epoch and reads the log back to its claim: the
//!   claim counts only if it landed exactly at the end the task restored
//!   to, otherwise someone wrote in between and the task catches up and
//!   claims again. Keys whose latest record the restore did not apply are
//!   repaired (see `changelog`) before the local copy is committed.
//! - **Keep**: after each batch the task checks that every changelog offset
//!   since its last known one is its own (producer acks give the offsets).
//!   A foreign record of a newer epoch means another owner claimed: the
//!   batch is not committed locally and the stage stops. Older-epoch
//!   records are a zombie's writes, own-epoch ones stray copies of a
//!   retried produce round: both repaired. Idle tasks make the same check
//!   against the changelog's end every few seconds.

use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::Offset;

use super::produce::{produce_acked, produce_round, OutHeaders, Outgoing};
use super::{RuntimeError, Shared, Task};
use crate::changelog::{self, claim_key, commit_key, Claim, Foreign, Marker, RecordKind, Restorer};
use crate::metrics;
use crate::store::{Changes, StateBackend, StoreError, TaskMeta, TaskStore};

/// How often a task retries a claim that someone else's write voided.
const CLAIM_ATTEMPTS: usize = 20;
/// How often a claimer re-reads a growing changelog before it claims
/// anyway (the claim is then void if the log grew again: it retries).
const CATCH_UP_ROUNDS: usize = 100;
/// How often a repair may find fresh zombie writes before giving up.
const REPAIR_ROUNDS: usize = 10;

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, RuntimeError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Decode(e.to_string()).into())
}

/// A random id for a new changelog incarnation (never 0, which means "no
/// lineage": records of writers that predate lineages).
fn new_lineage() -> u64 {
    let (hi, lo) = uuid::Uuid::new_v4().as_u64_pair();
    (hi ^ lo).max(1)
}

/// Why a local copy whose last marker is at `at` cannot be trusted,
/// judged from the changelog's watermarks and the copy's age alone.
fn stale_reason(
    at: i64,
    saved_at_ms: Option<i64>,
    now_ms: i64,
    (low, high): (i64, i64),
) -> Option<&'static str> {
    if at < 0 {
        return None; // nothing local to trust or distrust
    }
    if at >= high {
        // The changelog was recreated or the broker lost data.
        return Some("ahead_of_changelog");
    }
    if at + 1 < low {
        // Records this copy never saw (tombstones among them) are gone.
        return Some("older_than_changelog");
    }
    if saved_at_ms.is_some_and(|t| now_ms - t > changelog::TOMBSTONE_RETENTION_MS) {
        // Deletes after its marker may have been cleaned out of the log.
        return Some("older_than_retention");
    }
    None
}

/// Why a local copy cannot be trusted, if it cannot.
fn check_local(
    shared: &Shared,
    partition: i32,
    local: &TaskMeta,
    saved_at_ms: Option<i64>,
    watermarks: (i64, i64),
) -> Result<Option<&'static str>, RuntimeError> {
    let at = local.changelog_offset;
    if at < 0 {
        return Ok(None);
    }
    if let Some(reason) = stale_reason(at, saved_at_ms, super::now_ms(), watermarks) {
        return Ok(Some(reason));
    }
    let topic = &shared.changelog_topic;
    let found = changelog::read_range(&shared.restore_consumer, topic, partition, at, at)?;
    let lineage = |r: &changelog::ChangelogRecord| -> Option<u64> {
        let value = r.value.as_deref().unwrap_or_default();
        match RecordKind::of(&r.key) {
            RecordKind::Claim => serde_json::from_slice::<Claim>(value)
                .ok()
                .map(|c| c.progress.lineage),
            RecordKind::Commit | RecordKind::LegacyMarker => {
                serde_json::from_slice::<Marker>(value)
                    .ok()
                    .map(|m| m.lineage)
            }
            RecordKind::State => None,
        }
    };
    Ok(match found.first() {
        Some(r)
            if r.offset == at && r.epoch == local.epoch && lineage(r) == Some(local.lineage) =>
        {
            None
        }
        // Not our marker (another incarnation of the changelog), or
        // compacted away by a later marker of our epoch we never committed.
        _ => Some("diverged"),
    })
}

/// Produce one record to the task's changelog partition; its offset. Waits
/// out a broker that is away (`produce_acked`); a copy of a failed round
/// that landed anyway is someone else's write to the claim check, which
/// then catches up and claims again.
fn produce_marker(
    shared: &Shared,
    partition: i32,
    key: &[u8],
    value: &[u8],
    epoch: u32,
) -> Result<i64, RuntimeError> {
    let topic = shared.changelog_topic.as_str();
    let acks = produce_acked(
        shared,
        "marker",
        &[Outgoing {
            topic,
            partition: Some(partition),
            key: Some(key),
            payload: Some(value),
            headers: OutHeaders::Epoch(epoch),
        }],
    )?;
    acks.offsets
        .first()
        .map(|d| d.1)
        .ok_or_else(|| RuntimeError::Produce {
            topic: topic.to_string(),
            error: rdkafka::error::KafkaError::Canceled,
        })
}

/// Whether anyone else wrote to the partition in `log_end..=last`, given
/// the offsets of our own records there.
pub(super) fn check_writes(
    shared: &Shared,
    partition: i32,
    epoch: u32,
    log_end: i64,
    mine: &[i64],
    last: i64,
) -> Result<Foreign, RuntimeError> {
    let gaps = changelog::gaps(log_end, last, mine);
    if gaps.is_empty() {
        return Ok(Foreign::None);
    }
    let foreign: Vec<changelog::ChangelogRecord> = changelog::read_range(
        &shared.restore_consumer,
        &shared.changelog_topic,
        partition,
        log_end,
        last,
    )?
    .into_iter()
    .filter(|r| gaps.binary_search(&r.offset).is_ok())
    .collect();
    Ok(changelog::classify_foreign(epoch, &foreign))
}

/// Write the current value of each of `dirty` again, then a commit marker,
/// and check nobody interleaved; repeat for what a zombie wrote meanwhile.
/// Advances `meta.changelog_offset` and `log_end`; the caller commits meta.
fn repair(
    shared: &Shared,
    partition: i32,
    store: &TaskStore,
    meta: &mut TaskMeta,
    log_end: &mut i64,
    mut dirty: Vec<Vec<u8>>,
) -> Result<(), RuntimeError> {
    let stage = shared.spec.name;
    let topic = shared.changelog_topic.as_str();
    for _ in 0..REPAIR_ROUNDS {
        if dirty.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            stage,
            partition,
            keys = dirty.len(),
            "rewriting changelog keys whose latest record is not committed"
        );
        metrics::CHANGELOG_REPAIRS
            .with_label_values(&[stage])
            .inc_by(dirty.len() as u64);
        let values = dirty
            .iter()
            .map(|key| store.get(key))
            .collect::<Result<Vec<_>, _>>()?;
        let records: Vec<Outgoing<'_>> = dirty
            .iter()
            .zip(&values)
            .map(|(key, value)| Outgoing {
                topic,
                partition: Some(partition),
                key: Some(key.as_slice()),
                payload: value.as_deref(),
                headers: OutHeaders::Epoch(meta.epoch),
            })
            .collect();
        let mut mine: Vec<i64> = produce_round(&shared.producer()?, &records)?
            .into_iter()
            .map(|d| d.1)
            .collect();
        let marker = to_json(&Marker::commit(meta))?;
        let at = produce_marker(
            shared,
            partition,
            &commit_key(meta.epoch),
            &marker,
            meta.epoch,
        )?;
        mine.push(at);
        match check_writes(shared, partition, meta.epoch, *log_end, &mine, at)? {
            Foreign::Fenced { epoch } => {
                return Err(RuntimeError::Fenced {
                    stage,
                    partition,
                    epoch: meta.epoch,
                    by: epoch,
                })
            }
            Foreign::None => dirty.clear(),
            Foreign::Zombie { dirty: more } => dirty = more,
        }
        meta.changelog_offset = at;
        *log_end = at + 1;
    }
    Err(RuntimeError::RepairGaveUp {
        topic: topic.to_string(),
        partition,
    })
}

/// Handle foreign records found after a committed batch or while idle.
pub(super) fn handle_foreign(
    shared: &Shared,
    task: &mut Task,
    foreign: Foreign,
) -> Result<(), RuntimeError> {
    match foreign {
        Foreign::None => Ok(()),
        Foreign::Fenced { epoch } => {
            metrics::FENCED.with_label_values(&[shared.spec.name]).inc();
            Err(RuntimeError::Fenced {
                stage: shared.spec.name,
                partition: task.partition,
                epoch: task.meta.epoch,
                by: epoch,
            })
        }
        Foreign::Zombie { dirty } => {
            let mut meta = task.meta.clone();
            repair(
                shared,
                task.partition,
                &task.store,
                &mut meta,
                &mut task.log_end,
                dirty,
            )?;
            task.store.commit(&Changes::default(), &meta)?;
            task.meta = meta;
            Ok(())
        }
    }
}

/// How long an idle check waits for the broker before it tries again at
/// the next check: the stage thread is not held while a broker is away.
const IDLE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// An idle task's check: has anyone written to its changelog partition?
/// A broker that cannot answer now is asked again at the next check (the
/// stage is not ready meanwhile); only what is found (a newer owner, a
/// zombie's writes) is acted on. `false`: the broker did not answer.
pub(super) fn check_idle(shared: &Shared, task: &mut Task) -> Result<bool, RuntimeError> {
    let stage = shared.spec.name;
    let partition = task.partition;
    let listed = changelog::watermarks_now(
        &shared.restore_consumer,
        &shared.changelog_topic,
        partition,
        IDLE_CHECK_TIMEOUT,
    );
    let high = match listed {
        Ok((_, high)) => high,
        Err(error) => {
            tracing::warn!(stage, partition, %error, "broker does not answer the idle check; not ready until it does");
            metrics::BROKER_RETRIES
                .with_label_values(&[stage, "idle_check"])
                .inc();
            return Ok(false);
        }
    };
    if high <= task.log_end {
        return Ok(true);
    }
    match check_writes(
        shared,
        partition,
        task.meta.epoch,
        task.log_end,
        &[],
        high - 1,
    ) {
        Ok(foreign) => {
            // Everything up to `high` is now known; a repair goes after it.
            task.log_end = high;
            handle_foreign(shared, task, foreign)?;
        }
        Err(e) => {
            tracing::debug!(stage, partition, error = %e, "changelog ownership check skipped");
        }
    }
    Ok(true)
}

/// How often an idle task looks for foreign writes in its changelog.
pub(super) const OWNERSHIP_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Look for other writers in every owned changelog partition (see
/// the module docs): a newer owner stops the stage, a zombie's writes are
/// repaired.
pub(super) fn check_ownership(shared: &Shared) -> Result<(), RuntimeError> {
    let mut tasks = shared.tasks.lock().map_err(|_| RuntimeError::Poisoned)?;
    if tasks.is_empty() {
        // Nothing asked, nothing learned about the broker.
        return Ok(());
    }
    let mut answered = true;
    for task in tasks.values_mut() {
        // One unanswered check is enough: the others wait for the next.
        if !check_idle(shared, task)? {
            answered = false;
            break;
        }
    }
    drop(tasks);
    shared.broker_answers(answered);
    Ok(())
}

fn wipe(path: &Path) -> Result<(), RuntimeError> {
    std::fs::remove_dir_all(path)
        .and_then(|()| std::fs::create_dir_all(path))
        .map_err(|error| RuntimeError::StateDir {
            path: path.display().to_string(),
            error,
        })
}

/// Open a task's store, check it against the changelog, catch it up, claim
/// a new epoch so older owners are fenced, and repair what needs it.
pub(super) fn open_task(shared: &Shared, partition: i32) -> Result<Task, RuntimeError> {
    let stage = shared.spec.name;
    let path = shared.state_dir.join(stage).join(partition.to_string());
    std::fs::create_dir_all(&path).map_err(|error| RuntimeError::StateDir {
        path: path.display().to_string(),
        error,
    })?;
    let topic = shared.changelog_topic.as_str();
    let consumer = &shared.restore_consumer;
    let (low, high) =
        changelog::watermarks_until(consumer, topic, partition, Some(&shared.shutdown))?;
    let mut store = TaskStore::open(&path)?;
    let mut local = store.meta()?;
    let saved_at = store.saved_at_ms()?;
    if let Some(reason) = check_local(shared, partition, &local, saved_at, (low, high))? {
        tracing::error!(
            stage,
            partition,
            reason,
            local_changelog_offset = local.changelog_offset,
            local_epoch = local.epoch,
            changelog_low = low,
            changelog_high = high,
            "local state does not match the changelog; discarding it and restoring from the changelog"
        );
        metrics::STATE_RESETS
            .with_label_values(&[stage, reason])
            .inc();
        drop(store);
        wipe(&path)?;
        store = TaskStore::open(&path)?;
        local = TaskMeta::default();
    }
    let started = Instant::now();
    let mut restorer = Restorer::new(local.clone()).deriving_timers(shared.spec.timers_from_state);
    let mut from = (local.changelog_offset + 1).max(low);
    let mut end = high;
    let mut claimed = None;
    for _ in 0..CLAIM_ATTEMPTS {
        // Catch up until the end stands still, so the claim follows the
        // read within one round-trip (a busy old owner otherwise voids
        // every claim that follows a long replay).
        for round in 1..=CATCH_UP_ROUNDS {
            changelog::replay(
                consumer,
                &mut store,
                &mut restorer,
                topic,
                partition,
                from,
                end - 1,
            )?;
            from = from.max(end);
            if round == CATCH_UP_ROUNDS {
                break; // claim at what was read; a void claim retries
            }
            let now =
                changelog::watermarks_until(consumer, topic, partition, Some(&shared.shutdown))?.1;
            if now <= end {
                break;
            }
            end = now;
        }
        let epoch = restorer.max_epoch() + 1;
        let mut meta = restorer.meta.clone();
        if meta.lineage == 0 {
            // The first claim of this changelog: a new incarnation.
            meta.lineage = new_lineage();
        }
        let claim = to_json(&Claim::new(end, &meta))?;
        let key = claim_key(epoch);
        let at = produce_marker(shared, partition, &key, &claim, epoch)?;
        if at == end {
            let before = restorer.meta.clone();
            let committed = restorer
                .apply(at, epoch, &key, Some(claim.as_slice()))
                .map_err(|e| changelog::RestoreError::BadMarker {
                    topic: topic.to_string(),
                    partition,
                    offset: at,
                    detail: e.0,
                })?;
            claimed = Some((committed.unwrap_or_default(), before));
            break;
        }
        // Someone wrote between our read and our claim: the claim is void.
        // Read up to it (applying what was committed there) and try again.
        tracing::info!(
            stage,
            partition,
            epoch,
            at,
            end,
            "claim voided by a concurrent write; retrying"
        );
        changelog::replay(
            consumer,
            &mut store,
            &mut restorer,
            topic,
            partition,
            end,
            at,
        )?;
        from = at + 1;
        end = changelog::watermarks_until(consumer, topic, partition, Some(&shared.shutdown))?
            .1
            .max(from);
    }
    let Some((committed, before)) = claimed else {
        return Err(RuntimeError::ClaimContended { stage, partition });
    };
    let mut meta = restorer.meta.clone();
    let mut log_end = meta.changelog_offset + 1;
    // The claim is committed locally only after the repair, so a crash in
    // between repeats the restore and finds the same dirty keys.
    store.commit(&committed, &before)?;
    repair(
        shared,
        partition,
        &store,
        &mut meta,
        &mut log_end,
        restorer.dirty(),
    )?;
    store.commit(&Changes::default(), &meta)?;
    metrics::RESTORES.with_label_values(&[stage]).inc();
    metrics::RESTORED_RECORDS
        .with_label_values(&[stage])
        .inc_by(restorer.records_read);
    tracing::info!(
        stage,
        partition,
        epoch = meta.epoch,
        lineage = format!("{:016x}", meta.lineage),
        input_offset = meta.input_offset,
        changelog_records = restorer.records_read,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "task restored"
    );
    Ok(Task {
        partition,
        origin: format!("{stage}:{partition}"),
        store,
        meta,
        log_end,
        operator: (shared.spec.operator)(partition),
        last_tick: Instant::now(),
        timer_floor: crate::operator::TIMER_PREFIX.to_vec(),
    })
}

/// Where a task's input starts fetching, checked against the input's end:
/// an offset past it means the input was recreated or the broker lost
/// data. That is said loudly and the input is read from its beginning,
/// never skipped. Otherwise [`INPUT_REREAD`] records before the position.
pub(super) fn input_start(shared: &Shared, task: &mut Task) -> Result<Offset, RuntimeError> {
    if task.meta.input_offset < 0 {
        return Ok(Offset::Beginning);
    }
    let (_, high) = changelog::watermarks_until(
        &shared.restore_consumer,
        &shared.spec.input_topic,
        task.partition,
        Some(&shared.shutdown),
    )?;
    // A listed end below the committed offset is checked with a fetch
    // before it is believed (see `holds_offset_before`).
    if task.meta.input_offset > high
        && !changelog::holds_offset_before(
            &shared.restore_consumer,
            &shared.spec.input_topic,
            task.partition,
            task.meta.input_offset,
        )?
    {
        tracing::error!(
            stage = shared.spec.name,
            partition = task.partition,
            committed_offset = task.meta.input_offset,
            input_end = high,
            "input partition ends before the committed offset (recreated topic or lost broker data); reading it from the beginning"
        );
        metrics::STATE_RESETS
            .with_label_values(&[shared.spec.name, "input_ahead"])
            .inc();
        task.meta.input_offset = -1;
        return Ok(Offset::Beginning);
    }
    // From earlier than the position: see `INPUT_REREAD`.
    Ok(Offset::Offset(
        task.meta.input_offset.saturating_sub(INPUT_REREAD).max(0),
    ))
}

/// How many records before its position a task starts fetching its input
/// (the ones below the position are skipped, as records fetched before a
/// seek always were). tansu 0.6 answers a fetch that starts inside a
/// stored record batch from the *next* batch, or with nothing when it is
/// the newest: a stage restarted in the middle of one (a round ends
/// anywhere; `deliver` commits every 1,000 records) lost the rest of it,
/// silently (22 to 1,062 audience changes in one tester's runs; the e2e
/// test `a_stage_restarted_inside_a_record_batch_reads_the_rest_of_it`).
/// Starting this far back lands at or before that batch's start: a batch
/// never holds more records than a round (20,000 at most, usually far
/// fewer: librdkafka's batches are at most 1 MB). On Kafka the cost is a
/// re-read of at most this many records per partition and assignment.
pub(super) const INPUT_REREAD: i64 = 20_000;

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 24 * 3600 * 1000;

    #[test]
    fn a_local_copy_is_distrusted_when_the_log_cannot_vouch_for_it() {
        let now = 100 * DAY;
        let fresh = Some(now - 1000);
        assert_eq!(stale_reason(-1, None, now, (0, 0)), None, "no local copy");
        assert_eq!(stale_reason(9, fresh, now, (0, 20)), None);
        assert_eq!(
            stale_reason(9, fresh, now, (0, 0)),
            Some("ahead_of_changelog"),
            "a broker that lost its data, a recreated changelog"
        );
        assert_eq!(
            stale_reason(25, fresh, now, (0, 20)),
            Some("ahead_of_changelog")
        );
        assert_eq!(
            stale_reason(9, fresh, now, (15, 20)),
            Some("older_than_changelog")
        );
        assert_eq!(
            stale_reason(9, Some(now - 2 * DAY), now, (0, 20)),
            Some("older_than_retention"),
            "tombstones after its marker may be gone"
        );
        assert_eq!(
            stale_reason(9, None, now, (0, 20)),
            None,
            "copies from before the age was kept are judged by offsets"
        );
    }
}
