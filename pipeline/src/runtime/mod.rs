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
//! batch was committed before the poll that revoked it. The group's offsets
//! are committed once a second (and at a revoke or stop): they only feed
//! lag tools, the store is the truth.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;

mod acks;
mod batch;
mod gauges;
mod group_offsets;
mod ownership;
mod produce;
mod rebalance;
mod settle;
mod stage;
mod ticks;

pub use stage::StageRuntime;

use acks::{AckContext, AckedProducer};

use crate::changelog::RestoreError;
use crate::envelope::HeaderRef;
use crate::kafka::{ClientError, ClientFactory, Guarantee};
use crate::metrics;
use crate::operator::{Emitted, Operator, OperatorFactory};
use crate::retry;
use crate::service::{ReadyFlag, Shutdown};
use crate::sink::Sink;
use crate::store::{StoreError, TaskMeta, TaskStore};

/// The output name every stage has: the dead-letter topic.
pub const DEAD_LETTERS: &str = "dead_letters";

/// Where a named output goes.
#[derive(Clone)]
pub enum OutputTarget {
    /// A topic others may read: each record carries its origin and
    /// position in the four headers (`cdp-origin`, `cdp-epoch`, `cdp-pos`,
    /// `cdp-lineage`) that consumers dedupe by.
    Topic(String),
    /// A topic only cdp stages read, of events as JSON (`<p>.valid`, which
    /// tools may still read as JSON): the position in one header
    /// ([`envelope::AT`](crate::envelope::AT)), which costs a quarter of
    /// the four to write and to read.
    Internal(String),
    /// A topic only cdp stages read, of cdp's own binary records: each
    /// record is framed, its origin, position and own headers inside its
    /// value and no Kafka headers at all
    /// ([`envelope::frame`](crate::envelope::frame)).
    Framed(String),
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
pub type InputObserver = Arc<dyn Fn(&[HeaderRef<'_>], &InputOutcome<'_>) + Send + Sync>;

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
    /// Set when every timer of the stage follows from its state: timers
    /// are then kept locally only, not in the changelog, and a restore
    /// derives them (see [`TimersFromState`](crate::TimersFromState)).
    pub timers_from_state: Option<crate::TimersFromState>,
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
    /// A state record over `kafka.max_record_bytes`: operators keep their
    /// state bounded well below it, so this is a bug or a tiny limit.
    #[error("{stage}[{partition}]: state record {key} is {bytes} bytes, over kafka.max_record_bytes ({limit}); not produced")]
    StateTooLarge {
        stage: &'static str,
        partition: i32,
        key: String,
        bytes: usize,
        limit: usize,
    },
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
    /// Rebuilt when it cannot recover by itself (see [`produce::produce_acked`]).
    producer: RwLock<AckedProducer>,
    restore_consumer: BaseConsumer,
    changelog_topic: String,
    dead_letter_topic: String,
    state_dir: PathBuf,
    guarantee: Guarantee,
    /// `kafka.max_record_bytes`: checked before anything is produced.
    max_record_bytes: usize,
    tasks: Mutex<BTreeMap<i32, Task>>,
    /// Committed input offsets not yet committed to the group.
    group_offsets: Mutex<group_offsets::GroupOffsets>,
    failure: Mutex<Option<RuntimeError>>,
    ready: ReadyFlag,
    /// Since when the stage has had no assignment (see
    /// [`rebalance::GroupWatch`]).
    group_watch: Mutex<rebalance::GroupWatch>,
    /// The last idle check found the broker not answering.
    broker_away: std::sync::atomic::AtomicBool,
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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Shared {
    /// The idle check's word on the broker: not ready while it does not
    /// answer; ready again once it does, if the stage holds an assignment.
    fn broker_answers(&self, answered: bool) {
        use std::sync::atomic::Ordering;
        let was_away = self.broker_away.swap(!answered, Ordering::SeqCst);
        if !answered {
            self.ready.set(false);
        } else if was_away {
            tracing::info!(
                stage = self.spec.name,
                "broker answers the idle check again"
            );
            let assigned = self.group_watch.lock().is_ok_and(|w| w.is_assigned());
            self.ready.set(assigned);
        }
    }

    fn producer(&self) -> Result<AckedProducer, RuntimeError> {
        self.producer
            .read()
            .map(|p| p.clone())
            .map_err(|_| RuntimeError::Poisoned)
    }

    /// Replace the producer with a new one: a client whose idempotence
    /// state no longer matches the broker's (seen after a broker restart
    /// lost it) never recovers by itself.
    fn rebuild_producer(&self, why: &str) -> Result<(), RuntimeError> {
        let fresh = self.factory.producer_with_context(AckContext::default())?;
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
