"""Drive confluent-kafka (Confluent's Python client) against cdp's topics.
Run by tests/compat_sdks.rs; the expectations live there.

usage: kafka_python.py BOOTSTRAP RAW VALID INVALID SOURCE RUN

RAW, VALID and INVALID are the topics `<p>.raw`, `<p>.valid` and
`<p>.invalid`. As a producer it writes two records straight to RAW, the way
docs/ARCHITECTURE.md ("Writing to <p>.raw directly") says: a valid track
event (key = its anonymousId, header cdp-source = SOURCE) and a record
that is not JSON. As a consumer it then reads VALID and INVALID
from the beginning until it has seen both come back (or
its deadline passes) and prints, one JSON object a line on stdout:

  {"kind": "produced", "topic", "partition", "offset", "key", "value_hex"}
  {"kind": "consumed", "topic", "partition", "offset", "key", "value_hex",
   "headers": [[name, value-as-text], ...]}

Only records of this run (their bytes contain `kafka-RUN`) are printed.
Exits non-zero if a produce failed.
"""

import json
import sys
import time
from datetime import datetime, timezone

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

# Worst case 20 (flush) + 2 x 10 (metadata) + 40 (read) = 80 s, inside the
# test's 90 s bound on this driver.
FLUSH_SECONDS = 20
READ_SECONDS = 40


def emit(kind, msg, **extra):
    key = msg.key()
    line = {
        "kind": kind,
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "key": key.decode("utf-8", "replace") if key is not None else None,
        "value_hex": (msg.value() or b"").hex(),
        **extra,
    }
    print(json.dumps(line), flush=True)


def produce(bootstrap, raw, source, ours):
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            # What the raw-topic contract asks of a producer.
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
            "message.timeout.ms": FLUSH_SECONDS * 1000,
        }
    )
    failures = []

    def delivered(err, msg):
        if err is not None:
            failures.append(str(err))
        else:
            emit("produced", msg)

    anon = f"{ours}-anon"
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    event = {
        "type": "track",
        "event": "Order Completed",
        "anonymousId": anon,
        "messageId": f"{ours}-track",
        "timestamp": now,
        "properties": {"revenue": 42.5, "currency": "EUR"},
        "context": {"library": {"name": "confluent-kafka-python"}},
    }
    producer.produce(
        raw,
        key=anon.encode(),
        value=json.dumps(event).encode(),
        headers=[("cdp-source", source.encode())],
        on_delivery=delivered,
    )
    producer.produce(
        raw,
        key=f"{ours}-bad".encode(),
        value=f"{{not json: {ours}".encode(),
        headers=[("cdp-source", source.encode())],
        on_delivery=delivered,
    )
    left = producer.flush(FLUSH_SECONDS)
    if left:
        failures.append(f"{left} records still undelivered after {FLUSH_SECONDS} s")
    return failures


def consume(bootstrap, topics, ours):
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{ours}-reader",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        # Assign every partition (no group rebalance to wait for).
        assignment = []
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            if meta.error is not None:
                raise KafkaException(meta.error)
            assignment += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
        consumer.assign(assignment)
        needle = ours.encode()
        seen = set()
        deadline = time.monotonic() + READ_SECONDS
        while time.monotonic() < deadline:
            if seen == set(topics):
                # Both came back: read one more second to catch repeats.
                deadline = min(deadline, time.monotonic() + 1)
            msg = consumer.poll(0.2)
            if msg is None or msg.error() is not None:
                continue
            if needle not in (msg.value() or b""):
                continue
            seen.add(msg.topic())
            headers = [
                [name, (value or b"").decode("utf-8", "replace")]
                for name, value in (msg.headers() or [])
            ]
            emit("consumed", msg, headers=headers)
    finally:
        consumer.close()


def main() -> int:
    if len(sys.argv) != 7:
        print(__doc__, file=sys.stderr)
        return 2
    bootstrap, raw, valid, invalid, source, run = sys.argv[1:]
    ours = f"kafka-{run}"
    failures = produce(bootstrap, raw, source, ours)
    if failures:
        print("confluent-kafka produce failed:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    consume(bootstrap, [valid, invalid], ours)
    print("confluent-kafka: produced 2 records, read back the outputs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
