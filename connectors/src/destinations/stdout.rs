//! The `stdout` destination: one JSON line per change (for `cdp dev`).

use std::io::Write;

use cdp_pipeline::{Sink, SinkRecord};
use futures::future::BoxFuture;
use futures::FutureExt;

use super::telemetry::DeliveryTelemetry;

/// Prints each record's value as one JSON line on stdout. Never fails: a
/// closed stdout is logged, not dead-lettered.
#[derive(Debug, Clone)]
pub struct StdoutSink {
    id: String,
    telemetry: DeliveryTelemetry,
}

impl StdoutSink {
    pub fn new(id: &str) -> Self {
        StdoutSink {
            id: id.to_string(),
            telemetry: DeliveryTelemetry::new(id),
        }
    }

    fn write_all(&self, records: &[SinkRecord]) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        for r in records {
            // Values are compact JSON already; re-encode anything that would
            // break the one-record-per-line framing.
            if r.value.contains(&b'\n') {
                match serde_json::from_slice::<serde_json::Value>(&r.value) {
                    Ok(v) => serde_json::to_writer(&mut out, &v)?,
                    Err(_) => out.write_all(
                        &r.value
                            .iter()
                            .map(|&b| if b == b'\n' { b' ' } else { b })
                            .collect::<Vec<_>>(),
                    )?,
                }
            } else {
                out.write_all(&r.value)?;
            }
            out.write_all(b"\n")?;
        }
        out.flush()
    }
}

impl Sink for StdoutSink {
    fn name(&self) -> &str {
        &self.id
    }

    fn deliver(&self, records: Vec<SinkRecord>) -> BoxFuture<'static, Vec<Result<(), String>>> {
        self.telemetry.attempt(records.len() as u64);
        if let Err(error) = self.write_all(&records) {
            tracing::warn!(destination = %self.id, %error, "cannot write to stdout");
        }
        for r in &records {
            self.telemetry.delivered(&r.value);
        }
        futures::future::ready(records.iter().map(|_| Ok(())).collect()).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::testing::record;

    #[tokio::test]
    async fn stdout_sink_never_fails() {
        let sink = StdoutSink::new("stdout");
        let mut pretty = record("p", 2);
        pretty.value = b"{\n  \"a\": 1\n}".to_vec();
        let results = sink.deliver(vec![record("p", 1), pretty]).await;
        assert_eq!(results, vec![Ok(()), Ok(())]);
        assert_eq!(sink.name(), "stdout");
    }
}
