//! The changelog protocol: how task state survives a lost disk, a move to
//! another instance, log compaction and zombies.
//!
//! A changelog partition holds three kinds of records, each with the
//! writer's epoch in a `cdp-epoch` header:
//! - **state records**, keyed by the state key (a value, or a tombstone for
//!   a delete);
//! - **commit markers**, keyed `\0cdp/commit/<epoch>`: written after every
//!   output and state record of a batch is acknowledged; they carry the
//!   task's progress. One key per epoch, so compaction keeps each epoch's
//!   last marker;
//! - **claims**, keyed `\0cdp/claim/<epoch>`: written by a task taking over
//!   a partition. A claim carries the claimer's whole progress, the offset
//!   of the last marker its state includes, and the offset at which the
//!   claimer expects the claim to land (the changelog end it restored to).
//!   A claim anywhere else is void: someone wrote in between, so the
//!   claimer's view was stale and it must claim again. The log is the
//!   arbiter: at most one valid claim per epoch, and each valid claim
//!   starts exactly where its claimer's view ended. Claim keys are unique,
//!   so compaction never removes a claim.
//!
//! Restoring applies, in log order:
//! - a record of an epoch older than the newest valid claim seen: ignored
//!   (a zombie's write after it was fenced);
//! - a valid claim: the pending records at or before its `last_marker` were
//!   committed (their own markers may have been compacted away), the rest
//!   are an uncommitted tail and are dropped; progress comes from the claim;
//! - a commit marker: every pending record of its epoch is committed.
//!
//! **Compaction.** Compaction keeps the last record per key. It can only
//! change what a restore computes where a record that is *not* applied
//! (an uncommitted tail, a zombie's write) is the last one of its key: it
//! then hides the committed value before it. So every such record is
//! *repaired*: the task that finds it (a claimer while restoring, an owner
//! that sees foreign records in its partition) writes the key's committed
//! value again, followed by a marker. A changelog whose dropped records are
//! repaired restores the same state however it is compacted; the repair
//! happens within seconds, well inside `min.compaction.lag.ms`.

mod read;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::envelope::Position;
use crate::operator::{is_timer_key, timer_key, TimersFromState};
use crate::store::{Changes, TaskMeta};

pub use read::{
    holds_offset_before, read_range, replay, watermarks, watermarks_now, watermarks_until,
    ChangelogRecord, RestoreError,
};

/// `delete.retention.ms` of changelog topics (`cdp topics create` sets it):
/// how long a tombstone outlives its cleaning. A local copy older than this
/// may have missed deletes that are no longer in the log.
pub const TOMBSTONE_RETENTION_MS: i64 = 24 * 3600 * 1000;

const COMMIT_PREFIX: &[u8] = b"\x00cdp/commit/";
const CLAIM_PREFIX: &[u8] = b"\x00cdp/claim/";
/// The single marker key of the first changelog format (commit markers and
/// claims alike). Still read, never written.
pub const LEGACY_MARKER_KEY: &[u8] = b"\x00cdp/marker";

/// Key of the commit markers of `epoch`.
pub fn commit_key(epoch: u32) -> Vec<u8> {
    let mut k = COMMIT_PREFIX.to_vec();
    k.extend_from_slice(format!("{epoch:010}").as_bytes());
    k
}

/// Key of the claim of `epoch`.
pub fn claim_key(epoch: u32) -> Vec<u8> {
    let mut k = CLAIM_PREFIX.to_vec();
    k.extend_from_slice(format!("{epoch:010}").as_bytes());
    k
}

/// What a changelog record is, by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    State,
    Commit,
    Claim,
    LegacyMarker,
}

impl RecordKind {
    pub fn of(key: &[u8]) -> Self {
        if key.starts_with(COMMIT_PREFIX) {
            RecordKind::Commit
        } else if key.starts_with(CLAIM_PREFIX) {
            RecordKind::Claim
        } else if key == LEGACY_MARKER_KEY {
            RecordKind::LegacyMarker
        } else {
            RecordKind::State
        }
    }
}

/// The value of a commit marker: the task's progress after the batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    /// Only in the first format, where claims shared the marker key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub claim: bool,
    #[serde(default)]
    pub input_offset: i64,
    #[serde(default)]
    pub stream_time: i64,
    #[serde(default)]
    pub dedupe: BTreeMap<String, Position>,
    #[serde(default)]
    pub lineage: u64,
}

impl Marker {
    pub fn commit(meta: &TaskMeta) -> Self {
        Marker {
            claim: false,
            input_offset: meta.input_offset,
            stream_time: meta.stream_time,
            dedupe: meta.dedupe.clone(),
            lineage: meta.lineage,
        }
    }
}

/// The value of a claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// The offset this claim must land at (the changelog end the claimer
    /// restored to); a claim at any other offset is void.
    pub at: i64,
    /// Offset of the last marker or claim whose state the claimer holds
    /// (-1: none). Pending records up to it were committed.
    pub last_marker: i64,
    /// The claimer's progress, which the new epoch starts from.
    pub progress: Marker,
}

impl Claim {
    pub fn new(at: i64, meta: &TaskMeta) -> Self {
        Claim {
            at,
            last_marker: meta.changelog_offset,
            progress: Marker::commit(meta),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MarkerDecodeError(pub String);

fn decode<T: serde::de::DeserializeOwned>(value: Option<&[u8]>) -> Result<T, MarkerDecodeError> {
    serde_json::from_slice(value.unwrap_or_default()).map_err(|e| MarkerDecodeError(e.to_string()))
}

/// Applies changelog records to a store under the rules in the module docs.
pub struct Restorer {
    pub meta: TaskMeta,
    max_epoch: u32,
    /// State records not yet proven committed: `(offset, key, value)`.
    pending: Vec<(i64, Vec<u8>, Option<Vec<u8>>)>,
    /// Keys whose latest record was not applied, with its offset.
    dropped: BTreeMap<Vec<u8>, i64>,
    pub records_read: u64,
    /// The stage's timers as its state implies them, when they are not
    /// logged.
    timers: Option<TimersFromState>,
}

impl Restorer {
    pub fn new(meta: TaskMeta) -> Self {
        let max_epoch = meta.epoch;
        Restorer {
            meta,
            max_epoch,
            pending: Vec::new(),
            dropped: BTreeMap::new(),
            records_read: 0,
            timers: None,
        }
    }

    /// Derive timers from the committed state records (a stage whose
    /// timers are not logged, see [`TimersFromState`]).
    pub fn deriving_timers(mut self, timers: Option<TimersFromState>) -> Self {
        self.timers = timers;
        self
    }

    /// `committed` with the timer of every entry it writes, when timers are
    /// derived. A delete leaves its timer in place: it fires and finds the
    /// entry gone, as a timer of a re-armed entry does.
    fn with_timers(&self, mut committed: Changes) -> Changes {
        let Some(timer_of) = self.timers else {
            return committed;
        };
        let timers: Vec<Vec<u8>> = committed
            .iter()
            // Only state records are ever committed; a timer a changelog
            // logged (before timers were derived) implies no other.
            .filter(|(key, _)| !is_timer_key(key))
            .filter_map(|(key, value)| {
                let at = timer_of(key, value.as_deref()?)?;
                Some(timer_key(at, key))
            })
            .collect();
        for timer in timers {
            committed.insert(timer, Some(Vec::new()));
        }
        committed
    }

    /// The highest epoch seen so far (local or in the changelog).
    pub fn max_epoch(&self) -> u32 {
        self.max_epoch
    }

    /// Keys whose latest record in the log is not applied (a dropped tail,
    /// a zombie's write, or a pending tail at the end): compaction could
    /// let that record hide the committed value, so the next writer must
    /// write the committed value again.
    pub fn dirty(&self) -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> = self.dropped.keys().cloned().collect();
        keys.extend(self.pending.iter().map(|(_, k, _)| k.clone()));
        keys.sort();
        keys.dedup();
        keys
    }

    fn drop_record(&mut self, offset: i64, key: Vec<u8>) {
        let at = self.dropped.entry(key).or_insert(offset);
        *at = (*at).max(offset);
    }

    /// Move pending records at or before `through` into the returned
    /// changes; drop the rest.
    fn settle_pending(&mut self, through: i64) -> Changes {
        let mut changes = Changes::default();
        for (offset, key, value) in std::mem::take(&mut self.pending) {
            if offset <= through {
                if self.dropped.get(&key).is_some_and(|d| *d < offset) {
                    self.dropped.remove(&key);
                }
                changes.insert(key, value);
            } else {
                self.drop_record(offset, key);
            }
        }
        changes
    }

    /// Apply one changelog record. When it proves a batch committed (a
    /// marker or a valid claim), returns that batch's changes; write them
    /// with `self.meta`.
    pub fn apply(
        &mut self,
        offset: i64,
        epoch: u32,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<Option<Changes>, MarkerDecodeError> {
        self.records_read += 1;
        let kind = RecordKind::of(key);
        if kind == RecordKind::Claim {
            let claim: Claim = decode(value)?;
            if claim.at != offset || epoch <= self.max_epoch {
                return Ok(None); // void: its claimer saw a stale log
            }
            let committed = self.settle_pending(claim.last_marker);
            self.max_epoch = epoch;
            self.set_progress(claim.progress, epoch, offset);
            return Ok(Some(self.with_timers(committed)));
        }
        if epoch < self.max_epoch {
            // A zombie's write after a newer owner claimed.
            if kind == RecordKind::State {
                self.drop_record(offset, key.to_vec());
            }
            return Ok(None);
        }
        if epoch > self.max_epoch {
            // An epoch no valid claim opened: the first format, whose claims
            // dropped the previous owner's uncommitted tail.
            self.max_epoch = epoch;
            self.settle_pending(i64::MIN);
        }
        match kind {
            RecordKind::State => {
                self.pending
                    .push((offset, key.to_vec(), value.map(<[u8]>::to_vec)));
                Ok(None)
            }
            RecordKind::Commit | RecordKind::LegacyMarker => {
                let marker: Marker = decode(value)?;
                let committed = self.settle_pending(i64::MAX);
                if marker.claim {
                    // First format: a claim carries no progress of its own.
                    self.meta.epoch = epoch;
                    self.meta.changelog_offset = offset;
                } else {
                    self.set_progress(marker, epoch, offset);
                }
                Ok(Some(self.with_timers(committed)))
            }
            RecordKind::Claim => Ok(None),
        }
    }

    fn set_progress(&mut self, m: Marker, epoch: u32, offset: i64) {
        self.meta = TaskMeta {
            input_offset: m.input_offset,
            changelog_offset: offset,
            epoch,
            stream_time: m.stream_time,
            dedupe: m.dedupe,
            lineage: m.lineage,
            // Not in markers: a restore keeps what the local copy had (0 on
            // a fresh disk, which only widens which old-owner ticks count).
            tick_epoch: self.meta.tick_epoch,
        };
    }
}

/// What records another writer put into a task's changelog partition mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Foreign {
    /// Nothing foreign.
    None,
    /// Writes of an older epoch (a zombie) or stray copies of this task's
    /// own (a produce round whose acknowledgement was lost, then retried):
    /// these keys are written again so compaction cannot let them win.
    Zombie { dirty: Vec<Vec<u8>> },
    /// A record of a newer epoch: another owner claimed the partition. This
    /// task is the zombie and must stop.
    Fenced { epoch: u32 },
}

/// Classify records found in a task's changelog partition at offsets the
/// task did not get acknowledgements for. Records of its own epoch are its
/// own: a valid claim is the only way to an epoch, and a claim of a taken
/// epoch is void.
pub fn classify_foreign(my_epoch: u32, records: &[ChangelogRecord]) -> Foreign {
    let void_claim = |r: &ChangelogRecord| {
        RecordKind::of(&r.key) == RecordKind::Claim
            && !matches!(decode::<Claim>(r.value.as_deref()), Ok(c) if c.at == r.offset)
    };
    if let Some(r) = records
        .iter()
        .find(|r| r.epoch > my_epoch && !void_claim(r))
    {
        return Foreign::Fenced { epoch: r.epoch };
    }
    let mut dirty: Vec<Vec<u8>> = records
        .iter()
        .filter(|r| RecordKind::of(&r.key) == RecordKind::State)
        .map(|r| r.key.clone())
        .collect();
    if dirty.is_empty() && records.is_empty() {
        return Foreign::None;
    }
    dirty.sort();
    dirty.dedup();
    Foreign::Zombie { dirty }
}

/// Offsets in `from..=last` that are not in `mine` (sorted or not).
pub fn gaps(from: i64, last: i64, mine: &[i64]) -> Vec<i64> {
    let mut mine = mine.to_vec();
    mine.sort_unstable();
    (from..=last)
        .filter(|o| mine.binary_search(o).is_err())
        .collect()
}
