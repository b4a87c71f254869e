//! `cdp topics create|check`: what the topics are, next to what the
//! pipeline needs of them. A topic made by another tool (or by a broker's
//! auto-creation) can have too few partitions or the wrong cleanup policy;
//! the stages would then run, and a changelog on `cleanup.policy=delete`
//! would lose state to retention long after.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use cdp_connectors::destinations::DestinationKind;
use cdp_pipeline::kafka::TopicSpec;
use cdp_pipeline::ClientFactory;
use rdkafka::admin::{AdminOptions, ResourceSpecifier};
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::stages::Stage;

/// Every topic `cdp topics create` makes for a config: the pipeline's, and
/// each `kafka` destination's topic (as an event topic of `kafka.partitions`
/// partitions) that is not one of them.
pub fn specs(compiled: &crate::config::Compiled, factory: &ClientFactory) -> Vec<TopicSpec> {
    let mut specs = factory.topic_specs(&Stage::changelogs(factory.config().partitions));
    for d in &compiled.config.destinations {
        if let Some(topic) = d
            .topic
            .as_ref()
            .filter(|_| d.kind == DestinationKind::Kafka)
        {
            if !specs.iter().any(|s| &s.name == topic) {
                specs.push(TopicSpec {
                    name: topic.clone(),
                    partitions: factory.config().partitions,
                    compacted: false,
                });
            }
        }
    }
    specs
}

/// How long a metadata request may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request for the topics' configs may take.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(3);

/// One topic as the broker has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub partitions: usize,
    /// `cleanup.policy` includes `compact`; `None` when the broker did not
    /// say (no DescribeConfigs, or no rights to it).
    pub compacted: Option<bool>,
}

/// Partitions of every topic the broker has, by name, from the metadata of
/// all topics: asking for named topics could make a broker with
/// auto-creation create them.
pub async fn partition_counts(factory: &ClientFactory) -> anyhow::Result<BTreeMap<String, usize>> {
    let consumer: BaseConsumer = factory.plain_consumer("cdp-topics")?;
    let metadata = tokio::task::spawn_blocking(move || consumer.fetch_metadata(None, TIMEOUT))
        .await?
        .context("reading topic metadata")?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len()))
        .collect())
}

/// Every topic of `specs` the broker has, by name, with its settings.
pub async fn describe(
    factory: &ClientFactory,
    specs: &[TopicSpec],
) -> anyhow::Result<BTreeMap<String, Found>> {
    let partitions = partition_counts(factory).await?;
    let names: Vec<&str> = specs
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| partitions.contains_key(*n))
        .collect();
    let policies = cleanup_policies(factory, &names).await;
    Ok(names
        .into_iter()
        .filter_map(|name| {
            let found = Found {
                partitions: *partitions.get(name)?,
                compacted: policies.get(name).map(|p| p.contains("compact")),
            };
            Some((name.to_string(), found))
        })
        .collect())
}

/// `cleanup.policy` of each topic the broker describes; a broker that
/// cannot (or a client without the rights) leaves them out.
async fn cleanup_policies(factory: &ClientFactory, names: &[&str]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(admin) = factory.admin() else {
        return out;
    };
    let resources: Vec<ResourceSpecifier<'_>> =
        names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
    // A broker without DescribeConfigs (librdkafka's mock cluster, which
    // `cdp dev` embeds) never answers: wait briefly, then say "unknown".
    let options = AdminOptions::new().request_timeout(Some(DESCRIBE_TIMEOUT));
    let Ok(results) = admin.describe_configs(&resources, &options).await else {
        return out;
    };
    for (name, result) in names.iter().zip(results) {
        if let Ok(config) = result {
            // A broker that lists only the settings made for a topic
            // (tansu) leaves the default out: Kafka's is `delete`.
            let policy = config
                .get("cleanup.policy")
                .and_then(|e| e.value.clone())
                .unwrap_or_else(|| "delete".to_string());
            out.insert(name.to_string(), policy);
        }
    }
    out
}

/// What is wrong with the topics the broker has, one line each: a
/// stateful stage's changelog with fewer partitions than its input (tasks
/// past them have nowhere to log), `<p>.valid` with other than one, a
/// changelog that is not compacted (its state would expire with
/// retention) or an event topic that is (events of one key would be lost).
/// Missing topics are not problems here.
pub fn problems(
    factory: &ClientFactory,
    specs: &[TopicSpec],
    found: &BTreeMap<String, Found>,
) -> Vec<String> {
    let topics = factory.topics();
    let mut out = Vec::new();
    for spec in specs {
        let Some(have) = found.get(&spec.name) else {
            continue;
        };
        match have.compacted {
            Some(false) if spec.compacted => out.push(format!(
                "{}: not compacted (cleanup.policy must include compact; set it with your Kafka tools)",
                spec.name
            )),
            Some(true) if !spec.compacted => out.push(format!(
                "{}: compacted, so records of one key would be lost (cleanup.policy must be delete)",
                spec.name
            )),
            _ => {}
        }
    }
    if let Some(valid) = found.get(&topics.valid()) {
        if valid.partitions != 1 {
            out.push(format!(
                "{}: {} partitions; identity needs exactly 1 (recreate it)",
                topics.valid(),
                valid.partitions
            ));
        }
    }
    for stage in Stage::ALL {
        let Some(input) = crate::dead_letters::input_topic(stage.name(), &topics) else {
            continue;
        };
        let changelog = topics.changelog(stage.name());
        if let (Some(i), Some(c)) = (found.get(&input), found.get(&changelog)) {
            if c.partitions < i.partitions {
                out.push(format!(
                    "{changelog}: {} partitions for the {} of {input}; the stage's tasks past them have nowhere to keep their state (add partitions to the changelog)",
                    c.partitions, i.partitions
                ));
            }
        }
    }
    out
}

/// One line per topic: its state, partitions and compaction as found.
pub fn render(spec: &TopicSpec, found: Option<&Found>, state: &str) -> String {
    match found {
        None => format!("{state:8} {}", spec.name),
        Some(f) => {
            let compacted = f
                .compacted
                .map_or_else(|| "unknown".to_string(), |c| c.to_string());
            format!(
                "{state:8} {} partitions={} compacted={compacted}",
                spec.name, f.partitions
            )
        }
    }
}

/// What differs from the config but does not stop the pipeline, one line
/// each: `<p>.raw` with another partition count than `kafka.partitions`
/// (the stages follow the topics; changing the setting alone changes
/// nothing, so a `helm upgrade` of it would seem to succeed).
pub fn notes(factory: &ClientFactory, found: &BTreeMap<String, Found>) -> Vec<String> {
    let raw = factory.topics().raw();
    let wanted = factory.config().partitions;
    match found.get(&raw) {
        Some(have) if i32::try_from(have.partitions).ok() != Some(wanted) => vec![format!(
            "{raw} has {} partitions and kafka.partitions says {wanted}: the stages use the topics' own counts; partitions are not added in place (docs/OPERATIONS.md, \"Scaling out\")",
            have.partitions
        )],
        _ => Vec::new(),
    }
}

/// Print each note on stderr.
fn say_notes(notes: &[String]) {
    for note in notes {
        eprintln!("note: {note}");
    }
}

/// Fail with every problem, or say nothing.
pub fn fail_on(problems: &[String]) -> anyhow::Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "{} topic problem(s), the pipeline cannot run on the topics as they are:\n  {}",
        problems.len(),
        problems.join("\n  ")
    )
}

/// `cdp topics create`: make what is missing, print every topic as the
/// broker has it, and fail on what cannot serve the pipeline.
pub async fn create(
    compiled: &crate::config::Compiled,
    factory: &ClientFactory,
) -> anyhow::Result<()> {
    let specs = specs(compiled, factory);
    let created = factory
        .create_topics(&specs)
        .await
        .with_context(|| format!("creating topics on {}", factory.config().brokers))?;
    let found = describe(factory, &specs).await?;
    for s in &specs {
        let state = if created.contains(&s.name) {
            "created"
        } else {
            "exists"
        };
        println!("{}", render(s, found.get(&s.name), state));
    }
    say_notes(&notes(factory, &found));
    fail_on(&problems(factory, &specs, &found))
}

/// `cdp topics check`: as [`create`], creating nothing; a missing topic is
/// a failure.
pub async fn check(
    compiled: &crate::config::Compiled,
    factory: &ClientFactory,
) -> anyhow::Result<()> {
    let specs = specs(compiled, factory);
    let found = describe(factory, &specs).await?;
    let mut missing = Vec::new();
    for s in &specs {
        let state = match found.contains_key(&s.name) {
            true => "exists",
            false => {
                missing.push(s.name.as_str());
                "missing"
            }
        };
        println!("{}", render(s, found.get(&s.name), state));
    }
    say_notes(&notes(factory, &found));
    if !missing.is_empty() {
        anyhow::bail!(
            "{} of {} topics missing: {} (run `cdp topics create`)",
            missing.len(),
            specs.len(),
            missing.join(", ")
        )
    }
    fail_on(&problems(factory, &specs, &found))
}

/// `cdp topics sizes`: one line per topic of the config, its records
/// (the end a fetch finds minus the low watermark, over its partitions).
pub async fn sizes(
    compiled: &crate::config::Compiled,
    factory: &ClientFactory,
) -> anyhow::Result<()> {
    let names: Vec<String> = specs(compiled, factory)
        .into_iter()
        .map(|s| s.name)
        .collect();
    let partitions = partition_counts(factory).await?;
    let factory = factory.clone();
    let lines = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let consumer: BaseConsumer =
            factory.plain_consumer(&format!("{}.topics-sizes", factory.config().topic_prefix))?;
        let mut lines = Vec::new();
        for name in &names {
            let Some(&count) = partitions.get(name) else {
                lines.push(format!("missing  {name}"));
                continue;
            };
            let mut listed = Vec::new();
            for p in 0..count as i32 {
                let (low, high) = consumer
                    .fetch_watermarks(name, p, TIMEOUT)
                    .with_context(|| format!("reading the offsets of {name}[{p}]"))?;
                listed.push((p, low, high));
            }
            let ends = fetched_ends(&factory, name, &listed)?;
            let records: i64 = listed
                .iter()
                .map(|(p, low, high)| (ends.get(p).copied().unwrap_or(*high) - low).max(0))
                .sum();
            lines.push(format!("{name} partitions={count} records={records}"));
        }
        Ok(lines)
    })
    .await??;
    for line in lines {
        println!("{line}");
    }
    Ok(())
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
    let deadline = std::time::Instant::now() + TIMEOUT;
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
