//! JSON helpers the stages' hand-written parsers share.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, Error, Visitor};
use serde::Deserialize;

/// A JSON string (a map key, typically), borrowed from the input when it
/// holds no escapes, so a parser that only compares or looks it up does not
/// allocate. `Cow<str>`'s own `Deserialize` always copies.
pub struct CowStr<'de>(pub Cow<'de, str>);

impl<'de> Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;
        impl<'de> Visitor<'de> for StrVisitor {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: Error>(self, v: &'de str) -> Result<CowStr<'de>, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<CowStr<'de>, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: Error>(self, v: String) -> Result<CowStr<'de>, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(StrVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrows_plain_strings_and_owns_escaped_ones() {
        let plain: CowStr<'_> =
            serde_json::from_str(r#""revenue""#).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(plain.0, Cow::Borrowed("revenue")));
        let escaped: CowStr<'_> =
            serde_json::from_str(r#""a\"b""#).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(&escaped.0, Cow::Owned(s) if s == "a\"b"));
        assert!(serde_json::from_str::<CowStr<'_>>("1").is_err());
    }
}
