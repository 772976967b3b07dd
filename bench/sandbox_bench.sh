#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The trainer sandbox's costs: its set-up per trainer start (build/bench/fedl_sandbox_bench: a
# sandboxed child against a plain one), and training throughput with and without it on the same
# task (`fedl --json train`, --sandbox auto against --sandbox off, alternately, the order flipped
# every round, after one untimed run of each). Prints the medians of the training loop's time
# ("seconds" in train's JSON: the sandbox is entered before it, so this is what the sandbox costs
# the work itself, seccomp's filter on each system call included) and of the whole process.
#
# Usage: bench/sandbox_bench.sh [-r RUNS] [-a ARCH] [-e EPOCHS]
#   -r RUNS    timed runs of each side (default 7)
#   -a ARCH    the model (default mlp:512,512)
#   -e EPOCHS  epochs over the digits (default 20)
# Environment: FEDL (default build/src/fedl of this checkout), BUILD (default build/).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
FEDL="${FEDL:-$root/build/src/fedl}"
BUILD="${BUILD:-$root/build}"
runs=7
arch="mlp:512,512"
epochs=20
while getopts "r:a:e:h" o; do
  case $o in
    r) runs=$OPTARG ;;
    a) arch=$OPTARG ;;
    e) epochs=$OPTARG ;;
    *) sed -n '3,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done

echo "== set-up per trainer start"
"$BUILD/bench/fedl_sandbox_bench" --runs 30
echo "== with a memory limit (a second cgroup)"
"$BUILD/bench/fedl_sandbox_bench" --runs 30 --memory-limit 2G | tail -1

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
one()
{
  local level=$1 out=$2
  local t0=$EPOCHREALTIME
  "$FEDL" --json train --data "$root/data/digits.csv.gz" --no-header --arch "$arch" -e "$epochs" --seed 1 \
    --out "$tmp/u.st" --sandbox "$level" >"$out" 2>/dev/null
  local t1=$EPOCHREALTIME
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["seconds"], float(sys.argv[3]) - float(sys.argv[2]), j["loss"])' \
    "$out" "$t0" "$t1"
}
echo "== training: digits, $arch, $epochs epochs, default threads; $runs runs of each, alternating"
one off "$tmp/w.json" >/dev/null
one auto "$tmp/w.json" >/dev/null
: >"$tmp/off"
: >"$tmp/auto"
for ((i = 0; i < runs; i++)); do
  if ((i % 2 == 0)); then order="off auto"; else order="auto off"; fi
  for level in $order; do one "$level" "$tmp/r.json" >>"$tmp/$level"; done
done
python3 - "$tmp/off" "$tmp/auto" <<'PY'
import statistics, sys
rows = {name: [list(map(float, l.split())) for l in open(path)] for name, path in zip(("off", "auto"), sys.argv[1:])}
med = {n: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for n, v in rows.items()}
losses = {n: {r[2] for r in v} for n, v in rows.items()}
print(f"  training loop, sandbox off   {med['off'][0] * 1000:8.1f} ms   (whole process {med['off'][1] * 1000:7.1f} ms)")
print(f"  training loop, sandbox auto  {med['auto'][0] * 1000:8.1f} ms   (whole process {med['auto'][1] * 1000:7.1f} ms)")
print(f"  throughput with the sandbox: {med['off'][0] / med['auto'][0] * 100:.1f}% of without (target >= 97%)")
print(f"  final loss the same: {losses['off'] == losses['auto']} ({sorted(losses['off'] | losses['auto'])})")
PY
