#!/usr/bin/env bash
# Runs `cdp dev` on a fresh machine: installs system packages, builds, runs.
# Arguments go to `cdp dev` (e.g. --demo, --config FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --quiet --bin cdp -- dev "$@"
