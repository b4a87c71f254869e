#!/usr/bin/env bash
# Instructions per record of an operator, counted by valgrind: exact and
# repeatable, where this 2-core box's CPU timings spread ±10% between runs
# of one binary (docs/performance.md, "Counting instructions").
#
# Runs a profile-keyed operator bench (traits or audiences) with a small
# store (CDP_BENCH_PROFILES, default 10 000) under callgrind, counting only
# inside the operator's `process` (its parse, its state reads from
# RocksDB, its evaluation and its encoding; not the commit, not RocksDB's
# background work). Prints instructions per record for the load (one
# record per profile, each profile new) and for the fixed run after it
# (one batch of 1 000 records per 2 000 profiles, for random profiles
# that all exist).
#
#   cargo bench -p cdp-operators --bench traits --no-run   # prints the binary
#   scripts/instructions.sh <target>/release/deps/traits-<hash> [profiles]
#
# Needs valgrind (`apt-get install valgrind`). ~40 s per 10 000 profiles.
set -euo pipefail
bench=${1:?usage: scripts/instructions.sh BENCH_BINARY [PROFILES]}
profiles=${2:-10000}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
name=$(basename "$bench"); name=${name%%-*}   # traits-<hash> → traits
# The count is dumped once as the fixed run starts (out.1: the load), and
# again at the end (out: the fixed run).
CDP_BENCH_PROFILES=$profiles valgrind --tool=callgrind \
  --toggle-collect='*Operator>::process' --dump-before="$name::fixed_run" \
  --callgrind-out-file="$dir/out" "$bench" --bench no_such_bench >/dev/null 2>&1
ir() { awk '/^summary:/ {print $2}' "$1"; }
load=$(ir "$dir/out.1")
fixed=$(ir "$dir/out")
profiles=$(( profiles / 1000 * 1000 ))
rounds=$(( profiles / 2000 )); (( rounds < 1 )) && rounds=1; (( rounds > 100 )) && rounds=100
echo "$(basename "$bench"): load $(( load / profiles )) instructions per record (new profiles, $profiles records);" \
  "fixed run $(( fixed / (rounds * 1000) )) per record (existing profiles, $(( rounds * 1000 )) records)"
