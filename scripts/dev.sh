#!/usr/bin/env bash
# Runs `cdp dev` on a fresh machine: installs system packages, builds, runs.
# Arguments go to `cdp dev` (e.g. --demo, --config FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
# Same build directory as scripts/test.sh: whichever runs first builds for both.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${CDP_CACHE:-$HOME/.cache/cdp}/target}"
scripts/setup.sh
exec cargo run --quiet --bin cdp -- dev "$@"
