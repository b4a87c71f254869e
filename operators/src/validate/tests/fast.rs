use super::*;

fn arb_id() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        "[ab]{0,2}".prop_map(|s| Some(Value::String(s))),
        (0i64..3).prop_map(|n| Some(json!(n))),
        Just(Some(json!({"x": 1}))),
    ]
}

fn arb_json_event() -> impl Strategy<Value = Vec<u8>> {
    let kind = prop::sample::select(vec![
        "identify", "track", "page", "screen", "group", "alias", "bogus",
    ]);
    let name = prop::option::of(prop::sample::select(vec![
        "Order Completed",
        "Product Viewed",
        "",
        "Page Viewed",
    ]));
    let props = prop::option::of(prop::sample::select(vec![
        json!({"revenue": 5}),
        json!({"revenue": -1, "coupon": 2}),
        json!({"revenue": "x", "extra": {"deep": [1]}}),
        json!({}),
        json!([1]),
    ]));
    let message_id = prop::option::of(prop_oneof![
        "m[0-3]".prop_map(Value::String),
        Just(json!(7)),
        Just(Value::String("m".repeat(101))),
    ]);
    let timestamp = prop::option::of(prop::sample::select(vec![
        json!("2026-11-26T10:00:00Z"),
        json!("garbage"),
        json!(12),
    ]));
    (
        kind,
        arb_id(),
        arb_id(),
        name,
        props,
        message_id,
        timestamp,
        arb_id(),
    )
        .prop_map(
            |(kind, user, anon, name, props, message_id, timestamp, other)| {
                let mut e = Map::new();
                e.insert("type".into(), json!(kind));
                let fields = [
                    ("userId", user),
                    ("anonymousId", anon),
                    ("event", name.map(Value::from)),
                    ("properties", props.clone()),
                    ("traits", props),
                    ("messageId", message_id),
                    ("timestamp", timestamp),
                    ("groupId", other.clone()),
                    ("previousId", other),
                ];
                for (k, v) in fields {
                    if let Some(v) = v {
                        e.insert(k.into(), v);
                    }
                }
                serde_json::to_vec(&Value::Object(e)).unwrap_or_default()
            },
        )
}

fn arb_input() -> impl Strategy<Value = (Vec<u8>, Option<&'static str>)> {
    let bytes = prop_oneof![4 => arb_json_event(), 1 => prop::collection::vec(any::<u8>(), 0..40)];
    let source = prop::sample::select(vec![
        Some("web"),
        Some("web"),
        Some("ios"),
        Some("nope"),
        None,
    ]);
    (bytes, source)
}

fn policy() -> impl Strategy<Value = TrackingPlan> {
    (
        prop::sample::select(vec![UnplannedEvents::Allow, UnplannedEvents::Block]),
        prop::sample::select(vec![
            ViolationPolicy::Block,
            ViolationPolicy::Omit,
            ViolationPolicy::Allow,
        ]),
    )
        .prop_map(|(u, v)| shop_plan(u, v))
}

type Reference = Result<Value, (&'static str, Value)>;

/// The reference outcome of one record: the whole event parsed into a
/// `Value`, then [`Validator::check_event`].
fn reference(v: &Validator, bytes: &[u8], src: Option<&str>) -> Reference {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        let error = "empty record (a tombstone?): expected one Segment event as a JSON object";
        return Err(("invalid_json", json!({"source": src, "error": error})));
    }
    let event: Value = serde_json::from_slice(bytes).map_err(|e| {
        let mut error = e.to_string();
        if bytes.starts_with("\u{feff}".as_bytes()) {
            error.push_str(
                " (the record starts with a UTF-8 byte order mark: write the JSON without one)",
            );
        }
        ("invalid_json", json!({"source": src, "error": error}))
    })?;
    if !event.is_object() {
        return Err((
            "invalid_json",
            json!({"source": src, "error": "expected a JSON object"}),
        ));
    }
    let Some(source) = src.filter(|s| v.has_source(s)) else {
        return Err(("unknown_source", json!({ "source": src })));
    };
    v.check_event(source, event).map_err(|e| match e {
        OperatorError::Rejected { reason, detail } => (reason, detail),
        OperatorError::Store(e) => ("store", json!(e.to_string())),
    })
}

/// JSON equality where floats may differ in the last place: serde_json
/// parses floats fast, not exactly, so a value that was re-encoded and
/// parsed again (the reference path) can move by an ulp.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => x == y || ((x - y) / x).abs() < 1e-15,
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

fn same_outcome(a: &Reference, b: &Reference) -> bool {
    match (a, b) {
        (Ok(a), Ok(b)) => same_json(a, b),
        _ => a == b,
    }
}

/// What the operator did with one record, in the reference's terms
/// (dedupe must be off).
fn operator_outcome(
    h: &mut OperatorHarness<ValidateOperator>,
    bytes: &[u8],
    src: Option<&str>,
) -> Result<Reference, String> {
    let headers: Vec<(String, Vec<u8>)> = src
        .map(|s| (SOURCE.to_string(), s.as_bytes().to_vec()))
        .into_iter()
        .collect();
    match h.process(None, bytes, &headers) {
        Ok(out) => match out.as_slice() {
            [one] => serde_json::from_slice(&one.value)
                .map(Ok)
                .map_err(|e| format!("output is not JSON: {e}")),
            other => Err(format!("{} outputs", other.len())),
        },
        Err(OperatorError::Rejected { reason, detail }) => Ok(Err((reason, detail))),
        Err(e) => Err(e.to_string()),
    }
}

fn no_dedupe(plan: TrackingPlan) -> Result<OperatorHarness<ValidateOperator>, ConfigError> {
    let plans = BTreeMap::from([("shop".to_string(), plan)]);
    let sources = [source("web", Some("shop")), source("ios", None)];
    let v = Validator::new(&sources, &plans, Span::from_millis(0))?;
    Ok(OperatorHarness::new(ValidateOperator::new(Arc::new(v))))
}

#[test]
fn the_fast_path_agrees_with_the_reference_on_tricky_bytes() -> TestResult {
    let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    let cases: Vec<Vec<u8>> = vec![
        // Repeated names: the last one wins, as in a parsed event.
        br#"{"type":"identify","type":"track","event":"Order Completed","userId":"u","properties":{"revenue":-1}}"#.to_vec(),
        br#"{"type":"track","event":"Order Completed","userId":"u","properties":{"revenue":-1},"properties":{"revenue":1}}"#.to_vec(),
        br#"{"type":"track","event":"Order Completed","userId":"u","properties":{"revenue":1},"context":{"protocols":{"event_version":2},"protocols":{}}}"#.to_vec(),
        br#"{"type":"track","event":"Order Completed","userId":"u","properties":{"revenue":1},"context":{"protocols":{"event_version":2,"event_version":1}}}"#.to_vec(),
        br#"{"type":"track","event":"Order Completed","userId":"u","properties":{"revenue":1},"context":{"protocols":{"event_version":1}},"context":{"protocols":{"event_version":9}}}"#.to_vec(),
        br#"{"type":"page","userId":"u","event":"Home","event":"Page Viewed"}"#.to_vec(),
        // The body comes before the members that say whether it is checked.
        br#"{"type":"identify","userId":"u","properties":{"revenue":-1},"type":"track","event":"Order Completed"}"#.to_vec(),
        br#"{"properties":{"revenue":-1},"traits":{"email":"x"},"type":"track","userId":"u","event":"Order Completed"}"#.to_vec(),
        br#"{"type":"track","event":"Unplanned","userId":"u","properties":{"revenue":-1},"event":"Order Completed"}"#.to_vec(),
        br#"{"type":"page","userId":"u","event":null}"#.to_vec(),
        // Escaped member names are the same names.
        br#"{"typ\u0065":"track","\u0065vent":"Order Completed","userId":"u","properties":{"revenue":"x"}}"#.to_vec(),
        // Strictness inside members the fast path does not build.
        br#"{"type":"track","event":"X","userId":"u","context":{"n":1e400}}"#.to_vec(),
        br#"{"type":"track","event":"X","userId":"u","context":{"s":"\ud800"}}"#.to_vec(),
        b"{\"type\":\"track\",\"event\":\"X\",\"userId\":\"u\",\"context\":{\"s\":\"\xff\"}}".to_vec(),
        b"{\"type\":\"track\",\"event\":\"X\",\"userId\":\"u\",\"integrations\":{\"\xc3\":1}}".to_vec(),
        format!(r#"{{"type":"track","event":"X","userId":"u","context":{{"d":{}}}}}"#, deep(200)).into_bytes(),
        format!(r#"{{"type":"track","event":"X","userId":"u","extra":{}}}"#, deep(120)).into_bytes(),
        br#"{"type":"track","event":"X","userId":"u","extra":[1,2,]}"#.to_vec(),
        br#"{"type":"track","event":"X","userId":"u"} trailing"#.to_vec(),
        b"\xef\xbb\xbf{\"type\":\"track\",\"event\":\"X\",\"userId\":\"u\"}".to_vec(),
        b" \n\t{\"type\":\"screen\",\"userId\":\"u\"}\n ".to_vec(),
        br#"[{"type":"track"}]"#.to_vec(),
        b"null".to_vec(),
        // 300 entries but one distinct name: within the limit.
        format!(
            r#"{{"type":"track","event":"X","userId":"u","properties":{{{}}}}}"#,
            vec![r#""a":1"#; TRAITS_LIMIT].join(",")
        )
        .into_bytes(),
    ];
    for plan in [
        versioned_plan(ViolationPolicy::Block),
        versioned_plan(ViolationPolicy::Omit),
        common_plan(ViolationPolicy::Allow),
    ] {
        let mut h = no_dedupe(plan)?;
        for bytes in &cases {
            for src in [Some("web"), Some("ios"), Some("nope"), None] {
                let expected = reference(&h.operator.validator, bytes, src);
                let got = operator_outcome(&mut h, bytes, src)?;
                assert_eq!(
                    got,
                    expected,
                    "{} from {src:?}",
                    String::from_utf8_lossy(bytes)
                );
            }
        }
    }
    Ok(())
}

#[test]
fn page_calls_without_an_event_get_it_as_the_first_member() -> TestResult {
    let mut h = plan_harness(TrackingPlan::default())?;
    let bytes = br#" {"type":"page","userId":"u","name":"Home"}"#;
    let out = h.process(None, bytes, &web())?;
    assert_eq!(
        out.first().map(|o| o.value.as_slice()),
        Some(&br#"{"event":"Page Viewed","type":"page","userId":"u","name":"Home"}"#[..])
    );
    Ok(())
}

/// What became of one record.
#[derive(Debug)]
enum Outcome {
    Forwarded(Value),
    Rejected,
    Duplicate,
}

/// Feed one record and check it had exactly one outcome: one output to
/// `next` (a JSON object that passes the spec and its plan again, and
/// whose `(source, messageId)` was not forwarded before), a rejection
/// that wrote no state, or no output at all for a `messageId` this
/// source already forwarded. Never a store error.
fn one_outcome(
    h: &mut OperatorHarness<ValidateOperator>,
    forwarded: &mut std::collections::BTreeSet<(String, String)>,
    bytes: &[u8],
    src: Option<&str>,
) -> Result<Outcome, TestCaseError> {
    let headers: Vec<(String, Vec<u8>)> = src
        .map(|s| (SOURCE.to_string(), s.as_bytes().to_vec()))
        .into_iter()
        .collect();
    let state_before = h.state.map.clone();
    let id = serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|e| e.get("messageId").and_then(Value::as_str).map(String::from))
        .map(|id| (src.unwrap_or_default().to_string(), id));
    match h.process(None, bytes, &headers) {
        Err(OperatorError::Rejected { .. }) => {
            prop_assert_eq!(&h.state.map, &state_before, "rejection wrote state");
            Ok(Outcome::Rejected)
        }
        Err(e) => Err(TestCaseError::fail(format!("store error {e}"))),
        Ok(out) => match out.as_slice() {
            [] => {
                prop_assert!(
                    id.is_some_and(|id| forwarded.contains(&id)),
                    "dropped a non-duplicate"
                );
                Ok(Outcome::Duplicate)
            }
            [one] => {
                prop_assert_eq!(one.output, outputs::NEXT);
                let event: Value = serde_json::from_slice(&one.value)
                    .map_err(|e| TestCaseError::fail(format!("output is not JSON: {e}")))?;
                let spec = event.as_object().map(spec_violations);
                prop_assert_eq!(spec, Some(Vec::new()), "forwarded a spec violation");
                let again = h
                    .operator
                    .validator
                    .check_event(src.unwrap_or_default(), event.clone());
                prop_assert!(again.is_ok(), "output fails its own check: {:?}", again);
                if let Some(id) = id {
                    prop_assert!(forwarded.insert(id), "forwarded a duplicate");
                }
                Ok(Outcome::Forwarded(event))
            }
            more => Err(TestCaseError::fail(format!("{} outputs", more.len()))),
        },
    }
}

fn validator_for(plan: TrackingPlan) -> Result<Validator, TestCaseError> {
    let plans = BTreeMap::from([("shop".to_string(), plan)]);
    let sources = [source("web", Some("shop")), source("ios", None)];
    Validator::new(&sources, &plans, DEFAULT_DEDUPE_WINDOW)
        .map_err(|e| TestCaseError::fail(e.to_string()))
}

/// Events as SDKs send them, with every optional part filled in.
fn realistic_events() -> Vec<Value> {
    let context = json!({
        "app": {"name": "Shop", "version": "4.2.0", "build": "420"},
        "library": {"name": "analytics.js", "version": "4.1.0"},
        "page": {"path": "/checkout", "referrer": "https://example.com/", "url": "https://shop.example.com/checkout"},
        "traits": {"email": "ada@example.com"},
        "externalIds": [{"id": "c_1", "type": "crm_id", "collection": "users", "encoding": "none"}],
        "protocols": {"event_version": 2},
        "ip": "203.0.113.7", "locale": "de-DE", "timezone": "Europe/Berlin"
    });
    let common = |kind: &str, id: &str| {
        json!({"type": kind, "messageId": id, "userId": "u_42", "anonymousId": "a_1",
               "timestamp": "2026-11-26T10:00:00.000Z", "sentAt": "2026-11-26T10:00:00.120Z",
               "receivedAt": "2026-11-26T10:00:00.180Z", "context": context.clone(),
               "integrations": {"All": true, "Mixpanel": false}})
    };
    let mut order = common("track", "m-order");
    order["event"] = json!("Order Completed");
    order["properties"] = json!({"order_id": "o_1", "revenue": 99.5, "currency": "EUR", "coupon": "SPRING",
                                 "products": [{"sku": "SKU-1", "price": 49.75, "quantity": 2}]});
    let mut viewed = common("track", "m-view");
    viewed["event"] = json!("Product Viewed");
    viewed["properties"] = json!({"sku": "SKU-1", "category": "shoes", "price": 49.75});
    let mut identify = common("identify", "m-identify");
    identify["traits"] = json!({"email": "ada@example.com", "plan": "pro", "logins": 5});
    let mut page = common("page", "m-page");
    page["name"] = json!("Checkout");
    page["properties"] = json!({"path": "/checkout", "title": "Checkout"});
    let mut screen = common("screen", "m-screen");
    screen["name"] = json!("Cart");
    let mut group = common("group", "m-group");
    group["groupId"] = json!("g_7");
    group["traits"] = json!({"name": "Acme", "employees": 120});
    let mut alias = common("alias", "m-alias");
    alias["previousId"] = json!("a_1");
    vec![order, viewed, identify, page, screen, group, alias]
}

/// Every JSON pointer inside `v` (the root excluded).
fn pointers_in(v: &Value, at: &str, out: &mut Vec<String>) {
    let children: Vec<(String, &Value)> = match v {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| (escape_pointer_segment(k), v))
            .collect(),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        _ => return,
    };
    for (segment, child) in children {
        let here = format!("{at}/{segment}");
        out.push(here.clone());
        pointers_in(child, &here, out);
    }
}

#[derive(Debug, Clone)]
enum JsonMutation {
    /// Remove the value at the `n`-th pointer.
    Delete(usize),
    /// Replace the value at the `n`-th pointer.
    Replace(usize, Value),
    /// Set a key at the root (`true`) or in the `n`-th pointer's object.
    Insert(Option<usize>, String, Value),
}

#[derive(Debug, Clone)]
enum ByteMutation {
    /// Keep the first `n` bytes (modulo the length).
    Truncate(usize),
    /// Overwrite bytes at positions (modulo the length).
    Overwrite(Vec<(usize, u8)>),
    /// Insert bytes at a position (modulo the length).
    Splice(usize, Vec<u8>),
    /// Replace everything with random bytes.
    Random(Vec<u8>),
}

fn apply_json(event: &mut Value, mutation: &JsonMutation) {
    let mut all = Vec::new();
    pointers_in(event, "", &mut all);
    let pick = |n: usize| all.get(n % all.len().max(1)).cloned();
    match mutation {
        JsonMutation::Delete(n) => {
            let Some(pointer) = pick(*n) else { return };
            let Some((parent, last)) = pointer.rsplit_once('/') else {
                return;
            };
            let key = unescape_pointer_segment(last);
            match event.pointer_mut(parent) {
                Some(Value::Object(m)) => {
                    m.shift_remove(&key);
                }
                Some(Value::Array(a)) => {
                    if let Ok(i) = key.parse::<usize>() {
                        if i < a.len() {
                            a.remove(i);
                        }
                    }
                }
                _ => {}
            }
        }
        JsonMutation::Replace(n, value) => {
            if let Some(slot) = pick(*n).and_then(|p| event.pointer_mut(&p)) {
                *slot = value.clone();
            }
        }
        JsonMutation::Insert(at, key, value) => {
            let target = match at {
                None => Some(&mut *event),
                Some(n) => pick(*n).and_then(|p| event.pointer_mut(&p)),
            };
            if let Some(Value::Object(m)) = target {
                m.insert(key.clone(), value.clone());
            }
        }
    }
}

fn apply_bytes(bytes: &mut Vec<u8>, mutation: &ByteMutation) {
    let len = bytes.len().max(1);
    match mutation {
        ByteMutation::Truncate(n) => bytes.truncate(n % len),
        ByteMutation::Overwrite(at) => {
            for (i, b) in at {
                if let Some(slot) = bytes.get_mut(i % len) {
                    *slot = *b;
                }
            }
        }
        ByteMutation::Splice(at, inserted) => {
            let at = (at % len).min(bytes.len());
            bytes.splice(at..at, inserted.iter().copied());
        }
        ByteMutation::Random(random) => *bytes = random.clone(),
    }
}

/// Values that stress the checks: other types, extremes, huge and
/// exotic strings, deep nesting.
fn arb_nasty_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from), // NaN and infinities become null
        Just(json!(1e308)),
        "\\PC{0,24}".prop_map(Value::from),
        prop::sample::select(vec![
            "",
            " ",
            "\u{0}",
            "\u{202e}gnp.exe",
            "\u{feff}",
            "👩‍👩‍👧‍👦",
            "ｔｒａｃｋ",
            "track ",
            "TRACK",
            "Order Completed\u{0}",
            "1970-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "2026-02-30T00:00:00Z",
            "null",
            "undefined",
            "~1/~0",
        ])
        .prop_map(Value::from),
        (
            1usize..5,
            prop::sample::select(vec!["x", "é", "😀", "\u{10ffff}"])
        )
            .prop_map(|(kb, s)| Value::from(s.repeat(kb * 16 * 1024 / s.len()))),
        (1usize..200).prop_map(|depth| {
            (0..depth).fold(json!("leaf"), |inner, i| {
                if i % 2 == 0 {
                    json!([inner])
                } else {
                    json!({"d": inner})
                }
            })
        }),
        prop::collection::vec(any::<u8>(), 0..8).prop_map(|v| json!(v)),
        Just(json!({})),
        Just(json!([])),
    ]
}

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "type",
            "userId",
            "anonymousId",
            "event",
            "messageId",
            "timestamp",
            "sentAt",
            "receivedAt",
            "originalTimestamp",
            "properties",
            "traits",
            "context",
            "integrations",
            "groupId",
            "previousId",
            "name",
            "revenue",
            "protocols",
            "event_version",
            "email",
        ])
        .prop_map(String::from),
        "\\PC{0,12}",
    ]
}

fn arb_json_mutation() -> impl Strategy<Value = JsonMutation> {
    prop_oneof![
        any::<usize>().prop_map(JsonMutation::Delete),
        (any::<usize>(), arb_nasty_value()).prop_map(|(n, v)| JsonMutation::Replace(n, v)),
        (
            prop::option::of(any::<usize>()),
            arb_key(),
            arb_nasty_value()
        )
            .prop_map(|(n, k, v)| JsonMutation::Insert(n, k, v)),
    ]
}

fn arb_byte_mutation() -> impl Strategy<Value = ByteMutation> {
    prop_oneof![
        any::<usize>().prop_map(ByteMutation::Truncate),
        prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)
            .prop_map(ByteMutation::Overwrite),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, b)| ByteMutation::Splice(at, b)),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(ByteMutation::Random),
    ]
}

/// A realistic event (by index), JSON mutations, maybe a byte mutation,
/// and the source header it comes with.
type MutatedInput = (
    usize,
    Vec<JsonMutation>,
    Option<ByteMutation>,
    Option<&'static str>,
);

fn arb_mutated_input() -> impl Strategy<Value = MutatedInput> {
    (
        any::<usize>(),
        prop::collection::vec(arb_json_mutation(), 0..4),
        prop::option::weighted(0.2, arb_byte_mutation()),
        prop::sample::select(vec![
            Some("web"),
            Some("web"),
            Some("web"),
            Some("ios"),
            None,
        ]),
    )
}

fn arb_plan() -> impl Strategy<Value = TrackingPlan> {
    (policy(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
        |(mut plan, common, versions, nested)| {
            if nested {
                // Arrays of objects with pattern, bounds and required keys:
                // the shapes the streaming check handles itself.
                plan.events.insert(
                    "Order Completed".into(),
                    json!({"type": "object", "required": ["revenue"], "properties": {
                    "revenue": {"type": "number", "minimum": 0},
                    "coupon": {"type": "string"},
                    "products": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                        "type": "object", "required": ["sku"], "properties": {
                            "sku": {"type": "string", "pattern": "^SKU-"},
                            "price": {"type": "number"},
                            "quantity": {"type": "integer", "minimum": 1}}}}}}),
                );
            }
            if common {
                plan.common = common_plan(plan.on_violation).common;
            }
            if versions {
                plan.event_versions = versioned_plan(plan.on_violation).event_versions;
            }
            plan
        },
    )
}

proptest! {
    /// Every input yields exactly one of: one output, a rejection, or a
    /// silent drop of a `messageId` this source already forwarded.
    #[test]
    fn every_input_has_exactly_one_outcome(plan in policy(), inputs in prop::collection::vec(arb_input(), 1..25)) {
        let mut h = OperatorHarness::new(ValidateOperator::new(Arc::new(validator_for(plan)?)));
        let mut forwarded = std::collections::BTreeSet::new();
        for (bytes, src) in inputs {
            one_outcome(&mut h, &mut forwarded, &bytes, src)?;
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let h = harness(Some(shop_plan(UnplannedEvents::Block, ViolationPolicy::Omit)));
        prop_assert!(h.is_ok());
        if let Ok(mut h) = h {
            let result = h.process(None, &bytes, &web());
            prop_assert!(!matches!(result, Err(OperatorError::Store(_))));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// The operator's fast path decides exactly as the reference path
    /// (parse everything, then `check_event`): same rejection and
    /// detail, or the same event forwarded.
    #[test]
    fn the_fast_path_agrees_with_the_reference(plan in arb_plan(), inputs in prop::collection::vec(arb_mutated_input(), 1..12)) {
        let mut h = no_dedupe(plan).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let events = realistic_events();
        for (index, json_mutations, byte_mutation, src) in inputs {
            let mut event = events[index % events.len()].clone();
            for m in &json_mutations {
                apply_json(&mut event, m);
            }
            let mut bytes = serde_json::to_vec(&event).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if let Some(m) = &byte_mutation {
                apply_bytes(&mut bytes, m);
            }
            let expected = reference(&h.operator.validator, &bytes, src);
            let got = operator_outcome(&mut h, &bytes, src).map_err(TestCaseError::fail)?;
            prop_assert!(same_outcome(&got, &expected), "{:?} != {:?}", got, expected);
        }
    }

    /// Fuzz: realistic events with fields deleted, retyped or added
    /// (huge, exotic, deeply nested values) and bytes cut or garbled,
    /// under every policy, with and without a common schema and event
    /// versions. Nothing panics, every record has exactly one outcome,
    /// and under `block` what is forwarded is exactly what a second
    /// check would forward.
    #[test]
    fn mutated_events_have_exactly_one_outcome(plan in arb_plan(), inputs in prop::collection::vec(arb_mutated_input(), 1..12)) {
        let block = plan.on_violation == ViolationPolicy::Block;
        let mut h = OperatorHarness::new(ValidateOperator::new(Arc::new(validator_for(plan)?)));
        let events = realistic_events();
        let mut forwarded = std::collections::BTreeSet::new();
        for (index, json_mutations, byte_mutation, src) in inputs {
            let mut event = events[index % events.len()].clone();
            for m in &json_mutations {
                apply_json(&mut event, m);
            }
            let mut bytes = serde_json::to_vec(&event).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if let Some(m) = &byte_mutation {
                apply_bytes(&mut bytes, m);
            }
            if let Outcome::Forwarded(out) = one_outcome(&mut h, &mut forwarded, &bytes, src)? {
                if block {
                    let again = h.operator.validator.check_event(src.unwrap_or_default(), out.clone());
                    prop_assert_eq!(again.ok(), Some(out));
                }
            }
        }
    }
}

proptest! {
    /// The collector's check over raw members finds exactly what the
    /// check over the parsed event finds (same pointers, same reasons),
    /// also for duplicate-free events with times, names and ids of every
    /// kind, several of them broken.
    #[test]
    fn the_raw_spec_check_equals_the_parsed_one(
        bytes in arb_json_event(),
        name in prop::option::of(prop_oneof![Just(json!("Home")), Just(json!(3))]),
        sent_at in prop::option::of(prop_oneof![Just(json!("2026-11-26T10:00:00Z")), Just(json!("soon"))]),
        context in prop::option::of(prop_oneof![Just(json!({"ip": "1.2.3.4"})), Just(json!("x")), Just(json!([]))]),
        // Around Segment's limit of fewer than 300 traits, short keys
        // and long ones.
        many in prop::option::of((298usize..302, any::<bool>(), any::<bool>())),
    ) {
        let mut event: Map<String, Value> = serde_json::from_slice(&bytes)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let many = many.map(|(n, long, traits)| {
            let object: Map<String, Value> = (0..n)
                .map(|i| (if long { format!("property_{i:05}") } else { i.to_string() }, json!(0)))
                .collect();
            (if traits { "traits" } else { "properties" }, Value::Object(object))
        });
        if let Some((k, v)) = many {
            event.insert(k.into(), v);
        }
        for (k, v) in [("name", name), ("sentAt", sent_at), ("context", context)] {
            if let Some(v) = v {
                event.insert(k.into(), v);
            }
        }
        let raw: BTreeMap<String, Box<serde_json::value::RawValue>> = event
            .iter()
            .map(|(k, v)| serde_json::value::to_raw_value(v).map(|r| (k.clone(), r)))
            .collect::<Result<_, _>>()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let from_raw = spec_violations_raw(|k| raw.get(k).map(|r| &**r));
        prop_assert_eq!(from_raw, spec_violations(&event));
    }
}
