#!/usr/bin/env python3
"""CPU per event of every stage, split by thread, on one tansu broker.

Starts tansu (memory engine), creates the topics of the demo config,
starts validate, identity, traits, audiences and deliver (each its own
process), lets them idle, then sends EVENTS events straight to `<p>.raw`
with `cdp loadgen` and waits until the stages stop using CPU. Prints, per
process, the CPU microseconds per event it spent, split by thread name:
the stage thread (`stage-<name>`: polling, the operator, RocksDB, the
produce calls), librdkafka's broker threads (`rdk:broker…`: fetch and
produce I/O) and the producer's polling thread (delivery reports). The
broker's line is tansu's CPU over the same time, most of it its fetch
loop (see docs/performance.md).

    python3 scripts/threads.py --cdp <cdp binary> --tansu ~/.cache/cdp/tansu/bin/tansu --events 40000

`--perf STAGE` also records the stage's process with `perf record
--call-graph dwarf` into the work directory (`perf report --tid <the
stage thread's id>` reads the stage thread alone).

`--callgrind STAGE` runs that stage under valgrind's callgrind, counting
the instructions of its batches (`process_batch`: the operator, the
state, the produce calls; not librdkafka's own threads) and prints them
per event: exact where this box's timings spread ±10–15% between runs of
one binary. The stage runs ~50× slower, so its batches are larger than
in a timed run; compare two binaries with this, not with a timed run.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench", HERE / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # type: ignore[union-attr]

TICKS = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[str, tuple[str, int]]:
    """Thread id → (name, CPU ticks so far)."""
    out = {}
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[task.name] = (name, int(fields[11]) + int(fields[12]))
    return out


def group(name: str) -> str:
    return "rdk:broker" if name.startswith("rdk:broker") else name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cdp", required=True)
    ap.add_argument("--tansu", required=True)
    ap.add_argument("--events", type=int, default=40000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--max-batch", type=int, help="kafka.max_batch (default: the product's)")
    ap.add_argument("--workdir")
    ap.add_argument("--perf", metavar="STAGE")
    ap.add_argument("--callgrind", metavar="STAGE")
    a = ap.parse_args()
    work = pathlib.Path(a.workdir or tempfile.mkdtemp(prefix="cdp-threads-"))
    work.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}
    port = bench.free_port()
    brokers = f"127.0.0.1:{port}"
    procs["tansu"] = subprocess.Popen(
        [a.tansu, "broker", "--listener-url", f"tcp://{brokers}", "--advertised-listener-url",
         f"tcp://{brokers}", "--storage-engine", "memory://tansu/"],
        stdout=open(work / "tansu.log", "w"), stderr=subprocess.STDOUT)
    try:
        time.sleep(1.5)
        demo = (HERE.parent / "deploy" / "demo-config.yaml").read_text()
        config = work / "threads.yaml"
        config.write_text(bench.config_text(demo, brokers, "threads", a.partitions, bench.free_port(), a.max_batch, []))
        subprocess.run([a.cdp, "topics", "create", "--config", str(config)], check=True, stdout=subprocess.DEVNULL)
        for s in bench.STAGES:
            wrap = []
            if s == a.callgrind:
                wrap = ["valgrind", "--tool=callgrind", "--toggle-collect=*batch::process_batch*",
                        f"--callgrind-out-file={work / f'callgrind-{s}.out'}"]
            procs[s] = subprocess.Popen(
                [*wrap, a.cdp, s, "--config", str(config), "--admin-listen", f"127.0.0.1:{bench.free_port()}",
                 "--state-dir", str(work / "state" / s)],
                stdout=open(work / f"{s}.out", "w"), stderr=open(work / f"{s}.log", "w"))
        time.sleep(60 if a.callgrind else 15)  # every stage has joined its group and idles
        perf = None
        if a.perf:
            perf = subprocess.Popen(["perf", "record", "-F", "999", "--call-graph", "dwarf,32768", "-o",
                                     str(work / f"perf-{a.perf}.data"), "-p", str(procs[a.perf].pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = {s: threads(p.pid) for s, p in procs.items()}
        subprocess.run([a.cdp, "loadgen", "--config", str(config), "--to", "raw", "--seed", "1",
                        "--concurrent", "2000", "--json", "--people", str(a.events), "--events", str(a.events)],
                       check=True, capture_output=True)

        def stage_ticks() -> int:
            return sum(t for s, p in procs.items() if s != "tansu" for _, t in threads(p.pid).values())

        # Drained once the stages' CPU stops growing (idle costs ~2% of a
        # core per stage: a few ticks a second).
        last = -1000
        while True:
            time.sleep(1)
            now = stage_ticks()
            if now - last < 30:
                break
            last = now
        after = {s: threads(p.pid) for s, p in procs.items()}
        if perf:
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=120)
        for s in procs:
            by: collections.Counter = collections.Counter()
            for tid, (name, t) in after[s].items():
                by[group(name)] += (t - before[s].get(tid, (name, 0))[1]) / TICKS * 1e6 / a.events
            total = sum(by.values())
            parts = ", ".join(f"{k} {v:.1f}" for k, v in by.most_common(4) if v >= 0.1)
            print(f"{s:10} {total:6.1f} us/event: {parts}")
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=180 if a.callgrind else 10)
            except subprocess.TimeoutExpired:
                p.kill()
    if a.callgrind:
        out = work / f"callgrind-{a.callgrind}.out"
        total = next((int(line.split()[1]) for line in out.read_text().splitlines()
                      if line.startswith("summary:")), None)
        if total is None:
            raise SystemExit(f"threads: no callgrind summary in {out}")
        print(f"{a.callgrind}: {total / a.events:,.0f} instructions per event in its batches (callgrind)")
    print(f"work directory: {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
