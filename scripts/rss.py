#!/usr/bin/env python3
"""Memory while the number of profiles grows: does every stage's RSS stay
flat from 100k to 1M profiles?

One tansu broker (memory engine, loopback), the whole chain (validate,
identity, traits, audiences, deliver; each its own process, the demo
config), and rounds of `cdp loadgen` straight to `<p>.raw`, each with fresh
people (its own seed). After each round drains, it samples every stage's
RSS (VmRSS) and RocksDB bytes on disk, and the profiles the load made so
far (loadgen's `expected_profiles`). Prints a table and writes it as JSON.

    python3 scripts/rss.py --cdp target/release/cdp \\
        --tansu ~/.cache/cdp/tansu/bin/tansu --profiles 1000000

Each person is active from the start of its round (`--concurrent` = the
round's people), so a round of `--events-per-round` events touches most of
its people once or twice: profiles grow fast for the events sent.
"""

import argparse
import json
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import bench  # noqa: E402  (scripts/bench.py: processes, metrics, config)


def loadgen(cdp: str, config: pathlib.Path, seed: int, people: int, events: int) -> dict:
    """One round of fresh people (its own seed), all active at once."""
    out = subprocess.run(
        [cdp, "loadgen", "--config", str(config), "--to", "raw", "--seed", str(seed),
         "--people", str(people), "--concurrent", str(people), "--events", str(events), "--json"],
        capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"rss: loadgen failed: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cdp", required=True, help="the cdp binary (a release build)")
    ap.add_argument("--tansu", required=True, help="the tansu binary")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--profiles", type=int, default=1_000_000, help="stop past this many profiles")
    ap.add_argument("--people-per-round", type=int, default=100_000)
    ap.add_argument("--events-per-round", type=int, default=120_000)
    ap.add_argument("--timeout", type=float, default=900, help="longest wait for a round to drain")
    ap.add_argument("--max-batch", type=int, default=5000)
    ap.add_argument("--storage", choices=["memory", "sqlite"], default="memory",
                    help="tansu's storage engine, as bench.py takes it")
    ap.add_argument("--workdir", help="keep configs, logs and state here")
    ap.add_argument("--out", default="rss-result.json")
    args = ap.parse_args()
    args.property = []
    args.perf = None

    b = bench.Bench(args)
    b.start_tansu()
    rounds = []
    try:
        config = b.write_config("rss")
        for s in bench.STAGES:
            b.start_stage(config, s)
        for s in bench.STAGES:
            b.wait_ready(s)
        profiles, sent, seed = 0, 0, 100
        while profiles < args.profiles:
            load = loadgen(args.cdp, config, seed, args.people_per_round, args.events_per_round)
            seed += 1
            sent += load["sent"]
            profiles += load["workload"]["expected_profiles"]
            w = b.watch(sent, idle_secs=4, timeout=args.timeout, from_zero=True)
            row = {"profiles": profiles, "events": sent,
                   "drained": all(w.get(s, {}).get("records", 0) > 0 for s in bench.STAGES[:4])}
            for s in bench.STAGES:
                row[s] = {"rss_mb": bench.rss_mb(b.procs[s].pid).get("vmrss"),
                          "state_mb": round(bench.du_bytes(b.work / "state" / s) / 2**20, 1)}
            rounds.append(row)
            bench.log(f"{profiles} profiles, {sent} events: " + ", ".join(
                f"{s} {row[s]['rss_mb']} MB" for s in bench.STAGES))
    finally:
        b.stop_all()
    result = {"machine": bench.machine(), "settings": {k: v for k, v in vars(args).items()},
              "rounds": rounds}
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    header = f"{'profiles':>10}{'events':>10}" + "".join(f"{s:>20}" for s in bench.STAGES)
    print("RSS MB (RocksDB MB on disk) after each round drained")
    print(header)
    for r in rounds:
        print(f"{r['profiles']:>10}{r['events']:>10}" + "".join(
            f"{str(r[s]['rss_mb']) + ' (' + str(r[s]['state_mb']) + ')':>20}" for s in bench.STAGES))


if __name__ == "__main__":
    main()
