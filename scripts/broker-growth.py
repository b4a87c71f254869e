#!/usr/bin/env python3
"""Does the broker's cost per second grow while a steady load runs?

tansu 0.6's memory engine (`memory://`) keeps each produced record batch as
one object and, on every fetch that has new data, lists every object of the
partition (`DynoStore::fetch` → `ObjectStore::list`). Its cost per fetch so
grows with the number of batches the partition holds, not with the records
fetched. This script shows it without any stage: a fresh tansu, `cdp loadgen
--rate R` into `pt.raw`, and N bare `cdp passthrough` hops (the bench's
pass-through chain); at the end it prints the cores tansu and the hops
used in every `--every` seconds of the load. On a broker whose fetch cost does not depend on history, the
broker's cores stay flat at a flat rate.

    python3 scripts/broker-growth.py --cdp target/release/cdp \\
        --tansu ~/.cache/cdp/tansu/bin/tansu --rate 500 --secs 150

`--property producer.linger.ms=20` makes the producers (loadgen's too) send
fewer, larger batches: the growth slows by as much.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cdp", required=True, help="the cdp binary (a release build)")
    ap.add_argument("--tansu", required=True, help="the tansu binary")
    ap.add_argument("--rate", type=float, default=500, help="events per second into pt.raw")
    ap.add_argument("--secs", type=int, default=150, help="how long the load runs")
    ap.add_argument("--hops", type=int, default=len(bench.HOPS), help="pass-through hops (0-4)")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--every", type=float, default=10, help="seconds between samples")
    ap.add_argument("--property", action="append", default=[], metavar="K=V",
                    help="a config `kafka.properties` entry (e.g. producer.linger.ms=20)")
    ap.add_argument("--storage", choices=["memory", "sqlite"], default="memory")
    ap.add_argument("--workdir", help="keep configs and logs here")
    ap.add_argument("--out", help="write the samples as JSON here")
    args = ap.parse_args()
    # The settings `bench.Bench` reads, for the broker and the topics only.
    args.max_batch, args.events = 5000, 0
    b = bench.Bench(args)
    b.start_tansu()
    hops, samples = [], []
    try:
        config = b.write_config("pt")
        for src, dst in bench.HOPS[: args.hops]:
            hops.append(subprocess.Popen(
                [args.cdp, "passthrough", "--config", str(config), "--from", f"pt.{src}", "--to", f"pt.{dst}",
                 "--expect", str(10**15), "--idle", "1h"],
                stdout=subprocess.DEVNULL, stderr=open(b.work / f"hop-{src}.log", "w")))
        time.sleep(5)
        load = subprocess.Popen(
            [args.cdp, "loadgen", "--config", str(config), "--to", "raw", "--people", "1000000000",
             "--rate", str(args.rate), "--duration", f"{args.secs}s", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        broker = b.procs["tansu"].pid
        print(f"broker-growth: {args.rate:g} events/s for {args.secs} s", flush=True)
        with bench.Cores([broker], args.every) as tansu, \
                bench.Cores([h.pid for h in hops], args.every) as hop_cores:
            load.wait()
        print(f"{'seconds':>8}{'tansu cores':>13}{'hops cores':>12}")
        for i, (t, h) in enumerate(zip(tansu.cores, hop_cores.cores), start=1):
            samples.append({"secs": round(i * args.every), "tansu_cores": t, "hops_cores": h})
            print(f"{round(i * args.every):>8}{t:>13}{h:>12}")
        out = load.stdout.read() if load.stdout else ""
        summary = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        print(f"sent {summary.get('sent')} events at {summary.get('events_per_sec', 0):.0f}/s", flush=True)
    finally:
        for h in hops:
            h.terminate()
        b.stop_all()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "samples": samples}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
