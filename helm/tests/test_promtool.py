"""The alert rules through Prometheus's own tool: `promtool check rules`
(the file Prometheus loads, the chart's copy and the chart's rendered
PrometheusRule), and `promtool test rules` with the cases of
helm/tests/promtool/alerts_test.yaml, each a behaviour a tester saw go
wrong against a real Prometheus. scripts/test.sh installs Debian's
`prometheus` package for promtool; under CI a missing promtool fails."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from conftest import CHART, ROOT
from test_monitoring import ALERTS

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
CASES = ROOT / "helm" / "tests" / "promtool" / "alerts_test.yaml"


def promtool(*args: str, cwd=None) -> str:
    out = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd)
    assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@needs_promtool
@pytest.mark.parametrize("path", [ALERTS, CHART / "files" / "alerts.yaml"], ids=["deploy", "chart"])
def test_promtool_checks_the_rules(path):
    assert "SUCCESS" in promtool("check", "rules", str(path))


@needs_promtool
def test_promtool_checks_the_charts_prometheus_rule(tmp_path):
    """The chart rewrites some expressions (to its namespace, its claims and
    its stages): what it renders must load too."""
    from test_chart import merge, rendered_rules

    from conftest import load_values

    values = merge(load_values("ingress-monitoring"), {"metrics": {"prometheusRule": {"enabled": True}}})
    rules = list(rendered_rules(values).values())
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "cdp", "rules": rules}]}))
    assert "SUCCESS" in promtool("check", "rules", str(path))


@needs_promtool
def test_promtool_unit_tests_of_the_rules(tmp_path):
    """The cases run against the rules without their `description`s (long
    texts the cases would have to repeat word for word); summaries are
    compared."""
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["annotations"].pop("description", None)
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(doc))
    shutil.copy(CASES, tmp_path / "alerts_test.yaml")
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)


@needs_promtool
def test_every_alert_has_a_promtool_case_or_a_reason():
    """New alerts come with a case; these predate the cases and are
    plain thresholds."""
    without_cases = {"CdpInstanceDown", "CdpConsumerLagHigh", "CdpEndToEndLatencyHigh", "CdpBrokerUnreachable",
                     "CdpClientRebuildsRepeating", "CdpTicksRejected", "CdpStateVolumeFilling"}
    cases = yaml.safe_load(CASES.read_text())
    tested = {t["alertname"] for case in cases["tests"] for t in case.get("alert_rule_test", [])}
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert tested <= alerts, tested - alerts
    assert alerts - tested == without_cases
