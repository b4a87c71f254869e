//! The deliver stage's operator: routes audience changes to destinations.
//!
//! Input: [`AudienceChange`] records from `<p>.audiences`, keyed by profile
//! id. For every destination that wants the change's audience (its
//! `audiences` list is empty or names it) the operator emits the record,
//! same key and the original bytes, to the output named after the
//! destination id; the runtime maps that output to the destination's sink.
//! Pure and stateless: a replay emits exactly the same records, and the
//! runtime's delivery ids (stable across replays) let receivers dedupe.
//!
//! The input may be JSON or Avro (`audience_changes.format: avro`, either
//! framing, see [`crate::avro`]); destinations always get the JSON form
//! (a `kafka` destination with `format: avro` encodes it again).

use std::collections::{BTreeSet, HashSet};
use std::sync::{LazyLock, Mutex};

use cdp_operators::messages::AudienceChange;
use cdp_pipeline::{Context, Operator, OperatorError, Record};

use crate::avro;
use crate::destinations::DestinationConfig;

/// Reason code of records that are not audience changes.
pub const INVALID_AUDIENCE_CHANGE: &str = "invalid_audience_change";

/// Most audience changes the deliver stage takes in one round, whatever
/// `kafka.max_batch` allows. Its round is bounded by its destinations, not
/// its CPU: a webhook delivers to 16 profiles at once and fails what is
/// not delivered by the round's deadline (60 s by default), so a larger
/// round of a backlog to a slow endpoint would dead-letter more of it.
pub const ROUND_LIMIT: usize = 1000;

/// The round limit for these destinations: [`ROUND_LIMIT`], and no more
/// than half of what a rate-limited destination may send within its batch
/// deadline (the other half is room for retries), so throttling alone never
/// makes dead letters: `max_per_second: 5` with the 60 s deadline takes
/// 150 changes a round.
pub fn round_limit(destinations: &[DestinationConfig]) -> usize {
    destinations
        .iter()
        .filter_map(|d| {
            let rate = f64::from(d.max_per_second?);
            let deadline = d
                .batch_deadline
                .unwrap_or(crate::destinations::DEFAULT_BATCH_DEADLINE)
                .millis() as f64
                / 1000.0;
            Some(((rate * deadline / 2.0) as usize).max(1))
        })
        .fold(ROUND_LIMIT, usize::min)
}

/// One destination as the operator sees it.
#[derive(Debug, Clone)]
struct Route {
    output: &'static str,
    /// `None`: every audience.
    audiences: Option<BTreeSet<String>>,
}

/// Routes audience changes to the outputs of the destinations that want
/// them. Cheap to clone; build it once from the config.
#[derive(Debug, Clone)]
pub struct DeliverOperator {
    routes: Vec<Route>,
}

/// Output names handed out so far. `Emitted::output` is `&'static str`, so a
/// destination id is leaked once per process and reused after that: the
/// leak is bounded by the ids in the config however often tasks are built.
static OUTPUT_NAMES: LazyLock<Mutex<HashSet<&'static str>>> =
    LazyLock::new(|| Mutex::new(HashSet::new()));

fn output_name(id: &str) -> &'static str {
    match OUTPUT_NAMES.lock() {
        Ok(mut names) => match names.get(id) {
            Some(name) => name,
            None => {
                let name: &'static str = Box::leak(id.to_string().into_boxed_str());
                names.insert(name);
                name
            }
        },
        // A poisoned registry only costs a small leak per build.
        Err(_) => Box::leak(id.to_string().into_boxed_str()),
    }
}

impl DeliverOperator {
    pub fn new(dests: &[DestinationConfig]) -> Self {
        DeliverOperator {
            routes: dests
                .iter()
                .map(|d| Route {
                    output: output_name(&d.id),
                    audiences: (!d.audiences.is_empty())
                        .then(|| d.audiences.iter().cloned().collect()),
                })
                .collect(),
        }
    }

    /// The output names this operator emits to, one per destination, in
    /// config order (the destination ids).
    pub fn output_names(&self) -> Vec<&'static str> {
        self.routes.iter().map(|r| r.output).collect()
    }
}

/// Header of a replayed dead letter of this stage: the one destination
/// it failed at, the only one the replay goes to (the others had it).
pub const REPLAY_TO: &str = "cdp-replay-to";

impl Operator for DeliverOperator {
    fn process(&mut self, record: &Record<'_>, ctx: &mut Context<'_>) -> Result<(), OperatorError> {
        let invalid = |e: String| OperatorError::rejected(INVALID_AUDIENCE_CHANGE, e);
        let (change, json): (AudienceChange, Option<Vec<u8>>) = if avro::is_avro(record.value) {
            let change = avro::reader()
                .and_then(|codec| codec.decode(record.value))
                .map_err(|e| invalid(e.to_string()))?;
            let json = serde_json::to_vec(&change).map_err(|e| invalid(e.to_string()))?;
            (change, Some(json))
        } else {
            let change =
                serde_json::from_slice(record.value).map_err(|e| invalid(e.to_string()))?;
            (change, None)
        };
        if change.kind != "audience_change" {
            return Err(OperatorError::rejected(
                INVALID_AUDIENCE_CHANGE,
                format!("type is {:?}, expected \"audience_change\"", change.kind),
            ));
        }
        let only = record.header(REPLAY_TO);
        for route in &self.routes {
            let wanted = route
                .audiences
                .as_ref()
                .is_none_or(|a| a.contains(&change.audience))
                && only.is_none_or(|id| id == route.output);
            if wanted {
                ctx.emit(
                    route.output,
                    record.key.map(<[u8]>::to_vec),
                    json.clone().unwrap_or_else(|| record.value.to_vec()),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::DestinationKind;
    use cdp_operators::messages::{AudienceAction, Cause, Identifiers};
    use cdp_pipeline::OperatorHarness;

    fn dest(id: &str, audiences: &[&str]) -> DestinationConfig {
        let mut d = DestinationConfig::new(id, DestinationKind::Stdout);
        d.audiences = audiences.iter().map(|a| a.to_string()).collect();
        d
    }

    fn change(audience: &str) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&AudienceChange {
            kind: "audience_change".into(),
            audience: audience.into(),
            action: AudienceAction::Entered,
            profile_id: "prof_1".into(),
            identifiers: Identifiers::new(),
            traits: Default::default(),
            event_time: "2026-11-26T10:00:00Z".into(),
            emitted_at: "2026-11-26T10:00:00.120Z".into(),
            cause: Cause::default(),
            merged_into: None,
        })
    }

    #[test]
    fn a_rate_limited_destination_bounds_the_round_to_half_its_deadline() {
        let mut slow = dest("slow", &[]);
        slow.max_per_second = Some(5);
        assert_eq!(round_limit(&[dest("all", &[])]), ROUND_LIMIT);
        assert_eq!(round_limit(&[dest("all", &[]), slow.clone()]), 150);
        slow.batch_deadline = Some(cdp_pipeline::Span::from_secs(10));
        slow.max_per_second = Some(1);
        assert_eq!(round_limit(&[slow]), 5);
    }

    #[test]
    fn a_replayed_delivery_goes_to_the_destination_it_failed_at_only(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let op = DeliverOperator::new(&[dest("all", &[]), dest("crm", &[]), dest("ads", &[])]);
        let mut h = OperatorHarness::new(op);
        let replayed = [(REPLAY_TO.to_string(), b"crm".to_vec())];
        let out = h.process(Some(b"prof_1"), &change("vip")?, &replayed)?;
        assert_eq!(
            out.iter().map(|e| e.output).collect::<Vec<_>>(),
            vec!["crm"]
        );
        Ok(())
    }

    #[test]
    fn routes_by_audience_with_the_same_key_and_bytes() -> Result<(), Box<dyn std::error::Error>> {
        let op = DeliverOperator::new(&[
            dest("all", &[]),
            dest("crm", &["vip", "lapsing"]),
            dest("ads", &["lapsing"]),
        ]);
        assert_eq!(op.output_names(), vec!["all", "crm", "ads"]);
        let mut h = OperatorHarness::new(op);
        let value = change("vip")?;
        let out = h.process(Some(b"prof_1"), &value, &[])?;
        let outputs: Vec<&str> = out.iter().map(|e| e.output).collect();
        assert_eq!(outputs, vec!["all", "crm"]);
        assert!(out
            .iter()
            .all(|e| e.key.as_deref() == Some(&b"prof_1"[..]) && e.value == value));
        let out = h.process(Some(b"prof_1"), &change("lapsing")?, &[])?;
        assert_eq!(
            out.iter().map(|e| e.output).collect::<Vec<_>>(),
            vec!["all", "crm", "ads"]
        );
        let out = h.process(Some(b"prof_1"), &change("other")?, &[])?;
        assert_eq!(
            out.iter().map(|e| e.output).collect::<Vec<_>>(),
            vec!["all"]
        );
        Ok(())
    }

    #[test]
    fn reads_avro_in_both_framings_and_emits_the_json_form(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let json = change("vip")?;
        let parsed: AudienceChange = serde_json::from_slice(&json)?;
        for framing in [
            avro::Framing::SingleObject,
            avro::Framing::Confluent { schema_id: 9 },
        ] {
            let bytes = avro::AvroCodec::new(framing)?.encode(&parsed)?;
            let mut h = OperatorHarness::new(DeliverOperator::new(&[dest("all", &[])]));
            let out = h.process(Some(b"prof_1"), &bytes, &[])?;
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].value, json, "{framing:?}");
        }
        // A single-object record of another schema is refused, not guessed at.
        let mut foreign = avro::AvroCodec::new(avro::Framing::SingleObject)?.encode(&parsed)?;
        foreign[9] ^= 1;
        let mut h = OperatorHarness::new(DeliverOperator::new(&[dest("all", &[])]));
        assert!(matches!(
            h.process(None, &foreign, &[]),
            Err(OperatorError::Rejected { reason, .. }) if reason == INVALID_AUDIENCE_CHANGE
        ));
        Ok(())
    }

    #[test]
    fn rejects_what_is_not_an_audience_change() {
        let mut h = OperatorHarness::new(DeliverOperator::new(&[dest("all", &[])]));
        for bad in [
            &b"not json"[..],
            br#"{"type":"audience_change"}"#,
            br#"[1,2]"#,
        ] {
            let got = h.process(None, bad, &[]);
            assert!(
                matches!(&got, Err(OperatorError::Rejected { reason, .. }) if *reason == INVALID_AUDIENCE_CHANGE),
                "{got:?}"
            );
        }
    }

    #[test]
    fn output_names_are_leaked_once_per_id() {
        let a = DeliverOperator::new(&[dest("same-id", &[])]).output_names();
        let b = DeliverOperator::new(&[dest("same-id", &[])]).output_names();
        assert!(std::ptr::eq(a[0], b[0]));
    }
}
