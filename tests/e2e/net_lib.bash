# SPDX-License-Identifier: Apache-2.0
# Helpers of the suites that run fedl serve and fedl join on 127.0.0.1 (network, dp): background
# processes and their cleanup, waits with deadlines, the ledger, tests/e2e/fedl_peer.py.

# What these suites need beyond fedl (the runner skips a suite whose probe fails).
suite_probe()
{
  "$PY" -c 'import ssl; assert ssl.HAS_TLSv1_3' 2>/dev/null || { echo "python3's ssl module lacks TLS 1.3"; return 1; }
  command -v openssl >/dev/null || { echo "the openssl command is not installed"; return 1; }
  command -v pgrep >/dev/null || { echo "pgrep (procps) is not installed"; return 1; }
}

PEER=("$PY" "$FEDL_SOURCE_DIR/tests/e2e/fedl_peer.py")
BG=()        # processes this test started in the background
PEER_RUNS=0

# kill_tree SIGNAL PID: the process and its descendants (the trainer and evaluator children).
kill_tree()
{
  local c
  for c in $(pgrep -P "$2" 2>/dev/null); do
    kill_tree "$1" "$c"
  done
  kill "-$1" "$2" 2>/dev/null
  return 0
}

# Ends whatever the test left running: politely, then for good.
net_cleanup()
{
  local p
  for p in "${BG[@]}"; do kill_tree TERM "$p"; done
  sleep 0.3
  for p in "${BG[@]}"; do kill_tree KILL "$p"; done
  wait 2>/dev/null
  return 0
}

# net_init CLIENTS ROUNDS [INIT ARGS...]: workspace ws/ on the digits (iid, mlp:32, 1 epoch), its
# coordinator on 127.0.0.1:$PORT.
net_init()
{
  local clients=$1 rounds=$2
  shift 2
  PORT=$(free_port) || return
  "$FEDL" -q init ws --clients "$clients" --arch mlp:32 --partition "$DATA/digits.csv.gz" --no-header --split iid \
    --holdout 0.2 --rounds "$rounds" --seed 1 --lr 0.03 --epochs 1 --listen "127.0.0.1:$PORT" "$@" >init.log 2>&1 ||
    { fail "fedl init failed"; cat init.log; return 1; }
}

# serve_bg [ARGS...]: fedl serve ws in the background (stdout in serve.out, log in serve.log); $SERVE.
serve_bg()
{
  "$FEDL" serve ws --threads 1 "$@" >serve.out 2>serve.log &
  SERVE=$!
  BG+=("$SERVE")
}

# join_bg SITE [ARGS...]: fedl join for ws/clients/SITE on its shard (SITE.out, SITE.log); JOIN[SITE].
declare -A JOIN
join_bg()
{
  local site=$1
  shift
  "$FEDL" join "ws/clients/$site" --data "ws/clients/$site/data/train.csv" --no-header --threads 1 --retry-max 1 \
    "$@" >"$site.out" 2>"$site.log" &
  JOIN[$site]=$!
  BG+=("$!")
}

# wait_exit PID SECONDS: waits for a background process of this shell and sets RC to its exit
# status, or to "timeout" (and kills it) if it is still running after SECONDS.
wait_exit()
{
  if ! wait_for "$2" eval "! kill -0 $1 2>/dev/null"; then
    kill_tree KILL "$1"
    { wait "$1"; } 2>/dev/null
    RC=timeout
    return
  fi
  { wait "$1"; } 2>/dev/null # not "Killed" in the log for the processes killed on purpose
  RC=$?
}

# expect_exit PID SECONDS CODE WHAT: the process ends with CODE within SECONDS.
expect_exit()
{
  wait_exit "$1" "$2"
  [[ $RC == "$3" ]] || fail "$4 ended with $RC, expected $3"
}

# wait_log FILE TEXT [SECONDS]: waits until FILE contains TEXT (fixed string).
wait_log()
{
  wait_for "${3:-30}" grep -qF -- "$2" "$1" && return 0
  fail "$1 does not show '$2' within ${3:-30} s"
  echo "--- $1"
  tail -20 "$1"
  return 1
}

# ledger EXPR: evaluates a Python expression over ws/ledger.jsonl: L is the list of entries,
# R the bodies of the "round" entries, F those of the "round-failed" ones.
ledger()
{
  "$PY" - "$1" <<'PY'
import json, sys
L = [json.loads(line) for line in open("ws/ledger.jsonl")]
R = [e["body"] for e in L if e["kind"] == "round"]
F = [e["body"] for e in L if e["kind"] == "round-failed"]
def sites(body):
    return sorted(p["site"] for p in body["participants"])
print(eval(sys.argv[1]))
PY
}

# expect_ledger EXPR MESSAGE: the expression over the ledger is true.
expect_ledger()
{
  [[ $(ledger "$1") == True ]] || { fail "ledger: $2"; ledger "[(e['kind'], e['body'].get('round')) for e in L]"; }
}

# expect_rounds R: the ledger has rounds 1..R, each exactly once, and passes fedl audit.
expect_rounds()
{
  expect_ledger "[b['round'] for b in R] == list(range(1, $1 + 1))" "rounds are not 1..$1 exactly once"
  "$FEDL" audit ws >audit.out 2>&1 || { fail "fedl audit ws failed"; cat audit.out; }
}

# peer SCENARIO ARGS...: fedl_peer.py against the coordinator; its JSON report goes to $REPORT.
peer()
{
  REPORT=peer-$1-$((++PEER_RUNS)).json
  timeout 60 "${PEER[@]}" "$1" --server "127.0.0.1:$PORT" --timeout $((10 * TIME_SCALE)) "${@:2}" >"$REPORT" 2>>peer.err ||
    { fail "fedl_peer.py $* failed"; cat peer.err; }
}

# report_has EXPR MESSAGE: the Python expression over the last peer report (as j) is true.
report_has()
{
  [[ $(json_get "$REPORT" "bool($1)") == True ]] || { fail "peer: $2"; cat "$REPORT"; }
}

# VmHWM (peak resident memory) of a process, in KiB.
peak_kib()
{
  awk '/^VmHWM:/ {print $2}' "/proc/$1/status"
}

# trainer_of PID: the trainer child of a fedl join.
trainer_of()
{
  # A sandboxed trainer is two processes: the one its site started, which only waits, and its
  # child (the sandbox's PID 1), which trains.
  local outer inner
  outer=$(pgrep -P "$1" | head -1)
  inner=$(pgrep -P "$outer" 2>/dev/null | head -1)
  echo "${inner:-$outer}"
}
