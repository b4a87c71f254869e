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

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings

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
echo "test: tansu at $CDP_E2E_BROKERS" >&2

cargo nextest run --workspace --no-fail-fast "$@"
