"""Chart and binary cannot drift apart: every command line and environment
variable the chart gives a cdp container is one the `cdp` binary accepts,
and the config file the chart writes passes `cdp config check`.

Needs the binary: CDP_BIN (scripts/test.sh passes the one it built), else
target/debug/cdp under CARGO_TARGET_DIR. With CI set, a missing binary
fails the tests."""

from __future__ import annotations

import functools
import os
import pathlib
import re
import subprocess

import pytest
import yaml
from conftest import ROOT, VALUE_SETS, cdp_container, is_hook, load_values, render, render_set, workloads


def binary() -> pathlib.Path | None:
    candidates = [os.environ.get("CDP_BIN")]
    target = os.environ.get("CARGO_TARGET_DIR")
    if target:
        candidates.append(os.path.join(target, "debug", "cdp"))
    candidates.append(str(ROOT / "target" / "debug" / "cdp"))
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return pathlib.Path(c)
    return None


@pytest.fixture(scope="module")
def cdp():
    path = binary()
    if path is None:
        reason = "no cdp binary: set CDP_BIN or build with cargo build"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: a missing prerequisite fails)")
        pytest.skip(reason)
    return path


@functools.cache
def help_text(cdp: pathlib.Path, subcommand: tuple[str, ...]) -> str:
    out = subprocess.run([cdp, *subcommand, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def subcommand_of(args: list[str]) -> tuple[str, ...]:
    """The words before the first flag: `validate`, `topics create`, …"""
    words = []
    for a in args:
        if a.startswith("-"):
            break
        words.append(a)
    return tuple(words)


# Variables the binary reads outside clap (src/main/): the log filter and
# the pod name behind --instance-id.
def env_read_by_main() -> set[str]:
    source = "".join(p.read_text() for p in sorted((ROOT / "src" / "main").glob("*.rs")))
    return set(re.findall(r'"(CDP_[A-Z_]+|POD_NAME)"', source)) & {"CDP_LOG", "POD_NAME"}


def cdp_config(docs) -> dict:
    for d in docs:
        if d["kind"] in ("ConfigMap", "Secret") and not is_hook(d):
            data = d.get("data") or d.get("stringData") or {}
            if "cdp.yaml" in data:
                return yaml.safe_load(data["cdp.yaml"])
    raise AssertionError("no cdp.yaml")


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_container_command_line_is_accepted(cdp, name):
    docs = render_set(name)
    for w in workloads(docs):
        c = cdp_container(w)
        args = c["args"]
        sub = subcommand_of(args)
        assert sub, args
        # clap rejects an unknown flag or a bad value before it reaches
        # --help, so this exits 0 only if every argument is accepted.
        out = subprocess.run([cdp, *args, "--help"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"{w['kind']} {w['metadata']['name']}: cdp {' '.join(args)}: {out.stderr}"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_environment_variable_is_one_cdp_reads(cdp, name):
    docs = render_set(name)
    values = load_values(name)
    config = cdp_config(docs)
    kafka_secrets = set((config["kafka"].get("secret_env") or {}).values())
    destination_secrets = {d["secret_env"] for d in config.get("destinations", []) if d.get("secret_env")}
    user_env = {e["name"] for e in values.get("extraEnv", [])}
    for stage in ("collect", "validate", "identity", "traits", "audiences", "deliver"):
        user_env |= {e["name"] for e in values.get(stage, {}).get("extraEnv", [])}
    from_main = env_read_by_main()
    for w in workloads(docs):
        c = cdp_container(w)
        text = help_text(cdp, subcommand_of(c["args"])) + help_text(cdp, ())
        names = {e["name"] for e in c["env"]}
        for n in names:
            if n.startswith("CDP_") and n not in from_main:
                assert f"[env: {n}=" in text, f"{w['metadata']['name']}: cdp {subcommand_of(c['args'])} reads no {n}"
            elif n not in from_main:
                assert n in kafka_secrets | destination_secrets | user_env, f"{w['metadata']['name']}: nothing reads {n}"
        # Every secret the config names is there (ClientFactory refuses to start without).
        assert kafka_secrets <= names, f"{w['metadata']['name']}: missing {kafka_secrets - names}"
        if w["metadata"]["name"].endswith("-deliver"):
            assert destination_secrets <= names


@pytest.mark.parametrize("name", VALUE_SETS)
def test_the_rendered_config_passes_cdp_config_check(cdp, name, tmp_path):
    config = cdp_config(render_set(name))
    path = tmp_path / "cdp.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([cdp, "config", "check", path], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr + out.stdout


def test_config_check_catches_a_bad_config_the_chart_accepts(cdp, tmp_path):
    """The chart passes `config` through; the binary is what checks it (the
    topics hook runs it before any stage rolls)."""
    values = load_values("minimal")
    values["config"] = {"audiences": {"vip": {"where": {"audience": "ghost"}}}}
    config = cdp_config(render(values))
    path = tmp_path / "cdp.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([cdp, "config", "check", path], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "audiences.vip" in out.stderr, out.stderr


def test_compose_and_dockerfile_command_lines_are_accepted(cdp):
    """deploy/compose.yaml and the Dockerfile's CMD are not run in CI (no
    Docker engine), so their command lines are checked here instead."""
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    commands = [(name, s["command"]) for name, s in compose["services"].items() if s.get("image", "").startswith("cdp:")]
    assert {n for n, _ in commands} == {"topics", "collect", "validate", "identity", "traits", "audiences", "deliver"}
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert cmd
    commands.append(("Dockerfile CMD", yaml.safe_load(cmd.group(1))))
    for name, args in commands:
        out = subprocess.run([cdp, *args, "--help"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"{name}: cdp {' '.join(args)}: {out.stderr}"
    for name, s in compose["services"].items():
        for var in (s.get("environment") or {}):
            if var.startswith("CDP_") and var != "CDP_LOG":
                assert f"[env: {var}=" in help_text(cdp, ("validate",)) + help_text(cdp, ()), f"{name}: cdp reads no {var}"


def test_every_service_of_the_binary_has_a_workload(cdp):
    """A new long-running subcommand (a profile API, say) fails this test
    until the chart deploys it (one line in the stage table of
    templates/_helpers.tpl and a values block)."""
    text = help_text(cdp, ())
    commands_section = text.split("Commands:", 1)[1].split("Options:", 1)[0]
    commands = set(re.findall(r"^  ([a-z][a-z0-9-]*)\s", commands_section, re.M))
    # Commands an operator runs by hand, not services: the dev chain, topic
    # and config checks, dead-letter replay, the load generator, the
    # benchmark's bare pass-through hop, its per-topic record stamps and
    # its in-memory mock broker, the profile reader.
    tools = {"dev", "topics", "config", "help", "dead-letters", "destinations", "loadgen", "passthrough", "stamps",
             "mock-broker", "profiles"}
    assert tools <= commands, commands
    docs = render_set("minimal")
    deployed = {
        w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        for w in docs
        if w["kind"] in ("Deployment", "StatefulSet")
    }
    assert deployed == commands - tools
