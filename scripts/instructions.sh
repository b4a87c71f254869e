#!/usr/bin/env bash
# Instructions per record of an operator, counted by valgrind: exact and
# repeatable, where this 2-core box's CPU timings spread ±10% between runs
# of one binary (docs/performance.md, "Counting instructions").
#
# Runs an operator bench (identity, traits or audiences) with a small
# store (CDP_BENCH_PROFILES, default 10 000) under callgrind, counting only
# inside the operator's `process` (its parse, its state reads from
# RocksDB, its evaluation and its encoding; not the commit, not RocksDB's
# background work). Prints instructions per record for the load (for
# traits and audiences one record per profile, each profile new; for
# identity the graph's identifies and first page views) and for the fixed
# run after it (one batch of 1 000 records per 2 000 profiles: random
# profiles that all exist; for identity the bench's mix of known visitors,
# new ones and merges).
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
  --callgrind-out-file="$dir/out" "$bench" --bench no_such_bench >/dev/null 2>"$dir/err"
ir() { awk '/^summary:/ {print $2}' "$1" 2>/dev/null || true; }
# The bench names its record counts: "<name> load: N records, …".
records() { sed -n "s/^$name $1: \([0-9]*\) records.*/\1/p" "$dir/err" | head -1; }
load=$(ir "$dir/out.1"); load_records=$(records load)
fixed=$(ir "$dir/out"); fixed_records=$(records "fixed run")
if [[ -z "$load_records" || -z "$fixed_records" || -z "$load" || -z "$fixed" ]]; then
  echo "instructions.sh: $bench printed no '$name load' / '$name fixed run' counts; its output:" >&2
  cat "$dir/err" >&2
  exit 1
fi
echo "$(basename "$bench"): load $(( load / load_records )) instructions per record ($load_records records, new profiles);" \
  "fixed run $(( fixed / fixed_records )) per record ($fixed_records records, existing profiles)"
