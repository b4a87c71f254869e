"""Shared helpers of the chart tests: render with a real helm engine
(helm-python-sdk, Helm's Go SDK behind ctypes), parse the manifests, find
the repository's files. With CI set, a missing prerequisite fails the test
instead of skipping it."""

from __future__ import annotations

import json
import os
import pathlib

import helm_python as helm
import pytest
import yaml
from helm_python import _native

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cdp"
VALUES = pathlib.Path(__file__).resolve().parent / "values"
# The value sets every structural test runs over ("minimal" is the chart's
# defaults plus the one required value, kafka.brokers).
VALUE_SETS = sorted(p.stem for p in VALUES.glob("*.yaml"))
# The cluster the monitoring value sets pretend to have.
PROMETHEUS_OPERATOR = [
    "monitoring.coreos.com/v1",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
]
RELEASE = "shop"
NAMESPACE = "data"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a skipped test is a failed one: nothing may pass as green
    because a prerequisite was missing."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI: {report.longrepr}"


def load_values(name: str) -> dict:
    return yaml.safe_load((VALUES / f"{name}.yaml").read_text()) or {}


_LOADED = None


def loaded_chart() -> helm.Chart:
    """The chart, loaded once per test run (charts are immutable)."""
    global _LOADED
    if _LOADED is None:
        _LOADED = helm.Chart.load(CHART)
    return _LOADED


def render_raw(values: dict, *, api_versions=None, kube_version=None, **opts) -> dict[str, str]:
    """Render offline; returns template path -> text. The SDK's render()
    does not expose the cluster's API versions, which the ServiceMonitor
    condition needs, so this passes them to the same native call."""
    options = {"name": RELEASE, "namespace": NAMESPACE, **opts}
    if api_versions:
        options["api_versions"] = list(api_versions)
    if kube_version:
        options["kube_version"] = kube_version
    payload = _native.call_string("helm_render", loaded_chart()._raw(), json.dumps(values), json.dumps(options))
    return json.loads(payload)


def manifests(rendered: dict[str, str]) -> list[dict]:
    """Every Kubernetes object of a render (NOTES.txt excluded)."""
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("__template__", path)
                docs.append(doc)
    return docs


def render(values: dict, **kw) -> list[dict]:
    return manifests(render_raw(values, **kw))


def render_set(name: str) -> list[dict]:
    api = PROMETHEUS_OPERATOR if "monitoring" in name else None
    return render(load_values(name), api_versions=api)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name_suffix: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: found {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    if workload["kind"] == "Pod":
        return workload["spec"]
    return workload["spec"]["template"]["spec"]


def cdp_container(workload: dict) -> dict:
    spec = pod_spec(workload)
    names = {"topics", "topics-check"}
    for c in spec["containers"]:
        if c["name"] in names or workload["metadata"]["name"].endswith("-" + c["name"]):
            return c
    raise AssertionError(f"no cdp container in {workload['metadata']['name']}")


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job", "Pod")]


def is_hook(doc: dict) -> bool:
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})
