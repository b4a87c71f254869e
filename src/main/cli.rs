//! The command line: every subcommand and its flags (clap).

use std::net::SocketAddr;
use std::path::PathBuf;

use cdp::config::Config;
use cdp_pipeline::ClientFactory;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cdp",
    version,
    about = "Self-hosted real-time customer data platform on Kafka"
)]
pub(crate) struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "CDP_LOG_FORMAT", default_value = "text")]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Every stage in one process on an embedded broker (no Docker).
    Dev {
        /// Config file; without it the built-in demo config runs.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also send sample traffic, a new visitor every 5 s.
        #[arg(long)]
        demo: bool,
        /// Collector address [default: the config's `collector.listen`
        /// when it sets one, else 127.0.0.1:8088].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Address of /metrics, /healthz, /readyz.
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin_listen: SocketAddr,
        /// Keep state here instead of a temporary directory, to look at
        /// after a run. The embedded broker starts empty every time, so the
        /// next `cdp dev` on the same directory starts over.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// The HTTP collector (Segment Tracking API).
    Collect {
        #[command(flatten)]
        conn: Connection,
        #[command(flatten)]
        admin: Admin,
        /// Collector address (overrides collector.listen).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Spec checks, tracking plans, dedupe: raw → valid (+ invalid).
    Validate(Common),
    /// Identity resolution: valid → identified.
    Identity(Common),
    /// Computed and profile traits: identified → traits.
    Traits(Common),
    /// Audience membership: traits → audiences.
    Audiences(Common),
    /// Destinations: audiences → webhooks, topics, stdout.
    Deliver(Common),
    /// Dead letters (`<prefix>.invalid`): list them, replay them.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLettersCommand,
    },
    /// Profiles as the stages keep them.
    Profiles {
        #[command(subcommand)]
        command: ProfilesCommand,
    },
    /// Destinations: send one its audiences' current members.
    Destinations {
        #[command(subcommand)]
        command: DestinationsCommand,
    },
    /// Topic administration.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Send a realistic synthetic workload (benchmarks, sizing).
    Loadgen(LoadgenArgs),
    /// A bare consume→produce hop: the transport limit for benchmarks.
    Passthrough {
        #[command(flatten)]
        common: Connection,
        /// Input topic (full name).
        #[arg(long)]
        from: String,
        /// Output topic (full name).
        #[arg(long)]
        to: String,
        /// Stop after forwarding this many records.
        #[arg(long)]
        expect: u64,
        /// Or after this long without records, once records flowed.
        #[arg(long, default_value = "10s")]
        idle: cdp_pipeline::Span,
    },
    /// librdkafka's in-memory mock broker alone, with every topic of each
    /// prefix: for benchmarks and for running stages as separate processes
    /// on a laptop (no compaction, nothing kept across restarts: not for
    /// production). Prints its bootstrap address as the first line on
    /// stdout; runs until SIGTERM or Ctrl-C.
    MockBroker {
        /// Make every topic `cdp topics create` makes for this topic prefix
        /// (repeatable).
        #[arg(long = "prefix", required = true)]
        prefixes: Vec<String>,
        /// Partitions of each topic (`kafka.partitions`; `<prefix>.valid`
        /// has one, as always).
        #[arg(long, default_value_t = 8)]
        partitions: i32,
    },
    /// Every event's record timestamps on some topics, one JSON line each:
    /// the benchmark's hop-by-hop latency (see `scripts/bench.py`).
    Stamps {
        #[command(flatten)]
        common: Connection,
        /// Topic to read (full name; repeatable).
        #[arg(long = "topic", required = true)]
        topics: Vec<String>,
        /// Skip records stamped before this (ms since the epoch).
        #[arg(long, default_value_t = 0)]
        since_ms: i64,
    },
    /// Config file tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
pub(crate) enum ProfilesCommand {
    /// Each profile's trait values as the traits stage last sent them
    /// downstream (from its changelog), one JSON line per profile.
    Traits {
        #[command(flatten)]
        common: Connection,
        /// Only this profile (`prof_…`).
        #[arg(long)]
        profile: Option<String>,
    },
    /// The audiences each profile is in now (from the audiences stage's
    /// changelog), one JSON line per membership: the `entered` change
    /// `cdp destinations sync` would send.
    Audiences {
        #[command(flatten)]
        common: Connection,
        /// Only this profile (`prof_…`).
        #[arg(long)]
        profile: Option<String>,
        /// Only this audience.
        #[arg(long)]
        audience: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum DestinationsCommand {
    /// Send a destination an `entered` for every current member of the
    /// audiences it takes (from the audiences stage's changelog), as
    /// Segment Engage syncs a destination connected later; then print a
    /// JSON line of counts. Exits non-zero when a change was not delivered.
    Sync {
        #[command(flatten)]
        common: Connection,
        /// The destination's `id`.
        #[arg(long)]
        destination: String,
        /// Only this audience.
        #[arg(long)]
        audience: Option<String>,
        /// Count the members, send nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum TopicsCommand {
    /// Create every topic with its partitions and compaction settings.
    Create(Connection),
    /// Check that every topic exists (with the config's credentials);
    /// exits non-zero naming the missing ones. Creates nothing.
    Check(Connection),
    /// Records in every topic (high minus low watermark, summed over its
    /// partitions): what each stage and its changelog wrote. Creates
    /// nothing; a missing topic is named as such.
    Sizes(Connection),
}

#[derive(Subcommand)]
pub(crate) enum DeadLettersCommand {
    /// One line per dead letter (id `partition@offset`, stage, reason,
    /// whether replayed, detail), then counts by stage and reason.
    List {
        #[command(flatten)]
        common: Connection,
        #[command(flatten)]
        selection: SelectionArgs,
        /// One JSON object per dead letter, its detail whole, and no
        /// counts.
        #[arg(long)]
        json: bool,
    },
    /// Put the selected dead letters back into their stage's input, without
    /// the stale `cdp-*` headers, each once (see docs/OPERATIONS.md).
    Replay {
        #[command(flatten)]
        common: Connection,
        #[command(flatten)]
        selection: SelectionArgs,
        /// Print what would be replayed, replay nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args)]
pub(crate) struct SelectionArgs {
    /// Only dead letters of this stage (validate, identity, traits,
    /// audiences, deliver).
    #[arg(long)]
    pub(crate) stage: Option<String>,
    /// Only dead letters with this reason (e.g. plan_violation).
    #[arg(long)]
    pub(crate) reason: Option<String>,
    /// Only these dead letters, by id `partition@offset` (repeatable).
    #[arg(long = "id")]
    pub(crate) ids: Vec<String>,
}

impl SelectionArgs {
    pub(crate) fn selection(&self) -> cdp::dead_letters::Selection {
        cdp::dead_letters::Selection {
            stage: self.stage.clone(),
            reason: self.reason.clone(),
            ids: self.ids.clone(),
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum ConfigCommand {
    /// Check a config file; exits non-zero and names the bad field.
    Check {
        /// The config file (or `--config`, as the other commands take it).
        #[arg(required_unless_present = "config")]
        file: Option<PathBuf>,
        #[arg(
            long,
            env = "CDP_CONFIG",
            conflicts_with = "file",
            hide_env_values = true
        )]
        config: Option<PathBuf>,
    },
    /// Print the JSON Schema of the config file (for editor completion).
    Schema,
}

#[derive(Args)]
pub(crate) struct LoadgenArgs {
    #[command(flatten)]
    pub(crate) common: Connection,
    /// `raw` (produce to `<p>.raw`) or the collector's base URL
    /// (`http://127.0.0.1:8088`, batches to `/v1/batch`).
    #[arg(long, default_value = "raw")]
    pub(crate) to: String,
    /// Source id (`sources[].id`); its write key authenticates over HTTP.
    /// Defaults to the config's first source.
    #[arg(long)]
    pub(crate) source: Option<String>,
    /// Seed: one seed, one exact stream of events.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Distinct people; the run ends when all are done.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) people: u64,
    /// People active at once (their events interleave).
    #[arg(long, default_value_t = 1000)]
    pub(crate) concurrent: usize,
    /// Stop after this many events.
    #[arg(long)]
    pub(crate) events: Option<u64>,
    /// Stop after this long (`30s`, `5m`).
    #[arg(long)]
    pub(crate) duration: Option<cdp_pipeline::Span>,
    /// Events per second; 0 sends as fast as the receiver takes them.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) rate: f64,
    /// Events per HTTP batch.
    #[arg(long, default_value_t = 100)]
    pub(crate) batch: usize,
    /// HTTP batches in flight.
    #[arg(long, default_value_t = 4)]
    pub(crate) concurrency: usize,
    /// Print the summary as one JSON line on stdout too.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Where the config and the brokers are: what every command that talks
/// to Kafka takes.
#[derive(Args)]
pub(crate) struct Connection {
    /// The config file.
    #[arg(long, env = "CDP_CONFIG")]
    pub(crate) config: PathBuf,
    /// Bootstrap servers (overrides kafka.brokers).
    #[arg(long, env = "CDP_BROKERS")]
    pub(crate) brokers: Option<String>,
}

impl Connection {
    pub(crate) fn load(&self) -> anyhow::Result<cdp::config::Compiled> {
        self.load_with(None)
    }

    /// The compiled config and a client factory for its brokers.
    pub(crate) fn open(&self) -> anyhow::Result<(cdp::config::Compiled, ClientFactory)> {
        opened(self.load()?)
    }

    pub(crate) fn load_with(
        &self,
        state_dir: Option<&str>,
    ) -> anyhow::Result<cdp::config::Compiled> {
        let mut config = Config::load(&self.config)?;
        if let Some(b) = &self.brokers {
            config.kafka.brokers = b.clone();
        }
        if let Some(d) = state_dir {
            config.kafka.state_dir = d.to_string();
        }
        Ok(config.compile()?)
    }
}

/// What a long-running service adds: its admin endpoint.
#[derive(Args)]
pub(crate) struct Admin {
    /// Address of /metrics, /healthz, /readyz.
    #[arg(long, env = "CDP_ADMIN_LISTEN", default_value = "0.0.0.0:9464")]
    pub(crate) admin_listen: SocketAddr,
}

/// A stage's flags: a service with local state and a group membership.
#[derive(Args)]
pub(crate) struct Common {
    #[command(flatten)]
    pub(crate) conn: Connection,
    #[command(flatten)]
    pub(crate) admin: Admin,
    /// State directory (overrides kafka.state_dir).
    #[arg(long, env = "CDP_STATE_DIR")]
    pub(crate) state_dir: Option<String>,
    /// Static group membership id; defaults to $POD_NAME when set.
    #[arg(long, env = "CDP_INSTANCE_ID")]
    pub(crate) instance_id: Option<String>,
}

impl Common {
    /// [`Connection::open`] with the stage's state directory.
    pub(crate) fn open(&self) -> anyhow::Result<(cdp::config::Compiled, ClientFactory)> {
        opened(self.conn.load_with(self.state_dir.as_deref())?)
    }

    pub(crate) fn instance_id(&self) -> Option<String> {
        self.instance_id
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
    }
}

fn opened(
    compiled: cdp::config::Compiled,
) -> anyhow::Result<(cdp::config::Compiled, ClientFactory)> {
    let factory = ClientFactory::new(compiled.config.kafka.clone())?;
    Ok((compiled, factory))
}
