//! The one-shot commands: dead letters, load generation, benchmark hops
//! and stamps, config tools.

use std::path::PathBuf;

use anyhow::Context as _;
use cdp::config::Config;

use crate::cli::{Connection, LoadgenArgs, SelectionArgs};

/// `cdp dead-letters list`.
pub(crate) async fn list_dead_letters(
    common: Connection,
    selection: SelectionArgs,
    json: bool,
) -> anyhow::Result<()> {
    let (_, factory) = common.open()?;
    let selection = selection.selection();
    let text = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let letters = cdp::dead_letters::read(&factory)?;
        let selected: Vec<_> = selection.select(&letters)?.into_iter().cloned().collect();
        let replayed = cdp::dead_letters::replayed(&factory)?;
        Ok(match json {
            true => cdp::dead_letters::render_json(&selected, &replayed),
            false => cdp::dead_letters::render_list(&selected, &replayed),
        })
    })
    .await??;
    print!("{text}");
    Ok(())
}

/// `cdp dead-letters replay`.
pub(crate) async fn replay_dead_letters(
    common: Connection,
    selection: SelectionArgs,
    dry_run: bool,
) -> anyhow::Result<()> {
    let selection = selection.selection();
    if selection.stage.is_none() && selection.ids.is_empty() {
        anyhow::bail!("name the dead letters to replay: --stage and/or --id");
    }
    let (_, factory) = common.open()?;
    let report = cdp::dead_letters::replay(&factory, &selection, dry_run).await?;
    let verb = if dry_run { "would replay" } else { "replayed" };
    println!("{}", counted(verb, &report.replayed));
    println!("{}", counted("already replayed", &report.already_replayed));
    if !report.without_bytes.is_empty() {
        println!(
            "{}",
            counted(
                "not replayed, too large to keep in the dead letter",
                &report.without_bytes
            )
        );
    }
    Ok(())
}

/// `label N: id id …`, or `label 0` when there are none.
fn counted(label: &str, ids: &[String]) -> String {
    match ids {
        [] => format!("{label} 0"),
        ids => format!("{label} {}: {}", ids.len(), ids.join(" ")),
    }
}

pub(crate) async fn loadgen(args: LoadgenArgs) -> anyhow::Result<()> {
    use cdp::loadgen::{self, workload::WorkloadSpec, LoadgenOptions, Target};
    let (compiled, factory) = args.common.open()?;
    let sources = &compiled.config.sources;
    let source = match &args.source {
        Some(id) => sources.iter().find(|s| &s.id == id),
        None => sources.first(),
    }
    .context("no such source in the config (sources[].id)")?;
    let target = if args.to == "raw" {
        Target::Raw {
            factory,
            source: source.id.clone(),
        }
    } else if args.to.starts_with("http://") || args.to.starts_with("https://") {
        Target::Http {
            url: args.to.clone(),
            write_key: source.write_key.clone(),
        }
    } else {
        anyhow::bail!(
            "--to: expected `raw` or a collector URL (http://host:port), got {:?}",
            args.to
        );
    };
    let summary = loadgen::run(LoadgenOptions {
        workload: WorkloadSpec {
            seed: args.seed,
            people: args.people,
            concurrent: args.concurrent,
        },
        events: args.events,
        duration: args.duration.map(|d| d.to_std()),
        rate: (args.rate > 0.0).then_some(args.rate),
        target,
        batch: args.batch,
        concurrency: args.concurrency,
    })
    .await?;
    eprint!("{summary}");
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    if summary.failed > 0 {
        anyhow::bail!("{} events failed", summary.failed);
    }
    Ok(())
}

/// `cdp passthrough`: one bare hop, its report as a JSON line.
pub(crate) async fn passthrough(
    common: Connection,
    opts: cdp::passthrough::HopOptions,
) -> anyhow::Result<()> {
    let (_, factory) = common.open()?;
    let report =
        tokio::task::spawn_blocking(move || cdp::passthrough::run_hop(&factory, &opts)).await??;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// `cdp profiles traits`: one JSON line per profile on stdout.
pub(crate) async fn profile_traits(
    common: Connection,
    profile: Option<String>,
) -> anyhow::Result<()> {
    let (_, factory) = common.open()?;
    let lines = tokio::task::spawn_blocking(move || {
        cdp::profiles::trait_values(&factory, profile.as_deref())
    })
    .await??;
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

/// `cdp profiles audiences`: one JSON line per membership on stdout.
pub(crate) async fn profile_audiences(
    common: Connection,
    profile: Option<String>,
    audience: Option<String>,
) -> anyhow::Result<()> {
    let (compiled, factory) = common.open()?;
    if let Some(a) = &audience {
        if !compiled.audiences.order().any(|c| c == a) {
            anyhow::bail!("no audience {a:?} in the config");
        }
    }
    let changes = tokio::task::spawn_blocking(move || {
        cdp::profiles::memberships(&factory, &compiled.audiences, profile.as_deref(), |a| {
            audience.as_deref().is_none_or(|only| only == a)
        })
    })
    .await??;
    for change in changes {
        println!("{}", serde_json::to_string(&change)?);
    }
    Ok(())
}

/// `cdp destinations sync`: its report as a JSON line.
pub(crate) async fn sync_destination(
    common: Connection,
    opts: cdp::sync::SyncOptions,
) -> anyhow::Result<()> {
    let (compiled, factory) = common.open()?;
    let report = cdp::sync::run(&compiled, &factory, &opts).await?;
    println!("{}", serde_json::to_string(&report)?);
    if report.failed > 0 {
        anyhow::bail!(
            "{} of {} changes not delivered to {}",
            report.failed,
            report.failed + report.delivered,
            report.destination
        );
    }
    Ok(())
}

/// `cdp stamps`: one JSON line per event on stdout.
pub(crate) async fn stamps(
    common: Connection,
    opts: cdp::stamps::StampOptions,
) -> anyhow::Result<()> {
    let (_, factory) = common.open()?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        cdp::stamps::run(&factory, &opts, &mut out)?;
        std::io::Write::flush(&mut out)?;
        Ok(())
    })
    .await??;
    Ok(())
}

/// `cdp config check`.
pub(crate) fn check_config(file: Option<PathBuf>, config: Option<PathBuf>) -> anyhow::Result<()> {
    let file = file.or(config).context("name the config file")?;
    let compiled = Config::load(&file)?.compile()?;
    let c = &compiled.config;
    for warning in c.warnings() {
        eprintln!("warning: {warning}");
    }
    println!(
        "{}: ok ({} sources, {} tracking plans, {} traits, {} audiences, {} destinations)",
        file.display(),
        c.sources.len(),
        c.tracking_plans.len(),
        c.traits.len(),
        c.audiences.len(),
        c.destinations.len()
    );
    Ok(())
}
