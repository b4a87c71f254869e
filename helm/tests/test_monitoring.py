"""The Grafana dashboard and the Prometheus alert rules use only metric
names the binaries export: names are read from the code (the one metrics
module, pipeline/src/metrics.rs, and any metric registered elsewhere), and
every query is parsed by a PromQL parser, so a renamed metric or a broken
query fails here."""

from __future__ import annotations

import json
import re

import promql_parser
import pytest
import yaml
from conftest import CHART, ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "cdp-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
# Metrics of other exporters the rules may use, by design.
EXTERNAL = {"up", "kubelet_volume_stats_available_bytes", "kubelet_volume_stats_capacity_bytes"}
# Labels each metric is registered with, and Prometheus's own target labels.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container", "service", "le"}


def exported() -> dict[str, set[str]]:
    """Metric name -> label names, from the macros of pipeline/src/metrics.rs
    (counters, gauges, histograms with their _bucket/_sum/_count series)."""
    source = (ROOT / "pipeline" / "src" / "metrics.rs").read_text()
    found: dict[str, set[str]] = {}
    pattern = re.compile(r'(counter|gauge|histogram)!\(\s*\w+,\s*"([a-z_:][a-z0-9_:]*)",\s*"[^"]*",\s*\[([^\]]*)\]')
    for kind, name, labels in pattern.findall(source):
        label_set = set(re.findall(r'"([a-z_]+)"', labels))
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                found[name + suffix] = label_set | {"le"}
        else:
            found[name] = label_set
    assert len(found) > 20, "the metric macros of pipeline/src/metrics.rs changed shape; update this parser"
    return found


def registered_elsewhere() -> set[str]:
    """Metric names registered outside the metrics module (there should be
    none, but a test that only read metrics.rs would miss them)."""
    names = set()
    for folder in ("connectors", "pipeline", "operators", "src"):
        for path in (ROOT / folder).rglob("*.rs"):
            if path.name == "metrics.rs":
                continue
            for m in re.finditer(r'register_\w+!\(\s*"([a-z_:][a-z0-9_:]*)"', path.read_text()):
                names.add(m.group(1))
    return names


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names) of every selector in a PromQL query."""
    # Grafana's variables are not PromQL: give them parseable stand-ins.
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    tree = promql_parser.parse(expr)
    found = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers} if node.matchers else set()
            found.append((node.name, labels))

    promql_parser.walk(tree, visit)
    return found


def dashboard_queries() -> list[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    out = []
    for p in d["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", v["definition"])
            assert m, v["definition"]
            out.append((f"variable {v['name']}", f"{m.group(1)}{{{m.group(2)}!=\"\"}}"))
    return out


def alert_rules(path=ALERTS) -> list[dict]:
    doc = yaml.safe_load(path.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def check(where: str, expr: str, metrics: dict[str, set[str]], external=frozenset()) -> set[str]:
    used = set()
    for name, labels in selectors(expr):
        if name in external:
            continue
        assert name in metrics, f"{where}: {name} is not a metric cdp exports (see pipeline/src/metrics.rs)"
        unknown = labels - metrics[name] - TARGET_LABELS - {"__name__"}
        assert not unknown, f"{where}: {name} has no label {sorted(unknown)} (it has {sorted(metrics[name])})"
        used.add(name)
    return used


def test_no_metric_is_registered_outside_the_metrics_module():
    assert registered_elsewhere() == set()


def test_the_dashboard_uses_only_exported_metrics():
    metrics = exported()
    used = set()
    for where, expr in dashboard_queries():
        used |= check(f"dashboard panel {where!r}", expr, metrics)
    # The list: throughput, lag, dead letters, end-to-end latency,
    # audience sizes, delivery outcomes.
    for needed in ("cdp_records_in_total", "cdp_consumer_lag", "cdp_dead_letters_total",
                   "cdp_end_to_end_latency_seconds_bucket", "cdp_audience_members",
                   "cdp_audience_changes_total",
                   "cdp_delivery_attempts_total", "cdp_delivery_failures_total"):
        assert needed in used, f"the dashboard shows no {needed}"


def test_every_exported_metric_is_on_the_dashboard():
    metrics = exported()
    used = set()
    for _, expr in dashboard_queries():
        used |= {n for n, _ in selectors(expr)}
    bases = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    missing = {m for m in metrics if re.sub(r"_(bucket|sum|count)$", "", m) not in bases}
    assert missing == set(), f"metrics nobody can see: {sorted(missing)}"


def test_the_dashboard_is_importable():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 30
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("path", [ALERTS, CHART / "files" / "alerts.yaml"], ids=["deploy", "chart"])
def test_alert_rules_use_only_exported_metrics(path):
    metrics = exported()
    rules = alert_rules(path)
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    used = set()
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r["alert"]
        assert r["labels"]["severity"] in ("info", "warning", "critical")
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        used |= check(f"alert {r['alert']}", r["expr"], metrics, EXTERNAL)
    # lag growing, dead-letter rate, delivery failures, stage down
    for needed in ("cdp_consumer_lag", "cdp_dead_letters_total", "cdp_delivery_failures_total", "cdp_tasks"):
        assert needed in used, f"no alert on {needed}"


def aggregations_over(expr: str, metric: str) -> list[tuple[str, set[str], list]]:
    """(operator, grouping labels, matchers of `metric`) of every
    aggregation whose argument reads `metric`."""
    found = []

    def visit(node):
        if isinstance(node, promql_parser.AggregateExpr):
            inner = []

            def sel(n):
                if isinstance(n, promql_parser.VectorSelector) and n.name == metric:
                    inner.append(list(n.matchers.matchers) if n.matchers else [])

            promql_parser.walk(node.expr, sel)
            for matchers in inner:
                found.append((str(node.op), set(node.modifier.labels) if node.modifier else set(), matchers))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


@pytest.mark.parametrize("path", [ALERTS, CHART / "files" / "alerts.yaml"], ids=["deploy", "chart"])
def test_rebalance_storm_counts_rebalances_not_instances(path):
    """Each instance of a stage counts every rebalance (a revoke and an
    assign): a sum over instances turns one rebalance of 6 replicas into
    ~12, so every rolling upgrade fired. Count the assignments of one
    instance."""
    (rule,) = [r for r in alert_rules(path) if r["alert"] == "CdpRebalanceStorm"]
    found = aggregations_over(rule["expr"], "cdp_rebalances_total")
    assert found, rule["expr"]
    for op, labels, matchers in found:
        assert op == "max", f"{op} over instances: {rule['expr']}"
        assert labels <= {"namespace", "stage"}, labels
        assert any(m.name == "kind" and m.value == "assign" for m in matchers), rule["expr"]


def test_every_alert_is_explained_in_operations():
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    for r in alert_rules():
        assert f"`{r['alert']}`" in text, f"docs/OPERATIONS.md does not say what to do about {r['alert']}"


def test_a_renamed_metric_would_fail():
    """The check itself: an unknown name and an unknown label are caught."""
    metrics = exported()
    with pytest.raises(AssertionError, match="not a metric"):
        check("probe", "sum(rate(cdp_records_processed_total[5m]))", metrics)
    with pytest.raises(AssertionError, match="has no label"):
        check("probe", 'sum(cdp_consumer_lag{topic="x"})', metrics)
    with pytest.raises(ValueError):
        selectors("sum(rate(cdp_records_in_total[5m])")


def test_the_dashboard_json_is_what_its_generator_writes():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "deploy" / "grafana" / "dashboard.py")],
                         capture_output=True, text=True, check=True)
    assert out.stdout == DASHBOARD.read_text(), (
        "deploy/grafana/cdp-dashboard.json is stale: "
        "python3 deploy/grafana/dashboard.py > deploy/grafana/cdp-dashboard.json"
    )
