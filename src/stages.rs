//! The six stages of the chain and how each is wired to its topics.
//!
//! ```text
//! collect ─► raw ─► validate ─► valid ─► identity ─► identified ─► traits ─► traits ─► audiences ─► audiences ─► deliver
//! ```
//! Every stage but `collect` runs on the pipeline runtime; `traits` and
//! `audiences` also write into their own input topic (merge transfers and
//! redirects), and the stages that keep windows get ticks.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;
use cdp_connectors::avro::operator::EncodeOutput;
use cdp_connectors::avro::{avro_codec, Format};
use cdp_connectors::deliver::DeliverOperator;
use cdp_connectors::destinations::build_sink;
use cdp_operators::audiences::AudiencesOperator;
use cdp_operators::identity::IdentityOperator;
use cdp_operators::messages::{
    outputs, wire, AudienceAction, ProfileRecordKind, ProfileRecordSummary,
};
use cdp_operators::traits::TraitsOperator;
use cdp_operators::validate::ValidateOperator;
use cdp_pipeline::envelope::SOURCE;
use cdp_pipeline::runtime::{InputObserver, InputOutcome, RuntimeError};
use cdp_pipeline::{
    metrics, ClientFactory, Health, OutputTarget, Shutdown, StageRuntime, StageSpec,
    TimersFromState,
};

use crate::config::Compiled;

/// A stage that runs on the pipeline runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Stage {
    Validate,
    Identity,
    Traits,
    Audiences,
    Deliver,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Validate,
        Stage::Identity,
        Stage::Traits,
        Stage::Audiences,
        Stage::Deliver,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stage::Validate => "validate",
            Stage::Identity => "identity",
            Stage::Traits => "traits",
            Stage::Audiences => "audiences",
            Stage::Deliver => "deliver",
        }
    }

    /// Partitions of the stage's input topic when the pipeline has
    /// `partitions`: identity reads the serial `<p>.valid`.
    pub const fn input_partitions(self, partitions: i32) -> i32 {
        match self {
            Stage::Identity => cdp_pipeline::kafka::SERIAL_PARTITIONS,
            _ => partitions,
        }
    }

    /// Every stage with a state store (all of them: even deliver keeps the
    /// dedupe positions of its input), with its changelog's partitions.
    pub fn changelogs(partitions: i32) -> Vec<(&'static str, i32)> {
        Self::ALL
            .iter()
            .map(|s| (s.name(), s.input_partitions(partitions)))
            .collect()
    }

    /// Build the stage's spec: input, outputs, operator.
    pub fn spec(self, compiled: &Compiled, factory: &ClientFactory) -> anyhow::Result<StageSpec> {
        let t = factory.topics();
        let mut outs: BTreeMap<&'static str, OutputTarget> = BTreeMap::new();
        let (input, ticks, operator): (String, bool, cdp_pipeline::OperatorFactory) = match self {
            Stage::Validate => {
                outs.insert(outputs::NEXT, OutputTarget::Internal(t.valid()));
                let v = compiled.validator.clone();
                (
                    t.raw(),
                    true,
                    Box::new(move |_| Box::new(ValidateOperator::new(v.clone()))),
                )
            }
            Stage::Identity => {
                outs.insert(outputs::NEXT, OutputTarget::Framed(t.identified()));
                outs.insert(outputs::PROFILES, OutputTarget::Topic(t.profiles()));
                let r = compiled.identity.clone();
                (
                    t.valid(),
                    false,
                    Box::new(move |_| Box::new(IdentityOperator::new(r.clone()))),
                )
            }
            Stage::Traits => {
                outs.insert(outputs::NEXT, OutputTarget::Framed(t.traits()));
                outs.insert(outputs::SELF, OutputTarget::Framed(t.identified()));
                let s = compiled.traits.clone();
                (
                    t.identified(),
                    true,
                    Box::new(move |_| Box::new(TraitsOperator::new(s.clone()))),
                )
            }
            Stage::Audiences => {
                outs.insert(outputs::NEXT, OutputTarget::Topic(t.audiences()));
                outs.insert(outputs::SELF, OutputTarget::Framed(t.traits()));
                let s = compiled.audiences.clone();
                let audiences = move || {
                    AudiencesOperator::new(s.clone()).with_size_reporter(audience_members())
                };
                let format = &compiled.config.audience_changes;
                let operator: cdp_pipeline::OperatorFactory = match format.format {
                    Format::Json => Box::new(move |_| Box::new(audiences())),
                    Format::Avro => {
                        let codec = Arc::new(
                            avro_codec(format.schema_registry.as_deref(), &t.audiences())
                                .context("audience_changes: setting up avro")?,
                        );
                        Box::new(move |_| {
                            Box::new(EncodeOutput::new(
                                Box::new(audiences()),
                                outputs::NEXT,
                                codec.clone(),
                            ))
                        })
                    }
                };
                (t.traits(), true, operator)
            }
            Stage::Deliver => {
                let dests = compiled.config.destinations.clone();
                for d in &dests {
                    let sink = build_sink(d, factory)?;
                    let name: &'static str = DeliverOperator::new(std::slice::from_ref(d))
                        .output_names()
                        .first()
                        .copied()
                        .unwrap_or("unnamed");
                    outs.insert(name, OutputTarget::Sink(sink));
                }
                (
                    t.audiences(),
                    false,
                    Box::new(move |_| Box::new(DeliverOperator::new(&dests))),
                )
            }
        };
        let observer = match self {
            Stage::Audiences => Some(audience_change_observer()),
            Stage::Identity => Some(identity_observer()),
            Stage::Traits => Some(traits_observer()),
            _ => None,
        };
        Ok(StageSpec {
            name: self.name(),
            input_topic: input,
            outputs: outs,
            operator,
            ticks,
            observer,
            // validate's only timers are its dedupe entries' expiries.
            timers_from_state: (self == Stage::Validate)
                .then_some(cdp_operators::validate::dedupe_timer as TimersFromState),
        })
    }
}

impl Stage {
    /// What the stage counts about its inputs that its pure operator
    /// cannot: for validate, `cdp_validation_failures_total{source, event,
    /// reason}` per dead letter, and `cdp_duplicates_dropped_total` per
    /// repeated `messageId` (validate emits nothing for a record only when
    /// it drops a duplicate).
    pub fn input_observer(self, compiled: &Compiled) -> Option<InputObserver> {
        if self != Stage::Validate {
            return None;
        }
        let validator = compiled.validator.clone();
        let duplicates = metrics::DUPLICATES_DROPPED.with_label_values(&[self.name()]);
        Some(Arc::new(move |headers, outcome| match outcome {
            InputOutcome::Processed([]) => duplicates.inc(),
            InputOutcome::Processed(_) => {}
            InputOutcome::DeadLetter { reason, detail } => {
                let source = headers
                    .iter()
                    .find(|(k, _)| *k == SOURCE)
                    .and_then(|(_, v)| std::str::from_utf8(v).ok());
                let (source, event) = validator.failure_labels(source, detail);
                metrics::VALIDATION_FAILURES
                    .with_label_values(&[source, event, reason])
                    .inc();
            }
        }))
    }
}

/// `cdp_audience_members{audience}`: every audiences task adds its members
/// and takes them back when it goes.
fn audience_members() -> cdp_operators::audiences::SizeReporter {
    Arc::new(|audience: &str, delta: i64| {
        metrics::AUDIENCE_MEMBERS
            .with_label_values(&[audience])
            .add(delta);
    })
}

/// Counts `cdp_audience_changes_total{audience, action}`.
fn audience_change_observer() -> cdp_pipeline::runtime::Observer {
    Arc::new(|e: &cdp_pipeline::Emitted| {
        if e.output != outputs::NEXT {
            return;
        }
        if let Some((audience, action)) = counted_change(&e.value) {
            let action = match action {
                AudienceAction::Entered => "entered",
                AudienceAction::Exited => "exited",
            };
            metrics::AUDIENCE_CHANGES
                .with_label_values(&[&audience, action])
                .inc();
        }
    })
}

/// What the count of an audience change needs of it: its audience and
/// action. A JSON change is read for those two fields alone (decoding the
/// whole change, identifiers and traits allocated, was 1.8% of the
/// audiences stage's batches); an Avro one (`audience_changes.format`) is
/// decoded.
fn counted_change(bytes: &[u8]) -> Option<(Cow<'_, str>, AudienceAction)> {
    #[derive(serde::Deserialize)]
    struct Counted<'a> {
        #[serde(borrow)]
        audience: Cow<'a, str>,
        action: AudienceAction,
    }
    if cdp_connectors::avro::is_avro(bytes) {
        let change = cdp_connectors::avro::reader().ok()?.decode(bytes).ok()?;
        return Some((Cow::Owned(change.audience), change.action));
    }
    let counted: Counted<'_> = serde_json::from_slice(bytes).ok()?;
    Some((counted.audience, counted.action))
}

/// Counts `cdp_event_times_corrected_total{stage="traits"}` (events whose
/// time was beyond `event_time.max_future`) and
/// `cdp_state_limit_hits_total{stage="traits", kind}`: headers say so, so
/// no record is parsed again.
fn traits_observer() -> cdp_pipeline::runtime::Observer {
    let corrected = metrics::EVENT_TIMES_CORRECTED.with_label_values(&["traits"]);
    Arc::new(move |e: &cdp_pipeline::Emitted| {
        if e.output != outputs::NEXT {
            return;
        }
        for (k, v) in &e.headers {
            if k == cdp_operators::event_time::TIME_CORRECTED_HEADER {
                corrected.inc();
            } else if k == cdp_operators::traits::STATE_LIMIT_HEADER {
                // Kinds are trait type names: a small fixed set.
                for kind in String::from_utf8_lossy(v).split(',') {
                    metrics::STATE_LIMIT_HITS
                        .with_label_values(&["traits", kind])
                        .inc();
                }
            }
        }
    })
}

/// Counts identity's refused identifiers by type and rule, and its merges:
/// nothing a rule drops goes unseen.
fn identity_observer() -> cdp_pipeline::runtime::Observer {
    Arc::new(|e: &cdp_pipeline::Emitted| {
        if e.output != outputs::NEXT || nothing_to_count(&e.value) {
            return;
        }
        match ProfileRecordSummary::from_bytes(&e.value) {
            Ok(ProfileRecordSummary {
                kind: ProfileRecordKind::Event,
                dropped,
            }) => {
                for d in dropped {
                    metrics::IDENTITY_DROPPED_IDENTIFIERS
                        .with_label_values(&[&d.kind, &d.reason])
                        .inc();
                }
            }
            Ok(ProfileRecordSummary {
                kind: ProfileRecordKind::Merged,
                ..
            }) => metrics::IDENTITY_MERGES
                .with_label_values::<&str>(&[])
                .inc(),
            _ => {}
        }
    })
}

/// An event record as identity writes it (binary, see
/// `cdp_operators::messages::wire`) with no refused identifier: its first
/// field, the refused identifiers, is empty (one zero byte). Every other
/// record is read: a merge, or an event whose refusals are counted.
fn nothing_to_count(record: &[u8]) -> bool {
    matches!(record, [wire::EVENT_V1, 0, ..])
}

/// Identity builds one graph from one serial log: refuse to start on a
/// `<p>.valid` with more partitions (a topic made before identity was
/// serial), naming the fix, rather than split people into several profiles.
/// A broker that does not answer is waited for, as every stage waits for
/// it (until shutdown), not taken for a reason to exit.
fn check_serial_input(factory: &ClientFactory, shutdown: &Shutdown) -> anyhow::Result<()> {
    use rdkafka::consumer::Consumer as _;
    let topic = factory.topics().valid();
    let consumer = factory.restore_consumer()?;
    let metadata = loop {
        // Short tries: a SIGTERM while waiting ends the process within 2 s.
        match consumer.fetch_metadata(Some(&topic), std::time::Duration::from_secs(2)) {
            Ok(metadata) => break metadata,
            Err(e) if !shutdown.is_triggered() => {
                tracing::warn!(error = %e, %topic, "identity: no answer from the broker yet; retrying");
            }
            // Stopped while waiting: the stage starts and ends at once.
            Err(_) => return Ok(()),
        }
    };
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len());
    let want = cdp_pipeline::kafka::SERIAL_PARTITIONS as usize;
    // 0: the topic does not exist yet; the consumer waits for it.
    if partitions > want {
        anyhow::bail!(
            "{topic} has {partitions} partitions; identity needs exactly {want} so that one \
             person is one profile whatever partition their events land on. Recreate it \
             (docs/OPERATIONS.md, \"Upgrading to the serial identity log\")"
        );
    }
    Ok(())
}

/// The HTTP collector of the config, writing to the pipeline's `<p>.raw`.
pub fn collector(
    compiled: &Compiled,
    factory: &ClientFactory,
) -> anyhow::Result<cdp_connectors::collector::Collector> {
    Ok(cdp_connectors::collector::Collector::new(
        compiled.config.collector.clone(),
        &compiled.config.sources,
        factory,
        factory.topics().raw(),
    )?)
}

/// Start stages on their own threads.
pub fn start_stages(
    stages: &[Stage],
    compiled: &Compiled,
    factory: &ClientFactory,
    instance_id: Option<String>,
    health: &Health,
    shutdown: &Shutdown,
) -> anyhow::Result<Vec<std::thread::JoinHandle<Result<(), RuntimeError>>>> {
    let handle = tokio::runtime::Handle::current();
    let mut joins = Vec::new();
    for stage in stages {
        // Registered (not ready) first: `/readyz` answers 503 while the
        // stage waits for the broker below, not 200 for want of a check.
        let ready = health.register(stage.name());
        if *stage == Stage::Identity {
            check_serial_input(factory, shutdown)?;
        }
        let spec = stage.spec(compiled, factory)?;
        let mut runtime = StageRuntime::new(spec, factory.clone(), instance_id.clone(), ready);
        if let Some(observer) = stage.input_observer(compiled) {
            runtime = runtime.with_input_observer(observer);
        }
        if *stage == Stage::Validate {
            // `<p>.raw` is written by producers outside the pipeline.
            runtime = runtime.with_external_input();
        }
        if *stage == Stage::Deliver {
            runtime = runtime.with_round_limit(cdp_connectors::deliver::round_limit(
                &compiled.config.destinations,
            ));
        }
        joins.push(runtime.spawn(handle.clone(), shutdown.clone())?);
    }
    Ok(joins)
}

/// Wait for stage threads without blocking the async runtime; the first
/// error wins.
pub async fn join_stages(
    joins: Vec<std::thread::JoinHandle<Result<(), RuntimeError>>>,
) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || {
        let mut first = Ok(());
        for j in joins {
            let r = match j.join() {
                Ok(r) => r.map_err(anyhow::Error::from),
                Err(_) => Err(anyhow::anyhow!("stage thread panicked")),
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigLoadError, DEMO_CONFIG};
    use cdp_operators::messages::wire::RecordError;
    use cdp_operators::messages::AudienceChange;
    use cdp_pipeline::Emitted;
    use serde_json::json;

    fn failures(source: &str, event: &str, reason: &str) -> u64 {
        metrics::VALIDATION_FAILURES
            .with_label_values(&[source, event, reason])
            .get()
    }

    #[test]
    fn validate_counts_failures_by_bounded_labels_and_duplicates() -> Result<(), ConfigLoadError> {
        // A source id of its own, so other tests sharing the registry
        // cannot move these counters (no other test in this binary runs
        // the validate stage).
        let text = DEMO_CONFIG.replace("id: web", "id: web_observer_test");
        let compiled = Config::from_yaml(&text)?.compile()?;
        let observe = Stage::Validate.input_observer(&compiled);
        assert!(Stage::Identity.input_observer(&compiled).is_none());
        let Some(observe) = observe else {
            return Err(ConfigLoadError::Parse("validate has no observer".into()));
        };
        let from = |s: &'static str| vec![(SOURCE, s.as_bytes())];
        let src = "web_observer_test";
        let planned = json!({"source": src, "event": "Order Completed"});
        let unplanned = json!({"source": src, "event": "Made Up 42"});

        let before = (
            failures(src, "Order Completed", "plan_violation"),
            failures(src, "other", "spec_violation"),
        );
        observe(
            &from(src),
            &InputOutcome::DeadLetter {
                reason: "plan_violation",
                detail: &planned,
            },
        );
        observe(
            &from(src),
            &InputOutcome::DeadLetter {
                reason: "spec_violation",
                detail: &unplanned,
            },
        );
        assert_eq!(
            failures(src, "Order Completed", "plan_violation"),
            before.0 + 1
        );
        assert_eq!(failures(src, "other", "spec_violation"), before.1 + 1);
        assert_eq!(
            failures(src, "Made Up 42", "spec_violation"),
            0,
            "unplanned names never become labels"
        );

        // A forged source header is counted as unknown, not as a new label.
        let unknown_before = failures("unknown", "other", "unknown_source");
        observe(
            &from("forged_observer_source"),
            &InputOutcome::DeadLetter {
                reason: "unknown_source",
                detail: &json!({"source": "forged_observer_source"}),
            },
        );
        assert_eq!(
            failures("forged_observer_source", "other", "unknown_source"),
            0
        );
        assert_eq!(
            failures("unknown", "other", "unknown_source"),
            unknown_before + 1
        );

        // Nothing emitted for an accepted record: a dropped duplicate.
        let duplicates = || {
            metrics::DUPLICATES_DROPPED
                .with_label_values(&["validate"])
                .get()
        };
        let before = duplicates();
        observe(&from(src), &InputOutcome::Processed(&[]));
        let one = Emitted {
            output: "next",
            key: None,
            value: b"{}".to_vec(),
            headers: Vec::new(),
        };
        observe(
            &from(src),
            &InputOutcome::Processed(std::slice::from_ref(&one)),
        );
        assert_eq!(duplicates(), before + 1, "only the empty outcome counts");
        Ok(())
    }

    #[test]
    fn identity_counts_refused_identifiers_and_merges() -> Result<(), RecordError> {
        use cdp_operators::messages::{Cause, DroppedIdentifier, Identifiers, ProfileRecord};
        // Labels of their own: no other test in this binary emits them.
        let dropped = |reason: &str| {
            metrics::IDENTITY_DROPPED_IDENTIFIERS
                .with_label_values(&["observer_test_kind", reason])
                .get()
        };
        let merges = || {
            metrics::IDENTITY_MERGES
                .with_label_values::<&str>(&[])
                .get()
        };
        let emitted = |record: &ProfileRecord| -> Result<Emitted, RecordError> {
            Ok(Emitted {
                output: outputs::NEXT,
                key: None,
                value: record.to_bytes()?,
                headers: Vec::new(),
            })
        };
        let refused = |reason: &str| DroppedIdentifier {
            kind: "observer_test_kind".into(),
            value: "x".into(),
            reason: reason.into(),
        };
        let event = ProfileRecord::Event {
            profile_id: "p".into(),
            identifiers: Identifiers::new(),
            // An event's own `dropped` field is not identity's.
            event: json!({"type": "track", "event": "E", "dropped": [{"type": "observer_test_kind",
                          "value": "y", "reason": "in_the_event"}]})
            .into(),
            dropped: vec![refused("limit"), refused("limit"), refused("blocked_value")],
            merged_from: Vec::new(),
        };
        let merged = ProfileRecord::Merged {
            from: "a".into(),
            into: "b".into(),
            identifiers: Identifiers::new(),
            cause: Cause::default(),
            announced: true,
            at: None,
        };
        let before = (dropped("limit"), dropped("blocked_value"), merges());
        let observe = identity_observer();
        observe(&emitted(&event)?);
        observe(&emitted(&merged)?);
        // Not counted: another output, and a record that is not JSON.
        let mut other = emitted(&merged)?;
        other.output = "changelog-like";
        observe(&other);
        observe(&Emitted {
            output: outputs::NEXT,
            key: None,
            value: b"not json".to_vec(),
            headers: Vec::new(),
        });
        assert_eq!(dropped("limit"), before.0 + 2);
        assert_eq!(dropped("blocked_value"), before.1 + 1);
        assert_eq!(dropped("in_the_event"), 0);
        // Merges are one unlabelled counter: other tests may add to it.
        assert!(merges() > before.2);
        // Parsed only when there may be something to count.
        assert!(!nothing_to_count(&emitted(&event)?.value));
        assert!(!nothing_to_count(&emitted(&merged)?.value));
        // An event record with nothing refused is skipped, whatever its
        // event holds (a property named `dropped` too).
        for event in [
            json!({"type": "track"}),
            json!({"properties": {"dropped": 1}}),
        ] {
            let record = ProfileRecord::Event {
                profile_id: "p".into(),
                identifiers: Identifiers::new(),
                event: event.into(),
                dropped: Vec::new(),
                merged_from: Vec::new(),
            };
            assert!(nothing_to_count(&record.to_bytes()?));
        }
        assert!(!nothing_to_count(b"not json"));
        Ok(())
    }

    #[test]
    fn audience_changes_are_counted_by_audience_and_action_in_json_and_avro(
    ) -> Result<(), Box<dyn std::error::Error>> {
        // Audience names of this test's own: the registry is shared.
        let count = |audience: &str, action: &str| {
            metrics::AUDIENCE_CHANGES
                .with_label_values(&[audience, action])
                .get()
        };
        let change = |audience: &str, action| AudienceChange {
            kind: "audience_change".into(),
            audience: audience.into(),
            action,
            profile_id: "p".into(),
            identifiers: [("user_id".to_string(), vec!["u".to_string()])].into(),
            traits: [("revenue_total".to_string(), json!(550))].into(),
            event_time: "2026-12-02T00:00:00.000Z".into(),
            emitted_at: "2026-12-02T00:00:00.001Z".into(),
            cause: Default::default(),
            merged_into: None,
        };
        let json_in = serde_json::to_vec(&change("observer_json", AudienceAction::Entered))?;
        let json_out = serde_json::to_vec(&change("observer_json", AudienceAction::Exited))?;
        let codec = cdp_connectors::avro::avro_codec(None, "cdp.audiences")?;
        let avro_in = codec.encode_json(&serde_json::to_vec(&change(
            "observer_avro",
            AudienceAction::Entered,
        ))?)?;
        let before = [
            count("observer_json", "entered"),
            count("observer_json", "exited"),
            count("observer_avro", "entered"),
        ];
        let observe = audience_change_observer();
        let emit = |output: &'static str, value: &[u8]| Emitted {
            output,
            key: Some(b"p".to_vec()),
            value: value.to_vec(),
            headers: Vec::new(),
        };
        for value in [&json_in, &json_in, &json_out, &avro_in] {
            observe(&emit(outputs::NEXT, value));
        }
        // Not a change: a transfer to the stage itself, and bytes that
        // are neither.
        observe(&emit(outputs::SELF, &json_in));
        observe(&emit(outputs::NEXT, b"not a change"));
        assert_eq!(
            [
                count("observer_json", "entered"),
                count("observer_json", "exited"),
                count("observer_avro", "entered"),
            ],
            [before[0] + 2, before[1] + 1, before[2] + 1]
        );
        Ok(())
    }
}
