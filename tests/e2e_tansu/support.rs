//! What the end-to-end tests share: the broker from the environment, a
//! pipeline of `cdp` processes, traffic, a crash-free reference run and
//! the metrics a process exports.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cdp_pipeline::{ClientFactory, KafkaConfig};

use crate::common::{
    self, by_profile, entered, free_port, unique, wait_ready, ChangeReader, TestResult,
};

pub(crate) const PARTITIONS: i32 = 4;

pub(crate) fn brokers() -> Option<String> {
    match std::env::var("CDP_E2E_BROKERS") {
        Ok(b) if !b.is_empty() => Some(b),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CDP_E2E_BROKERS is not set: CI must start a broker for the end-to-end tests"
            );
            eprintln!("skipping: set CDP_E2E_BROKERS=host:port to run the end-to-end tests");
            None
        }
    }
}

/// A whole pipeline of `cdp` processes sharing one config.
pub(crate) struct Pipeline {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) config: PathBuf,
    pub(crate) prefix: String,
    pub(crate) collector: SocketAddr,
    pub(crate) procs: BTreeMap<String, (Child, Vec<String>)>,
    /// Admin (`/metrics`, `/readyz`) address of each process.
    pub(crate) admins: BTreeMap<String, String>,
    pub(crate) partitions: i32,
    pub(crate) factory: ClientFactory,
}

impl Pipeline {
    pub(crate) fn new(brokers: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Self::with_partitions(brokers, PARTITIONS)
    }

    pub(crate) fn with_partitions(
        brokers: &str,
        partitions: i32,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let dir = tempfile::tempdir()?;
        let prefix = unique("e2e");
        let collector: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let config = common::chain_config(brokers, &prefix, partitions, collector);
        let path = dir.path().join("cdp.yaml");
        std::fs::write(&path, config)?;
        let factory = ClientFactory::new(KafkaConfig {
            brokers: brokers.to_string(),
            topic_prefix: prefix.clone(),
            partitions,
            ..KafkaConfig::default()
        })?;
        let status = Command::new(env!("CARGO_BIN_EXE_cdp"))
            .args(["topics", "create", "--config"])
            .arg(&path)
            .status()?;
        assert!(status.success(), "cdp topics create failed");
        Ok(Pipeline {
            dir,
            config: path,
            prefix,
            collector,
            procs: BTreeMap::new(),
            admins: BTreeMap::new(),
            partitions,
            factory,
        })
    }

    /// Start `cdp <stage>` as process `name` and wait until it is ready.
    pub(crate) fn spawn(
        &mut self,
        name: &str,
        stage: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let admin = self.start(name, stage, &[])?;
        wait_ready(&admin, Duration::from_secs(60))
    }

    /// Start `cdp <stage>` as process `name` with extra environment;
    /// returns its admin address.
    pub(crate) fn start(
        &mut self,
        name: &str,
        stage: &str,
        env: &[(&str, &str)],
    ) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        let admin = format!("127.0.0.1:{}", free_port()?);
        let mut args = vec![
            stage.to_string(),
            "--config".into(),
            self.config.display().to_string(),
        ];
        args.extend(["--admin-listen".into(), admin.clone()]);
        if stage != "collect" {
            let state = self.dir.path().join("state").join(name);
            args.extend(["--state-dir".into(), state.display().to_string()]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))?;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.out")))?;
        let child = Command::new(env!("CARGO_BIN_EXE_cdp"))
            .args(&args)
            .env("CDP_LOG", "info,librdkafka=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(log))
            .spawn()?;
        self.procs.insert(name.to_string(), (child, args));
        self.admins.insert(name.to_string(), admin.clone());
        Ok(admin)
    }

    /// Wait for a process to exit by itself; whether it did in time.
    pub(crate) fn wait_exit(&mut self, name: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some((child, _)) = self.procs.get_mut(name) {
                if let Ok(Some(_)) = child.try_wait() {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub(crate) fn spawn_all(&mut self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        for (name, stage) in [
            ("collect", "collect"),
            ("validate", "validate"),
            ("identity-0", "identity"),
            ("identity-1", "identity"),
            ("traits-0", "traits"),
            ("traits-1", "traits"),
            ("audiences", "audiences"),
            ("deliver", "deliver"),
        ] {
            self.spawn(name, stage)?;
        }
        Ok(())
    }

    /// `kill -9` a process.
    pub(crate) fn kill9(
        &mut self,
        name: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if let Some((child, _)) = self.procs.get_mut(name) {
            child.kill()?; // SIGKILL: no shutdown hook runs
            child.wait()?;
        }
        Ok(())
    }

    /// Start a killed process again with the same arguments and state.
    pub(crate) fn restart(
        &mut self,
        name: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let stage = self
            .procs
            .get(name)
            .map(|(_, a)| a[0].clone())
            .unwrap_or_default();
        self.spawn(name, &stage)
    }

    /// Send a signal (`STOP`, `CONT`) to a process.
    pub(crate) fn signal(
        &self,
        name: &str,
        signal: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let pid = self
            .procs
            .get(name)
            .map(|(c, _)| c.id())
            .ok_or("no such process")?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        assert!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }

    /// Whether a process has exited (by itself).
    pub(crate) fn exited(&mut self, name: &str) -> bool {
        self.procs
            .get_mut(name)
            .is_some_and(|(c, _)| matches!(c.try_wait(), Ok(Some(_))))
    }

    pub(crate) fn reader(&self) -> Result<ChangeReader, Box<dyn std::error::Error + Send + Sync>> {
        ChangeReader::new(
            &self.factory,
            &format!("{}.audiences", self.prefix),
            self.partitions,
        )
    }

    /// What the deliver stage's stdout destination printed.
    pub(crate) fn delivered(&self) -> Vec<common::Change> {
        std::fs::read_to_string(self.dir.path().join("deliver.out"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<cdp_operators::messages::AudienceChange>(l).ok())
            .map(common::Change::from)
            .collect()
    }

    pub(crate) fn logs(&self) -> String {
        common::log_tails(self.dir.path(), self.procs.keys().map(String::as_str), 15)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for (child, _) in self.procs.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn send(
    collector: SocketAddr,
    visitor: &str,
    start_ms: i64,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    send_steps(
        collector,
        visitor,
        cdp::demo::visitor_journey(visitor, Some(start_ms)),
    )
}

pub(crate) fn send_steps(
    collector: SocketAddr,
    visitor: &str,
    steps: Vec<(&'static str, serde_json::Value)>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let client = reqwest::blocking::Client::new();
    for (route, body) in steps {
        let mut tries = 0;
        loop {
            let r = client
                .post(format!("http://{collector}/v1/{route}"))
                .basic_auth(cdp::demo::DEMO_WRITE_KEY, Some(""))
                .json(&body)
                .send();
            match r {
                Ok(r) if r.status().is_success() => break,
                other if tries < 20 => {
                    tries += 1;
                    eprintln!("retrying {route} for {visitor}: {other:?}");
                    std::thread::sleep(Duration::from_millis(250));
                }
                other => return Err(format!("collector failed: {other:?}").into()),
            }
        }
    }
    Ok(())
}

/// Event times a minute ago: inside every window of the demo audiences,
/// identical for every run within one test.
pub(crate) fn recent_start() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
        - 60_000
}

/// Produce `records` (payload, headers) to one partition at once, so they
/// leave in one batch; wait for every acknowledgement.
pub(crate) fn send_together(
    factory: &ClientFactory,
    topic: &str,
    partition: i32,
    records: &[(String, rdkafka::message::OwnedHeaders)],
) -> TestResult {
    use rdkafka::producer::FutureRecord;
    let producer = factory.producer()?;
    let sent: Vec<_> = records
        .iter()
        .map(|(payload, headers)| {
            producer
                .send_result(
                    FutureRecord::to(topic)
                        .partition(partition)
                        .key("k")
                        .payload(payload)
                        .headers(headers.clone()),
                )
                .map_err(|(e, _)| e)
        })
        .collect::<Result<_, _>>()?;
    for delivery in sent {
        futures::executor::block_on(delivery)?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

pub(crate) fn all_entered(visitors: &[String]) -> impl Fn(&[common::Change]) -> bool + '_ {
    move |c| {
        visitors
            .iter()
            .all(|v| entered(c, v, "big_spenders") && entered(c, v, "browsed_then_bought"))
    }
}

/// The audience changes of `visitors` through a whole chain with no fault:
/// the reference the fault tests compare with.
pub(crate) fn clean_run(
    brokers: &str,
    visitors: &[String],
    start: i64,
) -> Result<BTreeMap<String, Vec<common::Change>>, Box<dyn std::error::Error + Send + Sync>> {
    let mut clean = Pipeline::new(brokers)?;
    clean.spawn_all()?;
    for v in visitors {
        send(clean.collector, v, start)?;
    }
    let mut reader = clean.reader()?;
    let ok = reader.read_until(Duration::from_secs(120), all_entered(visitors));
    assert!(
        ok,
        "clean run incomplete: {:?}\n{}",
        reader.changes,
        clean.logs()
    );
    reader.settle(Duration::from_secs(3));
    Ok(by_profile(&reader.changes))
}

/// The value of a gauge line such as `cdp_tasks{stage="identity"} 1` on a
/// process's `/metrics`.
pub(crate) fn gauge(admin: &str, line_prefix: &str) -> Option<f64> {
    let body = reqwest::blocking::get(format!("http://{admin}/metrics"))
        .ok()?
        .text()
        .ok()?;
    body.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
