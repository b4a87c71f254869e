//! `cdp loadgen`: a realistic synthetic workload for benchmarks and
//! sizing (see [`workload`] for its shape), sent to the collector over
//! HTTP in batches or straight to `<p>.raw`, at a target rate or as fast as
//! the receiver takes it. Reproducible by seed (everything but each
//! event's `timestamp`, which is its send time: the benchmark measures
//! latency from it). A progress bar on a terminal; a summary at the end.

pub mod send;
pub mod workload;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use cdp_pipeline::ClientFactory;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use send::{stamp, HttpSender, Pace, RawSender};
use workload::{Workload, WorkloadSpec, WorkloadStats};

/// Where the events go.
#[derive(Debug, Clone)]
pub enum Target {
    /// The collector at this base URL (`http://host:port`), `/v1/batch`.
    Http { url: String, write_key: String },
    /// `<p>.raw` through the config's brokers, with this source id.
    Raw {
        factory: ClientFactory,
        source: String,
    },
}

#[derive(Debug, Clone)]
pub struct LoadgenOptions {
    pub workload: WorkloadSpec,
    /// Stop after this many events (else when every person is done).
    pub events: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Events per second; `None` sends as fast as possible.
    pub rate: Option<f64>,
    pub target: Target,
    /// Events per HTTP batch.
    pub batch: usize,
    /// HTTP batches in flight.
    pub concurrency: usize,
}

/// What a run did; printed at the end (and as JSON with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub target: String,
    pub seed: u64,
    pub sent: u64,
    pub failed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    pub elapsed_secs: f64,
    pub events_per_sec: f64,
    pub workload: WorkloadStats,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = &self.workload;
        writeln!(
            f,
            "loadgen: {} events to {} in {:.1} s ({:.0} events/s), {} failed",
            self.sent, self.target, self.elapsed_secs, self.events_per_sec, self.failed
        )?;
        writeln!(
            f,
            "  people {} (devices {}), expected profiles {}",
            w.people_started, w.devices, w.expected_profiles
        )?;
        writeln!(
            f,
            "  page views {}, product views {}, identifies {} ({} on a second device: merges), orders {} (revenue {:.2})",
            w.page_views, w.product_views, w.identifies, w.second_device_identifies, w.orders, w.revenue
        )?;
        if let Some(e) = &self.first_error {
            writeln!(f, "  first error: {e}")?;
        }
        Ok(())
    }
}

fn progress_bar(events: Option<u64>) -> ProgressBar {
    let bar = match events {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    let template = if events.is_some() {
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} events ({per_sec}, eta {eta})"
    } else {
        "{spinner} [{elapsed_precise}] {pos} events ({per_sec})"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

/// Generate and send until a limit is reached; the summary at the end.
pub async fn run(opts: LoadgenOptions) -> anyhow::Result<Summary> {
    let mut workload = Workload::new(opts.workload.clone());
    let limit = opts.events.unwrap_or(u64::MAX);
    let deadline = opts.duration.map(|d| Instant::now() + d);
    let bar = progress_bar(opts.events.filter(|_| deadline.is_none()));
    let pace = Pace::new(opts.rate);
    let start = Instant::now();
    let mut sent = 0u64;
    let expired = || deadline.is_some_and(|d| Instant::now() >= d);
    let (failed, first_error, target) = match &opts.target {
        Target::Http { url, write_key } => {
            let mut sender = HttpSender::new(url, write_key, opts.concurrency);
            let batch_size = opts.batch.max(1) as u64;
            while sent < limit && !expired() {
                pace.wait_for(sent).await;
                let n = batch_size.min(limit - sent);
                let batch: Vec<_> = workload
                    .by_ref()
                    .take(n as usize)
                    .map(|mut e| {
                        stamp(&mut e);
                        e.body
                    })
                    .collect();
                if batch.is_empty() {
                    break;
                }
                sent += batch.len() as u64;
                bar.inc(batch.len() as u64);
                sender.send(batch).await;
            }
            sender.finish().await;
            (sender.failed, sender.first_error, url.clone())
        }
        Target::Raw { factory, source } => {
            let topic = factory.topics().raw();
            // Ready before the first event: see `producer_ready_for`.
            let producer = tokio::task::spawn_blocking({
                let (factory, topic) = (factory.clone(), topic.clone());
                move || factory.producer_ready_for(&topic)
            })
            .await
            .context("waiting for the broker")?
            .with_context(|| format!("the broker did not describe {topic}"))?;
            let mut sender = RawSender::new(producer, topic.clone(), source.clone());
            // Pace in slices of ~1 ms worth of events, not per event.
            let step = opts
                .rate
                .map_or(1000, |r| ((r / 1000.0).ceil() as u64).max(1));
            while sent < limit && !expired() {
                if sent.is_multiple_of(step) {
                    pace.wait_for(sent).await;
                }
                let Some(mut event) = workload.next() else {
                    break;
                };
                stamp(&mut event);
                sender.send(&event).await?;
                sent += 1;
                if sent.is_multiple_of(256) {
                    bar.inc(256);
                }
            }
            sender.finish().await;
            (sender.failed, sender.first_error, topic)
        }
    };
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Summary {
        target,
        seed: opts.workload.seed,
        sent: sent.saturating_sub(failed),
        failed,
        first_error,
        elapsed_secs: elapsed,
        events_per_sec: sent as f64 / elapsed.max(1e-9),
        workload: workload.stats(),
    })
}

#[cfg(test)]
mod tests;
