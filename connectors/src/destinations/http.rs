//! What the HTTP destinations (`webhook`, `segment`) share: their core
//! (client, retry policy, batch deadline, rate limit, telemetry) and its
//! builder methods, one request of a batch (skipped once the endpoint gave
//! up, retried, bounded by the deadline), lanes of requests run
//! concurrently, how one attempt's answer is judged, bounded retries with
//! exponential backoff that honour `Retry-After`, and the
//! `max_per_second` rate limit.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use super::config::check_url;
use super::telemetry::DeliveryTelemetry;
use super::{DestinationError, BASE_BACKOFF, DEFAULT_BATCH_DEADLINE, KEY_CONCURRENCY, MAX_BACKOFF};

/// What every HTTP destination keeps besides its own settings.
#[derive(Clone)]
pub struct HttpCore {
    pub id: String,
    pub client: reqwest::Client,
    pub policy: RetryPolicy,
    pub batch_deadline: Duration,
    pub limiter: Option<Arc<RateLimiter>>,
    pub telemetry: DeliveryTelemetry,
}

/// The error of a destination `id` whose `url` cannot be used.
pub fn invalid_url(id: &str, url: &str, reason: String) -> DestinationError {
    DestinationError::InvalidUrl {
        id: id.to_string(),
        url: url.to_string(),
        reason,
    }
}

impl HttpCore {
    /// The core of destination `id` and its checked `url`. The client
    /// follows no redirect: a redirected POST turns into a GET on 301/302,
    /// so any 3xx is a misconfigured URL and fails at once.
    pub fn new(
        id: &str,
        url: &str,
        timeout: Duration,
        max_attempts: u32,
    ) -> Result<(Self, reqwest::Url), DestinationError> {
        check_url(url).map_err(|reason| invalid_url(id, url, reason))?;
        let parsed = reqwest::Url::parse(url).map_err(|e| invalid_url(id, url, e.to_string()))?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|source| DestinationError::HttpClient {
                id: id.to_string(),
                source,
            })?;
        let core = HttpCore {
            id: id.to_string(),
            client,
            policy: RetryPolicy {
                max_attempts: max_attempts.max(1),
                base_backoff: BASE_BACKOFF,
            },
            batch_deadline: DEFAULT_BATCH_DEADLINE.to_std(),
            limiter: None,
            telemetry: DeliveryTelemetry::new(id),
        };
        Ok((core, parsed))
    }

    /// The shared state of one `deliver` call.
    pub fn start_batch(&self) -> BatchRun {
        BatchRun {
            deadline: Instant::now() + self.batch_deadline,
            endpoint_down: AtomicBool::new(false),
        }
    }

    /// One request of a batch carrying `n` changes: skipped once an earlier
    /// request of the batch gave up on the endpoint (waiting out every
    /// retry of every request would stall the stage), retried per the
    /// policy, and bounded by the batch deadline. A failure counts `n`
    /// dead letters; delivered changes are the caller's to count (their
    /// lag needs the records).
    pub async fn send<F, Fut>(&self, batch: &BatchRun, n: u32, attempt: F) -> Result<(), String>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Attempt>,
    {
        let result = if batch.endpoint_down.load(Ordering::Relaxed) {
            Err("skipped: an earlier request of this batch gave up on the endpoint".to_string())
        } else {
            let retried = with_retries(
                self.policy,
                &self.telemetry,
                self.limiter.as_deref(),
                n,
                attempt,
            );
            match tokio::time::timeout_at(batch.deadline, retried).await {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "batch deadline of {} ms passed",
                    self.batch_deadline.as_millis()
                )),
            }
        };
        if let Err(reason) = &result {
            if reason.starts_with("gave up") {
                batch.endpoint_down.store(true, Ordering::Relaxed);
            }
            self.telemetry.dead_lettered(u64::from(n));
        }
        result
    }
}

/// The deadline of one `deliver` call, and whether one of its requests
/// gave up on the endpoint.
pub struct BatchRun {
    deadline: Instant,
    endpoint_down: AtomicBool,
}

/// Run `lanes` (each yields `(index in the batch, result)` in its own
/// order) with up to [`KEY_CONCURRENCY`] in flight, and put their results
/// into `results` by index.
pub async fn run_lanes<L, Fut>(
    mut results: Vec<Result<(), String>>,
    lanes: impl IntoIterator<Item = L>,
    run: impl FnMut(L) -> Fut,
) -> Vec<Result<(), String>>
where
    Fut: Future<Output = Vec<(usize, Result<(), String>)>>,
{
    let done: Vec<Vec<(usize, Result<(), String>)>> = futures::stream::iter(lanes)
        .map(run)
        .buffer_unordered(KEY_CONCURRENCY)
        .collect()
        .await;
    for (i, result) in done.into_iter().flatten() {
        if let Some(slot) = results.get_mut(i) {
            *slot = result;
        }
    }
    results
}

/// `impl HttpSink` for a sink `$sink { inner: Arc<$inner> }` whose inner
/// struct (`Clone`) has a `core: HttpCore`.
macro_rules! impl_http_sink {
    ($sink:ident) => {
        impl $crate::destinations::http::HttpSink for $sink {
            fn with_core(self, change: impl FnOnce(&mut HttpCore)) -> Self {
                let mut inner = (*self.inner).clone();
                change(&mut inner.core);
                $sink {
                    inner: Arc::new(inner),
                }
            }
        }
    };
}
pub(super) use impl_http_sink;

/// The builder methods every HTTP destination has, over its [`HttpCore`].
pub trait HttpSink: Sized {
    /// A copy of the sink with its core changed by `change`.
    fn with_core(self, change: impl FnOnce(&mut HttpCore)) -> Self;

    /// Bound the time one batch may take (default 60 s).
    fn with_batch_deadline(self, deadline: Duration) -> Self {
        self.with_core(|c| c.batch_deadline = deadline)
    }

    /// Change the first retry delay (doubled per attempt, default 100 ms).
    fn with_backoff(self, base: Duration) -> Self {
        self.with_core(|c| c.policy.base_backoff = base)
    }

    /// Deliver at most `per_second` changes a second.
    fn with_rate_limit(self, per_second: u32) -> Self {
        self.with_core(|c| c.limiter = Some(Arc::new(RateLimiter::new(per_second))))
    }
}

/// Longest `Retry-After` honoured; a longer one waits this long (the batch
/// deadline bounds every wait anyway).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How one attempt ended.
#[derive(Debug)]
pub enum Attempt {
    Delivered,
    /// Worth another try, after at least this long (a `Retry-After`).
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    Fatal(String),
}

/// Judge an HTTP answer: 2xx delivered; 5xx, 429 and network errors worth
/// a retry (after `Retry-After` when given); any other status fails at
/// once (a 3xx is a misconfigured URL: redirects are not followed).
pub fn classify(sent: Result<reqwest::Response, reqwest::Error>) -> Attempt {
    let response = match sent {
        Err(e) => {
            return Attempt::Retry {
                reason: format!("request failed: {e}"),
                after: None,
            }
        }
        Ok(r) => r,
    };
    let status = response.status();
    if status.is_success() {
        Attempt::Delivered
    } else if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        let after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, chrono::Utc::now()));
        Attempt::Retry {
            reason: format!("HTTP {status}"),
            after,
        }
    } else {
        Attempt::Fatal(format!("HTTP {status}"))
    }
}

/// A `Retry-After` value: delay-seconds or an HTTP-date.
pub fn retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let ms = at.timestamp_millis() - now.timestamp_millis();
    Some(Duration::from_millis(ms.max(0) as u64))
}

/// Attempts and backoff of one destination.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_backoff: Duration,
}

/// Run `attempt` until it delivers, fails for good or `max_attempts` are
/// spent. `n` is how many changes one attempt carries (for the metrics);
/// `limiter`, when set, is asked for `n` permits before every attempt.
pub async fn with_retries<F, Fut>(
    policy: RetryPolicy,
    telemetry: &DeliveryTelemetry,
    limiter: Option<&RateLimiter>,
    n: u32,
    mut attempt: F,
) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Attempt>,
{
    let mut backoff = policy.base_backoff;
    let mut last = String::new();
    for i in 1..=policy.max_attempts {
        if let Some(l) = limiter {
            l.acquire(n).await;
        }
        telemetry.attempt(u64::from(n));
        match attempt().await {
            Attempt::Delivered => return Ok(()),
            Attempt::Fatal(reason) => return Err(reason),
            Attempt::Retry { reason, after } => {
                tracing::debug!(attempt = i, %reason, "delivery attempt failed");
                last = reason;
                if i < policy.max_attempts {
                    telemetry.retried(u64::from(n));
                    let wait = match after {
                        Some(a) => a.min(MAX_RETRY_AFTER).max(backoff),
                        None => backoff,
                    };
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
    Err(format!(
        "gave up after {} attempts: {last}",
        policy.max_attempts
    ))
}

/// At most `per_second` permits a second, shared by every task of a
/// destination: each acquirer reserves the next free slots and sleeps until
/// they come, so a burst is spread out instead of refused.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        RateLimiter {
            interval: Duration::from_secs(1) / per_second.max(1),
            next: Mutex::new(None),
        }
    }

    /// Wait until `n` permits are ours.
    pub async fn acquire(&self, n: u32) {
        let start = {
            let Ok(mut next) = self.next.lock() else {
                // A poisoned limiter limits nothing rather than stall.
                return;
            };
            let now = Instant::now();
            let start = next.map_or(now, |t| t.max(now));
            *next = Some(start + self.interval * n);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-29T10:00:00Z")
            .map(|t| t.with_timezone(&chrono::Utc))
            .unwrap_or_default();
        assert_eq!(retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            retry_after("Sun, 29 Nov 2026 10:00:05 GMT", now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            retry_after("Sun, 29 Nov 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_spreads_permits_over_time() {
        let limiter = RateLimiter::new(10);
        let start = Instant::now();
        for _ in 0..30 {
            limiter.acquire(1).await;
        }
        // 30 permits at 10/s: the last one is granted at 2.9 s, not before.
        assert_eq!(start.elapsed(), Duration::from_millis(2900));
        // A batch takes its permits at once and pushes the next one out.
        let before = Instant::now();
        limiter.acquire(20).await;
        limiter.acquire(1).await;
        assert_eq!(before.elapsed(), Duration::from_millis(2100));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_wait_for_retry_after_and_back_off() {
        let telemetry = DeliveryTelemetry::new("http-retry-test");
        let policy = RetryPolicy {
            max_attempts: 3,
            base_backoff: Duration::from_millis(100),
        };
        let start = Instant::now();
        let mut calls = 0;
        let result = with_retries(policy, &telemetry, None, 1, || {
            calls += 1;
            let answer = match calls {
                1 => Attempt::Retry {
                    reason: "HTTP 429".into(),
                    after: Some(Duration::from_secs(7)),
                },
                2 => Attempt::Retry {
                    reason: "HTTP 503".into(),
                    after: None,
                },
                _ => Attempt::Delivered,
            };
            async move { answer }
        })
        .await;
        assert_eq!(result, Ok(()));
        // 7 s as asked, then the doubled backoff (200 ms).
        assert_eq!(start.elapsed(), Duration::from_millis(7200));
        let gave_up = with_retries(policy, &telemetry, None, 1, || async {
            Attempt::Retry {
                reason: "HTTP 502".into(),
                after: None,
            }
        })
        .await;
        assert_eq!(gave_up, Err("gave up after 3 attempts: HTTP 502".into()));
        let fatal = with_retries(policy, &telemetry, None, 1, || async {
            Attempt::Fatal("HTTP 400".into())
        })
        .await;
        assert_eq!(fatal, Err("HTTP 400".into()));
    }
}
