//! Merges applied before the event that caused them is evaluated.
//!
//! Identity writes a merge as `merged(from → into)` records (keyed by each
//! `from`, `announced`) and then the merging event (keyed by `into`) with
//! `merged_from` naming every `from`. A stage sees them on different
//! partitions: the `from` partition sends its state to `into` as a
//! `transfer` through the stage's own input topic, which may reach `into`
//! before or after the event. Evaluating the event on the survivor alone
//! and then the transfer would show a state that never was (survivor plus
//! event, without the merged profile): a non-monotone audience
//! (`revenue_total lt 500` and two orders) would enter and then exit.
//!
//! So per profile the skeleton keeps a [`Wait`] (a small header under
//! `wait/<id>`, each held input and each arrived state under a key of its
//! own; the profile's value is marked while the header exists, so a
//! profile that waits for nothing costs no read of it):
//! - the announced transfers that arrived before their event (`arrived`);
//! - the inputs held in arrival order: an event whose
//!   `merged_from` transfers are not all in, and everything for the same
//!   profile after it (later events, its own `merged` record, so a profile
//!   is never retired with an event still held).
//!
//! When the head's transfers are all in, they are folded into the profile
//! silently ([`ProfileStage::absorb`]) and the head is handled as usual,
//! which evaluates and emits once: the changes from before the merge to
//! after the merge and the event. A merge of a profile the stage never saw
//! still sends an empty transfer, so nothing waits forever.
//!
//! Bounded: at most [`MAX_HELD_INPUTS`] inputs wait per profile. Past it
//! the oldest is handled without the transfers it still lacks (they are
//! then folded in whenever they come, `late`), trading a possible flicker
//! for bounded state; a stage counts it (`merge_wait` state limit).
//! The wait is state like any other: written through the changelog, so a
//! crash or replay resumes it exactly.

use std::collections::BTreeSet;

use cdp_pipeline::operator::{Context, OperatorError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::entry::{mark_waiting, wait_key, waiting_value, Entry, Layout};
use super::{StageInput, StateCache};
use crate::messages::outputs;

/// Most inputs held per profile while it waits for merge transfers.
pub const MAX_HELD_INPUTS: usize = 1_000;

/// How the skeleton routes an input record.
pub(crate) enum Route<'a> {
    /// Something for one profile (an event, an update): held while the
    /// profile waits, and itself waiting for the transfers of `needs`.
    Profile { id: &'a str, needs: &'a [String] },
    /// `from` was merged away.
    Merged { from: &'a str },
    /// A stage's state of merged-away `from`, for `into`.
    Transfer {
        stage: &'a str,
        from: &'a str,
        into: &'a str,
        announced: bool,
    },
}

/// A profile-keyed stage, as the skeleton drives it.
pub(crate) trait ProfileStage {
    type Input: StageInput + DeserializeOwned;

    /// What the stage keeps per profile.
    type State: Serialize;

    /// The `stage` name this stage writes on its transfers.
    const STAGE: &'static str;

    /// How the stage's task store lays out what a profile's key answers.
    fn layout(&self) -> &Layout;

    /// The stage's decoded and pending states (see `StateCache`).
    fn cache(&self) -> &StateCache<Self::State>;

    /// Handle `input` now. `limited`: a held input handled without every
    /// transfer it waited for (the stage counts it). A profile's own
    /// record comes here only while the profile is live: [`dispatch`]
    /// looked its entry up (and `drain` runs for live profiles only), so
    /// the stage need not ask whether it was merged away.
    /// `defer`: the profile is live and waits for nothing, and the input
    /// merges nothing into it: the stage may leave its state pending
    /// until the batch ends (see `StateCache`).
    fn handle(
        &self,
        ctx: &mut Context<'_>,
        input: Self::Input,
        record_time: Option<i64>,
        limited: bool,
        defer: bool,
    ) -> Result<(), OperatorError>;

    /// Fold `state`, the transferred state of merged-away `from`, into
    /// live `into`'s, without output: the input handled next emits.
    fn absorb(
        &self,
        ctx: &mut Context<'_>,
        from: &str,
        into: &str,
        state: Value,
    ) -> Result<(), OperatorError>;
}

/// An input held while its profile waits, under `wait-held/<id>/<seq>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Held<I> {
    input: I,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    record_time: Option<i64>,
}

/// What a profile waits for, under `wait/<id>`: small whatever it holds
/// (the held inputs and arrived states have a key each, so holding one
/// more input writes two small records, not the whole queue).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Wait {
    /// Sequence number of the oldest held input.
    #[serde(default)]
    head: u64,
    /// Sequence number the next held input gets.
    #[serde(default)]
    next: u64,
    /// Announced transfers in before their event (their states under
    /// `wait-state/<id>/<from>`).
    #[serde(default)]
    arrived: BTreeSet<String>,
    /// Transfers an input was handled without (over the bound): folded in
    /// on arrival.
    #[serde(default)]
    late: BTreeSet<String>,
}

impl Wait {
    fn held(&self) -> u64 {
        self.next.saturating_sub(self.head)
    }

    fn is_empty(&self) -> bool {
        self.held() == 0 && self.arrived.is_empty() && self.late.is_empty()
    }
}

fn held_key(id: &str, seq: u64) -> Vec<u8> {
    // Fixed width: keys sort by sequence.
    format!("wait-held/{id}/{seq:020}").into_bytes()
}

fn state_key(id: &str, from: &str) -> Vec<u8> {
    format!("wait-state/{id}/{from}").into_bytes()
}

fn load(ctx: &Context<'_>, id: &str) -> Result<Wait, OperatorError> {
    Ok(ctx.get_json(&wait_key(id))?.unwrap_or_default())
}

/// Write `id`'s wait header (or delete it when empty) and mark the
/// profile's value to match.
fn store(ctx: &mut Context<'_>, id: &str, wait: &Wait) -> Result<(), OperatorError> {
    if wait.is_empty() {
        ctx.delete(&wait_key(id));
    } else {
        ctx.put_json(&wait_key(id), wait)?;
    }
    mark_waiting(ctx, id, !wait.is_empty())
}

/// `id`'s wait header when its entry says it has one.
fn load_if(ctx: &Context<'_>, id: &str, entry: &Entry) -> Result<Wait, OperatorError> {
    match entry {
        Entry::Live { waiting: true } => load(ctx, id),
        _ => Ok(Wait::default()),
    }
}

/// What a profile's timer needs of a stage's profile state.
pub(crate) trait Timed: Serialize {
    /// Forget the timer that fired (the runtime removed it).
    fn clear_timer(&mut self);
    /// Move the profile's clock to `now` (it never goes back).
    fn advance_clock(&mut self, now: i64);
}

/// A profile a timer (or a sweep) evaluates.
pub(crate) struct Fired<P> {
    pub(crate) id: String,
    pub(crate) profile: P,
    /// The profile has a wait header (transfers arrived or announced, no
    /// input held): its value must keep the waiting mark when the stage
    /// writes it, or the announcing update would find no wait and hold
    /// itself (and every later input) for good. See [`keep_waiting_mark`].
    pub(crate) marked: bool,
}

/// The start both stages' timers share: the profile of `key` with its
/// fired timer cleared and its clock at stream time, or `None` when there
/// is nothing to evaluate: no such profile, or one holding inputs for a
/// merge (stored without the timer; the held input evaluates and
/// reschedules when the wait ends).
pub(crate) fn fired_profile<P: Timed>(
    ctx: &mut Context<'_>,
    layout: &Layout,
    key: &[u8],
    load: impl FnOnce(&Context<'_>, &str) -> Result<Option<P>, OperatorError>,
) -> Result<Option<Fired<P>>, OperatorError> {
    let Ok(id) = std::str::from_utf8(key) else {
        return Ok(None);
    };
    let Some(mut profile) = load(ctx, id)? else {
        return Ok(None);
    };
    profile.clear_timer();
    let entry = layout.entry(ctx, id)?;
    let marked = matches!(entry, Entry::Live { waiting: true });
    if load_if(ctx, id, &entry)?.held() > 0 {
        let value = waiting_value(super::encode_state(&profile)?);
        ctx.put(&super::profile_key(id), value);
        return Ok(None);
    }
    profile.advance_clock(ctx.now());
    Ok(Some(Fired {
        id: id.to_owned(),
        profile,
        marked,
    }))
}

/// After a stage wrote the state of a profile it evaluated on a timer:
/// mark it waiting again if it was (a plain write drops the mark).
pub(crate) fn keep_waiting_mark(
    ctx: &mut Context<'_>,
    id: &str,
    marked: bool,
) -> Result<(), OperatorError> {
    if marked {
        mark_waiting(ctx, id, true)?;
    }
    Ok(())
}

/// Route one input record of a profile-keyed stage.
pub(crate) fn dispatch<S: ProfileStage>(
    stage: &S,
    ctx: &mut Context<'_>,
    input: S::Input,
    record_time: Option<i64>,
) -> Result<(), OperatorError> {
    let routed = route(stage, ctx, input, record_time);
    stage.layout().forget();
    routed
}

/// Handle a profile's usual record (one that merges nothing into it) at
/// once, as [`dispatch`] would, when it can be: the profile's state is
/// pending, or it is live and waits for nothing. Then `handle` runs with
/// `defer` in effect (the stage's load takes the value read here, as
/// after `dispatch`'s routing) and its result comes back; `None`: nothing
/// was done and nothing read is kept, and the record goes through
/// [`dispatch`] (merged away, waiting, or holding inputs). A stage that
/// reads its usual records in place (traits, audiences) calls this before
/// building the owned input.
pub(crate) fn handle_at_once<S: ProfileStage>(
    stage: &S,
    ctx: &mut Context<'_>,
    id: &str,
    handle: impl FnOnce(&mut Context<'_>) -> Result<(), OperatorError>,
) -> Option<Result<(), OperatorError>> {
    if !stage.cache().is_pending(id) {
        match stage.layout().entry_kept(ctx, id) {
            Ok(Entry::Live { waiting: false }) => {}
            Ok(_) => {
                stage.layout().forget();
                return None;
            }
            Err(e) => return Some(Err(e)),
        }
    }
    let handled = handle(ctx);
    stage.layout().forget();
    Some(handled)
}

fn route<S: ProfileStage>(
    stage: &S,
    ctx: &mut Context<'_>,
    input: S::Input,
    record_time: Option<i64>,
) -> Result<(), OperatorError> {
    // `usual`: a profile's own record that merges nothing into it.
    let (id, needs, usual) = match input.route() {
        // A profile's usual record touches its own keys alone: the
        // states other records left pending stay so.
        Route::Profile { id, needs: [] } => {
            if stage.cache().is_pending(id) {
                // Its state is in memory, written by its usual record
                // earlier in the batch: live, waiting for nothing.
                return stage.handle(ctx, input, record_time, false, true);
            }
            (id.to_owned(), Vec::new(), true)
        }
        // The records of a merge read and rewrite their profile's value
        // through the store: with its pending state written first.
        Route::Profile { id, needs } => {
            stage.cache().flush_one(ctx, id)?;
            (id.to_owned(), needs.to_vec(), false)
        }
        Route::Merged { from } => {
            stage.cache().flush_one(ctx, from)?;
            (from.to_owned(), Vec::new(), false)
        }
        Route::Transfer {
            stage: name,
            from,
            into,
            announced,
        } => {
            if name != S::STAGE {
                // Another stage's transfer on a shared topic: not ours.
                return Ok(());
            }
            stage.cache().flush_one(ctx, into)?;
            let (from, into) = (from.to_owned(), into.to_owned());
            let target = stage.layout().entry(ctx, &into)?;
            let mut wait = load_if(ctx, &into, &target)?;
            if !announced || matches!(target, Entry::Retired { .. }) {
                stage.handle(ctx, input, record_time, false, false)?;
                // A state merged in now was stored without the mark.
                return mark_waiting(ctx, &into, !wait.is_empty());
            }
            if wait.late.remove(&from) {
                store(ctx, &into, &wait)?;
                stage.handle(ctx, input, record_time, false, false)?;
                return mark_waiting(ctx, &into, !wait.is_empty());
            }
            let Some(state) = transfer_state::<S>(input) else {
                return Ok(());
            };
            ctx.put_json(&state_key(&into, &from), &state)?;
            wait.arrived.insert(from);
            return drain(stage, ctx, &into, wait);
        }
    };
    // One read says whether the profile was merged away and whether it
    // waits; in the usual case below the stage's load takes the value read
    // (nothing writes the profile before).
    let entry = stage.layout().entry_kept(ctx, &id)?;
    // A retired profile's own records go on to its survivor.
    if let Entry::Retired { survivor } = entry {
        return match input.readdressed(&survivor) {
            Ok(forwarded) => super::emit_record(ctx, outputs::SELF, &survivor, &forwarded),
            Err(other) => stage.handle(ctx, other, record_time, false, false),
        };
    }
    let mut wait = load_if(ctx, &id, &entry)?;
    if wait.is_empty() && needs.is_empty() {
        // The usual case: nothing waits, nothing to wait for. A `merged`
        // record (written above) retires the profile: never pending.
        return stage.handle(ctx, input, record_time, false, usual);
    }
    // The paths below may write the profile before the stage loads it.
    stage.layout().forget();
    if wait.held() == 0 && needs.iter().all(|n| wait.arrived.contains(n)) {
        let retires = matches!(input.route(), Route::Merged { .. });
        absorb_needed(stage, ctx, &id, &mut wait, &needs)?;
        stage.handle(ctx, input, record_time, false, false)?;
        if retires {
            return hand_over(stage, ctx, &id, wait);
        }
        return store(ctx, &id, &wait);
    }
    ctx.put_json(&held_key(&id, wait.next), &Held { input, record_time })?;
    wait.next += 1;
    if wait.held() as usize > MAX_HELD_INPUTS {
        return drain(stage, ctx, &id, wait);
    }
    store(ctx, &id, &wait)
}

/// The state of a transfer record.
fn transfer_state<S: ProfileStage>(input: S::Input) -> Option<Value> {
    let mut value = serde_json::to_value(&input).ok()?;
    value.get_mut("state").map(Value::take)
}

/// Fold in the arrived transfers `needs` names; the missing ones become
/// `late`. Returns whether any was missing.
fn absorb_needed<S: ProfileStage>(
    stage: &S,
    ctx: &mut Context<'_>,
    id: &str,
    wait: &mut Wait,
    needs: &[String],
) -> Result<bool, OperatorError> {
    let mut missing = false;
    for from in needs {
        if wait.arrived.remove(from) {
            let key = state_key(id, from);
            let state: Option<Value> = ctx.get_json(&key)?;
            ctx.delete(&key);
            stage.absorb(ctx, from, id, state.unwrap_or_default())?;
        } else {
            wait.late.insert(from.clone());
            missing = true;
        }
    }
    Ok(missing)
}

/// Handle held inputs from the head while their transfers are in (or the
/// queue is over its bound), then store what still waits.
fn drain<S: ProfileStage>(
    stage: &S,
    ctx: &mut Context<'_>,
    id: &str,
    mut wait: Wait,
) -> Result<(), OperatorError> {
    while wait.held() > 0 {
        let over = wait.held() as usize > MAX_HELD_INPUTS;
        let key = held_key(id, wait.head);
        let Some(held) = ctx.get_json::<Held<S::Input>>(&key)? else {
            // Not there (cannot happen: written with the header): skip.
            wait.head += 1;
            continue;
        };
        let needs: Vec<String> = match held.input.route() {
            Route::Profile { needs, .. } => needs.to_vec(),
            _ => Vec::new(),
        };
        if !over && !needs.iter().all(|n| wait.arrived.contains(n)) {
            break;
        }
        ctx.delete(&key);
        wait.head += 1;
        let missing = absorb_needed(stage, ctx, id, &mut wait, &needs)?;
        let retires = matches!(held.input.route(), Route::Merged { .. });
        stage.handle(ctx, held.input, held.record_time, missing, false)?;
        if retires {
            return hand_over(stage, ctx, id, wait);
        }
    }
    store(ctx, id, &wait)
}

/// `id` was just retired: what it still held goes the way of its redirect.
fn hand_over<S: ProfileStage>(
    stage: &S,
    ctx: &mut Context<'_>,
    id: &str,
    wait: Wait,
) -> Result<(), OperatorError> {
    ctx.delete(&wait_key(id));
    for seq in wait.head..wait.next {
        let key = held_key(id, seq);
        if let Some(held) = ctx.get_json::<Held<S::Input>>(&key)? {
            ctx.delete(&key);
            dispatch(stage, ctx, held.input, held.record_time)?;
        }
    }
    for from in wait.arrived {
        let key = state_key(id, &from);
        let state: Option<Value> = ctx.get_json(&key)?;
        ctx.delete(&key);
        let transfer = S::Input::transfer(
            S::STAGE,
            from,
            id.to_owned(),
            state.unwrap_or_default(),
            Default::default(),
            false,
        );
        dispatch(stage, ctx, transfer, None)?;
    }
    Ok(())
}
