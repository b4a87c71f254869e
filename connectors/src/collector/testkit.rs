//! Test helpers: a collector on a mock cluster, and ways to talk to it.

use super::*;
use cdp_operators::config::SourceKind;
use std::time::Instant;

use axum::http::StatusCode;
use cdp_pipeline::{envelope, Shutdown};
use serde_json::Value;
use std::time::Duration;

use cdp_pipeline::{ClientFactory, Health, KafkaConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{Message, Offset, TopicPartitionList};

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(super) type TestResult = Result<(), BoxError>;

pub(super) const WRITE_KEY: &str = "wk_web_123";
/// The write key of a `website` source (the collector fills `context.ip`).
pub(super) const BROWSER_KEY: &str = "wk_browser_1";
pub(super) const PARTITIONS: i32 = 2;

/// A collector served on a real socket, producing to an in-process
/// broker (real Kafka protocol over TCP).
pub(super) struct Env {
    pub(super) mock: Option<MockCluster<'static, DefaultProducerContext>>,
    pub(super) brokers: String,
    pub(super) topic: String,
    pub(super) base: String,
    pub(super) http: reqwest::Client,
    pub(super) shutdown: Shutdown,
    pub(super) health: Health,
    pub(super) server: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub(super) fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub(super) async fn start_with(
    config: CollectorConfig,
    producer_props: &[(&str, &str)],
) -> Result<Env, BoxError> {
    let mock = MockCluster::new(1)?;
    let brokers = mock.bootstrap_servers();
    let topic = unique("raw");
    mock.create_topic(&topic, PARTITIONS, 1)?;
    let mut kafka = KafkaConfig {
        brokers: brokers.clone(),
        ..Default::default()
    };
    for (k, v) in producer_props {
        kafka
            .properties
            .insert(format!("producer.{k}"), v.to_string());
    }
    let factory = ClientFactory::new(kafka)?;
    let sources = [
        SourceConfig {
            id: "web".into(),
            write_key: WRITE_KEY.into(),
            tracking_plan: None,
            kind: SourceKind::Server,
        },
        SourceConfig {
            id: "browser".into(),
            write_key: BROWSER_KEY.into(),
            tracking_plan: None,
            kind: SourceKind::Website,
        },
    ];
    let collector = Collector::new(config, &sources, &factory, topic.clone())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let shutdown = Shutdown::default();
    let health = Health::default();
    let server =
        tokio::spawn(collector.serve_on(listener, shutdown.clone(), health.register("collect")));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?;
    Ok(Env {
        mock: Some(mock),
        brokers,
        topic,
        base,
        http,
        shutdown,
        health,
        server,
    })
}

pub(super) async fn start() -> Result<Env, BoxError> {
    start_with(CollectorConfig::default(), &[]).await
}

/// One record read back from the topic.
#[derive(Debug)]
pub(super) struct Consumed {
    pub(super) key: Option<String>,
    pub(super) value: Value,
    pub(super) source: Option<String>,
}

impl Env {
    pub(super) fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.base))
    }

    pub(super) fn authed(&self, path: &str) -> reqwest::RequestBuilder {
        self.post(path).basic_auth(WRITE_KEY, Some(""))
    }

    /// Read `expected` records from every partition, or fail at the
    /// deadline.
    pub(super) async fn consume(&self, expected: usize) -> Result<Vec<Consumed>, BoxError> {
        let brokers = self.brokers.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || consume_blocking(&brokers, &topic, expected)).await?
    }

    pub(super) async fn stop(self) -> TestResult {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(10), self.server).await???;
        drop(self.mock);
        Ok(())
    }
}

pub(super) fn consume_blocking(
    brokers: &str,
    topic: &str,
    expected: usize,
) -> Result<Vec<Consumed>, BoxError> {
    let consumer: BaseConsumer = ClientFactory::new(KafkaConfig {
        brokers: brokers.to_string(),
        ..Default::default()
    })?
    .plain_consumer(&unique("test"))?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut out = Vec::new();
    while out.len() < expected && Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        let source = message.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == envelope::SOURCE)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        out.push(Consumed {
            key: message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            value: serde_json::from_slice(message.payload().unwrap_or_default())?,
            source,
        });
    }
    if out.len() < expected {
        return Err(format!(
            "read {} of {expected} records before the deadline",
            out.len()
        )
        .into());
    }
    Ok(out)
}

pub(super) async fn json_body(
    response: reqwest::Response,
) -> Result<(StatusCode, Value), BoxError> {
    let status = StatusCode::from_u16(response.status().as_u16())?;
    Ok((status, response.json().await?))
}

pub(super) fn str_field<'a>(v: &'a Value, field: &str) -> &'a str {
    v.get(field).and_then(Value::as_str).unwrap_or_default()
}

/// Poll `done` until it holds or `timeout` passes; whether it held.
pub(super) async fn eventually(timeout: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

/// Send raw bytes on a fresh connection and read the answer (until the
/// server closes or 5 s pass).
pub(super) async fn raw_exchange(env: &Env, request: &[u8]) -> Result<String, BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = env.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            if text.contains("\r\n\r\n") && text.trim_end().ends_with('}') {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read).await??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}
