//! `cdp topics create|check`: what the topics are, next to what the
//! pipeline needs of them. A topic made by another tool (or by a broker's
//! auto-creation) can have too few partitions or the wrong cleanup policy;
//! the stages would then run, and a changelog on `cleanup.policy=delete`
//! would lose state to retention long after.

use std::collections::BTreeMap;
use std::time::Duration;

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

/// Every topic of `specs` the broker has, by name, with its settings.
pub async fn describe(
    factory: &ClientFactory,
    specs: &[TopicSpec],
) -> anyhow::Result<BTreeMap<String, Found>> {
    let consumer: BaseConsumer = factory.plain_consumer("cdp-topics")?;
    // Every topic's metadata: asking for named topics could make a broker
    // with auto-creation create them.
    let metadata =
        tokio::task::spawn_blocking(move || consumer.fetch_metadata(None, TIMEOUT)).await??;
    let partitions: BTreeMap<String, usize> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len()))
        .collect();
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
