//! Sample traffic: the scenario every new user should see work.
//!
//! An anonymous visitor views products, identifies with a user id and an
//! email, then completes two orders worth more than 500 in total; with the
//! demo config the profile enters `big_spenders` and `browsed_then_bought`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

/// The demo config's write key.
pub const DEMO_WRITE_KEY: &str = "wk_web_123";

/// `(route, body)` pairs of one visitor's journey. Every call carries the
/// anonymous id, as browser and mobile SDKs send it. Message ids are
/// deterministic; with `start_ms` the events also carry explicit
/// timestamps one second apart, so two runs produce identical events.
pub fn visitor_journey(visitor: &str, start_ms: Option<i64>) -> Vec<(&'static str, Value)> {
    let anon = format!("anon-{visitor}");
    let user = format!("user-{visitor}");
    let mut steps = vec![
        (
            "track",
            json!({"anonymousId": anon, "event": "Product Viewed",
                   "properties": {"sku": "sku-1", "category": "shoes"}}),
        ),
        (
            "identify",
            json!({"anonymousId": anon, "userId": user,
                   "traits": {"email": format!("{visitor}@example.com"), "plan": "pro"}}),
        ),
        (
            "track",
            json!({"userId": user, "anonymousId": anon, "event": "Order Completed",
                   "properties": {"revenue": 150}}),
        ),
        (
            "track",
            json!({"userId": user, "anonymousId": anon, "event": "Order Completed",
                   "properties": {"revenue": 400}}),
        ),
    ];
    stamp(&mut steps, &format!("{visitor}-"), start_ms);
    steps
}

/// Deterministic message ids `<prefix><i>` and, with `start_ms`, event
/// times one second apart.
fn stamp(steps: &mut [(&'static str, Value)], prefix: &str, start_ms: Option<i64>) {
    for (i, (_, body)) in steps.iter_mut().enumerate() {
        body["messageId"] = json!(format!("{prefix}{i}"));
        if let Some(start) = start_ms {
            body["timestamp"] = json!(cdp_operators::messages::rfc3339_ms(start + 1000 * i as i64));
        }
    }
}

/// A person on two sources: anonymous browsing in the browser, two orders
/// from a server that knows only the `userId`, then the login that joins
/// them. Under different Kafka keys, so the steps land on different
/// partitions of `<p>.raw`. Only the joined profile qualifies for
/// `browsed_then_bought` (browsed as `anon-*`, bought as `user-*`).
pub fn cross_device_journey(visitor: &str, start_ms: i64) -> Vec<(&'static str, Value)> {
    let anon = format!("anon-{visitor}");
    let user = format!("user-{visitor}");
    let mut steps = vec![
        (
            "track",
            json!({"anonymousId": anon, "event": "Product Viewed",
                   "properties": {"sku": "sku-1", "category": "shoes"}}),
        ),
        ("page", json!({"anonymousId": anon, "name": "Checkout"})),
        (
            "track",
            json!({"userId": user, "event": "Order Completed", "properties": {"revenue": 150}}),
        ),
        (
            "track",
            json!({"userId": user, "event": "Order Completed", "properties": {"revenue": 400}}),
        ),
        (
            "identify",
            json!({"anonymousId": anon, "userId": user,
                   "traits": {"email": format!("{visitor}@example.com")}}),
        ),
    ];
    stamp(&mut steps, &format!("{visitor}-x"), Some(start_ms));
    steps
}

/// Send one visitor's journey to a collector, waiting for each 200.
pub async fn send_journey(
    client: &reqwest::Client,
    collector: SocketAddr,
    visitor: &str,
    start_ms: Option<i64>,
) -> anyhow::Result<()> {
    for (route, body) in visitor_journey(visitor, start_ms) {
        let resp = client
            .post(format!("http://{collector}/v1/{route}"))
            .basic_auth(DEMO_WRITE_KEY, Some(""))
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        if !status.is_success() {
            anyhow::bail!(
                "collector answered {status} for {route}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Feed a new visitor every few seconds until shutdown.
pub async fn run(collector: SocketAddr, shutdown: cdp_pipeline::Shutdown) {
    let client = reqwest::Client::new();
    let mut n = 0u64;
    while !shutdown.is_triggered() {
        n += 1;
        let visitor = format!("demo{n}");
        match send_journey(&client, collector, &visitor, None).await {
            Ok(()) => tracing::info!(%visitor, "demo traffic sent"),
            Err(e) => tracing::warn!(error = %e, "demo traffic failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.wait() => {}
        }
    }
}
