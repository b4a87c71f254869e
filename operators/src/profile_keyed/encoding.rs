//! How a profile-keyed stage stores a profile's state under `profile/<id>`.
//!
//! A state is written as [postcard](https://docs.rs/postcard) (compact and
//! positional: no field names, varint numbers) behind one byte,
//! [`LIVE`](super::entry::LIVE), which also tells the skeleton the profile
//! waits for nothing (see [`entry`](super::entry) for the other values the
//! key holds). States written before, in postcard behind version byte
//! [`POSTCARD_V1`] or as JSON (starting with `{`), still load: a stage
//! upgrades in place, rewriting each profile in the new encoding the next
//! time it changes. Transfers between partitions stay JSON: they travel
//! inside a JSON record.
//!
//! A positional encoding cannot skip a field or read a tag from inside a
//! map, so the state types follow three rules: no `skip_serializing_if`;
//! anything that serializes differently in JSON (internally tagged enums,
//! `serde_json::Value`) asks the serializer [`is_human_readable`] and, in
//! the binary form, takes a plain shape ([`json_text`] for values); and a
//! field added later goes last in its top-level struct, with a default
//! whose encoding is one zero byte (`None`, `0`, an empty collection), so
//! a state stored before it was added decodes with that default
//! ([`decode_state`] reads a state that ends early as if zeros followed).
//!
//! [`is_human_readable`]: serde::Serializer::is_human_readable

use cdp_pipeline::store::StoreError;
use serde::de::DeserializeOwned;
use serde::Serialize;

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

/// Encode a state for the store.
pub(crate) fn encode_state<T: Serialize>(state: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_extend(state, vec![LIVE])
        .map_err(|e| StoreError::Decode(format!("encode state: {e}")))
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
        Some((&(LIVE | POSTCARD_V1), rest)) => match postcard::from_bytes(rest) {
            Ok(state) => Ok(Stored::Current(state)),
            // Written before the last fields were added: they take their
            // defaults (see the module docs).
            Err(postcard::Error::DeserializeUnexpectedEnd) => {
                let mut padded = rest.to_vec();
                padded.resize(rest.len() + ADDED_FIELDS_PADDING, 0);
                postcard::from_bytes(&padded)
                    .map(Stored::Current)
                    .map_err(|e| StoreError::Decode(format!("{key}: {e}")))
            }
            Err(e) => Err(StoreError::Decode(format!("{key}: {e}"))),
        },
        Some((&RETIRED, _)) => Ok(Stored::Absent),
        _ => Ok(Stored::Json(bytes)),
    }
}

/// How many fields, each encoded as one zero byte by default, a state may
/// lack because it was stored before they were added.
const ADDED_FIELDS_PADDING: usize = 8;

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

/// A `serde_json::Value` field: itself in JSON, its JSON text in binary
/// encodings (which cannot describe a value of any shape).
pub(crate) mod json_text {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::Value;

    pub(crate) fn serialize<S: Serializer>(value: &Value, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            value.serialize(s)
        } else {
            s.collect_str(value)
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        if d.is_human_readable() {
            Value::deserialize(d)
        } else {
            let text = String::deserialize(d)?;
            serde_json::from_str(&text).map_err(D::Error::custom)
        }
    }
}

/// A map of names to `serde_json::Value`s, each as [`json_text`].
pub(crate) mod json_text_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::Value;

    #[derive(Serialize, Deserialize)]
    struct Text(#[serde(with = "super::json_text")] Value);

    /// Borrowed for serialization.
    struct TextRef<'a>(&'a Value);

    impl Serialize for TextRef<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            super::json_text::serialize(self.0, s)
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
            Ok(BTreeMap::<String, Text>::deserialize(d)?
                .into_iter()
                .map(|(k, Text(v))| (k, v))
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};
    use serde_json::{json, Value};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        #[serde(with = "json_text")]
        one: Value,
        #[serde(with = "json_text_map")]
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
        #[serde(with = "json_text")]
        one: Value,
        #[serde(with = "json_text_map")]
        many: BTreeMap<String, Value>,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    struct After {
        #[serde(with = "json_text")]
        one: Value,
        #[serde(with = "json_text_map")]
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
        let mut v1 = current.clone();
        v1[0] = POSTCARD_V1;
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
}
