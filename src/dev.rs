//! `cdp dev`: every stage in one process on an embedded broker.
//!
//! The broker is librdkafka's mock cluster: real Kafka protocol on a real
//! TCP port (any Kafka client can join), in memory, gone when the process
//! exits. Audience changes go to stdout as JSON lines; logs go to stderr.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use cdp_connectors::destinations::{DestinationConfig, DestinationKind};
use cdp_pipeline::{ClientFactory, Health, Shutdown};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::config::{Compiled, Config};
use crate::stages::{self, Stage};

pub struct DevOptions {
    pub config: Option<PathBuf>,
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub state_dir: Option<PathBuf>,
    /// Add a stdout destination for every audience.
    pub stdout: bool,
    /// Use this broker (its topics already made) instead of an embedded
    /// one: tests that restart the chain on the same broker.
    pub brokers: Option<String>,
}

/// A running `cdp dev`.
pub struct Dev {
    pub bootstrap: String,
    pub collector: SocketAddr,
    pub factory: ClientFactory,
    pub shutdown: Shutdown,
    pub health: Health,
    joins: Vec<std::thread::JoinHandle<Result<(), cdp_pipeline::runtime::RuntimeError>>>,
    servers: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    _state: Option<tempfile::TempDir>,
    /// Held while this run uses its `--state-dir`.
    _lock: Option<std::fs::File>,
    // Dropped last: the stages talk to it until they stop.
    _broker: Option<MockCluster<'static, DefaultProducerContext>>,
}

/// Create on the embedded broker every topic `cdp topics create` makes for
/// `factory`'s config (the mock cluster takes no CreateTopics request).
fn create_topics(
    broker: &MockCluster<'static, DefaultProducerContext>,
    specs: Vec<cdp_pipeline::kafka::TopicSpec>,
) -> anyhow::Result<()> {
    for spec in specs {
        broker
            .create_topic(&spec.name, spec.partitions, 1)
            .with_context(|| format!("creating topic {}", spec.name))?;
    }
    Ok(())
}

/// `cdp mock-broker`: the embedded broker alone, with every topic of each
/// prefix made as `cdp topics create` would at `partitions`. For
/// benchmarks (`scripts/bench.py --broker mock`) and for running stages as
/// separate processes on a laptop; it keeps nothing across restarts and
/// never compacts, so it is no broker for production.
pub struct MockBroker {
    pub bootstrap: String,
    _cluster: MockCluster<'static, DefaultProducerContext>,
}

impl MockBroker {
    pub fn start(prefixes: &[String], partitions: i32) -> anyhow::Result<MockBroker> {
        let cluster = MockCluster::new(1).context("starting the mock broker")?;
        let bootstrap = cluster.bootstrap_servers();
        for prefix in prefixes {
            let factory = ClientFactory::new(cdp_pipeline::KafkaConfig {
                brokers: bootstrap.clone(),
                topic_prefix: prefix.clone(),
                partitions,
                ..Default::default()
            })?;
            create_topics(
                &cluster,
                factory.topic_specs(&Stage::changelogs(factory.config().partitions)),
            )?;
        }
        Ok(MockBroker {
            bootstrap,
            _cluster: cluster,
        })
    }
}

/// The embedded broker starts empty, so the stages' state from an earlier
/// `cdp dev` in `dir` matches no changelog: each task would discard it
/// with an error. Say so once and remove it (only the stages' own
/// directories) so the run starts clean.
fn discard_earlier_state(dir: &std::path::Path, embedded: bool) -> anyhow::Result<()> {
    if !embedded {
        return Ok(());
    }
    let earlier: Vec<PathBuf> = Stage::ALL
        .iter()
        .map(|s| dir.join(s.name()))
        .filter(|p| p.exists())
        .collect();
    if earlier.is_empty() {
        return Ok(());
    }
    crate::notice::say(&format!(
        "cdp dev: the embedded broker starts empty, so the state an earlier run left in {} \
         belongs to no broker any more: starting over (profiles, traits and memberships \
         begin again; keep state across restarts by running the stages against a real broker)",
        dir.display()
    ));
    for path in earlier {
        std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Take `dir` for this run: a second `cdp dev` on the same directory
/// would otherwise discard (or share) the state of the one running.
fn lock_state_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(".cdp-dev.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "{} is in use by another cdp dev: stop it first or pass another --state-dir",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::Error::new(e).context(format!("locking {}", path.display())))
        }
    }
}

/// Make a config ready for the embedded broker.
pub fn dev_config(mut config: Config, bootstrap: &str, state_dir: &str, stdout: bool) -> Config {
    config.kafka.brokers = bootstrap.to_string();
    config.kafka.state_dir = state_dir.to_string();
    config.kafka.replication_factor = 1;
    // The mock cluster assigns partitions as fast as the clients' timeouts
    // allow; short ones make a laptop start in seconds.
    for (k, v) in [
        ("consumer.session.timeout.ms", "6000"),
        ("consumer.heartbeat.interval.ms", "500"),
    ] {
        config
            .kafka
            .properties
            .entry(k.into())
            .or_insert_with(|| v.into());
    }
    if stdout
        && !config
            .destinations
            .iter()
            .any(|d| d.kind == DestinationKind::Stdout)
    {
        config
            .destinations
            .push(DestinationConfig::new("stdout", DestinationKind::Stdout));
    }
    config
}

impl Dev {
    pub async fn start(opts: DevOptions) -> anyhow::Result<Dev> {
        let config = match &opts.config {
            Some(path) => Config::load(path)?,
            None => Config::from_yaml(crate::config::DEMO_CONFIG)?,
        };
        let broker = match &opts.brokers {
            Some(_) => None,
            None => Some(MockCluster::new(1).context("starting the embedded broker")?),
        };
        let bootstrap = match (&broker, &opts.brokers) {
            (Some(b), _) => b.bootstrap_servers(),
            (None, Some(external)) => external.clone(),
            (None, None) => anyhow::bail!("no broker"),
        };
        // Bound before anything starts: a taken port fails the run at once.
        let admin = match opts.admin {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding --admin-listen {addr}"))?,
            ),
            None => None,
        };
        let mut lock = None;
        let (state, state_dir) = match &opts.state_dir {
            Some(d) => {
                lock = Some(lock_state_dir(d)?);
                discard_earlier_state(d, broker.is_some())?;
                (None, d.display().to_string())
            }
            None => {
                let t = tempfile::tempdir()?;
                let p = t.path().display().to_string();
                (Some(t), p)
            }
        };
        let config = dev_config(config, &bootstrap, &state_dir, opts.stdout);
        let compiled: Compiled = config.compile()?;
        let factory = ClientFactory::new(compiled.config.kafka.clone())?;
        if let Some(broker) = &broker {
            create_topics(broker, crate::topics::specs(&compiled, &factory))?;
        }
        let shutdown = Shutdown::default();
        let health = Health::default();
        // Bound before the stages start: a taken port fails the run at once.
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("binding the collector to {}", opts.listen))?;
        let collector_addr = listener.local_addr()?;
        let joins =
            stages::start_stages(&Stage::ALL, &compiled, &factory, None, &health, &shutdown)?;
        let collector = stages::collector(&compiled, &factory)?;
        let mut servers = vec![tokio::spawn(collector.serve_on(
            listener,
            shutdown.clone(),
            health.register("collect"),
        ))];
        if let Some(admin) = admin {
            servers.push(tokio::spawn(cdp_pipeline::service::serve_admin_on(
                admin,
                health.clone(),
                shutdown.clone(),
            )));
        }
        Ok(Dev {
            bootstrap,
            collector: collector_addr,
            factory,
            shutdown,
            health,
            joins,
            servers,
            _state: state,
            _lock: lock,
            _broker: broker,
        })
    }

    /// The built-in demo config on a fresh embedded broker, collector on a
    /// free loopback port, nothing on stdout: what the tests run.
    pub async fn start_for_tests() -> anyhow::Result<Dev> {
        let dev = Dev::start(DevOptions {
            config: None,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: None,
            state_dir: None,
            stdout: false,
            brokers: None,
        })
        .await?;
        dev.wait_ready(std::time::Duration::from_secs(60)).await?;
        Ok(dev)
    }

    /// Wait until every stage has its partitions and the collector listens.
    pub async fn wait_ready(&self, timeout: std::time::Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let waiting = self.health.not_ready();
            if waiting.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "not ready after {timeout:?}: waiting for {}",
                    waiting.join(", ")
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Stop everything: finish batches, commit, leave the groups.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        let result = stages::join_stages(self.joins).await;
        for s in self.servers {
            let _ = s.await;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use rdkafka::consumer::Consumer;

    use super::*;

    #[test]
    fn a_state_dir_serves_one_cdp_dev_at_a_time() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let first = lock_state_dir(dir.path())?;
        let second = lock_state_dir(dir.path()).err().map(|e| e.to_string());
        assert!(
            second
                .as_deref()
                .is_some_and(|e| e.contains("in use by another cdp dev")),
            "{second:?}"
        );
        drop(first);
        lock_state_dir(dir.path())?;
        Ok(())
    }

    /// A second `cdp dev` on one `--state-dir` starts clean: the stages'
    /// directories go (they match no changelog of a new embedded broker),
    /// anything else stays; with an external broker nothing is touched.
    #[test]
    fn an_earlier_runs_state_is_removed_only_for_the_embedded_broker() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let task = dir.path().join("traits").join("0");
        std::fs::create_dir_all(&task)?;
        std::fs::write(task.join("CURRENT"), "x")?;
        std::fs::write(dir.path().join("notes.txt"), "mine")?;
        discard_earlier_state(dir.path(), false)?;
        assert!(task.join("CURRENT").exists(), "an external broker keeps it");
        discard_earlier_state(dir.path(), true)?;
        assert!(!dir.path().join("traits").exists());
        assert!(dir.path().join("notes.txt").exists(), "not ours");
        Ok(())
    }

    /// Every topic of every prefix, with the partitions `cdp topics
    /// create` gives it, as another client sees them.
    #[test]
    fn the_mock_broker_serves_every_topic_of_each_prefix() -> anyhow::Result<()> {
        let prefixes = ["pt".to_string(), "bench".to_string()];
        let broker = MockBroker::start(&prefixes, 3)?;
        let factory = ClientFactory::new(cdp_pipeline::KafkaConfig {
            brokers: broker.bootstrap.clone(),
            ..Default::default()
        })?;
        let consumer = factory.plain_consumer("mock-broker-test")?;
        let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
        let found: BTreeMap<&str, usize> = metadata
            .topics()
            .iter()
            .map(|t| (t.name(), t.partitions().len()))
            .collect();
        for prefix in &prefixes {
            let expected = ClientFactory::new(cdp_pipeline::KafkaConfig {
                topic_prefix: prefix.clone(),
                partitions: 3,
                ..Default::default()
            })?
            .topic_specs(&Stage::changelogs(3));
            assert!(expected.len() > 7, "data topics and changelogs");
            for spec in expected {
                assert_eq!(
                    found.get(spec.name.as_str()).copied(),
                    Some(spec.partitions as usize),
                    "{}",
                    spec.name
                );
            }
        }
        assert_eq!(found.get("pt.valid"), Some(&1), "the serial topic");
        assert_eq!(found.get("bench.raw"), Some(&3));
        Ok(())
    }
}
