//! How many of a task's profiles are in each audience: kept in the task's
//! state (one key, committed with the batch that changed it, so it moves
//! with the task and survives restarts) and reported as deltas to the
//! process's gauge, which a dropped (revoked) task takes back out.

use std::collections::BTreeMap;
use std::sync::Arc;

use cdp_pipeline::operator::Context;
use cdp_pipeline::store::StoreError;

use super::AudienceSet;
use crate::messages::AudienceAction;

/// The state key of the counts: outside `profile/`, `redirect/`, `wait/`.
pub(super) const SIZES_KEY: &[u8] = b"audience-sizes";

/// Told `(audience, delta)` whenever a task's count moves, and the
/// opposite of everything it was told when the task goes away.
pub type SizeReporter = Arc<dyn Fn(&str, i64) + Send + Sync>;

pub(super) struct Sizes {
    reporter: Option<SizeReporter>,
    /// The batch's counts: read from the store at its first change (or
    /// its end), never kept past it, so a store that went back to an
    /// earlier copy (a restore) is followed, not overwritten.
    counts: Option<BTreeMap<String, i64>>,
    changed: bool,
    /// What the reporter holds for this task.
    reported: BTreeMap<String, i64>,
    /// The reporter holds the stored counts: a batch that changed none
    /// reads nothing.
    synced: bool,
}

impl Sizes {
    pub(super) fn new(reporter: Option<SizeReporter>) -> Self {
        Sizes {
            reporter,
            counts: None,
            changed: false,
            reported: BTreeMap::new(),
            synced: false,
        }
    }

    fn counts(
        &mut self,
        ctx: &Context<'_>,
        set: &AudienceSet,
    ) -> Result<&mut BTreeMap<String, i64>, StoreError> {
        if self.counts.is_none() {
            let mut stored: BTreeMap<String, i64> = ctx.get_json(SIZES_KEY)?.unwrap_or_default();
            // An audience no longer configured is counted no more.
            let before = stored.len();
            stored.retain(|name, _| set.audience(name).is_some());
            self.changed |= stored.len() != before;
            self.counts = Some(stored);
        }
        Ok(self.counts.get_or_insert_with(BTreeMap::new))
    }

    /// A change this task emitted.
    pub(super) fn note(
        &mut self,
        ctx: &Context<'_>,
        set: &AudienceSet,
        audience: &str,
        action: AudienceAction,
    ) -> Result<(), StoreError> {
        let delta = match action {
            AudienceAction::Entered => 1,
            AudienceAction::Exited => -1,
        };
        *self
            .counts(ctx, set)?
            .entry(audience.to_owned())
            .or_default() += delta;
        self.changed = true;
        Ok(())
    }

    /// At the end of a batch: write the counts if they moved, and bring the
    /// reporter up to date (also a task's first batch, often a tick, with
    /// the counts an earlier owner left).
    pub(super) fn end_batch(
        &mut self,
        ctx: &mut Context<'_>,
        set: &AudienceSet,
    ) -> Result<(), StoreError> {
        if self.counts.is_none() && (self.synced || self.reporter.is_none()) {
            return Ok(());
        }
        self.counts(ctx, set)?;
        let Some(counts) = self.counts.take() else {
            return Ok(());
        };
        if std::mem::take(&mut self.changed) {
            ctx.put_json(SIZES_KEY, &counts)?;
        }
        if let Some(report) = &self.reporter {
            for (name, &n) in &counts {
                let told = self.reported.entry(name.clone()).or_default();
                if *told != n {
                    report(name, n - *told);
                    *told = n;
                }
            }
            self.reported.retain(|name, told| {
                let kept = counts.contains_key(name);
                if !kept && *told != 0 {
                    report(name, -*told);
                }
                kept
            });
            self.synced = true;
        }
        Ok(())
    }
}

impl Drop for Sizes {
    fn drop(&mut self) {
        if let Some(report) = &self.reporter {
            for (name, &told) in &self.reported {
                if told != 0 {
                    report(name, -told);
                }
            }
        }
    }
}
