//! Durations as the config writes them: `500ms`, `30s`, `15m`, `12h`, `30d`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A non-negative duration with millisecond precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span(pub i64);

impl Span {
    pub const fn from_millis(ms: i64) -> Self {
        Span(ms)
    }
    pub const fn from_secs(s: i64) -> Self {
        Span(s * 1000)
    }
    pub const fn millis(&self) -> i64 {
        self.0
    }
    pub fn to_std(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0.max(0) as u64)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid duration {0:?}: expected a number and a unit (ms, s, m, h, d), e.g. 30d")]
pub struct SpanError(pub String);

impl FromStr for Span {
    type Err = SpanError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: i64 = num.parse().map_err(|_| SpanError(s.to_string()))?;
        let factor = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(SpanError(s.to_string())),
        };
        n.checked_mul(factor)
            .map(Span)
            .ok_or_else(|| SpanError(s.to_string()))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        for (unit, factor) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms != 0 && ms % factor == 0 {
                return write!(f, "{}{unit}", ms / factor);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What [`FromStr`] accepts (less surrounding blanks, which it trims).
pub const SPAN_PATTERN: &str = "^[0-9]+(ms|s|m|h|d)$";

impl schemars::JsonSchema for Span {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Span".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": SPAN_PATTERN,
            "description": "A duration: a whole number and a unit (ms, s, m, h, d), e.g. `500ms`, `30s`, `15m`, `12h`, `30d`.",
            "examples": ["30s", "30d"]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_rejects_garbage() {
        assert_eq!("500ms".parse::<Span>(), Ok(Span(500)));
        assert_eq!("15m".parse::<Span>(), Ok(Span(900_000)));
        assert_eq!("30d".parse::<Span>(), Ok(Span(30 * 86_400_000)));
        assert!("30".parse::<Span>().is_err());
        assert!("d".parse::<Span>().is_err());
        assert!("3w".parse::<Span>().is_err());
        assert_eq!(Span(86_400_000).to_string(), "1d");
        assert_eq!(Span(1500).to_string(), "1500ms");
    }
}
