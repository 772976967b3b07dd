#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# fedl train against the same training in PyTorch (Python), side by side, as whole processes.
#
# For each case, runs `fedl --json train ...` and bench/pytorch_train.py (the same data files,
# model, seed, batch size, epochs, optimizer, lr and thread count) alternately R times (the order
# flips every round) after W untimed warm-up runs of each, and prints the medians:
#   wall      the whole process, fork to exit, timed by this script (bash $EPOCHREALTIME)
#   RSS       peak resident set size: /usr/bin/time -f %M (else Python's resource module)
#   1st batch from fedl's main() / from the first line of the Python script to the end of the
#             first training step (both processes report it in their JSON; Python's figure
#             includes `import torch`, fedl's includes loading its LibTorch backend). The
#             Python interpreter's own start-up before its first line is shown separately.
# It also checks that both sides end with the same final epoch loss (they use the same LibTorch
# kernels, initialisation and shuffling, so they should agree to the last digit).
#
# Usage: bench/train_vs_pytorch.sh [-r RUNS] [-w WARMUP] [-c CASES] [-k]
#   -r RUNS    timed runs of each side per case (default 5)
#   -w WARMUP  untimed runs of each side per case first (default 1)
#   -c CASES   comma-separated cases to run: mlp,cnn (default: both)
#   -k         keep the temporary directory (raw JSON and stderr of every run)
# Environment: FEDL (default build/src/fedl of this checkout), PYTHON (default /usr/bin/python3),
#   THREADS (default 2), DIGITS_CSV, FASHION_IMAGES (the data files).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FEDL="${FEDL:-$(dirname "$here")/build/src/fedl}"
PYTHON="${PYTHON:-/usr/bin/python3}"
THREADS="${THREADS:-2}"
DIGITS_CSV="${DIGITS_CSV:-$(dirname "$here")/data/digits.csv.gz}"
FASHION_IMAGES="${FASHION_IMAGES:-/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz}"
PYTORCH_TRAIN="$here/pytorch_train.py"

runs=5
warmup=1
cases="mlp,cnn"
keep=0

usage() { sed -n '3,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "train_vs_pytorch: $*" >&2; exit 1; }

while getopts ":r:w:c:kh" o; do
  case "$o" in
    r) runs="$OPTARG" ;;
    w) warmup="$OPTARG" ;;
    c) cases="$OPTARG" ;;
    k) keep=1 ;;
    h) usage; exit 0 ;;
    :) die "-$OPTARG needs a value" ;;
    *) die "unknown option -$OPTARG (-h for help)" ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -eq 0 ]] || die "unexpected argument: $1"
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "-r needs a positive integer, not '$runs'"
[[ "$warmup" =~ ^[0-9]+$ ]] || die "-w needs a non-negative integer, not '$warmup'"
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || die "THREADS must be a positive integer, not '$THREADS'"
[[ -x "$FEDL" ]] || die "fedl binary not found or not executable: $FEDL (set FEDL)"
[[ -x "$PYTHON" ]] || die "python not found: $PYTHON (set PYTHON)"
[[ -r "$PYTORCH_TRAIN" ]] || die "missing $PYTORCH_TRAIN"
[[ -n "${EPOCHREALTIME:-}" ]] || die "needs bash 5 (\$EPOCHREALTIME)"
"$PYTHON" -c 'import torch, numpy' 2>/dev/null || die "$PYTHON cannot import torch and numpy"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/train_vs_pytorch.XXXXXX")"
cleanup() { if [[ $keep -eq 1 ]]; then echo "kept: $tmp" >&2; else rm -rf "$tmp"; fi; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Peak RSS: /usr/bin/time if it is there, else a small Python wrapper (RUSAGE_CHILDREN).
if [[ -x /usr/bin/time ]]; then
  rss_tool="/usr/bin/time -f %M"
  measure() { # OUTFILE RSSFILE ERRFILE CMD...
    local out="$1" rss="$2" err="$3"; shift 3
    /usr/bin/time -f %M -o "$rss" "$@" >"$out" 2>"$err"
  }
else
  rss_tool="python resource.getrusage(RUSAGE_CHILDREN).ru_maxrss"
  cat >"$tmp/rss.py" <<'EOF'
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write("%d\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(rc)
EOF
  measure() {
    local out="$1" rss="$2" err="$3"; shift 3
    "$PYTHON" "$tmp/rss.py" "$rss" "$@" >"$out" 2>"$err"
  }
fi

# Cases: name, data file, arguments common to both, fedl-only arguments, python-only arguments.
declare -A case_desc case_data case_args
case_desc[mlp]="mlp:128, digits.csv.gz (1797x64, 10 classes), 20 epochs, batch 32, SGD lr 0.01"
case_data[mlp]="$DIGITS_CSV"
case_args[mlp]="--data $DIGITS_CSV --no-header --arch mlp:128 --epochs 20 --batch-size 32 --optimizer sgd --lr 0.01 --seed 0 --threads $THREADS"
case_desc[cnn]="cnn, Fashion-MNIST first 10000, 1 epoch, batch 64, SGD lr 0.05 momentum 0.9"
case_data[cnn]="$FASHION_IMAGES"
case_args[cnn]="--data $FASHION_IMAGES --limit-samples 10000 --arch cnn --epochs 1 --batch-size 64 --optimizer sgd --lr 0.05 --momentum 0.9 --seed 0 --threads $THREADS"

IFS=, read -r -a case_list <<<"$cases"
for c in "${case_list[@]}"; do
  [[ -n "${case_args[$c]:-}" ]] || die "unknown case '$c' (mlp, cnn)"
  [[ -r "${case_data[$c]}" ]] || die "case $c: data file not readable: ${case_data[$c]}"
  [[ "${case_data[$c]}" != *" "* ]] || die "case $c: data path has a space: ${case_data[$c]}"
done

results="$tmp/results.tsv" # case side run wall_s rss_kb first_batch_s loss startup_s train_s load_s
: >"$results"

# run_one CASE SIDE RUN: runs one whole process, appends a row to $results unless RUN is "warmup".
run_one() {
  local c="$1" side="$2" run="$3" base="$tmp/$1.$2.$3"
  local -a cmd
  # shellcheck disable=SC2206 # the case arguments are plain words (checked above)
  local -a args=(${case_args[$c]})
  if [[ "$side" == fedl ]]; then
    cmd=("$FEDL" --json -q train "${args[@]}" --save-model "$base.safetensors")
  else
    cmd=("$PYTHON" "$PYTORCH_TRAIN" "${args[@]}" --save-model "$base.pt")
  fi
  local t0 t1 rc=0
  t0=$EPOCHREALTIME
  measure "$base.json" "$base.rss" "$base.err" "${cmd[@]}" || rc=$?
  t1=$EPOCHREALTIME
  if [[ $rc -ne 0 ]]; then
    echo "train_vs_pytorch: $side failed (exit $rc) in case $c: ${cmd[*]}" >&2
    cat "$base.err" >&2
    exit 1
  fi
  [[ "$run" == warmup ]] && return 0
  local rss
  rss="$(tail -n 1 "$base.rss")"
  [[ "$rss" =~ ^[0-9]+$ ]] || die "no peak RSS for $side in case $c (got '$rss')"
  "$PYTHON" - "$base.json" "$c" "$side" "$run" "$t0" "$t1" "$rss" >>"$results" <<'EOF'
import json, sys
path, c, side, run, t0, t1, rss = sys.argv[1:]
j = json.load(open(path))
def g(k):
    v = j.get(k)
    return "nan" if v is None else repr(float(v))
wall = float(t1.replace(",", ".")) - float(t0.replace(",", "."))
print("\t".join([c, side, run, repr(wall), rss, g("first_batch_seconds"), g("loss"),
                 g("startup_before_script_seconds"), g("seconds"), g("load_seconds")]))
EOF
  rm -f "$base.safetensors" "$base.pt"
}

cpu_model="$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | sed 's/^[^:]*: *//' || true)"
echo "== fedl train vs PyTorch (Python): whole-process benchmark"
echo "machine : $(nproc) CPUs (nproc), ${cpu_model:-unknown CPU model}, $(uname -sr)"
echo "load    : $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown) (1/5/15 min load average at start)"
echo "fedl    : $FEDL ($("$FEDL" -V 2>&1 | tr '\n' ' ' | sed 's/ *$//'))"
echo "pytorch : $("$PYTHON" -c 'import sys, torch; print("PyTorch", torch.__version__, "on Python", sys.version.split()[0], "at", sys.executable)')"
echo "method  : per case, $warmup untimed warm-up run(s) of each side, then $runs timed rounds, each"
echo "          one fedl and one PyTorch process (order flips every round); threads $THREADS on both"
echo "          sides; medians over the $runs rounds. wall = process start to exit (bash EPOCHREALTIME);"
echo "          RSS = peak resident set ($rss_tool); 1st batch = start to the end of the first"
echo "          training step: fedl from main(), PyTorch from the script's first line (incl."
echo "          'import torch'); +interp = PyTorch's interpreter start-up before that line"
echo "          (/proc/self/stat), not counted in its 1st batch column."
for c in "${case_list[@]}"; do
  echo "case $c : ${case_desc[$c]}"
done
echo

for c in "${case_list[@]}"; do
  for ((i = 1; i <= warmup; i++)); do
    echo "[$c] warm-up $i/$warmup" >&2
    run_one "$c" fedl warmup
    run_one "$c" pytorch warmup
  done
  for ((i = 1; i <= runs; i++)); do
    echo "[$c] round $i/$runs" >&2
    if ((i % 2 == 1)); then
      run_one "$c" fedl "$i"
      run_one "$c" pytorch "$i"
    else
      run_one "$c" pytorch "$i"
      run_one "$c" fedl "$i"
    fi
  done
done

"$PYTHON" - "$results" "$cases" <<'EOF'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
cases = sys.argv[2].split(",")
def col(c, side, i):
    return [float(r[i]) for r in rows if r[0] == c and r[1] == side]
def med(c, side, i):
    v = [x for x in col(c, side, i) if x == x]
    return statistics.median(v) if v else float("nan")
hdr = ["case", "fedl s", "torch s", "fedl/torch", "fedl RSS MB", "torch RSS MB",
       "fedl 1st batch s", "torch 1st batch s", "+interp s"]
table = []
for c in cases:
    fw, pw = med(c, "fedl", 3), med(c, "pytorch", 3)
    table.append([c, "%.3f" % fw, "%.3f" % pw, "%.2f" % (fw / pw),
                  "%.1f" % (med(c, "fedl", 4) / 1024), "%.1f" % (med(c, "pytorch", 4) / 1024),
                  "%.3f" % med(c, "fedl", 5), "%.3f" % med(c, "pytorch", 5), "%.3f" % med(c, "pytorch", 7)])
w = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(hdr)]
line = lambda cells: "  ".join(s.ljust(w[0]) if i == 0 else s.rjust(w[i]) for i, s in enumerate(cells))
print(line(hdr))
print(line(["-" * x for x in w]))
for r in table:
    print(line(r))
print()
print("medians of the in-process figures (seconds), and the loss check:")
for c in cases:
    fl, pl = col(c, "fedl", 6), col(c, "pytorch", 6)
    same = all(a == b for a, b in zip(fl, pl)) and len(set(fl)) == 1
    print("  %s: training loop fedl %.3f / torch %.3f; torch data loading %.3f; final loss fedl %.6f, torch %.6f (%s)"
          % (c, med(c, "fedl", 8), med(c, "pytorch", 8), med(c, "pytorch", 9), fl[0], pl[0],
             "identical in every run" if same else "DIFFERENT"))
print()
print("every run (wall s / peak RSS MB):")
for c in cases:
    for side in ("fedl", "pytorch"):
        print("  %-4s %-8s %s" % (c, side, "  ".join("%.3f/%.0f" % (a, b / 1024)
                                                   for a, b in zip(col(c, side, 3), col(c, side, 4)))))
EOF
echo
echo "load    : $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown) at the end (a load near or above $(nproc),"
echo "          the CPU count, means other processes competed for the CPUs: the spread is then noise)"
