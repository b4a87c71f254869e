//! The stage runtime: consumer-group membership, one task per assigned
//! partition, and the effectively-once batch cycle.
//!
//! A stage runs on its own thread. Each loop turn it polls a batch, lets each
//! task's operator process its records, and then:
//!  1. produces every output (and sink delivery) and the changed state keys
//!     to the changelog, and waits for every acknowledgement;
//!  2. produces one commit marker per task and waits for it;
//!  3. commits state + input offset + dedupe positions in one RocksDB batch.
//!
//! A crash anywhere before 3 replays the batch: outputs land again at the
//! same positions and consumers drop them. Rebalance callbacks run inside
//! `poll` on this same thread, so a revoked task is always idle: its last
//! batch was committed before the poll that revoked it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::future_producer::DeliveryFuture;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

mod ownership;

use crate::changelog::{self, commit_key, Marker, RestoreError};
use crate::envelope::{self, Position};
use crate::kafka::{ClientError, ClientFactory, Guarantee};
use crate::metrics;
use crate::operator::{
    fire_due_timers_from, Context, Emitted, Operator, OperatorError, OperatorFactory, Record,
};
use crate::retry::{self, Backoff};
use crate::service::{ReadyFlag, Shutdown};
use crate::sink::{Sink, SinkRecord};
use crate::store::{Changes, StoreError, TaskMeta, TaskStore};
use crate::trust::{self, TickVerdict};

/// The output name every stage has: the dead-letter topic.
pub const DEAD_LETTERS: &str = "dead_letters";

/// Where a named output goes.
#[derive(Clone)]
pub enum OutputTarget {
    Topic(String),
    Sink(Arc<dyn Sink>),
}

/// Sees every record a stage committed (for metrics such as audience sizes).
pub type Observer = Arc<dyn Fn(&Emitted) + Send + Sync>;

/// What became of one input record (ticks and replays dropped by position
/// excluded).
#[derive(Debug)]
pub enum InputOutcome<'a> {
    /// The operator accepted it and emitted these records (possibly none).
    Processed(&'a [Emitted]),
    /// The operator rejected it: it goes to the dead-letter topic.
    DeadLetter {
        reason: &'static str,
        detail: &'a serde_json::Value,
    },
}

/// Sees the headers and outcome of every input record as it is processed,
/// so a stage can count what its pure operator cannot (validation failures
/// by source and event). Like `cdp_dead_letters_total`, it counts at
/// processing time: a batch replayed after a crash is seen again.
pub type InputObserver = Arc<dyn Fn(&[(String, Vec<u8>)], &InputOutcome<'_>) + Send + Sync>;

/// Everything that makes one stage.
pub struct StageSpec {
    /// Stage name: consumer group `<prefix>.<name>`, changelog
    /// `<prefix>.<name>-changelog`, state under `<state_dir>/<name>/`.
    pub name: &'static str,
    pub input_topic: String,
    pub outputs: BTreeMap<&'static str, OutputTarget>,
    pub operator: OperatorFactory,
    /// Whether tasks write tick records into their input partition.
    pub ticks: bool,
    pub observer: Option<Observer>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("producing to {topic}: {error}")]
    Produce { topic: String, error: KafkaError },
    /// librdkafka gave up on a client for good (e.g. a static member fenced
    /// by another instance with the same `group.instance.id`): only a new
    /// process can go on.
    #[error("fatal error of the kafka {client}, the process must restart: {reason}")]
    Fatal {
        client: &'static str,
        reason: String,
    },
    #[error("{topic}[{partition}]: foreign writes kept arriving during repair")]
    RepairGaveUp { topic: String, partition: i32 },
    #[error("operator emitted to output {0:?}, which this stage does not have")]
    UnknownOutput(String),
    #[error("state directory {path}: {error}")]
    StateDir { path: String, error: std::io::Error },
    #[error("internal lock poisoned")]
    Poisoned,
    #[error("{stage}[{partition}]: fenced — another owner claimed epoch {by} while this task held epoch {epoch}; its batch was not committed")]
    Fenced {
        stage: &'static str,
        partition: i32,
        epoch: u32,
        by: u32,
    },
    #[error("{stage}[{partition}]: every claim of the changelog was voided by concurrent writes")]
    ClaimContended { stage: &'static str, partition: i32 },
}

impl RuntimeError {
    /// Whether retrying cannot help (a bad record, missing rights).
    fn is_permanent(&self) -> bool {
        match self {
            RuntimeError::Produce { error, .. } => retry::is_permanent(error),
            _ => true,
        }
    }
}

/// One input partition's worker: its state, progress and operator.
struct Task {
    partition: i32,
    origin: String,
    store: TaskStore,
    meta: TaskMeta,
    /// The changelog offset after the last record this task knows of
    /// (its own, or foreign records it has dealt with).
    log_end: i64,
    operator: Box<dyn Operator>,
    last_tick: Instant,
    /// Every timer below this key has fired (see `fire_due_timers_from`).
    timer_floor: Vec<u8>,
}

/// State shared between the loop and the rebalance callback.
struct Shared {
    spec: StageSpec,
    on_input: Option<InputObserver>,
    factory: ClientFactory,
    /// Rebuilt when it cannot recover by itself (see [`produce_acked`]).
    producer: RwLock<FutureProducer>,
    restore_consumer: BaseConsumer,
    changelog_topic: String,
    dead_letter_topic: String,
    state_dir: PathBuf,
    guarantee: Guarantee,
    tasks: Mutex<BTreeMap<i32, Task>>,
    failure: Mutex<Option<RuntimeError>>,
    ready: ReadyFlag,
    shutdown: Shutdown,
    /// The input is written from outside the pipeline: strip runtime
    /// headers (see [`crate::trust`]).
    external_input: bool,
    handle: tokio::runtime::Handle,
    /// Test hook (`CDP_CHAOS_CRASH_AFTER_PRODUCE=N`): abort the process
    /// right after the N-th batch with outputs was produced, before its
    /// commit — the window the effectively-once design exists for.
    chaos_crash_after_produce: Option<u64>,
    batches_with_outputs: AtomicU64,
}

struct StageContext {
    shared: Arc<Shared>,
}

impl ClientContext for StageContext {}

impl ConsumerContext for StageContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let stage = self.shared.spec.name;
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Not ready while restoring (which may wait out a broker).
                self.shared.ready.set(false);
                metrics::REBALANCES
                    .with_label_values(&[stage, "assign"])
                    .inc();
                self.assign(tpl)
                    .and_then(|()| consumer.assign(tpl).map_err(RuntimeError::from))
            }
            _ => {
                metrics::REBALANCES
                    .with_label_values(&[stage, "revoke"])
                    .inc();
                // Tasks are idle here (see module docs): dropping closes
                // their stores; their progress is already committed.
                if let Ok(mut tasks) = self.shared.tasks.lock() {
                    let partitions: Vec<i32> = tasks.keys().copied().collect();
                    tracing::info!(stage, ?partitions, "partitions revoked");
                    tasks.clear();
                }
                metrics::TASKS.with_label_values(&[stage]).set(0);
                consumer.unassign().map_err(RuntimeError::from)
            }
        };
        if let Err(e) = result {
            tracing::error!(stage, error = %e, "rebalance failed");
            if let Ok(mut f) = self.shared.failure.lock() {
                f.get_or_insert(e);
            }
        }
        self.shared.ready.set(true);
    }
}

impl StageContext {
    /// Open and restore a task per assigned partition and point the
    /// assignment at each task's committed offset.
    fn assign(&self, tpl: &mut TopicPartitionList) -> Result<(), RuntimeError> {
        let shared = &self.shared;
        let mut tasks = shared.tasks.lock().map_err(|_| RuntimeError::Poisoned)?;
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        tracing::info!(stage = shared.spec.name, ?partitions, "partitions assigned");
        for partition in partitions {
            let mut task = ownership::open_task(shared, partition)?;
            let offset = ownership::input_start(shared, &mut task)?;
            tpl.set_partition_offset(&shared.spec.input_topic, partition, offset)?;
            tasks.insert(partition, task);
        }
        metrics::TASKS
            .with_label_values(&[shared.spec.name])
            .set(tasks.len() as i64);
        Ok(())
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Shared {
    fn producer(&self) -> Result<FutureProducer, RuntimeError> {
        self.producer
            .read()
            .map(|p| p.clone())
            .map_err(|_| RuntimeError::Poisoned)
    }

    /// Replace the producer with a new one: a client whose idempotence
    /// state no longer matches the broker's (seen after a broker restart
    /// lost it) never recovers by itself.
    fn rebuild_producer(&self, why: &str) -> Result<(), RuntimeError> {
        let fresh = self.factory.producer()?;
        let old = std::mem::replace(
            &mut *self.producer.write().map_err(|_| RuntimeError::Poisoned)?,
            fresh,
        );
        drop(old);
        metrics::CLIENT_REBUILDS
            .with_label_values(&[self.spec.name, "producer"])
            .inc();
        tracing::warn!(stage = self.spec.name, why, "producer rebuilt");
        Ok(())
    }
}

/// Where the records of [`produce_acked`] landed, in order.
#[derive(Debug, Default)]
struct Acks {
    offsets: Vec<(i32, i64)>,
}

/// One record to produce, kept so that a failed produce can be retried.
struct Outgoing<'a> {
    topic: &'a str,
    partition: Option<i32>,
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    headers: OwnedHeaders,
}

/// Produce `records` in order and wait for every acknowledgement; returns
/// each record's `(partition, offset)`. While the broker is away or
/// refusing, the whole set is produced again with backoff (its records keep
/// their positions, so consumers drop the repeats) and the stage reports
/// not ready; a producer that failed three times in a row, or hit a fatal
/// error, is rebuilt. Gives up after [`retry::BROKER_PATIENCE`].
fn produce_acked(
    shared: &Shared,
    what: &'static str,
    records: &[Outgoing<'_>],
) -> Result<Acks, RuntimeError> {
    if records.is_empty() {
        return Ok(Acks::default());
    }
    let stage = shared.spec.name;
    let mut backoff = Backoff::default();
    loop {
        let producer = shared.producer()?;
        let attempt = records
            .iter()
            .map(|r| {
                let mut record = FutureRecord::<[u8], [u8]>::to(r.topic).headers(r.headers.clone());
                if let Some(p) = r.partition {
                    record = record.partition(p);
                }
                if let Some(k) = r.key {
                    record = record.key(k);
                }
                if let Some(v) = r.payload {
                    record = record.payload(v);
                }
                enqueue(&producer, record).map(|f| (r.topic.to_string(), f))
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(|futures| await_deliveries(&shared.handle, futures));
        let error = match attempt {
            Ok(acks) => {
                if backoff.failures > 0 {
                    tracing::info!(
                        stage,
                        what,
                        failures = backoff.failures,
                        waited_ms = backoff.elapsed().as_millis() as u64,
                        "broker acknowledges again"
                    );
                    shared.ready.set(true);
                }
                return Ok(Acks { offsets: acks });
            }
            Err(e) => e,
        };
        if error.is_permanent() {
            return Err(error);
        }
        shared.ready.set(false);
        metrics::BROKER_RETRIES
            .with_label_values(&[stage, what])
            .inc();
        tracing::warn!(stage, what, failures = backoff.failures + 1, error = %error, "broker did not acknowledge; retrying");
        let fatal = producer.client().fatal_error();
        drop(producer);
        if let Some((_, reason)) = fatal {
            shared.rebuild_producer(&reason)?;
        } else if backoff.failures % 3 == 2 {
            shared.rebuild_producer("three failed attempts in a row")?;
        }
        if !backoff.wait(Some(&shared.shutdown)) {
            return Err(error);
        }
    }
}

/// The id a sink's receiver dedupes on: the record's origin, lineage and
/// position without the epoch, so a replay by a new owner (a higher epoch)
/// of the same input offset carries the same id, while a reset stage (a new
/// lineage, offsets from the start again) never reuses an old one.
fn delivery_id(origin: &str, pos: &Position) -> String {
    format!("{origin}/{}/{}/{}", pos.lineage, pos.offset, pos.index)
}

fn epoch_header(epoch: u32) -> OwnedHeaders {
    OwnedHeaders::new().insert(Header {
        key: envelope::EPOCH,
        value: Some(epoch.to_string().as_bytes()),
    })
}

/// Send without blocking on a full local queue for long: wait and retry.
fn enqueue<K, P>(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, K, P>,
) -> Result<DeliveryFuture, RuntimeError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    let topic = record.topic.to_string();
    let started = Instant::now();
    loop {
        match producer.send_result(record) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                if started.elapsed() < Duration::from_secs(60) =>
            {
                record = r;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((error, _)) => return Err(RuntimeError::Produce { topic, error }),
        }
    }
}

/// Await deliveries; returns each record's `(partition, offset)`.
fn await_deliveries(
    handle: &tokio::runtime::Handle,
    futures: Vec<(String, DeliveryFuture)>,
) -> Result<Vec<(i32, i64)>, RuntimeError> {
    let (topics, futs): (Vec<String>, Vec<DeliveryFuture>) = futures.into_iter().unzip();
    let results = handle.block_on(join_all(futs));
    topics
        .into_iter()
        .zip(results)
        .map(|(topic, r)| match r {
            Ok(Ok(d)) => Ok((d.partition, d.offset)),
            Ok(Err((error, _))) => Err(RuntimeError::Produce { topic, error }),
            Err(_) => Err(RuntimeError::Produce {
                topic,
                error: KafkaError::Canceled,
            }),
        })
        .collect()
}

/// Records for one sink in one batch, with where each came from
/// (`(task batch index, output index)`).
type SinkBatch = (Arc<dyn Sink>, Vec<SinkRecord>, Vec<(usize, usize)>);

/// A task's results for one batch, between processing and commit.
struct TaskBatch {
    partition: i32,
    meta: TaskMeta,
    outputs: Vec<(Position, Emitted)>,
    changes: Changes,
}

/// Runs one stage until shutdown or a fatal error.
pub struct StageRuntime {
    spec: StageSpec,
    factory: ClientFactory,
    instance_id: Option<String>,
    ready: ReadyFlag,
    on_input: Option<InputObserver>,
    external_input: bool,
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
        }
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
        let topics = self.factory.topics();
        let name = self.spec.name;
        let input_topic = self.spec.input_topic.clone();
        let shared = Arc::new(Shared {
            producer: RwLock::new(self.factory.producer()?),
            factory: self.factory.clone(),
            shutdown: shutdown.clone(),
            external_input: self.external_input,
            restore_consumer: self.factory.restore_consumer()?,
            changelog_topic: topics.changelog(name),
            dead_letter_topic: topics.invalid(),
            state_dir: PathBuf::from(&cfg.state_dir),
            guarantee: cfg.guarantee,
            tasks: Mutex::new(BTreeMap::new()),
            failure: Mutex::new(None),
            ready: self.ready.clone(),
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
            let batch = poll_batch(name, &consumer, cfg.max_batch)?;
            if !batch.is_empty() {
                process_batch(&shared, &consumer, batch)?;
            }
            if shared.spec.ticks {
                send_ticks(&shared, tick_every)?;
            }
            if last_gauges.elapsed() > Duration::from_secs(10) {
                update_gauges(&shared, &consumer);
                last_gauges = Instant::now();
            }
            if last_ownership_check.elapsed() > OWNERSHIP_CHECK_EVERY {
                check_ownership(&shared)?;
                last_ownership_check = Instant::now();
            }
        }
        tracing::info!(stage = name, "leaving consumer group");
        consumer.unsubscribe();
        // Serve the revoke callback so tasks close before the process exits.
        for _ in 0..5 {
            let _ = consumer.poll(Duration::from_millis(100));
        }
        Ok(())
    }
}

/// Poll up to `max` records: wait briefly for the first, then take what is
/// already fetched. A broker that is away shows up as errors here that the
/// client recovers from by itself.
fn poll_batch(
    stage: &'static str,
    consumer: &BaseConsumer<StageContext>,
    max: usize,
) -> Result<Vec<OwnedMessage>, RuntimeError> {
    let mut out = Vec::new();
    let mut timeout = Duration::from_millis(100);
    while out.len() < max {
        match consumer.poll(timeout) {
            None => break,
            Some(Ok(m)) => out.push(m.detach()),
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) => {
                // A fatal error is checked by the caller before every poll.
                tracing::warn!(stage, error = %e, "consumer error");
                break;
            }
        }
        timeout = Duration::ZERO;
    }
    Ok(out)
}

fn owned_headers(m: &OwnedMessage) -> Vec<(String, Vec<u8>)> {
    m.headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        h.key.to_string(),
                        h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn to_owned_headers(pairs: &[(String, Vec<u8>)]) -> OwnedHeaders {
    pairs
        .iter()
        .fold(OwnedHeaders::new_with_capacity(pairs.len()), |h, (k, v)| {
            h.insert(Header {
                key: k.as_str(),
                value: Some(v.as_slice()),
            })
        })
}

/// Turn an operator's result for one record into what the batch produces:
/// its outputs, or a dead letter in their place when it was rejected. Tells
/// `observer` (given for input records, not ticks) what became of it. A
/// store error is fatal for the batch and observed by no one.
fn settle(
    stage: &'static str,
    m: &OwnedMessage,
    headers: Vec<(String, Vec<u8>)>,
    result: Result<(), OperatorError>,
    emitted: &mut Vec<Emitted>,
    observer: Option<&InputObserver>,
) -> Result<(), RuntimeError> {
    match result {
        Ok(()) => {
            if let Some(observe) = observer {
                observe(&headers, &InputOutcome::Processed(emitted));
            }
        }
        Err(OperatorError::Rejected { reason, detail }) => {
            metrics::DEAD_LETTERS
                .with_label_values(&[stage, reason])
                .inc();
            tracing::debug!(
                stage,
                partition = m.partition(),
                offset = m.offset(),
                reason,
                "dead letter"
            );
            if let Some(observe) = observer {
                observe(
                    &headers,
                    &InputOutcome::DeadLetter {
                        reason,
                        detail: &detail,
                    },
                );
            }
            emitted.clear();
            emitted.push(dead_letter(stage, m, headers, reason, &detail));
        }
        Err(OperatorError::Store(e)) => return Err(e.into()),
    }
    Ok(())
}

/// A dead letter: the original bytes and headers, plus why.
fn dead_letter(
    stage: &str,
    m: &OwnedMessage,
    headers: Vec<(String, Vec<u8>)>,
    reason: &'static str,
    detail: &serde_json::Value,
) -> Emitted {
    let mut headers = headers;
    headers.retain(|(k, _)| !k.starts_with("cdp-dlq-"));
    headers.push((envelope::DLQ_STAGE.into(), stage.as_bytes().to_vec()));
    headers.push((envelope::DLQ_REASON.into(), reason.as_bytes().to_vec()));
    headers.push(("cdp-dlq-detail".into(), detail.to_string().into_bytes()));
    headers.push((
        "cdp-dlq-input".into(),
        format!("{}[{}]@{}", m.topic(), m.partition(), m.offset()).into_bytes(),
    ));
    Emitted {
        output: DEAD_LETTERS,
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
    }
}

fn process_batch(
    shared: &Shared,
    consumer: &BaseConsumer<StageContext>,
    batch: Vec<OwnedMessage>,
) -> Result<(), RuntimeError> {
    let started = Instant::now();
    let stage = shared.spec.name;
    let processing_time = now_ms();
    let dedupe = shared.guarantee == Guarantee::EffectivelyOnce;
    let mut by_partition: BTreeMap<i32, Vec<OwnedMessage>> = BTreeMap::new();
    for m in batch {
        by_partition.entry(m.partition()).or_default().push(m);
    }
    let mut tasks = shared.tasks.lock().map_err(|_| RuntimeError::Poisoned)?;
    let mut work: Vec<TaskBatch> = Vec::new();
    for (partition, messages) in by_partition {
        // Records fetched before a revoke or re-assignment are not ours.
        let Some(task) = tasks.get_mut(&partition) else {
            continue;
        };
        let mut meta = task.meta.clone();
        let mut outputs = Vec::new();
        let mut consumed = false;
        for m in messages {
            if m.offset() < meta.input_offset {
                continue; // fetched before the seek to our committed offset
            }
            consumed = true;
            meta.input_offset = m.offset() + 1;
            metrics::RECORDS_IN.with_label_values(&[stage]).inc();
            let mut headers = owned_headers(&m);
            let mut emitted = Vec::new();
            let verdict = trust::judge_tick(
                &headers,
                &task.origin,
                meta.epoch,
                meta.tick_epoch,
                processing_time,
            );
            let result = match verdict {
                TickVerdict::Reject(reason) => {
                    metrics::TICKS_REJECTED
                        .with_label_values(&[stage, reason])
                        .inc();
                    tracing::debug!(
                        stage,
                        partition,
                        offset = m.offset(),
                        reason,
                        "tick ignored"
                    );
                    continue;
                }
                TickVerdict::Accept { time, epoch } => {
                    meta.tick_epoch = epoch;
                    meta.stream_time = meta.stream_time.max(time);
                    fire_due_timers_from(
                        task.operator.as_mut(),
                        &mut task.store,
                        &mut emitted,
                        meta.stream_time,
                        processing_time,
                        partition,
                        &mut task.timer_floor,
                    )
                }
                TickVerdict::NotATick => {
                    if shared.external_input {
                        trust::strip_external(&mut headers);
                    }
                    if dedupe {
                        if let Some((origin, pos)) = Position::from_headers(&headers) {
                            if meta
                                .dedupe
                                .get(&origin)
                                .is_some_and(|seen| !pos.is_new_after(seen))
                            {
                                metrics::DUPLICATES_DROPPED
                                    .with_label_values(&[stage])
                                    .inc();
                                continue;
                            }
                            meta.dedupe.insert(origin, pos);
                        }
                    }
                    let record = Record {
                        key: m.key(),
                        value: m.payload().unwrap_or_default(),
                        partition,
                        offset: m.offset(),
                        timestamp_ms: m.timestamp().to_millis(),
                        headers: &headers,
                    };
                    let mut ctx = Context::new(
                        &mut task.store,
                        &mut emitted,
                        meta.stream_time,
                        processing_time,
                        partition,
                    );
                    let result = task.operator.process(&record, &mut ctx);
                    if let Some(set) = ctx.take_earliest_timer_set() {
                        if set < task.timer_floor {
                            task.timer_floor = set;
                        }
                    }
                    result
                }
            };
            let observer = if verdict == TickVerdict::NotATick {
                shared.on_input.as_ref()
            } else {
                None
            };
            settle(stage, &m, headers, result, &mut emitted, observer)?;
            for (index, e) in emitted.into_iter().enumerate() {
                let pos = Position {
                    epoch: meta.epoch,
                    offset: m.offset(),
                    index: index as u32,
                    lineage: meta.lineage,
                };
                outputs.push((pos, e));
            }
        }
        if !consumed {
            continue;
        }
        let changes = task.store.take_changes();
        if outputs.is_empty() && changes.is_empty() {
            // Nothing to make durable (typically an idle partition's ticks):
            // move on in memory only. Replaying these records after a crash
            // yields nothing again, so an idle task costs no writes.
            task.meta = meta;
            continue;
        }
        work.push(TaskBatch {
            partition,
            meta,
            outputs,
            changes,
        });
    }
    if work.is_empty() {
        return Ok(());
    }

    // Sinks first: each retries on its own within its deadline and hands
    // back what it gave up on, which becomes a dead letter below.
    let mut sink_batches: BTreeMap<String, SinkBatch> = BTreeMap::new();
    for (wi, w) in work.iter().enumerate() {
        let Some(task) = tasks.get(&w.partition) else {
            continue;
        };
        for (oi, (pos, e)) in w.outputs.iter().enumerate() {
            if e.output == DEAD_LETTERS {
                continue;
            }
            if let Some(OutputTarget::Sink(sink)) = shared.spec.outputs.get(e.output) {
                let entry = sink_batches
                    .entry(e.output.to_string())
                    .or_insert_with(|| (sink.clone(), Vec::new(), Vec::new()));
                entry.1.push(SinkRecord {
                    delivery_id: delivery_id(&task.origin, pos),
                    key: e.key.clone(),
                    value: e.value.clone(),
                });
                entry.2.push((wi, oi));
            }
        }
    }
    let sink_futures = sink_batches
        .values()
        .map(|(sink, records, _)| sink.deliver(records.clone()))
        .collect::<Vec<_>>();
    let sink_results = shared.handle.block_on(join_all(sink_futures));

    // Phase 1: outputs, changelog records and the dead letters of failed
    // deliveries, all acknowledged.
    let mut outgoing: Vec<Outgoing<'_>> = Vec::new();
    for w in &work {
        let Some(task) = tasks.get(&w.partition) else {
            continue;
        };
        for (pos, e) in &w.outputs {
            let topic = if e.output == DEAD_LETTERS {
                shared.dead_letter_topic.as_str()
            } else {
                match shared.spec.outputs.get(e.output) {
                    Some(OutputTarget::Topic(t)) => t.as_str(),
                    Some(OutputTarget::Sink(_)) => continue,
                    None => return Err(RuntimeError::UnknownOutput(e.output.to_string())),
                }
            };
            let mut headers = e.headers.clone();
            headers.extend(pos.to_headers(&task.origin));
            outgoing.push(Outgoing {
                topic,
                partition: None,
                key: e.key.as_deref(),
                payload: Some(e.value.as_slice()),
                headers: to_owned_headers(&headers),
            });
            metrics::RECORDS_OUT
                .with_label_values(&[stage, e.output])
                .inc();
        }
        for (k, v) in &w.changes {
            outgoing.push(Outgoing {
                topic: &shared.changelog_topic,
                partition: Some(w.partition),
                key: Some(k.as_slice()),
                payload: v.as_deref(),
                headers: epoch_header(w.meta.epoch),
            });
        }
    }
    for ((name, (_, records, origins)), results) in sink_batches.iter().zip(&sink_results) {
        for ((record, (wi, oi)), result) in records.iter().zip(origins).zip(results) {
            metrics::RECORDS_OUT
                .with_label_values(&[stage, work[*wi].outputs[*oi].1.output])
                .inc();
            if let Err(reason) = result {
                metrics::DEAD_LETTERS
                    .with_label_values(&[stage, "delivery_failed"])
                    .inc();
                tracing::warn!(stage, destination = %name, delivery_id = %record.delivery_id, %reason, "delivery failed; sent to dead letters");
                let headers = to_owned_headers(&[
                    (envelope::DLQ_STAGE.into(), stage.as_bytes().to_vec()),
                    (envelope::DLQ_REASON.into(), b"delivery_failed".to_vec()),
                    (
                        "cdp-dlq-detail".into(),
                        serde_json::json!({"destination": name, "error": reason})
                            .to_string()
                            .into_bytes(),
                    ),
                    (
                        "cdp-delivery-id".into(),
                        record.delivery_id.clone().into_bytes(),
                    ),
                ]);
                outgoing.push(Outgoing {
                    topic: &shared.dead_letter_topic,
                    partition: None,
                    key: record.key.as_deref(),
                    payload: Some(record.value.as_slice()),
                    headers,
                });
            }
        }
    }
    let acks = produce_acked(shared, "batch", &outgoing)?;
    // Where our changelog records landed, per partition: any other offset
    // in between is someone else's write (see `ownership`).
    let mut changelog_offsets: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for (record, (partition, offset)) in outgoing.iter().zip(&acks.offsets) {
        if record.topic == shared.changelog_topic {
            changelog_offsets
                .entry(*partition)
                .or_default()
                .push(*offset);
        }
    }
    drop(outgoing);
    if let Some(crash_at) = shared.chaos_crash_after_produce {
        let has_outputs = work.iter().any(|w| !w.outputs.is_empty());
        if has_outputs && shared.batches_with_outputs.fetch_add(1, Ordering::SeqCst) + 1 >= crash_at
        {
            // The worst moment to die: outputs acknowledged, nothing committed.
            tracing::error!(stage, "chaos: aborting after produce, before commit");
            std::process::abort();
        }
    }

    // Phase 2: one commit marker per task.
    let markers = work
        .iter()
        .map(|w| {
            serde_json::to_vec(&Marker::commit(&w.meta))
                .map_err(|e| StoreError::Decode(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let marker_keys: Vec<Vec<u8>> = work.iter().map(|w| commit_key(w.meta.epoch)).collect();
    let marker_records: Vec<Outgoing<'_>> = work
        .iter()
        .zip(&markers)
        .zip(&marker_keys)
        .map(|((w, marker), key)| Outgoing {
            topic: &shared.changelog_topic,
            partition: Some(w.partition),
            key: Some(key.as_slice()),
            payload: Some(marker.as_slice()),
            headers: epoch_header(w.meta.epoch),
        })
        .collect();
    let marker_acks = produce_acked(shared, "marker", &marker_records)?;
    let marker_offsets = marker_acks.offsets;
    drop(marker_records);

    // Phase 3: state + progress + positions, atomically — unless someone
    // else wrote to the changelog partition meanwhile.
    let mut offsets = TopicPartitionList::new();
    let mut fenced = None;
    for (mut w, (_, marker_offset)) in work.into_iter().zip(marker_offsets) {
        let Some(task) = tasks.get_mut(&w.partition) else {
            continue;
        };
        let mut mine = changelog_offsets.remove(&w.partition).unwrap_or_default();
        mine.push(marker_offset);
        if !changelog::gaps(task.log_end, marker_offset, &mine).is_empty() {
            // A failed round of ours, or the client's own retry across a
            // broker restart that lost its idempotence state, may have
            // landed copies whose acks we never saw: ours if they are this
            // batch's records under our epoch, not another owner's writes.
            mine.extend(own_unacked_writes(shared, task, &w, marker_offset, &mine)?);
        }
        let foreign = ownership::check_writes(
            shared,
            w.partition,
            w.meta.epoch,
            task.log_end,
            &mine,
            marker_offset,
        )?;
        if let changelog::Foreign::Fenced { epoch } = foreign {
            // Another owner claimed: this batch is not ours to commit.
            tracing::error!(
                stage,
                partition = w.partition,
                epoch = w.meta.epoch,
                claimed_by = epoch,
                "fenced: another owner claimed this partition; not committing"
            );
            metrics::FENCED.with_label_values(&[stage]).inc();
            fenced.get_or_insert(RuntimeError::Fenced {
                stage,
                partition: w.partition,
                epoch: w.meta.epoch,
                by: epoch,
            });
            continue;
        }
        w.meta.changelog_offset = marker_offset;
        task.store.commit(&w.changes, &w.meta)?;
        task.meta = w.meta;
        task.log_end = marker_offset + 1;
        ownership::handle_foreign(shared, task, foreign)?;
        metrics::COMMITS.with_label_values(&[stage]).inc();
        if let Some(observe) = &shared.spec.observer {
            for (_, e) in &w.outputs {
                observe(e);
            }
        }
        let _ = offsets.add_partition_offset(
            &shared.spec.input_topic,
            task.partition,
            Offset::Offset(task.meta.input_offset),
        );
    }
    // The group offset only feeds lag dashboards; the store is the truth.
    if let Err(e) = consumer.commit(&offsets, CommitMode::Async) {
        tracing::debug!(stage, error = %e, "group offset commit failed");
    }
    if let Some(e) = fenced {
        // Stop the stage: the orchestrator restarts it, and the restore
        // then starts from the last batch this task did commit.
        return Err(e);
    }
    metrics::BATCH_SECONDS
        .with_label_values(&[stage])
        .observe(started.elapsed().as_secs_f64());
    Ok(())
}

/// Offsets in the task's changelog partition, since its last known end, of
/// records that a failed produce round of this batch wrote without an ack:
/// same epoch, and a key and value the batch wrote (a state change or its
/// commit marker).
fn own_unacked_writes(
    shared: &Shared,
    task: &Task,
    w: &TaskBatch,
    marker_offset: i64,
    acked: &[i64],
) -> Result<Vec<i64>, RuntimeError> {
    let marker = serde_json::to_vec(&Marker::commit(&w.meta))
        .map_err(|e| StoreError::Decode(e.to_string()))?;
    let marker_key = commit_key(w.meta.epoch);
    let records = changelog::read_range(
        &shared.restore_consumer,
        &shared.changelog_topic,
        w.partition,
        task.log_end,
        marker_offset,
    )?;
    Ok(records
        .into_iter()
        .filter(|r| r.epoch == w.meta.epoch && !acked.contains(&r.offset))
        .filter(|r| {
            let ours = if r.key == marker_key {
                Some(&marker)
            } else {
                w.changes.get(&r.key).and_then(Option::as_ref)
            };
            match (&r.value, ours) {
                (Some(v), Some(o)) => v == o,
                (None, None) => w.changes.get(&r.key).is_some_and(Option::is_none),
                _ => false,
            }
        })
        .map(|r| r.offset)
        .collect())
}

/// Write a tick into each owned input partition whose last tick is due.
fn send_ticks(shared: &Shared, every: Duration) -> Result<(), RuntimeError> {
    let producer = shared.producer()?;
    let mut tasks = shared.tasks.lock().map_err(|_| RuntimeError::Poisoned)?;
    for task in tasks.values_mut() {
        if task.last_tick.elapsed() < every {
            continue;
        }
        task.last_tick = Instant::now();
        // Signed with this task's origin and epoch: only the owner's ticks
        // move stream time (see `crate::trust`).
        let headers = trust::tick_headers(&task.origin, task.meta.epoch, now_ms())
            .iter()
            .fold(OwnedHeaders::new_with_capacity(3), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                })
            });
        // Fire and forget: a lost tick is replaced by the next one.
        drop(enqueue(
            &producer,
            FutureRecord::<[u8], [u8]>::to(&shared.spec.input_topic)
                .partition(task.partition)
                .payload(&[])
                .headers(headers),
        )?);
        metrics::TICKS.with_label_values(&[shared.spec.name]).inc();
    }
    Ok(())
}

/// How often an idle task looks for foreign writes in its changelog.
const OWNERSHIP_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Look for other writers in every owned changelog partition (see
/// `ownership`): a newer owner stops the stage, a zombie's writes are
/// repaired.
fn check_ownership(shared: &Shared) -> Result<(), RuntimeError> {
    let mut tasks = shared.tasks.lock().map_err(|_| RuntimeError::Poisoned)?;
    for task in tasks.values_mut() {
        ownership::check_idle(shared, task)?;
    }
    Ok(())
}

fn update_gauges(shared: &Shared, consumer: &BaseConsumer<StageContext>) {
    let stage = shared.spec.name;
    let Ok(tasks) = shared.tasks.lock() else {
        return;
    };
    for task in tasks.values() {
        let p = task.partition.to_string();
        metrics::STATE_BYTES
            .with_label_values(&[stage, &p])
            .set(task.store.approximate_size() as i64);
        if let Ok((_, high)) = consumer.fetch_watermarks(
            &shared.spec.input_topic,
            task.partition,
            Duration::from_secs(1),
        ) {
            let lag = (high - task.meta.input_offset.max(0)).max(0);
            metrics::CONSUMER_LAG
                .with_label_values(&[stage, &p])
                .set(lag);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type Seen = Arc<Mutex<Vec<(Vec<(String, Vec<u8>)>, String)>>>;

    /// An observer that records `(headers, "processed:N" | "dead:reason")`.
    fn recorder() -> (InputObserver, Seen) {
        let seen: Seen = Arc::default();
        let sink = seen.clone();
        let observer: InputObserver = Arc::new(move |headers, outcome| {
            let what = match outcome {
                InputOutcome::Processed(out) => format!("processed:{}", out.len()),
                InputOutcome::DeadLetter { reason, detail } => format!("dead:{reason}:{detail}"),
            };
            if let Ok(mut seen) = sink.lock() {
                seen.push((headers.to_vec(), what));
            }
        });
        (observer, seen)
    }

    fn message() -> OwnedMessage {
        OwnedMessage::new(
            Some(b"payload".to_vec()),
            Some(b"k".to_vec()),
            "t.raw".into(),
            Timestamp::NotAvailable,
            3,
            42,
            None,
        )
    }

    fn emitted(value: &[u8]) -> Emitted {
        Emitted {
            output: "next",
            key: None,
            value: value.to_vec(),
            headers: Vec::new(),
        }
    }

    fn source() -> Vec<(String, Vec<u8>)> {
        vec![("cdp-source".to_string(), b"web".to_vec())]
    }

    #[test]
    fn the_observer_sees_processed_records_with_their_outputs() -> Result<(), RuntimeError> {
        let (observer, seen) = recorder();
        let mut out = vec![emitted(b"a")];
        settle("s", &message(), source(), Ok(()), &mut out, Some(&observer))?;
        let mut none = Vec::new();
        settle(
            "s",
            &message(),
            source(),
            Ok(()),
            &mut none,
            Some(&observer),
        )?;
        assert_eq!(out, vec![emitted(b"a")], "outputs are left alone");
        let seen = seen.lock().map_err(|_| RuntimeError::Poisoned)?;
        assert_eq!(
            *seen,
            vec![
                (source(), "processed:1".to_string()),
                (source(), "processed:0".to_string())
            ]
        );
        Ok(())
    }

    #[test]
    fn a_rejection_becomes_one_dead_letter_and_is_observed() -> Result<(), RuntimeError> {
        let (observer, seen) = recorder();
        let mut out = vec![emitted(b"partial")];
        let rejected = Err(OperatorError::rejected(
            "bad_value",
            serde_json::json!({"why": 1}),
        ));
        settle(
            "s",
            &message(),
            source(),
            rejected,
            &mut out,
            Some(&observer),
        )?;
        assert_eq!(out.len(), 1, "partial outputs are dropped");
        assert_eq!(out[0].output, DEAD_LETTERS);
        assert_eq!(out[0].value, b"payload".to_vec(), "the original bytes");
        let header = |name: &str| {
            out[0]
                .headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header("cdp-source").as_deref(), Some("web"));
        assert_eq!(header(envelope::DLQ_REASON).as_deref(), Some("bad_value"));
        assert_eq!(header("cdp-dlq-input").as_deref(), Some("t.raw[3]@42"));
        let seen = seen.lock().map_err(|_| RuntimeError::Poisoned)?;
        assert_eq!(
            *seen,
            vec![(source(), "dead:bad_value:{\"why\":1}".to_string())]
        );
        Ok(())
    }

    #[test]
    fn delivery_ids_are_the_same_when_a_new_owner_replays_the_same_input() {
        let first = Position {
            epoch: 3,
            offset: 42,
            index: 1,
            lineage: 7,
        };
        let replayed = Position { epoch: 4, ..first };
        assert_eq!(
            delivery_id("deliver:0", &first),
            delivery_id("deliver:0", &replayed)
        );
        assert_eq!(delivery_id("deliver:0", &first), "deliver:0/7/42/1");
        assert_ne!(
            delivery_id("deliver:0", &first),
            delivery_id(
                "deliver:0",
                &Position {
                    lineage: 8,
                    ..first
                }
            ),
            "a reset stage's outputs are new"
        );
        assert_ne!(
            delivery_id("deliver:0", &first),
            delivery_id("deliver:0", &Position { index: 2, ..first })
        );
    }

    #[test]
    fn ticks_and_store_errors_are_not_observed() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let observer: InputObserver = Arc::new(move |_, _| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let mut out = Vec::new();
        // The loop passes no observer for ticks.
        let tick = settle("s", &message(), Vec::new(), Ok(()), &mut out, None);
        assert!(tick.is_ok());
        let failed = settle(
            "s",
            &message(),
            source(),
            Err(OperatorError::Store(StoreError::Decode("x".into()))),
            &mut out,
            Some(&observer),
        );
        assert!(matches!(failed, Err(RuntimeError::Store(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
