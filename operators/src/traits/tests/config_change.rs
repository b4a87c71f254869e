//! A config change: a trait whose definition changed starts over; the
//! others go on from the state they had.

use super::*;

const BEFORE: &str = r#"
orders: {event_counter: {event: Order Completed}}
ltv: {aggregation: {event: Order Completed, property: properties.revenue, function: sum}}
recent: {event_counter: {event: Order Completed, within: 1d}}
gone: {event_counter: {event: Order Completed}}
"#;

/// `ltv` reads another property, `recent` becomes a windowed sum (the same
/// kind of state as a windowed count), `gone` goes, `orders` stays.
const AFTER: &str = r#"
orders: {event_counter: {event: Order Completed}}
ltv: {aggregation: {event: Order Completed, property: properties.tax, function: sum}}
recent: {aggregation: {event: Order Completed, property: properties.revenue, function: sum, within: 1d}}
"#;

fn order(t: i64, revenue: i64, tax: i64) -> Value {
    track(
        "Order Completed",
        t,
        json!({"revenue": revenue, "tax": tax}),
    )
}

#[test]
fn a_trait_whose_definition_changed_starts_over_and_the_others_go_on() -> TestResult {
    let mut h = harness(BEFORE)?;
    send(&mut h, "p1", order(1_000, 300, 30))?;
    send(&mut h, "p1", order(2_000, 200, 20))?;
    h.operator = TraitsOperator::new(trait_set(AFTER)?);
    let out = changed(&send(&mut h, "p1", order(3_000, 100, 10))?)?;
    // Unchanged: counts on from its state.
    assert_eq!(out.get("orders"), Some(&json!(3)));
    // A new property: only the order since the change counts.
    assert_eq!(out.get("ltv"), Some(&json!(10)));
    // A windowed count become a windowed sum: the old buckets are counts,
    // not revenue, and are not summed.
    assert_eq!(out.get("recent"), Some(&json!(100)));
    assert_eq!(out.get("gone"), Some(&Value::Null));
    Ok(())
}

/// Definitions are compared with those the state was settled under, not
/// with the last config the task ran: a profile untouched through two
/// restarts under the new config is fitted at its first event, and one
/// fitted already keeps what it counted since.
#[test]
fn states_are_fitted_against_the_config_they_were_settled_under() -> TestResult {
    let mut h = harness(BEFORE)?;
    send(&mut h, "p1", order(1_000, 300, 30))?;
    send(&mut h, "p2", order(1_500, 50, 5))?;
    h.operator = TraitsOperator::new(trait_set(AFTER)?);
    let out = changed(&send(&mut h, "p1", order(3_000, 100, 10))?)?;
    assert_eq!(out.get("ltv"), Some(&json!(10)));
    h.operator = TraitsOperator::new(trait_set(AFTER)?);
    let out = changed(&send(&mut h, "p2", order(3_500, 100, 7))?)?;
    assert_eq!(out.get("orders"), Some(&json!(2)), "{out:?}");
    assert_eq!(out.get("ltv"), Some(&json!(7)), "{out:?}");
    let out = changed(&send(&mut h, "p1", order(4_000, 100, 1))?)?;
    assert_eq!(out.get("ltv"), Some(&json!(11)), "{out:?}");
    assert_eq!(out.get("orders"), Some(&json!(3)), "{out:?}");
    Ok(())
}

/// Profiles with no new event hear of the change too: after the traits
/// changed, each task sends every profile's changed values again, a step
/// per tick, so the audiences stage stops acting on the old ones.
#[test]
fn profiles_without_events_are_sent_their_new_values_a_step_per_tick() -> TestResult {
    let mut h = harness(BEFORE)?;
    send(&mut h, "p1", order(1_000, 300, 30))?;
    send(&mut h, "p2", order(1_500, 50, 5))?;
    // The first tick under BEFORE: nothing to do.
    assert!(updates(&h.tick(2_000)?)?.is_empty());
    h.operator = TraitsOperator::new(trait_set(AFTER)?).with_sweep_step(1);
    let mut seen = Vec::new();
    for t in [3_000, 4_000, 5_000] {
        for u in updates(&h.tick(t)?)? {
            if let ProfileUpdate::Update {
                profile_id,
                traits,
                cause,
                ..
            } = u
            {
                assert_eq!(cause.tick, Some(t));
                seen.push((t, profile_id, traits));
            }
        }
    }
    assert_eq!(
        seen.iter()
            .map(|(t, p, _)| (*t, p.as_str()))
            .collect::<Vec<_>>(),
        [(3_000, "p1"), (4_000, "p2")],
        "{seen:?}"
    );
    // The changed and the removed traits, started over; `orders` unchanged.
    let reset = BTreeMap::from([
        ("gone".to_string(), Value::Null),
        ("ltv".to_string(), json!(0)),
        ("recent".to_string(), json!(0)),
    ]);
    assert!(
        seen.iter().all(|(_, _, traits)| traits == &reset),
        "{seen:?}"
    );
    Ok(())
}
