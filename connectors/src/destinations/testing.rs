//! Helpers the destinations' tests share: configs, records, and a local
//! HTTP receiver that logs what it was sent.

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use cdp_pipeline::SinkRecord;

use super::{DestinationConfig, DestinationKind};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub fn dest(id: &str, kind: DestinationKind) -> DestinationConfig {
    DestinationConfig::new(id, kind)
}

pub fn record(key: &str, n: u32) -> SinkRecord {
    SinkRecord {
        delivery_id: format!("audiences:0/1/{n}/0"),
        key: Some(key.as_bytes().to_vec()),
        value: format!(
            r#"{{"type":"audience_change","audience":"vip","n":{n},"event_time":"2026-01-01T00:00:00Z"}}"#
        )
        .into_bytes(),
    }
}

/// What the test receiver saw: headers and body of every request.
#[derive(Default)]
pub struct Received {
    pub requests: Vec<(HeaderMap, Vec<u8>)>,
}

/// A local webhook receiver answering with `statuses` in turn (the last
/// one repeats). Returns its URL and the log of requests.
pub async fn receiver(
    statuses: Vec<StatusCode>,
) -> Result<(String, Arc<Mutex<Received>>), Box<dyn std::error::Error + Send + Sync>> {
    let log = Arc::new(Mutex::new(Received::default()));
    let state = log.clone();
    let app = Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let state = state.clone();
            let statuses = statuses.clone();
            async move {
                let mut log = match state.lock() {
                    Ok(l) => l,
                    Err(_) => return StatusCode::INTERNAL_SERVER_ERROR,
                };
                let n = log.requests.len();
                log.requests.push((headers, body.to_vec()));
                statuses
                    .get(n)
                    .or(statuses.last())
                    .copied()
                    .unwrap_or(StatusCode::OK)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}/hook"), log))
}

pub fn requests(log: &Arc<Mutex<Received>>) -> Vec<(HeaderMap, Vec<u8>)> {
    log.lock().map(|l| l.requests.clone()).unwrap_or_default()
}
