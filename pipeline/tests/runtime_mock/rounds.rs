//! The size of a poll round: `with_round_limit` below `kafka.max_batch`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cdp_pipeline::{
    ClientFactory, Context, Health, Operator, OperatorError, OutputTarget, Record, Shutdown,
    StageRuntime, StageSpec,
};
use rdkafka::producer::FutureRecord;

use super::common::{mock_stage, BoxError, MockOptions};
use super::support::*;

/// Forwards every input record to the output `sink`.
struct Forward;

impl Operator for Forward {
    fn process(&mut self, r: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        ctx.emit("sink", r.key.map(<[u8]>::to_vec), r.value.to_vec());
        Ok(())
    }
}

/// Accepts every record and keeps how many each `deliver` call was handed.
struct RoundSizes(std::sync::Arc<std::sync::Mutex<Vec<usize>>>);

impl cdp_pipeline::Sink for RoundSizes {
    fn name(&self) -> &str {
        "sizes"
    }

    fn deliver(
        &self,
        records: Vec<cdp_pipeline::SinkRecord>,
    ) -> futures::future::BoxFuture<'static, Vec<Result<(), String>>> {
        if let Ok(mut sizes) = self.0.lock() {
            sizes.push(records.len());
        }
        let n = records.len();
        Box::pin(async move { vec![Ok(()); n] })
    }
}

/// Run a `Forward` stage named `name` (its own consumer group) until its
/// sink got `want` records; the size of every batch the sink was handed.
async fn sink_rounds(
    name: &'static str,
    factory: &ClientFactory,
    round_limit: Option<usize>,
    want: usize,
) -> Result<Vec<usize>, BoxError> {
    let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut outputs = BTreeMap::new();
    outputs.insert(
        "sink",
        OutputTarget::Sink(std::sync::Arc::new(RoundSizes(sizes.clone()))),
    );
    let spec = StageSpec {
        name,
        input_topic: "t.in".into(),
        outputs,
        operator: Box::new(|_| Box::new(Forward)),
        ticks: false,
        observer: None,
        timers_from_state: None,
    };
    let mut rt = StageRuntime::new(
        spec,
        factory.clone(),
        None,
        Health::default().register(name),
    );
    if let Some(most) = round_limit {
        rt = rt.with_round_limit(most);
    }
    let shutdown = Shutdown::default();
    let (handle, s) = (tokio::runtime::Handle::current(), shutdown.clone());
    let join = std::thread::spawn(move || rt.run(handle, s));
    let delivered = || sizes.lock().map(|s| s.iter().sum::<usize>()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(40);
    while delivered() < want && Instant::now() < deadline && !join.is_finished() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.trigger();
    join.join().map_err(|_| "stage panicked")??;
    let sizes = sizes.lock().map_err(|_| "poisoned")?.clone();
    Ok(sizes)
}

/// `with_round_limit` (deliver's bound) caps a round below
/// `kafka.max_batch`: a backlog reaches a sink in batches no larger than
/// the limit, and all of it arrives. The same backlog without the limit
/// arrives in larger batches, so the setup can tell the two apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_limit_caps_the_batches_a_sink_is_handed() -> TestResult {
    let s = mock_stage(MockOptions {
        stage: "whole",
        partitions: 1,
        state_dir: None,
        max_batch: Some(5000),
        properties: &[],
    })?;
    s.mock.create_topic("t.capped-changelog", 1, 1)?;
    let keys: Vec<String> = (0..400).map(|i| format!("k{i}")).collect();
    let sends: Vec<_> = keys
        .iter()
        .map(|k| {
            s.producer.send(
                FutureRecord::to("t.in").key(k).payload("v"),
                Duration::from_secs(5),
            )
        })
        .collect();
    for sent in futures::future::join_all(sends).await {
        sent.map_err(|(e, _)| e)?;
    }
    let whole = sink_rounds("whole", &s.factory, None, 400).await?;
    let capped = sink_rounds("capped", &s.factory, Some(50), 400).await?;
    assert_eq!(whole.iter().sum::<usize>(), 400, "{whole:?}");
    assert!(whole.iter().any(|&n| n > 50), "uncapped rounds: {whole:?}");
    assert_eq!(capped.iter().sum::<usize>(), 400, "{capped:?}");
    assert!(capped.iter().all(|&n| n <= 50), "capped rounds: {capped:?}");
    Ok(())
}
