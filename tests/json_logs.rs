//! With `--log-format json`, every line a command writes on stderr is a
//! JSON log record, its banner included (log shippers parse each line).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn the_mock_brokers_banner_is_a_json_record_under_json_logs(
) -> Result<(), Box<dyn std::error::Error>> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .args([
            "--log-format",
            "json",
            "mock-broker",
            "--prefix",
            "t",
            "--partitions",
            "1",
        ])
        .env_remove("CDP_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut first = String::new();
    let read = BufReader::new(stderr).read_line(&mut first);
    let _ = child.kill();
    let _ = child.wait();
    read?;
    let record: serde_json::Value =
        serde_json::from_str(first.trim()).map_err(|e| format!("not JSON: {first:?}: {e}"))?;
    let message = record
        .pointer("/fields/message")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| format!("no message in {record}"))?;
    assert!(
        message.starts_with("cdp mock-broker: at 127.0.0.1:"),
        "{message}"
    );
    Ok(())
}

#[test]
fn a_failed_commands_last_line_is_a_json_record_under_json_logs(
) -> Result<(), Box<dyn std::error::Error>> {
    let out = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .args(["--log-format", "json", "topics", "check", "--config"])
        .arg("/no/such/cdp.yaml")
        .env_remove("CDP_LOG")
        .output()?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8(out.stderr)?;
    let last = stderr.lines().last().ok_or("nothing on stderr")?;
    let record: serde_json::Value =
        serde_json::from_str(last).map_err(|e| format!("not JSON: {last:?}: {e}"))?;
    assert_eq!(record["level"], "ERROR", "{record}");
    let message = record
        .pointer("/fields/message")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| format!("no message in {record}"))?;
    assert!(message.contains("/no/such/cdp.yaml"), "{message}");
    Ok(())
}
