//! The audiences operator: dispatch of records and timers.

use std::cell::RefCell;
use std::sync::Arc;

use cdp_pipeline::operator::{Context, Operator, OperatorError, Record};
use cdp_pipeline::store::StoreError;
use serde::Deserialize;
use serde_json::Value;

use super::compile::AudienceSet;
use super::profile::AudienceProfile;
use super::sizes::{SizeReporter, Sizes};
use super::STAGE;
use crate::messages::{
    self, outputs, wire, AudienceAction, AudienceChange, Cause, EventRead, Identifiers,
    ProfileUpdate,
};
use crate::profile_keyed::{
    decode_state, decode_update, dispatch, emit_json, encode_state, fired_profile, handle_at_once,
    invalid_transfer, keep_waiting_mark, pass_on_transfer, profile_key, reschedule, retire,
    send_transfer, sweep_step, to_json_value, union_identifier_pairs, union_identifiers, EventTree,
    Fired, Layout, Merge, ProfileStage, StageInput, StateCache, Stored, Sweep, CACHED_PROFILES,
    SWEEP_STEP,
};

/// The audiences operator of one task.
pub struct AudiencesOperator {
    set: Arc<AudienceSet>,
    layout: Layout,
    /// The profiles this task wrote last, decoded (see `StateCache`).
    cache: StateCache<AudienceProfile>,
    /// Members per audience among this task's profiles.
    sizes: RefCell<Sizes>,
    /// Profiles re-evaluated per tick after the audiences changed.
    sweep_step: usize,
}

/// What caused an evaluation, for the changes it emits.
struct Trigger<'a> {
    message_id: Option<&'a str>,
    tick: Option<i64>,
    event_time: i64,
}

impl<'a> Trigger<'a> {
    fn of(cause: &'a Cause, event_time: i64) -> Self {
        Trigger {
            message_id: cause.message_id.as_deref(),
            tick: cause.tick,
            event_time,
        }
    }
}

/// What an update brings, however it was read: in place from its binary
/// record (a profile's usual update, see `process`) or decoded into a
/// [`ProfileUpdate`]. `T`: the changed traits, `(name, value)` pairs.
struct Arrival<'a, T> {
    profile_id: &'a str,
    traits: T,
    seen: Seen<'a>,
    event_time: i64,
    record_time: Option<i64>,
    message_id: Option<&'a str>,
    tick: Option<i64>,
    traits_until: Option<i64>,
}

/// The event an update carries, as the stage takes it.
enum Seen<'a> {
    Nothing,
    /// The event filters it passed, matched by the traits stage against
    /// this stage's very filters: nothing to parse.
    Matched(&'a [u32]),
    /// Its (partial) tree, to match here.
    Event(&'a dyn EventRead),
}

impl AudiencesOperator {
    pub fn new(set: Arc<AudienceSet>) -> Self {
        Self::with_cache(set, CACHED_PROFILES)
    }

    /// With a cache of `profiles` decoded profiles (0: every load decodes).
    pub(crate) fn with_cache(set: Arc<AudienceSet>, profiles: usize) -> Self {
        AudiencesOperator {
            set,
            layout: Layout::default(),
            cache: StateCache::new(profiles),
            sizes: RefCell::new(Sizes::new(None)),
            sweep_step: SWEEP_STEP,
        }
    }

    /// Re-evaluate `profiles` profiles a tick (at least 1) after the
    /// audiences changed, instead of [`SWEEP_STEP`].
    #[cfg(test)]
    pub(crate) fn with_sweep_step(mut self, profiles: usize) -> Self {
        self.sweep_step = profiles.max(1);
        self
    }

    /// Report this task's members per audience to `reporter` as they move
    /// (`cdp_audience_members`), and take them back when the task goes.
    pub fn with_size_reporter(mut self, reporter: SizeReporter) -> Self {
        self.sizes = RefCell::new(Sizes::new(Some(reporter)));
        self
    }

    /// Emit `changes` of profile `id` and count them.
    fn emit_changes(
        &self,
        ctx: &mut Context<'_>,
        id: &str,
        changes: &[AudienceChange],
    ) -> Result<(), OperatorError> {
        let mut sizes = self.sizes.borrow_mut();
        for change in changes {
            sizes.note(ctx, &self.set, &change.audience, change.action)?;
            emit_json(ctx, outputs::NEXT, id, change)?;
        }
        Ok(())
    }

    fn load(&self, ctx: &Context<'_>, id: &str) -> Result<Option<AudienceProfile>, OperatorError> {
        if let Some(profile) = self.cache.take_pending(id) {
            return Ok(Some(profile));
        }
        let Some(bytes) = self.layout.value(ctx, id)? else {
            return Ok(None);
        };
        if let Some(profile) = self.cache.take(id, &bytes) {
            return Ok(Some(profile));
        }
        let mut profile: Option<AudienceProfile> = match decode_state(id, &bytes)? {
            Stored::Current(profile) => Some(profile),
            // Written as JSON, before the binary encoding.
            Stored::Json(json) => Some(serde_json::from_slice(json).map_err(|e| {
                StoreError::Decode(format!(
                    "{}: {e}",
                    String::from_utf8_lossy(&profile_key(id))
                ))
            })?),
            // Merged away, or waiting for merges before its first input.
            Stored::Absent => None,
        };
        if let Some(p) = profile.as_mut() {
            p.upgrade_sequence_steps(&self.set);
        }
        Ok(profile)
    }

    fn change(
        &self,
        ctx: &Context<'_>,
        id: &str,
        profile: &AudienceProfile,
        audience: &str,
        action: AudienceAction,
        trigger: &Trigger,
    ) -> AudienceChange {
        let traits = super::sync::referenced_traits(&self.set, audience, &profile.traits);
        AudienceChange {
            kind: "audience_change".to_owned(),
            audience: audience.to_owned(),
            action,
            profile_id: id.to_owned(),
            identifiers: profile.identifiers.clone(),
            traits,
            event_time: messages::rfc3339_ms(trigger.event_time),
            emitted_at: messages::rfc3339_ms(ctx.processing_time()),
            cause: Cause {
                message_id: trigger.message_id.map(str::to_owned),
                tick: trigger.tick,
            },
            merged_into: None,
        }
    }

    /// Prune, re-evaluate at the profile's clock, emit the changes in
    /// evaluation order, reschedule the timer and store the profile
    /// (pending until the batch ends when `defer`, see `StateCache`).
    fn settle(
        &self,
        ctx: &mut Context<'_>,
        id: &str,
        mut profile: AudienceProfile,
        trigger: &Trigger,
        defer: bool,
    ) -> Result<(), OperatorError> {
        profile.remember_sequences(&self.set);
        profile.prune(&self.set);
        let now = profile.clock;
        let held = profile.evaluate(&self.set, now);
        // Dated no earlier than the profile's events and changes so far.
        let stamp = trigger
            .event_time
            .max(profile.changes_from.unwrap_or(i64::MIN));
        let trigger = &Trigger {
            event_time: stamp,
            ..*trigger
        };
        let mut changes = Vec::new();
        for (name, &holds) in self.set.order().zip(&held) {
            let action = match (profile.members.contains(name), holds) {
                (false, true) => AudienceAction::Entered,
                (true, false) => AudienceAction::Exited,
                _ => continue,
            };
            changes.push(self.change(ctx, id, &profile, name, action, trigger));
        }
        if !changes.is_empty() {
            profile.changes_from = Some(stamp);
        }
        profile.set_members(&self.set, &held);
        let next = profile.next_change(&self.set, now);
        reschedule(ctx, id, &mut profile.timer, next);
        // Stored first: the profile may hold this batch's earlier records,
        // taken from pending, and must not be lost with a record that
        // fails.
        self.cache.store(ctx, id, profile, defer)?;
        self.emit_changes(ctx, id, &changes)
    }

    /// Apply an update. `identify` adds its identifiers to the profile's.
    fn on_update<N: AsRef<str> + Into<String>>(
        &self,
        ctx: &mut Context<'_>,
        update: Arrival<'_, impl IntoIterator<Item = (N, Value)>>,
        identify: impl FnOnce(&mut Identifiers),
        defer: bool,
    ) -> Result<(), OperatorError> {
        // Traits bounded the event time already; bound it again against
        // this stage's stream time for producers that write here directly.
        let event_time = self
            .set
            .event_time
            .bound(update.event_time, ctx.now(), update.record_time)?
            .time;
        let id = update.profile_id;
        let mut profile = self.load(ctx, id)?.unwrap_or_default();
        // A change this event causes is dated by its time, but never
        // before the profile's latest event or change (`settle`): a late
        // event changes the membership as of then, so a profile's changes
        // never go back in time (an `exited` is never dated before its
        // `entered`).
        profile.changes_from = profile.changes_from.max(Some(event_time));
        profile.clock = profile.clock.max(ctx.now()).max(event_time);
        // Identifiers only grow: a record from a partition that has not
        // seen the latest link must not take identifiers away.
        identify(&mut profile.identifiers);
        profile.traits_until = update.traits_until;
        for (name, value) in update.traits {
            if value.is_null() {
                profile.traits.remove(name.as_ref());
            } else if let Some(known) = profile.traits.get_mut(name.as_ref()) {
                *known = value;
            } else {
                profile.traits.insert(name.into(), value);
            }
        }
        match update.seen {
            Seen::Nothing => {}
            Seen::Matched(matched) => profile.record_matched(&self.set, matched, event_time),
            Seen::Event(event) => profile.record_event(&self.set, event, event_time),
        }
        let trigger = Trigger {
            message_id: update.message_id,
            tick: update.tick,
            event_time,
        };
        self.settle(ctx, id, profile, &trigger, defer)
    }

    /// A profile's usual update read in place and handled at once, when it
    /// can be (see `process`); `None`: nothing was done, read it whole.
    fn update_in_place(
        &self,
        ctx: &mut Context<'_>,
        record: &Record<'_>,
    ) -> Option<Result<(), OperatorError>> {
        let view = wire::view_update(record.value)?;
        if view.profile_id.is_empty() || !view.merged_from.is_empty() {
            return None;
        }
        let fingerprint = self.set.filters_fingerprint();
        let parsed;
        let seen = match (view.event, &view.matched) {
            (None, _) => Seen::Nothing,
            (Some(_), Some((filters, matched))) if fingerprint != 0 && *filters == fingerprint => {
                Seen::Matched(matched)
            }
            // An event to match here (a traits stage with other filters,
            // a producer writing here): parsed from the borrowed text. One
            // that is not UTF-8 or not JSON goes the general path, which
            // says what is wrong with it.
            (Some(text), _) => {
                let text = cdp_pipeline::json::utf8(text)?;
                parsed = self.set.reads.parse(text).ok()?;
                Seen::Event(&parsed)
            }
        };
        let update = Arrival {
            profile_id: view.profile_id,
            traits: view.traits,
            seen,
            event_time: view.event_time,
            record_time: record.timestamp_ms,
            message_id: view.message_id,
            tick: view.tick,
            traits_until: view.traits_until,
        };
        let identifiers = &view.identifiers;
        handle_at_once(self, ctx, view.profile_id, |ctx| {
            self.on_update(
                ctx,
                update,
                |ids| union_identifier_pairs(ids, identifiers),
                true,
            )
        })
    }

    fn on_merged(&self, ctx: &mut Context<'_>, merge: Merge) -> Result<(), OperatorError> {
        let Merge {
            from, into, cause, ..
        } = &merge;
        // A profile never seen here still sends its (empty) state: the
        // survivor may be waiting for it.
        let mut profile = self.load(ctx, from)?.unwrap_or_default();
        // The exits carry the merging event's time, bounded as the
        // survivor's entries' is (a record without it: the profile's clock).
        let time = match merge.at {
            Some(t) => self
                .set
                .event_time
                .bound(t, ctx.now(), None)
                .map_or(ctx.now(), |b| b.time)
                // Never before the profile's own events and changes.
                .max(profile.changes_from.unwrap_or(i64::MIN)),
            None => profile.clock.max(ctx.now()),
        };
        let trigger = Trigger::of(cause, time);
        // The merged-away profile leaves every audience it was in.
        let exits: Vec<AudienceChange> = self
            .set
            .order()
            .filter(|name| profile.members.contains(*name))
            .map(|name| AudienceChange {
                merged_into: Some(into.clone()),
                ..self.change(ctx, from, &profile, name, AudienceAction::Exited, &trigger)
            })
            .collect();
        if !exits.is_empty() {
            profile.changes_from = Some(time);
        }
        reschedule(ctx, from, &mut profile.timer, None);
        profile.members.clear();
        // The merged profile's identifiers (every one the survivor has
        // after the merge) travel with the state, so a membership the
        // transfer completes names them all, even if the merging event's
        // own update reaches the survivor later.
        union_identifiers(&mut profile.identifiers, &merge.identifiers);
        let transfer = ProfileUpdate::transfer(
            STAGE,
            from.clone(),
            into.clone(),
            to_json_value(&profile)?,
            cause.clone(),
            merge.announced,
        );
        retire(ctx, from, into);
        self.emit_changes(ctx, from, &exits)?;
        send_transfer(ctx, into, &transfer)
    }

    fn incoming(
        &self,
        from: &str,
        into: &str,
        state: &Value,
    ) -> Result<AudienceProfile, OperatorError> {
        let mut incoming =
            AudienceProfile::deserialize(state).map_err(|e| invalid_transfer(from, into, e))?;
        incoming.upgrade_sequence_steps(&self.set);
        Ok(incoming)
    }

    fn on_transfer(
        &self,
        ctx: &mut Context<'_>,
        from: String,
        into: String,
        state: Value,
        cause: Cause,
    ) -> Result<(), OperatorError> {
        let incoming = self.incoming(&from, &into, &state)?;
        if pass_on_transfer::<ProfileUpdate>(
            ctx,
            &self.layout,
            STAGE,
            &from,
            &into,
            &state,
            &cause,
        )? {
            return Ok(());
        }
        let current = self.load(ctx, &into)?;
        if current.is_none() && incoming.traits.is_empty() && incoming.events.is_empty() {
            // The (empty) state of a profile never seen here, for a
            // survivor never seen here either: nothing to evaluate.
            return Ok(());
        }
        let mut profile = current.unwrap_or_default();
        profile.merge(incoming);
        profile.clock = profile.clock.max(ctx.now());
        let trigger = Trigger::of(&cause, profile.clock);
        self.settle(ctx, &into, profile, &trigger, false)
    }
}

impl ProfileStage for AudiencesOperator {
    type Input = ProfileUpdate;
    type State = AudienceProfile;
    const STAGE: &'static str = STAGE;

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn cache(&self) -> &StateCache<AudienceProfile> {
        &self.cache
    }

    fn handle(
        &self,
        ctx: &mut Context<'_>,
        input: ProfileUpdate,
        record_time: Option<i64>,
        _limited: bool,
        defer: bool,
    ) -> Result<(), OperatorError> {
        match input {
            ProfileUpdate::Update {
                profile_id,
                identifiers,
                event,
                traits,
                event_time,
                cause,
                traits_until,
                ..
            } => {
                let fingerprint = self.set.filters_fingerprint();
                let seen = match &event {
                    None => Seen::Nothing,
                    // Matched by the traits stage against these very
                    // filters (`decode_update` took it only then).
                    Some(event) => match event.matched() {
                        Some((filters, matched)) if filters == fingerprint => {
                            Seen::Matched(matched)
                        }
                        _ => Seen::Event(event.value()),
                    },
                };
                let update = Arrival {
                    profile_id: &profile_id,
                    traits,
                    seen,
                    event_time,
                    record_time,
                    message_id: cause.message_id.as_deref(),
                    tick: cause.tick,
                    traits_until,
                };
                self.on_update(
                    ctx,
                    update,
                    |ids| union_identifiers(ids, &identifiers),
                    defer,
                )
            }
            merged @ ProfileUpdate::Merged { .. } => match merged.into_merge() {
                Ok(merge) => self.on_merged(ctx, merge),
                Err(_) => Ok(()), // a `merged` record is one
            },
            ProfileUpdate::Transfer {
                from,
                into,
                state,
                cause,
                ..
            } => self.on_transfer(ctx, from, into, state, cause),
        }
    }

    fn absorb(
        &self,
        ctx: &mut Context<'_>,
        from: &str,
        into: &str,
        state: Value,
    ) -> Result<(), OperatorError> {
        let incoming = self.incoming(from, into, &state)?;
        let mut profile = self.load(ctx, into)?.unwrap_or_default();
        profile.merge(incoming);
        ctx.put(&profile_key(into), encode_state(&profile)?);
        Ok(())
    }
}

impl Operator for AudiencesOperator {
    fn process(&mut self, record: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        // Most records are a profile's usual update: read in place, no
        // string of it copied (the owned decode was ~20% of the stage).
        if let Some(handled) = self.update_in_place(ctx, record) {
            return handled;
        }
        let reads = &self.set.reads;
        let input = decode_update(record.value, self.set.filters_fingerprint(), |text| {
            reads.parse(text).map(EventTree::into_value)
        })?;
        dispatch(&*self, ctx, input, record.timestamp_ms)
    }

    fn end_batch(&mut self, ctx: &mut Context<'_>) -> Result<(), StoreError> {
        self.cache.flush(ctx)?;
        self.sizes.get_mut().end_batch(ctx, &self.set)
    }

    /// After the audiences changed, every profile again (see `Sweep`).
    fn on_tick(&mut self, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let sweep = Sweep {
            key: b"audience-sweep",
            fingerprint: self.set.fingerprint,
            step: self.sweep_step,
        };
        sweep_step(&sweep, ctx, |ctx, id| self.on_timer(id, ctx))
    }

    fn on_timer(&mut self, key: &[u8], ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        // No flush: the load takes the profile's pending state, and a
        // pending profile never waits (`fired_profile` reads only that).
        let Some(Fired {
            id,
            profile,
            marked,
        }) = fired_profile(ctx, &self.layout, key, |ctx, id| self.load(ctx, id))?
        else {
            return Ok(());
        };
        let now = ctx.now();
        let trigger = Trigger {
            message_id: None,
            tick: Some(now),
            event_time: now,
        };
        self.settle(ctx, &id, profile, &trigger, false)?;
        keep_waiting_mark(ctx, &id, marked)
    }
}
