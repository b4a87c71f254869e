//! Config errors and malformed input.

use super::*;

#[test]
fn cycles_and_unknown_audiences_are_rejected_with_a_path() -> TestResult {
    let cyclic = defs(
        "a: {where: {all: [{trait: x, exists: true}, {audience: b}]}}\n\
             b: {where: {not: {audience: a}}}\n\
             c: {where: {audience: a}}",
    )?;
    let err = AudienceSet::new(&cyclic, &KnownNames::anything())
        .err()
        .ok_or("expected an error")?;
    assert_eq!(err.to_string(), "audiences.a: cycle a -> b -> a");
    let own = defs("s: {where: {any: [{audience: s}]}}")?;
    let err = AudienceSet::new(&own, &KnownNames::anything())
        .err()
        .ok_or("expected an error")?;
    assert_eq!(err.to_string(), "audiences.s: cycle s -> s");
    let unknown = defs("x: {where: {all: [{trait: t, gt: 1}, {any: [{audience: nope}]}]}}")?;
    let err = AudienceSet::new(&unknown, &KnownNames::anything())
        .err()
        .ok_or("expected an error")?;
    assert_eq!(err.path, "audiences.x.where.all[1].any[0].audience");
    assert_eq!(err.message, "unknown audience \"nope\"");
    let zero = defs("z: {where: {event: E, within: 0d}}")?;
    let err = AudienceSet::new(&zero, &KnownNames::anything())
        .err()
        .ok_or("expected an error")?;
    assert_eq!(err.path, "audiences.z.where.within");
    Ok(())
}

#[test]
fn condition_parse_errors_carry_the_serde_path() -> TestResult {
    let path_of = |yaml: &str| -> Result<String, Box<dyn Error>> {
        let de = serde_yaml::Deserializer::from_str(yaml);
        match serde_path_to_error::deserialize::<_, BTreeMap<String, AudienceDef>>(de) {
            Err(e) => Ok(e.to_string()),
            Ok(_) => Err(format!("expected an error for {yaml}").into()),
        }
    };
    let e = path_of("vip: {where: {all: [{trait: t, gt: 1}, {event: E, count: 2}]}}")?;
    assert!(e.starts_with("vip.where.all[1].count: "), "{e}");
    assert!(e.contains("expected a map like {gte: 2}"), "{e}");
    let e = path_of("vip: {where: {all: [{event: E, count: {atleast: 2}}]}}")?;
    assert!(e.starts_with("vip.where.all[0].count"), "{e}");
    let e = path_of("vip: {where: {not: {event: E, within: 2w}}}")?;
    assert!(e.starts_with("vip.where.not.within: "), "{e}");
    let e = path_of("vip: {where: {event: E, where: [{property: p, gt: {}}]}}")?;
    assert!(e.starts_with("vip.where.where[0]"), "{e}");
    for bad in [
        "vip: {where: {trait: t}}",
        "vip: {where: {trait: t, gt: 1, lt: 3}}",
        "vip: {where: {trait: t, event: E}}",
        "vip: {where: {audience: a, within: 1d}}",
        "vip: {where: {sequence: [{event: A, count: {gte: 1}}]}}",
        "vip: {where: {}}",
        "vip: {where: {frobnicate: 1}}",
        "vip: {where: {trait: t, gt: 1}, name: x}",
    ] {
        let e = path_of(bad)?;
        assert!(e.starts_with("vip"), "{bad}: {e}");
    }
    Ok(())
}

#[test]
fn malformed_updates_are_rejected_before_any_state_write() -> TestResult {
    let mut h = harness(DESIGN_AUDIENCES)?;
    for bad in [
        b"{".to_vec(),
        serde_json::to_vec(&json!({"type": "update", "profile_id": "p"}))?,
        serde_json::to_vec(
            &json!({"type": "transfer", "stage": "audiences", "from": "a", "into": "b",
                                        "state": {"events": 5}, "cause": {}}),
        )?,
    ] {
        match h.process(Some(b"p"), &bad, &[]) {
            Err(OperatorError::Rejected { .. }) => {}
            other => return Err(format!("expected a rejection, got {other:?}").into()),
        }
    }
    assert!(h.state.map.is_empty());
    // Another stage's transfer is not ours.
    let other = serde_json::to_vec(
        &json!({"type": "transfer", "stage": "traits", "from": "a", "into": "b",
                                                "state": {}, "cause": {}}),
    )?;
    assert!(h.process(Some(b"b"), &other, &[])?.is_empty());
    Ok(())
}
