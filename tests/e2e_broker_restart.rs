//! End-to-end: the broker is killed with SIGKILL mid-stream and started
//! again on the same data (tansu with its SQLite engine); the collector and
//! every stage go on by themselves, nothing acknowledged is lost and
//! nothing is doubled.
//!
//! Starts its own tansu from `CDP_TANSU_BIN` (scripts/test.sh exports it);
//! without it the test skips locally and fails in CI (`CI` set).

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cdp_pipeline::{ClientFactory, KafkaConfig};
use common::{by_profile, entered, free_port, unique, wait_ready, ChangeReader, TestResult};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const PARTITIONS: i32 = 2;

fn tansu_bin() -> Option<PathBuf> {
    match std::env::var("CDP_TANSU_BIN") {
        Ok(b) if !b.is_empty() => Some(PathBuf::from(b)),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CDP_TANSU_BIN is not set: CI must provide tansu for the broker restart test"
            );
            eprintln!("skipping: set CDP_TANSU_BIN=/path/to/tansu to run the broker restart test");
            None
        }
    }
}

/// A tansu broker on a fixed port whose data lives in one SQLite file.
struct Broker {
    bin: PathBuf,
    port: u16,
    db: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Broker {
    fn start(bin: PathBuf, dir: &Path) -> Result<Self, BoxError> {
        let mut broker = Broker {
            bin,
            port: free_port()?,
            db: dir.join("tansu.db"),
            log: dir.join("tansu.log"),
            child: None,
        };
        broker.run()?;
        Ok(broker)
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn run(&mut self) -> Result<(), BoxError> {
        let url = format!("tcp://{}", self.address());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .arg("--storage-engine")
            // tansu opens a sqlite URL's path relative to its working
            // directory (an absolute one too): run it in the file's folder.
            .arg(format!(
                "sqlite://{}",
                self.db
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ))
            .current_dir(self.db.parent().unwrap_or(Path::new(".")))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if TcpStream::connect(self.address()).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("tansu did not listen on {}", self.address()).into())
    }

    /// SIGKILL: nothing is flushed or closed cleanly.
    fn kill9(&mut self) -> Result<(), BoxError> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// Every stage of the chain as its own `cdp` process.
struct Chain {
    dir: PathBuf,
    config: PathBuf,
    collector: SocketAddr,
    procs: BTreeMap<&'static str, Child>,
}

impl Chain {
    fn start(dir: &Path, brokers: &str, prefix: &str) -> Result<Self, BoxError> {
        let collector: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let config = common::chain_config(brokers, prefix, PARTITIONS, collector);
        let path = dir.join("cdp.yaml");
        std::fs::write(&path, config)?;
        let status = Command::new(env!("CARGO_BIN_EXE_cdp"))
            .args(["topics", "create", "--config"])
            .arg(&path)
            .status()?;
        assert!(status.success(), "cdp topics create failed");
        let mut chain = Chain {
            dir: dir.to_path_buf(),
            config: path,
            collector,
            procs: BTreeMap::new(),
        };
        for stage in [
            "collect",
            "validate",
            "identity",
            "traits",
            "audiences",
            "deliver",
        ] {
            let admin = chain.spawn(stage)?;
            wait_ready(&admin, Duration::from_secs(60))?;
        }
        Ok(chain)
    }

    fn spawn(&mut self, stage: &'static str) -> Result<String, BoxError> {
        let admin = format!("127.0.0.1:{}", free_port()?);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdp"));
        cmd.arg(stage)
            .arg("--config")
            .arg(&self.config)
            .args(["--admin-listen", &admin]);
        if stage != "collect" {
            cmd.arg("--state-dir")
                .arg(self.dir.join("state").join(stage));
        }
        let open = |ext: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(format!("{stage}.{ext}")))
        };
        let child = cmd
            .env("CDP_LOG", "info,librdkafka=warn")
            .stdout(Stdio::from(open("out")?))
            .stderr(Stdio::from(open("log")?))
            .spawn()?;
        self.procs.insert(stage, child);
        Ok(admin)
    }

    /// Stages that exited (they must not: the broker restart is theirs to
    /// ride out).
    fn exited(&mut self) -> Vec<String> {
        self.procs
            .iter_mut()
            .filter_map(|(name, child)| match child.try_wait() {
                Ok(Some(status)) => Some(format!("{name} ({status})")),
                _ => None,
            })
            .collect()
    }

    fn delivered(&self) -> Vec<common::Change> {
        std::fs::read_to_string(self.dir.join("deliver.out"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<cdp_operators::messages::AudienceChange>(l).ok())
            .map(common::Change::from)
            .collect()
    }

    fn logs(&self) -> String {
        common::log_tails(&self.dir, self.procs.keys().copied().chain(["tansu"]), 12)
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        for child in self.procs.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Send a visitor's journey, retrying each call (as an SDK does on a 503)
/// until it is acknowledged; how many 503s it got.
fn send(collector: SocketAddr, visitor: &str, start_ms: i64) -> Result<usize, BoxError> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut refused = 0;
    for (route, body) in cdp::demo::visitor_journey(visitor, Some(start_ms)) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = client
                .post(format!("http://{collector}/v1/{route}"))
                .basic_auth(cdp::demo::DEMO_WRITE_KEY, Some(""))
                .json(&body)
                .send();
            match r {
                Ok(r) if r.status().is_success() => break,
                Ok(r) if r.status().as_u16() == 503 && Instant::now() < deadline => {
                    assert!(
                        r.headers().get("retry-after").is_some(),
                        "503 without Retry-After"
                    );
                    refused += 1;
                    std::thread::sleep(Duration::from_millis(250));
                }
                other if Instant::now() < deadline => {
                    eprintln!("retrying {route} for {visitor}: {other:?}");
                    std::thread::sleep(Duration::from_millis(250));
                }
                other => return Err(format!("collector failed: {other:?}").into()),
            }
        }
    }
    Ok(refused)
}

#[test]
fn the_chain_rides_out_a_broker_killed_mid_stream_and_restarted_on_its_data() -> TestResult {
    let Some(bin) = tansu_bin() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start(bin, dir.path())?;
    let brokers = broker.address();
    let prefix = unique("restart");
    let mut chain = Chain::start(dir.path(), &brokers, &prefix)?;
    let start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
        - 60_000;
    let visitors: Vec<String> = (0..9).map(|i| format!("r{i}")).collect();

    // Three visitors before, three sent while the broker is killed and
    // restarted (their calls get 503 until it is back), three after.
    for v in &visitors[..3] {
        send(chain.collector, v, start)?;
    }
    let collector = chain.collector;
    let during: Vec<String> = visitors[3..6].to_vec();
    let sender = std::thread::spawn(move || -> Result<usize, BoxError> {
        let mut refused = 0;
        for v in &during {
            refused += send(collector, v, start)?;
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(refused)
    });
    std::thread::sleep(Duration::from_millis(300));
    broker.kill9()?;
    std::thread::sleep(Duration::from_secs(5));
    broker.run()?;
    let refused = sender.join().map_err(|_| "sender panicked")??;
    for v in &visitors[6..] {
        send(chain.collector, v, start)?;
    }

    let factory = ClientFactory::new(KafkaConfig {
        brokers,
        topic_prefix: prefix.clone(),
        partitions: PARTITIONS,
        ..KafkaConfig::default()
    })?;
    let mut reader = ChangeReader::new(&factory, &format!("{prefix}.audiences"), PARTITIONS)?;
    let all = |c: &[common::Change]| {
        visitors
            .iter()
            .all(|v| entered(c, v, "big_spenders") && entered(c, v, "browsed_then_bought"))
    };
    let ok = reader.read_until(Duration::from_secs(180), all);
    assert!(
        ok,
        "audience changes missing after the broker restart: {:?}\n{}",
        reader.changes,
        chain.logs()
    );
    reader.settle(Duration::from_secs(3));
    assert_eq!(
        reader.changes.len(),
        2 * visitors.len(),
        "every visitor enters both audiences exactly once: {:?}",
        reader.changes
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while chain.delivered().len() < reader.changes.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(by_profile(&chain.delivered()), by_profile(&reader.changes));
    let exited = chain.exited();
    assert!(
        exited.is_empty(),
        "stages exited instead of riding out the restart: {exited:?}\n{}",
        chain.logs()
    );
    eprintln!(
        "broker restart: {} changes, {} calls answered 503 while the broker was away, {} replays dropped",
        reader.changes.len(),
        refused,
        reader.duplicates
    );
    Ok(())
}
