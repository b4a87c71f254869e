//! What the runtime writes beside every record: its origin, the epoch its
//! task ran under, and its position. Consumers use them to drop replays.
//!
//! A record produced by task `(stage, partition)` while processing input
//! offset `o` as its `i`-th output has position `(o, i)`. A task that crashes
//! between producing and committing replays the same inputs into the same
//! positions, and every consuming task drops a position it has already
//! applied from that origin. Epochs fence zombies: once a consumer has seen
//! epoch `e` from an origin it ignores anything older. A *lineage* names
//! the incarnation of the origin's changelog: after a reset (a recreated
//! changelog, a broker that lost its data) epochs and offsets start again
//! from the bottom under a new lineage, and a consumer that sees a lineage
//! change starts that origin's positions afresh instead of dropping
//! everything as a replay.
//!
//! librdkafka parses and allocates every header of every consumed record
//! (~800 instructions a header) and builds every header of every produced
//! one (docs/performance.md). So records on `<p>.valid`, which only cdp
//! stages consume, carry the four in one header, [`AT`]; the records
//! between the profile stages (`<p>.identified`, `<p>.traits`) carry them
//! inside their value ([`frame`]), with no Kafka header at all. Public
//! topics (`<p>.audiences`, `<p>.profiles`, dead letters) keep the four
//! headers, which their consumers read. A reader takes every form.

use serde::{Deserialize, Serialize};

pub mod frame;

/// Header: `stage:partition` of the task that produced the record.
pub const ORIGIN: &str = "cdp-origin";
/// Header: the producing task's epoch (decimal).
pub const EPOCH: &str = "cdp-epoch";
/// Header: `offset:index` of the record within its origin.
pub const POSITION: &str = "cdp-pos";
/// Header: the lineage of the producing task's changelog (16 hex digits).
pub const LINEAGE: &str = "cdp-lineage";
/// Header: the whole position in one, `origin epoch offset:index lineage`
/// (space-separated, the values of the four headers above), on topics only
/// cdp stages read.
pub const AT: &str = "cdp-at";
/// Header: stream time in ms carried by a tick record (decimal).
pub const TICK: &str = "cdp-tick";
/// Every header the runtime reads or writes starts with this.
pub const RUNTIME_HEADER_PREFIX: &str = "cdp-";
/// Header: the source id (from `sources[].id`) an event came in through.
pub const SOURCE: &str = "cdp-source";
/// Headers of dead letters.
pub const DLQ_STAGE: &str = "cdp-dlq-stage";
pub const DLQ_REASON: &str = "cdp-dlq-reason";
/// Set on a dead letter whose original bytes were left out to fit
/// `kafka.max_record_bytes`: how many (the original is where
/// `cdp-dlq-input` says, while the topic's retention keeps it).
pub const DLQ_DROPPED_BYTES: &str = "cdp-dlq-dropped-bytes";

/// A header as the runtime reads it: borrowed from the consumed message.
pub type HeaderRef<'a> = (&'a str, &'a [u8]);

/// A header as `(name, value)`, owned (what operators emit) or borrowed
/// (what the runtime reads from a consumed message without copying it).
pub trait HeaderPair {
    fn name(&self) -> &str;
    fn value(&self) -> &[u8];
}

impl HeaderPair for (String, Vec<u8>) {
    fn name(&self) -> &str {
        &self.0
    }
    fn value(&self) -> &[u8] {
        &self.1
    }
}

impl HeaderPair for (&str, &[u8]) {
    fn name(&self) -> &str {
        self.0
    }
    fn value(&self) -> &[u8] {
        self.1
    }
}

/// The first header called `name`, as UTF-8 if it is.
pub fn header_str<'a, H: HeaderPair>(headers: &'a [H], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name() == name)
        .and_then(|h| std::str::from_utf8(h.value()).ok())
}

/// Where a record sits in its origin's output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub epoch: u32,
    pub offset: i64,
    pub index: u32,
    /// 0 for records of writers that predate lineages.
    #[serde(default)]
    pub lineage: u64,
}

impl Position {
    /// Whether a record at `self` must be applied after `seen` was the
    /// highest applied position of the same origin. Older epochs are
    /// fenced; within the newest epoch, positions must increase. A new
    /// lineage is a reset of the origin: its positions start afresh.
    pub fn is_new_after(&self, seen: &Position) -> bool {
        self.lineage != seen.lineage
            || (self.epoch >= seen.epoch && (self.offset, self.index) > (seen.offset, seen.index))
    }

    /// Parse the origin headers of a record. `None` when it carries none
    /// (records from outside the pipeline, e.g. the collector).
    pub fn from_headers<H: HeaderPair>(headers: &[H]) -> Option<(String, Position)> {
        Self::from_headers_ref(headers).map(|(origin, pos)| (origin.to_string(), pos))
    }

    /// [`Position::from_headers`] without copying the origin.
    pub fn from_headers_ref<H: HeaderPair>(headers: &[H]) -> Option<(&str, Position)> {
        let get = |name: &str| header_str(headers, name);
        if let Some(at) = get(AT) {
            return Self::from_at(at);
        }
        let origin = get(ORIGIN)?;
        let lineage = get(LINEAGE).map(str::as_bytes);
        Self::from_text(get(EPOCH)?.as_bytes(), get(POSITION)?.as_bytes(), lineage)
            .map(|p| (origin, p))
    }

    /// The origin and position in an [`AT`] header's value. The origin
    /// is everything before the last three fields. Read as bytes: every
    /// record of an internal topic is read through here, and splitting
    /// and parsing it with `str`'s generic tools cost ~1,100 instructions
    /// a record (3% of the audiences stage's batch).
    fn from_at(at: &str) -> Option<(&str, Position)> {
        let bytes = at.as_bytes();
        let last_space = |end: usize| bytes[..end].iter().rposition(|&b| b == b' ');
        let lineage_at = last_space(bytes.len())?;
        let position_at = last_space(lineage_at)?;
        let epoch_at = last_space(position_at)?;
        let origin = at.get(..epoch_at)?;
        Self::from_text(
            &bytes[epoch_at + 1..position_at],
            &bytes[position_at + 1..lineage_at],
            Some(&bytes[lineage_at + 1..]),
        )
        .map(|p| (origin, p))
    }

    /// A position from its headers' text: the epoch, `offset:index`, the
    /// lineage in hex (absent: 0, a writer that predates lineages).
    fn from_text(epoch: &[u8], position: &[u8], lineage: Option<&[u8]>) -> Option<Position> {
        let colon = position.iter().position(|&b| b == b':')?;
        let lineage = match lineage {
            Some(l) => number::unsigned(l, 16)?,
            None => 0,
        };
        Some(Position {
            epoch: u32::try_from(number::unsigned(epoch, 10)?).ok()?,
            offset: number::signed(&position[..colon])?,
            index: u32::try_from(number::unsigned(&position[colon + 1..], 10)?).ok()?,
            lineage,
        })
    }

    /// The [`AT`] header of a record from `origin` at this position.
    pub fn to_at_header(&self, origin: &str) -> (String, Vec<u8>) {
        (AT.to_string(), self.header_values().at(origin))
    }

    pub fn to_headers(&self, origin: &str) -> [(String, Vec<u8>); 4] {
        self.header_values()
            .stamp(origin)
            .map(|(name, value)| (name.to_string(), value.to_vec()))
    }

    /// The values of the [`EPOCH`], [`POSITION`] and [`LINEAGE`] headers.
    pub fn header_values(&self) -> HeaderValues {
        HeaderValues::new(self)
    }
}

/// Integers read from header bytes as `str::parse` and `from_str_radix`
/// read them (an optional sign, then at least one digit; `None` on
/// anything else or on overflow), without their generic machinery.
mod number {
    /// An unsigned number in `radix` (10 or 16), with an optional `+`.
    pub(super) fn unsigned(text: &[u8], radix: u64) -> Option<u64> {
        digits(text.strip_prefix(b"+").unwrap_or(text), radix)
    }

    /// A signed decimal number.
    pub(super) fn signed(text: &[u8]) -> Option<i64> {
        match text.split_first() {
            Some((b'-', rest)) => 0i64.checked_sub_unsigned(digits(rest, 10)?),
            _ => i64::try_from(unsigned(text, 10)?).ok(),
        }
    }

    fn digits(text: &[u8], radix: u64) -> Option<u64> {
        if text.is_empty() {
            return None;
        }
        text.iter().try_fold(0u64, |n, &c| {
            let digit = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' if radix == 16 => c - b'a' + 10,
                b'A'..=b'F' if radix == 16 => c - b'A' + 10,
                _ => return None,
            };
            n.checked_mul(radix)?.checked_add(u64::from(digit))
        })
    }
}

/// The text of a position's headers, written on the stack: every output
/// record carries them, and three formatted strings per record were ~2% of
/// a stage's batch (docs/performance.md, "Recent values").
pub struct HeaderValues {
    buf: [u8; HeaderValues::CAPACITY],
    epoch_end: usize,
    position_end: usize,
    len: usize,
}

impl HeaderValues {
    /// An epoch (10 digits), an offset (20 and a sign), `:`, an index (10)
    /// and a lineage (16 hex digits).
    const CAPACITY: usize = 64;

    fn new(pos: &Position) -> Self {
        let mut v = HeaderValues {
            buf: [0; Self::CAPACITY],
            epoch_end: 0,
            position_end: 0,
            len: 0,
        };
        v.push(itoa::Buffer::new().format(pos.epoch).as_bytes());
        v.epoch_end = v.len;
        v.push(itoa::Buffer::new().format(pos.offset).as_bytes());
        v.push(b":");
        v.push(itoa::Buffer::new().format(pos.index).as_bytes());
        v.position_end = v.len;
        let mut hex = [0u8; 16];
        for (i, digit) in hex.iter_mut().enumerate() {
            let nibble = (pos.lineage >> (60 - 4 * i)) & 0xf;
            *digit = b"0123456789abcdef"[nibble as usize];
        }
        v.push(&hex);
        v
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// The [`EPOCH`] header's value (decimal).
    pub fn epoch(&self) -> &[u8] {
        &self.buf[..self.epoch_end]
    }

    /// The [`POSITION`] header's value (`offset:index`).
    pub fn position(&self) -> &[u8] {
        &self.buf[self.epoch_end..self.position_end]
    }

    /// The [`LINEAGE`] header's value (16 hex digits).
    pub fn lineage(&self) -> &[u8] {
        &self.buf[self.position_end..self.len]
    }

    /// The [`AT`] header's value for a record from `origin`.
    pub fn at(&self, origin: &str) -> Vec<u8> {
        let mut at = Vec::with_capacity(origin.len() + self.len + 3);
        at.extend_from_slice(origin.as_bytes());
        for field in [self.epoch(), self.position(), self.lineage()] {
            at.push(b' ');
            at.extend_from_slice(field);
        }
        at
    }

    /// The four headers a record from `origin` at this position carries,
    /// borrowed: ([`ORIGIN`], [`EPOCH`], [`POSITION`], [`LINEAGE`]).
    pub fn stamp<'a>(&'a self, origin: &'a str) -> [(&'static str, &'a [u8]); 4] {
        [
            (ORIGIN, origin.as_bytes()),
            (EPOCH, self.epoch()),
            (POSITION, self.position()),
            (LINEAGE, self.lineage()),
        ]
    }
}

/// The tick time of a record, if it is a tick.
pub fn tick_time<H: HeaderPair>(headers: &[H]) -> Option<i64> {
    header_str(headers, TICK).and_then(|s| s.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pos(epoch: u32, offset: i64, index: u32) -> Position {
        Position {
            epoch,
            offset,
            index,
            lineage: 7,
        }
    }

    #[test]
    fn headers_round_trip() {
        let p = Position {
            lineage: u64::MAX - 5,
            ..pos(3, 42, 1)
        };
        let headers: Vec<(String, Vec<u8>)> = p.to_headers("identity:2").to_vec();
        assert_eq!(
            Position::from_headers(&headers),
            Some(("identity:2".to_string(), p))
        );
        // Writers that predate lineages: lineage 0.
        assert_eq!(
            Position::from_headers(&headers[..3]),
            Some(("identity:2".to_string(), Position { lineage: 0, ..p }))
        );
    }

    #[test]
    fn one_at_header_reads_as_the_four_do() {
        let p = Position {
            lineage: u64::MAX - 5,
            ..pos(3, -42, 1)
        };
        let at = vec![p.to_at_header("identity:2")];
        assert_eq!(
            at[0].1,
            format!("identity:2 3 -42:1 {:016x}", u64::MAX - 5).into_bytes()
        );
        assert_eq!(
            Position::from_headers(&at),
            Position::from_headers(&p.to_headers("identity:2"))
        );
        // An origin with spaces still reads (its fields are the last three).
        let spaced = vec![p.to_at_header("a b:1")];
        assert_eq!(
            Position::from_headers(&spaced),
            Some(("a b:1".to_string(), p))
        );
        for bad in ["", "x", "o 1 2:3", "o 1 2 00", "o x 2:3 00", "o 1 2:3 zz"] {
            let h = vec![(AT.to_string(), bad.as_bytes().to_vec())];
            assert_eq!(Position::from_headers(&h), None, "{bad}");
        }
    }

    #[test]
    fn borrowed_headers_read_as_owned_ones_do() {
        let p = pos(5, 77, 2);
        let mut owned: Vec<(String, Vec<u8>)> = p.to_headers("traits:1").to_vec();
        owned.push((TICK.to_string(), b"1234".to_vec()));
        let borrowed: Vec<HeaderRef<'_>> = owned
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        assert_eq!(Position::from_headers_ref(&borrowed), Some(("traits:1", p)));
        assert_eq!(
            Position::from_headers(&borrowed),
            Position::from_headers(&owned)
        );
        assert_eq!(tick_time(&borrowed), Some(1234));
        assert_eq!(tick_time(&owned), Some(1234));
        assert_eq!(header_str(&borrowed, ORIGIN), Some("traits:1"));
        assert_eq!(header_str(&borrowed, "missing"), None);
    }

    #[test]
    fn a_new_lineage_starts_positions_afresh() {
        let seen = pos(9, 5000, 3);
        let reset = Position {
            lineage: 8,
            ..pos(1, 0, 0)
        };
        assert!(
            reset.is_new_after(&seen),
            "a reset origin restarts at epoch 1, offset 0"
        );
        assert!(!pos(1, 0, 0).is_new_after(&seen), "same lineage: a zombie");
    }

    #[test]
    fn replays_and_zombies_are_dropped() {
        let seen = pos(2, 10, 0);
        assert!(!pos(2, 10, 0).is_new_after(&seen), "exact replay");
        assert!(
            !pos(3, 9, 5).is_new_after(&seen),
            "new epoch replaying old positions"
        );
        assert!(pos(3, 10, 1).is_new_after(&seen));
        assert!(
            !pos(1, 11, 0).is_new_after(&seen),
            "zombie of an older epoch"
        );
    }

    proptest! {
        /// The headers' text is what formatting the numbers gives.
        #[test]
        fn header_values_are_the_formatted_numbers(
            epoch in any::<u32>(),
            offset in any::<i64>(),
            index in any::<u32>(),
            lineage in any::<u64>(),
        ) {
            let p = Position { epoch, offset, index, lineage };
            let v = p.header_values();
            prop_assert_eq!(
                v.at("traits:3"),
                format!("traits:3 {epoch} {offset}:{index} {lineage:016x}").into_bytes()
            );
            prop_assert_eq!(
                Position::from_headers(&[p.to_at_header("traits:3")]),
                Some(("traits:3".to_string(), p))
            );
            prop_assert_eq!(v.epoch(), epoch.to_string().into_bytes());
            prop_assert_eq!(v.position(), format!("{offset}:{index}").into_bytes());
            prop_assert_eq!(v.lineage(), format!("{lineage:016x}").into_bytes());
        }

        /// The header's numbers read as the standard library reads them,
        /// whatever the text.
        #[test]
        fn numbers_read_as_the_standard_library_reads_them(
            any_text in "[0-9a-fA-F+ -]{0,24}",
            decimal in "[+-]?[0-9]{1,20}",
            hex in "[+]?[0-9a-fA-F]{1,17}",
        ) {
            for text in [any_text, decimal, hex] {
                let b = text.as_bytes();
                prop_assert_eq!(number::signed(b), text.parse::<i64>().ok());
                prop_assert_eq!(number::unsigned(b, 10), text.parse::<u64>().ok());
                prop_assert_eq!(number::unsigned(b, 16), u64::from_str_radix(&text, 16).ok());
            }
            for edge in ["-9223372036854775808", "-9223372036854775809", "9223372036854775807",
                         "9223372036854775808", "18446744073709551615", "18446744073709551616",
                         "-0", "+0", "-", "+", "", "000000000000000000000001", "ffffffffffffffff"] {
                let b = edge.as_bytes();
                prop_assert_eq!(number::signed(b), edge.parse::<i64>().ok(), "{}", edge);
                prop_assert_eq!(number::unsigned(b, 10), edge.parse::<u64>().ok(), "{}", edge);
                prop_assert_eq!(number::unsigned(b, 16), u64::from_str_radix(edge, 16).ok(), "{}", edge);
            }
        }

        /// Applying a stream with arbitrary duplicated prefixes (crash
        /// replays) through the dedupe rule yields the stream without them.
        #[test]
        fn dedupe_removes_exactly_the_replays(
            n in 1usize..40,
            replays in proptest::collection::vec((0usize..40, 0usize..40), 0..5),
        ) {
            let clean: Vec<Position> = (0..n).map(|i| pos(1, (i / 2) as i64, (i % 2) as u32)).collect();
            // Build a delivered stream: after element `at`, the origin crashed
            // and replayed from element `from` (<= at) under a new epoch.
            let mut delivered = Vec::new();
            let mut epoch = 1;
            let mut i = 0;
            let mut replays = replays.clone();
            replays.sort();
            let mut next_crash = replays.into_iter().map(|(a, b)| (a % n, b % n)).filter(|(a, b)| b <= a);
            let mut crash = next_crash.next();
            while i < n {
                delivered.push(Position { epoch, ..clean[i] });
                if let Some((at, from)) = crash {
                    if at == i {
                        epoch += 1;
                        i = from;
                        crash = next_crash.next().filter(|(a, _)| *a >= at);
                        continue;
                    }
                }
                i += 1;
            }
            let mut seen = pos(0, -1, 0);
            let mut applied = Vec::new();
            for p in delivered {
                if p.is_new_after(&seen) {
                    seen = p;
                    applied.push((p.offset, p.index));
                }
            }
            let expected: Vec<(i64, u32)> = clean.iter().map(|p| (p.offset, p.index)).collect();
            prop_assert_eq!(applied, expected);
        }
    }
}
