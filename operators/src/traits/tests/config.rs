//! Config errors and malformed input.

use super::*;

#[test]
fn malformed_records_are_rejected_without_state() -> TestResult {
    let mut h = harness(DESIGN_TRAITS)?;
    for bad in [
        b"not json".to_vec(),
        serde_json::to_vec(
            &json!({"type": "event", "profile_id": "p", "identifiers": {}, "event": 5}),
        )?,
        serde_json::to_vec(
            &json!({"type": "merged", "from": "p", "into": "p", "identifiers": {}, "cause": {}}),
        )?,
    ] {
        match h.process(Some(b"p"), &bad, &[]) {
            Err(OperatorError::Rejected { .. }) => {}
            other => return Err(format!("expected a rejection, got {other:?}").into()),
        }
    }
    // No profile's state; only the record of the config's definitions.
    assert!(
        h.state.map.keys().all(|k| k.starts_with(b"trait-config/")),
        "{:?}",
        h.state.map.keys()
    );
    Ok(())
}

#[test]
fn config_errors_name_the_field() -> TestResult {
    let bad = "t: {event_counter: {event: X, where: [{property: p, gt: [1]}]}}";
    let de = serde_yaml::Deserializer::from_str(bad);
    let err = match serde_path_to_error::deserialize::<_, BTreeMap<String, TraitDef>>(de) {
        Err(e) => e,
        Ok(_) => return Err("expected an error".into()),
    };
    assert!(
        err.path()
            .to_string()
            .starts_with("t.event_counter.where[0]"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("`gt` expects a number or a string"),
        "{err}"
    );
    for bad in [
        "t: {event_counter: {event: X, window: 3d}}",
        "t: {event_counter: {event: X, where: [{property: p, gt: 1, lt: 5}]}}",
        "t: {event_counter: {event: X, where: [{property: p, between: 1}]}}",
        "t: {sum: {event: X}}",
    ] {
        assert!(
            serde_yaml::from_str::<BTreeMap<String, TraitDef>>(bad).is_err(),
            "{bad}"
        );
    }
    let zero: BTreeMap<String, TraitDef> =
        serde_yaml::from_str("t: {event_counter: {event: X, within: 0d}}")?;
    let err = TraitSet::new(&zero).err().ok_or("expected an error")?;
    assert_eq!(err.path, "traits.t.event_counter.within");
    let set = trait_set(DESIGN_TRAITS)?;
    assert!(set.names().contains("orders_30d"));
    Ok(())
}
