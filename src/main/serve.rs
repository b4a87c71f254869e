//! The long-running commands: `cdp dev`, the collector, a stage, the mock
//! broker.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use cdp::config::Config;
use cdp::dev::{Dev, DevOptions};
use cdp::notice::say;
use cdp::stages::{self, Stage};
use cdp_pipeline::{Health, Shutdown};

use crate::cli::{Admin, Common, Connection};

/// `cdp dev`'s flags.
pub(crate) struct DevFlags {
    pub(crate) config: Option<PathBuf>,
    pub(crate) demo: bool,
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) admin_listen: SocketAddr,
    pub(crate) state_dir: Option<PathBuf>,
}

/// `cdp dev`: every stage on an embedded broker until a signal.
pub(crate) async fn dev(flags: DevFlags) -> anyhow::Result<()> {
    // Read once here for the address and the banner; `Dev` compiles it.
    let file = flags.config.as_deref().map(Config::load).transpose()?;
    let listen = dev_listen(flags.listen, file.as_ref());
    let keys = match &file {
        None => "write key wk_web_123 in the demo config".to_string(),
        Some(config) => format!(
            "write keys: {}",
            config
                .sources
                .iter()
                .map(|s| format!("{} ({})", s.write_key, s.id))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let dev = Dev::start(DevOptions {
        config: flags.config,
        listen,
        admin: Some(flags.admin_listen),
        state_dir: flags.state_dir,
        stdout: true,
        brokers: None,
    })
    .await?;
    dev.shutdown.trigger_on_signals();
    say(&format!(
        "cdp dev: embedded Kafka broker at {}",
        dev.bootstrap
    ));
    say(&format!(
        "cdp dev: collector at http://{} ({keys})",
        dev.collector
    ));
    say(&format!(
        "cdp dev: metrics at http://{}/metrics; audience changes print below as JSON lines",
        flags.admin_listen
    ));
    if flags.demo {
        tokio::spawn(cdp::demo::run(dev.collector, dev.shutdown.clone()));
    }
    dev.shutdown.wait().await;
    dev.stop().await
}

/// Where `cdp dev`'s collector listens: `--listen`, else the config's
/// `collector.listen` if it sets one, else loopback (a laptop's collector
/// is not for the network unless asked).
fn dev_listen(flag: Option<SocketAddr>, config: Option<&Config>) -> SocketAddr {
    let default = cdp_connectors::collector::CollectorConfig::default().listen;
    flag.or_else(|| config.map(|c| c.collector.listen).filter(|l| *l != default))
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8088)))
}

/// `cdp collect`.
pub(crate) async fn collect(
    conn: Connection,
    admin: Admin,
    listen: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let (mut compiled, factory) = conn.open()?;
    if let Some(l) = listen {
        compiled.config.collector.listen = l;
    }
    let (shutdown, health) = service(&admin.admin_listen).await?;
    let collector = cdp::stages::collector(&compiled, &factory)?;
    collector
        .serve(shutdown, health.register("collect"))
        .await?;
    Ok(())
}

/// `cdp validate|identity|traits|audiences|deliver`.
pub(crate) async fn stage(stage: Stage, common: Common) -> anyhow::Result<()> {
    let (compiled, factory) = common.open()?;
    let (shutdown, health) = service(&common.admin.admin_listen).await?;
    let joins = stages::start_stages(
        &[stage],
        &compiled,
        &factory,
        common.instance_id(),
        &health,
        &shutdown,
    )?;
    stages::join_stages(joins).await
}

/// `cdp mock-broker`: until a signal.
pub(crate) async fn mock_broker(prefixes: Vec<String>, partitions: i32) -> anyhow::Result<()> {
    let broker = cdp::dev::MockBroker::start(&prefixes, partitions)?;
    println!("{}", broker.bootstrap);
    say(&format!(
        "cdp mock-broker: at {} with the topics of {}",
        broker.bootstrap,
        prefixes.join(", ")
    ));
    let shutdown = Shutdown::default();
    shutdown.trigger_on_signals();
    shutdown.wait().await;
    Ok(())
}

/// Shutdown on signals and the admin endpoint, for a single-stage process.
/// The address is bound first: a taken port fails the command before it
/// joins a consumer group or opens a store.
async fn service(admin: &SocketAddr) -> anyhow::Result<(Shutdown, Health)> {
    let listener = tokio::net::TcpListener::bind(admin)
        .await
        .with_context(|| format!("--admin-listen {admin}"))?;
    let shutdown = Shutdown::default();
    shutdown.trigger_on_signals();
    let health = Health::default();
    let (h, s) = (health.clone(), shutdown.clone());
    tokio::spawn(async move {
        if let Err(e) = cdp_pipeline::service::serve_admin_on(listener, h, s.clone()).await {
            tracing::error!(error = %e, "admin endpoint failed");
            s.trigger();
        }
    });
    Ok((shutdown, health))
}
