#!/usr/bin/env python3
"""End-to-end benchmark on one broker: the bare pass-through chain next to
the whole cdp chain, in one run.

The broker (`--broker`) is tansu (the default: a separate process, its
memory engine) or librdkafka's mock cluster (`cdp mock-broker`: a separate
process too, in memory, written in C; it makes the topics itself, as it
takes no CreateTopics). Both listen on loopback.

Phases (each stage and hop its own process, `--partitions` partitions,
`<p>.valid` one partition as always):

1. pass-through: `cdp loadgen` writes EVENTS events to `pt.raw`; four
   `cdp passthrough` hops (raw → valid(1 partition) → identified → traits →
   audiences, the same topology as the stages that see every event) drain
   them. Their rate is the transport limit of this box and broker.
2. drain: the same EVENTS events (same seed) to `bench.raw`; validate,
   identity, traits, audiences and deliver start and drain them. The
   sustained rate is EVENTS / (last audiences input − first validate input).
3. latency at 50% and 100% of the sustained rate, each phase on a fresh
   broker with empty topics and the stages on empty state (tansu's memory
   engine lists every batch a partition holds on each fetch, so a broker
   that kept earlier phases costs more per fetch; `--no-fresh-broker` keeps
   the drain's): `cdp loadgen --rate` for PHASE seconds with fresh people;
   event → audience change latency is
   `emitted_at − event_time` of every change an event caused (deliver's
   stdout destination prints them; loadgen stamps each event's `timestamp`
   with its send time). Then the same absolute rate through four fresh
   pass-through hops (`pt.raw` → … → `pt.audiences`): the transport's own
   latency in the same run.
4. hop by hop, for both: every event's record on each topic of the phase,
   joined by `messageId` (`cdp stamps`). librdkafka stamps CreateTime at
   `produce()`, so a hop's latency is the difference between the event's
   record on its input and on its output (for `traits → audiences`, only
   events that changed an audience). Per stage, the mean committed batch
   split by phase (`cdp_batch_phase_seconds`).

Prints a table and writes it as JSON (`--out`). Reports CPU seconds and RSS
per process, RocksDB bytes per profile, and the records each run left on
the broker per topic (`cdp topics sizes`: outputs and changelogs). Run
through `scripts/bench.sh` (builds the release binary and finds tansu), or
directly:

    python3 scripts/bench.py --cdp target/release/cdp --tansu ~/.cache/cdp/tansu/bin/tansu
    python3 scripts/bench.py --cdp target/release/cdp --broker mock
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime

STAGES = ["validate", "identity", "traits", "audiences", "deliver"]
PHASES = ["poll_wait", "process", "outputs", "markers", "commit"]
# The stages every event passes through (deliver sees only changes).
HOPS = [("raw", "valid"), ("valid", "identified"), ("identified", "traits"), ("traits", "audiences")]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def config_text(demo: str, brokers: str, prefix: str, partitions: int, collector: int,
                max_batch: int | None, properties: list[str]) -> str:
    props = "".join(f"\n    {k}: \"{v}\"" for k, v in (p.split("=", 1) for p in properties))
    kafka_extra = "\n  replication_factor: 1" + (f"\n  max_batch: {max_batch}" if max_batch else "")
    if props:
        kafka_extra += "\n  properties:" + props
    return (
        demo.replace("brokers: localhost:9092", f"brokers: {brokers}")
        .replace("topic_prefix: cdp", f"topic_prefix: {prefix}")
        .replace("partitions: 4", f"partitions: {partitions}")
        .replace("tick_interval: 1s", "tick_interval: 1s" + kafka_extra)
        .replace(
            "destinations: []",
            f"destinations:\n  - {{id: out, type: stdout}}\ncollector:\n  listen: 127.0.0.1:{collector}",
        )
    )


def cpu_secs(pid: int) -> float:
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def rss_mb(pid: int) -> dict:
    out = {}
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kb = line.split()[:2]
                out[key.rstrip(":").lower()] = round(int(kb) / 1024, 1)
    except OSError:
        pass
    return out


def sched(pid: int) -> dict:
    """Seconds a process's threads spent on a CPU and waiting for one
    (runnable, not running: /proc/<pid>/task/*/schedstat), all threads and
    the stage thread (`stage-<name>`) apart."""
    out = {"cpu": 0.0, "wait": 0.0, "stage_cpu": 0.0, "stage_wait": 0.0}
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            run, wait = (int(x) / 1e9 for x in (task / "schedstat").read_text().split()[:2])
            comm = (task / "comm").read_text().strip()
        except (OSError, ValueError):
            continue
        out["cpu"] += run
        out["wait"] += wait
        if comm.startswith("stage-"):
            out["stage_cpu"] += run
            out["stage_wait"] += wait
    return out


def du_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def parse_ms(t: str) -> float:
    return datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() * 1000


class Cores:
    """The cores (CPU seconds per second) processes `pids` use together,
    every `every` seconds while a load runs: whether the broker's cost per
    second grows as its topics fill."""

    def __init__(self, pids: list[int], every: float = 5.0) -> None:
        self.pids, self.every, self.cores = pids, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cpu(self) -> float:
        return sum(cpu_secs(pid) for pid in self.pids)

    def _run(self) -> None:
        last, t = self._cpu(), time.time()
        while not self._stop.wait(self.every):
            now, c = time.time(), self._cpu()
            self.cores.append(round((c - last) / (now - t), 2))
            last, t = c, now

    def __enter__(self) -> "Cores":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cdp = args.cdp
        self.work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="cdp-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.admins: dict[str, str] = {}
        self.result: dict = {"machine": machine(), "settings": vars(args).copy()}
        self.state_root = self.work / "state"

    # -- processes -------------------------------------------------------
    def start_broker(self) -> None:
        """The broker of `--broker`: tansu (a process of its own, topics
        created over the wire) or `cdp mock-broker` (librdkafka's mock
        cluster, which takes no CreateTopics: it makes the topics of both
        prefixes itself)."""
        if self.args.broker == "mock":
            self.start_mock()
        else:
            self.start_tansu()

    def start_mock(self) -> None:
        logf = open(self.work / "broker.log", "w")
        self.procs["broker"] = subprocess.Popen(
            [self.cdp, "mock-broker", "--prefix", "pt", "--prefix", "bench",
             "--partitions", str(self.args.partitions)],
            stdout=subprocess.PIPE, stderr=logf, text=True)
        line = self.procs["broker"].stdout.readline().strip() if self.procs["broker"].stdout else ""
        if not line:
            raise SystemExit("bench: cdp mock-broker did not start; see " + str(self.work / "broker.log"))
        self.brokers = line

    def start_tansu(self) -> None:
        port = free_port()
        self.brokers = f"127.0.0.1:{port}"
        logf = open(self.work / "tansu.log", "w")
        self.procs["broker"] = subprocess.Popen(
            [self.args.tansu, "broker", "--listener-url", f"tcp://{self.brokers}",
             "--advertised-listener-url", f"tcp://{self.brokers}", "--storage-engine", self.storage_engine()],
            stdout=logf, stderr=subprocess.STDOUT, cwd=self.work)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("bench: tansu did not start; see " + str(self.work / "tansu.log"))

    def storage_engine(self) -> str:
        """tansu's engine: `memory` (the default) or `sqlite` (a file in the
        work directory). The memory engine lists every batch a partition
        holds on each fetch (docs/performance.md). tansu opens a sqlite
        path relative to its working directory, the work directory."""
        if self.args.storage == "sqlite":
            return "sqlite://tansu.db"
        return "memory://tansu/"

    def write_config(self, prefix: str) -> pathlib.Path:
        text = (pathlib.Path(__file__).resolve().parent.parent / "deploy" / "demo-config.yaml").read_text()
        path = self.work / f"{prefix}.yaml"
        # The mock cluster assigns partitions as fast as the consumers'
        # timeouts allow: `cdp dev`'s short ones (src/dev.rs).
        mock = ["consumer.session.timeout.ms=6000", "consumer.heartbeat.interval.ms=500"]
        properties = (mock if self.args.broker == "mock" else []) + self.args.property
        max_batch = self.args.hop_max_batch if prefix == "pt" else self.args.max_batch
        path.write_text(config_text(text, self.brokers, prefix, self.args.partitions, free_port(),
                                    max_batch, properties))
        if self.args.broker == "tansu":
            subprocess.run([self.cdp, "topics", "create", "--config", str(path)], check=True,
                           stdout=subprocess.DEVNULL)
        return path

    def loadgen(self, config: pathlib.Path, seed: int, *extra: str) -> dict:
        out = subprocess.run(
            [self.cdp, "loadgen", "--config", str(config), "--to", "raw", "--seed", str(seed),
             "--concurrent", "2000", "--json", *extra],
            capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"bench: loadgen failed: {out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def start_stage(self, config: pathlib.Path, stage: str) -> None:
        admin = f"127.0.0.1:{free_port()}"
        self.admins[stage] = admin
        args = [self.cdp, stage, "--config", str(config), "--admin-listen", admin,
                "--state-dir", str(self.state_root / stage)]
        out = open(self.work / f"{stage}.out", "w")
        err = open(self.work / f"{stage}.log", "w")
        env = dict(os.environ, CDP_LOG="info,librdkafka=warn")
        self.procs[stage] = subprocess.Popen(args, stdout=out, stderr=err, env=env)

    def wait_ready(self, stage: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://{self.admins[stage]}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.procs[stage].poll() is not None:
                raise SystemExit(f"bench: {stage} exited; see {self.work}/{stage}.log")
            time.sleep(0.2)
        raise SystemExit(f"bench: {stage} not ready after {timeout} s")

    def data_in(self, stage: str) -> float:
        """Input records a stage consumed, ticks aside."""
        try:
            with urllib.request.urlopen(f"http://{self.admins[stage]}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return -1
        total = 0.0
        for name, sign in (("cdp_records_in_total", 1), ("cdp_ticks_total", -1)):
            m = re.search(rf'^{name}{{stage="{stage}"}} (\S+)$', text, re.M)
            if m:
                total += sign * float(m.group(1))
        return total

    def batches(self) -> dict:
        """Per stage: committed batches, their summed duration and input records."""
        out = {}
        for stage in STAGES:
            try:
                with urllib.request.urlopen(f"http://{self.admins[stage]}/metrics", timeout=2) as r:
                    text = r.read().decode()
            except OSError:
                continue
            v = {}
            for key, name in (("count", "cdp_batch_duration_seconds_count"),
                              ("secs", "cdp_batch_duration_seconds_sum"),
                              ("records", "cdp_records_in_total")):
                m = re.search(rf'^{name}{{stage="{stage}"}} (\S+)$', text, re.M)
                v[key] = float(m.group(1)) if m else 0.0
            for phase in PHASES:
                m = re.search(rf'^cdp_batch_phase_seconds_sum{{(?=[^}}]*stage="{stage}")(?=[^}}]*phase="{phase}")[^}}]*}} (\S+)$',
                              text, re.M)
                v[phase] = float(m.group(1)) if m else 0.0
            out[stage] = v
        return out

    def stop_all(self) -> None:
        for name, p in reversed(list(self.procs.items())):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()

    # -- phases ----------------------------------------------------------
    def passthrough(self) -> dict:
        a = self.args
        config = self.write_config("pt")
        self.pt_config = config
        log(f"pass-through: loading {a.events} events into pt.raw")
        load = self.loadgen(config, 1, "--people", str(a.events), "--events", str(a.events))
        log(f"pass-through: {len(HOPS)} hops draining them")
        # `--perf broker` (or `tansu`) profiles the broker here too, to set beside the chain.
        perf = self.start_perf("broker", "broker-passthrough") if a.perf in ("tansu", "broker") else None
        hops = []
        for src, dst in HOPS:
            p = subprocess.Popen(
                [self.cdp, "passthrough", "--config", str(config), "--from", f"pt.{src}",
                 "--to", f"pt.{dst}", "--expect", str(load["sent"]), "--idle", "20s"],
                stdout=subprocess.PIPE, stderr=open(self.work / f"pt-{src}.log", "w"), text=True)
            hops.append(p)
        reports = []
        for p in hops:
            _, status, usage = os.wait4(p.pid, 0)
            out = p.stdout.read() if p.stdout else ""
            p.returncode = os.waitstatus_to_exitcode(status)
            if p.returncode != 0:
                raise SystemExit(f"bench: a pass-through hop failed; see {self.work}/pt-*.log")
            r = json.loads(out.strip().splitlines()[-1])
            r["cpu_secs"] = round(usage.ru_utime + usage.ru_stime, 1)
            r["max_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
            reports.append(r)
        if perf:
            self.stop_perf(perf, "broker", "broker-passthrough")
        first = min(r["first_ms"] for r in reports)
        last = max(r["last_ms"] for r in reports)
        rate = load["sent"] / max((last - first) / 1000, 1e-3)
        log(f"pass-through: {rate:.0f} events/s")
        return {"events": load["sent"], "events_per_sec": round(rate), "hops": reports,
                "broker_cpu_secs": round(cpu_secs(self.procs["broker"].pid), 1),
                "topic_records": self.topic_records(config)}

    def topic_records(self, config: pathlib.Path) -> dict[str, int]:
        """Records per topic of `config` that exists (`cdp topics sizes`):
        what the broker was handed, outputs and changelogs alike."""
        out = subprocess.run([self.cdp, "topics", "sizes", "--config", str(config)],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise SystemExit(f"bench: topics sizes failed: {out.stderr}")
        records = {}
        for line in out.stdout.splitlines():
            name, *fields = line.split()
            kv = dict(f.split("=", 1) for f in fields if "=" in f)
            if "records" in kv:
                records[name] = int(kv["records"])
        return records

    def watch(self, expect_validate: float, idle_secs: float, timeout: float,
              from_zero: bool = False) -> dict:
        """Poll every stage's input counter until validate has seen
        `expect_validate` records and every stage has been idle (no more
        than a few ticks' worth of change) for `idle_secs`. Counts from the
        first sample, or from zero (a stage not answering yet counts 0)."""
        samples: dict[str, list[tuple[float, float]]] = {s: [] for s in STAGES[:4]}
        slack = 2 * self.args.partitions
        start = time.time()
        while time.time() - start < timeout:
            now = time.time()
            for s in samples:
                samples[s].append((now, max(self.data_in(s), 0)))
            if samples["validate"][-1][1] >= expect_validate and all(
                self._idle(v, idle_secs, slack) for v in samples.values()):
                break
            time.sleep(0.25)
        out = {}
        for s, v in samples.items():
            final = v[-1][1]
            base = 0 if from_zero else v[0][1]
            moving = [t for t, x in v if x > base]
            if not moving:
                out[s] = {"records": 0}
                continue
            t_first = moving[0] - 0.125
            t_end = next(t for t, x in v if x >= final - slack)
            out[s] = {"records": int(final - base), "first": t_first, "end": t_end,
                      "events_per_sec": round((final - base) / max(t_end - t_first, 1e-3))}
        return out

    @staticmethod
    def _idle(v: list[tuple[float, float]], secs: float, slack: float) -> bool:
        if not v or v[-1][0] - v[0][0] < secs:
            return False
        recent = [x for t, x in v if t >= v[-1][0] - secs]
        return recent[-1] - recent[0] <= slack

    def chain(self) -> dict:
        a = self.args
        config = self.write_config("bench")
        self.chain_config = config
        log(f"chain: loading {a.events} events into bench.raw")
        load = self.loadgen(config, 1, "--people", str(a.events), "--events", str(a.events))
        self.loads = [load]
        log("chain: starting the stages")
        for s in STAGES:
            self.start_stage(config, s)
        # Watched from the start: a stage starts draining as soon as it is
        # ready, before the others are.
        cpu0 = {s: cpu_secs(self.procs[s].pid) for s in STAGES + ["broker"]}
        perf = self.start_perf(a.perf) if a.perf else None
        w = self.watch(load["sent"], idle_secs=4, timeout=a.timeout, from_zero=True)
        for s in STAGES:
            self.wait_ready(s)
        if perf:
            self.stop_perf(perf, a.perf)
        first = w["validate"].get("first", 0)
        end = w["audiences"].get("end", first)
        rate = load["sent"] / max(end - first, 1e-3)
        log(f"chain: {rate:.0f} events/s end to end")
        stages = {}
        for s in STAGES:
            stages[s] = {
                "events_per_sec": w.get(s, {}).get("events_per_sec"),
                "records": w.get(s, {}).get("records"),
                "cpu_secs": round(cpu_secs(self.procs[s].pid) - cpu0[s], 1),
                **rss_mb(self.procs[s].pid),
            }
        return {"events": load["sent"], "events_per_sec": round(rate), "stages": stages,
                "broker_cpu_secs": round(cpu_secs(self.procs["broker"].pid) - cpu0["broker"], 1),
                "loadgen": load, "topic_records": self.topic_records(config)}

    def perf_targets(self, stage: str) -> list:
        """`all` profiles every stage and the broker in one recording."""
        if stage == "all":
            return STAGES + ["broker"]
        return ["broker"] if stage in ("tansu", "broker") else [stage]

    def start_perf(self, stage: str, name: str | None = None) -> subprocess.Popen:
        data = self.work / f"perf-{name or stage}.data"
        pids = ",".join(str(self.procs[s].pid) for s in self.perf_targets(stage))
        graph = ["--call-graph", "dwarf,32768"] if self.args.perf_graph else []
        return subprocess.Popen(["perf", "record", "-F", "499", *graph, "-o", str(data), "-p", pids],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop_perf(self, perf: subprocess.Popen, stage: str, name: str | None = None) -> None:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=60)
        name = name or stage
        data = self.work / f"perf-{name}.data"
        # With several processes, each process's lines carry its pid; the
        # pids of the stages are in the report's header.
        sort = "pid,dso,symbol" if stage == "all" else "dso,symbol"
        fields = "overhead,pid,dso,sym" if stage == "all" else "overhead,dso,sym"
        report = subprocess.run(["perf", "report", "--stdio", "--no-children", "--sort", sort, "--fields", fields,
                                 "--percent-limit", "0.2", "-i", str(data)],
                                capture_output=True, text=True, check=False).stdout
        pids = ", ".join(f"{s}={self.procs[s].pid}" for s in self.perf_targets(stage))
        path = self.work / f"perf-{name}.txt"
        path.write_text(f"# processes: {pids}\n{report}")
        self.result.setdefault("profile", {})[name] = {"stage": stage, "report": str(path)}
        log(f"profile of {stage}: {path}")

    def latency(self, rate: float, seed: int) -> dict:
        a = self.args
        changes = self.work / "deliver.out"
        skip = changes.read_text().count("\n") if changes.exists() else 0
        log(f"latency: {rate:.0f} events/s for {a.phase_secs} s")
        batches0 = self.batches()
        sched0 = {s: sched(self.procs[s].pid) for s in STAGES + ["broker"]}
        since_ms = int(time.time() * 1000)
        with Cores([self.procs["broker"].pid]) as broker:
            load = self.loadgen(self.chain_config, seed, "--people", "1000000000", "--rate",
                                str(rate), "--duration", f"{a.phase_secs}s")
        self.loads.append(load)
        sent_end = time.time()
        before = self.data_in("validate")
        w = self.watch(before, idle_secs=3, timeout=a.timeout)
        drained_after = max(w["audiences"].get("end", sent_end) - sent_end, 0)
        batches1 = self.batches()
        sched1 = {s: sched(self.procs[s].pid) for s in STAGES + ["broker"]}
        # Per process over the phase: CPU seconds and seconds runnable but
        # waiting for a core, every thread summed and the stage thread apart.
        cpu_wait = {s: {k: round(sched1[s][k] - sched0[s][k], 2) for k in sched1[s]} for s in sched1}
        # Mean committed batch: how long its cycle took, how many inputs
        # (ticks included) it carried.
        per_batch = {}
        for s, b in batches1.items():
            d = {k: b[k] - batches0.get(s, {}).get(k, 0.0) for k in b}
            if d["count"] > 0:
                per_batch[s] = {"batches": int(d["count"]), "ms": round(d["secs"] / d["count"] * 1000, 1),
                                "records": round(d["records"] / d["count"], 1),
                                "phases_ms": {p: round(d[p] / d["count"] * 1000, 1) for p in PHASES}}
        lat = []
        for line in changes.read_text().splitlines()[skip:]:
            try:
                c = json.loads(line)
            except ValueError:
                continue
            if c.get("type") != "audience_change" or not c.get("cause", {}).get("message_id"):
                continue
            lat.append(parse_ms(c["emitted_at"]) - parse_ms(c["event_time"]))
        lat.sort()
        return {"target_rate": round(rate), "sent": load["sent"],
                "achieved_rate": round(load["events_per_sec"]), "changes": len(lat),
                "p50_ms": round(percentile(lat, 50), 1), "p99_ms": round(percentile(lat, 99), 1),
                "max_ms": round(lat[-1], 1) if lat else None,
                "drained_secs_after_send": round(drained_after, 1),
                "hops": self.hops(self.chain_config, "bench", since_ms),
                "broker_cores": broker.cores,
                "sched_secs": cpu_wait,
                "per_batch": per_batch,
                "rss_mb": {s: rss_mb(self.procs[s].pid).get("vmrss") for s in STAGES}}

    def stamps(self, config: pathlib.Path, topics: list[str], since_ms: int) -> dict[str, dict[str, int]]:
        """Per topic: each event's (messageId's) earliest record timestamp."""
        args = [self.cdp, "stamps", "--config", str(config), "--since-ms", str(since_ms)]
        for t in topics:
            args += ["--topic", t]
        out = subprocess.run(args, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"bench: stamps failed: {out.stderr}")
        if len(topics) > 1:
            # Kept for a closer look (e.g. when a hop's slow records come).
            (self.work / f"stamps-{topics[0]}-{since_ms}.jsonl").write_text(out.stdout)
        seen: dict[str, dict[str, int]] = {t: {} for t in topics}
        for line in out.stdout.splitlines():
            r = json.loads(line)
            ids = seen[r["topic"]]
            if r["id"] not in ids or r["ts"] < ids[r["id"]]:
                ids[r["id"]] = r["ts"]
        return seen

    def hops(self, config: pathlib.Path, prefix: str, since_ms: int) -> dict:
        """Latency of every hop, and of the four together, from the records'
        timestamps joined by messageId."""
        topics = [f"{prefix}.{HOPS[0][0]}"] + [f"{prefix}.{dst}" for _, dst in HOPS]
        seen = self.stamps(config, topics, since_ms)

        def spread(src: str, dst: str) -> dict:
            a, b = seen[src], seen[dst]
            d = sorted(b[i] - a[i] for i in b if i in a)
            return {"events": len(d), "p50_ms": percentile(d, 50), "p99_ms": percentile(d, 99),
                    "max_ms": d[-1] if d else None}

        out = {f"{src} -> {dst}": spread(f"{prefix}.{src}", f"{prefix}.{dst}") for src, dst in HOPS}
        out["raw -> audiences"] = spread(topics[0], topics[-1])
        return out

    def pt_latency(self, rate: float, seed: int) -> dict:
        """The same rate through four fresh pass-through hops: their latency
        is the transport's, on this box and broker, in the same run."""
        a = self.args
        log(f"pass-through latency: {rate:.0f} events/s for {a.phase_secs} s")
        hops = []
        for src, dst in HOPS:
            logf = self.work / f"pt-lat-{seed}-{src}.log"
            hops.append((logf, subprocess.Popen(
                [self.cdp, "passthrough", "--config", str(self.pt_config), "--from", f"pt.{src}",
                 "--to", f"pt.{dst}", "--expect", str(10**15), "--idle", "1h"],
                stdout=subprocess.DEVNULL, stderr=open(logf, "w"))))
        try:
            deadline = time.time() + 60
            while not all("hop assigned" in f.read_text() for f, _ in hops):
                if time.time() > deadline or any(p.poll() is not None for _, p in hops):
                    raise SystemExit(f"bench: pass-through hops did not start; see {self.work}/pt-lat-*.log")
                time.sleep(0.2)
            since_ms = int(time.time() * 1000)
            with Cores([self.procs["broker"].pid]) as broker:
                load = self.loadgen(self.pt_config, seed, "--people", "1000000000", "--rate",
                                    str(rate), "--duration", f"{a.phase_secs}s")
            # Drained once every sent event is on the last topic (or it
            # stopped growing for three looks).
            counts, deadline = [], time.time() + a.timeout
            while time.time() < deadline:
                counts.append(len(self.stamps(self.pt_config, ["pt.audiences"], since_ms)["pt.audiences"]))
                if counts[-1] >= load["sent"] or counts[-3:] == [counts[-1]] * 3:
                    break
                time.sleep(2)
        finally:
            for _, p in hops:
                p.send_signal(signal.SIGTERM)
            for _, p in hops:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        hop = self.hops(self.pt_config, "pt", since_ms)
        e2e = hop["raw -> audiences"]
        return {"target_rate": round(rate), "sent": load["sent"],
                "achieved_rate": round(load["events_per_sec"]), "events": e2e["events"],
                "p50_ms": e2e["p50_ms"], "p99_ms": e2e["p99_ms"], "max_ms": e2e["max_ms"],
                "hops": hop, "broker_cores": broker.cores}

    def fresh_broker(self, phase: str) -> None:
        """Stop everything and start a new broker with empty topics, and the
        stages on empty state. tansu's memory engine lists every batch a
        partition holds on each fetch, so a broker that kept the drain's
        and the earlier phases' batches costs more per fetch with every
        phase (docs/performance.md, "The broker's cost grows with the
        batches it holds")."""
        log(f"latency {phase}: a fresh broker, fresh topics, stages on empty state")
        self.stop_all()
        self.procs.clear()
        self.state_root = self.work / f"state-{phase.replace('/', '-per-').replace('%', 'pct')}"
        self.start_broker()
        self.pt_config = self.write_config("pt")
        self.chain_config = self.write_config("bench")
        for s in STAGES:
            self.start_stage(self.chain_config, s)
        for s in STAGES:
            self.wait_ready(s)

    def state(self) -> dict:
        profiles = sum(l["workload"]["expected_profiles"] for l in self.loads)
        out = {"profiles": profiles}
        for s in STAGES:
            b = du_bytes(self.state_root / s)
            out[s] = {"bytes": b, "bytes_per_profile": round(b / max(profiles, 1), 1)}
        return out

    def run(self) -> dict:
        self.start_broker()
        try:
            self.result["passthrough"] = self.passthrough()
            self.result["chain"] = self.chain()
            sustained = self.result["chain"]["events_per_sec"]
            self.result["latency"] = {}
            self.result["passthrough_latency"] = {}
            # Fixed rates (`--rates`) compare runs whose drain rates differ.
            phases = ([(f"{r:g}/s", r) for r in self.args.rates] if self.args.rates
                      else [(f"{f * 100:g}%", sustained * f) for f in self.args.latency_at])
            self.result["state"] = self.state()
            for i, (key, rate) in enumerate(phases):
                if self.args.fresh_broker:
                    self.fresh_broker(key)
                self.result["latency"][key] = self.latency(rate, 2 + i)
                self.result["passthrough_latency"][key] = self.pt_latency(rate, 100 + i)
            self.result["ratio"] = round(sustained / self.result["passthrough"]["events_per_sec"], 3)
        finally:
            self.stop_all()
        return self.result


def machine() -> dict:
    cpu = ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg": os.getloadavg(),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def table(r: dict) -> str:
    pt, ch = r["passthrough"], r["chain"]
    rows = [f"machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, load {r['machine']['load_avg'][0]:.2f} at start",
            f"events: {ch['events']}, partitions: {r['settings']['partitions']}, max_batch: {r['settings']['max_batch'] or 'default'} (hops {r['settings'].get('hop_max_batch', '-')}), properties: {r['settings']['property']}", "",
            f"{'':28}{'events/s':>10}{'cpu s':>8}{'rss MB':>8}",
            f"{'pass-through chain':28}{pt['events_per_sec']:>10}"]
    for h in pt["hops"]:
        rows.append(f"{'  ' + h['from'] + ' -> ' + h['to']:28}{round(h['events_per_sec']):>10}{h['cpu_secs']:>8}{h['max_rss_mb']:>8}")
    rows.append(f"{'  broker (' + r['settings']['broker'] + ')':28}{'':>10}{pt['broker_cpu_secs']:>8}")
    rows.append(f"{'whole chain':28}{ch['events_per_sec']:>10}")
    for s, v in ch["stages"].items():
        rows.append(f"{'  ' + s:28}{str(v.get('events_per_sec') or '-'):>10}{v['cpu_secs']:>8}{str(v.get('vmrss', '-')):>8}")
    rows.append(f"{'  broker (' + r['settings']['broker'] + ')':28}{'':>10}{ch['broker_cpu_secs']:>8}")
    rows.append(f"chain / pass-through: {r['ratio']:.2f}")
    for name, run in (("pass-through", pt), ("chain", ch)):
        topics = run.get("topic_records", {})
        total = sum(topics.values())
        rows.append(f"records the broker holds, {name}: {total} ({total / max(run['events'], 1):.2f} per event): "
                    + ", ".join(f"{t} {n}" for t, n in sorted(topics.items()) if n))
    rows.append("")
    rows.append(f"{'latency event -> change':28}{'rate':>8}{'changes':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for k, v in r["latency"].items():
        rows.append(f"{'  at ' + k + (' of sustained' if k.endswith('%') else ''):28}{v['achieved_rate']:>8}{v['changes']:>9}{v['p50_ms']:>9}{v['p99_ms']:>9}{str(v['max_ms']):>9}")
        rows.append("    mean batch (ms / records): " + ", ".join(
            f"{s} {b['ms']}/{b['records']}" for s, b in v.get("per_batch", {}).items()))
        pt = r.get("passthrough_latency", {}).get(k)
        if pt:
            rows.append(f"{'  pass-through, same rate':28}{pt['achieved_rate']:>8}{pt['events']:>9}{pt['p50_ms']:>9}{pt['p99_ms']:>9}{str(pt['max_ms']):>9}")
        rows.append("    broker cores every 5 s: chain " + " ".join(f"{c:g}" for c in v.get("broker_cores", []))
                    + (" | pass-through " + " ".join(f"{c:g}" for c in pt.get("broker_cores", [])) if pt else ""))
    rows.append("")
    rows.append(f"{'hop by hop, p50 / p99 ms':28}" + "".join(
        f"{k + ' chain':>16}{k + ' pt':>16}" for k in r["latency"]))
    first = next(iter(r["latency"].values()))
    for hop in first.get("hops", {}):
        cells = []
        for k, v in r["latency"].items():
            for h in (v.get("hops", {}).get(hop), r.get("passthrough_latency", {}).get(k, {}).get("hops", {}).get(hop)):
                cells.append(f"{h['p50_ms']:g} / {h['p99_ms']:g}" if h and h["events"] else "-")
        rows.append(f"{'  ' + hop:28}" + "".join(f"{c:>16}" for c in cells))
    rows.append("")
    rows.append("mean committed batch by phase, ms (" + " / ".join(PHASES) + ")")
    for k, v in r["latency"].items():
        for s, b in v.get("per_batch", {}).items():
            if "phases_ms" in b:
                rows.append(f"  at {k}, {s:10}" + " / ".join(f"{b['phases_ms'][p]:g}" for p in PHASES)
                            + f"  (cycle {b['ms']:g}, {b['records']:g} records)")
    rows.append("")
    rows.append("CPU s and s waiting for a core over each phase (all threads; stage thread)")
    for k, v in r["latency"].items():
        rows.append(f"  at {k}: " + ", ".join(
            f"{s} {c['cpu']:g}/{c['wait']:g} ({c['stage_cpu']:g}/{c['stage_wait']:g})"
            for s, c in v.get("sched_secs", {}).items()))
    st = r["state"]
    rows.append("")
    rows.append(f"RocksDB bytes per profile ({st['profiles']} profiles): " + ", ".join(
        f"{s} {st[s]['bytes_per_profile']}" for s in STAGES if st[s]["bytes"]))
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cdp", required=True, help="the cdp binary (a release build)")
    ap.add_argument("--broker", choices=["tansu", "mock"], default="tansu",
                    help="tansu (a separate process, memory engine by default) or librdkafka's mock "
                         "cluster (`cdp mock-broker`, in memory, written in C)")
    ap.add_argument("--tansu", help="the tansu binary (with --broker tansu)")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--phase-secs", type=int, default=30, help="length of each latency phase")
    ap.add_argument("--timeout", type=float, default=600, help="longest wait for a drain")
    ap.add_argument("--max-batch", type=int, help="kafka.max_batch of the stages (default: the product's)")
    ap.add_argument("--hop-max-batch", type=int, default=5000,
                    help="kafka.max_batch of the pass-through hops: 5000, their fastest (a hop waits for its "
                         "whole round's acks, so larger rounds only slow it; docs/performance.md)")
    ap.add_argument("--property", action="append", default=[], metavar="K=V",
                    help="a kafka.properties entry for stages and hops, e.g. producer.linger.ms=0")
    ap.add_argument("--storage", choices=["memory", "sqlite"], default="memory",
                    help="tansu's storage engine (sqlite: a file in the work directory)")
    ap.add_argument("--no-fresh-broker", dest="fresh_broker", action="store_false",
                    help="run the latency phases on the drain's broker and stages (its topics keep every batch)")
    ap.add_argument("--workdir", help="keep configs, logs and state here")
    ap.add_argument("--latency-at", type=lambda v: [float(f) for f in v.split(",")],
                    default=[0.5, 1.0], metavar="F,F",
                    help="latency phases at these fractions of the drain rate (default 0.5,1)")
    ap.add_argument("--rates", type=lambda v: [float(f) for f in v.split(",")], metavar="R,R",
                    help="latency phases at these events/s instead of fractions of the drain rate")
    ap.add_argument("--perf", metavar="STAGE", help="profile this stage (or `all`: every stage and the broker) with `perf record` during the drain; `broker` (or `tansu`) also profiles the broker during the pass-through's drain")
    ap.add_argument("--perf-graph", action="store_true",
                    help="with --perf: record call graphs (`perf report --children -i <work>/perf-*.data`)")
    ap.add_argument("--out", default="bench-result.json")
    args = ap.parse_args()
    if args.broker == "tansu" and not args.tansu:
        ap.error("--tansu is required with --broker tansu")
    result = Bench(args).run()
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
