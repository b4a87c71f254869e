//! The frame of a record between the profile stages (`<p>.identified`,
//! `<p>.traits`): its origin, position and headers inside the record's
//! value instead of Kafka headers.
//!
//! librdkafka builds every header of a produced record in its own
//! allocation, and on the consuming side parses a record's headers into a
//! list (an allocation per header) the first time they are read. With the
//! position in one header (`cdp-at`) that was still 6–15% of the identity,
//! traits and audiences stages' batches (docs/performance.md). A framed
//! record has no Kafka headers at all:
//!
//! ```text
//! 0xF7 | head length (u16, little-endian) | head (postcard) | payload
//! ```
//!
//! The head is the origin, the position (epoch, offset, index, lineage)
//! and the operator's own headers (`cdp-source`, annotations), borrowed
//! from the value when read. The marker is a byte that never starts UTF-8
//! text nor the profile stages' binary records (`0xF5`, `0xF6`), so a
//! reader tells a framed record from any payload by its first byte. Fields
//! are only ever appended to the head: a reader ignores head bytes after
//! the fields it knows (the head's length says where the payload starts).
//!
//! Frames are read only from internal inputs: on a topic outside producers
//! write, a value starting with `0xF7` is just a payload (the runtime
//! strips their `cdp-` headers for the same reason).

use serde::de::{Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use super::{HeaderRef, Position};

/// First byte of a framed record.
pub const FRAME_V1: u8 = 0xF7;

/// Marker and head length.
const PREFIX: usize = 3;

/// A framed record's parts, borrowed from its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framed<'a> {
    pub origin: &'a str,
    pub position: Position,
    /// The producing operator's own headers, in order.
    pub headers: Vec<HeaderRef<'a>>,
    pub payload: &'a [u8],
}

/// A header's value as postcard bytes (a length, then the bytes), read
/// without copying.
#[derive(Debug, Clone, Copy)]
struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Bytes<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Borrowed<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Borrowed<'a> {
            type Value = Bytes<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("borrowed bytes")
            }
            fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<Bytes<'a>, E> {
                Ok(Bytes(v))
            }
        }
        d.deserialize_bytes(Borrowed(std::marker::PhantomData))
    }
}

/// The head as read, field for field; new fields go last (and in
/// [`HeadOut`]).
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    origin: &'a str,
    epoch: u32,
    offset: i64,
    index: u32,
    lineage: u64,
    #[serde(borrow)]
    headers: Vec<(&'a str, Bytes<'a>)>,
}

/// The head as written: [`Head`]'s fields, the headers straight from the
/// caller's iterator (no vector collected per record).
#[derive(Serialize)]
#[serde(bound(serialize = "Pairs<I>: Serialize"))]
struct HeadOut<'a, I> {
    origin: &'a str,
    epoch: u32,
    offset: i64,
    index: u32,
    lineage: u64,
    headers: Pairs<I>,
}

/// Headers written as a postcard sequence of `(name, bytes)`.
struct Pairs<I>(I);

impl<'h, I: Iterator<Item = (&'h str, &'h [u8])> + Clone> Serialize for Pairs<I> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.clone().map(|(k, v)| (k, Bytes(v))))
    }
}

/// Append the frame of a record from `origin` at `position` with
/// `headers`, then `payload`, to `out`. `false` (and `out` as it was) when
/// the head does not fit its 16-bit length: the caller stamps the record
/// with Kafka headers instead.
pub fn write<'h>(
    out: &mut Vec<u8>,
    origin: &str,
    position: &Position,
    headers: impl IntoIterator<Item = (&'h str, &'h [u8]), IntoIter: Clone>,
    payload: &[u8],
) -> bool {
    let head = HeadOut {
        origin,
        epoch: position.epoch,
        offset: position.offset,
        index: position.index,
        lineage: position.lineage,
        headers: Pairs(headers.into_iter()),
    };
    let start = out.len();
    out.extend_from_slice(&[FRAME_V1, 0, 0]);
    let written = postcard::to_extend(&head, Append(out)).is_ok();
    let len = u16::try_from(out.len() - start - PREFIX);
    match len {
        Ok(len) if written => {
            out[start + 1..start + PREFIX].copy_from_slice(&len.to_le_bytes());
            out.extend_from_slice(payload);
            true
        }
        _ => {
            out.truncate(start);
            false
        }
    }
}

/// Appends to a buffer postcard writes into (it takes its writer by value).
struct Append<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Append<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        self.0.extend(bytes);
    }
}

/// The frame of `value`: `None` when it is not framed (no [`FRAME_V1`]
/// marker, or a head that does not read: the value is then handed on as
/// it is, and the stage's reader refuses it as a dead letter).
pub fn read(value: &[u8]) -> Option<Framed<'_>> {
    let (&FRAME_V1, rest) = value.split_first()? else {
        return None;
    };
    let len = usize::from(u16::from_le_bytes([*rest.first()?, *rest.get(1)?]));
    let head_bytes = rest.get(2..2 + len)?;
    let payload = rest.get(2 + len..)?;
    // Bytes after the fields this version knows are a later version's.
    let (head, _later) = postcard::take_from_bytes::<Head<'_>>(head_bytes).ok()?;
    Some(Framed {
        origin: head.origin,
        position: Position {
            epoch: head.epoch,
            offset: head.offset,
            index: head.index,
            lineage: head.lineage,
        },
        headers: head.headers.into_iter().map(|(k, v)| (k, v.0)).collect(),
        payload,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn position(epoch: u32, offset: i64, index: u32, lineage: u64) -> Position {
        Position {
            epoch,
            offset,
            index,
            lineage,
        }
    }

    fn arb_position() -> impl Strategy<Value = Position> {
        (any::<u32>(), any::<i64>(), any::<u32>(), any::<u64>())
            .prop_map(|(epoch, offset, index, lineage)| position(epoch, offset, index, lineage))
    }

    proptest! {
        /// Whatever the origin, position, headers and payload, a frame
        /// reads back as what was written, behind any bytes already in
        /// the buffer.
        #[test]
        fn a_frame_reads_back_as_written(
            before in prop::collection::vec(any::<u8>(), 0..8),
            origin in ".{0,20}",
            position in arb_position(),
            headers in prop::collection::vec((".{0,12}", prop::collection::vec(any::<u8>(), 0..20)), 0..4),
            payload in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut out = before.clone();
            let pairs = headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
            prop_assert!(write(&mut out, &origin, &position, pairs, &payload));
            prop_assert_eq!(&out[..before.len()], &before[..]);
            let framed = read(&out[before.len()..]);
            let expected: Vec<HeaderRef<'_>> =
                headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
            prop_assert_eq!(framed, Some(Framed {
                origin: &origin,
                position,
                headers: expected,
                payload: &payload,
            }));
        }

        /// Any bytes read as a frame or as nothing; never a panic.
        #[test]
        fn any_bytes_read_or_not_without_panic(
            tail in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut value = vec![FRAME_V1];
            value.extend_from_slice(&tail);
            let _ = read(&value);
            if tail.first() != Some(&FRAME_V1) {
                prop_assert_eq!(read(&tail), None);
            }
        }
    }

    #[test]
    fn only_a_value_with_the_marker_is_a_frame() {
        for payload in [&b"{\"type\":\"track\"}"[..], &[0xF5, 0], &[0xF6, 0], b""] {
            assert_eq!(read(payload), None, "{payload:?}");
        }
    }

    #[test]
    fn a_later_head_field_is_skipped_and_the_payload_still_found() {
        let position = position(2, 10, 1, 3);
        let mut out = Vec::new();
        assert!(write(&mut out, "traits:0", &position, [], b"payload"));
        // A later version appends a field to the head: longer head, same
        // payload after it.
        let head_len = usize::from(u16::from_le_bytes([out[1], out[2]]));
        let mut later = out[..PREFIX + head_len].to_vec();
        later.extend_from_slice(&[0x2a, 0x2a]);
        let new_len = u16::try_from(head_len + 2).unwrap_or(u16::MAX);
        later[1..PREFIX].copy_from_slice(&new_len.to_le_bytes());
        later.extend_from_slice(b"payload");
        let framed = read(&later);
        assert_eq!(framed.as_ref().map(|f| f.payload), Some(&b"payload"[..]));
        assert_eq!(framed.map(|f| f.position), Some(position));
    }

    #[test]
    fn a_head_too_large_for_its_length_is_refused_and_the_buffer_kept() {
        let position = position(1, 1, 0, 0);
        let big = vec![b'x'; 70_000];
        let mut out = b"kept".to_vec();
        assert!(!write(
            &mut out,
            "o",
            &position,
            [("h", big.as_slice())],
            b"p"
        ));
        assert_eq!(out, b"kept");
    }

    #[test]
    fn a_damaged_head_is_not_a_frame() {
        let position = position(1, 1, 0, 0);
        let mut out = Vec::new();
        assert!(write(&mut out, "identity:0", &position, [], b"{}"));
        // A head length past the end.
        let mut long = out.clone();
        long[1..PREFIX].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(read(&long), None);
        // An origin that is not UTF-8.
        let mut bad = out.clone();
        bad[PREFIX + 1] = 0xff;
        assert_eq!(read(&bad), None);
    }
}
