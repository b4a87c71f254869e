//! Reading a request body within its size and time limits, and the byte
//! check serde leaves to us (lone surrogate escapes, replaced).

use axum::body::Body;
use futures::StreamExt;

pub(super) enum ReadError {
    TooLarge,
    Stream(String),
}

/// Read the (decompressed) body, refusing it as soon as it passes `limit`.
pub(super) async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ReadError> {
    // Content-Length, when sent, sizes the buffer once.
    let expected = axum::body::HttpBody::size_hint(&body).lower();
    let mut buf = Vec::with_capacity(usize::try_from(expected).unwrap_or(limit).min(limit));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ReadError::Stream(e.to_string()))?;
        if buf.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// Replace every `\uD800`–`\uDFFF` escape that is not half of a surrogate
/// pair with `\uFFFD` (the same six bytes), as `JSON.parse` and most JSON
/// readers do; returns how many. JavaScript strings cut in the middle of an
/// emoji (`'rocket 🚀'.slice(0, 8)`) reach us as such escapes from every JS
/// SDK; serde_json, and so every stage, refuses them. In a body that parses
/// as JSON every backslash is inside a string and starts an escape, so the
/// rewrite changes no structure; a body that does not parse is refused
/// either way.
pub(super) fn replace_lone_surrogates(body: &mut [u8]) -> usize {
    let mut replaced = 0;
    let mut from = 0;
    while let Some(at) = lone_surrogate(body, from) {
        if let Some(digits) = body.get_mut(at + 2..at + 6) {
            digits.copy_from_slice(b"FFFD");
        }
        replaced += 1;
        from = at + 6;
    }
    replaced
}

/// The offset of the first `\uD800`–`\uDFFF` escape at or after `from`
/// that is not half of a surrogate pair.
fn lone_surrogate(body: &[u8], from: usize) -> Option<usize> {
    let hex = |at: usize| -> Option<u32> {
        let digits = body.get(at..at + 4)?;
        u32::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let unicode_escape =
        |at: usize| -> Option<u32> { (body.get(at..at + 2)? == b"\\u").then(|| hex(at + 2))? };
    let mut i = from;
    while let Some(found) = next_backslash(body, i) {
        let Some(code) = unicode_escape(found) else {
            i = found + 2; // `\"`, `\\`, `\n`, ...: one escaped byte
            continue;
        };
        i = found + 6;
        match code {
            0xD800..=0xDBFF => match unicode_escape(i) {
                Some(0xDC00..=0xDFFF) => i += 6,
                _ => return Some(found),
            },
            0xDC00..=0xDFFF => return Some(found),
            _ => {}
        }
    }
    None
}

/// The next backslash at or after `from`, eight bytes at a time.
fn next_backslash(body: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let rest = body.get(from..)?;
    let mut chunks = rest.chunks_exact(8);
    let mut offset = from;
    for chunk in chunks.by_ref() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word) ^ (ONES * u64::from(b'\\'));
        // A zero byte in `x` is a backslash in the chunk.
        if x.wrapping_sub(ONES) & !x & HIGHS != 0 {
            return chunk.iter().position(|&b| b == b'\\').map(|p| offset + p);
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'\\')
        .map(|p| offset + p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use cdp_pipeline::Span;
    use serde::de;
    use serde_json::{json, Value};
    use std::io::Write as _;

    use crate::collector::testkit::*;
    use crate::collector::CollectorConfig;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_events_and_batches_get_413() -> TestResult {
        let env = start().await?;
        let big = "x".repeat(33 * 1024);
        let event = |pad: &str| json!({"type": "track", "userId": "u", "event": "E", "properties": {"pad": pad}});
        let too_many: Vec<Value> = (0..2501)
            .map(|_| json!({"type": "track", "userId": "u", "event": "E"}))
            .collect();
        let too_big: Vec<Value> = (0..20).map(|_| event(&"y".repeat(30 * 1024))).collect();
        let cases = vec![
            (
                env.authed("/v1/track").json(&event(&big)),
                "event larger than",
            ),
            (
                env.authed("/v1/batch")
                    .json(&json!({"batch": [event(&big)]})),
                "batch[0]: event larger than",
            ),
            // 20 KB of its own and 20 KB of the batch's `context`: over
            // 32 KB as written.
            (
                env.authed("/v1/batch").json(&json!({
                    "batch": [event(&"z".repeat(20 * 1024))],
                    "context": {"pad": "c".repeat(20 * 1024)},
                })),
                "batch[0]: event larger than",
            ),
            (
                env.authed("/v1/batch").json(&json!({"batch": too_many})),
                "at most 2500",
            ),
            (
                env.authed("/v1/batch").json(&json!({"batch": too_big})),
                "request body larger than",
            ),
        ];
        for (request, reason) in cases {
            let (status, body) = json_body(request.send().await?).await?;
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
            assert!(
                str_field(&body, "error").contains(reason),
                "{body} should mention {reason}"
            );
        }
        // A small gzip body that inflates past the limit is refused too.
        let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        bomb.write_all(br#"{"batch":[], "pad":""#)?;
        bomb.write_all(&vec![b' '; 600 * 1024])?;
        bomb.write_all(br#""}"#)?;
        let bomb = bomb.finish()?;
        assert!(bomb.len() < 10 * 1024);
        let response = env
            .authed("/v1/batch")
            .header("content-encoding", "gzip")
            .body(bomb)
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 413);
        env.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_that_does_not_arrive_in_time_gets_408() -> TestResult {
        let config = CollectorConfig {
            body_timeout: Span::from_millis(300),
            ..Default::default()
        };
        let env = start_with(config, &[]).await?;
        // Announces 100 bytes, sends 10, then stalls.
        let request = b"POST /v1/track HTTP/1.1\r\nhost: x\r\nauthorization: Basic d2tfd2ViXzEyMzo=\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"userId\":";
        let answer = raw_exchange(&env, request).await?;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        env.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spent_memory_budget_means_503() -> TestResult {
        let config = CollectorConfig {
            max_in_flight_bytes: 16,
            ..Default::default()
        };
        let env = start_with(config, &[]).await?;
        let response = env
            .authed("/v1/track")
            .json(&json!({"userId": "u", "event": "Bigger than sixteen bytes"}))
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 503);
        assert!(response.headers().get("retry-after").is_some());
        env.stop().await
    }

    /// A batch whose one event holds half an emoji (what JavaScript's
    /// `JSON.stringify` writes for a string cut inside a surrogate pair):
    /// accepted whole, the half written as U+FFFD, which every stage reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn half_an_emoji_is_written_as_a_replacement_character_not_refused() -> TestResult {
        let env = start().await?;
        let body = r#"{"batch": [
            {"type": "track", "anonymousId": "s2", "event": "Fine"},
            {"type": "track", "anonymousId": "s2", "event": "Search",
             "properties": {"q": "rocket \ud83d", "ok": "\ud83d\ude80", "low": "\uDE80!"}}
        ]}"#;
        let response = env.authed("/v1/batch").body(body).send().await?;
        assert_eq!(response.status(), StatusCode::OK);
        let records = env.consume(2).await?;
        let search = records
            .iter()
            .find(|r| r.value["event"] == "Search")
            .ok_or("no Search event")?;
        assert_eq!(search.value["properties"]["q"], json!("rocket \u{FFFD}"));
        assert_eq!(search.value["properties"]["ok"], json!("🚀"));
        assert_eq!(search.value["properties"]["low"], json!("\u{FFFD}!"));
        env.stop().await
    }

    /// One UTF-16 code unit of a JSON string, written as JSON writers do:
    /// surrogates (and sometimes anything) as `\uXXXX` escapes in either
    /// case, quotes and backslashes escaped, the rest as UTF-8.
    fn encode_unit(unit: u16, escape: bool, upper: bool) -> String {
        let hex = |u: u16| {
            if upper {
                format!("\\u{u:04X}")
            } else {
                format!("\\u{u:04x}")
            }
        };
        match char::from_u32(u32::from(unit)) {
            Some('"') if !escape => "\\\"".into(),
            Some('\\') if !escape => "\\\\".into(),
            Some(c) if !escape && u32::from(unit) >= 0x20 => c.to_string(),
            _ => hex(unit),
        }
    }

    proptest::proptest! {
        /// The rewrite reads a JSON string as JSON.parse does: the string's
        /// UTF-16 units decoded with every unpaired surrogate as U+FFFD
        /// (the oracle is the standard library's `decode_utf16`).
        #[test]
        fn a_rewritten_body_reads_as_json_parse_reads_it(
            units in proptest::collection::vec(
                proptest::prop_oneof![
                    0xD800u16..0xDC00,
                    0xDC00u16..0xE000,
                    0x20u16..0x80,
                    proptest::prelude::Just(0x5Cu16),
                    proptest::prelude::Just(0x22u16),
                    0x80u16..0xD800,
                ],
                0..24,
            ),
            escapes in proptest::collection::vec(proptest::prelude::any::<(bool, bool)>(), 24),
        ) {
            let text: String = units
                .iter()
                .zip(&escapes)
                .map(|(&u, &(escape, upper))| encode_unit(u, escape, upper))
                .collect();
            let mut body = format!(r#"{{"k\u0041": "{text}", "n": 1}}"#).into_bytes();
            replace_lone_surrogates(&mut body);
            let parsed: Value = serde_json::from_slice(&body)
                .map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let want: String = char::decode_utf16(units.iter().copied())
                .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
                .collect();
            proptest::prop_assert_eq!(&parsed["kA"], &json!(want));
            proptest::prop_assert_eq!(&parsed["n"], &json!(1));
        }
    }

    #[test]
    fn lone_surrogates_are_found_and_pairs_and_escaped_backslashes_are_not() {
        let cases: [(&str, Option<usize>); 9] = [
            (r#"{"a": "plain"}"#, None),
            (r#"{"a": "\u00e9 \ud83d\ude00 \"q\" \\"}"#, None),
            (r#"{"a": "\\ud800"}"#, None),
            (r#"{"a": "\\\ud83d\ude00"}"#, None),
            (r#"{"a": "x\ud800"}"#, Some(8)),
            (r#"{"a": "\ud800\u0041"}"#, Some(7)),
            (r#"{"a": "\udc00"}"#, Some(7)),
            (r#"{"a": "\ude00\ud83d"}"#, Some(7)),
            (
                r#"{"long key to pass eight bytes": "\uDBFF\uDFFF", "b": "\uD800"}"#,
                Some(55),
            ),
        ];
        for (body, expected) in cases {
            assert!(
                serde_json::from_str::<de::IgnoredAny>(body).is_ok(),
                "{body}"
            );
            assert_eq!(lone_surrogate(body.as_bytes(), 0), expected, "{body}");
        }
        for i in 0..40 {
            let body = format!("{}\\", "x".repeat(i));
            assert_eq!(next_backslash(body.as_bytes(), 0), Some(i));
            assert_eq!(next_backslash(body.as_bytes(), i + 1), None);
        }
    }
}
