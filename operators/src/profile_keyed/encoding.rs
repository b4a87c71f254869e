//! How a profile-keyed stage stores a profile's state under `profile/<id>`.
//!
//! A state is written as [postcard](https://docs.rs/postcard) (compact and
//! positional: no field names, varint numbers) behind one byte,
//! [`LIVE`](super::entry::LIVE), which also tells the skeleton the profile
//! waits for nothing (see [`entry`](super::entry) for the other values the
//! key holds). States written before, in postcard behind version byte
//! [`POSTCARD_V1`] (trait values as JSON text, parsed again on every load)
//! or as JSON (starting with `{`), still load: a stage
//! upgrades in place, rewriting each profile in the new encoding the next
//! time it changes. Transfers between partitions stay JSON: they travel
//! inside a JSON record.
//!
//! A positional encoding cannot skip a field or read a tag from inside a
//! map, so the state types follow three rules: no `skip_serializing_if`;
//! anything that serializes differently in JSON (internally tagged enums,
//! `serde_json::Value`) asks the serializer [`is_human_readable`] and, in
//! the binary form, takes a plain shape ([`json_value`] for values); and a
//! field added later goes last in its top-level struct, with a default
//! whose encoding is one zero byte (`None`, `0`, an empty collection), so
//! a state stored before it was added decodes with that default
//! ([`decode_state`] reads a state that ends early as if zeros followed).
//!
//! [`is_human_readable`]: serde::Serializer::is_human_readable

use std::cell::Cell;
use std::collections::BTreeMap;
use std::marker::PhantomData;

use cdp_pipeline::store::StoreError;
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::entry::{LIVE, RETIRED, WAITING};

/// First byte of a state in postcard encoding as version 1 wrote it
/// (before the profile's value also carried its redirect and wait mark). A
/// JSON state starts with `{`, so the two never collide.
pub(crate) const POSTCARD_V1: u8 = 1;

/// A stored state as it was found.
pub(crate) enum Stored<'a, T> {
    /// In the binary encoding.
    Current(T),
    /// JSON, as written before the binary encoding: the stage parses it
    /// (and may upgrade an older layout) itself.
    Json(&'a [u8]),
    /// No state: a merged-away profile, or one that waits for merge
    /// transfers before its first input.
    Absent,
}

/// Room for a typical state (a profile of ten traits is ~100–300 bytes),
/// so the encoding does not grow its vector from one byte by doubling.
const STATE_ROOM: usize = 256;

/// Encode a state for the store.
pub(crate) fn encode_state<T: Serialize>(state: &T) -> Result<Vec<u8>, StoreError> {
    let mut bytes = Vec::with_capacity(STATE_ROOM);
    bytes.push(LIVE);
    postcard::to_extend(state, bytes).map_err(|e| StoreError::Decode(format!("encode state: {e}")))
}

/// Decode the value of `profile/<id>`: a state in the binary encoding,
/// [`Stored::Json`] for a state written as JSON, [`Stored::Absent`] for a
/// value without a state.
pub(crate) fn decode_state<'a, T: DeserializeOwned>(
    key: &str,
    bytes: &'a [u8],
) -> Result<Stored<'a, T>, StoreError> {
    // A waiting profile's state follows its mark.
    let bytes = match bytes.split_first() {
        Some((&WAITING, [])) => return Ok(Stored::Absent),
        Some((&WAITING, rest)) => rest,
        _ => bytes,
    };
    match bytes.split_first() {
        Some((&LIVE, rest)) => decode_padded(rest, |b| postcard::from_bytes(b))
            .map(Stored::Current)
            .map_err(|e| StoreError::Decode(format!("{key}: {e}"))),
        Some((&POSTCARD_V1, rest)) => decode_padded(rest, decode_v1)
            .map(Stored::Current)
            .map_err(|e| StoreError::Decode(format!("{key}: {e}"))),
        Some((&RETIRED, _)) => Ok(Stored::Absent),
        _ => Ok(Stored::Json(bytes)),
    }
}

/// How many fields, each encoded as one zero byte by default, a state may
/// lack because it was stored before they were added.
const ADDED_FIELDS_PADDING: usize = 8;

/// A stored state in either encoding, for tools that read a changelog;
/// `None` for a profile merged away or waiting for its first input, or
/// bytes that are no such state.
pub(crate) fn stored_state<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    match decode_state("state", bytes).ok()? {
        Stored::Current(state) => Some(state),
        Stored::Json(json) => serde_json::from_slice(json).ok(),
        Stored::Absent => None,
    }
}

/// A stored state in either encoding (tests read the store with it).
#[cfg(test)]
pub(crate) fn read_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    match decode_state("state", bytes)? {
        Stored::Current(state) => Ok(state),
        Stored::Json(json) => {
            serde_json::from_slice(json).map_err(|e| StoreError::Decode(e.to_string()))
        }
        Stored::Absent => Err(StoreError::Decode("no state".to_owned())),
    }
}

/// Test check of the JSON-to-binary upgrade: `id`'s state in `rewritten`
/// (a store that started from JSON) is live, binary, and byte-identical
/// to its state in `binary` (the same inputs, never JSON).
#[cfg(test)]
pub(crate) fn assert_rewritten_in_binary(
    rewritten: &cdp_pipeline::store::MemoryState,
    binary: &cdp_pipeline::store::MemoryState,
    id: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let key = super::profile_key(id);
    let stored = rewritten.map.get(key.as_slice()).ok_or("no state")?;
    assert_eq!(
        stored.first(),
        Some(&super::entry::LIVE),
        "rewritten in the binary encoding"
    );
    assert_eq!(binary.map.get(key.as_slice()), Some(stored));
    Ok(())
}

thread_local! {
    /// Set while a state of version 1 is decoded (or, in tests, encoded):
    /// its values are JSON text.
    static VALUES_AS_TEXT: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with [`json_value`] fields as JSON text, as version 1 has them.
fn as_v1<R>(f: impl FnOnce() -> R) -> R {
    VALUES_AS_TEXT.with(|text| {
        let before = text.replace(true);
        let out = f();
        text.set(before);
        out
    })
}

/// An error that says whether the bytes ended before the fields did.
pub(crate) trait EndedEarly {
    fn ended_early(&self) -> bool;
}

impl EndedEarly for postcard::Error {
    fn ended_early(&self) -> bool {
        matches!(self, postcard::Error::DeserializeUnexpectedEnd)
    }
}

/// `decode` a state or binary record; one that ends early was written
/// before its last fields were added, and reads as if zero bytes (their
/// defaults, see the module docs) followed.
pub(crate) fn decode_padded<T, E: EndedEarly>(
    bytes: &[u8],
    mut decode: impl FnMut(&[u8]) -> Result<T, E>,
) -> Result<T, E> {
    match decode(bytes) {
        Err(e) if e.ended_early() => {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len() + ADDED_FIELDS_PADDING, 0);
            decode(&padded)
        }
        other => other,
    }
}

/// Decode a version 1 state.
fn decode_v1<T: DeserializeOwned>(bytes: &[u8]) -> postcard::Result<T> {
    as_v1(|| postcard::from_bytes(bytes))
}

/// Encode a state as version 1 wrote it (for the upgrade tests).
#[cfg(test)]
pub(crate) fn encode_v1<T: Serialize>(state: &T) -> Result<Vec<u8>, StoreError> {
    as_v1(|| postcard::to_extend(state, vec![POSTCARD_V1]))
        .map_err(|e| StoreError::Decode(format!("encode state: {e}")))
}

/// A `serde_json::Value` field: itself in JSON; in the binary encoding a
/// [`Bin`] (a binary format cannot describe a value of any shape itself),
/// in version 1 its JSON text, which every load parsed again.
pub(crate) mod json_value {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::Value;

    use super::{Bin, BinRef, VALUES_AS_TEXT};

    pub(crate) fn serialize<S: Serializer>(value: &Value, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            value.serialize(s)
        } else if VALUES_AS_TEXT.with(|text| text.get()) {
            s.collect_str(value)
        } else {
            BinRef(value).serialize(s)
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        if d.is_human_readable() {
            Value::deserialize(d)
        } else if VALUES_AS_TEXT.with(|text| text.get()) {
            let text = String::deserialize(d)?;
            serde_json::from_str(&text).map_err(D::Error::custom)
        } else {
            Ok(Bin::deserialize(d)?.into())
        }
    }
}

/// A JSON value in the binary encoding: the variant, then its contents.
/// Numbers keep serde_json's kind (unsigned, signed, float), so a value
/// reads back exactly as it was. [`BinRef`] writes the same bytes from a
/// borrowed value.
#[derive(Deserialize)]
enum Bin {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(String),
    Array(Vec<Bin>),
    Object(Vec<(String, Bin)>),
}

impl From<Bin> for Value {
    fn from(bin: Bin) -> Value {
        match bin {
            Bin::Null => Value::Null,
            Bin::Bool(b) => Value::Bool(b),
            Bin::U64(n) => Value::from(n),
            Bin::I64(n) => Value::from(n),
            Bin::F64(n) => Value::from(n),
            Bin::Str(s) => Value::String(s),
            Bin::Array(items) => Value::Array(items.into_iter().map(Value::from).collect()),
            Bin::Object(fields) => Value::Object(
                fields
                    .into_iter()
                    .map(|(k, v)| (k, Value::from(v)))
                    .collect(),
            ),
        }
    }
}

/// A borrowed value written as [`Bin`].
struct BinRef<'a>(&'a Value);

impl Serialize for BinRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => s.serialize_unit_variant("Bin", 0, "Null"),
            Value::Bool(b) => s.serialize_newtype_variant("Bin", 1, "Bool", b),
            Value::Number(n) => {
                if let Some(n) = n.as_u64() {
                    s.serialize_newtype_variant("Bin", 2, "U64", &n)
                } else if let Some(n) = n.as_i64() {
                    s.serialize_newtype_variant("Bin", 3, "I64", &n)
                } else {
                    s.serialize_newtype_variant("Bin", 4, "F64", &n.as_f64().unwrap_or(0.0))
                }
            }
            Value::String(t) => s.serialize_newtype_variant("Bin", 5, "Str", t),
            Value::Array(items) => s.serialize_newtype_variant("Bin", 6, "Array", &Items(items)),
            Value::Object(fields) => {
                s.serialize_newtype_variant("Bin", 7, "Object", &Fields(fields))
            }
        }
    }
}

struct Items<'a>(&'a [Value]);

impl Serialize for Items<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(BinRef))
    }
}

/// An object's fields as a sequence of `(name, value)` pairs, the shape
/// [`Bin::Object`] reads.
struct Fields<'a>(&'a serde_json::Map<String, Value>);

impl Serialize for Fields<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|(k, v)| (k, BinRef(v))))
    }
}

/// A map of names to `serde_json::Value`s, each as [`json_value`].
pub(crate) mod json_value_map {
    use std::collections::BTreeMap;

    use serde::de::{MapAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::Value;

    #[derive(Serialize, Deserialize)]
    struct Text(#[serde(with = "super::json_value")] Value);

    /// Borrowed for serialization.
    struct TextRef<'a>(&'a Value);

    impl Serialize for TextRef<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            super::json_value::serialize(self.0, s)
        }
    }

    pub(crate) fn serialize<S: Serializer>(
        map: &BTreeMap<String, Value>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            map.serialize(s)
        } else {
            s.collect_map(map.iter().map(|(k, v)| (k, TextRef(v))))
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Value>, D::Error> {
        if d.is_human_readable() {
            BTreeMap::deserialize(d)
        } else {
            d.deserialize_map(TextMap)
        }
    }

    /// The binary map as `(name, value)` pairs, the names borrowed from the
    /// bytes, in the order written; a repeated name keeps its last value,
    /// as [`deserialize`]'s map does. Binary encodings only.
    pub(crate) fn deserialize_borrowed<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(&'de str, Value)>, D::Error> {
        let pairs: Vec<(&'de str, Text)> = super::last_wins_pairs(d)?;
        Ok(pairs
            .into_iter()
            .map(|(name, Text(value))| (name, value))
            .collect())
    }

    /// Reads the binary map straight into the map of values (no map of
    /// [`Text`] built first and copied).
    struct TextMap;

    impl<'de> Visitor<'de> for TextMap {
        type Value = BTreeMap<String, Value>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of JSON values")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
            let mut entries = super::MapBuilder::new(access.size_hint());
            while let Some((key, Text(value))) = access.next_entry::<String, Text>()? {
                entries.push(key, value);
            }
            Ok(entries.build())
        }
    }
}

/// Maps of at most this many entries are decoded by inserting each.
const SMALL_MAP: usize = 4;

/// A map being decoded. A map the encoding announces as small (an
/// update's changed traits and identifier types: one to three entries)
/// takes its entries one insert at a time: collecting, sorting and
/// bulk-building them (`BTreeMap::from_iter`) cost ~650 instructions a
/// map, inserting ~400 (the audiences stage decodes two such maps per
/// update: −2.1% of its batches, counted in the chain). A larger one (a traits
/// state's maps) collects its entries with room for what the encoding
/// announces (bounded: a corrupt length must not reserve gigabytes) and
/// builds the tree once (see [`sorted_map`]). Repeated keys: the last
/// wins either way.
enum MapBuilder<K, V> {
    Small(BTreeMap<K, V>),
    Large(Vec<(K, V)>),
}

impl<K: Ord, V> MapBuilder<K, V> {
    fn new(announced: Option<usize>) -> Self {
        match announced {
            Some(n) if n <= SMALL_MAP => MapBuilder::Small(BTreeMap::new()),
            _ => MapBuilder::Large(Vec::with_capacity(announced.unwrap_or(0).min(1024))),
        }
    }

    fn push(&mut self, key: K, value: V) {
        match self {
            MapBuilder::Small(map) => {
                map.insert(key, value);
            }
            MapBuilder::Large(entries) => entries.push((key, value)),
        }
    }

    fn build(self) -> BTreeMap<K, V> {
        match self {
            MapBuilder::Small(map) => map,
            MapBuilder::Large(entries) => BTreeMap::from_iter(entries),
        }
    }
}

/// A map as its `(key, value)` pairs in the order written (keys borrowed
/// where they can be, for records read in place); a repeated key keeps
/// its last value in the first one's place, as a map built by inserts
/// would hold it.
pub(crate) fn last_wins_pairs<'de, D, K, V>(d: D) -> Result<Vec<(K, V)>, D::Error>
where
    D: Deserializer<'de>,
    K: Deserialize<'de> + PartialEq,
    V: Deserialize<'de>,
{
    struct Pairs<K, V>(PhantomData<(K, V)>);

    impl<'de, K: Deserialize<'de> + PartialEq, V: Deserialize<'de>> Visitor<'de> for Pairs<K, V> {
        type Value = Vec<(K, V)>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
            // Bounded: a corrupt length must not reserve gigabytes.
            let mut pairs = Vec::with_capacity(access.size_hint().unwrap_or(0).min(64));
            while let Some((key, value)) = access.next_entry::<K, V>()? {
                match pairs.iter_mut().find(|(k, _): &&mut (K, V)| *k == key) {
                    Some(pair) => pair.1 = value,
                    None => pairs.push((key, value)),
                }
            }
            Ok(pairs)
        }
    }

    d.deserialize_map(Pairs(PhantomData))
}

/// Decodes a map by collecting its entries and building the tree once
/// (`BTreeMap::from_iter` sorts them, then bulk-builds), instead of one
/// insert per entry (a search, and now and then a node split: ~350
/// instructions an entry, 3.5% of a traits record's decode). A map
/// written from a `BTreeMap` comes sorted, so the sort is one compare per
/// entry. Repeated keys: the last wins, as with inserts. For
/// `#[serde(deserialize_with = "sorted_map")]` on a state's maps; the
/// encoding is the map's own, in JSON and in postcard alike.
pub(crate) fn sorted_map<'de, D, K, V>(d: D) -> Result<BTreeMap<K, V>, D::Error>
where
    D: Deserializer<'de>,
    K: Deserialize<'de> + Ord,
    V: Deserialize<'de>,
{
    struct Entries<K, V>(PhantomData<(K, V)>);

    impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> Visitor<'de> for Entries<K, V> {
        type Value = BTreeMap<K, V>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
            let mut entries = MapBuilder::new(access.size_hint());
            while let Some((key, value)) = access.next_entry()? {
                entries.push(key, value);
            }
            Ok(entries.build())
        }
    }

    d.deserialize_map(Entries(PhantomData))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};
    use serde_json::{json, Value};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        #[serde(with = "json_value")]
        one: Value,
        #[serde(with = "json_value_map")]
        many: BTreeMap<String, Value>,
    }

    fn sample() -> Sample {
        Sample {
            one: json!({"a": [1, 2.5, null, "x"]}),
            many: BTreeMap::from([
                ("n".to_owned(), json!(3)),
                ("s".to_owned(), json!("shoes")),
                ("l".to_owned(), json!(["a", "b"])),
            ]),
        }
    }

    #[test]
    fn values_round_trip_in_both_encodings() -> Result<(), Box<dyn std::error::Error>> {
        let bytes = encode_state(&sample())?;
        assert_eq!(bytes.first(), Some(&LIVE));
        match decode_state::<Sample>("k", &bytes)? {
            Stored::Current(back) => assert_eq!(back, sample()),
            _ => panic!("a binary state not read as one"),
        }
        // JSON keeps the values as they are (what transfers and states
        // written before the binary encoding hold).
        let text = serde_json::to_value(sample())?;
        assert_eq!(text["many"]["l"], json!(["a", "b"]));
        assert_eq!(serde_json::from_value::<Sample>(text)?, sample());
        let json_bytes = serde_json::to_vec(&sample())?;
        assert!(matches!(
            decode_state::<Sample>("k", &json_bytes)?,
            Stored::Json(_)
        ));
        Ok(())
    }

    /// `Sample` as it was before a field was added at its end.
    #[derive(Serialize)]
    struct Before {
        #[serde(with = "json_value")]
        one: Value,
        #[serde(with = "json_value_map")]
        many: BTreeMap<String, Value>,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    struct After {
        #[serde(with = "json_value")]
        one: Value,
        #[serde(with = "json_value_map")]
        many: BTreeMap<String, Value>,
        until: Option<i64>,
        names: Vec<String>,
    }

    #[test]
    fn a_state_stored_before_fields_were_added_decodes_with_their_defaults(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let old = sample();
        let bytes = encode_state(&Before {
            one: old.one.clone(),
            many: old.many.clone(),
        })?;
        match decode_state::<After>("k", &bytes)? {
            Stored::Current(after) => assert_eq!(
                after,
                After {
                    one: old.one,
                    many: old.many,
                    until: None,
                    names: Vec::new(),
                }
            ),
            Stored::Json(_) | Stored::Absent => panic!("a binary state read as JSON"),
        }
        Ok(())
    }

    #[test]
    fn a_corrupt_binary_state_is_an_error_not_a_panic() {
        assert!(decode_state::<Sample>("k", &[POSTCARD_V1, 0xff, 0xff]).is_err());
        assert!(decode_state::<Sample>("k", &[LIVE, 0xff, 0xff]).is_err());
    }

    /// Every form `profile/<id>` takes reads as the state it holds: the
    /// current one, version 1 and JSON, each also behind a waiting mark;
    /// a retired profile and a waiting one without state read as none.
    #[test]
    fn every_form_of_the_value_reads_as_its_state() -> Result<(), Box<dyn std::error::Error>> {
        let current = encode_state(&sample())?;
        let v1 = encode_v1(&sample())?;
        assert_ne!(current[1..], v1[1..], "values binary, not text");
        let json = serde_json::to_vec(&sample())?;
        for state in [current, v1, json] {
            for value in [state.clone(), super::super::entry::waiting_value(state)] {
                assert_eq!(read_state::<Sample>(&value)?, sample());
            }
        }
        for value in [
            super::super::entry::retired_value("b"),
            super::super::entry::waiting_value(Vec::new()),
        ] {
            assert!(matches!(
                decode_state::<Sample>("k", &value)?,
                Stored::Absent
            ));
        }
        Ok(())
    }

    /// A map read through [`sorted_map`], for the property below.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sorted {
        #[serde(deserialize_with = "sorted_map")]
        map: BTreeMap<String, u32>,
    }

    /// The same map read by serde's own `BTreeMap` (the oracle).
    #[derive(Debug, PartialEq, Deserialize)]
    struct Inserted {
        map: BTreeMap<String, u32>,
    }

    /// The entries as one binary map, in their order, repeats included
    /// (as a writer other than `BTreeMap` could write it).
    struct Raw<'a>(&'a [(String, u32)]);

    impl Serialize for Raw<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
        }
    }

    #[derive(Serialize)]
    struct RawSample<'a> {
        map: Raw<'a>,
    }

    proptest::proptest! {
        /// `sorted_map` reads what inserting entry by entry reads: JSON
        /// and the binary encoding, with keys in any order and repeated
        /// (the last wins), small maps (read by inserts) and larger ones
        /// (collected and built once) alike.
        #[test]
        fn a_sorted_map_reads_what_inserts_read(
            entries in proptest::collection::vec(("[a-d]{0,2}", proptest::num::u32::ANY), 0..12),
        ) {
            let members: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).unwrap_or_default()))
                .collect();
            let json = format!("{{\"map\":{{{}}}}}", members.join(","));
            let sorted: Sorted = serde_json::from_str(&json)
                .map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let inserted: Inserted = serde_json::from_str(&json)
                .map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            proptest::prop_assert_eq!(&sorted.map, &inserted.map);
            let raw = postcard::to_allocvec(&RawSample { map: Raw(&entries) })
                .map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let read: Sorted = postcard::from_bytes(&raw)
                .map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            proptest::prop_assert_eq!(&read.map, &inserted.map);
            let bytes = postcard::to_allocvec(&sorted)
                .map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let again: Sorted = postcard::from_bytes(&bytes)
                .map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            proptest::prop_assert_eq!(again, sorted);
        }
    }
}
