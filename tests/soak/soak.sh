#!/bin/bash
# SPDX-License-Identifier: Apache-2.0
# Soak run of a networked federation (make soak): many rounds of fedl serve and fedl join on
# 127.0.0.1 under churn, coordinator restarts and a hostile site, with the coordinator's memory and
# descriptors sampled throughout. It is not part of `make test` (it runs for 10-25 minutes).
#
#   - a workspace on the bundled digits (as tests/e2e/net_lib.bash's net_init: iid, mlp:32, 1 epoch,
#     holdout 0.2) for SITES honest sites and one more, site-(SITES+1), which is the hostile one;
#   - fedl serve (--heartbeat 1, quorum 2) and SITES fedl join;
#   - churn: every 15-45 s a random honest fedl join gets kill -9 and is started again 1-10 s later
#     (at most one is down at a time, so a quorum is always there);
#   - the coordinator is stopped every RESTART_EVERY rounds (100; 0: never), by kill -9 and
#     SIGTERM in turn, and started again on the same workspace (it resumes from the ledger);
#   - the hostile site (tests/e2e/fedl_peer.py hostile --bundle ws/clients/site-K --case C) answers
#     tasks with each of fedl_peer.py's CASES in turn, throughout; every 6th run is its
#     `strangers` scenario instead (4-24 bare TCP connections from 127.0.0.2.., held 1-4 s);
#   - every INTERVAL s the coordinator's VmRSS, VmHWM, Threads and open descriptors
#     (/proc/PID/status, /proc/PID/fd) go to DIR/samples.csv.
#
# Checks (each a verdict in the summary; the exit status is 1 if any fails):
#   ledger-rounds         ws/ledger.jsonl has the "round" entries 1..ROUNDS, each once, in order
#   ledger-resume         every "serve" entry resumes at the round after the last one recorded
#   ledger-finished       one "finished" entry, for round ROUNDS
#   hostile-outcomes      in each round where the hostile site answered a task, the ledger shows
#                         its update rejected, its error report dropped (error-text), no update
#                         from it (deep-metrics), or the first of its two valid updates taken (twice)
#   hostile-never-aggregated  the hostile site is a participant only of its `twice` rounds
#   hostile-coverage      every case of fedl_peer.py was sent in some round
#   audit, audit-witness  fedl audit ws, and with --witness the honest sites' bundles, exit 0
#   serve-*, site-*, orphans, processes   no fedl process ended other than as told (kill -9: 137, SIGTERM: 130,
#                         the end: 0), a stopped coordinator exits within its timeout, no trainer
#                         or evaluator child outlives its killed parent by 10 s, the restarted
#                         coordinator serves within 30 s
#   progress              a round is recorded at least every STALL seconds; all within DEADLINE
#   rss-across-windows    the coordinator's median VmRSS in the last WINDOW-round window (100) is
#                         at most RSS_TOL MB above the first window's
#   rss-within-windows    in no window is the median of its last third of samples more than
#                         RSS_TOL MB above that of its first third
#   fds-across-windows, fds-within-windows   the same for open descriptors, with FD_TOL
#                         descriptors of slack (a site reconnecting, the hostile peer)
# Medians leave out each window's first 10 rounds (a tenth of a window under 100 rounds, 1 under
# 20: with the default RESTART_EVERY every window but the first starts with a fresh coordinator)
# and the samples after the last round (the sites are gone); descriptor figures also leave out
# samples taken while strangers were connected. The criteria are meant for the default 100-round
# windows: a few samples per window (a short smoke run) make them noisy.
#
# Usage: tests/soak/soak.sh [-r ROUNDS] [-d DIR] [-s SITES] [-T DEADLINE] [-S SEED]
# Environment (the options override): ROUNDS (500), SOAK_DIR (${TMPDIR:-/tmp}/fedl-soak, replaced
# if it is a former soak's folder), SOAK_SITES (4), SOAK_RESTART_EVERY (100), SOAK_WINDOW (100),
# SOAK_DEADLINE (900 + 4 x ROUNDS s), SOAK_STALL (180 s), SOAK_INTERVAL (2 s), SOAK_SEED (the
# time: churn, kills and the strangers' sizes follow it), SOAK_RSS_TOLERANCE_MB (10),
# SOAK_FD_TOLERANCE (2), FEDL (build/src/fedl).
# The run folder keeps the copy of fedl and its backends that the run uses (bin/: a rebuild during
# the run changes nothing), the workspace, every process's log, samples.csv, events.log, the
# hostile peer's reports (hostile/), evidence/ for a failure, and summary.json.
set -u

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=$(cd "$here/../.." && pwd)
PY=/usr/bin/python3
HELPER=("$PY" "$here/soak.py")
ROUNDS=${ROUNDS:-500}
DIR=${SOAK_DIR:-${TMPDIR:-/tmp}/fedl-soak}
SITES=${SOAK_SITES:-4}
RESTART_EVERY=${SOAK_RESTART_EVERY:-100}
WINDOW=${SOAK_WINDOW:-100}
DEADLINE=${SOAK_DEADLINE:-}
STALL=${SOAK_STALL:-180}
INTERVAL=${SOAK_INTERVAL:-2}
SEED=${SOAK_SEED:-$(date +%s)}
RSS_TOL=${SOAK_RSS_TOLERANCE_MB:-10}
FD_TOL=${SOAK_FD_TOLERANCE:-2}

usage() { sed -n '3,/^set -u/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while getopts ":r:d:s:T:S:h" o; do
  case $o in
    r) ROUNDS=$OPTARG ;;
    d) DIR=$OPTARG ;;
    s) SITES=$OPTARG ;;
    T) DEADLINE=$OPTARG ;;
    S) SEED=$OPTARG ;;
    h) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
for v in ROUNDS SITES RESTART_EVERY WINDOW STALL SEED FD_TOL; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "soak: $v must be a whole number, not '${!v}'" >&2; exit 2; }
done
((ROUNDS >= 1 && SITES >= 2 && WINDOW >= 1)) || { echo "soak: needs ROUNDS >= 1, SITES >= 2, WINDOW >= 1" >&2; exit 2; }
DEADLINE=${DEADLINE:-$((900 + 4 * ROUNDS))}
WARMUP=$((WINDOW < 20 ? 1 : WINDOW < 100 ? WINDOW / 10 : 10))
FEDL=$(readlink -f "${FEDL:-$src/build/src/fedl}")
[[ -x $FEDL ]] || { echo "soak: no fedl binary at $FEDL (build it, or set FEDL)" >&2; exit 2; }
HOSTILE=site-$((SITES + 1))
RANDOM=$SEED

# The run folder: one soak at a time in it (DIR.lock), replaced only if it is empty or a former soak's.
exec 9>>"${DIR%/}.lock" || exit 2
flock -n 9 || { echo "soak: another soak runs in $DIR" >&2; exit 2; }
if [[ -e $DIR ]]; then
  if [[ -f $DIR/.fedl-soak ]] || [[ -d $DIR && -z $(ls -A "$DIR") ]]; then
    rm -rf "$DIR"
  else
    echo "soak: $DIR exists and is not a soak run folder; give another with -d" >&2
    exit 2
  fi
fi
mkdir -p "$DIR/evidence" && touch "$DIR/.fedl-soak" && cd "$DIR" || exit 2
DIR=$(pwd)
# bash reports each process killed on purpose ("line N: PID Killed ..."): not in the output.
exec 2> >(grep --line-buffered -v -E '^.*: line [0-9]+: +[0-9]+ Killed ' >&2)

# ---- time, events, processes
T0=${EPOCHREALTIME/./}
echo "${EPOCHREALTIME}" >t0
elapsed() { local d=$(((${EPOCHREALTIME/./} - T0) / 100000)); printf '%d.%d' $((d / 10)) $((d % 10)); }
say() { printf '[%7ss] %s\n' "$(elapsed)" "$*"; }
# event KIND ARGS: a line of events.log (soak.py report reads it).
event() { printf '%s %s\n' "$(elapsed)" "$*" >>events.log; }
FAILS=0
# verdict NAME ok|FAIL DETAIL
verdict()
{
  event verdict "$@"
  [[ $2 == ok ]] || { FAILS=$((FAILS + 1)); say "FAIL $1: ${*:3}"; }
}

GROUPS_STARTED=() # every process started, each the leader of its own process group (setsid)
# spawn OUT ERR CMD...: starts CMD in its own process group (with its children); sets PID.
spawn()
{
  local out=$1 err=$2
  shift 2
  setsid "$@" >>"$out" 2>>"$err" </dev/null 9>&- & # (not the lock: the sampled descriptors are fedl's own)
  PID=$!
  GROUPS_STARTED+=("$PID")
}

alive() { kill -0 "$1" 2>/dev/null; }

# reap PID SECONDS: waits for a process of this shell to end; RC is its exit status, or
# "timeout" (it is then killed with its group).
reap()
{
  local end=$((SECONDS + $2))
  while alive "$1" && ((SECONDS < end)); do sleep 0.1; done
  if alive "$1"; then
    kill -KILL -- "-$1" 2>/dev/null
    { wait "$1"; } 2>/dev/null
    RC=timeout
    return 1
  fi
  { wait "$1"; } 2>/dev/null
  RC=$?
  return 0
}

# orphans PGID WHAT: once the group's leader is gone, its children (trainer, evaluator) must end
# by themselves within 10 s; whatever is left is recorded and killed.
orphans()
{
  local end=$((SECONDS + 10)) left
  while [[ -n $(pgrep -g "$1") ]] && ((SECONDS < end)); do sleep 0.2; done
  left=$(pgrep -g "$1" | tr '\n' ' ')
  if [[ -n $left ]]; then
    ps -o pid,ppid,stat,etime,args -g "$1" >"evidence/orphans-$1.txt" 2>&1
    verdict "orphans" FAIL "$2: processes $left still running 10 s after their parent was killed" \
      "(evidence/orphans-$1.txt)"
    kill -KILL -- "-$1" 2>/dev/null
  fi
}

# shellcheck disable=SC2317 # (called by the trap)
cleanup()
{
  local p
  touch stop 2>/dev/null
  for p in "${GROUPS_STARTED[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done
  sleep 0.5
  for p in "${GROUPS_STARTED[@]}"; do kill -KILL -- "-$p" 2>/dev/null; done
  for p in "${GROUPS_STARTED[@]}"; do { wait "$p"; } 2>/dev/null; done
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

rounds_done() { local n; n=$(grep -c -F '"kind":"round",' ws/ledger.jsonl 2>/dev/null); echo "${n:-0}"; }

# evidence WHY: what a hung or failed coordinator looked like.
evidence()
{
  local f
  f=evidence/serve-$INSTANCE-$(elapsed).txt
  {
    echo "== $1"
    echo "== command: $FEDL serve ws --threads 1 --min-clients 2 --heartbeat 1 (pid $SERVE, instance $INSTANCE)"
    echo "== rounds in the ledger: $(rounds_done)"
    cat "/proc/$SERVE/status" 2>/dev/null
    echo "== threads (name, state, wchan)"
    for t in /proc/"$SERVE"/task/*; do
      echo "$(cat "$t/comm" 2>/dev/null) $(awk '{print $3}' "$t/stat" 2>/dev/null) $(cat "$t/wchan" 2>/dev/null)"
    done
    echo "== descriptors"
    ls -l "/proc/$SERVE/fd" 2>/dev/null
    echo "== processes"
    ps -o pid,ppid,pgid,stat,etime,rss,args -g "$(IFS=,; echo "${GROUPS_STARTED[*]}")" 2>/dev/null
    echo "== serve-$INSTANCE.log (end)"
    tail -50 "serve-$INSTANCE.log"
    echo "== ledger (end)"
    tail -c 3000 ws/ledger.jsonl
  } >"$f" 2>&1
  if command -v gdb >/dev/null && alive "$SERVE"; then
    timeout 60 gdb -p "$SERVE" -batch -ex "thread apply all bt" >>"$f" 2>&1
  fi
  say "evidence in $DIR/$f"
}

# ---- the federation
# A copy of the binary and its backends: a rebuild while the soak runs would otherwise mix two
# builds (every process started later would run the new one).
FEDL_SHA=$(sha256sum <"$FEDL" | cut -c1-16)
event binary "$FEDL_SHA $(date -r "$FEDL" '+%F %T') $FEDL"
mkdir bin && cp "$FEDL" "$(dirname "$FEDL")"/libfedl-backend-*.so bin/ 2>/dev/null
[[ -x bin/fedl ]] || { echo "soak: cannot copy $FEDL to $DIR/bin" >&2; exit 2; }
FEDL_ORIG=$FEDL FEDL=$DIR/bin/fedl
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
say "soak: $ROUNDS rounds, $SITES honest sites + $HOSTILE hostile," \
  "coordinator restarted every $RESTART_EVERY rounds (0: never)," \
  "seed $SEED, deadline ${DEADLINE}s, folder $DIR, fedl: a copy of $FEDL_ORIG (sha256 $FEDL_SHA...)"
"$FEDL" -q init ws --clients $((SITES + 1)) --arch mlp:32 --partition "$src/data/digits.csv.gz" --no-header \
  --split iid --holdout 0.2 --rounds "$ROUNDS" --seed 1 --lr 0.03 --epochs 1 --min-clients 2 \
  --listen "127.0.0.1:$PORT" >init.log 2>&1 || { cat init.log; echo "soak: fedl init failed" >&2; exit 2; }

INSTANCE=0
start_serve()
{
  INSTANCE=$((INSTANCE + 1))
  spawn "serve-$INSTANCE.out" "serve-$INSTANCE.log" "$FEDL" serve ws --threads 1 --min-clients 2 --heartbeat 1
  SERVE=$PID
  echo "$INSTANCE $SERVE" >serve.pid.tmp && mv serve.pid.tmp serve.pid
  event serve-start "$INSTANCE $SERVE at round $(rounds_done)"
  local end=$((SECONDS + 30))
  until grep -qF "serving " "serve-$INSTANCE.log" 2>/dev/null; do
    if ! alive "$SERVE" || ((SECONDS >= end)); then
      verdict serve-start FAIL "coordinator $INSTANCE does not serve within 30 s (serve-$INSTANCE.log)"
      evidence "coordinator $INSTANCE does not serve"
      return 1
    fi
    sleep 0.1
  done
}

declare -A SITE_PID FINISHED
start_site()
{
  local k=$1
  echo "---- soak: started at $(elapsed) s" >>"site-$k.log"
  spawn "site-$k.out" "site-$k.log" "$FEDL" join "ws/clients/site-$k" --data "ws/clients/site-$k/data/train.csv" \
    --no-header --threads 1 --retry-max 1 --retry-for 120
  SITE_PID[$k]=$PID
  event site-start "site-$k $PID"
}

# stop_serve SIGNAL: stops the coordinator, checks how it ended and that its children went too.
stop_serve()
{
  local sig=$1 want=130 limit=60 at
  at=$(rounds_done)
  [[ $sig == KILL ]] && want=137 limit=15
  kill "-$sig" "$SERVE"
  reap "$SERVE" "$limit" || {
    evidence "coordinator $INSTANCE did not exit after SIG$sig"
    verdict serve-stop FAIL "coordinator $INSTANCE did not exit within its timeout after SIG$sig at round $at"
  }
  event serve-stop "#$INSTANCE SIG$sig at round $at -> exit $RC"
  say "coordinator $INSTANCE: SIG$sig after round $at, exit $RC"
  [[ $RC == "$want" ]] ||
    verdict serve-stop FAIL "coordinator $INSTANCE exited $RC after SIG$sig, expected $want (serve-$INSTANCE.log)"
  if [[ $sig == TERM ]] && ! grep -qF "stopped after round" "serve-$INSTANCE.out"; then
    verdict serve-stop FAIL "coordinator $INSTANCE's stdout does not say where it stopped after SIGTERM"
  fi
  rm -f serve.pid
  orphans "$SERVE" "coordinator $INSTANCE"
}

spawn sampler.out sampler.err "${HELPER[@]}" sample . --interval "$INTERVAL"
start_serve || exit 1
for ((k = 1; k <= SITES; k++)); do start_site "$k"; done
spawn hostile.out hostile.err "${HELPER[@]}" hostile . --server "127.0.0.1:$PORT" --bundle "ws/clients/$HOSTILE" \
  --ca ws/pki/ca.crt --seed "$SEED"
HOSTILE_LOOP=$PID

# ---- the run
end=$((SECONDS + DEADLINE))
next_restart=$((RESTART_EVERY > 0 ? RESTART_EVERY : ROUNDS))
next_kill=$((SECONDS + 15 + RANDOM % 31))
down="" down_pid="" up_at=0
last_done=0 last_progress=$SECONDS restarted_at="" crashes=0 stop_sig=KILL
outcome=""
while :; do
  done_now=$(rounds_done)
  if ((done_now != last_done)); then
    last_progress=$SECONDS
    if [[ -n $restarted_at ]]; then
      event recovered "$INSTANCE $(($(date +%s%N) / 1000000 - restarted_at))e-3"
      restarted_at=""
    fi
    if ((done_now / 25 != last_done / 25)); then say "round $done_now/$ROUNDS"; fi
    last_done=$done_now
  fi
  if ((SECONDS >= end)); then
    evidence "deadline"
    verdict progress FAIL "the deadline (${DEADLINE}s) passed at round $done_now of $ROUNDS"
    outcome=deadline
    break
  fi

  # The coordinator: finished, or ended by itself?
  if ! alive "$SERVE"; then
    reap "$SERVE" 5
    if [[ $RC == 0 ]] && ((done_now == ROUNDS)); then
      outcome=finished
      break
    fi
    crashes=$((crashes + 1))
    cp "serve-$INSTANCE.log" "evidence/" 2>/dev/null
    verdict serve-exit FAIL "coordinator $INSTANCE ended by itself with $RC at round $done_now (serve-$INSTANCE.log)"
    orphans "$SERVE" "coordinator $INSTANCE"
    ((crashes <= 3)) || { outcome=crashes; break; }
    start_serve || { outcome=no-serve; break; }
    restarted_at=$(($(date +%s%N) / 1000000))
  fi
  if ((SECONDS - last_progress > STALL)); then
    evidence "no round for ${STALL}s"
    verdict progress FAIL "no round recorded for ${STALL}s after round $done_now (coordinator $INSTANCE)"
    outcome=stalled
    break
  fi

  # The coordinator's restart every RESTART_EVERY rounds, kill -9 and SIGTERM in turn.
  if ((done_now >= next_restart && next_restart < ROUNDS)); then
    stop_serve "$stop_sig"
    [[ $stop_sig == KILL ]] && stop_sig=TERM || stop_sig=KILL
    next_restart=$(($(rounds_done) / RESTART_EVERY * RESTART_EVERY + RESTART_EVERY))
    start_serve || { outcome=no-serve; break; }
    restarted_at=$(($(date +%s%N) / 1000000))
    last_progress=$SECONDS
  fi

  # Churn: kill -9 a random honest site, start it again after a random pause.
  if [[ -z $down ]] && ((SECONDS >= next_kill)); then
    running=()
    for ((k = 1; k <= SITES; k++)); do
      [[ -z ${FINISHED[$k]:-} ]] && alive "${SITE_PID[$k]}" && running+=("$k")
    done
    if ((${#running[@]})); then
      down=${running[RANDOM % ${#running[@]}]}
      down_pid=${SITE_PID[$down]}
      kill -KILL "$down_pid"
      reap "$down_pid" 10
      event site-kill "site-$down $down_pid at round $(rounds_done) -> exit $RC"
      [[ $RC == 137 ]] || verdict site-kill FAIL "site-$down exited $RC after kill -9, expected 137"
      up_at=$((SECONDS + 1 + RANDOM % 10))
    fi
    next_kill=$((SECONDS + 15 + RANDOM % 31))
  fi
  if [[ -n $down ]] && ((SECONDS >= up_at)); then
    orphans "$down_pid" "site-$down's fedl join (kill -9)"
    start_site "$down"
    down=""
  fi

  # Honest sites that ended by themselves: at the end of the federation (0), or a defect.
  for ((k = 1; k <= SITES; k++)); do
    [[ $k == "$down" || -n ${FINISHED[$k]:-} ]] && continue
    alive "${SITE_PID[$k]}" && continue
    reap "${SITE_PID[$k]}" 5
    if [[ $RC == 0 ]] && grep -qF "the federation is finished" "site-$k.log"; then
      FINISHED[$k]=1
      event site-finished "site-$k"
      continue
    fi
    verdict site-exit FAIL "site-$k's fedl join ended by itself with $RC at round $done_now (site-$k.log)"
    orphans "${SITE_PID[$k]}" "site-$k's fedl join"
    start_site "$k"
  done
  sleep 1
done
event wall "$(elapsed)"
say "run over ($outcome) after $(elapsed) s at round $(rounds_done)"
rm -f serve.pid

# ---- the end: sites, helpers, audits, summary
if [[ $outcome == finished ]]; then
  orphans "$SERVE" "the last coordinator"
  for ((k = 1; k <= SITES; k++)); do
    [[ -n ${FINISHED[$k]:-} ]] && continue
    if [[ $k == "$down" ]]; then
      event site-down-at-end "site-$k"
      continue
    fi
    reap "${SITE_PID[$k]}" 60
    if [[ $RC == 0 ]]; then
      FINISHED[$k]=1
    elif grep -qF "the federation is finished" "site-$k.log"; then
      verdict site-end FAIL "site-$k was told the federation is finished but ended with $RC"
    else
      # Started again just as the federation ended: it never heard of the end (not a defect).
      event site-missed-end "site-$k $RC"
    fi
  done
fi
touch stop
reap "$HOSTILE_LOOP" 120 || say "the hostile loop did not stop within 120 s"
for p in "${GROUPS_STARTED[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done

witness=()
for ((k = 1; k <= SITES; k++)); do
  [[ -s ws/clients/site-$k/receipts.jsonl ]] && witness+=("ws/clients/site-$k")
done
if timeout 300 "$FEDL" audit ws >audit.out 2>&1; then
  verdict audit ok "fedl audit ws: exit 0"
else
  verdict audit FAIL "fedl audit ws: exit $? (audit.out: $(tail -3 audit.out | tr '\n' ' '))"
fi
if ((${#witness[@]} == SITES)) && timeout 300 "$FEDL" audit ws --witness "${witness[@]}" >audit-witness.out 2>&1; then
  verdict audit-witness ok "fedl audit ws --witness ${witness[*]}: exit 0"
else
  verdict audit-witness FAIL "fedl audit ws --witness ${witness[*]}: exit $? (of $SITES sites' receipts;" \
    "audit-witness.out: $(tail -3 audit-witness.out 2>/dev/null | tr '\n' ' '))"
fi
if ((FAILS == 0)) && [[ $outcome == finished ]]; then
  verdict processes ok "every fedl process ended as told; the coordinator served after each restart"
fi

"${HELPER[@]}" report "$DIR" --rounds "$ROUNDS" --sites "$SITES" --hostile-site "$HOSTILE" --window "$WINDOW" \
  --warmup "$WARMUP" --interval "$INTERVAL" --rss-tolerance-mb "$RSS_TOL" --fd-tolerance "$FD_TOL" | tee summary.txt
exit "${PIPESTATUS[0]}"
