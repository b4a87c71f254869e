//! What `profile/<id>` holds, so that one point read answers everything a
//! record needs to be routed: whether the profile was merged away (and
//! into whom), whether it waits for merge transfers, and its state.
//!
//! The value's first byte says which:
//! - [`LIVE`]: a live profile that waits for nothing, its state in
//!   postcard after the byte (written by [`encode_state`](super::encode_state));
//! - [`WAITING`]: a live profile that waits for merge transfers (its wait
//!   header under `wait/<id>`, see [`wait`](super::wait)), followed by its
//!   state as stored otherwise, or by nothing when it has none yet;
//! - [`RETIRED`]: merged away, followed by the survivor's id (UTF-8);
//! - anything else is a state an earlier version wrote (postcard behind
//!   version byte 1, or JSON).
//!
//! Earlier versions kept the redirect and the wait in keys of their own
//! (`redirect/<id>`, `wait/<id>`), read for every record: three point reads
//! where this needs one. A store they wrote keeps working: a state in an
//! earlier encoding may have a `wait/<id>` beside it, and a missing value
//! may have either key, so those two cases read them as before
//! ([`Layout`] skips even that once a task's store holds no such key). An
//! old redirect is never rewritten, a wait is marked in the new form the
//! next time it changes.

use std::cell::RefCell;
use std::sync::OnceLock;

use cdp_pipeline::operator::{Context, OperatorError};

use super::profile_key;

/// First byte of a live profile's state that waits for nothing.
pub(crate) const LIVE: u8 = 2;
/// First byte of a live profile's value while it waits for merge transfers.
pub(crate) const WAITING: u8 = 3;
/// First byte of a merged-away profile's value: the survivor's id follows.
pub(crate) const RETIRED: u8 = 4;

/// What `profile/<id>` says of a profile.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Entry {
    /// A live profile (with a state or not yet); `waiting`: it has a wait
    /// header under `wait/<id>`.
    Live { waiting: bool },
    /// Merged away into `survivor`: its records go there.
    Retired { survivor: String },
}

/// Whether a task's store may still hold the keys of the earlier layout
/// (`redirect/<id>`, `wait/<id>` beside a state in an earlier encoding).
/// Asked once per operator instance: the runtime builds an operator after
/// restoring its task's state, and this version never writes those keys
/// again (a wait header it writes is marked in the profile's value too).
#[derive(Debug, Default)]
pub(crate) struct Layout {
    legacy: OnceLock<bool>,
    /// The value of `profile/<id>` that routing the current record read,
    /// for the stage's first load of that profile (so a record reads it
    /// once, not twice); taken by [`Layout::value`], dropped by
    /// [`Layout::forget`] when the record is done.
    kept: RefCell<Option<(String, Option<Vec<u8>>)>>,
}

impl Layout {
    fn legacy(&self, ctx: &Context<'_>) -> Result<bool, OperatorError> {
        if let Some(&legacy) = self.legacy.get() {
            return Ok(legacy);
        }
        // '0' follows '/': the ranges are exactly the two prefixes.
        let legacy = ctx.first_in_range(b"redirect/", b"redirect0")?.is_some()
            || ctx.first_in_range(b"wait/", b"wait0")?.is_some();
        Ok(*self.legacy.get_or_init(|| legacy))
    }

    /// What `profile/<id>` says of `id`: one point read, plus the keys of
    /// the earlier layout where they may still answer.
    pub(crate) fn entry(&self, ctx: &Context<'_>, id: &str) -> Result<Entry, OperatorError> {
        let value = ctx.get(&profile_key(id))?;
        self.classify(ctx, id, value.as_deref())
    }

    /// [`Layout::entry`], keeping the value read for the stage's next
    /// [`Layout::value`] of `id`. The caller hands the record to the stage
    /// before anything writes `profile/<id>`, and calls
    /// [`Layout::forget`] when it is done.
    pub(crate) fn entry_kept(&self, ctx: &Context<'_>, id: &str) -> Result<Entry, OperatorError> {
        let value = ctx.get(&profile_key(id))?;
        let entry = self.classify(ctx, id, value.as_deref())?;
        *self.kept.borrow_mut() = Some((id.to_owned(), value));
        Ok(entry)
    }

    /// Drop the value [`Layout::entry_kept`] kept, if the stage did not take it.
    pub(crate) fn forget(&self) {
        self.kept.borrow_mut().take();
    }

    /// The stored value of `profile/<id>`: the one routing the record kept
    /// (once), or read now.
    pub(crate) fn value(
        &self,
        ctx: &Context<'_>,
        id: &str,
    ) -> Result<Option<Vec<u8>>, OperatorError> {
        let kept = self.kept.borrow_mut().take();
        match kept {
            Some((kept, value)) if kept == id => Ok(value),
            _ => Ok(ctx.get(&profile_key(id))?),
        }
    }

    fn classify(
        &self,
        ctx: &Context<'_>,
        id: &str,
        value: Option<&[u8]>,
    ) -> Result<Entry, OperatorError> {
        match value.and_then(<[u8]>::split_first) {
            Some((&LIVE, _)) => Ok(Entry::Live { waiting: false }),
            Some((&WAITING, _)) => Ok(Entry::Live { waiting: true }),
            Some((&RETIRED, survivor)) => Ok(Entry::Retired {
                survivor: String::from_utf8_lossy(survivor).into_owned(),
            }),
            // A state an earlier version wrote: its wait had a key of its
            // own.
            Some(_) => Ok(Entry::Live {
                waiting: self.legacy(ctx)? && ctx.get(&wait_key(id))?.is_some(),
            }),
            None if self.legacy(ctx)? => {
                if let Some(survivor) = ctx.get(&legacy_redirect_key(id))? {
                    return Ok(Entry::Retired {
                        survivor: String::from_utf8_lossy(&survivor).into_owned(),
                    });
                }
                Ok(Entry::Live {
                    waiting: ctx.get(&wait_key(id))?.is_some(),
                })
            }
            None => Ok(Entry::Live { waiting: false }),
        }
    }
}

/// Where an earlier version kept the survivor of a merged-away profile.
fn legacy_redirect_key(id: &str) -> Vec<u8> {
    [b"redirect/", id.as_bytes()].concat()
}

/// The wait header's key (an earlier version read it for every record,
/// this one only when the profile's value says it waits).
pub(crate) fn wait_key(id: &str) -> Vec<u8> {
    [b"wait/", id.as_bytes()].concat()
}

/// Mark `id`'s value as waiting or not, keeping its state.
pub(crate) fn mark_waiting(
    ctx: &mut Context<'_>,
    id: &str,
    waiting: bool,
) -> Result<(), OperatorError> {
    let key = profile_key(id);
    let current = ctx.get(&key)?;
    let first = current.as_deref().and_then(<[u8]>::first).copied();
    match (current, first, waiting) {
        (None, _, true) => ctx.put(&key, vec![WAITING]),
        // A merged-away profile waits for nothing; one marked already.
        (Some(_), Some(RETIRED), _) | (Some(_), Some(WAITING), true) => {}
        (Some(state), _, true) => {
            let mut marked = Vec::with_capacity(state.len() + 1);
            marked.push(WAITING);
            marked.extend_from_slice(&state);
            ctx.put(&key, marked);
        }
        (Some(marked), Some(WAITING), false) => match marked.get(1..) {
            Some(state) if !state.is_empty() => ctx.put(&key, state.to_vec()),
            _ => ctx.delete(&key),
        },
        (_, _, false) => {}
    }
    Ok(())
}

/// `state` (as [`encode_state`](super::encode_state) wrote it) marked as
/// waiting.
pub(crate) fn waiting_value(state: Vec<u8>) -> Vec<u8> {
    let mut marked = Vec::with_capacity(state.len() + 1);
    marked.push(WAITING);
    marked.extend(state);
    marked
}

/// The value of a profile merged away into `survivor`.
pub(crate) fn retired_value(survivor: &str) -> Vec<u8> {
    let mut value = Vec::with_capacity(survivor.len() + 1);
    value.push(RETIRED);
    value.extend_from_slice(survivor.as_bytes());
    value
}

/// The same profiles as an earlier version would have stored them:
/// redirects and waits in keys of their own, states in postcard version 1.
/// For the tests that an upgraded stage goes on as if nothing changed.
#[cfg(test)]
pub(crate) fn to_earlier_layout<T: serde::Serialize + serde::de::DeserializeOwned>(
    map: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
) -> Result<std::collections::BTreeMap<Vec<u8>, Vec<u8>>, cdp_pipeline::store::StoreError> {
    let mut out = std::collections::BTreeMap::new();
    for (key, value) in map {
        let Some(id) = key.strip_prefix(b"profile/") else {
            out.insert(key.clone(), value.clone());
            continue;
        };
        // The wait header exists beside a waiting profile anyway.
        let value = match value.split_first() {
            Some((&WAITING, state)) => state,
            _ => value.as_slice(),
        };
        match value.split_first() {
            Some((&RETIRED, survivor)) => {
                out.insert([b"redirect/", id].concat(), survivor.to_vec());
            }
            Some((&LIVE, _)) => {
                let state: T = super::encoding::read_state(value)?;
                out.insert(key.clone(), super::encoding::encode_v1(&state)?);
            }
            Some(_) => {
                out.insert(key.clone(), value.to_vec());
            }
            None => {}
        }
    }
    Ok(out)
}
