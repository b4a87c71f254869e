//! The Avro contract read by a decoder nobody here wrote: Python `fastavro`
//! (with confluent-kafka as the Kafka client, `tests/compat/avro_python.py`)
//! decodes `<p>.audiences` written as Avro single-object encoding and a
//! `kafka` destination written in the Confluent wire format, and must get
//! the same changes as a `kafka` destination written as JSON.
//!
//! There is no Confluent registry on these machines (Karapace is not on
//! PyPI): the registry here is a recording HTTP server speaking the
//! registration call of the Confluent REST API, and the test checks the
//! request cdp sends and that records carry the id it answered.
//!
//! Needs the venv `scripts/test.sh` makes (fastavro and confluent-kafka
//! pinned in tests/compat/requirements.txt): skips locally without it,
//! fails in CI.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::Uri;
use axum::routing::post;
use axum::Router;
use cdp::dev::{Dev, DevOptions};
use serde_json::Value;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), BoxError>;

/// The id the recording registry hands out.
const SCHEMA_ID: u64 = 21;
/// Journeys sent; each makes at least one audience change.
const JOURNEYS: usize = 3;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("CDP_COMPAT_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = match std::env::var_os("CDP_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/cdp"),
    };
    cache.join("venv/bin/python")
}

fn importable(python: &Path, module: &str) -> bool {
    std::process::Command::new(python)
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

type Registrations = Arc<Mutex<Vec<(String, Value)>>>;

/// A registry that answers every registration with [`SCHEMA_ID`].
async fn recording_registry() -> Result<(String, Registrations), BoxError> {
    let seen: Registrations = Arc::default();
    let log = seen.clone();
    let app = Router::new().route(
        "/subjects/{subject}/versions",
        post(move |uri: Uri, body: String| {
            let log = log.clone();
            async move {
                if let Ok(mut l) = log.lock() {
                    l.push((
                        uri.path().to_string(),
                        serde_json::from_str(&body).unwrap_or(Value::Null),
                    ));
                }
                format!(r#"{{"id":{SCHEMA_ID}}}"#)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}"), seen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastavro_decodes_the_avro_topics_to_the_same_changes_as_json() -> TestResult {
    let python = python();
    if !importable(&python, "fastavro") || !importable(&python, "confluent_kafka") {
        let message = format!(
            "{}: fastavro or confluent_kafka missing; scripts/test.sh installs them",
            python.display()
        );
        if std::env::var_os("CI").is_some() {
            return Err(message.into());
        }
        eprintln!("skipping: {message}");
        return Ok(());
    }
    let (registry, registrations) = recording_registry().await?;
    let run = std::process::id();
    let (json_topic, wire_topic) = (format!("avro-json-{run}"), format!("avro-wire-{run}"));
    let config = cdp::config::DEMO_CONFIG.replace(
        "destinations: []",
        &format!(
            "audience_changes:\n  format: avro\n\
             destinations:\n\
             \x20 - {{id: json-out, type: kafka, topic: {json_topic}}}\n\
             \x20 - {{id: wire-out, type: kafka, topic: {wire_topic}, format: avro, schema_registry: \"{registry}\"}}\n"
        ),
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cdp.yaml");
    std::fs::write(&path, config)?;
    let dev = Dev::start(DevOptions {
        config: Some(path),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        admin: None,
        state_dir: None,
        stdout: false,
        brokers: None,
    })
    .await?;
    let result = decode_and_compare(&dev, &python, &json_topic, &wire_topic).await;
    dev.stop().await?;
    result?;

    // The registration cdp sent on start: the Confluent REST shape.
    let registrations = registrations.lock().map(|r| r.clone()).unwrap_or_default();
    assert_eq!(registrations.len(), 1, "{registrations:?}");
    let (path, body) = &registrations[0];
    assert_eq!(path, &format!("/subjects/{wire_topic}-value/versions"));
    let schema: Value = serde_json::from_str(body["schema"].as_str().unwrap_or_default())?;
    let ours: Value = serde_json::from_str(cdp_connectors::avro::SCHEMA)?;
    assert_eq!(schema, ours);
    Ok(())
}

async fn decode_and_compare(
    dev: &Dev,
    python: &Path,
    json_topic: &str,
    wire_topic: &str,
) -> TestResult {
    dev.wait_ready(Duration::from_secs(60)).await?;
    let client = reqwest::Client::new();
    let run = std::process::id();
    for n in 0..JOURNEYS {
        cdp::demo::send_journey(&client, dev.collector, &format!("avro{run}x{n}"), None).await?;
    }
    let audiences = dev.factory.topics().audiences();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat/avro_python.py");
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/schemas/audience_change.avsc");
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(python)
            .arg(&script)
            .arg(&dev.bootstrap)
            .arg(&schema)
            .arg(JOURNEYS.to_string())
            .arg(format!("{audiences}:single"))
            .arg(format!("{json_topic}:json"))
            .arg(format!("{wire_topic}:confluent"))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "avro_python.py failed ({}): {}{stdout}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let lines: Vec<Value> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    // (key, change) per topic; repeats of an at-least-once delivery are one.
    // An optional field JSON leaves out (`merged_into`) is Avro's null.
    let of = |topic: &str| -> BTreeSet<String> {
        lines
            .iter()
            .filter(|l| l["topic"] == topic)
            .map(|l| {
                let mut change = l["change"].clone();
                if let Some(fields) = change.as_object_mut() {
                    fields.retain(|k, v| !(k == "merged_into" && v.is_null()));
                }
                format!("{}|{}", l["key"], change)
            })
            .collect()
    };
    let (single, json, wire) = (of(&audiences), of(json_topic), of(wire_topic));
    assert!(json.len() >= JOURNEYS, "too few changes: {json:?}");
    assert_eq!(
        single, json,
        "single-object <p>.audiences vs JSON destination"
    );
    assert_eq!(
        wire, json,
        "Confluent wire format destination vs JSON destination"
    );
    for l in lines.iter().filter(|l| l["topic"] == wire_topic) {
        assert_eq!(l["schema_id"], SCHEMA_ID, "{l}");
    }
    // The JSON records parse as the contract says.
    for l in lines.iter().filter(|l| l["topic"] == json_topic) {
        let change: cdp_operators::messages::AudienceChange =
            serde_json::from_value(l["change"].clone())?;
        assert_eq!(Some(change.profile_id.as_str()), l["key"].as_str());
    }
    Ok(())
}
