# SPDX-License-Identifier: Apache-2.0
# Differential privacy end to end: DP-SGD in fedl train and in the sites' tasks, the epsilon they
# report, client-level DP and the federation's budget at fedl serve (exit 4), a site's own budget
# in DIR/privacy.jsonl (exit 4; deleted or altered: refused), and fedl audit recomputing every
# recorded epsilon (exit 3 when a re-signed ledger lies).

# shellcheck source=../net_lib.bash
source "$FEDL_SOURCE_DIR/tests/e2e/net_lib.bash"

# calc Q SIGMA STEPS: epsilon at delta 1e-5 from fedl audit --privacy-calc.
calc()
{
  "$FEDL" --json audit --privacy-calc --sample-rate "$1" --noise-multiplier "$2" --steps "$3" --delta 1e-5 |
    "$PY" -c 'import json, sys; print(json.load(sys.stdin)["epsilon"])'
}

test_train_with_dp_sgd_reports_and_signs_its_epsilon()
{
  zcat "$DATA/digits.csv.gz" | head -1000 >d.csv
  fedl_expect 0 --json train --data d.csv --no-header --arch mlp:32 --epochs 2 --batch-size 50 --lr 0.05 --threads 1 \
    --dp-noise-multiplier 1.1 --dp-max-grad-norm 1.0 --out u.st || return
  # q = 50 / 1000, 2 epochs of 20 steps; epsilon as the calculator computes it.
  [[ $(json_get out "(j['dp']['sample_rate'], j['dp']['steps'], j['dp']['noise_multiplier'], j['dp']['delta'])") == \
    "(0.05, 40, 1.1, 1e-05)" ]] || fail "dp report: $(cat out)"
  check_py "abs($(json_get out "j['dp']['epsilon']") - $(calc 0.05 1.1 40)) < 1e-9" "epsilon differs from the calculator"
  # The update carries the report in its (signed) metadata.
  "$PY" -c "
import json, sys
sys.path.insert(0, '$FEDL_SOURCE_DIR/tests/e2e')
import st_read
_, meta = st_read.read('u.st')
dp = json.loads(meta['fedl.dp'])
assert dp['steps'] == 40 and dp['sample_rate'] == 0.05, dp
assert 'fedl.loss' not in meta, 'the loss of private data left the site'
" || fail "fedl.dp metadata missing or wrong"
  fedl_expect 0 train --data d.csv --no-header --arch mlp:32 --epochs 1 --batch-size 50 --threads 1 \
    --dp-noise-multiplier 1.1 --dp-max-grad-norm 1.0 --dp-delta 1e-6 --save-model m.st || return
  expect_in out "DP-SGD: epsilon"
  expect_in out "at delta 1e-06 (sample rate 0.05, noise multiplier 1.1, clip 1, 20 steps)"
}

test_train_refuses_bad_dp_settings()
{
  zcat "$DATA/digits.csv.gz" | head -100 >d.csv
  local base=(train --data d.csv --no-header --arch logreg --save-model m.st --threads 1)
  local args
  while IFS='|' read -r args message; do
    # shellcheck disable=SC2086
    fedl_expect 2 "${base[@]}" $args || continue
    expect_in err "$message"
  done <<'END'
--dp-noise-multiplier 0 --dp-max-grad-norm 1|--dp-noise-multiplier must be a positive number, not 0
--dp-noise-multiplier -1 --dp-max-grad-norm 1|--dp-noise-multiplier must be a positive number, not -1
--dp-noise-multiplier 1 --dp-max-grad-norm 0|--dp-max-grad-norm must be a positive number, not 0
--dp-noise-multiplier 1 --dp-max-grad-norm -2|--dp-max-grad-norm must be a positive number
--dp-noise-multiplier 1 --dp-max-grad-norm 1 --dp-delta 0|--dp-delta must be between 0 and 1 (exclusive), not 0
--dp-noise-multiplier 1 --dp-max-grad-norm 1 --dp-delta 1|--dp-delta must be between 0 and 1 (exclusive), not 1
--dp-noise-multiplier 1 --dp-max-grad-norm 1 --dp-delta 1.5|--dp-delta must be between 0 and 1
--dp-noise-multiplier 1|DP-SGD needs both --dp-noise-multiplier S and --dp-max-grad-norm C
--dp-max-grad-norm 1|DP-SGD needs both
--dp-delta 1e-6|--dp-delta is the delta of DP-SGD
--dp-noise-multiplier 1 --dp-max-grad-norm 1 --batch-size 101|--batch-size 101 is larger than the 100 samples
END
  # The sample rate of the calculator.
  fedl_expect 2 audit --privacy-calc --sample-rate 1.5 --noise-multiplier 1 --steps 10 --delta 1e-5
  fedl_expect 2 audit --privacy-calc --sample-rate 0 --noise-multiplier 1 --steps 10 --delta 1e-5
  # fedl.json's training.dp is checked where it is read, naming the file.
  "$FEDL" -q init ws --clients 1 --arch logreg --input-dim 64 --classes 10 >/dev/null 2>&1 || fail "init failed"
  "$PY" - <<'PY'
import json
c = json.load(open("ws/fedl.json"))
c["training"]["dp"] = {"noise_multiplier": 1.0, "max_grad_norm": -1.0, "delta": 1e-5}
json.dump(c, open("ws/fedl.json", "w"))
PY
  fedl_expect 2 serve ws --listen 127.0.0.1:0
  expect_in err "fedl.json: training: dp.max_grad_norm must be a positive number"
}

# A workspace whose tasks train with DP-SGD: 2 sites of the digits, mlp:32, batch 32, 1 epoch.
dp_init()
{
  net_init 2 "$1" --dp-noise-multiplier 1.0 --dp-max-grad-norm 1.0 --batch-size 32 --momentum 0.9 \
    --min-clients 1 "${@:2}"
}

test_offline_rounds_require_the_federation_dp_sgd_and_audit_recomputes_it()
{
  dp_init 3 || return
  local s=ws/clients/site-1
  fedl_expect 0 -q train --model ws/models/global-000000.safetensors --data "$s/data/train.csv" --no-header \
    --identity "$s" --out plain.st --threads 1 || return
  fedl_expect 0 -q train --model ws/models/global-000000.safetensors --data "$s/data/train.csv" --no-header \
    --identity "$s" --out weak.st --threads 1 --dp-noise-multiplier 0.5 --dp-max-grad-norm 1.0 || return
  fedl_expect 3 aggregate --workspace ws plain.st
  expect_in err "trained without DP-SGD (no fedl.dp)"
  expect_in err "but fedl.json's training asks for noise multiplier 1 and clip 1"
  fedl_expect 3 aggregate --workspace ws weak.st
  expect_in err "weaker than fedl.json's 1 and 1"
  fedl_expect 0 -q train --model ws/models/global-000000.safetensors --data "$s/data/train.csv" --no-header \
    --identity "$s" --out dp.st --threads 1 --dp-noise-multiplier 1.0 --dp-max-grad-norm 1.0 --batch-size 32 || return
  fedl_expect 0 aggregate --workspace ws dp.st || return
  local n steps
  n=$(wc -l <"$s/data/train.csv")
  steps=$(( (n + 31) / 32 ))
  expect_ledger "R[0]['privacy']['sites']['site-1']['steps'] == $steps" "site-1's steps are not $steps"
  check_py "abs($(ledger "R[0]['privacy']['sites']['site-1']['total_epsilon']") - $(calc "$(check_q 32 "$n")" 1.0 "$steps")) < 1e-9" \
    "the recorded epsilon is not the calculator's"
  fedl_expect 0 audit ws || return
  expect_in out "site epsilon up to"
}

# check_q B N: B / N as Python prints it.
check_q()
{
  "$PY" -c "print($1 / $2)"
}

test_client_level_budget_stops_the_federation_with_exit_4_and_audit_recomputes()
{
  trap net_cleanup EXIT
  net_init 2 10 --min-clients 2 || return
  # Both sites every round (q = 1), sigma 2: a budget between the 3rd and the 4th round's epsilon.
  local e3 e4 budget
  e3=$(calc 1 2 3) && e4=$(calc 1 2 4) || { fail "calc failed"; return; }
  budget=$("$PY" -c "print(($e3 + $e4) / 2)")
  serve_bg --dp-clip-norm 1 --dp-noise-multiplier 2 --max-epsilon "$budget" --round-timeout 60
  join_bg site-1
  join_bg site-2
  expect_exit "$SERVE" 90 4 "fedl serve"
  expect_in serve.out "stopped after round 3: the privacy budget allows no further round"
  expect_in serve.log "round 4 would take the federation's epsilon to"
  expect_ledger "[b['round'] for b in R] == [1, 2, 3]" "rounds are not 1..3"
  expect_ledger "L[-1]['kind'] == 'finished' and L[-1]['body']['reason'] == 'privacy-budget'" "no privacy-budget entry"
  expect_ledger "abs(R[2]['privacy']['client']['epsilon'] - $e3) < 1e-9 and R[2]['privacy']['client']['sample_rate'] == 1" \
    "round 3's epsilon is not $e3"
  expect_ledger "abs(L[-1]['body']['next_round_epsilon'] - $e4) < 1e-9" "the stop does not record the next epsilon"
  wait_exit "${JOIN[site-1]}" 30
  [[ $RC == 0 ]] || fail "site-1 ended with $RC after the federation finished"
  fedl_expect 0 audit ws || return
  expect_in out "client-level epsilon"
  expect_in out "stopped after round 3"
  # --json has every round's figures that the text shows: accuracy, loss, epsilon (it had none).
  fedl_expect 0 --json audit ws || return
  check_py "abs($(json_get out "j['rounds'][2]['epsilon']") - $e3) < 1e-9" "round 3's epsilon in audit --json"
  check_py "all(0 < r['accuracy'] <= 1 and r['loss'] > 0 and r['seconds'] > 0 and r['asked'] == 2 for r in $(json_get out "j['rounds']"))" \
    "rounds in audit --json: $(json_get out "j['rounds']")"
  check_py "$(json_get out "sorted(j['rounds'][0]['site_metrics'])") == ['site-1', 'site-2']" "site_metrics in audit --json"
  # ... and as CSV for a spreadsheet, the same figures.
  cp out audit.json
  fedl_expect 0 audit ws --csv || return
  "$PY" - out audit.json <<'PY' || fail "audit --csv: $(cat out)"
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1])))
j = json.load(open(sys.argv[2]))
assert [int(r["round"]) for r in rows] == [1, 2, 3], rows
for r, g in zip(rows, j["rounds"]):
    assert abs(float(r["epsilon"]) - g["epsilon"]) < 1e-9 and abs(float(r["accuracy"]) - g["accuracy"]) < 1e-12, (r, g)
    assert r["sites"] == "site-1;site-2" and r["participants"] == "2" and r["asked"] == "2", r
PY
  fedl_expect 2 --json audit ws --csv

  # Started again without client-level DP, or with less noise: refused, the rounds so far had it.
  fedl_expect 2 serve ws --threads 1
  expect_in err "rounds up to 3 ran with client-level DP (clip 1, noise multiplier 2, budget"
  fedl_expect 2 serve ws --threads 1 --dp-clip-norm 1 --dp-noise-multiplier 1 --max-epsilon "$budget"
  # Nor may fedl aggregate --workspace make a round without the noise.
  fedl_expect 2 aggregate --workspace ws nothing.st
  expect_in err "its rounds are made by fedl serve, which adds the noise and keeps the budget"

  # Started again: the budget is already spent; exit 4 at once, and the stop is not recorded twice.
  fedl_expect 4 serve ws --threads 1 --dp-clip-norm 1 --dp-noise-multiplier 2 --max-epsilon "$budget"
  expect_in err "privacy budget allows no further round: epsilon"
  expect_ledger "[e['kind'] for e in L].count('finished') == 1" "the stop was recorded twice"

  # A re-signed ledger whose chain and signatures verify, but whose epsilon lies: exit 3.
  cp ws/ledger.jsonl ledger.orig
  "$PY" "$FEDL_SOURCE_DIR/tests/e2e/resign_ledger.py" ws "" || { fail "re-signing failed"; return; }
  fedl_expect 0 audit ws || { fail "a ledger re-signed unchanged does not audit: the test's signer is wrong"; return; }
  "$PY" "$FEDL_SOURCE_DIR/tests/e2e/resign_ledger.py" ws \
    "[e for e in L if e['kind'] == 'round'][1]['body']['privacy']['client']['epsilon'] *= 0.5" || return
  fedl_expect 3 audit ws
  expect_in err "round 2: privacy.client: records epsilon"

  # Each round names its accountant (PLD by default); one this fedl does not know is refused, and
  # so is a change of accountant that the ledger does not record.
  cp ledger.orig ws/ledger.jsonl
  expect_ledger "all(b['privacy']['accountant'] == 'pld-v1' for b in R)" "rounds do not record the PLD accountant"
  "$PY" "$FEDL_SOURCE_DIR/tests/e2e/resign_ledger.py" ws \
    "[e for e in L if e['kind'] == 'round'][0]['body']['privacy']['accountant'] = 'pld-v9'" || return
  fedl_expect 3 audit ws
  expect_in err "round 1: privacy: accountant \"pld-v9\" is not one this fedl knows"
  cp ledger.orig ws/ledger.jsonl
  "$PY" "$FEDL_SOURCE_DIR/tests/e2e/resign_ledger.py" ws \
    "[e for e in L if e['kind'] == 'round'][2]['body']['privacy']['accountant'] = 'rdp-v2'" || return
  fedl_expect 3 audit ws
  expect_in err "round 3: privacy: accounts with rdp-v2 after rounds accounted with pld-v1, and does not record the change"

  # A ledger from before accountants were recorded: no "accountant", RDP at TF Privacy's orders
  # (rdp-v1), as the fedl of November 2026 wrote it. It still audits clean, recomputed by RDP.
  cp ledger.orig ws/ledger.jsonl
  "$PY" "$FEDL_SOURCE_DIR/tests/e2e/resign_ledger.py" ws "$(cat <<'PYEOF'
import math
orders = [1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5] + list(range(5, 64)) + [128, 256, 512]
for n, e in enumerate([e for e in L if e['kind'] == 'round'], 1):
    e['body']['privacy'].pop('max_epsilon')  # this budget sat between PLD's 3rd and 4th round
    c = e['body']['privacy'].pop('accountant') and e['body']['privacy']['client']
    # q = 1: RDP of order a is a / (2 sigma^2) per round (Balle et al. 2020's conversion).
    c['epsilon'], c['order'] = min((n * a / (2 * 2.0 ** 2) - (math.log(1e-5) + math.log(a)) / (a - 1) + math.log((a - 1) / a), a) for a in orders)
PYEOF
)" || return
  fedl_expect 0 audit ws || return
  expect_in out "(recomputed, rdp-v1)"
}

test_a_change_of_accountant_is_recorded_and_audits()
{
  trap net_cleanup EXIT
  net_init 2 1 --min-clients 2 --dp-noise-multiplier 1 --dp-max-grad-norm 1 || return
  # Round 1 by RDP (serve --accountant rdp), site-1 keeping its own account by RDP too.
  serve_bg --dp-clip-norm 1 --dp-noise-multiplier 2 --accountant rdp --round-timeout 60
  join_bg site-1 --accountant rdp --max-epsilon 100
  join_bg site-2
  expect_exit "$SERVE" 120 0 "fedl serve (round 1)"
  wait_exit "${JOIN[site-1]}" 30
  wait_exit "${JOIN[site-2]}" 30
  expect_ledger "R[0]['privacy']['accountant'] == 'rdp-v2' and 'order' in R[0]['privacy']['client']" \
    "round 1 does not record rdp-v2"
  grep -q '"accountant":"rdp-v2"' ws/clients/site-1/privacy.jsonl || fail "site-1's account does not record rdp-v2"
  # Round 2 by fedl.json's accountant (PLD): the change is logged and recorded, and the audit
  # recomputes each round by its own.
  serve_bg --rounds 2 --dp-clip-norm 1 --dp-noise-multiplier 2 --round-timeout 60
  join_bg site-1 --max-epsilon 100
  join_bg site-2
  expect_exit "$SERVE" 120 0 "fedl serve (round 2)"
  expect_in serve.log "the rounds up to 1 computed epsilon with rdp-v2; from round 2 on it is pld-v1"
  expect_ledger "R[1]['privacy']['accountant'] == 'pld-v1' and R[1]['privacy']['accountant_changed_from'] == 'rdp-v2'" \
    "round 2 does not record the change"
  expect_ledger "set(R[1]['privacy']['sites']) == {'site-1', 'site-2'}" "round 2 records no DP-SGD runs"
  grep -q '"accountant":"pld-v1"' ws/clients/site-1/privacy.jsonl || fail "site-1's account does not record pld-v1"
  fedl_expect 0 audit ws || return
  expect_in out "(recomputed, pld-v1)"
}

test_the_budget_from_fedl_json_is_refused_at_start()
{
  # fedl init records client-level DP and the budget in fedl.json; a budget below one round's
  # epsilon stops fedl serve at once (exit 4), before it listens, and the ledger says so.
  fedl_expect 0 -q init ws --clients 2 --arch logreg --input-dim 64 --classes 10 --client-dp-clip-norm 1 \
    --client-dp-noise-multiplier 1 --max-epsilon 0.01 || return
  [[ $(json_get ws/fedl.json "j['privacy']") == "{'accountant': 'pld', 'clip_norm': 1.0, 'delta': 1e-05, 'max_epsilon': 0.01, 'noise_multiplier': 1.0}" ]] ||
    fail "fedl.json privacy: $(cat ws/fedl.json)"
  fedl_expect 4 serve ws --listen 127.0.0.1:0
  expect_in err "would make it $("$PY" -c "print('%.4g' % $(calc 1 1 1))"), past --max-epsilon 0.01"
  expect_ledger "L[-1]['kind'] == 'finished' and L[-1]['body']['reason'] == 'privacy-budget'" "no privacy-budget entry"
  fedl_expect 0 audit ws || return
  fedl_expect 2 init ws2 --clients 1 --arch logreg --input-dim 64 --classes 10 --max-epsilon 3
  expect_in err "--max-epsilon budgets the federation's client-level DP"
  fedl_expect 2 init ws2 --clients 1 --arch logreg --input-dim 64 --classes 10 --client-dp-clip-norm 1
  expect_in err "--client-dp-noise-multiplier must be a positive number, not 0"
}

test_client_level_dp_refuses_bad_settings()
{
  net_init 2 1 || return
  local args
  while IFS='|' read -r args message; do
    # shellcheck disable=SC2086
    fedl_expect 2 serve ws --listen 127.0.0.1:0 $args || continue
    expect_in err "$message"
  done <<'END'
--dp-clip-norm 1|client-level DP needs both --dp-clip-norm C and --dp-noise-multiplier S
--dp-clip-norm 1 --dp-noise-multiplier 0|--dp-noise-multiplier must be a positive number, not 0
--dp-clip-norm 0 --dp-noise-multiplier 1|--dp-clip-norm must be a positive number, not 0
--dp-clip-norm 1 --dp-noise-multiplier 1 --delta 1|--delta must be between 0 and 1 (exclusive), not 1
--dp-clip-norm 1 --dp-noise-multiplier 1 --max-epsilon -1|--max-epsilon must be a positive number, not -1
--max-epsilon 5|--max-epsilon budgets the federation's client-level DP
--dp-clip-norm 1 --dp-noise-multiplier 1 --strategy median|client-level DP adds noise to a mean
END
}

# site_budget_init: a DP-SGD federation and BUDGET, an epsilon between what site-1 spends in 2
# and in 3 rounds.
site_budget_init()
{
  dp_init 6 || return
  local n steps q e2 e3
  n=$(wc -l <ws/clients/site-1/data/train.csv)
  steps=$(( (n + 31) / 32 ))
  q=$(check_q 32 "$n")
  e2=$(calc "$q" 1.0 $((2 * steps))) && e3=$(calc "$q" 1.0 $((3 * steps))) || { fail "calc failed"; return 1; }
  BUDGET=$("$PY" -c "print(($e2 + $e3) / 2)")
}

test_a_site_keeps_its_own_budget_and_refuses_past_it()
{
  trap net_cleanup EXIT
  site_budget_init || return
  serve_bg --round-timeout 60
  join_bg site-1 --max-epsilon "$BUDGET"
  join_bg site-2
  # site-1 trains rounds 1 and 2, refuses round 3 and says why; the federation goes on without it.
  expect_exit "${JOIN[site-1]}" 90 4 "site-1 (with a budget)"
  expect_in site-1.log "past its --max-epsilon"
  expect_exit "$SERVE" 120 0 "fedl serve"
  expect_ledger "sites(R[0]) == ['site-1', 'site-2'] and sites(R[1]) == ['site-1', 'site-2']" \
    "site-1 is not in rounds 1 and 2"
  expect_ledger "all(sites(b) == ['site-2'] for b in R[2:])" "site-1 trained past its budget"
  expect_ledger "any('refuses' in d['reason'] and d['site'] == 'site-1' for d in R[2]['dropped'])" \
    "the coordinator did not record why site-1 left"
  # Its account: a genesis entry and two spent entries, the last at the ledger's total.
  [[ $(grep -c '"kind":"spent"' ws/clients/site-1/privacy.jsonl) == 2 ]] || fail "privacy.jsonl: $(cat ws/clients/site-1/privacy.jsonl)"
  local recorded
  recorded=$(ledger "R[1]['privacy']['sites']['site-1']['total_epsilon']")
  "$PY" - "$recorded" <<'PY' || fail "the site's account and the coordinator's ledger disagree"
import json, sys
last = [json.loads(l) for l in open("ws/clients/site-1/privacy.jsonl")][-1]
assert abs(last["body"]["total_epsilon"] - float(sys.argv[1])) < 1e-9, (last, sys.argv[1])
PY
  fedl_expect 0 audit ws || return

  # Started again with a budget below what it has spent: exit 4 before connecting.
  fedl_expect 4 join ws/clients/site-1 --data ws/clients/site-1/data/train.csv --no-header \
    --max-epsilon "$(ledger "R[1]['privacy']['sites']['site-1']['total_epsilon'] * 0.9")" --retry-for 5
  expect_in err "site site-1 has spent its privacy budget"
}

test_a_deleted_or_altered_budget_file_is_refused()
{
  trap net_cleanup EXIT
  site_budget_init || return
  serve_bg --round-timeout 60 --rounds 2
  join_bg site-1 --max-epsilon 100
  join_bg site-2
  expect_exit "$SERVE" 90 0 "fedl serve"
  expect_exit "${JOIN[site-1]}" 30 0 "site-1"
  local acct=ws/clients/site-1/privacy.jsonl
  [[ $(grep -c '"kind":"spent"' "$acct") == 2 ]] || { fail "site-1 did not account 2 rounds"; return; }
  cp "$acct" acct.orig

  # Altered (a step count lowered): refused before connecting, exit 3, and said why.
  sed -i '3s/"steps":\([0-9]*\)/"steps":1/' "$acct"
  fedl_expect 3 join ws/clients/site-1 --data ws/clients/site-1/data/train.csv --no-header --max-epsilon 100 \
    --retry-for 5
  expect_in err "privacy.jsonl"
  expect_in err "the site's privacy account was altered or damaged"

  # Cut short (the last run removed: the chain alone still verifies) or deleted: the coordinator's
  # ledger records more, so the site refuses, tells the coordinator, and exits 3.
  serve_bg --round-timeout 60 --rounds 4
  head -2 acct.orig >"$acct"
  "$FEDL" join ws/clients/site-1 --data ws/clients/site-1/data/train.csv --no-header --max-epsilon 100 \
    --retry-max 1 --retry-for 20 >cut.out 2>cut.log
  [[ $? == 3 ]] || fail "join with a shortened account did not exit 3"
  expect_in cut.log "records 1 runs, but the coordinator's ledger records 2 DP-SGD runs of this site"
  rm "$acct"
  "$FEDL" join ws/clients/site-1 --data ws/clients/site-1/data/train.csv --no-header --max-epsilon 100 \
    --retry-max 1 --retry-for 20 >del.out 2>del.log
  [[ $? == 3 ]] || fail "join without its account did not exit 3"
  expect_in del.log "privacy.jsonl is missing, but the coordinator's ledger records 2 DP-SGD runs"
  wait_log serve.log "site site-1 reports: site site-1 refuses to train" 10
  [[ -e $acct ]] && fail "the refusal wrote an account"
  # Restored from the backup: it trains again.
  cp acct.orig "$acct"
  join_bg site-1 --max-epsilon 100
  join_bg site-2
  expect_exit "$SERVE" 90 0 "fedl serve after the account was restored"
  [[ $(grep -c '"kind":"spent"' "$acct") == 4 ]] || fail "site-1 did not account rounds 3 and 4"
}
