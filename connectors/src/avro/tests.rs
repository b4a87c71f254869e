use super::*;
use proptest::prelude::*;
use serde_json::json;

fn change(traits: serde_json::Value) -> AudienceChange {
    AudienceChange {
        kind: "audience_change".into(),
        audience: "big_spenders".into(),
        action: AudienceAction::Entered,
        profile_id: "prof_1".into(),
        identifiers: [
            ("user_id".to_string(), vec!["u1".to_string()]),
            (
                "anonymous_id".to_string(),
                vec!["a1".to_string(), "a2".to_string()],
            ),
        ]
        .into_iter()
        .collect(),
        traits: serde_json::from_value(traits).unwrap_or_default(),
        event_time: "2026-11-26T10:00:00Z".into(),
        emitted_at: "2026-11-26T10:00:00.120Z".into(),
        cause: Cause {
            message_id: Some("m-1".into()),
            tick: None,
        },
        merged_into: None,
    }
}

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn the_schema_in_the_repository_parses_and_names_the_contract() -> TestResult {
    let schema = Schema::parse_str(SCHEMA)?;
    let Schema::Record(record) = &schema else {
        return Err("not a record".into());
    };
    assert_eq!(record.name.fullname(None), "cdp.AudienceChange");
    // Every field of the JSON form, in its order.
    let fields: Vec<&str> = record.fields.iter().map(|f| f.name.as_str()).collect();
    // Every optional field present.
    let mut full = change(json!({}));
    full.merged_into = Some("prof_b".into());
    let json_fields: Vec<String> = match serde_json::to_value(full)? {
        serde_json::Value::Object(m) => m.keys().cloned().collect(),
        _ => Vec::new(),
    };
    assert_eq!(fields, json_fields);
    Ok(())
}

#[test]
fn both_framings_round_trip_every_kind_of_trait_value() -> TestResult {
    let original = change(json!({
        "revenue_total": 550.0, "orders": 3, "vip": true, "plan": "pro", "gone": null,
        "categories": ["shoes", "hats"], "last_order": {"id": "o1", "total": 12.5}
    }));
    for framing in [Framing::SingleObject, Framing::Confluent { schema_id: 42 }] {
        let codec = AvroCodec::new(framing)?;
        let bytes = codec.encode(&original)?;
        assert!(is_avro(&bytes));
        assert_eq!(codec.decode(&bytes)?, original, "{framing:?}");
        // The JSON form of the decoded change is byte for byte the JSON form.
        assert_eq!(
            serde_json::to_vec(&codec.decode(&bytes)?)?,
            serde_json::to_vec(&original)?
        );
    }
    Ok(())
}

#[test]
fn framing_bytes_follow_the_specs() -> TestResult {
    let original = change(json!({}));
    let single = AvroCodec::new(Framing::SingleObject)?.encode(&original)?;
    assert_eq!(&single[..2], &[0xC3, 0x01]);
    let confluent = AvroCodec::new(Framing::Confluent {
        schema_id: 0x0102_0304,
    })?
    .encode(&original)?;
    assert_eq!(&confluent[..5], &[0, 1, 2, 3, 4]);
    // The same Avro body after the two headers (maps have no order in
    // Avro, so the bytes may differ but not their length).
    assert_eq!(single.len() - 10, confluent.len() - 5);
    Ok(())
}

#[test]
fn decode_reads_json_too_and_refuses_foreign_fingerprints() -> TestResult {
    let codec = AvroCodec::new(Framing::SingleObject)?;
    let original = change(json!({"orders": 2}));
    assert_eq!(codec.decode(&serde_json::to_vec(&original)?)?, original);
    let mut bytes = codec.encode(&original)?;
    bytes[5] ^= 0xff;
    assert!(matches!(
        codec.decode(&bytes),
        Err(CodecError::UnknownFingerprint { .. })
    ));
    assert!(matches!(
        codec.decode(&[0, 1]),
        Err(CodecError::Truncated(2))
    ));
    assert!(codec.decode(&[0, 0, 0, 0, 1, 0xff]).is_err());
    Ok(())
}

/// Top-level trait values: any JSON scalar, any finite double (they travel
/// as Avro doubles, bit for bit), or a nested array/object.
fn trait_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        scalar(),
        (-1e12f64..1e12).prop_map(serde_json::Value::from),
        nested(),
    ]
}

fn scalar() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[a-z ]{0,8}".prop_map(serde_json::Value::from),
        // Doubles inside arrays and objects travel as JSON text, and
        // serde_json's default float parser is exact only for short
        // decimals (as for any consumer of the JSON topic): quarters.
        (-4_000_000i64..4_000_000).prop_map(|q| serde_json::Value::from(q as f64 / 4.0)),
    ]
}

fn nested() -> impl Strategy<Value = serde_json::Value> {
    scalar().prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..3)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    /// Oracle: the JSON form. Whatever traits a change holds, the Avro
    /// record decodes to a change whose JSON is the original's JSON.
    #[test]
    fn avro_decodes_to_the_same_json(
        traits in prop::collection::btree_map("[a-z_]{1,10}", trait_value(), 0..6),
        exited in any::<bool>(),
        tick in proptest::option::of(any::<i64>()),
        merged_into in proptest::option::of("prof_[0-9a-f]{4}"),
    ) {
        let mut c = change(json!({}));
        c.traits = traits;
        c.cause.tick = tick;
        c.merged_into = merged_into;
        if exited {
            c.action = AudienceAction::Exited;
        }
        let codec = AvroCodec::new(Framing::SingleObject).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let bytes = codec.encode(&c).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back = codec.decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(
            serde_json::to_string(&back).unwrap_or_default(),
            serde_json::to_string(&c).unwrap_or_default()
        );
    }
}
