# SPDX-License-Identifier: Apache-2.0
# A site against a hostile coordinator (THREAT-MODEL: the coordinator is not trusted with the
# sites' data): tests/e2e/hostile_coordinator.py holds the workspace's own server key, so a real
# `fedl join` connects to it as to its coordinator, and it sends the tasks that once overspent a
# site's budget, made it leak its labels and paths in error reports, allocate gigabytes for a
# 136-byte model, train an architecture its bundle never agreed to, grow its send queue without
# limit, or train past every deadline.

# shellcheck source=../net_lib.bash
source "$FEDL_SOURCE_DIR/tests/e2e/net_lib.bash"

# site_ws INIT ARGS...: a workspace ws/ of one site for the digits (64 features; --classes is
# the caller's); the site's data is digits-train.csv.
site_ws()
{
  "$FEDL" -q init ws --clients 1 --input-dim 64 --seed 1 --listen 127.0.0.1:1 "$@" >init.log 2>&1 ||
    { fail "fedl init failed"; cat init.log; return 1; }
  digits_split
}

# coordinator SCENARIO [ARGS...]: the hostile coordinator in the background ($HC, report in
# SCENARIO.json, its port in $PORT).
coordinator()
{
  local name=$1
  shift
  rm -f port
  "$PY" "$FEDL_SOURCE_DIR/tests/e2e/hostile_coordinator.py" --ws ws --port-file port --timeout $((30 * TIME_SCALE)) \
    "$@" "$name" >"$name.json" 2>"$name.err" &
  HC=$!
  HC_NAME=$name
  BG+=("$HC")
  wait_for 10 test -s port || { fail "the hostile coordinator did not start"; cat "$name.err"; return 1; }
  PORT=$(cat port)
}

# site [ARGS...]: fedl join site-1 against the hostile coordinator ($SITE).
site()
{
  "$FEDL" join ws/clients/site-1 --data digits-train.csv --no-header --threads 1 --retry-max 1 --server "127.0.0.1:$PORT" \
    "$@" >site.out 2>site.log &
  SITE=$!
  BG+=("$SITE")
}

# report NAME EXPR MESSAGE: the Python expression over the report NAME.json (as j) is true. In
# it, answers(T) are the frames that answered task T, and said(T) the message of its error.
report()
{
  local got
  got=$("$PY" - "$1.json" "$2" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
F = j["frames"]
def answers(t):
    return [f for f in F if f["type"] in ("update", "error") and f["header"].get("task") == t]
def said(t):
    return " | ".join(f["header"].get("message", "") for f in answers(t) if f["type"] == "error")
def cls(t):
    return [f["header"].get("class") for f in answers(t) if f["type"] == "error"]
print(bool(eval(sys.argv[2])))
PY
  )
  [[ $got == True ]] || { fail "$3"; echo "--- $1.json"; cat "$1.json"; echo "--- site.log"; tail -30 site.log; }
}

# site_baseline: the site's peak memory once it is connected, before the first task (the
# coordinator waits 2 s after its welcome); growth_under MB WHAT: it grew by less than MB since.
site_baseline()
{
  wait_log site.log "connected to" 30 && BASE=$(peak_kib "$SITE")
}
growth_under()
{
  local after
  after=$(peak_kib "$SITE")
  echo "fedl join VmHWM: $BASE KiB connected, $after KiB after $2"
  ((after - BASE < $1 * 1024)) || fail "fedl join's peak memory grew from $BASE to $after KiB ($2)"
}

finish_coordinator()
{
  wait_exit "$HC" $((120 * TIME_SCALE))
  [[ $RC == 0 ]] || { fail "the hostile coordinator ended with $RC"; cat "$HC_NAME.err" 2>/dev/null; }
}

test_tasks_outside_the_bundle_contract_are_refused_before_anything_is_allocated()
{
  trap net_cleanup EXIT
  site_ws --arch mlp:32 --classes 10 --epochs 1 || return
  expect_in ws/clients/site-1/join.json '"contract"'
  coordinator contract --settle 2 || return
  site
  site_baseline
  finish_coordinator
  # Before: 4.3 GiB and 44 s in the trainer for the 136-byte model; mlp:1024,1024 trained.
  report contract "cls(100) == ['bad-model'] and 'fedl.classes' in said(100)" "a 2^24-class model was not refused"
  report contract "cls(101) == ['bad-model'] and 'fedl.arch' in said(101)" "another architecture was not refused"
  report contract "cls(102) == ['bad-model']" "a model of 1 class was not refused"
  report contract "cls(103) == ['bad-model']" "a deeply nested model header was not refused"
  report contract "cls(104) == ['bad-model'] and 'base_sha256' in said(104)" "a false base_sha256 was not refused"
  report contract "cls(105) == ['bad-settings'] and 'epochs' in said(105)" "100000 epochs were not refused"
  report contract "cls(106) == ['bad-settings'] and 'shuffle' in said(106)" "an unknown setting was not refused"
  report contract "all(float(n.split(' in ')[1].split()[0]) < 3 * $TIME_SCALE for n in j['notes'] if ': error in ' in n)" \
    "a refusal took 3 s or more"
  report contract "[f['type'] for f in answers(200)] == ['update']" "the task within the contract was not trained"
  report contract "cls(201) == ['bad-settings'] and 'round' in said(201)" "a task for an earlier round was not refused"
  # The site's update names the base it hashed itself.
  report contract "answers(200)[0]['meta']['fedl.base_sha256'] == '$(sha256sum ws/models/global-000000.safetensors | cut -c1-64)'" \
    "the update's fedl.base_sha256 is not the model's hash"
  kill -0 "$SITE" 2>/dev/null || fail "fedl join ended"
  growth_under 16 "the hostile tasks"
}

test_error_reports_tell_the_coordinator_a_class_and_nothing_of_the_data()
{
  trap net_cleanup EXIT
  # The model has 3 classes; the site's labels go to 9: refused at start, before connecting.
  site_ws --arch logreg --classes 3 --epochs 1 || return
  timeout 20 "$FEDL" join ws/clients/site-1 --data digits-train.csv --no-header --server 127.0.0.1:1 >out 2>err
  local rc=$?
  [[ $rc == 2 ]] || { fail "join on labels past the classes: exit $rc, expected 2"; cat err; }
  expect_in err "digits-train.csv: line 4: label 3, where the federation's model has 3 classes"
  # Data that fits at start and is replaced while the site runs: the trainer fails on a row's
  # label at the task.
  mv digits-train.csv digits-all.csv
  awk -F, '$NF < 3' digits-all.csv >digits-train.csv
  coordinator labels --settle 2 || return
  site
  wait_log site.log "connected to" 20 || return
  cp digits-all.csv digits-new.csv && mv digits-new.csv digits-train.csv
  finish_coordinator
  report labels "cls(300) == ['data-mismatch']" "the failure was not classed data-mismatch"
  # Before: ".../site-1.csv: line 4: label 3 is outside the model's 3 classes".
  report labels "not any(w in said(300) for w in ('line', 'label', 'digits-train.csv', '$PWD'))" \
    "the error report carries the site's data or paths"
  expect_in site.log "is outside the model's 3 classes" # the detail stays in the site's own log
}

test_a_task_sent_twice_is_trained_once_and_the_budget_holds()
{
  trap net_cleanup EXIT
  site_ws --arch logreg --classes 10 --epochs 1 --dp-noise-multiplier 1.0 --dp-max-grad-norm 1.0 || return
  # A budget that one run fits and two do not.
  local n q steps one two
  n=$(wc -l <digits-train.csv)
  q=$("$PY" -c "print(32 / $n)")
  steps=$(((n + 31) / 32))
  one=$("$FEDL" --json audit --privacy-calc --sample-rate "$q" --noise-multiplier 1.0 --steps "$steps" --delta 1e-5 |
    "$PY" -c 'import json,sys; print(json.load(sys.stdin)["epsilon"])')
  two=$("$FEDL" --json audit --privacy-calc --sample-rate "$q" --noise-multiplier 1.0 --steps $((2 * steps)) \
    --delta 1e-5 | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["epsilon"])')
  local budget
  budget=$("$PY" -c "print(($one + $two) / 2)")
  coordinator dp || return
  site --max-epsilon "$budget"
  finish_coordinator
  report dp "cls(400) == ['bad-settings'] and 'without DP-SGD' in said(400)" "a task without DP-SGD was not refused"
  report dp "cls(401) == ['bad-settings'] and 'noise multiplier' in said(401)" "noise 1e-9 was not refused"
  report dp "cls(402) == ['bad-settings'] and 'delta' in said(402)" "delta 0.9 was not refused"
  report dp "all([f['type'] for f in answers(500 + i)] == ['update'] for i in range(20))" "zero-epoch tasks not answered"
  # Before: task 600 sent twice while it trained was trained and sent twice.
  # The second copy is ignored if it arrives while the first trains, and answered with the same
  # bytes if it arrives just after; the third always gets the same bytes again.
  report dp "len(answers(600)) in (2, 3) and {f['type'] for f in answers(600)} == {'update'}" \
    "task 600, asked three times, was not answered two or three times with updates"
  report dp "len({f['sha256'] for f in answers(600)}) == 1" "task 600 asked again got other bytes (trained again)"
  report dp "cls(601) == ['budget']" "a run past the budget was not refused"
  expect_exit "$SITE" $((30 * TIME_SCALE)) 4 "fedl join"
  # One run in the site's account: the zero-epoch runs and the repeated task spent nothing.
  check_py "sum(1 for l in open('ws/clients/site-1/privacy.jsonl') if '\"spent\"' in l) == 1" \
    "privacy.jsonl does not hold exactly one run"
}

test_a_huge_task_body_is_refused_at_its_prefix()
{
  trap net_cleanup EXIT
  site_ws --arch mlp:32 --classes 10 --epochs 1 || return
  coordinator big-body --settle 2 || return
  site
  site_baseline
  finish_coordinator
  # Before: the site accepted bodies of up to 16 GiB and waited for the rest.
  report big-body "j['closed'] != 'timeout'" "the site did not drop a 3 GiB task body"
  expect_in site.log "task frame body of 3221225472 bytes is over the limit"
  growth_under 16 "a 3 GiB task announced"
}

test_the_trainer_stops_at_the_deadline_a_newer_task_or_a_lost_connection()
{
  trap net_cleanup EXIT
  site_ws --arch logreg --classes 10 --epochs 20000 || return
  coordinator deadline || return
  site
  finish_coordinator
  # Before: 20000 epochs went on for minutes whatever the deadline, and the next task waited.
  report deadline "cls(800) == ['internal'] and 'deadline' in said(800)" "the deadline did not stop the trainer"
  report deadline "float([n for n in j['notes'] if 'deadline:' in n][0].split('after ')[1].split()[0]) < 15 * $TIME_SCALE" \
    "the trainer ran far past the deadline"
  report deadline "[f['type'] for f in answers(801)] == []" "the replaced task was answered"
  report deadline "[f['type'] for f in answers(802)] == ['update']" "the newer task was not trained"
  report deadline "float([n for n in j['notes'] if 'newer:' in n][0].split('after ')[1].split()[0]) < 20 * $TIME_SCALE" \
    "the newer task waited for the older one"
  report deadline "j['connections'] == 2" "the site did not connect again"
  expect_in site.log "stopping the trainer: lost the coordinator"
}

test_a_coordinator_that_stops_reading_is_dropped()
{
  trap net_cleanup EXIT
  # 1.1M parameters: an update of 4.4 MB, more than the socket buffers between the two.
  site_ws --arch mlp:1024,1024 --classes 10 --epochs 1 || return
  coordinator no-read --rcvbuf 4096 --settle 2 || return
  site
  site_baseline
  finish_coordinator
  # Before: updates queued without limit (478 of them, 2 GiB) and the connection stayed up.
  report no-read "any('the site closed' in n for n in j['notes'])" "the site kept a coordinator that does not read"
  expect_in site.log "the coordinator took nothing of the"
  # Three tasks of 4.4 MB and their updates.
  growth_under 64 "a coordinator that stopped reading"
}

test_a_bundle_altered_after_init_is_refused()
{
  site_ws --arch mlp:32 --classes 10 --epochs 1 || return
  local join=ws/clients/site-1/join.json
  cp "$join" join.orig
  # A looser contract written into the bundle: the CA's signature no longer matches.
  "$PY" -c "import json; j = json.load(open('$join')); j['contract']['max_epochs'] = 100000; json.dump(j, open('$join', 'w'))"
  fedl_expect 3 join ws/clients/site-1 --data digits-train.csv --no-header --server 127.0.0.1:1 --retry-for 1
  expect_in err "not signed by the federation's CA"
  # The signature removed, as if the bundle came from an older fedl.
  "$PY" -c "import json; j = json.load(open('join.orig')); del j['signature']; json.dump(j, open('$join', 'w'))"
  fedl_expect 3 join ws/clients/site-1 --data digits-train.csv --no-header --server 127.0.0.1:1 --retry-for 1
  expect_in err "it has a contract but no signature"
  # Unaltered, it gets as far as the (absent) coordinator.
  cp join.orig "$join"
  fedl_expect 1 join ws/clients/site-1 --data digits-train.csv --no-header --server 127.0.0.1:1 --retry-for 1
  expect_in err "gave up after"
}
