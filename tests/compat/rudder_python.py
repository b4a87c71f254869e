"""Drive rudder-sdk-python (RudderStack's Python SDK) against cdp's
collector. Run by tests/compat_sdks.rs; the expectations live there.

usage: rudder_python.py HOST WRITE_KEY RUN

The SDK posts to HOST/v1/batch. Every id is prefixed with `rudder-RUN-` so
the test can find this run's events on the raw topic. Exits non-zero if
the SDK reported any failure.
"""

import sys
from datetime import datetime, timezone

import rudderstack.analytics as rudder_analytics
from rudderstack.analytics import Client

BATCH_EVENTS = 30


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    host, write_key, run = sys.argv[1:]
    p = f"rudder-{run}"
    user, anon = f"{p}-user", f"{p}-anon"
    errors = []

    def on_error(error, batch):
        errors.append(f"{error} ({len(batch)} events)")

    # The module-level API of RudderStack's README, in sync mode: one
    # blocking /v1/batch request per call; a refusal raises.
    rudder_analytics.write_key = write_key
    rudder_analytics.dataPlaneUrl = host
    rudder_analytics.sync_mode = True
    rudder_analytics.on_error = on_error
    rudder_analytics.timeout = 10
    rudder_analytics.max_retries = 2
    rudder_analytics.identify(
        user_id=user,
        anonymous_id=anon,
        traits={"email": f"{p}@example.com", "plan": "pro"},
        message_id=f"{p}-identify",
    )
    rudder_analytics.track(
        user_id=user,
        anonymous_id=anon,
        event="Order Completed",
        properties={"revenue": 42.5, "currency": "EUR"},
        message_id=f"{p}-track",
    )
    rudder_analytics.page(
        user_id=user,
        category="Docs",
        name="Install",
        properties={"path": "/install"},
        message_id=f"{p}-page",
    )
    rudder_analytics.screen(
        user_id=user, name="Home", properties={"tab": "feed"}, message_id=f"{p}-screen"
    )
    rudder_analytics.group(
        user_id=user, group_id=f"{p}-org", traits={"name": "Acme"}, message_id=f"{p}-group"
    )
    rudder_analytics.alias(previous_id=anon, user_id=user, message_id=f"{p}-alias")
    rudder_analytics.track(
        user_id=user,
        event="Past Event",
        timestamp=datetime(2024, 1, 1, tzinfo=timezone.utc),
        message_id=f"{p}-past",
    )

    # The normal path: calls queue up, a background thread posts them in
    # gzip-compressed batches, flush() waits for the queue to drain.
    queued = Client(
        write_key,
        host=host,
        on_error=on_error,
        gzip=True,
        upload_size=100,
        upload_interval=0.2,
        max_retries=2,
        timeout=10,
    )
    for i in range(BATCH_EVENTS):
        queued.track(anonymous_id=f"{p}-batch", event="Batch Item", properties={"i": i})
    queued.flush()
    queued.join()

    if errors:
        print("rudder-sdk-python reported failures:", *errors, sep="\n  ", file=sys.stderr)
        return 1
    print(f"rudder-sdk-python: sent {7 + BATCH_EVENTS} events", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
