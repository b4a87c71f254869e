//! Every profile re-evaluated after the audiences changed.
//!
//! An update evaluates only its own profile, so without this a new
//! audience would hold none of the profiles that already qualify, and a
//! narrowed one would keep members that no longer do, until each profile's
//! next event. A task keeps the fingerprint of the audiences its profiles
//! were last evaluated under; when the running config's differs, the task
//! works through its profiles in key order, [`SWEEP_STEP`] per tick, each
//! evaluated as a timer evaluates it (at stream time, the change's `cause`
//! the tick). The progress is state, committed with the changes it
//! caused: a crash or a move to another instance resumes where the last
//! committed step ended, and a replay of the same ticks takes the same
//! steps. A config changed again mid-way starts over.
//!
//! What a re-evaluation can see: trait values (every one the traits stage
//! reported is kept) and the history of event filters the audiences had
//! before. An event condition with a filter (event name and `where`) no
//! audience used before counts events from its first update on.

use cdp_pipeline::operator::{Context, Operator, OperatorError};
use serde::{Deserialize, Serialize};

use super::operator::AudiencesOperator;

/// The state key of the progress: outside `profile/`, `redirect/`, `wait/`.
pub(super) const SWEEP_KEY: &[u8] = b"audience-sweep";

/// Profiles re-evaluated per tick and task: at the default 1 s ticks, a
/// task of 1M profiles takes ~3 minutes, each tick's batch a few tens of
/// milliseconds more.
pub(crate) const SWEEP_STEP: usize = 5_000;

const PROFILES: &[u8] = b"profile/";
/// Just past every `profile/` key.
const PROFILES_END: &[u8] = b"profile0";

/// How far a task is with the audiences of `fingerprint`.
#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    fingerprint: u64,
    /// The last profile evaluated; `None` with `done` before the first.
    after: Option<String>,
    done: bool,
}

/// One step of the sweep, if one is due: called on every tick.
pub(super) fn step(
    operator: &mut AudiencesOperator,
    ctx: &mut Context<'_>,
) -> Result<(), OperatorError> {
    let current = operator.set().fingerprint;
    let stored: Option<Progress> = ctx.get_json(SWEEP_KEY)?;
    let after = match stored {
        Some(p) if p.fingerprint == current && p.done => return Ok(()),
        Some(p) if p.fingerprint == current => p.after,
        stale => {
            if stale.is_some() {
                tracing::info!(
                    partition = ctx.partition(),
                    step = operator.sweep_step(),
                    "the audiences changed: re-evaluating every profile of this task, `step` a tick"
                );
            }
            None
        }
    };
    let mut from = match &after {
        Some(id) => [PROFILES, id.as_bytes(), b"\0"].concat(),
        None => PROFILES.to_vec(),
    };
    let mut last = after;
    let mut evaluated = 0;
    while evaluated < operator.sweep_step() {
        let Some((key, _)) = ctx.first_in_range(&from, PROFILES_END)? else {
            ctx.put_json(
                SWEEP_KEY,
                &Progress {
                    fingerprint: current,
                    after: None,
                    done: true,
                },
            )?;
            return Ok(());
        };
        from = [key.as_slice(), b"\0"].concat();
        let id = &key[PROFILES.len()..];
        // The same evaluation a due timer makes (a waiting or merged-away
        // profile is left to its merge).
        operator.on_timer(id, ctx)?;
        last = Some(String::from_utf8_lossy(id).into_owned());
        evaluated += 1;
    }
    ctx.put_json(
        SWEEP_KEY,
        &Progress {
            fingerprint: current,
            after: last,
            done: false,
        },
    )?;
    Ok(())
}
