use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::sync::Arc;

use cdp_pipeline::operator::{Emitted, OperatorHarness};
use cdp_pipeline::OperatorError;
use proptest::prelude::*;
use serde_json::{json, Value};

use super::profile::{sequence_holds, AudienceProfile, Step};
use super::*;
use crate::config::KnownNames;
use crate::messages::{
    self, outputs, rfc3339_ms, AudienceAction, AudienceChange, Cause, Identifiers, ProfileUpdate,
};
use crate::profile_keyed::profile_key;
use crate::traits::PropertyCondition;

type TestResult = Result<(), Box<dyn Error>>;
const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;

const DESIGN_AUDIENCES: &str = r#"
big_spenders:
  where:
    all:
      - {trait: revenue_total, gte: 500}
      - {event: Order Completed, count: {gte: 2}, within: 30d,
         where: [{property: properties.revenue, gt: 100}]}
lapsing:
  where:
    all:
      - {audience: big_spenders}
      - {not: {event: Order Completed, within: 14d}}
browsed_then_bought:
  where: {sequence: [{event: Product Viewed}, {event: Order Completed}], within: 1d}
"#;

fn defs(yaml: &str) -> Result<BTreeMap<String, AudienceDef>, serde_yaml::Error> {
    serde_yaml::from_str(yaml)
}

fn harness(yaml: &str) -> Result<OperatorHarness<AudiencesOperator>, Box<dyn Error>> {
    let set = AudienceSet::new(&defs(yaml)?, &KnownNames::anything())?;
    Ok(OperatorHarness::new(AudiencesOperator::new(Arc::new(set))))
}

fn update(
    id: &str,
    event: Option<(&str, Value)>,
    traits: Value,
    t: i64,
) -> Result<Vec<u8>, Box<dyn Error>> {
    update_until(id, event, traits, t, None)
}

fn update_until(
    id: &str,
    event: Option<(&str, Value)>,
    traits: Value,
    t: i64,
    traits_until: Option<i64>,
) -> Result<Vec<u8>, Box<dyn Error>> {
    let traits: BTreeMap<String, Value> = serde_json::from_value(traits)?;
    let mut identifiers = Identifiers::new();
    identifiers.insert("user_id".into(), vec![format!("u_{id}")]);
    let record = ProfileUpdate::Update {
        profile_id: id.into(),
        identifiers,
        event: event.map(|(name, props)| {
            json!({"type": "track", "event": name, "properties": props}).into()
        }),
        traits,
        event_time: t,
        time_corrected_from: None,
        cause: Cause {
            message_id: Some(format!("m{t}")),
            tick: None,
        },
        merged_from: Vec::new(),
        traits_until,
    };
    Ok(serde_json::to_vec(&record)?)
}

fn send(
    h: &mut OperatorHarness<AudiencesOperator>,
    id: &str,
    event: Option<(&str, Value)>,
    traits: Value,
    t: i64,
) -> Result<Vec<AudienceChange>, Box<dyn Error>> {
    let bytes = update(id, event, traits, t)?;
    let out = h.process(Some(id.as_bytes()), &bytes, &[])?;
    Ok(changes(&out)?)
}

fn changes(out: &[Emitted]) -> Result<Vec<AudienceChange>, serde_json::Error> {
    out.iter()
        .filter(|e| e.output == outputs::NEXT)
        .map(|e| serde_json::from_slice(&e.value))
        .collect()
}

/// The members per audience a task's state counts, zeros left out.
fn stored_sizes(
    state: &cdp_pipeline::store::MemoryState,
) -> Result<BTreeMap<String, i64>, serde_json::Error> {
    let counts: BTreeMap<String, i64> = match state.map.get(super::sizes::SIZES_KEY) {
        Some(bytes) => serde_json::from_slice(bytes)?,
        None => BTreeMap::new(),
    };
    Ok(counts.into_iter().filter(|(_, n)| *n != 0).collect())
}

fn summary(changes: &[AudienceChange]) -> Vec<(String, AudienceAction)> {
    changes
        .iter()
        .map(|c| (c.audience.clone(), c.action))
        .collect()
}

fn entered(name: &str) -> (String, AudienceAction) {
    (name.to_owned(), AudienceAction::Entered)
}

fn exited(name: &str) -> (String, AudienceAction) {
    (name.to_owned(), AudienceAction::Exited)
}

mod config;
mod evaluation;
mod merges;
mod proptests;
mod state;
mod sweep;
