"""Read audience changes in Avro with fastavro (a decoder nobody here wrote)
and confluent-kafka. Run by tests/compat_avro.rs; the expectations live there.

usage: avro_python.py BOOTSTRAP SCHEMA_FILE COUNT TOPIC:FORMAT...

FORMAT is `json`, `single` (Avro single-object encoding) or `confluent`
(Confluent wire format). Reads every TOPIC from the beginning until each has
COUNT records and nothing new came for 3 s (or the deadline
passes) and prints one JSON object a line:

  {"topic", "key", "change", "fingerprint_hex" | "schema_id" | null}

`change` is the decoded record with trait values that travel as the
JsonText record turned back into the JSON they hold. For `single`, the
8-byte fingerprint after C3 01 is printed as found, and the script fails
unless it is the little-endian CRC-64-AVRO fingerprint fastavro computes
for the schema's parsing canonical form.
"""

import io
import json
import sys
import time

import fastavro
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

READ_SECONDS = 60


def plain(change):
    traits = {}
    for name, value in change["traits"].items():
        # The JsonText branch is the only record a trait value can be.
        if isinstance(value, dict):
            value = json.loads(value["json"])
        traits[name] = value
    change["traits"] = traits
    # Optional cause fields are absent from the JSON form when null.
    change["cause"] = {k: v for k, v in change["cause"].items() if v is not None}
    return change


def decode(fmt, value, schema, expected_fp):
    if fmt == "json":
        return json.loads(value), None
    if fmt == "single":
        if value[:2] != b"\xc3\x01":
            raise SystemExit(f"not single-object encoded: {value[:10].hex()}")
        fp = value[2:10]
        if fp != expected_fp:
            raise SystemExit(f"fingerprint {fp.hex()} is not {expected_fp.hex()}")
        body = value[10:]
        extra = {"fingerprint_hex": fp.hex()}
    elif fmt == "confluent":
        if value[0] != 0:
            raise SystemExit(f"no Confluent magic byte: {value[:5].hex()}")
        extra = {"schema_id": int.from_bytes(value[1:5], "big")}
        body = value[5:]
    else:
        raise SystemExit(f"unknown format {fmt}")
    record = fastavro.schemaless_reader(io.BytesIO(body), schema)
    return plain(record), extra


def main():
    bootstrap, schema_file, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    topics = dict(arg.rsplit(":", 1) for arg in sys.argv[4:])
    with open(schema_file) as f:
        schema = parse_schema(json.load(f))
    # Single-object encoding: the fingerprint, little-endian (fastavro
    # gives its bytes in that order, as Avro's Java implementation does).
    expected_fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"avro-python-{time.time_ns()}",
            "enable.auto.commit": False,
        }
    )
    deadline = time.time() + READ_SECONDS
    assignment = []
    for t in topics:
        # Destination topics are auto-created by their first record: wait.
        while time.time() < deadline:
            meta = consumer.list_topics(t, timeout=10).topics.get(t)
            if meta is not None and meta.error is None and meta.partitions:
                break
            time.sleep(0.5)
        assignment += [TopicPartition(t, p, OFFSET_BEGINNING) for p in meta.partitions]
    consumer.assign(assignment)
    seen = {t: 0 for t in topics}
    # Once every topic has COUNT, read on until 3 s pass with nothing new.
    quiet_until = None
    while time.time() < deadline:
        if all(n >= count for n in seen.values()):
            quiet_until = quiet_until or time.time() + 3
            if time.time() > quiet_until:
                break
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        fmt = topics[msg.topic()]
        change, extra = decode(fmt, msg.value(), schema, expected_fp)
        seen[msg.topic()] += 1
        quiet_until = None
        key = msg.key().decode() if msg.key() is not None else None
        # Keys sorted: Avro maps have no order, so compare them as sets.
        line = {"topic": msg.topic(), "key": key, "change": change, **(extra or {})}
        print(json.dumps(line, sort_keys=True), flush=True)
    consumer.close()


if __name__ == "__main__":
    main()
