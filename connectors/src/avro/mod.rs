//! Audience changes in Avro: the public contract of `<p>.audiences` and of
//! `kafka` destinations for consumers that read Avro (Kafka Connect,
//! ksqlDB, any Confluent-style deserializer).
//!
//! The schema is `deploy/schemas/audience_change.avsc`, compiled in; its
//! evolution rules are in docs/ARCHITECTURE.md. Two framings:
//!
//! - **Confluent wire format** when a schema registry is configured: byte
//!   `0`, the 4-byte big-endian schema id the registry gave the schema when
//!   it was registered on start ([`registry`]), then the Avro binary.
//! - **Avro single-object encoding** otherwise: `C3 01`, the 8-byte
//!   little-endian CRC-64-AVRO (Rabin) fingerprint of the schema's parsing
//!   canonical form, then the Avro binary.
//!
//! Values are written with `apache-avro`. Trait values that are JSON arrays
//! or objects travel as a `JsonText` record holding their JSON text (Avro
//! has no type for "any JSON"); every other JSON value maps to a primitive,
//! so decoding gives back the same [`AudienceChange`] as the JSON form.

pub mod operator;
pub mod registry;

use std::collections::{BTreeMap, HashMap};

use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use cdp_operators::messages::{AudienceAction, AudienceChange, Cause};
use serde_json::Value as Json;

/// The schema's text as it is kept in the repository.
pub const SCHEMA: &str = include_str!("../../../deploy/schemas/audience_change.avsc");

/// First bytes of a single-object encoded record.
const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
/// First byte of a Confluent wire-format record.
const CONFLUENT_MAGIC: u8 = 0;

/// How audience changes are written to a topic.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON object per record (the default).
    #[default]
    Json,
    /// Avro (`deploy/schemas/audience_change.avsc`): the Confluent wire
    /// format with a `schema_registry`, single-object encoding without.
    Avro,
}

/// Why a change could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not an audience change: {0}")]
    Json(#[from] serde_json::Error),
    #[error("avro: {0}")]
    Avro(String),
    #[error("single-object fingerprint {found} is not the audience-change schema's ({expected})")]
    UnknownFingerprint { found: String, expected: String },
    #[error("record too short for its framing ({0} bytes)")]
    Truncated(usize),
    #[error("avro value does not match the audience-change schema: {0}")]
    Shape(String),
}

impl From<apache_avro::Error> for CodecError {
    fn from(e: apache_avro::Error) -> Self {
        CodecError::Avro(e.to_string())
    }
}

/// How Avro records are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Single-object encoding (no registry).
    SingleObject,
    /// Confluent wire format with the registry's schema id.
    Confluent { schema_id: u32 },
}

/// Encodes and decodes audience changes with the compiled-in schema.
#[derive(Debug, Clone)]
pub struct AvroCodec {
    schema: Schema,
    /// `C3 01` + the schema's Rabin fingerprint.
    single_object_header: [u8; 10],
    framing: Framing,
}

impl AvroCodec {
    /// A codec writing `framing`. Fails only if the schema in the
    /// repository does not parse (a test guards that).
    pub fn new(framing: Framing) -> Result<Self, CodecError> {
        let schema = Schema::parse_str(SCHEMA)?;
        let fingerprint = schema.fingerprint::<apache_avro::rabin::Rabin>();
        let mut single_object_header = [0u8; 10];
        single_object_header[..2].copy_from_slice(&SINGLE_OBJECT_MAGIC);
        for (slot, byte) in single_object_header[2..]
            .iter_mut()
            .zip(fingerprint.bytes.iter())
        {
            *slot = *byte;
        }
        Ok(AvroCodec {
            schema,
            single_object_header,
            framing,
        })
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// The 8 fingerprint bytes of the single-object header.
    pub fn fingerprint(&self) -> [u8; 8] {
        let mut f = [0u8; 8];
        f.copy_from_slice(&self.single_object_header[2..]);
        f
    }

    /// Encode one change in this codec's framing.
    pub fn encode(&self, change: &AudienceChange) -> Result<Vec<u8>, CodecError> {
        let body = apache_avro::to_avro_datum(&self.schema, to_avro(change))?;
        let mut out = Vec::with_capacity(body.len() + 10);
        match self.framing {
            Framing::SingleObject => out.extend_from_slice(&self.single_object_header),
            Framing::Confluent { schema_id } => {
                out.push(CONFLUENT_MAGIC);
                out.extend_from_slice(&schema_id.to_be_bytes());
            }
        }
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Encode the JSON form of a change.
    pub fn encode_json(&self, json: &[u8]) -> Result<Vec<u8>, CodecError> {
        self.encode(&serde_json::from_slice(json)?)
    }

    /// Decode a change in any of the three forms: JSON, single-object or
    /// Confluent wire format. Confluent records are read with the schema in
    /// the repository (the id is not looked up), which holds while every
    /// registered version is one the evolution rules allow reading.
    pub fn decode(&self, bytes: &[u8]) -> Result<AudienceChange, CodecError> {
        let body = match bytes.first() {
            Some(&CONFLUENT_MAGIC) => bytes.get(5..).ok_or(CodecError::Truncated(bytes.len()))?,
            Some(0xC3) if bytes.get(1) == Some(&0x01) => {
                let header = bytes.get(..10).ok_or(CodecError::Truncated(bytes.len()))?;
                if header != self.single_object_header {
                    return Err(CodecError::UnknownFingerprint {
                        found: hex::encode(&header[2..]),
                        expected: hex::encode(&self.single_object_header[2..]),
                    });
                }
                &bytes[10..]
            }
            _ => return Ok(serde_json::from_slice(bytes)?),
        };
        let value = apache_avro::from_avro_datum(&self.schema, &mut &body[..], None)?;
        from_avro(value)
    }
}

/// Why an Avro writer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AvroSetupError {
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// The codec that writes Avro to `topic`: with a registry, the schema is
/// registered under `<topic>-value` now (blocking; call it at start) and
/// records carry its id; without one, single-object encoding.
pub fn avro_codec(schema_registry: Option<&str>, topic: &str) -> Result<AvroCodec, AvroSetupError> {
    let framing = match schema_registry {
        None => Framing::SingleObject,
        Some(url) => Framing::Confluent {
            schema_id: registry::register_blocking(url, &registry::value_subject(topic), SCHEMA)?,
        },
    };
    Ok(AvroCodec::new(framing)?)
}

/// A codec for reading (any framing reads with any codec), built once.
pub fn reader() -> Result<&'static AvroCodec, CodecError> {
    static READER: std::sync::LazyLock<Result<AvroCodec, String>> =
        std::sync::LazyLock::new(|| {
            AvroCodec::new(Framing::SingleObject).map_err(|e| e.to_string())
        });
    READER.as_ref().map_err(|e| CodecError::Avro(e.clone()))
}

/// Whether `bytes` look like an Avro-framed record rather than JSON.
pub fn is_avro(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(&CONFLUENT_MAGIC) | Some(&0xC3))
}

fn to_avro(change: &AudienceChange) -> Avro {
    let action = match change.action {
        AudienceAction::Entered => Avro::Enum(0, "entered".into()),
        AudienceAction::Exited => Avro::Enum(1, "exited".into()),
    };
    let identifiers: HashMap<String, Avro> = change
        .identifiers
        .iter()
        .map(|(k, vs)| {
            (
                k.clone(),
                Avro::Array(vs.iter().map(|v| Avro::String(v.clone())).collect()),
            )
        })
        .collect();
    let traits: HashMap<String, Avro> = change
        .traits
        .iter()
        .map(|(k, v)| (k.clone(), trait_to_avro(v)))
        .collect();
    let optional = |branch: Option<Avro>| match branch {
        None => Avro::Union(0, Box::new(Avro::Null)),
        Some(v) => Avro::Union(1, Box::new(v)),
    };
    Avro::Record(vec![
        ("type".into(), Avro::String(change.kind.clone())),
        ("audience".into(), Avro::String(change.audience.clone())),
        ("action".into(), action),
        ("profile_id".into(), Avro::String(change.profile_id.clone())),
        ("identifiers".into(), Avro::Map(identifiers)),
        ("traits".into(), Avro::Map(traits)),
        ("event_time".into(), Avro::String(change.event_time.clone())),
        ("emitted_at".into(), Avro::String(change.emitted_at.clone())),
        (
            "cause".into(),
            Avro::Record(vec![
                (
                    "message_id".into(),
                    optional(change.cause.message_id.clone().map(Avro::String)),
                ),
                ("tick".into(), optional(change.cause.tick.map(Avro::Long))),
            ]),
        ),
        (
            "merged_into".into(),
            optional(change.merged_into.clone().map(Avro::String)),
        ),
    ])
}

/// A trait value as a branch of `["null", "boolean", "long", "double",
/// "string", JsonText]`.
fn trait_to_avro(v: &Json) -> Avro {
    let (branch, value) = match v {
        Json::Null => (0, Avro::Null),
        Json::Bool(b) => (1, Avro::Boolean(*b)),
        Json::Number(n) => match n.as_i64() {
            Some(i) => (2, Avro::Long(i)),
            None => (3, Avro::Double(n.as_f64().unwrap_or(f64::NAN))),
        },
        Json::String(s) => (4, Avro::String(s.clone())),
        Json::Array(_) | Json::Object(_) => (
            5,
            Avro::Record(vec![("json".into(), Avro::String(v.to_string()))]),
        ),
    };
    Avro::Union(branch, Box::new(value))
}

fn shape(what: &str) -> CodecError {
    CodecError::Shape(what.to_string())
}

fn from_avro(value: Avro) -> Result<AudienceChange, CodecError> {
    let Avro::Record(fields) = value else {
        return Err(shape("not a record"));
    };
    let mut fields: BTreeMap<String, Avro> = fields.into_iter().collect();
    let mut take = |name: &str| fields.remove(name).ok_or_else(|| shape(name));
    let string = |v: Avro, name: &str| match v {
        Avro::String(s) => Ok(s),
        _ => Err(shape(name)),
    };
    let kind = string(take("type")?, "type")?;
    let audience = string(take("audience")?, "audience")?;
    let action = match take("action")? {
        Avro::Enum(_, s) if s == "entered" => AudienceAction::Entered,
        Avro::Enum(_, s) if s == "exited" => AudienceAction::Exited,
        _ => return Err(shape("action")),
    };
    let profile_id = string(take("profile_id")?, "profile_id")?;
    let Avro::Map(ids) = take("identifiers")? else {
        return Err(shape("identifiers"));
    };
    let mut identifiers = BTreeMap::new();
    for (k, v) in ids {
        let Avro::Array(items) = v else {
            return Err(shape("identifiers"));
        };
        let values = items
            .into_iter()
            .map(|i| string(i, "identifiers"))
            .collect::<Result<Vec<_>, _>>()?;
        identifiers.insert(k, values);
    }
    let Avro::Map(ts) = take("traits")? else {
        return Err(shape("traits"));
    };
    let traits = ts
        .into_iter()
        .map(|(k, v)| Ok((k, trait_from_avro(v)?)))
        .collect::<Result<BTreeMap<_, _>, CodecError>>()?;
    let event_time = string(take("event_time")?, "event_time")?;
    let emitted_at = string(take("emitted_at")?, "emitted_at")?;
    let cause = cause_from_avro(take("cause")?)?;
    // Written before the field existed: absent.
    let merged_into = match take("merged_into").ok() {
        Some(Avro::Union(_, v)) => match *v {
            Avro::String(s) => Some(s),
            _ => None,
        },
        _ => None,
    };
    Ok(AudienceChange {
        kind,
        audience,
        action,
        profile_id,
        identifiers,
        traits,
        event_time,
        emitted_at,
        cause,
        merged_into,
    })
}

fn cause_from_avro(v: Avro) -> Result<Cause, CodecError> {
    let Avro::Record(fields) = v else {
        return Err(shape("cause"));
    };
    let mut cause = Cause::default();
    for (name, value) in fields {
        let value = match value {
            Avro::Union(_, v) => *v,
            other => other,
        };
        match (name.as_str(), value) {
            (_, Avro::Null) => {}
            ("message_id", Avro::String(s)) => cause.message_id = Some(s),
            ("tick", Avro::Long(t)) => cause.tick = Some(t),
            // Fields a later schema version adds are not ours to read.
            _ => {}
        }
    }
    Ok(cause)
}

fn trait_from_avro(v: Avro) -> Result<Json, CodecError> {
    let v = match v {
        Avro::Union(_, v) => *v,
        other => other,
    };
    Ok(match v {
        Avro::Null => Json::Null,
        Avro::Boolean(b) => Json::Bool(b),
        Avro::Long(i) => Json::from(i),
        Avro::Int(i) => Json::from(i),
        Avro::Double(f) => serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
        Avro::String(s) => Json::String(s),
        Avro::Record(mut fields) => match fields.pop() {
            Some((_, Avro::String(text))) => serde_json::from_str(&text)?,
            _ => return Err(shape("traits JsonText")),
        },
        _ => return Err(shape("traits")),
    })
}

#[cfg(test)]
mod tests;
