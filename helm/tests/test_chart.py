"""The chart, rendered by a real helm engine for every value set in
values/: lint clean, every manifest valid against the Kubernetes schemas,
and the properties the chart promises (workloads per stage, hardened pods,
credentials only through secretKeyRef, hooks that see their own config)."""

from __future__ import annotations

import copy
import re

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from conftest import (
    CHART,
    NAMESPACE,
    PROMETHEUS_OPERATOR,
    RELEASE,
    VALUE_SETS,
    by_kind,
    cdp_container,
    is_hook,
    load_values,
    loaded_chart,
    one,
    pod_spec,
    render,
    render_raw,
    render_set,
    workloads,
)

STATEFUL = ["validate", "identity", "traits", "audiences"]
DEPLOYED = ["collect", "deliver"]
# The Kubernetes version the manifests are checked against (the newest
# kubernetes-validate ships) and the oldest the chart supports.
KUBE = "1.37.0"
OLDEST_KUBE = "1.27.0"  # Chart.yaml's kubeVersion


def test_there_are_at_least_four_value_sets():
    assert {"minimal", "sasl-tls", "existing-secret", "ingress-monitoring"} <= set(VALUE_SETS)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_is_clean(name):
    report = helm.lint(CHART, load_values(name), strict=True, namespace=NAMESPACE)
    assert report["errors"] == [], report
    # Severity 2 = warning, 3 = error; 1 (info) is only "icon is recommended".
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("kube", [OLDEST_KUBE, KUBE])
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_is_valid_kubernetes(name, kube):
    api = PROMETHEUS_OPERATOR if "monitoring" in name else None
    docs = render(load_values(name), api_versions=api, kube_version=f"v{kube}")
    assert docs
    for doc in docs:
        doc = {k: v for k, v in doc.items() if k != "__template__"}
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            check_prometheus_operator_object(doc)
            continue
        # strict: unknown fields are errors too (a typo'd key would be ignored by the API server).
        kubernetes_validate.validate(doc, kube, strict=True)


def check_prometheus_operator_object(doc: dict) -> None:
    """kubernetes-validate ships no CRD schemas: check the fields the
    Prometheus Operator needs by hand."""
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"]
    if doc["kind"] == "ServiceMonitor":
        assert doc["spec"]["selector"]["matchLabels"]
        for e in doc["spec"]["endpoints"]:
            assert e["port"] == "admin" and e["path"] == "/metrics"
            assert re.fullmatch(r"\d+(ms|s|m|h)", e["interval"])
    elif doc["kind"] == "PrometheusRule":
        for group in doc["spec"]["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert rule["alert"] and rule["expr"]
    else:
        raise AssertionError(f"unexpected {doc['kind']}")


def helm_chart():
    return loaded_chart()


@pytest.mark.parametrize("name", VALUE_SETS)
def test_each_stage_is_its_own_workload(name):
    docs = render_set(name)
    values = load_values(name)
    for stage in STATEFUL:
        sts = one(docs, "StatefulSet", f"-{stage}")
        spec = sts["spec"]
        assert spec["podManagementPolicy"] == "Parallel"
        assert spec["serviceName"] == f"{sts['metadata']['name']}-headless"
        assert set(spec["persistentVolumeClaimRetentionPolicy"]) == {"whenDeleted", "whenScaled"}
        assert spec["updateStrategy"]["type"] == "RollingUpdate"
        persistent = values.get(stage, {}).get("persistence", {}).get("enabled", True)
        claims = spec.get("volumeClaimTemplates", [])
        assert [c["metadata"]["name"] for c in claims] == (["state"] if persistent else [])
        mounts = {m["name"]: m["mountPath"] for m in cdp_container(sts)["volumeMounts"]}
        assert mounts["state"] == "/var/lib/cdp"
        # Static membership: the pod name is the group instance id.
        env = {e["name"]: e for e in cdp_container(sts)["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert cdp_container(sts)["args"][0] == stage
    for stage in DEPLOYED:
        dep = one(docs, "Deployment", f"-{stage}")
        assert cdp_container(dep)["args"][0] == stage
        # Deployment pods get new names: no static membership for them.
        assert "POD_NAME" not in {e["name"] for e in cdp_container(dep)["env"]}
    assert one(docs, "StatefulSet", "-identity")["spec"]["replicas"] == 2


def test_deliver_outlives_a_webhook_batch_deadline_on_stop():
    """A webhook/segment batch may take its whole batch_deadline (60 s by
    default); a grace period no longer than that SIGKILLs a slow batch and
    it is sent again."""
    docs = render_set("minimal")
    assert pod_spec(one(docs, "Deployment", "-deliver"))["terminationGracePeriodSeconds"] > 60 + 15


def test_stage_values_merge_maps_and_replace_lists_as_values_yaml_says():
    shared_toleration = {"key": "shared", "operator": "Exists"}
    own_toleration = {"key": "own", "operator": "Exists"}
    docs = render({
        "kafka": {"brokers": "k:9092"},
        "nodeSelector": {"pool": "data", "disk": "ssd"},
        "podLabels": {"team": "data"},
        "tolerations": [shared_toleration],
        "traits": {"nodeSelector": {"pool": "traits"}, "podLabels": {"tier": "hot"},
                   "tolerations": [own_toleration]},
    })
    traits = one(docs, "StatefulSet", "-traits")
    spec = pod_spec(traits)
    assert spec["nodeSelector"] == {"pool": "traits", "disk": "ssd"}  # merged, the stage wins
    labels = traits["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "data" and labels["tier"] == "hot"
    assert spec["tolerations"] == [own_toleration]  # replaced
    assert pod_spec(one(docs, "StatefulSet", "-audiences"))["tolerations"] == [shared_toleration]


def test_static_membership_can_be_turned_off_for_brokers_without_it():
    docs = render({"kafka": {"brokers": "k:9092", "staticMembership": False}})
    for stage in STATEFUL:
        sts = one(docs, "StatefulSet", f"-{stage}")
        assert "POD_NAME" not in {e["name"] for e in cdp_container(sts)["env"]}


def test_identity_defaults_to_two_replicas_and_stages_scale_separately():
    docs = render({"kafka": {"brokers": "k:9092"}, "traits": {"replicas": 5}, "deliver": {"replicas": 3}})
    assert one(docs, "StatefulSet", "-identity")["spec"]["replicas"] == 2
    assert one(docs, "StatefulSet", "-traits")["spec"]["replicas"] == 5
    assert one(docs, "StatefulSet", "-validate")["spec"]["replicas"] == 2
    assert one(docs, "Deployment", "-deliver")["spec"]["replicas"] == 3


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pods_are_hardened_and_probed(name):
    docs = render_set(name)
    for w in workloads(docs):
        spec = pod_spec(w)
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
        assert psc["fsGroupChangePolicy"] == "OnRootMismatch"
        assert psc["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        c = cdp_container(w)
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
        if w["kind"] in ("Deployment", "StatefulSet"):
            # /healthz answers 200 at once, restoring or not: a startupProbe
            # on it would guard nothing; /readyz gates restores.
            assert "startupProbe" not in c
            assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
            assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
            assert {"name": "admin", "containerPort": 9464, "protocol": "TCP"} in c["ports"]
            assert "checksum/config" in w["spec"]["template"]["metadata"]["annotations"]
            affinity = spec["affinity"]["podAntiAffinity"]
            assert affinity, w["metadata"]["name"]
            for tsc in spec.get("topologySpreadConstraints", []):
                assert tsc["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == c["name"]
        # The only writable places: the state volume and /tmp.
        writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert writable <= {"/var/lib/cdp", "/tmp", "/scratch"}, writable


@pytest.mark.parametrize("name", VALUE_SETS)
def test_credentials_come_only_from_secret_key_refs(name):
    """No secret value in a ConfigMap, an env value or an argument."""
    values = load_values(name)
    sasl = values.get("kafka", {}).get("sasl", {})
    secrets = [s for s in (sasl.get("password"), sasl.get("username")) if s]
    secrets += [e["value"] for e in values.get("secretEnv", []) if e.get("value")]
    docs = render_set(name)
    for doc in docs:
        if doc["kind"] == "Secret":
            continue
        text = yaml.safe_dump(doc)
        for s in secrets:
            assert s not in text, f"{s!r} in {doc['kind']} {doc['metadata']['name']}"
    for w in workloads(docs):
        for e in cdp_container(w)["env"]:
            if e["name"].startswith("KAFKA_SASL_") or e["name"].endswith("_SECRET"):
                assert set(e) == {"name", "valueFrom"} and "secretKeyRef" in e["valueFrom"], e


def config_of(docs: list[dict], hook: bool = False) -> dict:
    for d in docs:
        if d["kind"] in ("ConfigMap", "Secret") and is_hook(d) == hook:
            data = d.get("data") or d.get("stringData") or {}
            if "cdp.yaml" in data:
                return yaml.safe_load(data["cdp.yaml"])
    raise AssertionError("no cdp.yaml")


def test_sasl_tls_reaches_the_config_and_the_pods():
    docs = render_set("sasl-tls")
    config = config_of(docs)
    kafka = config["kafka"]
    assert kafka["brokers"] == "b-1.msk.internal:9096,b-2.msk.internal:9096"
    assert kafka["topic_prefix"] == "shop" and kafka["partitions"] == 12
    assert kafka["tick_interval"] == "2s"
    props = kafka["properties"]
    assert props["security.protocol"] == "SASL_SSL"
    assert props["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert props["ssl.ca.location"] == "/etc/cdp/kafka-ca/ca.crt"
    assert props["ssl.certificate.location"] == "/etc/cdp/kafka-client/tls.crt"
    assert kafka["secret_env"] == {"sasl.username": "KAFKA_SASL_USERNAME", "sasl.password": "KAFKA_SASL_PASSWORD"}
    # The config with write keys lives in a Secret, as asked.
    assert not by_kind(docs, "ConfigMap") or all(
        "cdp.yaml" not in (c.get("data") or {}) for c in by_kind(docs, "ConfigMap")
    )
    deliver = one(docs, "Deployment", "-deliver")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in cdp_container(deliver)["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
    assert env["CRM_WEBHOOK_SECRET"] == {"name": f"{RELEASE}-cdp-env", "key": "CRM_WEBHOOK_SECRET"}
    assert env["ADS_WEBHOOK_SECRET"] == {"name": "ads-webhook", "key": "secret"}
    assert env["KAFKA_SASL_PASSWORD"] == {"name": f"{RELEASE}-cdp-kafka", "key": "password"}
    # Webhook secrets go to deliver only.
    validate = one(docs, "StatefulSet", "-validate")
    assert "CRM_WEBHOOK_SECRET" not in {e["name"] for e in cdp_container(validate)["env"]}
    vols = {v["name"]: v for v in pod_spec(validate)["volumes"]}
    assert vols["kafka-ca"]["secret"]["secretName"] == "kafka-ca"
    assert vols["kafka-client-cert"]["secret"]["secretName"] == "kafka-client"
    assert vols["config"]["secret"]["secretName"] == f"{RELEASE}-cdp-config"
    img = cdp_container(validate)["image"]
    assert img == "registry.example.com/platform/cdp@sha256:" + "0123456789abcdef" * 4
    # Extension points land where they should.
    identity = one(docs, "StatefulSet", "-identity")
    spec = pod_spec(identity)
    assert [c["name"] for c in spec["containers"]] == ["identity", "log-shipper"]
    assert [c["name"] for c in spec["initContainers"]] == ["wait"]
    assert spec["priorityClassName"] == "data-plane" and spec["nodeSelector"] == {"pool": "data"}
    assert spec["terminationGracePeriodSeconds"] == 120
    assert identity["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Delete"
    assert identity["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast-ssd"
    assert {"name": "TZ", "value": "UTC"} in cdp_container(identity)["env"]
    assert one(docs, "ConfigMap", f"{RELEASE}-extra")["data"] == {"note": "hello"}
    traits = one(docs, "StatefulSet", "-traits")
    assert "volumeClaimTemplates" not in traits["spec"]
    assert {"name": "state", "emptyDir": {}} in pod_spec(traits)["volumes"]


def test_existing_secret_is_referenced_and_never_created():
    docs = render_set("existing-secret")
    assert [s["metadata"]["name"] for s in by_kind(docs, "Secret")] == []
    for w in workloads(docs):
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in cdp_container(w)["env"] if e["name"].startswith("KAFKA_SASL_")}
        assert refs == {
            "KAFKA_SASL_USERNAME": {"name": "cdp-kafka-user", "key": "user"},
            "KAFKA_SASL_PASSWORD": {"name": "cdp-kafka-user", "key": "password"},
        }, w["metadata"]["name"]
        if not is_hook(w):
            assert pod_spec(w)["serviceAccountName"] == "cdp-runner"
    props = config_of(docs)["kafka"]["properties"]
    assert props == {"security.protocol": "SASL_SSL", "sasl.mechanisms": "PLAIN"}
    assert by_kind(docs, "HorizontalPodAutoscaler") == []
    assert one(docs, "Deployment", "-collect")["spec"]["replicas"] == 3
    assert by_kind(docs, "ServiceAccount") == []
    anti = pod_spec(one(docs, "StatefulSet", "-audiences"))["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in anti


def test_the_topics_hook_sees_its_own_config_and_credentials():
    """A pre-install hook runs before the release's ConfigMaps and Secrets
    exist: everything it mounts or references is a hook of a lower weight
    (or a Secret the user made before installing)."""
    for name in VALUE_SETS:
        docs = render_set(name)
        job = one(docs, "Job", "-topics")
        annotations = job["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
        job_weight = int(annotations["helm.sh/hook-weight"])
        hooks = {(d["kind"], d["metadata"]["name"]): d for d in docs if is_hook(d)}
        created = {(d["kind"], d["metadata"]["name"]) for d in docs if not is_hook(d)}
        values = load_values(name)
        user_secrets = {
            values.get("kafka", {}).get("sasl", {}).get("existingSecret"),
            values.get("kafka", {}).get("tls", {}).get("caSecret"),
            values.get("kafka", {}).get("tls", {}).get("clientCertSecret"),
        } - {None, ""}
        spec = pod_spec(job)
        c = cdp_container(job)
        assert c["args"] == ["topics", "create", "--config", "/etc/cdp/cdp.yaml"]
        refs = []
        for v in spec["volumes"]:
            if "configMap" in v:
                refs.append(("ConfigMap", v["configMap"]["name"]))
            if "secret" in v:
                refs.append(("Secret", v["secret"]["secretName"]))
        for e in c["env"]:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.append(("Secret", ref["name"]))
        assert refs, name
        # It runs as the release's ServiceAccount (its hook copy when the
        # chart creates one), never silently as the namespace's default.
        sa = values.get("serviceAccount", {})
        if sa.get("create", True):
            refs.append(("ServiceAccount", spec["serviceAccountName"]))
            release_sa = one(docs, "ServiceAccount", f"{RELEASE}-cdp")
            assert not is_hook(release_sa)
            hook_sa = hooks[("ServiceAccount", spec["serviceAccountName"])]
            assert hook_sa["automountServiceAccountToken"] == release_sa["automountServiceAccountToken"]
            assert (release_sa["metadata"].get("annotations") or {}).items() <= hook_sa["metadata"]["annotations"].items()
        else:
            assert spec["serviceAccountName"] == (sa.get("name") or "default")
            user_secrets.add(spec["serviceAccountName"])
        for kind, ref in refs:
            assert (kind, ref) not in created, f"{name}: the hook uses {kind} {ref}, created only after hooks"
            if (kind, ref) in hooks:
                weight = int(hooks[(kind, ref)]["metadata"]["annotations"]["helm.sh/hook-weight"])
                assert weight < job_weight
                assert "pre-install" in hooks[(kind, ref)]["metadata"]["annotations"]["helm.sh/hook"]
            else:
                assert kind in ("Secret", "ServiceAccount") and ref in user_secrets, f"{name}: {kind} {ref} comes from nowhere"
        # The hook's copy of the config is the release's config.
        assert config_of(docs, hook=True) == config_of(docs)


def test_the_topics_hook_service_account_carries_the_release_accounts_annotations():
    values = {"kafka": {"brokers": "k:9092"}, "commonAnnotations": {"team": "data"},
              "serviceAccount": {"annotations": {"iam.gke.io/gcp-service-account": "cdp@p.iam.gserviceaccount.com"}}}
    docs = render(values)
    job = one(docs, "Job", "-topics")
    hook_sa = one(docs, "ServiceAccount", "-topics")
    assert pod_spec(job)["serviceAccountName"] == hook_sa["metadata"]["name"] == f"{RELEASE}-cdp-topics"
    annotations = hook_sa["metadata"]["annotations"]
    assert annotations["iam.gke.io/gcp-service-account"] == "cdp@p.iam.gserviceaccount.com"
    assert annotations["team"] == "data"
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(annotations["helm.sh/hook-weight"]) < int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
    # Not the release's own ServiceAccount's name: a hook of that name would
    # collide with it at pre-upgrade.
    assert hook_sa["metadata"]["name"] != one(docs, "ServiceAccount", f"{RELEASE}-cdp")["metadata"]["name"]
    # An existing ServiceAccount is used as it is, and none is made.
    docs = render({"kafka": {"brokers": "k:9092"}, "serviceAccount": {"create": False, "name": "runner"}})
    assert pod_spec(one(docs, "Job", "-topics"))["serviceAccountName"] == "runner"
    assert by_kind(docs, "ServiceAccount") == []


def test_helm_test_checks_topics_with_the_release_credentials():
    docs = render_set("sasl-tls")
    pod = one(docs, "Pod", "-test-topics")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = cdp_container(pod)
    assert c["args"] == ["topics", "check", "--config", "/etc/cdp/cdp.yaml"]
    env = {e["name"]: e for e in c["env"]}
    assert env["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-cdp-kafka"
    vols = {v["name"]: v for v in pod_spec(pod)["volumes"]}
    assert vols["config"]["secret"]["secretName"] == f"{RELEASE}-cdp-config"
    assert "kafka-ca" in vols


def test_collector_service_ingress_and_hpa():
    docs = render_set("ingress-monitoring")
    svc = one(docs, "Service", "-collect")
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    ing = one(docs, "Ingress", "-collect")
    rule = ing["spec"]["rules"][0]
    assert rule["host"] == "events.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": svc["metadata"]["name"], "port": {"name": "http"}}
    assert ing["spec"]["tls"][0]["secretName"] == "events-tls"
    hpa = one(docs, "HorizontalPodAutoscaler", "-collect")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment", "-collect")["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    # The HPA owns the replica count.
    assert "replicas" not in one(docs, "Deployment", "-collect")["spec"]


def test_pdbs_cover_every_enabled_stage():
    docs = render_set("minimal")
    pdbs = {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for p in by_kind(docs, "PodDisruptionBudget")}
    assert pdbs == {"collect", "validate", "identity", "traits", "audiences"}


def test_pdb_min_available_alone_replaces_the_default_max_unavailable():
    """`<stage>.pdb.minAvailable: 1` alone must work although the default
    `maxUnavailable: 1` stays in the merged values: the API server refuses
    a PodDisruptionBudget with both."""
    docs = render({"kafka": {"brokers": "k:9092"}, "traits": {"pdb": {"minAvailable": 1}},
                   "collect": {"pdb": {"minAvailable": "50%"}}})
    pdbs = {p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: p["spec"]
            for p in by_kind(docs, "PodDisruptionBudget")}
    assert pdbs["traits"]["minAvailable"] == 1 and "maxUnavailable" not in pdbs["traits"]
    assert pdbs["collect"]["minAvailable"] == "50%" and "maxUnavailable" not in pdbs["collect"]
    assert pdbs["audiences"]["maxUnavailable"] == 1 and "minAvailable" not in pdbs["audiences"]
    for p in by_kind(docs, "PodDisruptionBudget"):
        kubernetes_validate.validate({k: v for k, v in p.items() if k != "__template__"}, KUBE, strict=True)
    # 0 is a value, not "unset".
    docs = render({"kafka": {"brokers": "k:9092"}, "traits": {"pdb": {"minAvailable": 0}}})
    assert one(docs, "PodDisruptionBudget", "-traits")["spec"] == {
        "minAvailable": 0,
        "selector": one(docs, "PodDisruptionBudget", "-traits")["spec"]["selector"],
    }


def test_service_monitor_only_when_the_cluster_has_its_api():
    values = load_values("ingress-monitoring")
    without = render(values)
    assert by_kind(without, "ServiceMonitor") == [] and by_kind(without, "PrometheusRule") == []
    notes = render_raw(values)["cdp/templates/NOTES.txt"]
    assert "has no\nmonitoring.coreos.com/v1 ServiceMonitor" in notes
    docs = render(values, api_versions=PROMETHEUS_OPERATOR)
    sm = one(docs, "ServiceMonitor", "cdp")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # It selects exactly the headless admin Services, one per stage.
    selector = sm["spec"]["selector"]["matchLabels"]
    selected = [
        s for s in by_kind(docs, "Service")
        if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in selected) == sorted(STATEFUL + DEPLOYED)
    assert all(p["name"] == "admin" for s in selected for p in s["spec"]["ports"])
    rule = one(docs, "PrometheusRule", "cdp")
    assert rule["spec"]["groups"]


def rendered_rules(values: dict, **kw) -> dict[str, dict]:
    docs = render(values, api_versions=PROMETHEUS_OPERATOR, **kw)
    rule = one(docs, "PrometheusRule", "cdp")
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def test_state_volume_alert_is_scoped_to_the_release():
    """kubelet reports every PVC of the cluster: the chart's rule watches
    only its release's namespace and its StatefulSets' claims."""
    import promql_parser

    values = merge(load_values("ingress-monitoring"), {"metrics": {"prometheusRule": {"enabled": True}}})
    rules = rendered_rules(values)
    expr = rules["CdpStateVolumeFilling"]["expr"]
    selectors = []
    promql_parser.walk(promql_parser.parse(expr),
                       lambda n: selectors.append(n) if isinstance(n, promql_parser.VectorSelector) else None)
    assert {s.name for s in selectors} == {"kubelet_volume_stats_available_bytes", "kubelet_volume_stats_capacity_bytes"}
    for sel in selectors:
        matchers = {m.name: m for m in sel.matchers.matchers}
        assert matchers["namespace"].value == NAMESPACE and str(matchers["namespace"].op) == "MatchOp.Equal"
        claims = re.compile(matchers["persistentvolumeclaim"].value)  # PromQL regexes are anchored
        for claim in (f"state-{RELEASE}-cdp-{stage}-{n}" for stage in STATEFUL for n in (0, 11)):
            assert claims.fullmatch(claim), claim
        for claim in ("state-other-cdp-traits-0", f"state-{RELEASE}-cdp-collect-0", f"data-{RELEASE}-cdp-traits-0",
                      f"state-{RELEASE}-cdp-traits-x", "state-x-validate-0"):
            assert not claims.fullmatch(claim), claim
    # Every other rule is the file's, unchanged.
    from test_monitoring import alert_rules

    for r in alert_rules(CHART / "files" / "alerts.yaml"):
        if r["alert"] not in ("CdpStateVolumeFilling", "CdpStageAbsent"):
            assert rules[r["alert"]] == r
    # A stage without a volume is not watched; with none, neither is the rule.
    only_traits = merge(values, {s: {"persistence": {"enabled": False}} for s in STATEFUL if s != "traits"})
    assert "state-(shop-cdp-traits)-[0-9]+" in rendered_rules(only_traits)["CdpStateVolumeFilling"]["expr"]
    none = merge(values, {s: {"persistence": {"enabled": False}} for s in STATEFUL})
    assert "CdpStateVolumeFilling" not in rendered_rules(none) and "CdpStageDown" in rendered_rules(none)


def test_stage_absent_alert_lists_the_releases_stages():
    """absent() cannot group by namespace: the file's rule names every
    stage in any namespace; the chart's names its enabled stages in its
    namespace, so another release's pods do not hide this one's absence
    and a stage turned off is not reported missing."""
    import promql_parser

    values = merge(load_values("ingress-monitoring"), {"metrics": {"prometheusRule": {"enabled": True}}})

    def absent(values) -> dict[str, str]:
        rules = rendered_rules(values)
        if "CdpStageAbsent" not in rules:
            return {}
        found = {}

        def visit(n):
            if isinstance(n, promql_parser.VectorSelector):
                m = {x.name: x.value for x in n.matchers.matchers}
                assert m["namespace"] == NAMESPACE, n
                found[m["stage"]] = n.name

        promql_parser.walk(promql_parser.parse(rules["CdpStageAbsent"]["expr"]), visit)
        return found

    every = {"collect": "cdp_broker_reachable"} | {s: "cdp_tasks" for s in STATEFUL + ["deliver"]}
    assert absent(values) == every
    assert absent(merge(values, {"deliver": {"enabled": False}, "collect": {"enabled": False}})) == {
        s: "cdp_tasks" for s in STATEFUL}


def test_prometheus_rule_is_the_deploy_alert_file():
    from conftest import ROOT

    assert (CHART / "files" / "alerts.yaml").read_text() == (ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text()


def checksum(docs, stage="validate"):
    return one(docs, "StatefulSet", f"-{stage}")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def test_a_config_or_secret_change_rolls_the_pods():
    base = load_values("sasl-tls")
    before = checksum(render(base))
    assert checksum(render(base)) == before
    changed = copy.deepcopy(base)
    changed["config"]["audiences"]["big_spenders"]["where"]["all"][0]["gte"] = 600
    assert checksum(render(changed)) != before
    rotated = copy.deepcopy(base)
    rotated["kafka"]["sasl"]["password"] = "rotated"
    assert checksum(render(rotated)) != before


def test_image_tag_defaults_to_app_version():
    docs = render_set("minimal")
    app_version = helm_chart().metadata["appVersion"]
    assert cdp_container(one(docs, "Deployment", "-collect"))["image"] == f"cdp:{app_version}"
    docs = render({"kafka": {"brokers": "k:9092"}, "image": {"registry": "r.example", "tag": "1.2.3"}})
    assert cdp_container(one(docs, "Deployment", "-collect"))["image"] == "r.example/cdp:1.2.3"


def test_a_long_release_name_keeps_names_within_limits():
    docs = render(load_values("minimal"), name="a-very-long-release-name-for-a-platform-team-cdp")
    for d in docs:
        assert len(d["metadata"]["name"]) <= 63, d["metadata"]["name"]
        if d["kind"] == "StatefulSet":
            # Pod name <name>-<ordinal> and the controller-revision-hash label must fit 63.
            assert len(d["metadata"]["name"]) <= 52, d["metadata"]["name"]


def test_collector_pre_stop_sleep_only_where_kubernetes_has_it():
    new = render(load_values("minimal"), kube_version="v1.30.0")
    assert cdp_container(one(new, "Deployment", "-collect"))["lifecycle"]["preStop"]["sleep"]["seconds"] == 5
    old = render(load_values("minimal"), kube_version="v1.29.0")
    assert "lifecycle" not in cdp_container(one(old, "Deployment", "-collect"))


def test_stages_can_be_turned_off():
    docs = render({"kafka": {"brokers": "k:9092"}, "deliver": {"enabled": False}, "collect": {"enabled": False}})
    assert {d["metadata"]["name"] for d in by_kind(docs, "Deployment")} == set()
    assert by_kind(docs, "Ingress") == [] and by_kind(docs, "HorizontalPodAutoscaler") == []
    assert len(by_kind(docs, "StatefulSet")) == 4


# ---- values the chart must refuse -----------------------------------------

BAD_SCHEMA = [
    ({"kafka": {"partitions": 0}}, "/kafka/partitions"),
    ({"kafka": {"guarantee": "exactly_once"}}, "/kafka/guarantee"),
    ({"kafka": {"sasl": {"mechanism": "MD5"}}}, "/kafka/sasl/mechanism"),
    ({"kafka": {"replicationFactor": 0}}, "/kafka/replicationFactor"),
    ({"kafka": {"topicPrefix": "my topics"}}, "/kafka/topicPrefix"),
    ({"identity": {"replicas": -1}}, "/identity/replicas"),
    ({"identity": {"persistence": {"size": "ten gigs"}}}, "/identity/persistence/size"),
    ({"traits": {"persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Keep"}}}, "/traits/persistentVolumeClaimRetentionPolicy/whenDeleted"),
    ({"audiences": {"podManagementPolicy": "Random"}}, "/audiences/podManagementPolicy"),
    ({"validate": {"replica": 3}}, "'replica' not allowed"),
    ({"colect": {}}, "'colect' not allowed"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"collect": {"service": {"type": "ExternalName"}}}, "/collect/service/type"),
    ({"collect": {"service": {"port": 70000}}}, "/collect/service/port"),
    ({"collect": {"autoscaling": {"targetCPUUtilizationPercentage": 150}}}, "targetCPUUtilizationPercentage"),
    ({"collect": {"ingress": {"hosts": [{"host": "x", "paths": [{"path": "v1"}]}]}}}, "/path"),
    ({"collect": {"resources": {"requests": {"cpu": "lots"}}}}, "/collect/resources/requests/cpu"),
    ({"secretEnv": [{"name": "BAD-NAME", "value": "x"}]}, "/secretEnv/0/name"),
    ({"logFormat": "xml"}, "/logFormat"),
    ({"podAntiAffinityPreset": "maybe"}, "/podAntiAffinityPreset"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
    ({"adminPort": 80}, "/adminPort"),
    ({"config": "sources: []"}, "/config"),
]


@pytest.mark.parametrize("bad,where", BAD_SCHEMA, ids=[w for _, w in BAD_SCHEMA])
def test_the_schema_rejects_bad_values(bad, where):
    values = merge({"kafka": {"brokers": "k:9092"}}, bad)
    with pytest.raises(helm.HelmValuesError) as e:
        helm_chart().render(values=values, name=RELEASE)
    assert where in str(e.value), str(e.value)
    with pytest.raises(helm.HelmValuesError):
        helm_chart().validate_schema(values)


def test_the_schema_accepts_every_value_set():
    for name in VALUE_SETS:
        helm_chart().validate_schema(load_values(name))


def test_validate_values_lists_every_mistake_at_once():
    values = {
        "kafka": {
            "brokers": "",
            "sasl": {"enabled": True},
            "tls": {"caSecret": "ca"},
            "properties": {"sasl.password": "x", "consumer.sasl.username": "y"},
        },
        "config": {
            "kafka": {"brokers": "elsewhere:9092"},
            "destinations": [
                {"id": "crm", "type": "webhook", "url": "http://x", "secret_env": "CRM_SECRET"},
                {"id": "engage", "type": "segment", "url": "http://y", "write_key_env": "SEGMENT_WRITE_KEY"},
            ],
        },
        "secretEnv": [{"name": "BOTH", "value": "v", "secretName": "s", "key": "k"}, {"name": "NEITHER"}],
        "collect": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}, "ingress": {"enabled": True, "hosts": []}},
        "adminPort": 8088,
    }
    with pytest.raises(helm.HelmRenderError) as e:
        helm_chart().render(values=values, name=RELEASE)
    message = str(e.value)
    expected = [
        "kafka.brokers: required",
        "kafka.sasl: set existingSecret, or both username and password",
        "kafka.tls: caSecret/clientCertSecret are set but kafka.tls.enabled is false",
        "kafka.properties.sasl.password",
        "kafka.properties.consumer.sasl.username",
        "config.kafka.brokers: the chart writes it",
        "secretEnv[0] (BOTH): value and secretName are exclusive",
        "secretEnv[1] (NEITHER): set value, or secretName and key",
        "config.destinations[0].secret_env: CRM_SECRET is not provided",
        "config.destinations[1].write_key_env: SEGMENT_WRITE_KEY is not provided",
        "adminPort: 8088 is the collector's HTTP port",
        "collect.autoscaling: minReplicas is greater than maxReplicas",
        "collect.ingress.hosts: at least one host",
    ]
    missing = [m for m in expected if m not in message]
    assert missing == [], message
    # One failure, every error listed once.
    assert message.count("cdp: invalid values") == 1


def test_destination_secrets_provided_by_secret_env_pass():
    """A webhook's secret_env and a segment destination's write_key_env are
    both satisfied by a secretEnv entry (or extraEnv), and then reach deliver."""
    values = {
        "kafka": {"brokers": "k:9092"},
        "config": {"destinations": [
            {"id": "crm", "type": "webhook", "url": "http://x", "secret_env": "CRM_SECRET"},
            {"id": "engage", "type": "segment", "url": "http://y", "write_key_env": "SEGMENT_WRITE_KEY"},
        ]},
        "secretEnv": [{"name": "CRM_SECRET", "value": "s"},
                      {"name": "SEGMENT_WRITE_KEY", "secretName": "segment", "key": "write-key"}],
    }
    deliver = one(render(values), "Deployment", "-deliver")
    env = {e["name"]: e for e in cdp_container(deliver)["env"]}
    assert env["SEGMENT_WRITE_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "segment", "key": "write-key"}
    values["secretEnv"] = values["secretEnv"][:1]
    with pytest.raises(helm.HelmRenderError, match="write_key_env: SEGMENT_WRITE_KEY is not provided"):
        helm_chart().render(values=values, name=RELEASE)


def test_the_admin_port_cannot_be_the_collectors_port():
    """Two containerPorts 8088 in the collector: the pod cannot bind both."""
    with pytest.raises(helm.HelmRenderError, match="adminPort: 8088 is the collector's HTTP port"):
        helm_chart().render(values={"kafka": {"brokers": "k:9092"}, "adminPort": 8088}, name=RELEASE)
    # Without the collector, 8088 is free.
    docs = render({"kafka": {"brokers": "k:9092"}, "adminPort": 8088, "collect": {"enabled": False}})
    assert {"name": "admin", "containerPort": 8088, "protocol": "TCP"} in cdp_container(one(docs, "StatefulSet", "-traits"))["ports"]


def test_oauthbearer_is_refused_plainly():
    """The binary has no libcurl, so librdkafka refuses OAUTHBEARER's
    properties: the chart must not offer it, and says what works instead."""
    values = {"kafka": {"brokers": "k:9092",
                        "sasl": {"enabled": True, "mechanism": "OAUTHBEARER", "username": "u", "password": "p"}}}
    with pytest.raises(helm.HelmValuesError) as e:
        helm_chart().render(values=values, name=RELEASE)
    assert "/kafka/sasl/mechanism" in str(e.value)
    assert "must be one of 'PLAIN', 'SCRAM-SHA-256', 'SCRAM-SHA-512'" in str(e.value), str(e.value)
    values = {"kafka": {"brokers": "k:9092", "properties": {"sasl.oauthbearer.method": "oidc"}}}
    with pytest.raises(helm.HelmRenderError) as e:
        helm_chart().render(values=values, name=RELEASE)
    assert ("kafka.properties.sasl.oauthbearer.method: OAUTHBEARER (OIDC, AWS MSK IAM) is not supported"
            in str(e.value)), str(e.value)
    assert "SCRAM-SHA-256/512 or mutual TLS" in str(e.value)


def test_defaults_alone_ask_for_the_brokers():
    with pytest.raises(helm.HelmRenderError, match="kafka.brokers: required"):
        helm_chart().render(values={}, name=RELEASE)


def test_notes_tell_how_to_send_a_first_event():
    notes = render_raw(load_values("sasl-tls"))["cdp/templates/NOTES.txt"]
    assert f"port-forward svc/{RELEASE}-cdp-collect 8088:80" in notes
    assert "curl -u wk_web_123:" in notes and "/v1/track" in notes
    notes = render_raw(load_values("ingress-monitoring"), api_versions=PROMETHEUS_OPERATOR)["cdp/templates/NOTES.txt"]
    assert "COLLECTOR=https://events.example.com" in notes
    notes = render_raw(load_values("minimal"))["cdp/templates/NOTES.txt"]
    assert "config.sources is empty" in notes


def test_notes_warn_about_idle_identity_replicas():
    """<p>.valid has one partition: one identity pod works, one stands by,
    any more only idle. A warning, not a refusal, so existing values with
    more replicas still upgrade."""
    for replicas in (1, 2):
        notes = render_raw(merge(load_values("minimal"), {"identity": {"replicas": replicas}}))["cdp/templates/NOTES.txt"]
        assert "identity.replicas" not in notes
    notes = render_raw(merge(load_values("minimal"), {"identity": {"replicas": 4}}))["cdp/templates/NOTES.txt"]
    assert "WARNING: identity.replicas is 4" in notes
    assert "every further pod only idles. Set identity.replicas: 2." in notes
    notes = render_raw(merge(load_values("minimal"), {"identity": {"replicas": 4, "enabled": False}}))["cdp/templates/NOTES.txt"]
    assert "identity.replicas" not in notes


def merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def test_the_readme_documents_every_value():
    """helm/cdp/README.md is the values reference: a key added to
    values.yaml without a line there fails."""
    from conftest import CHART as chart_dir

    readme = (chart_dir / "README.md").read_text()
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    opaque = {"config", "properties", "resources", "podSecurityContext", "securityContext", "livenessProbe",
              "readinessProbe", "updateStrategy", "behavior", "persistentVolumeClaimRetentionPolicy"}
    missing = []

    def walk(path, node):
        for key, value in node.items():
            here = f"{path}.{key}" if path else key
            if isinstance(value, dict) and value and key not in opaque:
                walk(here, value)
            elif not re.search(r"[`.]" + re.escape(key) + r"`", readme):
                missing.append(here)

    walk("", values)
    assert missing == [], f"not in helm/cdp/README.md: {missing}"


def test_the_oldest_kubernetes_checked_is_the_one_the_chart_declares():
    assert loaded_chart().metadata["kubeVersion"] == f">={OLDEST_KUBE}-0"


def test_the_readme_install_command_renders():
    """The `helm install` of helm/cdp/README.md, its --set/--set-json flags
    parsed by helm's own parser, renders and passes the schema."""
    import shlex

    from conftest import CHART as chart_dir

    readme = (chart_dir / "README.md").read_text()
    command = re.search(r"^helm install .*?(?<!\\)$", readme, re.M | re.S)
    assert command, "no helm install command in the README"
    words = shlex.split(command.group(0).replace("\\\n", " "))
    values: dict = {}
    for flag, arg in zip(words, words[1:]):
        if flag == "--set":
            parsed = helm.parse_set_string(arg)
        elif flag == "--set-json":
            parsed = helm.parse_set_json(arg)
        else:
            continue
        values = merge(values, parsed)
    assert values["kafka"]["brokers"] and values["config"]["sources"]
    docs = render(values)
    assert cdp_container(one(docs, "Deployment", "-collect"))["image"].startswith("registry.example.com/platform/cdp:")
