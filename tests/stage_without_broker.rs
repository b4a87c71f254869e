//! A stage process started while its broker does not answer: not ready,
//! still waiting after the first metadata timeout, and stopped cleanly by
//! SIGTERM (identity exited after 30 s with an error, ready all along).

use std::io::Read as _;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/demo-config.yaml");

/// The status code `GET path` gets from `addr`, if it answers.
fn status(addr: &str, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    std::io::Write::write_all(
        &mut stream,
        format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn identity_waits_for_an_absent_broker_not_ready_and_stops_on_sigterm() -> TestResult {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let admin = format!("127.0.0.1:{port}");
    let state = tempfile::tempdir()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .args(["identity", "--config", DEMO, "--brokers", "127.0.0.1:1"])
        .args(["--admin-listen", &admin, "--state-dir"])
        .arg(state.path())
        .env("CDP_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> TestResult {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut ready = None;
        while Instant::now() < deadline && ready.is_none() {
            ready = status(&admin, "/readyz");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(ready, Some(503), "/readyz while the broker is away");
        // Through several metadata tries (2 s each): still there, waiting.
        std::thread::sleep(Duration::from_secs(12));
        assert!(child.try_wait()?.is_none(), "identity exited");
        assert_eq!(status(&admin, "/readyz"), Some(503));
        assert_eq!(status(&admin, "/healthz"), Some(200));
        Ok(())
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut exit = None;
    while Instant::now() < deadline && exit.is_none() {
        exit = child.try_wait()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    if exit.is_none() {
        let _ = child.kill();
    }
    result?;
    assert!(
        exit.is_some_and(|e| e.success()),
        "exit after SIGTERM: {exit:?}"
    );
    Ok(())
}
