//! The chain across a config change: stages restarted on an edited file.

use std::time::Duration;

use crate::common::{self, TestResult};
use crate::support::*;

/// The audiences stage restarted with one more audience: a profile that
/// already qualifies enters it with no event of its own (the stage
/// re-evaluates every profile once its audiences changed), and nothing
/// else moves.
#[test]
fn an_audience_added_by_a_restart_takes_in_the_profiles_that_qualify() -> TestResult {
    let Some(brokers) = brokers() else {
        return Ok(());
    };
    let mut p = Pipeline::new(&brokers)?;
    for stage in ["collect", "validate", "identity", "traits", "audiences"] {
        p.spawn(stage, stage)?;
    }
    send(p.collector, "alice", recent_start())?;
    // bob orders once, for 150: no big spender, nor a member of the new
    // audience.
    send_steps(
        p.collector,
        "bob",
        cdp::demo::visitor_journey("bob", Some(recent_start()))
            .into_iter()
            .filter(|(route, body)| *route != "track" || body["properties"]["revenue"] != 400)
            .collect(),
    )?;
    let mut reader = p.reader()?;
    let ok = reader.read_until(Duration::from_secs(120), |c| {
        common::entered(c, "alice", "big_spenders")
            && common::entered(c, "bob", "browsed_then_bought")
    });
    assert!(ok, "{:?}\n{}", reader.changes, p.logs());
    reader.settle(Duration::from_secs(3));
    let before = reader.changes.len();

    p.signal("audiences", "TERM")?;
    assert!(
        p.wait_exit("audiences", Duration::from_secs(30)),
        "{}",
        p.logs()
    );
    let config = std::fs::read_to_string(&p.config)?.replace(
        "audiences:\n",
        "audiences:\n  vip:\n    where: {trait: revenue_total, gte: 500}\n",
    );
    std::fs::write(&p.config, config)?;
    p.restart("audiences")?;

    let ok = reader.read_until(Duration::from_secs(60), |c| {
        common::entered(c, "alice", "vip")
    });
    assert!(ok, "{:?}\n{}", reader.changes, p.logs());
    reader.settle(Duration::from_secs(3));
    let after: Vec<_> = reader.changes[before..]
        .iter()
        .map(|c| (c.audience.as_str(), c.action.as_str()))
        .collect();
    assert_eq!(after, [("vip", "entered")], "{:?}", reader.changes);
    assert!(reader.changes[before].cause.contains("\"tick\""));
    Ok(())
}
