#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The utility of DP-SGD: mlp:64 on the bundled digits (every 5th row held out as the test set,
# the other 1438 for training), trained with `fedl train` under DP-SGD at a fixed (epsilon,
# delta), and evaluated with `fedl eval`; the same model trained without DP as the baseline.
# The noise is drawn from the OS, so accuracy varies from run to run: R runs, and the median,
# minimum and maximum are printed. Target: median >= 90% at epsilon <= 8, delta 1e-5.
#
# Usage: bench/dp_utility.sh [-r RUNS]
#   -r RUNS  DP runs (default 7)
# Environment: FEDL (default build/src/fedl of this checkout), THREADS (default 2).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FEDL="${FEDL:-$(dirname "$here")/build/src/fedl}"
THREADS="${THREADS:-2}"
runs=7
while getopts ":r:h" o; do
  case "$o" in
    r) runs="$OPTARG" ;;
    h) sed -n '3,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "dp_utility: unknown option (-h for help)" >&2; exit 2 ;;
  esac
done
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "dp_utility: -r needs a positive integer" >&2; exit 2; }
[[ -x "$FEDL" ]] || { echo "dp_utility: no fedl binary at $FEDL (set FEDL)" >&2; exit 1; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/dp_utility.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
zcat "$(dirname "$here")/data/digits.csv.gz" | awk 'NR % 5 != 0' >"$tmp/train.csv"
zcat "$(dirname "$here")/data/digits.csv.gz" | awk 'NR % 5 == 0' >"$tmp/test.csv"

common=(--data "$tmp/train.csv" --no-header --arch mlp:64 --epochs 20 --batch-size 64 --optimizer sgd --lr 0.05
        --momentum 0.9 --threads "$THREADS" --save-model "$tmp/m.st")
dp=(--dp-noise-multiplier 1.0 --dp-max-grad-norm 1.0 --dp-delta 1e-5)

accuracy() {
  "$FEDL" -q --json eval --data "$tmp/test.csv" --no-header --model "$tmp/m.st" --threads "$THREADS" |
    /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["accuracy"])'
}

echo "mlp:64 on digits (1438 train / 359 test), 20 epochs, batch 64, SGD lr 0.05 momentum 0.9"
"$FEDL" -q train "${common[@]}" --seed 1 >/dev/null
echo "non-private: accuracy $(accuracy)"
accs=()
for ((i = 1; i <= runs; i++)); do
  "$FEDL" -q --json train "${common[@]}" "${dp[@]}" --seed "$i" >"$tmp/train.json"
  accs+=("$(accuracy)")
done
eps=$(/usr/bin/python3 -c 'import json, sys; d = json.load(open(sys.argv[1]))["dp"]; print("epsilon %.3f at delta %g (q %.4f, sigma %g, clip %g, %d steps)" % (d["epsilon"], d["delta"], d["sample_rate"], d["noise_multiplier"], d["max_grad_norm"], d["steps"]))' "$tmp/train.json")
echo "DP-SGD: $eps"
/usr/bin/python3 - "${accs[@]}" <<'PY'
import statistics, sys
a = sorted(float(x) for x in sys.argv[1:])
print("DP-SGD accuracy over %d runs: median %.4f, min %.4f, max %.4f" % (len(a), statistics.median(a), a[0], a[-1]))
PY
