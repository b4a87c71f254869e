//! The identity stage (Segment Unify): `<p>.valid` → `<p>.identified` and
//! `<p>.profiles`.
//!
//! Each event's identifiers (user id, anonymous id, email, phone, device id,
//! external ids, an alias's `previousId`; only the types configured under
//! `identity.identifiers`) are looked up in the identity graph ([`graph`]).
//! No known identifier creates a profile whose id is derived from the
//! event's strongest identifier (`prof_` + 20 hex chars of its SHA-256);
//! one profile gets the new identifiers attached; several are merged into
//! one survivor (the profile with the strongest identifier). Segment's rule
//! keeps limits: while resolving the event would give a profile more
//! distinct values of a type than its `limit`, or exceed `max_merges`, the
//! lowest-priority identifier of the event involved in the conflict is
//! dropped (not attached, not followed) and the rest re-resolved.
//!
//! An alias's `previousId` takes the type under which the graph already
//! knows it (strongest type first: an old `userId` stays a user id), else
//! `anonymous_id`.
//!
//! Outputs: for a merge, one [`ProfileRecord::Merged`] per merged-away
//! profile (keyed by `from`, `announced`), then always one
//! [`ProfileRecord::Event`] keyed by the profile id, with every identifier
//! of the profile after the event, the identifiers a rule refused, the
//! profiles it merged away (`merged_from`: later stages fold their states
//! in before evaluating the event), and the `cdp-source` header passed
//! through; and, to [`outputs::PROFILES`], a [`ProfileSnapshot`] of every
//! profile the event changed (created, grown, merged, audited).
//!
//! Exactness: outputs and state are a function of (state, record), with
//! every collection ordered. The stage reads a single-partition input (see
//! docs/ARCHITECTURE.md, "Identity: one serial graph"), so the graph after
//! any set of events is what one sequential pass of these rules over them,
//! in that partition's order, gives — whatever raw partition, validate task
//! or identity instance each event passed through. Where no limit is hit,
//! the profiles are the connected components of "appear in the same event"
//! whatever the order. Both are property tested against an independent
//! reference (`operators/tests/identity_reference.rs`).

mod config;
mod fields;
mod graph;
mod stored;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use cdp_pipeline::envelope::SOURCE;
use cdp_pipeline::store::StoreError;
use cdp_pipeline::{Context, Operator, OperatorError, Record};
use serde_json::{json, Value};

pub use config::{
    DropReason, Extracted, IdentifierRule, IdentityConfig, IdentityRules, MAX_IDENTIFIER_BYTES,
};
pub use graph::MAX_AUDIT_DROPS;

use crate::messages::{
    outputs, wire, Cause, DroppedIdentifier, ProfileRecord, ProfileSnapshot, ProfileStatus,
};
use crate::profile_keyed::unwritable;
use config::Identifier;
use fields::{EventFields, Leaf};
use graph::{id_key, Known, ProfileState, Provenance, Resolution};

/// The identity operator of one task. See the module doc.
#[derive(Debug, Clone)]
pub struct IdentityOperator {
    rules: Arc<IdentityRules>,
}

impl IdentityOperator {
    pub fn new(rules: Arc<IdentityRules>) -> Self {
        IdentityOperator { rules }
    }

    /// The type of an alias's `previousId`: the strongest configured type
    /// under which the graph knows the value, else `anonymous_id` (or, if
    /// that is not configured, the strongest type).
    fn type_previous_id(
        &self,
        ctx: &Context<'_>,
        raw: &Leaf<'_>,
    ) -> Result<Result<Identifier, DroppedIdentifier>, StoreError> {
        let types = self.rules.types_by_priority();
        for kind in &types {
            if let Ok(value) = self.rules.normalize(kind, raw) {
                if ctx.get(&id_key(kind, &value))?.is_some() {
                    return Ok(Ok((kind.to_string(), value)));
                }
            }
        }
        let fallback = if self.rules.is_configured("anonymous_id") {
            "anonymous_id"
        } else {
            types.first().copied().unwrap_or("anonymous_id")
        };
        Ok(match self.rules.normalize(fallback, raw) {
            Ok(value) => Ok((fallback.to_string(), value)),
            Err(reason) => Err(DroppedIdentifier {
                kind: fallback.to_string(),
                value: raw.display(),
                reason: reason.as_str().to_string(),
            }),
        })
    }

    /// Every identifier of the event, the alias's previous id typed.
    fn identifiers(&self, ctx: &Context<'_>, event: &EventFields) -> Result<Extracted, StoreError> {
        let mut extracted = self.rules.extract(event);
        if let Some(previous) = extracted.previous_id.take() {
            match self.type_previous_id(ctx, &previous)? {
                Ok(id) => {
                    extracted.ids.insert(id);
                }
                Err(dropped) => extracted.dropped.push(dropped),
            }
        }
        Ok(extracted)
    }
}

/// The fields identity reads, and the event's bytes as they go out: the
/// input itself when the typed parse takes it (nothing re-encoded), else
/// the event re-encoded from a full parse.
fn parse_event(
    value: &[u8],
) -> Result<(EventFields<'_>, std::borrow::Cow<'_, [u8]>), OperatorError> {
    if let Some(fields) = EventFields::parse(value) {
        return Ok((fields, std::borrow::Cow::Borrowed(value)));
    }
    let event: Value = serde_json::from_slice(value)
        .map_err(|e| OperatorError::rejected("invalid_json", json!({ "error": e.to_string() })))?;
    if !event.is_object() {
        return Err(OperatorError::rejected(
            "invalid_json",
            json!({ "error": "expected a JSON object" }),
        ));
    }
    let bytes = encode(&event)?;
    Ok((
        EventFields::from_value(&event),
        std::borrow::Cow::Owned(bytes),
    ))
}

impl Operator for IdentityOperator {
    fn process(&mut self, record: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let (fields, event) = parse_event(record.value)?;
        let message_id = fields.message_id();
        // A time beyond `event_time.max_future` is not written as it came.
        let recorded = self
            .rules
            .recorded_time(fields.at(), ctx.now(), record.timestamp_ms);
        let corrected = recorded
            .filter(|(_, corrected)| *corrected)
            .map(|(ms, _)| crate::messages::rfc3339_ms(ms));
        let cause = Provenance {
            at: corrected.as_deref().or(fields.at()),
            at_ms: recorded.map(|(ms, _)| ms),
            message_id,
        };
        let Extracted {
            ids, mut dropped, ..
        } = self.identifiers(ctx, &fields)?;
        if ids.is_empty() {
            return Err(OperatorError::rejected(
                "no_identifier",
                json!({ "message_id": message_id, "dropped": dropped }),
            ));
        }

        let known = Known::read(ctx, &ids)?;
        let (kept, refused) = graph::settle_conflicts(&self.rules, ids, &known);
        dropped.extend(refused);
        let resolution = if known.linked_any(&kept) {
            graph::attach(&self.rules, &kept, known, &cause)
        } else {
            graph::create(ctx, &self.rules, &kept)?
        };
        let Some(mut resolution) = resolution else {
            return Err(OperatorError::rejected(
                "no_identifier",
                json!({ "message_id": message_id, "dropped": dropped }),
            ));
        };
        resolution.audit(&dropped, &cause);
        let outputs = encode_outputs(&resolution, &event, dropped, &cause)?;
        write(ctx, &resolution)?;
        emit(ctx, record, outputs);
        Ok(())
    }
}

/// One output of an event: (output name, key, value, is the event itself).
type Output = (&'static str, String, Vec<u8>, bool);

/// Every output of the event, encoded before any write.
fn encode_outputs(
    resolution: &Resolution,
    event: &[u8],
    dropped: Vec<DroppedIdentifier>,
    cause: &Provenance<'_>,
) -> Result<Vec<Output>, OperatorError> {
    let record_cause = Cause {
        message_id: cause.message_id.map(String::from),
        tick: None,
    };
    let merged_at = cause.at.and_then(crate::messages::parse_time_ms);
    let mut out = Vec::new();
    for from in resolution.merged.keys() {
        let merged = ProfileRecord::Merged {
            from: from.clone(),
            into: resolution.profile_id.clone(),
            identifiers: resolution.profile.identifiers.clone(),
            cause: record_cause.clone(),
            announced: true,
            at: merged_at,
        };
        out.push((outputs::NEXT, from.clone(), encode(&merged)?, false));
    }
    out.push((
        outputs::NEXT,
        resolution.profile_id.clone(),
        encode_event(resolution, event, &dropped)?,
        true,
    ));
    for (from, (state, held)) in &resolution.merged {
        let snapshot = snapshot(from, state, held.clone(), cause, &record_cause);
        out.push((outputs::PROFILES, from.clone(), encode(&snapshot)?, false));
    }
    if resolution.changed {
        let p = &resolution.profile;
        let snapshot = snapshot(
            &resolution.profile_id,
            p,
            p.identifiers.clone(),
            cause,
            &record_cause,
        );
        out.push((
            outputs::PROFILES,
            resolution.profile_id.clone(),
            encode(&snapshot)?,
            false,
        ));
    }
    Ok(out)
}

fn snapshot(
    profile_id: &str,
    state: &ProfileState,
    identifiers: crate::messages::Identifiers,
    provenance: &Provenance<'_>,
    cause: &Cause,
) -> ProfileSnapshot {
    ProfileSnapshot {
        profile_id: profile_id.to_string(),
        state: if state.merged_into.is_some() {
            ProfileStatus::Merged
        } else {
            ProfileStatus::Active
        },
        merged_into: state.merged_into.clone(),
        identifiers,
        merged_from: state.merged_from.clone(),
        dropped: state.dropped.clone(),
        merges: state.merges,
        // One format whatever the client sent (`…t…z`, a space, micros):
        // consumers compare these as text.
        updated_at: provenance
            .at_ms
            .map(crate::messages::rfc3339_ms)
            .or_else(|| provenance.at.map(String::from)),
        cause: cause.clone(),
    }
}

fn write(ctx: &mut Context<'_>, resolution: &Resolution) -> Result<(), StoreError> {
    for (kind, value) in &resolution.repoint {
        ctx.put_json(&id_key(kind, value), &resolution.profile_id)?;
    }
    for (from, (state, _)) in &resolution.merged {
        graph::store(ctx, from, state)?;
    }
    if resolution.changed {
        graph::store(ctx, &resolution.profile_id, &resolution.profile)?;
    }
    Ok(())
}

fn emit(ctx: &mut Context<'_>, record: &Record<'_>, outputs: Vec<Output>) {
    let source = record.header(SOURCE);
    for (output, key, value, is_event) in outputs {
        // Only the event itself carries the source on (one per input).
        let headers = source
            .filter(|_| is_event)
            .map(|s| (SOURCE.to_string(), s.as_bytes().to_vec()))
            .into_iter()
            .collect();
        ctx.emit_with_headers(output, Some(key.into_bytes()), value, headers);
    }
}

/// A [`ProfileRecord::Event`] around the event's bytes as they came, in
/// the binary form ([`crate::messages::wire`]): the event is not
/// re-encoded, and the traits stage reads it without scanning it for its
/// end.
fn encode_event(
    resolution: &Resolution,
    event: &[u8],
    dropped: &[DroppedIdentifier],
) -> Result<Vec<u8>, OperatorError> {
    wire::encode_event(
        &resolution.profile_id,
        &resolution.profile.identifiers,
        event,
        dropped,
        &resolution.merged.keys().collect::<Vec<_>>(),
    )
    .map_err(unwritable)
}

fn encode<T: serde::Serialize>(record: &T) -> Result<Vec<u8>, OperatorError> {
    serde_json::to_vec(record).map_err(unwritable)
}
