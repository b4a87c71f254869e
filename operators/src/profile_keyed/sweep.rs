//! Every profile evaluated again after the stage's config changed.
//!
//! An input evaluates only its own profile. Without this, a new audience
//! would hold none of the profiles that already qualify, a narrowed one
//! would keep members that no longer do, and a trait whose definition
//! changed would keep its old value downstream, each until the profile's
//! next event (never, for an inactive one). A task keeps, under its
//! stage's key, the fingerprint of the config its profiles were last
//! evaluated under; when the running config's differs, the task works
//! through its profiles in key order, [`SWEEP_STEP`] per tick, each
//! evaluated as a due timer evaluates it (at stream time, the tick its
//! cause). The progress is state, committed with what it caused: a crash or
//! a move to another instance resumes where the last committed step ended,
//! and a replay of the same ticks takes the same steps. A config changed
//! again mid-way starts over.

use cdp_pipeline::operator::{Context, OperatorError};
use serde::{Deserialize, Serialize};

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

/// A stage's sweep: where it keeps its progress (a state key outside
/// `profile/`, `redirect/`, `wait/`), the fingerprint of its running
/// config, and how many profiles a tick takes.
pub(crate) struct Sweep {
    pub(crate) key: &'static [u8],
    pub(crate) fingerprint: u64,
    pub(crate) step: usize,
}

/// One step of the sweep, if one is due: called on every tick.
/// `evaluate` evaluates the profile with this id as a due timer would.
pub(crate) fn step(
    sweep: &Sweep,
    ctx: &mut Context<'_>,
    mut evaluate: impl FnMut(&mut Context<'_>, &[u8]) -> Result<(), OperatorError>,
) -> Result<(), OperatorError> {
    let current = sweep.fingerprint;
    let stored: Option<Progress> = ctx.get_json(sweep.key)?;
    let after = match stored {
        Some(p) if p.fingerprint == current && p.done => return Ok(()),
        Some(p) if p.fingerprint == current => p.after,
        stale => {
            if stale.is_some() {
                tracing::info!(
                    partition = ctx.partition(),
                    key = %String::from_utf8_lossy(sweep.key),
                    step = sweep.step,
                    "the config changed: evaluating every profile of this task again, `step` a tick"
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
    while evaluated < sweep.step {
        let Some((key, _)) = ctx.first_in_range(&from, PROFILES_END)? else {
            ctx.put_json(
                sweep.key,
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
        evaluate(ctx, id)?;
        last = Some(String::from_utf8_lossy(id).into_owned());
        evaluated += 1;
    }
    ctx.put_json(
        sweep.key,
        &Progress {
            fingerprint: current,
            after: last,
            done: false,
        },
    )?;
    Ok(())
}
