#!/usr/bin/env bash
# Runs every test on a fresh machine: lint, unit, property, integration
# (mock cluster) and end-to-end tests (each stage its own process against a
# tansu broker this script builds once, caches and starts).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${CDP_CACHE:-$HOME/.cache/cdp}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
scripts/setup.sh

# tansu: a Kafka-protocol broker in Rust (AGPL: run as a process, never linked).
TANSU="$CACHE/tansu/bin/tansu"
if [ ! -x "$TANSU" ]; then
  echo "test: building tansu 0.6.0 into $CACHE/tansu (once, ~10 min)" >&2
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql --root "$CACHE/tansu"
fi
if ! command -v cargo-nextest >/dev/null; then
  cargo install cargo-nextest --locked
fi

# Compatibility tests (tests/compat_sdks.rs) drive clients nobody here wrote:
# the pinned Python packages (Segment's and RudderStack's SDKs,
# confluent-kafka) in a venv under the cache, the locked npm packages in
# tests/compat/node_modules, Debian's Chromium for analytics.js and Debian's
# kcat. Each is reinstalled only when missing or when its pin changed.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/kcat ]; then
  echo "test: installing Debian's chromium and kcat for the compatibility tests" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium kcat >/dev/null
fi
# The alert rules' tests (helm/tests/test_promtool.py) run Prometheus's
# promtool: Debian ships it in the prometheus package (only the tool is
# used; nothing starts the server).
if ! command -v promtool >/dev/null; then
  echo "test: installing Debian's prometheus for promtool (the alert rules' tests)" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# The chart tests (helm/tests: a real helm engine, the Kubernetes schemas, a
# PromQL parser) pin theirs in helm/tests/requirements.txt: one venv for both.
VENV="$CACHE/venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY_PINS=(tests/compat/requirements.txt helm/tests/requirements.txt)
if ! cat "${PY_PINS[@]}" | cmp -s - "$VENV/.cdp-requirements.txt"; then
  echo "test: installing the pinned Python packages into $VENV" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PINS[@]/#/-r}"
  cat "${PY_PINS[@]}" > "$VENV/.cdp-requirements.txt"
fi
export CDP_COMPAT_PYTHON="$VENV/bin/python"
if ! cmp -s tests/compat/package-lock.json tests/compat/node_modules/.cdp-package-lock.json; then
  echo "test: installing the npm SDKs into tests/compat/node_modules" >&2
  (cd tests/compat && npm ci --no-audit --no-fund --loglevel=error)
  cp tests/compat/package-lock.json tests/compat/node_modules/.cdp-package-lock.json
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log="$(mktemp -t tansu.XXXXXX.log)"
"$TANSU" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/ >"$log" 2>&1 &
tansu_pid=$!
trap 'kill $tansu_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
if ! kill -0 "$tansu_pid" 2>/dev/null; then
  echo "test: tansu did not start:" >&2; cat "$log" >&2; exit 1
fi
export CDP_E2E_BROKERS="127.0.0.1:$port"
# Tests that restart the broker start their own tansu (SQLite engine).
export CDP_TANSU_BIN="$TANSU"
echo "test: tansu at $CDP_E2E_BROKERS" >&2

status=0
cargo nextest run --workspace --no-fail-fast "$@" || status=$?

# The Helm chart against the binary nextest just built (helm/tests). Run
# even when a Rust test failed, so one run reports both.
echo "test: helm chart tests (helm/tests)" >&2
CDP_BIN="$CARGO_TARGET_DIR/debug/cdp" "$VENV/bin/python" -m pytest -q -p no:cacheprovider helm/tests || status=$?
exit $status
