//! Window time buckets.

/// Buckets per window: a windowed trait keeps at most this many (+1)
/// bucket states, whatever the traffic.
pub const BUCKETS_PER_WINDOW: i64 = 30;

/// Width of a window's time buckets: at most 1/30 of the window (1 ms at
/// least). An event at `t` falls in the bucket starting at `t - t mod
/// width`, and a bucket counts at `now` while its last instant is inside
/// the window. So a windowed value counts every event of the window and,
/// at most, events up to one bucket width older: a `30d` counter may still
/// count an event 30 days and a few hours old, never miss a recent one.
/// Windows whose length is a multiple of 30 ms with events on bucket
/// boundaries, and windows under 60 ms, are exact.
pub fn bucket_width(window: i64) -> i64 {
    (window / BUCKETS_PER_WINDOW).max(1)
}

pub(super) fn bucket_start(t: i64, width: i64) -> i64 {
    t.div_euclid(width).saturating_mul(width)
}

/// Whether the bucket starting at `start` still counts at `now`.
pub(super) fn bucket_counts(start: i64, width: i64, window: i64, now: i64) -> bool {
    start.saturating_add(width - 1) > now.saturating_sub(window)
}
