//! What a task believes of its input's headers.
//!
//! Stream time moves only by ticks, and a tick is believed only when the
//! task that owns the partition wrote it: it names this task as its origin
//! (`cdp-origin`), its epoch is not older than the last believed tick's nor
//! newer than the task's own (a newer one would be forged: no owner has
//! claimed it yet), and its time is not absurdly far ahead of the wall clock.
//! A forged or stray tick is dropped and counted, so one bad record cannot
//! push time (and every window and timer) forward.
//!
//! Topics that producers outside the pipeline write (`<p>.raw`) carry no
//! runtime headers of ours: every `cdp-*` header but `cdp-source` is
//! removed before the record is processed, so a re-injected dead letter's
//! `cdp-origin`/`cdp-pos` cannot make later records look like replays.
//!
//! Both rules are deterministic under replay: a tick believed the first time
//! is believed again (the task's epoch only grows, the wall clock only moves
//! on), which keeps the outputs of a replayed batch at the same positions.

use crate::envelope::{self, header_str, HeaderPair, EPOCH, ORIGIN, SOURCE, TICK};

/// How far ahead of the wall clock a tick may be (10 minutes): more than
/// any sane clock skew between instances, far less than any window.
pub const MAX_TICK_LEAD_MS: i64 = 10 * 60 * 1000;

/// What a record's tick headers amount to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickVerdict {
    /// No `cdp-tick` header: an ordinary record.
    NotATick,
    /// A tick from the owner: stream time may move to `time`.
    Accept { time: i64, epoch: u32 },
    /// A tick to ignore, with the reason.
    Reject(TickReject),
}

/// Why a tick was ignored: the label of `cdp_ticks_rejected_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickReject {
    Malformed,
    ForeignOrigin,
    FutureEpoch,
    StaleEpoch,
    TooFarAhead,
}

impl TickReject {
    /// Every reason, for series created at zero.
    pub const ALL: [TickReject; 5] = [
        TickReject::Malformed,
        TickReject::ForeignOrigin,
        TickReject::FutureEpoch,
        TickReject::StaleEpoch,
        TickReject::TooFarAhead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TickReject::Malformed => "malformed",
            TickReject::ForeignOrigin => "foreign_origin",
            TickReject::FutureEpoch => "future_epoch",
            TickReject::StaleEpoch => "stale_epoch",
            TickReject::TooFarAhead => "too_far_ahead",
        }
    }
}

/// Judge a record's tick headers for the task `origin` running under
/// `epoch`, whose last believed tick had `tick_epoch`.
pub fn judge_tick<H: HeaderPair>(
    headers: &[H],
    origin: &str,
    epoch: u32,
    tick_epoch: u32,
    processing_time_ms: i64,
) -> TickVerdict {
    let get = |name: &str| header_str(headers, name);
    let Some(raw) = get(TICK) else {
        return TickVerdict::NotATick;
    };
    let Ok(time) = raw.parse::<i64>() else {
        return TickVerdict::Reject(TickReject::Malformed);
    };
    if get(ORIGIN) != Some(origin) {
        return TickVerdict::Reject(TickReject::ForeignOrigin);
    }
    let Some(tick_epoch_of_record) = get(EPOCH).and_then(|e| e.parse::<u32>().ok()) else {
        return TickVerdict::Reject(TickReject::Malformed);
    };
    if tick_epoch_of_record > epoch {
        return TickVerdict::Reject(TickReject::FutureEpoch);
    }
    if tick_epoch_of_record < tick_epoch {
        return TickVerdict::Reject(TickReject::StaleEpoch);
    }
    if time > processing_time_ms.saturating_add(MAX_TICK_LEAD_MS) {
        return TickVerdict::Reject(TickReject::TooFarAhead);
    }
    TickVerdict::Accept {
        time,
        epoch: tick_epoch_of_record,
    }
}

/// The headers of a tick written by task `origin` under `epoch`.
pub fn tick_headers(origin: &str, epoch: u32, time_ms: i64) -> [(&'static str, String); 3] {
    [
        (TICK, time_ms.to_string()),
        (ORIGIN, origin.to_string()),
        (EPOCH, epoch.to_string()),
    ]
}

/// Drop every runtime header (`cdp-*`) but `cdp-source` from a record that
/// came from outside the pipeline.
pub fn strip_external<H: HeaderPair>(headers: &mut Vec<H>) {
    headers.retain(|h| {
        let k = h.name();
        !k.starts_with(envelope::RUNTIME_HEADER_PREFIX) || k == SOURCE
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(origin: &str, epoch: &str, time: i64) -> Vec<(String, Vec<u8>)> {
        vec![
            (TICK.to_string(), time.to_string().into_bytes()),
            (ORIGIN.to_string(), origin.as_bytes().to_vec()),
            (EPOCH.to_string(), epoch.as_bytes().to_vec()),
        ]
    }

    #[test]
    fn only_the_owners_ticks_within_the_clock_are_believed() {
        let now = 1_000_000;
        let judge = |h: &[(String, Vec<u8>)]| judge_tick(h, "validate:3", 4, 3, now);
        assert_eq!(
            judge(&tick("validate:3", "4", now)),
            TickVerdict::Accept {
                time: now,
                epoch: 4
            }
        );
        assert_eq!(
            judge(&tick("validate:3", "3", now)),
            TickVerdict::Accept {
                time: now,
                epoch: 3
            },
            "the previous owner's uncommitted tail replays the same"
        );
        assert_eq!(
            judge(&tick("validate:1", "4", now)),
            TickVerdict::Reject(TickReject::ForeignOrigin)
        );
        assert_eq!(
            judge(&tick("validate:3", "2", now)),
            TickVerdict::Reject(TickReject::StaleEpoch)
        );
        assert_eq!(
            judge(&tick("validate:3", "9", now)),
            TickVerdict::Reject(TickReject::FutureEpoch)
        );
        assert_eq!(
            judge(&tick("validate:3", "4", now + MAX_TICK_LEAD_MS + 1)),
            TickVerdict::Reject(TickReject::TooFarAhead)
        );
        let bare = vec![(TICK.to_string(), b"5".to_vec())];
        assert_eq!(judge(&bare), TickVerdict::Reject(TickReject::ForeignOrigin));
        assert_eq!(judge(&[]), TickVerdict::NotATick);
    }

    #[test]
    fn external_records_keep_only_their_source() {
        let mut headers: Vec<(String, Vec<u8>)> = [
            ("cdp-source", "web"),
            ("cdp-origin", "validate:0"),
            ("cdp-epoch", "7"),
            ("cdp-pos", "10:0"),
            ("cdp-dlq-reason", "spec_violation"),
            ("traceparent", "00-ab"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
        strip_external(&mut headers);
        let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, vec!["cdp-source", "traceparent"]);
    }
}
