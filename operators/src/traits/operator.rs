//! The traits operator: dispatch of records and timers.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cdp_pipeline::operator::{Context, Operator, OperatorError, Record};
use cdp_pipeline::store::StoreError;
use serde::Deserialize;
use serde_json::Value;

use super::config::TraitSet;
use super::profile::ProfileState;
use super::state::TraitState;
use super::{MERGE_WAIT_LIMIT, STAGE, STATE_LIMIT_HEADER};
use crate::event_time::TIME_CORRECTED_HEADER;
use crate::messages::{
    self, outputs, wire, Cause, EventRead, Identifiers, ProfileRecord, ProfileUpdate,
};
use crate::profile_keyed::{
    decode_event, decode_state, dispatch, emit_record, encode_state, fired_profile, handle_at_once,
    invalid_transfer, keep_waiting_mark, pass_on_transfer, profile_key, reschedule, retire,
    send_transfer, sweep_step, to_json_value, union_identifier_pairs, union_identifiers,
    unwritable, EventTree, Fired, Layout, Merge, ProfileStage, StageInput, StateCache, Stored,
    Sweep, CACHED_PROFILES, SWEEP_STEP,
};

/// An event as [`TraitsOperator::on_event`] takes it, however it was
/// read: in place from its binary record (a profile's usual event, see
/// `process`) or decoded into a [`ProfileRecord`].
struct Arrival<'a> {
    profile_id: &'a str,
    /// The event's (partial) tree.
    tree: &'a dyn EventRead,
    /// Its JSON text, as the update carries it on.
    text: Cow<'a, str>,
    merged_from: &'a [String],
    record_time: Option<i64>,
}

/// The traits operator of one task.
pub struct TraitsOperator {
    set: Arc<TraitSet>,
    layout: Layout,
    /// The states this task wrote last, decoded (see `StateCache`).
    cache: StateCache<ProfileState>,
    /// The definitions' digests of each config the task recorded, read
    /// once (a config's are a function of its fingerprint: never stale).
    configs: RefCell<HashMap<u64, Option<DefDigests>>>,
    /// This config's are in the task's state.
    recorded: bool,
    /// Profiles evaluated again per tick after the traits changed.
    sweep_step: usize,
}

/// Each trait's definition digest, by name ([`TraitSet::def_fingerprints`]).
type DefDigests = Arc<BTreeMap<String, u64>>;

/// The state key of the definitions' digests of the traits a config
/// fingerprint names (outside `profile/`, `redirect/`, `wait/`). Written
/// by the first batch a task runs under the config, so every state
/// settled under it can be told which of its traits changed since.
fn config_key(fingerprint: u64) -> Vec<u8> {
    format!("trait-config/{fingerprint:016x}").into_bytes()
}

impl TraitsOperator {
    pub fn new(set: Arc<TraitSet>) -> Self {
        Self::with_cache(set, CACHED_PROFILES)
    }

    /// With a cache of `profiles` decoded states (0: every load decodes).
    pub(crate) fn with_cache(set: Arc<TraitSet>, profiles: usize) -> Self {
        TraitsOperator {
            set,
            layout: Layout::default(),
            cache: StateCache::new(profiles),
            configs: RefCell::default(),
            recorded: false,
            sweep_step: SWEEP_STEP,
        }
    }

    /// Evaluate `profiles` profiles a tick (at least 1) after the traits
    /// changed, instead of [`SWEEP_STEP`].
    #[cfg(test)]
    pub(crate) fn with_sweep_step(mut self, profiles: usize) -> Self {
        self.sweep_step = profiles.max(1);
        self
    }

    /// Whether profile `id` (a key's bytes) was last settled under the
    /// running traits, so a sweep has nothing to send for it: in this
    /// batch's pending states, or stored with this config's fingerprint.
    /// Read without taking it from the cache.
    fn settled_now(&self, ctx: &Context<'_>, id: &[u8]) -> Result<bool, OperatorError> {
        let Ok(id) = std::str::from_utf8(id) else {
            return Ok(true);
        };
        if self.cache.is_pending(id) {
            return Ok(true);
        }
        let Some(bytes) = ctx.get(&profile_key(id))? else {
            return Ok(true);
        };
        Ok(matches!(
            decode_state::<ProfileState>(id, &bytes),
            Ok(Stored::Current(state)) if state.config == self.set.fingerprint
        ))
    }

    /// The definitions' digests recorded for the config `fingerprint`.
    fn settled_under(&self, ctx: &Context<'_>, fingerprint: u64) -> Option<DefDigests> {
        let mut configs = self.configs.borrow_mut();
        configs
            .entry(fingerprint)
            .or_insert_with(|| {
                ctx.get_json::<BTreeMap<String, u64>>(&config_key(fingerprint))
                    .ok()
                    .flatten()
                    .map(Arc::new)
            })
            .clone()
    }

    fn load(&self, ctx: &Context<'_>, id: &str) -> Result<Option<ProfileState>, OperatorError> {
        if let Some(state) = self.cache.take_pending(id) {
            return Ok(Some(state));
        }
        let Some(bytes) = self.layout.value(ctx, id)? else {
            return Ok(None);
        };
        if let Some(state) = self.cache.take(id, &bytes) {
            return Ok(Some(state));
        }
        let mut state: ProfileState = match decode_state(id, &bytes)? {
            Stored::Current(state) => state,
            // Written as JSON, before the binary encoding.
            Stored::Json(json) => match serde_json::from_slice(json) {
                Ok(state) => state,
                // A state written before windows had buckets and unique
                // lists kept times: rewrite it once rather than stop the
                // stage.
                Err(_) => self.upgrade(id, json)?,
            },
            // Merged away, or waiting for merges before its first input.
            Stored::Absent => return Ok(None),
        };
        state.conform(&self.set, |config| self.settled_under(ctx, config));
        Ok(Some(state))
    }

    /// Read a profile state of an older layout: window `entries` (one per
    /// event) become buckets, a unique list's `values` become its most
    /// recent values (all as old as can be).
    fn upgrade(&self, id: &str, bytes: &[u8]) -> Result<ProfileState, OperatorError> {
        let decode = |e: serde_json::Error| {
            OperatorError::Store(StoreError::Decode(format!("profile/{id}: {e}")))
        };
        let mut value: Value = serde_json::from_slice(bytes).map_err(decode)?;
        if let Some(computed) = value.get_mut("computed").and_then(Value::as_object_mut) {
            for (name, state) in computed.iter_mut() {
                let Some(def) = self.set.defs.get(name) else {
                    continue;
                };
                let kind = state
                    .get("kind")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let upgraded = match kind {
                    "window" => {
                        let entries: Vec<(i64, String)> = state
                            .get("entries")
                            .cloned()
                            .and_then(|e| serde_json::from_value(e).ok())
                            .unwrap_or_default();
                        let mut fresh = TraitState::empty(def);
                        for (t, text) in &entries {
                            fresh.add(def, *t, text);
                        }
                        Some(fresh)
                    }
                    "unique_list" if state.get("latest").is_none() => {
                        let values: Vec<String> = state
                            .get("values")
                            .cloned()
                            .and_then(|v| serde_json::from_value(v).ok())
                            .unwrap_or_default();
                        Some(TraitState::UniqueList {
                            latest: values.into_iter().map(|v| (v, i64::MIN)).collect(),
                        })
                    }
                    _ => None,
                };
                if let Some(fresh) = upgraded {
                    *state = to_json_value(&fresh)?;
                }
            }
        }
        serde_json::from_value(value).map_err(decode)
    }

    /// Prune, diff and reschedule; returns the changed traits (the caller
    /// stores the state). `touched`: after an event, the traits it may
    /// have changed (see [`ProfileState::refresh_touched`]); `None`
    /// recomputes every value. The profile's timer (`state.timer`) is then
    /// its next window expiry: what its updates announce as
    /// `traits_until`.
    fn settle(
        &self,
        ctx: &mut Context<'_>,
        id: &str,
        state: &mut ProfileState,
        touched: Option<&[&str]>,
    ) -> BTreeMap<String, Value> {
        let changed = match touched {
            Some(touched) => state.refresh_touched(&self.set, state.clock, touched),
            None => state.refresh(&self.set, state.clock),
        };
        let next = state.next_expiry(&self.set);
        reschedule(ctx, id, &mut state.timer, next);
        changed
    }

    /// Apply an event. `identify` adds its identifiers to the profile's.
    /// `merge_limited`: a held event handled without every transfer it
    /// waited for.
    fn on_event(
        &self,
        ctx: &mut Context<'_>,
        event: Arrival<'_>,
        identify: impl FnOnce(&mut Identifiers),
        merge_limited: bool,
        defer: bool,
    ) -> Result<(), OperatorError> {
        let Arrival {
            profile_id,
            tree,
            text,
            merged_from,
            record_time,
        } = event;
        // An event without a time happened "now" in stream time; one too
        // far ahead of the stream is bounded (see `event_time`).
        let own_time = messages::event_time_ms(tree).unwrap_or_else(|| ctx.now());
        let bounded = self
            .set
            .event_time
            .bound(own_time, ctx.now(), record_time)?;
        let event_time = bounded.time;
        let mut state = self.load(ctx, profile_id)?.unwrap_or_default();
        state.clock = state.clock.max(ctx.now()).max(event_time);
        let applied = state.apply_event(&self.set, tree, event_time);
        let mut limited = applied.limited;
        if merge_limited {
            limited.insert(MERGE_WAIT_LIMIT);
        }
        // Identifiers only grow: a record from a partition that has not
        // seen the latest link must not take identifiers away.
        identify(&mut state.identifiers);
        let traits = self.settle(ctx, profile_id, &mut state, Some(&applied.touched));
        // The tree holds the audiences' paths too (`TraitSet::reads`).
        let matched = self.set.forward.as_ref().map(|audiences| {
            (
                audiences.filters_fingerprint(),
                audiences.matching_filters(tree),
            )
        });
        let update = wire::UpdateOut {
            profile_id,
            identifiers: &state.identifiers,
            traits: wire::Traits(&traits),
            event_time,
            time_corrected_from: bounded.corrected_from,
            message_id: tree.field("messageId").and_then(Value::as_str),
            tick: None,
            merged_from,
            traits_until: state.timer,
            event: Some(text),
            matched: matched.as_ref().map(|(f, m)| (*f, m.as_slice())),
        };
        let encoded = wire::write_update(&update);
        // What the stage counts (a header, so no record is parsed again).
        let mut headers = Vec::new();
        if bounded.corrected_from.is_some() {
            headers.push((TIME_CORRECTED_HEADER.to_owned(), b"1".to_vec()));
        }
        if !limited.is_empty() {
            let kinds: Vec<&str> = limited.into_iter().collect();
            headers.push((STATE_LIMIT_HEADER.to_owned(), kinds.join(",").into_bytes()));
        }
        // Stored before the update's encoding is checked: the state may
        // hold this batch's earlier records of the profile, taken from
        // pending, and must not be lost with a record that fails.
        self.cache.store(ctx, profile_id, state, defer)?;
        let bytes = encoded.map_err(unwritable)?;
        ctx.emit_with_headers(
            outputs::NEXT,
            Some(profile_id.as_bytes().to_vec()),
            bytes,
            headers,
        );
        Ok(())
    }

    /// A profile's usual event read in place and handled at once, when it
    /// can be (see `process`); `None`: nothing was done, read it whole.
    fn event_in_place(
        &self,
        ctx: &mut Context<'_>,
        record: &Record<'_>,
    ) -> Option<Result<(), OperatorError>> {
        let view = wire::view_event(record.value)?;
        if view.profile_id.is_empty() || !view.merged_from.is_empty() {
            return None;
        }
        // Not UTF-8, not JSON or not a JSON object: the general path
        // refuses it.
        let text = cdp_pipeline::json::utf8(view.event)?;
        let tree = self.set.reads.parse(text).ok()?;
        if !tree.is_object() {
            return None;
        }
        let event = Arrival {
            profile_id: view.profile_id,
            tree: &tree,
            text: Cow::Borrowed(text),
            merged_from: &[],
            record_time: record.timestamp_ms,
        };
        let identifiers = &view.identifiers;
        handle_at_once(self, ctx, view.profile_id, |ctx| {
            self.on_event(
                ctx,
                event,
                |ids| union_identifier_pairs(ids, identifiers),
                false,
                true,
            )
        })
    }

    fn on_merged(&self, ctx: &mut Context<'_>, merge: Merge) -> Result<(), OperatorError> {
        let (from, into) = (merge.from.as_str(), merge.into.as_str());
        // A profile never seen here still sends its (empty) state: the
        // survivor may be waiting for it.
        let mut state = self.load(ctx, from)?.unwrap_or_default();
        reschedule(ctx, from, &mut state.timer, None);
        state.emitted.clear();
        union_identifiers(&mut state.identifiers, &merge.identifiers);
        let transfer = ProfileRecord::transfer(
            STAGE,
            from.to_owned(),
            into.to_owned(),
            to_json_value(&state)?,
            merge.cause.clone(),
            merge.announced,
        );
        retire(ctx, from, into);
        send_transfer(ctx, into, &transfer)?;
        let from = from.to_owned();
        emit_record(ctx, outputs::NEXT, &from, &merge.forwarded())
    }

    /// A transferred state, read (older layouts upgraded) and fitted to
    /// the configured traits.
    fn incoming(
        &self,
        ctx: &Context<'_>,
        from: &str,
        into: &str,
        state: &Value,
    ) -> Result<ProfileState, OperatorError> {
        let mut incoming = match ProfileState::deserialize(state) {
            Ok(incoming) => incoming,
            // A transfer written by the previous layout: upgrade it too.
            Err(e) => serde_json::to_vec(state)
                .ok()
                .and_then(|bytes| self.upgrade(from, &bytes).ok())
                .ok_or_else(|| invalid_transfer(from, into, &e))?,
        };
        incoming.conform(&self.set, |config| self.settled_under(ctx, config));
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
        let incoming = self.incoming(ctx, &from, &into, &state)?;
        if pass_on_transfer::<ProfileRecord>(
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
        if current.is_none() && incoming.computed.is_empty() && incoming.profile_traits.is_empty() {
            // The (empty) state of a profile never seen here, for a
            // survivor never seen here either: nothing to show.
            return Ok(());
        }
        let mut current = current.unwrap_or_default();
        // What the survivor's updates announced last.
        let announced = current.timer;
        current.merge(&self.set, incoming);
        current.clock = current.clock.max(ctx.now());
        let traits = self.settle(ctx, &into, &mut current, None);
        ctx.put(&profile_key(&into), encode_state(&current)?);
        if traits.is_empty() && current.timer == announced {
            return Ok(());
        }
        let update = ProfileUpdate::Update {
            profile_id: into.clone(),
            identifiers: current.identifiers,
            event: None,
            traits,
            event_time: current.clock,
            time_corrected_from: None,
            cause,
            merged_from: Vec::new(),
            traits_until: current.timer,
        };
        emit_record(ctx, outputs::NEXT, &into, &update)
    }
}

impl ProfileStage for TraitsOperator {
    type Input = ProfileRecord;
    type State = ProfileState;
    const STAGE: &'static str = STAGE;

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn cache(&self) -> &StateCache<ProfileState> {
        &self.cache
    }

    fn handle(
        &self,
        ctx: &mut Context<'_>,
        input: ProfileRecord,
        record_time: Option<i64>,
        limited: bool,
        defer: bool,
    ) -> Result<(), OperatorError> {
        match input {
            ProfileRecord::Event {
                profile_id,
                identifiers,
                event,
                merged_from,
                ..
            } => {
                let text = wire::event_text(&event).map_err(unwritable)?;
                let arrival = Arrival {
                    profile_id: &profile_id,
                    tree: event.value(),
                    text,
                    merged_from: &merged_from,
                    record_time,
                };
                self.on_event(
                    ctx,
                    arrival,
                    |ids| union_identifiers(ids, &identifiers),
                    limited,
                    defer,
                )
            }
            merged @ ProfileRecord::Merged { .. } => match merged.into_merge() {
                Ok(merge) => self.on_merged(ctx, merge),
                Err(_) => Ok(()), // a `merged` record is one
            },
            ProfileRecord::Transfer {
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
        let incoming = self.incoming(ctx, from, into, &state)?;
        let mut current = self.load(ctx, into)?.unwrap_or_default();
        current.merge(&self.set, incoming);
        // `emitted` no longer tells the merged values: the input handled
        // next refreshes every trait.
        current.config = 0;
        ctx.put(&profile_key(into), encode_state(&current)?);
        Ok(())
    }
}

impl Operator for TraitsOperator {
    fn process(&mut self, record: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        // Most records are a profile's usual event: read in place, no
        // string of it copied.
        if let Some(handled) = self.event_in_place(ctx, record) {
            return handled;
        }
        let reads = &self.set.reads;
        let input = decode_event(record.value, |text| {
            reads.parse(text).map(EventTree::into_value)
        })?;
        dispatch(&*self, ctx, input, record.timestamp_ms)
    }

    fn end_batch(&mut self, ctx: &mut Context<'_>) -> Result<(), StoreError> {
        self.cache.flush(ctx)?;
        if !self.recorded {
            let key = config_key(self.set.fingerprint);
            if ctx.get(&key)?.is_none() {
                ctx.put_json(&key, &self.set.def_fingerprints)?;
            }
            self.recorded = true;
        }
        Ok(())
    }

    /// After the traits changed, every profile again (see `Sweep`): a
    /// trait whose definition changed is sent with its new value, so the
    /// audiences stage stops acting on the old one without waiting for
    /// the profile's next event.
    fn on_tick(&mut self, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let sweep = Sweep {
            key: b"trait-sweep",
            fingerprint: self.set.fingerprint,
            step: self.sweep_step,
        };
        sweep_step(&sweep, ctx, |ctx, id| {
            if self.settled_now(ctx, id)? {
                return Ok(());
            }
            self.on_timer(id, ctx)
        })
    }

    fn on_timer(&mut self, key: &[u8], ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        // No flush: the load takes the profile's pending state, and a
        // pending profile never waits (`fired_profile` reads only that).
        let Some(Fired {
            id,
            profile: mut state,
            marked,
        }) = fired_profile(ctx, &self.layout, key, |ctx, id| self.load(ctx, id))?
        else {
            return Ok(());
        };
        let now = ctx.now();
        let traits = self.settle(ctx, &id, &mut state, None);
        ctx.put(&profile_key(&id), encode_state(&state)?);
        keep_waiting_mark(ctx, &id, marked)?;
        // Sent even when no value changed: the `traits_until` the last
        // update announced has passed, and the audiences stage holds the
        // audiences reading traits until it hears the next one.
        let update = ProfileUpdate::Update {
            profile_id: id.clone(),
            identifiers: state.identifiers,
            event: None,
            traits,
            event_time: now,
            time_corrected_from: None,
            cause: Cause {
                message_id: None,
                tick: Some(now),
            },
            merged_from: Vec::new(),
            traits_until: state.timer,
        };
        emit_record(ctx, outputs::NEXT, &id, &update)
    }
}
