//! How the identity stage stores a profile under `profile/<id>`.
//!
//! A [`ProfileState`] is written as [postcard](https://docs.rs/postcard)
//! (positional, varint numbers, no field names) behind one version byte,
//! [`POSTCARD`]. States written before, as JSON (they start with `{`), still
//! load: the stage upgrades in place, rewriting a profile in postcard the
//! next time it changes. Identity reads one or more profile states per
//! event, and parsing them as JSON was the largest part of its operator's
//! time (docs/performance.md, "Identity's state in postcard").
//!
//! The state's JSON shape skips empty fields and flattens the audit trail's
//! identifier, which a positional encoding cannot do; the binary form is
//! therefore its own plain shape ([`Binary`]). A field added later goes
//! last, with a default whose encoding is one zero byte (`None`, `0`, an
//! empty collection): a state that ends early decodes as if zeros followed,
//! the rule the traits and audiences states follow.

use cdp_pipeline::store::StoreError;
use serde::{Deserialize, Serialize};

use super::graph::ProfileState;
use crate::messages::{AuditDrop, DroppedIdentifier, Identifiers, MergedFrom};
use crate::profile_keyed::decode_padded;

/// First byte of a state in postcard. JSON states start with `{`.
pub(super) const POSTCARD: u8 = 1;

/// One merged-away profile: id, time, message id.
type BinaryMergedFrom = (String, Option<String>, Option<String>);
/// One refused identifier: type, value, reason, time, message id.
type BinaryDrop = (String, String, String, Option<String>, Option<String>);

/// The binary layout of a [`ProfileState`], field for field.
#[derive(Serialize, Deserialize)]
struct Binary {
    identifiers: Identifiers,
    merges: u64,
    merged_into: Option<String>,
    merged_from: Vec<BinaryMergedFrom>,
    dropped: Vec<BinaryDrop>,
}

/// Encode a state for the store.
pub(super) fn encode(state: &ProfileState) -> Result<Vec<u8>, StoreError> {
    // Borrowing would save the clones, but the shapes differ; a state is
    // small (its identifiers, a few merges, at most 50 refused ones) and is
    // written only when it changes.
    let binary = Binary {
        identifiers: state.identifiers.clone(),
        merges: u64::try_from(state.merges).unwrap_or(u64::MAX),
        merged_into: state.merged_into.clone(),
        merged_from: state
            .merged_from
            .iter()
            .map(|m| (m.id.clone(), m.at.clone(), m.message_id.clone()))
            .collect(),
        dropped: state
            .dropped
            .iter()
            .map(|d| {
                let id = &d.identifier;
                let (at, message_id) = (d.at.clone(), d.message_id.clone());
                (
                    id.kind.clone(),
                    id.value.clone(),
                    id.reason.clone(),
                    at,
                    message_id,
                )
            })
            .collect(),
    };
    postcard::to_extend(&binary, vec![POSTCARD])
        .map_err(|e| StoreError::Decode(format!("encode profile state: {e}")))
}

/// Decode the value of `key` (a `profile/<id>` key): postcard behind
/// [`POSTCARD`], or JSON as written before.
pub(super) fn decode(key: &[u8], bytes: &[u8]) -> Result<ProfileState, StoreError> {
    let fail = |e: &dyn std::fmt::Display| {
        StoreError::Decode(format!("{}: {e}", String::from_utf8_lossy(key)))
    };
    let Some((&POSTCARD, rest)) = bytes.split_first() else {
        return serde_json::from_slice(bytes).map_err(|e| fail(&e));
    };
    let binary: Binary = decode_padded(rest, |b| postcard::from_bytes(b)).map_err(|e| fail(&e))?;
    Ok(from_binary(binary))
}

fn from_binary(binary: Binary) -> ProfileState {
    ProfileState {
        identifiers: binary.identifiers,
        merges: usize::try_from(binary.merges).unwrap_or(usize::MAX),
        merged_into: binary.merged_into,
        merged_from: binary
            .merged_from
            .into_iter()
            .map(|(id, at, message_id)| MergedFrom { id, at, message_id })
            .collect(),
        dropped: binary
            .dropped
            .into_iter()
            .map(|(kind, value, reason, at, message_id)| AuditDrop {
                identifier: DroppedIdentifier {
                    kind,
                    value,
                    reason,
                },
                at,
                message_id,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn arb_text() -> impl Strategy<Value = String> {
        "[a-z0-9@._-]{0,12}"
    }

    fn arb_state() -> impl Strategy<Value = ProfileState> {
        let identifiers =
            prop::collection::btree_map(arb_text(), prop::collection::vec(arb_text(), 0..3), 0..4);
        let merged_from = prop::collection::vec(
            (
                arb_text(),
                prop::option::of(arb_text()),
                prop::option::of(arb_text()),
            ),
            0..3,
        );
        let dropped = prop::collection::vec(
            (
                arb_text(),
                arb_text(),
                arb_text(),
                prop::option::of(arb_text()),
                prop::option::of(arb_text()),
            ),
            0..3,
        );
        (
            identifiers,
            any::<u32>(),
            prop::option::of(arb_text()),
            merged_from,
            dropped,
        )
            .prop_map(|(identifiers, merges, merged_into, merged_from, dropped)| {
                from_binary(Binary {
                    identifiers,
                    merges: u64::from(merges),
                    merged_into,
                    merged_from,
                    dropped,
                })
            })
    }

    proptest! {
        /// Every state reads back as itself from postcard and from the JSON
        /// written before, and the binary form is the smaller.
        #[test]
        fn a_state_reads_back_from_either_encoding(state in arb_state()) {
            let binary = encode(&state).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(binary.first(), Some(&POSTCARD));
            let read = decode(b"profile/p", &binary).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&read, &state);
            let json = serde_json::to_vec(&state).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let read = decode(b"profile/p", &json).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&read, &state);
            prop_assert!(binary.len() < json.len());
        }
    }

    #[test]
    fn a_damaged_state_is_an_error_naming_its_key() {
        let err = decode(b"profile/p1", &[POSTCARD, 0xff])
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("profile/p1")));
        let err = decode(b"profile/p2", b"{not json")
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("profile/p2")));
    }
}
