#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# `fedl aggregate` as a user runs it, a whole process, against a NumPy script doing the same
# weighted average (FedAvg) of the same files and writing the result, also a whole process
# (interpreter start-up and `import numpy` included, as a user pays them).
#
# Writes a base and N updates of P float32 with build/bench/fedl_aggregate_bench (in page cache),
# then alternates R runs of each, the order flipping every run, after one warm-up each:
#   fedl text   fedl -q aggregate --base B --out O U...          (nothing records the updates' hashes)
#   fedl json   fedl -q --json aggregate --base B --out O U...   (the result lists each update's SHA-256)
#   numpy       bench/aggregate_numpy.py --once memmap|fromfile --out O (the faster of the two)
#   one         fedl text and NumPy (memmap) with the first update only: the cost of a run
#               whatever N, so that the cost of each further update shows apart from it
# and prints the median wall time of each and the ratios.
#
# Usage: bench/aggregate_cmd.sh [-n UPDATES] [-p PARAMS] [-r RUNS] [-k]
#   -n UPDATES  update files (default 16)
#   -p PARAMS   float32 parameters per file (default 2000000: 8 MB files)
#   -r RUNS     timed runs of each (default 9)
#   -k          keep the temporary folder
# Environment: FEDL (default build/src/fedl), AGG_BENCH (default build/bench/fedl_aggregate_bench),
#   PYTHON (default /usr/bin/python3, with NumPy).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
FEDL="${FEDL:-$root/build/src/fedl}"
AGG_BENCH="${AGG_BENCH:-$root/build/bench/fedl_aggregate_bench}"
PYTHON="${PYTHON:-/usr/bin/python3}"
n=16 params=2000000 runs=9 keep=0

die() { echo "aggregate_cmd: $*" >&2; exit 1; }
while getopts ":n:p:r:kh" o; do
  case "$o" in
    n) n="$OPTARG" ;;
    p) params="$OPTARG" ;;
    r) runs="$OPTARG" ;;
    k) keep=1 ;;
    h) sed -n '3,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option (-h for help)" ;;
  esac
done
for v in n params runs; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
[[ -x "$FEDL" ]] || die "fedl not found: $FEDL (set FEDL)"
[[ -x "$AGG_BENCH" ]] || die "fedl_aggregate_bench not found: $AGG_BENCH (set AGG_BENCH)"
"$PYTHON" -c 'import numpy' 2>/dev/null || die "$PYTHON has no NumPy (apt install python3-numpy)"
[[ -n "${EPOCHREALTIME:-}" ]] || die "needs bash 5 (\$EPOCHREALTIME)"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/aggregate_cmd.XXXXXX")"
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() { if [[ $keep -eq 1 ]]; then echo "kept: $tmp" >&2; else rm -rf "$tmp"; fi; }
trap cleanup EXIT
"$AGG_BENCH" --n "$n" --params "$params" --repeat 1 --rss-n none --no-numpy --dir "$tmp/in" --keep >/dev/null 2>&1 ||
  die "fedl_aggregate_bench could not write the files"
updates=()
for ((i = 0; i < n; i++)); do updates+=("$tmp/in/$(printf 'update-%03d.safetensors' "$i")"); done

declare -A times
run() { # NAME COMMAND...: one timed run, its seconds appended to times[NAME]
  local name=$1 start end
  shift
  start=$EPOCHREALTIME
  "$@" >/dev/null || die "$name failed: $*"
  end=$EPOCHREALTIME
  times[$name]+="$(echo "$end - $start" | bc) "
}
fedl_text() { run "fedl text" "$FEDL" -q aggregate --base "$tmp/in/base.safetensors" --out "$tmp/fedl.st" "${updates[@]}"; }
# One update each: what a run costs whatever N (start-up, the base's and the result's SHA-256 and
# fsync for fedl; the interpreter and `import numpy` for NumPy), so that the cost of each further
# update shows apart from it.
fedl_one() { run "fedl one" "$FEDL" -q aggregate --base "$tmp/in/base.safetensors" --out "$tmp/one.st" "${updates[0]}"; }
numpy_one() { run "numpy one" "$PYTHON" "$here/aggregate_numpy.py" --dir "$tmp/in" --n 1 --once memmap --out "$tmp/np1.st"; }
fedl_json() { run "fedl json" "$FEDL" -q --json aggregate --base "$tmp/in/base.safetensors" --out "$tmp/fedl.st" "${updates[@]}"; }
numpy_run() { run "numpy $1" "$PYTHON" "$here/aggregate_numpy.py" --dir "$tmp/in" --n "$n" --once "$1" --out "$tmp/np.st"; }

fedl_text; fedl_json; numpy_run memmap; numpy_run fromfile; fedl_one; numpy_one
times=()
for ((r = 0; r < runs; r++)); do
  if ((r % 2 == 0)); then
    fedl_text; fedl_json; numpy_run memmap; numpy_run fromfile; fedl_one; numpy_one
  else
    numpy_one; fedl_one; numpy_run fromfile; numpy_run memmap; fedl_json; fedl_text
  fi
done
# The two results agree (float32 sums in another order: to a few ulps).
"$PYTHON" - "$tmp/fedl.st" "$tmp/np.st" <<'EOF' || die "fedl's and NumPy's results differ"
import json, struct, sys
import numpy as np
def load(p):
    raw = open(p, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8]); h = json.loads(raw[8:8 + n]); h.pop("__metadata__", None)
    return {k: np.frombuffer(raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]], np.float32) for k, v in h.items()}
a, b = load(sys.argv[1]), load(sys.argv[2])
assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
EOF

median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
mt=$(median "${times[fedl text]}")
mj=$(median "${times[fedl json]}")
mm=$(median "${times[numpy memmap]}")
mf=$(median "${times[numpy fromfile]}")
np=$(echo "if ($mm < $mf) $mm else $mf" | bc -l)
m1=$(median "${times[fedl one]}")
n1=$(median "${times[numpy one]}")
echo "fedl aggregate vs NumPy, whole processes: N = $n updates of P = $params float32 ($((params * 4 / 1000000)) MB each), $runs runs each, medians"
printf '  %-52s %8.1f ms\n' "fedl aggregate (text result)" "$(echo "$mt * 1000" | bc -l)"
printf '  %-52s %8.1f ms\n' "fedl --json aggregate (lists each update's SHA-256)" "$(echo "$mj * 1000" | bc -l)"
printf '  %-52s %8.1f ms\n' "NumPy, np.memmap" "$(echo "$mm * 1000" | bc -l)"
printf '  %-52s %8.1f ms\n' "NumPy, np.fromfile" "$(echo "$mf * 1000" | bc -l)"
printf '  %-52s %8.2fx (text), %.2fx (--json)\n' "NumPy's faster / fedl" "$(echo "$np / $mt" | bc -l)" "$(echo "$np / $mj" | bc -l)"
if ((n > 1)); then
  printf '  %-52s %8.1f ms (fedl), %.1f ms (NumPy, np.memmap)\n' "one update only (the fixed cost)" \
    "$(echo "$m1 * 1000" | bc -l)" "$(echo "$n1 * 1000" | bc -l)"
  printf '  %-52s %8.2f ms (fedl), %.2f ms (NumPy): %.2fx\n' "each further update" "$(echo "($mt - $m1) * 1000 / ($n - 1)" | bc -l)" \
    "$(echo "($mm - $n1) * 1000 / ($n - 1)" | bc -l)" "$(echo "($mm - $n1) / ($mt - $m1)" | bc -l)"
fi
echo "  load average: $(cut -d' ' -f1-3 /proc/loadavg)"
