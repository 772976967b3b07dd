#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Networked rounds, whole processes: fedl serve and N fedl join over mutual TLS on 127.0.0.1,
# beside the transport's own limit for the same bytes (DESIGN §8).
#
# Provisions a workspace whose model is mlp:H on the 64-feature digits (64H + H + 10H + 10 =
# 75H + 10 parameters, H chosen to match -p) with a few samples per site, 1 epoch and one batch,
# so that training is negligible and a round is transport, signing, validation, aggregation and
# the ledger. Runs `fedl serve` under /usr/bin/time -v (peak RSS) and N `fedl join`, for R rounds,
# drops the first W (the trainer children start at the first task), then runs
# build/bench/fedl_tls_push_bench for the same bytes (the sites asked per round, P parameters) and
# prints the medians:
#   round time          from consecutive ledger "round" entries (entry to entry), and the
#                       coordinator's own per-round seconds ("round N/R done: ..., X s": tasks sent
#                       to ledger entry written), split into tasks -> all updates in (the ledger
#                       body's "seconds") and the commit (validation, aggregation, model, ledger)
#   critical path       from the JSON logs of serve (-v) and the sites: tasks out, trainer,
#                       signing, updates back, commit, gap to the next round
#   coordinator RSS     peak, against 3 × model + 100 MB
#   transport           fedl_tls_push_bench: N models out, N updates back, same P (and once more
#                       with the update bodies written to files, as the coordinator does)
#   fedl join           time from launch to its "connected to ... as site-K" line, peak RSS of the
#                       session process (VmHWM, sampled from /proc), and its trainer children
#   memory              the peak of all fedl processes' RSS together and the lowest MemAvailable;
#                       below -m MB available the run is stopped (its own processes killed)
#
# Usage: bench/round_bench.sh [-n SITES] [-p PARAMS] [-r ROUNDS] [-w WARMUP] [-c PER_ROUND]
#                             [-i TRAINER_IDLE] [-s SAMPLES] [-t PUSH_REPEAT] [-m MIN_AVAIL_MB]
#                             [-j THREADS] [-f] [-S] [-O] [-T TIMEOUT] [-o RESULT.json] [-k]
#   -n SITES        fedl join processes (default 10)
#   -p PARAMS       model parameters (default 1000000)
#   -r ROUNDS       rounds in all (default 12)
#   -w WARMUP       first rounds not counted (default 2)
#   -c PER_ROUND    fedl serve --clients-per-round (default: all sites); also the quorum
#   -i SEC          fedl join --trainer-idle SEC (default 0: keep the trainers)
#   -s SAMPLES      training samples per site (default 4)
#   -t REPEAT       rounds of fedl_tls_push_bench (default 15; 0: skip it)
#   -m MB           stop everything if MemAvailable falls below this (default 1500)
#   -j THREADS      --threads for fedl serve, each fedl join and its trainer (default: not
#                   given, so each runs at its own default, as a user runs them)
#   -f              the joins start their trainers through one fork server (join --fork-server)
#   -S              secure aggregation (fedl init --secure-aggregation): the coordinator sums
#                   masked inputs; compare with a run without -S
#   -O              the trainers without their sandbox (join --sandbox off; the default is auto),
#                   to compare with a run without -O
#   -T SEC          give up after this long (default 900)
#   -o FILE         also write the figures as JSON
#   -k              keep the temporary folder (workspace, logs)
# Environment: FEDL (default build/src/fedl), FEDL_BACKEND_PATH (default: FEDL's folder if it
#   holds the torch backend, else build/src), PUSH_BENCH (default: FEDL's build/bench/
#   fedl_tls_push_bench), PYTHON (default /usr/bin/python3), DIGITS_CSV, SERVE_WRAP (a profiler
#   command put before fedl serve, e.g. "strace -f -c -o FILE" or "perf record -g -o FILE --").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
FEDL="${FEDL:-$root/build/src/fedl}"
PYTHON="${PYTHON:-/usr/bin/python3}"
DIGITS_CSV="${DIGITS_CSV:-$root/data/digits.csv.gz}"

n=10 params=1000000 rounds=12 warmup=2 per_round=0 idle=0 samples=4 push_repeat=15 min_avail=1500
timeout=900 out_json="" keep=0 threads="" fork=0 secure=() sandbox=()

usage() { sed -n '3,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "round_bench: $*" >&2; exit 1; }

while getopts ":n:p:r:w:c:i:s:t:m:j:T:o:fSOkh" o; do
  case "$o" in
    n) n="$OPTARG" ;;
    p) params="$OPTARG" ;;
    r) rounds="$OPTARG" ;;
    w) warmup="$OPTARG" ;;
    c) per_round="$OPTARG" ;;
    i) idle="$OPTARG" ;;
    s) samples="$OPTARG" ;;
    t) push_repeat="$OPTARG" ;;
    m) min_avail="$OPTARG" ;;
    j) threads="$OPTARG" ;;
    f) fork=1 ;;
    S) secure=(--secure-aggregation) ;;
    O) sandbox=(--sandbox off) ;;
    T) timeout="$OPTARG" ;;
    o) out_json="$OPTARG" ;;
    k) keep=1 ;;
    h) usage; exit 0 ;;
    :) die "-$OPTARG needs a value" ;;
    *) die "unknown option -$OPTARG (-h for help)" ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -eq 0 ]] || die "unexpected argument: $1"
for v in n params rounds samples timeout; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
for v in warmup per_round push_repeat min_avail; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer, not '${!v}'"
done
[[ -z "$threads" || "$threads" =~ ^[1-9][0-9]*$ ]] || die "-j needs a positive number of threads, not '$threads'"
[[ "$idle" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "-i needs a number of seconds, not '$idle'"
((params > 85)) || die "-p must be above 85 (mlp:1 has 85 parameters)"
((warmup < rounds)) || die "-w $warmup leaves no round to time out of -r $rounds"
((per_round <= n)) || die "-c $per_round is more than the $n sites"
[[ -x "$FEDL" ]] || die "fedl binary not found or not executable: $FEDL (set FEDL)"
[[ -x "$PYTHON" ]] || die "python not found: $PYTHON (set PYTHON)"
[[ -x /usr/bin/time ]] || die "/usr/bin/time is needed for the coordinator's peak RSS (apt install time)"
[[ -n "${EPOCHREALTIME:-}" ]] || die "needs bash 5 (\$EPOCHREALTIME)"
FEDL="$(cd "$(dirname "$FEDL")" && pwd)/$(basename "$FEDL")"
if [[ -z "${FEDL_BACKEND_PATH:-}" ]]; then
  if compgen -G "$(dirname "$FEDL")/libfedl-backend-torch*" >/dev/null; then
    FEDL_BACKEND_PATH="$(dirname "$FEDL")"
  else
    FEDL_BACKEND_PATH="$root/build/src"
  fi
fi
export FEDL_BACKEND_PATH
PUSH_BENCH="${PUSH_BENCH:-$(dirname "$(dirname "$FEDL")")/bench/fedl_tls_push_bench}"
if ((push_repeat > 0)); then
  [[ -x "$PUSH_BENCH" ]] || die "fedl_tls_push_bench not found: $PUSH_BENCH (build it, set PUSH_BENCH, or -t 0)"
fi

# mlp:H on 64 features and 10 classes: 64H + H + 10H + 10 parameters.
hidden=$(((params - 10 + 37) / 75))
((hidden >= 1)) || hidden=1
actual=$((75 * hidden + 10))
((per_round > 0)) && asked=$per_round || asked=$n

tmp="$(mktemp -d "${TMPDIR:-/tmp}/round_bench.XXXXXX")"
pids=()
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
  touch "$tmp/stop" 2>/dev/null || true
  # fedl serve runs under /usr/bin/time, which does not pass signals on: stop its child too.
  for p in "${pids[@]}"; do
    for c in $(pgrep -P "$p" 2>/dev/null); do kill "$c" 2>/dev/null || true; done
    kill "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [[ $keep -eq 1 ]]; then echo "kept: $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PYTHON" "$here/round_bench.py" data "$DIGITS_CSV" "$tmp/data.csv" $((n * samples))
ws="$tmp/ws"
"$FEDL" -q init "$ws" --clients "$n" --arch "mlp:$hidden" --partition "$tmp/data.csv" --no-header --split iid \
  --rounds "$rounds" --seed 1 --epochs 1 --batch-size 4096 --lr 0.0001 --listen "127.0.0.1:$port" \
  ${secure[@]+"${secure[@]}"} >/dev/null
model_bytes=$(stat -c %s "$ws"/models/global-000000.safetensors)
echo "round_bench: $n sites, $asked per round, P = $actual (mlp:$hidden), $rounds rounds; workspace and logs in $tmp" >&2

# The /proc sampler: peak RSS of every join and trainer, memory left on the machine.
"$PYTHON" "$here/round_bench.py" monitor --root "$tmp" --exe "$(basename "$FEDL")" --out "$tmp/monitor.json" \
  --stop "$tmp/stop" --min-avail-mb "$min_avail" &
monitor=$!
pids+=("$monitor")

serve_args=(--min-clients "$asked" --json)
[[ -n "$threads" ]] && serve_args+=(--threads "$threads")
((per_round > 0)) && serve_args+=(--clients-per-round "$per_round")
# SERVE_WRAP (words, e.g. "perf record -g -o /tmp/serve.perf --" or "strace -f -c -o FILE") runs
# fedl serve under a profiler; its RSS and times are then not the plain coordinator's.
read -r -a serve_wrap <<<"${SERVE_WRAP:-}"
/usr/bin/time -v -o "$tmp/serve.time" "${serve_wrap[@]}" "$FEDL" -v --log-format json serve "$ws" "${serve_args[@]}" \
  >"$tmp/summary.json" 2>"$tmp/serve.log" &
serve=$!
pids+=("$serve")
# Joins start once the coordinator listens, so that launch -> connected has no retry in it.
for ((i = 0; i < 300; i++)); do
  grep -q '"serving ' "$tmp/serve.log" 2>/dev/null && break
  kill -0 "$serve" 2>/dev/null || { cat "$tmp/serve.log" >&2; die "fedl serve ended before it listened"; }
  sleep 0.05
done

join_args=(--no-header --retry-max 1 "${sandbox[@]}")
[[ -n "$threads" ]] && join_args+=(--threads "$threads")
((fork)) && join_args+=(--fork-server "$tmp/fork.sock")
[[ "$idle" != 0 ]] && join_args+=(--trainer-idle "$idle")
: >"$tmp/launch.txt"
for ((k = 1; k <= n; k++)); do
  echo "site-$k $EPOCHREALTIME" >>"$tmp/launch.txt"
  "$FEDL" --log-format json join "$ws/clients/site-$k" --data "$ws/clients/site-$k/data/train.csv" "${join_args[@]}" \
    >/dev/null 2>"$tmp/site-$k.log" &
  pids+=("$!")
done

deadline=$((SECONDS + timeout))
status=0
while kill -0 "$serve" 2>/dev/null; do
  if ((SECONDS > deadline)); then
    echo "round_bench: gave up after $timeout s" >&2
    status=1
    break
  fi
  if ! kill -0 "$monitor" 2>/dev/null; then break; fi
  sleep 0.2
done
if ((status == 0)); then
  wait "$serve" || { status=$?; echo "round_bench: fedl serve exited with $status; its log:" >&2; tail -20 "$tmp/serve.log" >&2; }
fi
for p in "${pids[@]:2}"; do
  if ((status != 0)); then kill "$p" 2>/dev/null || true; fi
  wait "$p" 2>/dev/null || true
done
touch "$tmp/stop"
wait "$monitor" || true
pids=()

if ((push_repeat > 0 && status == 0)); then
  echo "round_bench: transport baseline: fedl_tls_push_bench --n $asked --params $actual" >&2
  "$PUSH_BENCH" --n "$asked" --params "$actual" --repeat "$push_repeat" --json >"$tmp/push.json"
  "$PUSH_BENCH" --n "$asked" --params "$actual" --repeat "$push_repeat" --dir "$tmp/push-files" --json \
    >"$tmp/push_files.json"
fi

report_args=(--ws "$ws" --tmp "$tmp" --n "$n" --per-round "$per_round" --params "$actual" --hidden "$hidden"
  --model-bytes "$model_bytes" --warmup "$warmup")
[[ -n "$out_json" ]] && report_args+=(--json-out "$out_json")
"$PYTHON" "$here/round_bench.py" report "${report_args[@]}" || status=1
exit "$status"
