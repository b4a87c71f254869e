//! Lines for the person at the terminal (`cdp dev`'s banner, its warning
//! about an earlier run's state): plain text on stderr, or a log record
//! when logs are JSON (`--log-format json`), so that every stderr line of
//! a JSON-logging process parses.

use std::sync::atomic::{AtomicBool, Ordering};

static JSON: AtomicBool = AtomicBool::new(false);

/// Logs are JSON from now on.
pub fn logs_are_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

/// Say `line` on stderr in the logs' format.
pub fn say(line: &str) {
    if JSON.load(Ordering::Relaxed) {
        tracing::info!(target: "cdp", "{line}");
    } else {
        eprintln!("{line}");
    }
}

/// Say why the command failed, its last line on stderr: `error: …` as
/// text, or an `ERROR` log record when logs are JSON.
pub fn fail(error: &anyhow::Error) {
    if JSON.load(Ordering::Relaxed) {
        tracing::error!(target: "cdp", "{error:#}");
    } else {
        eprintln!("error: {error:#}");
    }
}
