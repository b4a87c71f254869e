"""Drive segment-analytics-python (Segment's own Python SDK) against cdp's
collector. Run by tests/compat_sdks.rs; the expectations live there.

usage: segment_python.py HOST WRITE_KEY RUN

Every id is prefixed with `py-RUN-` so the test can find this run's events
on the raw topic. Exits non-zero if the SDK reported any failure.
"""

import sys
from datetime import datetime, timezone

from segment.analytics import Client

BATCH_EVENTS = 30


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    host, write_key, run = sys.argv[1:]
    p = f"py-{run}"
    user, anon = f"{p}-user", f"{p}-anon"
    errors = []

    def on_error(error, batch):
        errors.append(f"{error} ({len(batch)} events)")

    # Sync mode: one blocking /v1/batch request per call; a refusal raises.
    sync = Client(write_key, host=host, sync_mode=True, on_error=on_error, timeout=10)
    sync.identify(
        user_id=user,
        anonymous_id=anon,
        traits={"email": f"{p}@example.com", "plan": "pro"},
        message_id=f"{p}-identify",
    )
    sync.track(
        user_id=user,
        anonymous_id=anon,
        event="Order Completed",
        properties={"revenue": 42.5, "currency": "EUR"},
        message_id=f"{p}-track",
    )
    sync.page(
        user_id=user,
        category="Docs",
        name="Install",
        properties={"path": "/install"},
        message_id=f"{p}-page",
    )
    sync.screen(user_id=user, name="Home", properties={"tab": "feed"}, message_id=f"{p}-screen")
    sync.group(user_id=user, group_id=f"{p}-org", traits={"name": "Acme"}, message_id=f"{p}-group")
    sync.alias(previous_id=anon, user_id=user, message_id=f"{p}-alias")
    # An event that happened long ago: the collector keeps its time
    # (corrected only by the tiny sentAt-to-receivedAt difference).
    sync.track(
        user_id=user,
        event="Past Event",
        timestamp=datetime(2024, 1, 1, tzinfo=timezone.utc),
        message_id=f"{p}-past",
    )

    # The normal path: calls queue up, a background thread posts them in
    # batches (gzip-compressed here), flush() waits for the queue to drain.
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
        print("segment-analytics-python reported failures:", *errors, sep="\n  ", file=sys.stderr)
        return 1
    print(f"segment-analytics-python: sent {7 + BATCH_EVENTS} events", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
