//! `cdp destinations sync`: send a destination every current member of
//! its audiences, as an `entered` change each, the way Segment Engage
//! syncs an audience's members to a destination connected after the
//! audience was built. The deliver stage only forwards changes made after
//! a destination was added; run this once after adding one (or to bring a
//! destination that lost its data up to date).
//!
//! The members come from the audiences stage's changelog (see
//! [`crate::profiles::memberships`]). Each change goes through the same
//! sink the deliver stage uses (retries, signing, `max_per_second`), with
//! the delivery id `sync/<destination>/<audience>/<profile>`: the same in
//! every run, so a receiver that dedupes on it takes a re-run as a no-op.
//! A change of the same membership the deliver stage sends meanwhile has
//! its own id; an `entered` twice is what an at-least-once receiver
//! already handles.

use std::collections::BTreeMap;

use anyhow::Context as _;
use cdp_connectors::deliver::round_limit;
use cdp_connectors::destinations::{build_sink, DestinationConfig};
use cdp_pipeline::{ClientFactory, SinkRecord};
use serde::Serialize;

use crate::config::Compiled;

/// What to sync.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// The destination's `id`.
    pub destination: String,
    /// Only this audience (one the destination takes).
    pub audience: Option<String>,
    /// Count the members, send nothing.
    pub dry_run: bool,
}

/// The outcome, printed as a JSON line.
#[derive(Debug, Default, Serialize)]
pub struct SyncReport {
    pub destination: String,
    /// Members found, per audience.
    pub members: BTreeMap<String, u64>,
    pub delivered: u64,
    pub failed: u64,
    /// The first few failures' reasons, with the profile and audience.
    pub failures: Vec<String>,
}

/// Failures listed in the report; the rest are counted.
const LISTED_FAILURES: usize = 10;

fn destination<'a>(compiled: &'a Compiled, id: &str) -> anyhow::Result<&'a DestinationConfig> {
    let dests = &compiled.config.destinations;
    dests.iter().find(|d| d.id == id).ok_or_else(|| {
        let ids: Vec<&str> = dests.iter().map(|d| d.id.as_str()).collect();
        anyhow::anyhow!(
            "no destination {id:?} in the config (destinations: {})",
            if ids.is_empty() {
                "none".to_string()
            } else {
                ids.join(", ")
            }
        )
    })
}

/// The audiences `dest` takes, narrowed to `only`: an error names an
/// audience the config lacks or the destination does not take.
fn wanted_audiences(
    compiled: &Compiled,
    dest: &DestinationConfig,
    only: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let configured: Vec<String> = compiled.audiences.order().map(str::to_string).collect();
    let takes = |a: &str| dest.audiences.is_empty() || dest.audiences.iter().any(|d| d == a);
    match only {
        Some(a) if !configured.iter().any(|c| c == a) => {
            anyhow::bail!("no audience {a:?} in the config")
        }
        Some(a) if !takes(a) => anyhow::bail!(
            "destination {:?} does not take audience {a:?} (its audiences: {})",
            dest.id,
            dest.audiences.join(", ")
        ),
        Some(a) => Ok(vec![a.to_string()]),
        None => Ok(configured.into_iter().filter(|a| takes(a)).collect()),
    }
}

/// Send `opts.destination` an `entered` for every current member of the
/// audiences it takes.
pub async fn run(
    compiled: &Compiled,
    factory: &ClientFactory,
    opts: &SyncOptions,
) -> anyhow::Result<SyncReport> {
    let dest = destination(compiled, &opts.destination)?;
    let audiences = wanted_audiences(compiled, dest, opts.audience.as_deref())?;
    let changes = {
        let (factory, set) = (factory.clone(), compiled.audiences.clone());
        tokio::task::spawn_blocking(move || {
            crate::profiles::memberships(&factory, &set, None, |a| audiences.iter().any(|w| w == a))
        })
        .await
        .context("reading the audiences changelog")??
    };
    let mut report = SyncReport {
        destination: dest.id.clone(),
        ..SyncReport::default()
    };
    for c in &changes {
        *report.members.entry(c.audience.clone()).or_default() += 1;
    }
    if opts.dry_run || changes.is_empty() {
        return Ok(report);
    }
    let sink = build_sink(dest, factory)?;
    for round in changes.chunks(round_limit(std::slice::from_ref(dest))) {
        let mut records = Vec::with_capacity(round.len());
        for c in round {
            records.push(SinkRecord {
                delivery_id: format!("sync/{}/{}/{}", dest.id, c.audience, c.profile_id),
                key: Some(c.profile_id.as_bytes().to_vec()),
                value: serde_json::to_vec(c)?,
            });
        }
        for (c, result) in round.iter().zip(sink.deliver(records).await) {
            match result {
                Ok(()) => report.delivered += 1,
                Err(reason) => {
                    report.failed += 1;
                    if report.failures.len() < LISTED_FAILURES {
                        report
                            .failures
                            .push(format!("{} in {}: {reason}", c.profile_id, c.audience));
                    }
                }
            }
        }
    }
    Ok(report)
}
