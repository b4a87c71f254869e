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

/// `bytes` as text if they are UTF-8: the check a stage makes of a whole
/// event before reading it as text. SIMD, picked at run time for the
/// machine (AVX2 where there is one). std's check is quick on ASCII
/// (~230 instructions for a ~0.7 KB event) but goes character by
/// character through any other text (names, product titles in other
/// scripts); this one stays quick on both.
pub fn utf8(bytes: &[u8]) -> Option<&str> {
    simdutf8::basic::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_takes_what_std_takes() {
        let cases: [&[u8]; 6] = [
            b"",
            b"{\"event\":\"Order Completed\"}",
            "{\"name\":\"Zo\u{00eb} \u{1f600}\"}".as_bytes(),
            b"\xff",
            b"{\"a\":\"\xc3\"}",
            b"\xed\xa0\x80",
        ];
        for bytes in cases {
            assert_eq!(utf8(bytes), std::str::from_utf8(bytes).ok(), "{bytes:?}");
        }
        let long = "é".repeat(300);
        assert_eq!(utf8(long.as_bytes()), Some(long.as_str()));
        let mut broken = long.into_bytes();
        broken[400] = 0xff;
        assert_eq!(utf8(&broken), None);
    }

    proptest::proptest! {
        /// Any bytes, mostly text with a few stray ones: the same answer
        /// as std's check.
        #[test]
        fn utf8_agrees_with_std(
            text in "\\PC{0,200}",
            stray in proptest::collection::vec((0usize..400, proptest::prelude::any::<u8>()), 0..3),
        ) {
            let mut bytes = text.into_bytes();
            for (at, byte) in stray {
                if !bytes.is_empty() {
                    let at = at % bytes.len();
                    bytes[at] = byte;
                }
            }
            proptest::prop_assert_eq!(utf8(&bytes), std::str::from_utf8(&bytes).ok());
        }
    }

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
