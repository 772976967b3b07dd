#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# make fuzz: builds the libFuzzer targets of tests/fuzz (clang, ASan + UBSan) in $FUZZ_BUILD and
# runs each for $FUZZ_SECONDS over a copy of its seed corpus, then prints per target the
# executions per second and the coverage libFuzzer reached. Exits 1 if any target crashed
# (a crash, sanitizer report, failed invariant, timeout, out-of-memory or leak), naming the
# reproducer it left.
#
#   scripts/fuzz.sh [TARGET...]           # default: every target
#   FUZZ_SECONDS=600 scripts/fuzz.sh wire # longer, one target
#
# Environment: FUZZ_SECONDS (60 per target), FUZZ_BUILD (build-fuzz), JOBS (2; build only: the
# targets run one after the other on one core), FUZZ_STACK_KB (256), FUZZ_ARGS (more libFuzzer
# flags).
# New inputs go to $FUZZ_BUILD/corpus/TARGET and reproducers to $FUZZ_BUILD/crashes/TARGET, never
# into the repository: a crash worth keeping is copied by hand to tests/fuzz/regressions/TARGET
# under a name that says what it is (tests/fuzz/README.md).
set -euo pipefail

cd "$(dirname "$0")/.."
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_BUILD=${FUZZ_BUILD:-build-fuzz}
JOBS=${JOBS:-2}
FUZZ_ARGS=${FUZZ_ARGS:-}
# A UBSan report with the stack that led to it (each is fatal: -fno-sanitize-recover).
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
# A 256 KiB stack (fedl's threads have 8 MiB), so that recursion as deep as an input is nested
# overflows within -max_len, as it would with a large enough input; fedl_fuzz_replay runs the
# regressions on a stack of the same size. The targets' seeds need a fraction of it.
FUZZ_STACK_KB=${FUZZ_STACK_KB:-256}

# The largest input libFuzzer makes for each target: a little over its largest seed, and enough
# for what the parser does with more (a frame header is at most 64 KiB, but nesting and every
# check show well below that).
declare -A max_len=(
  [frame]=4096 [safetensors]=8192 [config]=4096 [ledger]=16384
  [csv]=4096 [idx]=4096 [npy]=4096 [wire]=4096
)
# JSON tokens help the targets whose input is JSON.
declare -A dict=(
  [frame]=json [safetensors]=json [config]=json [ledger]=json [wire]=json
)

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(frame safetensors config ledger csv idx npy wire)
fi
for t in "${targets[@]}"; do
  if [ -z "${max_len[$t]:-}" ]; then
    echo "fuzz.sh: no fuzz target named $t (known: ${!max_len[*]})" >&2
    exit 2
  fi
done

if [ ! -f "$FUZZ_BUILD/build.ninja" ]; then
  CC=clang CXX=clang++ cmake -S . -B "$FUZZ_BUILD" -G Ninja -DFEDL_FUZZ=ON -DFEDL_WITH_TORCH=OFF \
    -DFEDL_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
cmake --build "$FUZZ_BUILD" -j "$JOBS" --target fedl_fuzz

failed=0
summary=()
for t in "${targets[@]}"; do
  corpus="$FUZZ_BUILD/corpus/$t"
  crashes="$FUZZ_BUILD/crashes/$t"
  log="$FUZZ_BUILD/logs/$t.log"
  mkdir -p "$corpus" "$crashes" "$(dirname "$log")"
  cp -n tests/fuzz/corpus/"$t"/* "$corpus"/ 2>/dev/null || true
  regressions=()
  if [ -d "tests/fuzz/regressions/$t" ]; then
    regressions=("tests/fuzz/regressions/$t") # read, never written: new inputs go to $corpus
  fi
  dict_args=()
  if [ -n "${dict[$t]:-}" ]; then
    dict_args=(-dict="tests/fuzz/${dict[$t]}.dict")
  fi
  before=$(find "$crashes" -type f | wc -l)
  echo "fuzz: $t for ${FUZZ_SECONDS} s (log: $log)"
  rc=0
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
  (ulimit -s "$FUZZ_STACK_KB" && exec "$FUZZ_BUILD/tests/fuzz/fedl_fuzz_$t" -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 \
    -max_len="${max_len[$t]}" -timeout=10 -print_final_stats=1 -print_funcs=0 -artifact_prefix="$crashes/" \
    "${dict_args[@]}" $FUZZ_ARGS "$corpus" "${regressions[@]}") >"$log" 2>&1 || rc=$?
  # The last status line ("#N DONE cov: C ft: F corp: ...") and the final stats.
  status=$(grep -E '^#[0-9]+[[:space:]].*cov: ' "$log" | tail -n 1 || true)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$status")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$status")
  corp=$(sed -nE 's/.* corp: ([0-9]+).*/\1/p' <<<"$status")
  execs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log")
  eps=$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+).*/\1/p' "$log")
  rss=$(sed -nE 's/^stat::peak_rss_mb: *([0-9]+).*/\1/p' "$log")
  new=$(find "$crashes" -type f | wc -l)
  result=ok
  if [ "$rc" -ne 0 ] || [ "$new" -gt "$before" ]; then
    result=CRASH
    failed=1
    artifact=$(sed -nE 's/^artifact_prefix=.*; Test unit written to (.*)$/\1/p' "$log" | tail -n 1)
    echo "fuzz: $t CRASHED (exit $rc); reproducer: ${artifact:-see $crashes}; log: $log" >&2
    grep -E '^(==[0-9]+==ERROR|SUMMARY|.*runtime error|.*fuzz invariant failed|.*uncaught exception|terminate called)' "$log" \
      | head -n 5 >&2 || true
  fi
  summary+=("$(printf '%-12s %8s %10s %8s %6s %7s %6s %7s  %s' "$t" "${FUZZ_SECONDS}" "${execs:-?}" "${eps:-?}" \
    "${cov:-?}" "${ft:-?}" "${corp:-?}" "${rss:-?}" "$result")")
done

echo
printf '%-12s %8s %10s %8s %6s %7s %6s %7s  %s\n' target seconds execs exec/s cov ft corpus rss_mb result
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
  echo "fuzz: a target crashed; its reproducer is in $FUZZ_BUILD/crashes/TARGET (see above)" >&2
  exit 1
fi
