//! What `cdp config check` warns about: a config that compiles but reads
//! events its own tracking plans say never come.
//!
//! Traits and audience conditions name events and property paths as free
//! text; the tracking plans of the sources say which events exist and what
//! their properties are. A trait reading `properties.revnue` of an event
//! whose plan lists only `revenue` compiles and silently stays 0, and an
//! event a plan blocks as unplanned never reaches any stage after validate.
//! These are warnings, not errors: a plan may be stricter than one source's
//! traffic, and events from sources without a plan are never checked.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::audiences::{AudienceDef, Condition};
use crate::config::SourceConfig;
use crate::traits::{PropertyCondition, TraitDef};
use crate::validate::{TrackingPlan, UnplannedEvents};

/// Where a config reads an event: the config path of the reading, the
/// event's name, and the property path read (none for a bare count).
struct Reading<'c> {
    at: String,
    event: &'c str,
    property: Option<&'c str>,
}

/// One line per reading that the tracking plans in use say cannot work.
pub fn plan_warnings(
    sources: &[SourceConfig],
    plans: &BTreeMap<String, TrackingPlan>,
    traits: &BTreeMap<String, TraitDef>,
    audiences: &BTreeMap<String, AudienceDef>,
) -> Vec<String> {
    let readings = readings(traits, audiences);
    let mut warnings = Vec::new();
    // Each plan once, with the sources using it.
    let mut in_use: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for s in sources {
        if let Some(plan) = &s.tracking_plan {
            in_use.entry(plan).or_default().push(&s.id);
        }
    }
    for (name, source_ids) in in_use {
        let Some(plan) = plans.get(name) else {
            continue;
        };
        let sources = source_ids.join(", ");
        for r in &readings {
            if let Some(w) = check_reading(r, name, plan, &sources) {
                warnings.push(w);
            }
        }
    }
    warnings
}

fn check_reading(
    r: &Reading<'_>,
    plan_name: &str,
    plan: &TrackingPlan,
    sources: &str,
) -> Option<String> {
    let schemas: Vec<&Value> = plan
        .events
        .get(r.event)
        .into_iter()
        .chain(
            plan.event_versions
                .get(r.event)
                .into_iter()
                .flat_map(|v| v.values()),
        )
        .collect();
    if schemas.is_empty() {
        return (plan.unplanned_events == UnplannedEvents::Block).then(|| {
            format!(
                "{}: event {:?} is not in tracking plan {plan_name:?}, which blocks unplanned events: from source {sources} it never gets past validate",
                r.at, r.event
            )
        });
    }
    let property = r.property?.strip_prefix("properties.")?;
    let key = property.split('.').next().unwrap_or(property);
    // Every version's declared properties; a schema that declares none
    // says nothing about names.
    let mut declared = BTreeSet::new();
    for schema in &schemas {
        match schema.get("properties").and_then(Value::as_object) {
            Some(props) => declared.extend(props.keys().map(String::as_str)),
            None => return None,
        }
    }
    if declared.contains(key) {
        return None;
    }
    let near = declared
        .iter()
        .filter(|d| strsim::damerau_levenshtein(d, key) <= 2)
        .min_by_key(|d| strsim::damerau_levenshtein(d, key));
    let hint = match near {
        Some(d) => format!("; did you mean properties.{d}?"),
        None => String::new(),
    };
    let listed: Vec<&str> = declared.into_iter().collect();
    Some(format!(
        "{}: reads properties.{key} of {:?}, which tracking plan {plan_name:?} (source {sources}) does not declare (it declares {}){hint}",
        r.at,
        r.event,
        listed.join(", ")
    ))
}

/// Every event and property path the traits and audiences read.
fn readings<'c>(
    traits: &'c BTreeMap<String, TraitDef>,
    audiences: &'c BTreeMap<String, AudienceDef>,
) -> Vec<Reading<'c>> {
    let mut out = Vec::new();
    for (name, def) in traits {
        let at = format!("traits.{name}");
        out.push(Reading {
            at: at.clone(),
            event: def.event(),
            property: def.property(),
        });
        conditions(&mut out, &at, def.event(), def.conditions());
    }
    for (name, def) in audiences {
        condition(&mut out, &format!("audiences.{name}.where"), &def.r#where);
    }
    out
}

fn conditions<'c>(
    out: &mut Vec<Reading<'c>>,
    at: &str,
    event: &'c str,
    list: &'c [PropertyCondition],
) {
    for (i, c) in list.iter().enumerate() {
        out.push(Reading {
            at: format!("{at}.where[{i}]"),
            event,
            property: Some(&c.property),
        });
    }
}

fn condition<'c>(out: &mut Vec<Reading<'c>>, at: &str, c: &'c Condition) {
    match c {
        Condition::All(list) | Condition::Any(list) => {
            let kind = if matches!(c, Condition::All(_)) {
                "all"
            } else {
                "any"
            };
            for (i, inner) in list.iter().enumerate() {
                condition(out, &format!("{at}.{kind}[{i}]"), inner);
            }
        }
        Condition::Not(inner) => condition(out, &format!("{at}.not"), inner),
        Condition::Event(e) => {
            out.push(Reading {
                at: at.to_string(),
                event: &e.event,
                property: None,
            });
            conditions(out, at, &e.event, &e.r#where);
        }
        Condition::Sequence(s) => {
            for (i, step) in s.steps.iter().enumerate() {
                let at = format!("{at}.sequence[{i}]");
                out.push(Reading {
                    at: at.clone(),
                    event: &step.event,
                    property: None,
                });
                conditions(out, &at, &step.event, &step.r#where);
            }
        }
        Condition::Trait(_) | Condition::Audience(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
        serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn readings_the_plans_rule_out_are_named_with_their_path() {
        let sources: Vec<SourceConfig> = yaml(
            "[{id: web, write_key: k1, tracking_plan: shop}, {id: app, write_key: k2, tracking_plan: shop}, {id: api, write_key: k3}]",
        );
        let plans: BTreeMap<String, TrackingPlan> = yaml(
            r#"
shop:
  unplanned_events: block
  events:
    Order Completed: {type: object, properties: {revenue: {type: number}, currency: {type: string}}}
    Loose: {type: object}
  event_versions:
    Order Completed: {2: {type: object, properties: {tax: {type: number}}}}
unused:
  events: {Other: {type: object, properties: {x: {}}}}
"#,
        );
        let traits: BTreeMap<String, TraitDef> = yaml(
            r#"
ltv: {aggregation: {event: Order Completed, property: properties.revnue, function: sum}}
tax: {aggregation: {event: Order Completed, property: properties.tax.amount, function: sum}}
eur: {event_counter: {event: Order Completed, where: [{property: properties.curency, eq: EUR}]}}
ctx: {last: {event: Order Completed, property: context.page.url}}
loose: {last: {event: Loose, property: properties.anything}}
views: {event_counter: {event: Product Viewed}}
"#,
        );
        let audiences: BTreeMap<String, AudienceDef> = yaml(
            r#"
a: {where: {all: [{trait: ltv, gt: 1}, {not: {event: Signed Up}}, {sequence: [{event: Order Completed, where: [{property: properties.revenue, gt: 5}]}, {event: Order Completed, where: [{property: properties.size, gt: 5}]}]}]}}
"#,
        );
        let warnings = plan_warnings(&sources, &plans, &traits, &audiences);
        let expected = [
            r#"traits.eur.where[0]: reads properties.curency of "Order Completed", which tracking plan "shop" (source web, app) does not declare (it declares currency, revenue, tax); did you mean properties.currency?"#,
            r#"traits.ltv: reads properties.revnue of "Order Completed", which tracking plan "shop" (source web, app) does not declare (it declares currency, revenue, tax); did you mean properties.revenue?"#,
            r#"traits.views: event "Product Viewed" is not in tracking plan "shop", which blocks unplanned events: from source web, app it never gets past validate"#,
            r#"audiences.a.where.all[1].not: event "Signed Up" is not in tracking plan "shop", which blocks unplanned events: from source web, app it never gets past validate"#,
            r#"audiences.a.where.all[2].sequence[1].where[0]: reads properties.size of "Order Completed", which tracking plan "shop" (source web, app) does not declare (it declares currency, revenue, tax)"#,
        ];
        assert_eq!(warnings, expected);
        // A plan that allows unplanned events says nothing of other events.
        let mut allowing = plans.clone();
        if let Some(shop) = allowing.get_mut("shop") {
            shop.unplanned_events = UnplannedEvents::Allow;
        }
        let warnings = plan_warnings(&sources, &allowing, &traits, &audiences);
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        assert!(warnings.iter().all(|w| w.contains("does not declare")));
        // Without plans in use, nothing to say.
        assert!(plan_warnings(&sources[2..], &plans, &traits, &audiences).is_empty());
    }
}
