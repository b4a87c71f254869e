//! The stage's poll loop: set-up, the loop turn and leaving the group.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;

use super::batch::process_batch;
use super::gauges::{update_gauges, update_input_partitions};
use super::ownership::{check_ownership, OWNERSHIP_CHECK_EVERY};
use super::rebalance::StageContext;
use super::ticks::send_ticks;
use super::{InputObserver, RuntimeError, Shared, StageSpec};

use crate::kafka::ClientFactory;
use crate::service::{ReadyFlag, Shutdown};

/// How often an instance reads its input topic's partition count
/// (`cdp_input_partitions`).
const INPUT_PARTITIONS_EVERY: Duration = Duration::from_secs(60);

/// Runs one stage until shutdown or a fatal error.
pub struct StageRuntime {
    spec: StageSpec,
    factory: ClientFactory,
    instance_id: Option<String>,
    ready: ReadyFlag,
    on_input: Option<InputObserver>,
    external_input: bool,
    round_limit: Option<usize>,
}

impl StageRuntime {
    pub fn new(
        spec: StageSpec,
        factory: ClientFactory,
        instance_id: Option<String>,
        ready: ReadyFlag,
    ) -> Self {
        StageRuntime {
            spec,
            factory,
            instance_id,
            ready,
            on_input: None,
            external_input: false,
            round_limit: None,
        }
    }

    /// At most `most` records per poll round even when `kafka.max_batch`
    /// allows more: for a stage whose round is bounded by something slower
    /// than its CPU (deliver, whose HTTP destinations have a deadline per
    /// round).
    pub fn with_round_limit(mut self, most: usize) -> Self {
        self.round_limit = Some(most);
        self
    }

    /// The input topic is written by producers outside the pipeline
    /// (`<p>.raw`): its records' runtime headers are not trusted (see
    /// [`crate::trust`]).
    pub fn with_external_input(mut self) -> Self {
        self.external_input = true;
        self
    }

    /// Call `observer` with the outcome of every input record (see
    /// [`InputObserver`]).
    pub fn with_input_observer(mut self, observer: InputObserver) -> Self {
        self.on_input = Some(observer);
        self
    }

    /// Spawn the stage on its own named thread. Needs a tokio runtime
    /// handle for awaiting deliveries and sinks.
    pub fn spawn(
        self,
        handle: tokio::runtime::Handle,
        shutdown: Shutdown,
    ) -> std::io::Result<std::thread::JoinHandle<Result<(), RuntimeError>>> {
        std::thread::Builder::new()
            .name(format!("stage-{}", self.spec.name))
            .spawn(move || {
                let name = self.spec.name;
                let ready = self.ready.clone();
                let result = self.run(handle, shutdown.clone());
                if let Err(e) = &result {
                    tracing::error!(stage = name, error = %e, "stage stopped");
                    ready.fail(&e.to_string());
                    // One stage failing takes the process down cleanly so the
                    // orchestrator restarts it and the batch replays.
                    shutdown.trigger();
                }
                result
            })
    }

    /// Run on the current thread (which must not be a tokio worker).
    pub fn run(
        self,
        handle: tokio::runtime::Handle,
        shutdown: Shutdown,
    ) -> Result<(), RuntimeError> {
        let cfg = self.factory.config().clone();
        let round = self
            .round_limit
            .map_or(cfg.max_batch, |most| most.min(cfg.max_batch));
        let topics = self.factory.topics();
        let name = self.spec.name;
        crate::metrics::init_stage(name);
        let input_topic = self.spec.input_topic.clone();
        let shared = Arc::new(Shared {
            producer: RwLock::new(
                self.factory
                    .producer_with_context(super::acks::AckContext::default())?,
            ),
            factory: self.factory.clone(),
            shutdown: shutdown.clone(),
            external_input: self.external_input,
            restore_consumer: self.factory.restore_consumer()?,
            changelog_topic: topics.changelog(name),
            dead_letter_topic: topics.invalid(),
            state_dir: PathBuf::from(&cfg.state_dir),
            guarantee: cfg.guarantee,
            max_record_bytes: cfg.max_record_bytes,
            tasks: Mutex::new(BTreeMap::new()),
            group_offsets: Mutex::default(),
            failure: Mutex::new(None),
            ready: self.ready.clone(),
            group_watch: Mutex::default(),
            broker_away: Default::default(),
            handle,
            chaos_crash_after_produce: std::env::var("CDP_CHAOS_CRASH_AFTER_PRODUCE")
                .ok()
                .and_then(|v| v.parse().ok()),
            batches_with_outputs: AtomicU64::new(0),
            spec: self.spec,
            on_input: self.on_input,
        });
        let group = format!("{}.{name}", cfg.topic_prefix);
        let consumer = self.factory.stage_consumer(
            &group,
            self.instance_id.as_deref(),
            StageContext {
                shared: shared.clone(),
            },
        )?;
        consumer.subscribe(&[&input_topic])?;
        tracing::info!(stage = name, topic = %input_topic, %group, "stage started");
        let tick_every = cfg.tick_interval.to_std();
        let mut last_gauges = Instant::now();
        let mut last_partitions: Option<Instant> = None;
        let mut last_ownership_check = Instant::now();
        while !shutdown.is_triggered() {
            if let Some(e) = shared
                .failure
                .lock()
                .map_err(|_| RuntimeError::Poisoned)?
                .take()
            {
                return Err(e);
            }
            if let Some((code, reason)) = consumer.client().fatal_error() {
                tracing::error!(stage = name, ?code, %reason, "fatal consumer error; exiting so the orchestrator restarts the stage");
                return Err(RuntimeError::Fatal {
                    client: "consumer",
                    reason,
                });
            }
            let (batch, poll_wait) = poll_batch(name, &consumer, round)?;
            if !batch.is_empty() {
                process_batch(&shared, batch, poll_wait)?;
            }
            // Lag tools read the group's offsets; the store is the truth.
            shared
                .group_offsets
                .lock()
                .map_err(|_| RuntimeError::Poisoned)?
                .commit(name, &input_topic, &consumer, false);
            if shared.spec.ticks {
                send_ticks(&shared, tick_every)?;
            }
            if let Ok(mut watch) = shared.group_watch.lock() {
                watch.check(name, self.instance_id.is_some());
            }
            if last_gauges.elapsed() > Duration::from_secs(10) {
                update_gauges(&shared, &consumer);
                last_gauges = Instant::now();
            }
            if last_partitions.is_none_or(|at| at.elapsed() > INPUT_PARTITIONS_EVERY) {
                update_input_partitions(&shared, &consumer, Duration::from_secs(2));
                last_partitions = Some(Instant::now());
            }
            if last_ownership_check.elapsed() > OWNERSHIP_CHECK_EVERY {
                check_ownership(&shared)?;
                last_ownership_check = Instant::now();
            }
        }
        if let Ok(mut offsets) = shared.group_offsets.lock() {
            offsets.commit(name, &input_topic, &consumer, true);
        }
        tracing::info!(stage = name, "leaving consumer group");
        // Closed, not unsubscribed: librdkafka's close serves the revoke
        // callback (tasks close before the process exits) and, for a static
        // member (`--instance-id`), sends no LeaveGroup, so the partitions
        // wait for it through the session timeout instead of moving to
        // another instance and back (an unsubscribe leaves the group either
        // way). A dynamic member leaves on close as before.
        drop(consumer);
        Ok(())
    }
}

/// Poll up to `max` records: wait briefly for the first, then take what is
/// already fetched. A broker that is away shows up as errors here that the
/// client recovers from by itself.
/// The records stay in the consumer's buffers: they are borrowed, never
/// copied out. Also returns how long the first poll waited.
fn poll_batch<'c>(
    stage: &'static str,
    consumer: &'c BaseConsumer<StageContext>,
    max: usize,
) -> Result<(Vec<BorrowedMessage<'c>>, Duration), RuntimeError> {
    let mut out = Vec::new();
    let mut timeout = Duration::from_millis(100);
    let started = Instant::now();
    let mut waited = Duration::ZERO;
    while out.len() < max {
        match consumer.poll(timeout) {
            None => break,
            Some(Ok(m)) => {
                if out.is_empty() {
                    waited = started.elapsed();
                }
                out.push(m);
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => {
                // A fatal error is checked by the caller before every poll.
                tracing::warn!(stage, error = %e, "consumer error");
                break;
            }
        }
        timeout = Duration::ZERO;
    }
    Ok((out, waited))
}
