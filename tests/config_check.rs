//! `cdp config check FILE` as users run it: the built binary, a file on
//! disk, the exit code and what it prints. No broker needed.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/demo-config.yaml");

fn check(file: &Path) -> std::io::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_cdp"))
        .args(["config", "check"])
        .arg(file)
        .env_remove("CDP_LOG_FORMAT")
        .output()
}

/// The demo config with `from` replaced by `to`, checked from a temp file.
fn check_edited(from: &str, to: &str) -> Result<Output, Box<dyn std::error::Error>> {
    let demo = std::fs::read_to_string(DEMO)?;
    let edited = demo.replace(from, to);
    if edited == demo {
        return Err(format!("{from:?} is not in the demo config").into());
    }
    let mut file = tempfile::NamedTempFile::new()?;
    file.write_all(edited.as_bytes())?;
    file.flush()?;
    Ok(check(file.path())?)
}

/// The demo config with `from` replaced by `to` fails the check, exit
/// code 1, with `error: <error>` (a path and a reason) on stderr and
/// nothing on stdout.
fn refused(from: &str, to: &str, error: &str) -> TestResult {
    let out = check_edited(from, to)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{to}: {out:?}");
    assert!(
        stderr.contains(&format!("error: {error}")),
        "{to}: {stderr}"
    );
    assert!(out.stdout.is_empty(), "{to}: {out:?}");
    Ok(())
}

#[test]
fn the_demo_config_is_ok() -> TestResult {
    let out = check(Path::new(DEMO))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("demo-config.yaml: ok ("), "{stdout}");
    assert!(stdout.contains("1 tracking plans"), "{stdout}");
    assert!(out.stderr.is_empty(), "{out:?}");
    Ok(())
}

#[test]
fn an_empty_file_is_ok_with_a_warning_that_no_request_can_authenticate() -> TestResult {
    let file = tempfile::NamedTempFile::new()?;
    let out = check(file.path())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stderr.contains("warning: no sources: the collector answers every request 401"),
        "{stderr}"
    );
    assert!(stderr.contains("cdp.raw directly"), "{stderr}");
    Ok(())
}

/// A trait reading a property its event's tracking plan does not declare
/// compiles (exit 0) with a warning naming its path and the likely name.
#[test]
fn a_property_the_plan_does_not_declare_is_ok_with_a_warning() -> TestResult {
    let out = check_edited(
        "property: properties.revenue, function: sum",
        "property: properties.revnue, function: sum",
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stderr.contains(
            "warning: traits.revenue_total: reads properties.revnue of \"Order Completed\", which tracking plan \"shop\" (source web) does not declare (it declares revenue); did you mean properties.revenue?"
        ),
        "{stderr}"
    );
    Ok(())
}

/// Limits under which one profile could outgrow the broker's record limit
/// compile with a warning naming them.
#[test]
fn limits_a_profile_could_outgrow_the_record_limit_with_are_warned_of() -> TestResult {
    let out = check_edited(
        "anonymous_id: {limit: 1000, priority: 3}",
        "anonymous_id: {limit: 5000, priority: 3}",
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stderr.contains("warning: identity.identifiers: a profile holding every type's limit"),
        "{stderr}"
    );
    assert!(!stderr.contains("warning: traits:"), "{stderr}");
    Ok(())
}

#[test]
fn a_key_given_twice_fails_with_its_path() -> TestResult {
    refused(
        "audiences:\n",
        "audiences:\n  lapsing:\n    where: {trait: revenue_total, gte: 1}\n",
        "audiences: duplicate entry with key \"lapsing\"",
    )
}

#[test]
fn two_identifier_types_of_one_priority_fail_with_the_path() -> TestResult {
    refused(
        "email: {limit: 5, priority: 2}",
        "email: {limit: 5, priority: 1}",
        "identity.identifiers.user_id.priority: 1 is also email's",
    )
}

#[test]
fn a_broken_json_schema_fails_with_its_path() -> TestResult {
    refused(
        "minimum: 0}}",
        "minimum: zero}}",
        "tracking_plans.shop.events.Order Completed: invalid JSON Schema: ",
    )
}

#[test]
fn an_unknown_policy_fails_with_its_path() -> TestResult {
    refused(
        "on_violation: block",
        "on_violation: quarantine",
        "tracking_plans.shop.on_violation: unknown variant `quarantine`, expected one of `block`, `omit`, `allow`",
    )
}

#[test]
fn a_missing_file_fails_with_its_name() -> TestResult {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("nope.yaml");
    let out = check(&missing)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr.contains("nope.yaml: cannot read: "), "{stderr}");
    // The cause once, not twice.
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    Ok(())
}

#[test]
fn config_schema_prints_the_published_schema() -> TestResult {
    let out = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .args(["config", "schema"])
        .env_remove("CDP_LOG_FORMAT")
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout)?;
    let schema: serde_json::Value = serde_json::from_str(&printed)?;
    assert_eq!(
        schema["$schema"],
        serde_json::json!("http://json-schema.org/draft-07/schema#")
    );
    let published = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/cdp-config.schema.json"
    ))?;
    assert!(
        printed == published,
        "deploy/cdp-config.schema.json is stale; regenerate it with \
         `cargo run -- config schema > deploy/cdp-config.schema.json`"
    );
    Ok(())
}

#[test]
fn an_empty_broker_list_fails_with_its_path() -> TestResult {
    for brokers in ["\"\"", "\"a:9092,\"", "\" , \""] {
        refused(
            "brokers: localhost:9092",
            &format!("brokers: {brokers}"),
            "kafka.brokers: must list at least one host:port",
        )?;
    }
    Ok(())
}

#[test]
fn a_comparison_that_cannot_hold_for_the_traits_type_fails_with_its_path() -> TestResult {
    // revenue_total is an aggregation: always a number.
    refused(
        "{trait: revenue_total, gte: 500}",
        "{trait: revenue_total, gte: \"500\"}",
        "audiences.big_spenders.where.all[0].gte: the trait is a number, so `gte: \"500\"` never holds: write a number",
    )?;
    // A number it can compare with is fine, and so is `exists`.
    for ok in [
        "{trait: revenue_total, lt: 1e3}",
        "{trait: revenue_total, exists: true}",
    ] {
        let out = check_edited("{trait: revenue_total, gte: 500}", ok)?;
        assert!(out.status.success(), "{ok}: {out:?}");
    }
    Ok(())
}

#[test]
fn kafka_values_that_can_never_work_fail_with_their_path() -> TestResult {
    let tick = "tick_interval: 1s";
    let prefix = "topic_prefix: cdp";
    let cases = [
        (
            tick,
            "tick_interval: 1s\n  max_batch: 0",
            "kafka.max_batch: must be at least 1",
        ),
        (
            tick,
            "tick_interval: 0s",
            "kafka.tick_interval: must be at least 100ms",
        ),
        (
            tick,
            "tick_interval: 1s\n  max_record_bytes: 100",
            "kafka.max_record_bytes: must be at least 65536",
        ),
        (
            prefix,
            "topic_prefix: \"a b\"",
            "kafka.topic_prefix: must be 1 to 200 characters",
        ),
        (
            prefix,
            "topic_prefix: \"\"",
            "kafka.topic_prefix: must be 1 to 200 characters",
        ),
        (
            prefix,
            "topic_prefix: a/b",
            "kafka.topic_prefix: must be 1 to 200 characters",
        ),
    ];
    for (from, to, error) in cases {
        refused(from, to, error)?;
    }
    // The smallest values that work are fine.
    let out = check_edited(
        "topic_prefix: cdp\n  partitions: 4\n  guarantee: effectively_once\n  tick_interval: 1s",
        "topic_prefix: a.B_c-9\n  partitions: 4\n  guarantee: effectively_once\n  tick_interval: 100ms\n  max_batch: 1\n  max_record_bytes: 65536",
    )?;
    assert!(out.status.success(), "{out:?}");
    Ok(())
}

#[test]
fn a_profile_trait_named_like_a_computed_one_fails_with_its_path() -> TestResult {
    refused(
        "\ntraits:\n",
        "\nprofile_traits: [plan, revenue_total]\ntraits:\n",
        "profile_traits[1]: \"revenue_total\" is also a computed trait",
    )
}

#[test]
fn a_stage_whose_admin_port_is_taken_fails_before_it_joins_anything() -> TestResult {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?;
    let out = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .args(["traits", "--config", DEMO, "--admin-listen"])
        .arg(addr.to_string())
        .args(["--brokers", "127.0.0.1:1"])
        .env_remove("CDP_LOG_FORMAT")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("error: --admin-listen {addr}: ")),
        "{stderr}"
    );
    assert!(!stderr.contains("stage started"), "{stderr}");
    Ok(())
}

#[test]
fn config_check_takes_the_file_as_the_other_commands_do() -> TestResult {
    let out = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .args(["config", "check", "--config", DEMO])
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_cdp"))
        .args(["config", "check"])
        .env("CDP_CONFIG", DEMO)
        .output()?;
    assert!(out.status.success(), "{out:?}");
    Ok(())
}

#[test]
fn a_property_path_outside_the_event_fails_with_its_path() -> TestResult {
    refused(
        "property: properties.revenue, function: sum",
        "property: revenue, function: sum",
        "traits.revenue_total.aggregation.property: \"revenue\" is no field of a Segment event (paths start at the event: properties.revenue,",
    )?;
    refused(
        "property: properties.revenue, function: sum",
        "property: propertes.revenue, function: sum",
        "traits.revenue_total.aggregation.property: \"propertes.revenue\" is no field of a Segment event (did you mean properties.revenue?)",
    )
}

#[test]
fn a_mistyped_librdkafka_property_and_an_empty_write_key_fail_with_their_paths() -> TestResult {
    let cases = [
        (
            "tick_interval: 1s",
            "tick_interval: 1s\n  properties:\n    consumer.session.timeout.ms: \"6000\"\n    bogus.prop: \"1\"",
            "kafka.properties.bogus.prop: No such configuration property: \"bogus.prop\"",
        ),
        (
            "write_key: wk_web_123",
            "write_key: \"\"",
            "sources[0].write_key: must not be empty",
        ),
    ];
    for (from, to, error) in cases {
        refused(from, to, error)?;
    }
    Ok(())
}

#[test]
fn a_kafka_destination_on_a_pipeline_topic_or_an_illegal_name_fails_with_its_path() -> TestResult {
    refused(
        "destinations: []",
        "destinations:\n  - {id: loop, type: kafka, topic: cdp.audiences}",
        "destinations[0].topic: \"cdp.audiences\" is one of the pipeline's own topics",
    )?;
    refused(
        "destinations: []",
        "destinations:\n  - {id: bad, type: kafka, topic: \"bad topic\"}",
        "destinations[0].topic: \"bad topic\" is no Kafka topic name",
    )?;
    let out = check_edited(
        "destinations: []",
        "destinations:\n  - {id: out, type: kafka, topic: cdp.dest-json}",
    )?;
    assert!(out.status.success(), "{out:?}");
    Ok(())
}
