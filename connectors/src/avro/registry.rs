//! Registering the audience-change schema with a Confluent-API schema
//! registry (Confluent Schema Registry, Karapace, Redpanda, Apicurio's
//! compatibility API), once, when a stage or destination that writes Avro
//! starts.
//!
//! `POST {url}/subjects/{subject}/versions` with
//! `{"schema": "<the schema's JSON text>"}` and content type
//! `application/vnd.schemaregistry.v1+json`; the answer `{"id": N}` is the
//! id every record then carries. Registering a schema the subject already
//! has returns the existing id, so every start may register. Subjects
//! follow the default TopicNameStrategy: `<topic>-value`.

use std::time::Duration;

/// Content type of the registry's REST API.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";
/// Attempts before a start fails on an unreachable registry.
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Why the schema could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry {url}: invalid url: {reason}")]
    Url { url: String, reason: String },
    #[error("schema registry {url}, subject {subject}: {reason}")]
    Refused {
        url: String,
        subject: String,
        reason: String,
    },
    #[error("schema registry: {0}")]
    Setup(String),
}

/// The subject of a topic's values under TopicNameStrategy.
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// Register `schema` under `subject`; returns the schema id. Retries
/// network errors and 5xx a few times; a 4xx (an incompatible schema, a
/// bad subject) fails at once with the registry's message.
pub async fn register(url: &str, subject: &str, schema: &str) -> Result<u32, RegistryError> {
    let base = reqwest::Url::parse(url).map_err(|e| RegistryError::Url {
        url: url.to_string(),
        reason: e.to_string(),
    })?;
    let mut endpoint = base.clone();
    endpoint
        .path_segments_mut()
        .map_err(|()| RegistryError::Url {
            url: url.to_string(),
            reason: "cannot be a base".into(),
        })?
        .pop_if_empty()
        .extend(["subjects", subject, "versions"]);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| RegistryError::Setup(e.to_string()))?;
    let body = serde_json::json!({ "schema": schema });
    let refused = |reason: String| RegistryError::Refused {
        url: url.to_string(),
        subject: subject.to_string(),
        reason,
    };
    let mut backoff = FIRST_BACKOFF;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let sent = client
            .post(endpoint.clone())
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .header(reqwest::header::ACCEPT, CONTENT_TYPE)
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => {
                #[derive(serde::Deserialize)]
                struct Registered {
                    id: u32,
                }
                let text = response.text().await.map_err(|e| refused(e.to_string()))?;
                let r: Registered = serde_json::from_str(&text)
                    .map_err(|e| refused(format!("unexpected answer {text:?}: {e}")))?;
                tracing::info!(url, subject, schema_id = r.id, "registered the avro schema");
                return Ok(r.id);
            }
            Ok(response) if response.status().is_client_error() => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                return Err(refused(format!("HTTP {status}: {text}")));
            }
            Ok(response) => last = format!("HTTP {}", response.status()),
            Err(e) => last = e.to_string(),
        }
        tracing::warn!(url, subject, attempt, reason = %last, "schema registration failed; retrying");
        if attempt < ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    Err(refused(format!(
        "gave up after {ATTEMPTS} attempts: {last}"
    )))
}

/// [`register`] from synchronous code, inside or outside a tokio runtime:
/// runs on a thread of its own with a small runtime.
pub fn register_blocking(url: &str, subject: &str, schema: &str) -> Result<u32, RegistryError> {
    let (url, subject, schema) = (url.to_string(), subject.to_string(), schema.to_string());
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| RegistryError::Setup(e.to_string()))?
            .block_on(register(&url, &subject, &schema))
    })
    .join()
    .map_err(|_| RegistryError::Setup("registration thread panicked".into()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use axum::http::{HeaderMap, StatusCode, Uri};
    use axum::routing::post;
    use axum::Router;

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
    type Seen = Arc<Mutex<Vec<(String, Option<String>, serde_json::Value)>>>;

    /// A registry answering `status` and `answer` to every registration,
    /// recording path, content type and body.
    async fn registry(
        status: StatusCode,
        answer: &'static str,
    ) -> Result<(String, Seen), std::io::Error> {
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let app = Router::new().route(
            "/subjects/{subject}/versions",
            post(move |uri: Uri, headers: HeaderMap, body: String| {
                let log = log.clone();
                async move {
                    let content_type = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let body = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
                    if let Ok(mut l) = log.lock() {
                        l.push((uri.path().to_string(), content_type, body));
                    }
                    (status, answer)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok((format!("http://{addr}/"), seen))
    }

    #[tokio::test]
    async fn registers_in_the_confluent_rest_shape() -> TestResult {
        let (url, seen) = registry(StatusCode::OK, r#"{"id":7}"#).await?;
        let id = register(&url, &value_subject("cdp.audiences"), super::super::SCHEMA).await?;
        assert_eq!(id, 7);
        let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
        assert_eq!(seen.len(), 1);
        let (path, content_type, body) = &seen[0];
        assert_eq!(path, "/subjects/cdp.audiences-value/versions");
        assert_eq!(content_type.as_deref(), Some(CONTENT_TYPE));
        // The schema travels as a string holding its JSON, nothing else.
        let object = body.as_object().ok_or("body is not an object")?;
        assert_eq!(object.keys().collect::<Vec<_>>(), vec!["schema"]);
        let schema: serde_json::Value =
            serde_json::from_str(body["schema"].as_str().ok_or("schema is not a string")?)?;
        assert_eq!(schema["name"], "AudienceChange");
        Ok(())
    }

    #[tokio::test]
    async fn an_incompatible_schema_fails_with_the_registry_message() -> TestResult {
        let (url, seen) = registry(
            StatusCode::CONFLICT,
            r#"{"error_code":409,"message":"Schema being registered is incompatible"}"#,
        )
        .await?;
        let err = register(&url, "t-value", "{}")
            .await
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("409") && err.contains("incompatible"), "{err}");
        assert_eq!(
            seen.lock().map(|s| s.len()).unwrap_or(0),
            1,
            "no retry on 4xx"
        );
        Ok(())
    }

    #[test]
    fn registers_from_synchronous_code() -> TestResult {
        let rt = tokio::runtime::Runtime::new()?;
        let (url, _seen) = rt.block_on(registry(StatusCode::OK, r#"{"id":3}"#))?;
        // Called from inside a runtime, as stage setup is.
        let id = rt.block_on(async { register_blocking(&url, "t-value", "{}") })?;
        assert_eq!(id, 3);
        Ok(())
    }
}
