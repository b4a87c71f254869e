#!/usr/bin/env python3
"""Measure state size per profile: the numbers behind docs/OPERATIONS.md's
sizing section.

Runs `cdp dev` (every stage in one process, demo config) with a state
directory, sends PROFILES synthetic visitors through the collector (each:
a page view with a campaign, three product views, an identify with user id
and email, two orders; 7 events), waits until every stage has caught up,
stops cdp, then opens every task's RocksDB read-only and counts keys and
key+value bytes per stage. Needs `pip install rocksdict` (not a test
dependency) and a built binary:

    python3 scripts/measure-state.py --cdp target/debug/cdp --profiles 20000
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def events_for(i: int, now: datetime) -> list[dict]:
    anon = f"anon-{i:08d}-{uuid.uuid4().hex[:12]}"
    user = f"user-{i:08d}"
    t = now - timedelta(hours=2)
    out = []

    def ev(kind: str, **fields):
        nonlocal t
        t += timedelta(seconds=7)
        out.append({"type": kind, "anonymousId": anon, "messageId": str(uuid.uuid4()),
                    "timestamp": t.isoformat().replace("+00:00", "Z"), **fields})

    ev("page", name="Home", context={"campaign": {"source": ["news", "ads", "social"][i % 3]}})
    for k in range(3):
        ev("track", event="Product Viewed",
           properties={"sku": f"sku-{(i * 7 + k) % 5000}", "category": ["shoes", "bags", "hats", "coats"][(i + k) % 4]})
    ev("identify", userId=user, traits={"email": f"{user}@example.com", "plan": "pro"})
    for r in (120.0 + i % 400, 300.0 + i % 500):
        ev("track", userId=user, event="Order Completed", properties={"revenue": r})
    return out


def post(url: str, body: dict) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "content-type": "application/json",
        "authorization": "Basic " + base64.b64encode(b"wk_web_123:").decode(),
    })
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200, r.status


def metrics(admin: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def summed(m: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in m.items() if k.startswith(prefix))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cdp", default="target/debug/cdp")
    ap.add_argument("--profiles", type=int, default=20000)
    args = ap.parse_args()
    from rocksdict import AccessType, Options, Rdict

    state = pathlib.Path(tempfile.mkdtemp(prefix="cdp-state-"))
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([args.cdp, "dev", "--listen", listen, "--admin-listen", admin, "--state-dir", str(state)],
                            stdout=subprocess.DEVNULL, stderr=open(state / "cdp.log", "w"))
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"http://{admin}/readyz", timeout=2).status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        now = datetime.now(timezone.utc)
        start = time.time()
        batch: list[dict] = []
        sent = 0
        for i in range(args.profiles):
            batch += events_for(i, now)
            if len(batch) >= 700:
                post(f"http://{listen}/v1/batch", {"batch": batch})
                sent += len(batch)
                batch = []
        if batch:
            post(f"http://{listen}/v1/batch", {"batch": batch})
            sent += len(batch)
        print(f"sent {sent} events for {args.profiles} profiles in {time.time() - start:.1f}s", file=sys.stderr)
        # Caught up: no lag and no input for a few seconds (ticks aside).
        quiet, last = 0, -1.0
        while quiet < 5:
            time.sleep(2)
            m = metrics(admin)
            seen = summed(m, 'cdp_records_out_total{output="next",stage="audiences"')
            lag = summed(m, "cdp_consumer_lag")
            quiet = quiet + 1 if (lag == 0 and seen == last) else 0
            last = seen
        print(f"caught up after {time.time() - start:.1f}s", file=sys.stderr)
        m = metrics(admin)
        estimate = {}
        for k, v in m.items():
            if k.startswith("cdp_state_store_bytes"):
                stage = k.split('stage="')[1].split('"')[0]
                estimate[stage] = estimate.get(stage, 0) + v
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(f"{'stage':10} {'keys':>10} {'key+value B':>12} {'B/profile':>10} {'on disk B':>12} {'rocksdb estimate':>16}")
    for stage_dir in sorted(p for p in state.iterdir() if p.is_dir()):
        keys = size = 0
        for task in sorted(stage_dir.iterdir()):
            db = Rdict(str(task), options=Options(raw_mode=True), access_type=AccessType.read_only())
            for k, v in db.items():
                keys += 1
                size += len(k) + len(v)
            db.close()
        disk = sum(f.stat().st_size for f in stage_dir.rglob("*") if f.is_file())
        print(f"{stage_dir.name:10} {keys:>10} {size:>12} {size / args.profiles:>10.0f} {disk:>12} {estimate.get(stage_dir.name, 0):>16.0f}")
    print(f"state dir: {state}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
