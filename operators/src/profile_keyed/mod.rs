//! The skeleton both profile-keyed stages (traits, audiences) share.
//!
//! A stage keeps one value per profile under `profile/<id>`: its state, or
//! the mark that it was merged away ([`entry`]). When identity merges
//! `from` into `into`, the stage replaces `from`'s state by that mark
//! (`from` → `into`), and sends the state to `into`'s partition as a
//! `transfer` through its own input topic ([`outputs::SELF`], keyed by
//! `into`), where it is merged into the survivor's. Late records for
//! `from` (and transfers to an `into` that was itself merged away
//! meanwhile) follow the mark to the survivor.
//!
//! Merges are applied before the event that caused them is evaluated
//! ([`wait`]): the merging event names the merged-away profiles, and the
//! survivor holds it (and what follows it) until their transfers are in.

mod cache;
mod encoding;
mod entry;
mod fast;
mod read;
mod sweep;
mod wait;

pub(crate) use cache::{StateCache, CACHED_PROFILES};
pub(crate) use encoding::stored_state;
#[cfg(test)]
pub(crate) use encoding::{assert_rewritten_in_binary, read_state};
pub(crate) use encoding::{
    decode_padded, decode_state, encode_state, json_value, json_value_map, last_wins_pairs,
    sorted_map, EndedEarly, Stored,
};
#[cfg(test)]
pub(crate) use entry::{retired_value, to_earlier_layout, LIVE};
pub(crate) use entry::{Entry, Layout};
pub(crate) use read::{EventPaths, EventTree};
pub(crate) use sweep::{step as sweep_step, Sweep, SWEEP_STEP};
pub use wait::MAX_HELD_INPUTS;
pub(crate) use wait::{
    dispatch, fired_profile, handle_at_once, keep_waiting_mark, Fired, ProfileStage, Route, Timed,
};

use cdp_pipeline::operator::{Context, OperatorError};
use cdp_pipeline::store::StoreError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::messages::{outputs, wire, Cause, Identifiers, ProfileRecord, ProfileUpdate};

/// `profile/<id>`, by concatenation: `format!` costs ~550 instructions a
/// key, 1.8% of the traits stage's batches for its two keys per record
/// (counted in the chain; docs/performance.md).
pub(crate) fn profile_key(id: &str) -> Vec<u8> {
    [b"profile/", id.as_bytes()].concat()
}

/// Emit `value` as JSON, keyed by a profile id.
pub(crate) fn emit_json<T: Serialize>(
    ctx: &mut Context<'_>,
    output: &'static str,
    key: &str,
    value: &T,
) -> Result<(), OperatorError> {
    emit_keyed(ctx, output, key, json_bytes(value)?);
    Ok(())
}

/// Emit `bytes` keyed by a profile id.
fn emit_keyed(ctx: &mut Context<'_>, output: &'static str, key: &str, bytes: Vec<u8>) {
    ctx.emit(output, Some(key.as_bytes().to_vec()), bytes);
}

/// Room for a record a stage writes: an update carries the event's text
/// (~0.2–1 KB), an audience change the profile's identifiers and traits.
/// `serde_json::to_vec` starts at 128 bytes and doubles (postcard from
/// one), copying the record three times on its way to 1 KB; it is
/// produced (copied into librdkafka) and dropped right after, so room
/// unused costs nothing.
pub(crate) const RECORD_ROOM: usize = 1024;

/// `value` as the JSON a stage writes.
pub(crate) fn json_bytes<T: Serialize>(value: &T) -> Result<Vec<u8>, OperatorError> {
    let mut bytes = Vec::with_capacity(RECORD_ROOM);
    serde_json::to_writer(&mut bytes, value).map_err(|e| StoreError::Decode(e.to_string()))?;
    Ok(bytes)
}

/// Add `b`'s identifiers to `a`: `a`'s first, then `b`'s new ones. In
/// place, so a known profile's event (whose identifiers are all known)
/// copies nothing.
pub(crate) fn union_identifiers(a: &mut Identifiers, b: &Identifiers) {
    union_identifiers_from(a, b);
}

/// [`union_identifiers`] from `(type, values)` pairs borrowed from a
/// record read in place (`wire::UpdateView`, `wire::EventView`).
pub(crate) fn union_identifier_pairs(a: &mut Identifiers, b: &[(&str, Vec<&str>)]) {
    union_identifiers_from(a, b.iter().map(|(k, v)| (k, v)));
}

/// [`union_identifiers`] from any `(type, values)` pairs.
fn union_identifiers_from<K, V, I>(a: &mut Identifiers, b: impl IntoIterator<Item = (K, I)>)
where
    K: AsRef<str>,
    V: AsRef<str>,
    I: IntoIterator<Item = V>,
{
    for (kind, values) in b {
        let kind = kind.as_ref();
        let mine = match a.get_mut(kind) {
            Some(mine) => mine,
            None => a.entry(kind.to_owned()).or_default(),
        };
        for v in values {
            let v = v.as_ref();
            if !mine.iter().any(|m| m == v) {
                mine.push(v.to_owned());
            }
        }
    }
}

/// Move a profile's timer from `current` to `next` (either may be none).
pub(crate) fn reschedule(
    ctx: &mut Context<'_>,
    id: &str,
    current: &mut Option<i64>,
    next: Option<i64>,
) {
    if *current == next {
        return;
    }
    if let Some(old) = *current {
        ctx.cancel_timer(old, id.as_bytes());
    }
    if let Some(at) = next {
        ctx.set_timer(at, id.as_bytes());
    }
    *current = next;
}

pub(crate) fn to_json_value<T: Serialize>(value: &T) -> Result<Value, OperatorError> {
    serde_json::to_value(value).map_err(unwritable)
}

/// The input record of a profile-keyed stage ([`ProfileRecord`] for
/// traits, [`ProfileUpdate`] for audiences): both carry transfers alike.
pub(crate) trait StageInput: Serialize + Sized {
    /// The transfer of `from`'s state (as written by `stage`) to `into`.
    fn transfer(
        stage: &str,
        from: String,
        into: String,
        state: Value,
        cause: Cause,
        announced: bool,
    ) -> Self;

    /// What the skeleton needs to know to route the record.
    fn route(&self) -> Route<'_>;

    /// The record as the stage writes it ([`wire`] for a profile's own
    /// record, JSON for the others).
    fn encoded(&self) -> Result<Vec<u8>, OperatorError>;

    /// Refuse what no stage can apply (an empty profile id, a self-merge,
    /// what the stage's own records must hold).
    fn check(&self) -> Result<(), OperatorError>;

    /// A profile's own record readdressed to `survivor` (for a record of a
    /// retired profile); any other record back unchanged.
    fn readdressed(self, survivor: &str) -> Result<Self, Self>;

    /// A `merged` record as the stage handles it; any other back.
    fn into_merge(self) -> Result<Merge, Self>;

    /// Test input: `from` merged into `into`, unannounced, no cause.
    #[cfg(test)]
    fn merged(from: &str, into: &str) -> Self;
}

/// A `merged` record, as a stage handles it.
pub(crate) struct Merge {
    pub(crate) from: String,
    pub(crate) into: String,
    pub(crate) identifiers: Identifiers,
    pub(crate) cause: Cause,
    pub(crate) announced: bool,
    /// The merging event's time (ms), where the record carries it.
    pub(crate) at: Option<i64>,
}

impl Merge {
    /// The record a stage forwards to the next: the same merge.
    pub(crate) fn forwarded(self) -> crate::messages::ProfileUpdate {
        crate::messages::ProfileUpdate::Merged {
            from: self.from,
            into: self.into,
            identifiers: self.identifiers,
            cause: self.cause,
            announced: self.announced,
            at: self.at,
        }
    }
}

/// [`StageInput`] for a stage's input enum, whose profile variant is
/// `$profile`: both enums carry `merged` and `transfer` records alike.
/// `$check_own` checks the profile variant further; `$readdress` gives it
/// another profile id.
macro_rules! stage_input {
    ($input:ident, $profile:ident, $check_own:path, $readdress:path) => {
        impl StageInput for $input {
            fn into_merge(self) -> Result<Merge, Self> {
                match self {
                    $input::Merged {
                        from,
                        into,
                        identifiers,
                        cause,
                        announced,
                        at,
                    } => Ok(Merge {
                        from,
                        into,
                        identifiers,
                        cause,
                        announced,
                        at,
                    }),
                    other => Err(other),
                }
            }

            #[cfg(test)]
            fn merged(from: &str, into: &str) -> Self {
                $input::Merged {
                    from: from.to_owned(),
                    into: into.to_owned(),
                    identifiers: Identifiers::new(),
                    cause: Cause::default(),
                    announced: false,
                    at: None,
                }
            }

            fn transfer(
                stage: &str,
                from: String,
                into: String,
                state: Value,
                cause: Cause,
                announced: bool,
            ) -> Self {
                $input::Transfer {
                    stage: stage.to_owned(),
                    from,
                    into,
                    state,
                    cause,
                    announced,
                }
            }

            fn encoded(&self) -> Result<Vec<u8>, OperatorError> {
                $input::to_bytes(self).map_err($crate::profile_keyed::unwritable)
            }

            fn route(&self) -> Route<'_> {
                match self {
                    $input::$profile {
                        profile_id,
                        merged_from,
                        ..
                    } => Route::Profile {
                        id: profile_id,
                        needs: merged_from,
                    },
                    $input::Merged { from, .. } => Route::Merged { from },
                    $input::Transfer {
                        stage,
                        from,
                        into,
                        announced,
                        ..
                    } => Route::Transfer {
                        stage,
                        from,
                        into,
                        announced: *announced,
                    },
                }
            }

            fn check(&self) -> Result<(), OperatorError> {
                match self {
                    $input::$profile { profile_id, .. } => {
                        check_profile_id(profile_id)?;
                        $check_own(self)
                    }
                    $input::Merged { from, into, .. } => check_merge(from, into),
                    $input::Transfer { .. } => Ok(()),
                }
            }

            fn readdressed(self, survivor: &str) -> Result<Self, Self> {
                match self {
                    $input::$profile { .. } => Ok($readdress(self, survivor)),
                    other => Err(other),
                }
            }
        }
    };
}

stage_input!(ProfileRecord, Event, check_event_record, readdress_event);
stage_input!(ProfileUpdate, Update, check_nothing_more, readdress_update);

/// Refuse an event that is not a JSON object.
fn check_event_record(record: &ProfileRecord) -> Result<(), OperatorError> {
    match record {
        ProfileRecord::Event {
            profile_id, event, ..
        } if !event.is_object() => Err(OperatorError::rejected(
            "invalid_event",
            json!({"profile_id": profile_id, "error": "event is not a JSON object"}),
        )),
        _ => Ok(()),
    }
}

fn check_nothing_more(_: &ProfileUpdate) -> Result<(), OperatorError> {
    Ok(())
}

/// An event for `survivor`; the identifiers identity dropped were counted
/// at its first hop.
fn readdress_event(record: ProfileRecord, survivor: &str) -> ProfileRecord {
    match record {
        ProfileRecord::Event {
            identifiers,
            event,
            merged_from,
            ..
        } => ProfileRecord::Event {
            profile_id: survivor.to_owned(),
            identifiers,
            event,
            dropped: Vec::new(),
            merged_from,
        },
        other => other,
    }
}

/// An update for `survivor`; a corrected time was counted at its first hop.
fn readdress_update(update: ProfileUpdate, survivor: &str) -> ProfileUpdate {
    match update {
        ProfileUpdate::Update {
            identifiers,
            event,
            traits,
            event_time,
            cause,
            merged_from,
            traits_until,
            ..
        } => ProfileUpdate::Update {
            profile_id: survivor.to_owned(),
            identifiers,
            event,
            traits,
            event_time,
            time_corrected_from: None,
            cause,
            merged_from,
            traits_until,
        },
        other => other,
    }
}

/// Parse the audiences stage's input record and refuse an empty profile id
/// or a merge of a profile into itself. An update in the binary form
/// ([`wire`]) and the JSON fast path's update keep their event's text,
/// its tree what `parse` builds from it (see [`fast::fast_update`]) —
/// unless a binary update comes with the traits stage's matches against
/// the filters `accepts` (a fingerprint, 0 for none): then it has no
/// tree, and nothing is parsed. The general path's tree is the whole
/// event.
pub(crate) fn decode_update(
    value: &[u8],
    accepts: u64,
    parse: impl FnOnce(&str) -> Result<Value, serde_json::Error>,
) -> Result<ProfileUpdate, OperatorError> {
    let read = match value.split_first() {
        Some((&wire::UPDATE_V1, rest)) => {
            Some(wire::decode_update(rest, accepts, parse).map_err(invalid_record)?)
        }
        _ => fast::fast_update(value, parse),
    };
    checked(read, value)
}

/// [`decode_update`] for the traits stage's input (see
/// [`fast::fast_event`]).
pub(crate) fn decode_event(
    value: &[u8],
    parse: impl FnOnce(&str) -> Result<Value, serde_json::Error>,
) -> Result<ProfileRecord, OperatorError> {
    let read = match value.split_first() {
        Some((&wire::EVENT_V1, rest)) => {
            Some(wire::decode_event(rest, parse).map_err(invalid_record)?)
        }
        _ => fast::fast_event(value, parse),
    };
    checked(read, value)
}

fn invalid_record(e: impl std::fmt::Display) -> OperatorError {
    OperatorError::rejected("invalid_record", json!({"error": e.to_string()}))
}

/// A record or state this stage could not write: a store error (the
/// batch fails and nothing of it is acknowledged), not a dead letter
/// like a record it could not read ([`invalid_record`]).
pub(crate) fn unwritable(e: impl std::fmt::Display) -> OperatorError {
    OperatorError::Store(StoreError::Decode(e.to_string()))
}

/// The record read already (binary, or the JSON fast path), else the
/// general JSON path's, checked.
fn checked<I: StageInput + DeserializeOwned>(
    read: Option<I>,
    value: &[u8],
) -> Result<I, OperatorError> {
    let input: I = match read {
        Some(input) => input,
        None => serde_json::from_slice(value).map_err(invalid_record)?,
    };
    input.check()?;
    Ok(input)
}

/// Refuse a record with an empty profile id.
fn check_profile_id(id: &str) -> Result<(), OperatorError> {
    if id.is_empty() {
        return Err(OperatorError::rejected(
            "invalid_record",
            json!({"error": "empty profile_id"}),
        ));
    }
    Ok(())
}

/// The refusal of a transfer from `from` to `into` whose state does not
/// read.
pub(crate) fn invalid_transfer(
    from: &str,
    into: &str,
    error: impl std::fmt::Display,
) -> OperatorError {
    OperatorError::rejected(
        "invalid_transfer",
        json!({"from": from, "into": into, "error": error.to_string()}),
    )
}

/// Refuse a merge that does not name two different profile ids.
fn check_merge(from: &str, into: &str) -> Result<(), OperatorError> {
    if from.is_empty() || into.is_empty() || from == into {
        return Err(OperatorError::rejected(
            "invalid_merge",
            json!({"from": from, "into": into, "error": "a merge needs two different profile ids"}),
        ));
    }
    Ok(())
}

/// Retire merged-away `from`: its state gives way to the mark that sends
/// its records to `into`.
pub(crate) fn retire(ctx: &mut Context<'_>, from: &str, into: &str) {
    ctx.put(&profile_key(from), entry::retired_value(into));
}

/// Write `transfer` to the stage's own input, keyed by its survivor `into`.
pub(crate) fn send_transfer<R: StageInput>(
    ctx: &mut Context<'_>,
    into: &str,
    transfer: &R,
) -> Result<(), OperatorError> {
    emit_record(ctx, outputs::SELF, into, transfer)
}

/// Write `record` (a stage's input record, as [`StageInput::encoded`]
/// writes it) to `output`, keyed by `key`.
pub(crate) fn emit_record<R: StageInput>(
    ctx: &mut Context<'_>,
    output: &'static str,
    key: &str,
    record: &R,
) -> Result<(), OperatorError> {
    emit_keyed(ctx, output, key, record.encoded()?);
    Ok(())
}

/// A transfer to `into` when `into` was itself merged away meanwhile: pass
/// it on to the survivor and return `true`; `false` when `into` is live and
/// the state is to be merged here. A passed-on transfer is never awaited:
/// `into` was retired only after the event that named it was evaluated
/// (see [`wait`]), so the survivor folds it in on arrival.
pub(crate) fn pass_on_transfer<R: StageInput>(
    ctx: &mut Context<'_>,
    layout: &Layout,
    stage: &str,
    from: &str,
    into: &str,
    state: &Value,
    cause: &Cause,
) -> Result<bool, OperatorError> {
    let Entry::Retired { survivor } = layout.entry(ctx, into)? else {
        return Ok(false);
    };
    let forwarded = R::transfer(
        stage,
        from.to_owned(),
        survivor.clone(),
        state.clone(),
        cause.clone(),
        false,
    );
    send_transfer(ctx, &survivor, &forwarded)?;
    Ok(true)
}

/// Test helper: feed a stage (whose input is `I`) the record of `from`
/// merged into `into`, then every transfer it sends back to itself; every
/// output.
#[cfg(test)]
pub(crate) fn merge_with_transfers<I: StageInput, O: cdp_pipeline::Operator>(
    h: &mut cdp_pipeline::OperatorHarness<O>,
    from: &str,
    into: &str,
) -> Result<Vec<cdp_pipeline::Emitted>, Box<dyn std::error::Error>> {
    let merged = serde_json::to_vec(&I::merged(from, into))?;
    let mut out = h.process(Some(from.as_bytes()), &merged, &[])?;
    let transfers: Vec<cdp_pipeline::Emitted> = out
        .iter()
        .filter(|e| e.output == outputs::SELF)
        .cloned()
        .collect();
    for transfer in transfers {
        out.extend(h.process(transfer.key.as_deref(), &transfer.value, &[])?);
    }
    Ok(out)
}

/// Test helper for the state-cache proptests: step `action` 2 saves a copy
/// of `stores[1]`, 3 puts both stores back to the saved copy (a rollback or
/// restore under live operators); any other does nothing.
#[cfg(test)]
pub(crate) fn save_or_restore(
    action: u8,
    saved: &mut cdp_pipeline::store::MemoryState,
    stores: [&mut cdp_pipeline::store::MemoryState; 2],
) {
    match action {
        2 => saved.map = stores[1].map.clone(),
        3 => {
            for store in stores {
                store.map = saved.map.clone();
            }
        }
        _ => {}
    }
}
