//! `cdp`: one binary, one subcommand per stage, plus `dev`, `topics` and
//! `config`. See README.md for the full reference.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use cdp::config::Config;
use cdp::dev::{Dev, DevOptions};
use cdp::notice::say;
use cdp::stages::{self, Stage};
use cdp_connectors::collector::Collector;
use cdp_pipeline::{ClientFactory, Health, Shutdown};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cdp",
    version,
    about = "Self-hosted real-time customer data platform on Kafka"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "CDP_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
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
enum TopicsCommand {
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
enum DeadLettersCommand {
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
struct SelectionArgs {
    /// Only dead letters of this stage (validate, identity, traits,
    /// audiences, deliver).
    #[arg(long)]
    stage: Option<String>,
    /// Only dead letters with this reason (e.g. plan_violation).
    #[arg(long)]
    reason: Option<String>,
    /// Only these dead letters, by id `partition@offset` (repeatable).
    #[arg(long = "id")]
    ids: Vec<String>,
}

impl SelectionArgs {
    fn selection(&self) -> cdp::dead_letters::Selection {
        cdp::dead_letters::Selection {
            stage: self.stage.clone(),
            reason: self.reason.clone(),
            ids: self.ids.clone(),
        }
    }
}

#[derive(Subcommand)]
enum ConfigCommand {
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
struct LoadgenArgs {
    #[command(flatten)]
    common: Connection,
    /// `raw` (produce to `<p>.raw`) or the collector's base URL
    /// (`http://127.0.0.1:8088`, batches to `/v1/batch`).
    #[arg(long, default_value = "raw")]
    to: String,
    /// Source id (`sources[].id`); its write key authenticates over HTTP.
    /// Defaults to the config's first source.
    #[arg(long)]
    source: Option<String>,
    /// Seed: one seed, one exact stream of events.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Distinct people; the run ends when all are done.
    #[arg(long, default_value_t = 10_000)]
    people: u64,
    /// People active at once (their events interleave).
    #[arg(long, default_value_t = 1000)]
    concurrent: usize,
    /// Stop after this many events.
    #[arg(long)]
    events: Option<u64>,
    /// Stop after this long (`30s`, `5m`).
    #[arg(long)]
    duration: Option<cdp_pipeline::Span>,
    /// Events per second; 0 sends as fast as the receiver takes them.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Events per HTTP batch.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// HTTP batches in flight.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Print the summary as one JSON line on stdout too.
    #[arg(long)]
    json: bool,
}

/// Where the config and the brokers are: what every command that talks
/// to Kafka takes.
#[derive(Args)]
struct Connection {
    /// The config file.
    #[arg(long, env = "CDP_CONFIG")]
    config: PathBuf,
    /// Bootstrap servers (overrides kafka.brokers).
    #[arg(long, env = "CDP_BROKERS")]
    brokers: Option<String>,
}

impl Connection {
    fn load(&self) -> anyhow::Result<cdp::config::Compiled> {
        self.load_with(None)
    }

    fn load_with(&self, state_dir: Option<&str>) -> anyhow::Result<cdp::config::Compiled> {
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
struct Admin {
    /// Address of /metrics, /healthz, /readyz.
    #[arg(long, env = "CDP_ADMIN_LISTEN", default_value = "0.0.0.0:9464")]
    admin_listen: SocketAddr,
}

/// A stage's flags: a service with local state and a group membership.
#[derive(Args)]
struct Common {
    #[command(flatten)]
    conn: Connection,
    #[command(flatten)]
    admin: Admin,
    /// State directory (overrides kafka.state_dir).
    #[arg(long, env = "CDP_STATE_DIR")]
    state_dir: Option<String>,
    /// Static group membership id; defaults to $POD_NAME when set.
    #[arg(long, env = "CDP_INSTANCE_ID")]
    instance_id: Option<String>,
}

impl Common {
    fn load(&self) -> anyhow::Result<cdp::config::Compiled> {
        self.conn.load_with(self.state_dir.as_deref())
    }

    fn instance_id(&self) -> Option<String> {
        self.instance_id
            .clone()
            .or_else(|| std::env::var("POD_NAME").ok())
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CDP_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rdkafka=warn,librdkafka=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => {
            builder.json().init();
            cdp::notice::logs_are_json(true);
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cdp::notice::fail(&e);
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Dev {
            config,
            demo,
            listen,
            admin_listen,
            state_dir,
        } => {
            let listen = dev_listen(listen, config.as_deref())?;
            let keys = match &config {
                None => "write key wk_web_123 in the demo config".to_string(),
                Some(path) => format!(
                    "write keys: {}",
                    Config::load(path)?
                        .sources
                        .iter()
                        .map(|s| format!("{} ({})", s.write_key, s.id))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            let dev = Dev::start(DevOptions {
                config,
                listen,
                admin: Some(admin_listen),
                state_dir,
                stdout: true,
                brokers: None,
            })
            .await?;
            dev.shutdown.trigger_on_signals();
            say(&format!(
                "cdp dev: embedded Kafka broker at {}",
                dev.bootstrap
            ));
            say(&format!(
                "cdp dev: collector at http://{} ({keys})",
                dev.collector
            ));
            say(&format!("cdp dev: metrics at http://{admin_listen}/metrics; audience changes print below as JSON lines"));
            if demo {
                tokio::spawn(cdp::demo::run(dev.collector, dev.shutdown.clone()));
            }
            dev.shutdown.wait().await;
            dev.stop().await
        }
        Command::Collect {
            conn,
            admin,
            listen,
        } => {
            let mut compiled = conn.load()?;
            if let Some(l) = listen {
                compiled.config.collector.listen = l;
            }
            let factory = ClientFactory::new(compiled.config.kafka.clone())?;
            let (shutdown, health) = service(&admin.admin_listen).await?;
            let collector = Collector::new(
                compiled.config.collector.clone(),
                &compiled.config.sources,
                &factory,
                factory.topics().raw(),
            )?;
            collector
                .serve(shutdown, health.register("collect"))
                .await?;
            Ok(())
        }
        Command::Validate(c) => run_stage(Stage::Validate, c).await,
        Command::Identity(c) => run_stage(Stage::Identity, c).await,
        Command::Traits(c) => run_stage(Stage::Traits, c).await,
        Command::Audiences(c) => run_stage(Stage::Audiences, c).await,
        Command::Deliver(c) => run_stage(Stage::Deliver, c).await,
        Command::DeadLetters {
            command:
                DeadLettersCommand::List {
                    common,
                    selection,
                    json,
                },
        } => {
            let compiled = common.load()?;
            let factory = ClientFactory::new(compiled.config.kafka.clone())?;
            let selection = selection.selection();
            let text = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
                let letters = cdp::dead_letters::read(&factory)?;
                let selected: Vec<_> = selection.select(&letters)?.into_iter().cloned().collect();
                let replayed = cdp::dead_letters::replayed(&factory)?;
                Ok(match json {
                    true => cdp::dead_letters::render_json(&selected, &replayed),
                    false => cdp::dead_letters::render_list(&selected, &replayed),
                })
            })
            .await??;
            print!("{text}");
            Ok(())
        }
        Command::DeadLetters {
            command:
                DeadLettersCommand::Replay {
                    common,
                    selection,
                    dry_run,
                },
        } => {
            let selection = selection.selection();
            if selection.stage.is_none() && selection.ids.is_empty() {
                anyhow::bail!("name the dead letters to replay: --stage and/or --id");
            }
            let compiled = common.load()?;
            let factory = ClientFactory::new(compiled.config.kafka.clone())?;
            let report = cdp::dead_letters::replay(&factory, &selection, dry_run).await?;
            let verb = if dry_run { "would replay" } else { "replayed" };
            println!(
                "{verb} {}: {}",
                report.replayed.len(),
                report.replayed.join(" ")
            );
            println!(
                "already replayed {}: {}",
                report.already_replayed.len(),
                report.already_replayed.join(" ")
            );
            Ok(())
        }
        Command::Topics {
            command: TopicsCommand::Create(c),
        } => {
            let compiled = c.load()?;
            let factory = ClientFactory::new(compiled.config.kafka.clone())?;
            let specs = cdp::topics::specs(&compiled, &factory);
            let created = factory
                .create_topics(&specs)
                .await
                .with_context(|| format!("creating topics on {}", factory.config().brokers))?;
            let found = cdp::topics::describe(&factory, &specs).await?;
            for s in &specs {
                let state = if created.contains(&s.name) {
                    "created"
                } else {
                    "exists"
                };
                println!("{}", cdp::topics::render(s, found.get(&s.name), state));
            }
            cdp::topics::fail_on(&cdp::topics::problems(&factory, &specs, &found))
        }
        Command::Topics {
            command: TopicsCommand::Check(c),
        } => {
            let compiled = c.load()?;
            let factory = ClientFactory::new(compiled.config.kafka.clone())?;
            let specs = cdp::topics::specs(&compiled, &factory);
            let found = cdp::topics::describe(&factory, &specs).await?;
            let mut missing = Vec::new();
            for s in &specs {
                let state = match found.contains_key(&s.name) {
                    true => "exists",
                    false => {
                        missing.push(s.name.as_str());
                        "missing"
                    }
                };
                println!("{}", cdp::topics::render(s, found.get(&s.name), state));
            }
            if !missing.is_empty() {
                anyhow::bail!(
                    "{} of {} topics missing: {} (run `cdp topics create`)",
                    missing.len(),
                    specs.len(),
                    missing.join(", ")
                )
            }
            cdp::topics::fail_on(&cdp::topics::problems(&factory, &specs, &found))
        }
        Command::Topics {
            command: TopicsCommand::Sizes(c),
        } => topic_sizes(&c).await,
        Command::Loadgen(args) => loadgen(args).await,
        Command::MockBroker {
            prefixes,
            partitions,
        } => {
            let broker = cdp::dev::MockBroker::start(&prefixes, partitions)?;
            println!("{}", broker.bootstrap);
            say(&format!(
                "cdp mock-broker: at {} with the topics of {}",
                broker.bootstrap,
                prefixes.join(", ")
            ));
            let shutdown = Shutdown::default();
            shutdown.trigger_on_signals();
            shutdown.wait().await;
            Ok(())
        }
        Command::Passthrough {
            common,
            from,
            to,
            expect,
            idle,
        } => {
            let compiled = common.load()?;
            let factory = ClientFactory::new(compiled.config.kafka.clone())?;
            let opts = cdp::passthrough::HopOptions {
                from,
                to,
                expect,
                idle: idle.to_std(),
            };
            let report =
                tokio::task::spawn_blocking(move || cdp::passthrough::run_hop(&factory, &opts))
                    .await??;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Stamps {
            common,
            topics,
            since_ms,
        } => {
            let compiled = common.load()?;
            let factory = ClientFactory::new(compiled.config.kafka.clone())?;
            let opts = cdp::stamps::StampOptions {
                topics,
                since_ms,
                patience: std::time::Duration::from_secs(30),
            };
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                cdp::stamps::run(&factory, &opts, &mut out)?;
                std::io::Write::flush(&mut out)?;
                Ok(())
            })
            .await??;
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { file, config },
        } => {
            let file = file.or(config).context("name the config file")?;
            let compiled = Config::load(&file)?.compile()?;
            let c = &compiled.config;
            println!(
                "{}: ok ({} sources, {} tracking plans, {} traits, {} audiences, {} destinations)",
                file.display(),
                c.sources.len(),
                c.tracking_plans.len(),
                c.traits.len(),
                c.audiences.len(),
                c.destinations.len()
            );
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Schema,
        } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&cdp::config::config_schema())?
            );
            Ok(())
        }
    }
}

async fn loadgen(args: LoadgenArgs) -> anyhow::Result<()> {
    use cdp::loadgen::{self, workload::WorkloadSpec, LoadgenOptions, Target};
    let compiled = args.common.load()?;
    let sources = &compiled.config.sources;
    let source = match &args.source {
        Some(id) => sources.iter().find(|s| &s.id == id),
        None => sources.first(),
    }
    .context("no such source in the config (sources[].id)")?;
    let target = if args.to == "raw" {
        Target::Raw {
            factory: ClientFactory::new(compiled.config.kafka.clone())?,
            source: source.id.clone(),
        }
    } else if args.to.starts_with("http://") || args.to.starts_with("https://") {
        Target::Http {
            url: args.to.clone(),
            write_key: source.write_key.clone(),
        }
    } else {
        anyhow::bail!(
            "--to: expected `raw` or a collector URL (http://host:port), got {:?}",
            args.to
        );
    };
    let summary = loadgen::run(LoadgenOptions {
        workload: WorkloadSpec {
            seed: args.seed,
            people: args.people,
            concurrent: args.concurrent,
        },
        events: args.events,
        duration: args.duration.map(|d| d.to_std()),
        rate: (args.rate > 0.0).then_some(args.rate),
        target,
        batch: args.batch,
        concurrency: args.concurrency,
    })
    .await?;
    eprint!("{summary}");
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    if summary.failed > 0 {
        anyhow::bail!("{} events failed", summary.failed);
    }
    Ok(())
}

/// Where `cdp dev`'s collector listens: `--listen`, else the config's
/// `collector.listen` if it sets one, else loopback (a laptop's collector
/// is not for the network unless asked).
fn dev_listen(
    flag: Option<SocketAddr>,
    config: Option<&std::path::Path>,
) -> anyhow::Result<SocketAddr> {
    if let Some(addr) = flag {
        return Ok(addr);
    }
    let default = cdp_connectors::collector::CollectorConfig::default().listen;
    let configured = match config {
        Some(path) => Some(Config::load(path)?.collector.listen),
        None => None,
    };
    Ok(configured
        .filter(|l| *l != default)
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8088))))
}

/// Shutdown on signals and the admin endpoint, for a single-stage process.
/// The address is bound first: a taken port fails the command before it
/// joins a consumer group or opens a store.
async fn service(admin: &SocketAddr) -> anyhow::Result<(Shutdown, Health)> {
    let listener = tokio::net::TcpListener::bind(admin)
        .await
        .with_context(|| format!("--admin-listen {admin}"))?;
    let shutdown = Shutdown::default();
    shutdown.trigger_on_signals();
    let health = Health::default();
    let (h, s) = (health.clone(), shutdown.clone());
    tokio::spawn(async move {
        if let Err(e) = cdp_pipeline::service::serve_admin_on(listener, h, s.clone()).await {
            tracing::error!(error = %e, "admin endpoint failed");
            s.trigger();
        }
    });
    Ok((shutdown, health))
}

async fn run_stage(stage: Stage, common: Common) -> anyhow::Result<()> {
    let compiled = common.load()?;
    let factory = ClientFactory::new(compiled.config.kafka.clone())?;
    let (shutdown, health) = service(&common.admin.admin_listen).await?;
    let joins = stages::start_stages(
        &[stage],
        &compiled,
        &factory,
        common.instance_id(),
        &health,
        &shutdown,
    )?;
    stages::join_stages(joins).await
}

/// How long a metadata or offsets request to the brokers may take.
const METADATA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Every topic's metadata: asking for named topics could make a broker
/// with auto-creation create them. Blocking.
fn all_topics<C: rdkafka::consumer::Consumer>(
    consumer: &C,
) -> anyhow::Result<rdkafka::metadata::Metadata> {
    consumer
        .fetch_metadata(None, METADATA_TIMEOUT)
        .context("reading topic metadata")
}

/// The end of each non-empty partition as a fetch finds it: the offset
/// after the last record, read from the listed end's last record on. A
/// broker's listed end can be short of it (tansu 0.6 lists the newest
/// batch's base offset + 1, see README), and a count from it would miss
/// the rest of that batch. Blocking.
fn fetched_ends(
    factory: &ClientFactory,
    topic: &str,
    listed: &[(i32, i64, i64)],
) -> anyhow::Result<std::collections::BTreeMap<i32, i64>> {
    use rdkafka::consumer::Consumer;
    use rdkafka::error::KafkaError;
    use rdkafka::Message;
    let mut ends = std::collections::BTreeMap::new();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for &(p, low, high) in listed.iter().filter(|(_, low, high)| high > low) {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Offset((high - 1).max(low)))?;
        ends.insert(p, high);
    }
    if ends.is_empty() {
        return Ok(ends);
    }
    let reader = factory.reader("cdp-topics-sizes")?;
    reader.assign(&tpl)?;
    let mut reading: std::collections::BTreeSet<i32> = ends.keys().copied().collect();
    let deadline = std::time::Instant::now() + METADATA_TIMEOUT;
    while !reading.is_empty() && std::time::Instant::now() < deadline {
        match reader.poll(std::time::Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                reading.remove(&p);
            }
            Some(Err(e)) => return Err(e).context(format!("reading the end of {topic}")),
            Some(Ok(m)) => {
                let end = ends.entry(m.partition()).or_default();
                *end = (*end).max(m.offset() + 1);
            }
        }
    }
    Ok(ends)
}

/// `cdp topics sizes`: one line per topic of the config, its records
/// (high minus low watermark over its partitions).
async fn topic_sizes(c: &Connection) -> anyhow::Result<()> {
    let compiled = c.load()?;
    let factory = ClientFactory::new(compiled.config.kafka.clone())?;
    let specs = cdp::topics::specs(&compiled, &factory);
    let consumer = factory.plain_consumer("cdp-topics-sizes")?;
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let lines = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        use rdkafka::consumer::Consumer;
        let metadata = all_topics(&consumer)?;
        let mut lines = Vec::new();
        for name in &names {
            let Some(topic) = metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none())
            else {
                lines.push(format!("missing  {name}"));
                continue;
            };
            let mut listed = Vec::new();
            for p in topic.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(name, p.id(), METADATA_TIMEOUT)
                    .with_context(|| format!("reading the offsets of {name}[{}]", p.id()))?;
                listed.push((p.id(), low, high));
            }
            let ends = fetched_ends(&factory, name, &listed)?;
            let records: i64 = listed
                .iter()
                .map(|(p, low, high)| (ends.get(p).copied().unwrap_or(*high) - low).max(0))
                .sum();
            lines.push(format!(
                "{name} partitions={} records={records}",
                topic.partitions().len()
            ));
        }
        Ok(lines)
    })
    .await??;
    for line in lines {
        println!("{line}");
    }
    Ok(())
}
