//! Timers that follow from state: not logged, derived again on restore.

use cdp_pipeline::{Context, Operator, OperatorError, Record};

use super::common::{mock_stage, MockOptions};
use super::support::*;

/// Remembers each record's key as `e/<key>` until the due time (ms) in its
/// value, with a timer keyed by the entry: timers that follow from state.
struct Due;

impl Operator for Due {
    fn process(&mut self, r: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let key = r.key.unwrap_or_default();
        let Some(due) = std::str::from_utf8(r.value)
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
        else {
            return Err(OperatorError::rejected("bad_due", serde_json::json!({})));
        };
        let entry = [b"e/", key].concat();
        ctx.put(&entry, r.value.to_vec());
        ctx.set_timer(due, &entry);
        ctx.emit("next", Some(b"set".to_vec()), key.to_vec());
        Ok(())
    }

    fn on_timer(&mut self, key: &[u8], ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        if ctx.get(key)?.is_some() {
            ctx.delete(key);
            ctx.emit("next", Some(b"fired".to_vec()), key.to_vec());
        }
        Ok(())
    }
}

/// [`Due`]'s timers, from its entries.
fn due_of(key: &[u8], value: &[u8]) -> Option<i64> {
    key.starts_with(b"e/")
        .then(|| std::str::from_utf8(value).ok()?.parse().ok())
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_derived_from_state_are_not_logged_and_fire_after_a_restore() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = mock_stage(MockOptions {
        stage: "due",
        partitions: 2,
        state_dir: Some(dir.path().to_path_buf()),
        max_batch: None,
        properties: &[],
    })?;
    let spec = || {
        let mut spec = stage("due", "t.in", "t.out", true);
        spec.operator = Box::new(|_| Box::new(Due));
        spec.timers_from_state = Some(due_of);
        spec
    };
    // Due well after the first run ends: the timers must survive it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let due = (now + 15_000).to_string();
    for key in ["a", "b"] {
        produce(&s.producer, key, &due, None).await?;
    }
    let out = run_until(spec(), &s.factory, "t.out", |o| counts(o, "set").len() >= 2).await?;
    assert_eq!(counts(&out, "set").len(), 2);
    assert!(
        counts(&out, "fired").is_empty(),
        "the timers fired during the first run: the test's due time is too early"
    );

    // The changelog holds the entries and commit markers, no timer.
    let f = s.factory.clone();
    let log = tokio::task::spawn_blocking(move || {
        read_all(&f, "t.due-changelog", |o| {
            let has = |k: &str| o.iter().any(|(key, _)| key == k);
            has("e/a") && has("e/b") && o.iter().any(|(k, _)| k.contains("cdp/commit/"))
        })
    })
    .await?;
    assert!(log.iter().any(|(k, _)| k == "e/a") && log.iter().any(|(k, _)| k == "e/b"));
    let timers: Vec<&String> = log
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.contains("cdp/timer/"))
        .collect();
    assert!(timers.is_empty(), "timers were logged: {timers:?}");

    // Lose the disk: the restore sets the timers again from the entries.
    std::fs::remove_dir_all(dir.path())?;
    let out = run_until(spec(), &s.factory, "t.out", |o| {
        counts(o, "fired").len() >= 2
    })
    .await?;
    let mut fired = counts(&out, "fired");
    fired.sort();
    assert_eq!(
        fired,
        ["e/a", "e/b"],
        "each restored entry's timer fires once"
    );
    Ok(())
}
