//! The events one filter matched for a profile, in time buckets.

use serde::{Deserialize, Serialize};

use super::compile::{EventFilter, Retention};
use super::MAX_SEQUENCE_TIMES;

/// The events one filter matched for a profile.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct FilterHistory {
    /// Every matching event, all time.
    pub(super) count: u64,
    /// Event times, sorted, as far back as the filter's retention needs
    /// (sequences; windows in states written before buckets).
    #[serde(default)]
    pub(super) times: Vec<i64>,
    /// For windows: `(bucket start, events)`, sorted, at most 31 per
    /// window: what keeps a busy profile's state bounded.
    #[serde(default)]
    pub(super) buckets: Vec<(i64, u64)>,
}

/// Whether the bucket starting at `start` still counts at `now`: while its
/// last instant is inside the window `(now - w, ∞)`.
fn bucket_counts(start: i64, width: i64, w: i64, now: i64) -> bool {
    start.saturating_add(width - 1) > now.saturating_sub(w)
}

impl FilterHistory {
    pub(super) fn record(&mut self, time: i64, filter: &EventFilter, clock: i64) {
        self.count = self.count.saturating_add(1);
        match (filter.retention, filter.width) {
            (Retention::CountOnly, _) => {}
            (Retention::Window(w), Some(width)) => {
                let start = time.div_euclid(width).saturating_mul(width);
                if bucket_counts(start, width, w, clock) {
                    let i = self.buckets.partition_point(|b| b.0 < start);
                    match self.buckets.get_mut(i) {
                        Some(b) if b.0 == start => b.1 = b.1.saturating_add(1),
                        _ => self.buckets.insert(i, (start, 1)),
                    }
                }
            }
            (Retention::Window(_), None) | (Retention::All, _) => {
                let i = self.times.partition_point(|t| *t <= time);
                self.times.insert(i, time);
            }
        }
    }

    pub(super) fn prune(&mut self, filter: &EventFilter, clock: i64) {
        match filter.retention {
            Retention::CountOnly => {
                self.times.clear();
                self.buckets.clear();
            }
            Retention::Window(w) => {
                if let Some(width) = filter.width {
                    // Times kept before buckets existed move into buckets.
                    for t in std::mem::take(&mut self.times) {
                        let start = t.div_euclid(width).saturating_mul(width);
                        let i = self.buckets.partition_point(|b| b.0 < start);
                        match self.buckets.get_mut(i) {
                            Some(b) if b.0 == start => b.1 = b.1.saturating_add(1),
                            _ => self.buckets.insert(i, (start, 1)),
                        }
                    }
                    self.buckets
                        .retain(|(start, _)| bucket_counts(*start, width, w, clock));
                }
                let horizon = clock.saturating_sub(w);
                let cut = self.times.partition_point(|t| *t <= horizon);
                self.times.drain(..cut);
            }
            Retention::All => {
                let excess = self.times.len().saturating_sub(MAX_SEQUENCE_TIMES);
                self.times.drain(..excess);
            }
        }
    }

    /// Events with time in the window `(now - w, ∞)`; bucketed events by
    /// their bucket's last instant.
    pub(super) fn count_within(&self, now: i64, w: i64, width: Option<i64>) -> u64 {
        let horizon = now.saturating_sub(w);
        let exact = (self.times.len() - self.times.partition_point(|t| *t <= horizon)) as u64;
        let bucketed: u64 = width.map_or(0, |width| {
            self.buckets
                .iter()
                .filter(|(start, _)| bucket_counts(*start, width, w, now))
                .map(|(_, n)| *n)
                .sum()
        });
        exact.saturating_add(bucketed)
    }

    /// When the oldest event still counted in a window of `w` at `now`
    /// stops counting.
    pub(super) fn next_expiry(&self, now: i64, w: i64, width: Option<i64>) -> Option<i64> {
        let horizon = now.saturating_sub(w);
        let exact = self
            .times
            .get(self.times.partition_point(|t| *t <= horizon))
            .map(|t| t.saturating_add(w));
        let bucketed = width.and_then(|width| {
            self.buckets
                .iter()
                .find(|(start, _)| bucket_counts(*start, width, w, now))
                .map(|(start, _)| start.saturating_add(width - 1).saturating_add(w))
        });
        match (exact, bucketed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
