#!/usr/bin/env bash
# One command for the end-to-end benchmark (docs/performance.md): builds
# the release binary, builds tansu once (as scripts/test.sh does), then runs
# scripts/bench.py, which prints the table and writes bench-result.json.
# Arguments go to bench.py (--events, --partitions, --phase-secs, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${CDP_CACHE:-$HOME/.cache/cdp}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
scripts/setup.sh
TANSU="${CDP_TANSU_BIN:-$CACHE/tansu/bin/tansu}"
if [ ! -x "$TANSU" ]; then
  echo "bench: building tansu 0.6.0 into $CACHE/tansu (once, ~10 min)" >&2
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql --root "$CACHE/tansu"
fi
cargo build --release --bin cdp
exec python3 scripts/bench.py --cdp "$CARGO_TARGET_DIR/release/cdp" --tansu "$TANSU" "$@"
