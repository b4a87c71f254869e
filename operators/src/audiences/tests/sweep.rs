//! After the audiences change, every profile is re-evaluated, a step per
//! tick (`sweep`).

use super::*;

fn operator(yaml: &str, step: usize) -> Result<AudiencesOperator, Box<dyn Error>> {
    let set = AudienceSet::new(&defs(yaml)?, &KnownNames::anything())?;
    Ok(AudiencesOperator::new(Arc::new(set)).with_sweep_step(step))
}

const BIG: &str = "big: {where: {trait: revenue_total, gte: 500}}";

/// `revenue_total` per profile, sent under `BIG`; the first tick sweeps
/// under `BIG` and changes nothing.
fn profiles_under_big(
    values: &[(&str, i64)],
    step: usize,
) -> Result<OperatorHarness<AudiencesOperator>, Box<dyn Error>> {
    let mut h = OperatorHarness::new(operator(BIG, step)?);
    for (i, (id, revenue)) in values.iter().enumerate() {
        send(
            &mut h,
            id,
            None,
            json!({"revenue_total": revenue}),
            i as i64,
        )?;
    }
    for t in 0..values.len() {
        assert!(changes(&h.tick(100 + t as i64)?)?.is_empty());
    }
    Ok(h)
}

fn by_profile(changes: &[AudienceChange]) -> Vec<(String, String, AudienceAction)> {
    changes
        .iter()
        .map(|c| (c.profile_id.clone(), c.audience.clone(), c.action))
        .collect()
}

#[test]
fn a_new_or_narrowed_audience_takes_in_and_lets_go_of_profiles_without_events() -> TestResult {
    let mut h = profiles_under_big(&[("p1", 600), ("p2", 100), ("p3", 800)], 100)?;
    assert_eq!(stored_sizes(&h.state)?, BTreeMap::from([("big".into(), 2)]));

    h.operator = operator(
        "{big: {where: {trait: revenue_total, gte: 700}}, \
          vip: {where: {trait: revenue_total, gt: 50}}}",
        100,
    )?;
    let out = changes(&h.tick(1_000)?)?;
    let (entered, exited) = (AudienceAction::Entered, AudienceAction::Exited);
    assert_eq!(
        by_profile(&out),
        vec![
            ("p1".into(), "big".into(), exited),
            ("p1".into(), "vip".into(), entered),
            ("p2".into(), "vip".into(), entered),
            ("p3".into(), "vip".into(), entered),
        ]
    );
    // Caused by the tick, dated by it.
    assert!(out
        .iter()
        .all(|c| c.cause.tick == Some(1_000) && c.cause.message_id.is_none()));
    assert!(out.iter().all(|c| c.event_time == rfc3339_ms(1_000)));
    assert_eq!(
        stored_sizes(&h.state)?,
        BTreeMap::from([("big".into(), 1), ("vip".into(), 3)])
    );
    // Done: the next ticks change nothing.
    assert!(changes(&h.tick(2_000)?)?.is_empty());
    assert!(changes(&h.tick(3_000)?)?.is_empty());
    Ok(())
}

#[test]
fn a_sweep_takes_its_step_per_tick_and_starts_over_when_the_audiences_change_again() -> TestResult {
    let values = [("p1", 10), ("p2", 20), ("p3", 30), ("p4", 40), ("p5", 50)];
    let mut h = profiles_under_big(&values, 2)?;
    let low = |n: i64| format!("{{low: {{where: {{trait: revenue_total, lte: {n}}}}}}}");
    h.operator = operator(&low(100), 2)?;
    let entered: Vec<String> = changes(&h.tick(1_000)?)?
        .into_iter()
        .map(|c| c.profile_id)
        .collect();
    assert_eq!(entered, ["p1", "p2"]);
    // Changed again mid-way: from the first profile, under the new set.
    h.operator = operator(&low(35), 2)?;
    let mut seen = Vec::new();
    for t in 2_000..2_010 {
        seen.extend(by_profile(&changes(&h.tick(t)?)?));
    }
    // p1 and p2 are members already; p3 enters; p4 and p5 never qualify.
    assert_eq!(
        seen,
        vec![("p3".into(), "low".into(), AudienceAction::Entered)]
    );
    Ok(())
}

#[test]
fn a_new_audience_over_a_filter_already_kept_counts_the_events_before_it() -> TestResult {
    let yaml = "buyers: {where: {event: Order Completed}}";
    let mut h = OperatorHarness::new(operator(yaml, 100)?);
    for (id, orders) in [("p1", 1), ("p2", 3)] {
        for i in 0..orders {
            send(
                &mut h,
                id,
                Some(("Order Completed", json!({}))),
                json!({}),
                i,
            )?;
        }
    }
    h.tick(100)?;
    h.operator = operator(
        "{buyers: {where: {event: Order Completed}}, \
          repeat: {where: {event: Order Completed, count: {gte: 2}}}}",
        100,
    )?;
    assert_eq!(
        by_profile(&changes(&h.tick(1_000)?)?),
        vec![("p2".into(), "repeat".into(), AudienceAction::Entered)]
    );
    Ok(())
}

/// A profile's memberships from its changes: `None` when a change makes
/// no sense (an `entered` of a member, an `exited` of a non-member).
fn apply(
    members: &mut BTreeMap<String, BTreeSet<String>>,
    changes: &[AudienceChange],
) -> Option<()> {
    for c in changes {
        let of = members.entry(c.profile_id.clone()).or_default();
        let ok = match c.action {
            AudienceAction::Entered => of.insert(c.audience.clone()),
            AudienceAction::Exited => of.remove(&c.audience),
        };
        ok.then_some(())?;
    }
    Some(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// After a config change, the memberships the change stream gives
    /// equal, after every tick, a plain recomputation: the first
    /// `step × ticks` profiles (in id order) under the new thresholds, the
    /// rest under the old ones.
    #[test]
    fn the_sweep_equals_a_recomputation_after_every_tick(
        values in proptest::collection::btree_map("p[0-9]{1,3}", 0i64..1000, 1..40),
        old in 0i64..1000,
        new_gte in 0i64..1000,
        new_lt in 0i64..1000,
        step in 1usize..7,
    ) {
        let mut h = OperatorHarness::new(
            operator(&format!("a: {{where: {{trait: v, gte: {old}}}}}"), step)
                .map_err(|e| TestCaseError::fail(e.to_string()))?,
        );
        let mut members: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (i, (id, v)) in values.iter().enumerate() {
            let out = send(&mut h, id, None, json!({"v": v}), i as i64)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(apply(&mut members, &out).is_some());
        }
        // The sweep under the config the profiles were written with.
        for t in 0..values.len() {
            let out = changes(&h.tick(100 + t as i64)?)?;
            prop_assert!(out.is_empty());
        }
        h.operator = operator(
            &format!(
                "{{a: {{where: {{trait: v, gte: {new_gte}}}}}, \
                   b: {{where: {{trait: v, lt: {new_lt}}}}}}}"
            ),
            step,
        )
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let ids: Vec<&String> = values.keys().collect();
        for tick in 1..=values.len().div_ceil(step) + 1 {
            let out = changes(&h.tick(10_000 + tick as i64)?)?;
            prop_assert!(apply(&mut members, &out).is_some(), "{out:?}");
            let reached = (tick * step).min(ids.len());
            for (i, id) in ids.iter().enumerate() {
                let v = values[*id];
                let want: BTreeSet<String> = if i < reached {
                    [("a", v >= new_gte), ("b", v < new_lt)]
                        .into_iter()
                        .filter(|(_, holds)| *holds)
                        .map(|(name, _)| name.to_string())
                        .collect()
                } else if v >= old {
                    BTreeSet::from(["a".to_string()])
                } else {
                    BTreeSet::new()
                };
                let got = members.get(*id).cloned().unwrap_or_default();
                prop_assert_eq!(&got, &want, "{} after tick {}", id, tick);
            }
        }
    }
}
