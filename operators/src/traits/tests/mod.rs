use std::collections::BTreeMap;
use std::error::Error;
use std::sync::Arc;

use cdp_pipeline::operator::{Emitted, OperatorError, OperatorHarness};
use proptest::prelude::*;
use serde_json::{json, Value};

use super::profile::ProfileState;
use super::state::TraitState;
use super::*;
use crate::event_time::TIME_CORRECTED_HEADER;
use crate::messages::wire::{self, RecordError};
use crate::messages::{outputs, rfc3339_ms, Cause, Identifiers, ProfileRecord, ProfileUpdate};
use crate::profile_keyed::profile_key;

type TestResult = Result<(), Box<dyn Error>>;
const DAY: i64 = 86_400_000;

fn trait_set(yaml: &str) -> Result<Arc<TraitSet>, Box<dyn Error>> {
    let defs: BTreeMap<String, TraitDef> = serde_yaml::from_str(yaml)?;
    Ok(Arc::new(TraitSet::new(&defs)?))
}

fn harness(yaml: &str) -> Result<OperatorHarness<TraitsOperator>, Box<dyn Error>> {
    Ok(OperatorHarness::new(TraitsOperator::new(trait_set(yaml)?)))
}

fn track(name: &str, t: i64, properties: Value) -> Value {
    json!({"type": "track", "event": name, "messageId": format!("m{t}"),
               "timestamp": rfc3339_ms(t), "properties": properties})
}

fn identify(t: i64, traits: Value) -> Value {
    json!({"type": "identify", "messageId": format!("i{t}"), "userId": "u1",
               "timestamp": rfc3339_ms(t), "traits": traits})
}

fn event_record(id: &str, event: Value) -> Result<Vec<u8>, serde_json::Error> {
    let mut identifiers = Identifiers::new();
    identifiers.insert("user_id".into(), vec![format!("u_{id}")]);
    serde_json::to_vec(&ProfileRecord::Event {
        profile_id: id.into(),
        identifiers,
        event: event.into(),
        dropped: Vec::new(),
        merged_from: Vec::new(),
    })
}

fn send(
    h: &mut OperatorHarness<TraitsOperator>,
    id: &str,
    event: Value,
) -> Result<Vec<Emitted>, Box<dyn Error>> {
    let bytes = event_record(id, event)?;
    Ok(h.process(Some(id.as_bytes()), &bytes, &[])?)
}

fn updates(out: &[Emitted]) -> Result<Vec<ProfileUpdate>, RecordError> {
    out.iter()
        .filter(|e| e.output == outputs::NEXT)
        .map(|e| ProfileUpdate::from_bytes(&e.value))
        .collect()
}

/// The changed traits of every `Update` in `out`, later ones winning.
fn changed(out: &[Emitted]) -> Result<BTreeMap<String, Value>, RecordError> {
    let mut traits = BTreeMap::new();
    for u in updates(out)? {
        if let ProfileUpdate::Update { traits: t, .. } = u {
            traits.extend(t);
        }
    }
    Ok(traits)
}

const DESIGN_TRAITS: &str = r#"
orders_30d: {event_counter: {event: Order Completed, within: 30d}}
orders: {event_counter: {event: Order Completed}}
big_orders: {event_counter: {event: Order Completed, where: [{property: properties.revenue, gt: 100}]}}
revenue_total: {aggregation: {event: Order Completed, property: properties.revenue, function: sum}}
revenue_avg: {aggregation: {event: Order Completed, property: properties.revenue, function: avg}}
revenue_min: {aggregation: {event: Order Completed, property: properties.revenue, function: min}}
revenue_max: {aggregation: {event: Order Completed, property: properties.revenue, function: max}}
favorite_category: {most_frequent: {event: Product Viewed, property: properties.category}}
first_campaign: {first: {event: Page Viewed, property: context.campaign.source}}
last_product: {last: {event: Product Viewed, property: properties.sku}}
categories: {unique_list: {event: Product Viewed, property: properties.category, limit: 2}}
"#;

mod config;
mod config_change;
mod merge_wait;
mod merges;
mod proptests;
mod state;
mod time;
mod values;
