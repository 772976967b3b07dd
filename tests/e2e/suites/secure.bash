# SPDX-License-Identifier: Apache-2.0
# Secure aggregation (SecAgg+) through fedl serve and fedl join over mutual TLS on 127.0.0.1: the
# coordinator learns each round's sum only, sites that die after masking are unmasked from the
# survivors' shares, too few survivors make the round run again with fresh keys, and what a
# hostile site sends drops that site alone.

# shellcheck source=../net_lib.bash
source "$FEDL_SOURCE_DIR/tests/e2e/net_lib.bash"

# run_federation SITES ROUNDS [SERVE ARGS...]: every site joins; waits for serve and the joins to end.
run_federation()
{
  local sites=$1 rounds=$2 k
  shift 2
  serve_bg --min-clients "$sites" --json "$@"
  for ((k = 1; k <= sites; k++)); do join_bg "site-$k"; done
  expect_exit "$SERVE" 120 0 "fedl serve"
  for ((k = 1; k <= sites; k++)); do expect_exit "${JOIN[site-$k]}" 30 0 "fedl join site-$k"; done
  [[ $FAILED == 0 ]] || { tail -20 serve.log; return 1; }
  expect_rounds "$rounds"
}

test_secure_federation_learns_as_the_plain_one_and_audits()
{
  trap net_cleanup EXIT
  net_init 5 10 || return
  run_federation 5 10 || return
  local plain
  plain=$(json_get serve.out "j['accuracy']")
  mv ws ws-plain
  net_init 5 10 --secure-aggregation || return
  expect_in ws/fedl.json '"secure_aggregation"'
  run_federation 5 10 || return
  local secure
  secure=$(json_get serve.out "j['accuracy']")
  echo "accuracy after 10 rounds: $plain without secure aggregation, $secure with"
  check_py "abs($secure - $plain) <= 0.01" "accuracy $secure with secure aggregation, $plain without"
  expect_in serve.log "secure aggregation over 5 sites, threshold 3, 4 neighbours each"
  local everyone="['site-1', 'site-2', 'site-3', 'site-4', 'site-5']"
  expect_ledger "all(sorted(b['secure_aggregation']['survivors']) == $everyone for b in R)" "a round without all five survivors"
  expect_ledger "all(m['model_policy'] == 'inspect' for b in R for m in b['secure_aggregation']['masked_inputs'])" \
    "a masked input without its site's model policy"
  expect_ledger "all(len(m['sha256']) == 64 for b in R for m in b['secure_aggregation']['masked_inputs'])" \
    "a masked input without its SHA-256"
  expect_ledger "all(sites(b) == $everyone for b in R)" "a round whose participants are not the survivors"
  # Nothing of one site's update: no sample count, no loss, no update file.
  expect_ledger "all(m == {} for b in R for m in b['site_metrics'].values())" "a site's metrics were recorded"
  expect_ledger "all('num_samples' not in p for b in R for p in b['participants'])" "a site's sample count was recorded"
  [[ -z $(ls -A ws/state/incoming) ]] || fail "files left in ws/state/incoming: $(ls ws/state/incoming)"
  "$FEDL" audit ws >audit.out 2>&1 || { fail "fedl audit failed"; cat audit.out; }
  expect_in audit.out "secure aggregation"
  # A re-signed ledger whose chain and signatures verify, but whose secure record lies: exit 3.
  local resign=("$PY" "$FEDL_SOURCE_DIR/tests/e2e/resign_ledger.py" ws)
  cp ws/ledger.jsonl ledger.orig
  "${resign[@]}" "[e for e in L if e['kind'] == 'round'][2]['body']['secure_aggregation']['survivors'].pop()" || return
  fedl_expect 3 audit ws && expect_in err "round 3's secure_aggregation names other survivors than the round's participants"
  cp ledger.orig ws/ledger.jsonl
  "${resign[@]}" "[e for e in L if e['kind'] == 'round'][2]['body']['secure_aggregation']['masked_inputs'][0]['sha256'] = 'x'" ||
    return
  fedl_expect 3 audit ws && expect_in err "round 3's secure_aggregation lists a masked input twice or without its SHA-256"
  cp ledger.orig ws/ledger.jsonl
  "${resign[@]}" "[e for e in L if e['kind'] == 'round'][2]['body']['secure_aggregation']['threshold'] = 6" || return
  fedl_expect 3 audit ws && expect_in err "round 3's secure_aggregation has 5 survivors, below its threshold 6"
  cp ledger.orig ws/ledger.jsonl

  # A restart may not turn it off.
  "$PY" - <<'PY'
import json
c = json.load(open("ws/fedl.json"))
del c["secure_aggregation"]
c["rounds"] = 11
json.dump(c, open("ws/fedl.json", "w"))
PY
  fedl_expect 2 serve ws --min-clients 5 && expect_in err "round 10 ran with secure aggregation"
}

# kill_after_masking VICTIMS...: of 6 sites, the victims send their masked input for a round and
# are then killed with -9 while the others' trainers are held: the round completes from the
# survivors' shares, and the victims' inputs are in it.
kill_after_masking()
{
  local victims=("$@") k v
  # Many rounds: a round of this model takes some 20 ms, and the trainers are held mid-federation.
  net_init 6 30 --secure-aggregation || return
  serve_bg --min-clients 4 --heartbeat 1
  for k in 1 2 3 4 5 6; do join_bg "site-$k"; done
  wait_for 60 eval "[[ \$(ledger 'len(R)') -ge 1 ]]" || { fail "no round completed"; tail serve.log; return; }
  local held=() t
  for k in 1 2 3 4; do
    t=$(trainer_of "${JOIN[site-$k]}")
    [[ -n $t ]] || { fail "site-$k has no trainer"; return; }
    kill -STOP "$t"
    held+=("$t")
  done
  # The round the held sites cannot finish, once the victims have sent their inputs for it.
  local round
  wait_for 30 eval "round=\$((\$(ledger 'len(R)') + 1)); $(for v in "${victims[@]}"; do printf 'grep -q "round $round: masked input sent" %s.log && ' "$v"; done) true" ||
    { fail "the victims sent no masked input"; return; }
  round=$(($(ledger 'len(R)') + 1))
  sleep 0.5
  [[ $(ledger 'len(R)') == $((round - 1)) ]] || { fail "round $round completed while sites were held"; return; }
  for v in "${victims[@]}"; do
    kill -9 "${JOIN[$v]}"
    expect_exit "${JOIN[$v]}" 10 137 "the killed fedl join $v"
  done
  kill -CONT "${held[@]}"
  expect_exit "$SERVE" 90 0 "fedl serve"
  for k in 1 2 3 4; do expect_exit "${JOIN[site-$k]}" 30 0 "fedl join site-$k"; done
  expect_rounds 30
  local gone
  gone=$(printf "'%s', " "${victims[@]}")
  expect_ledger "[sorted(b['secure_aggregation']['dropped_after_masking']) for b in R if b['round'] == $round] == [sorted([$gone])]" \
    "round $round does not record the victims as dropped after masking"
  expect_ledger "[len(b['secure_aggregation']['survivors']) for b in R if b['round'] == $round] == [6]" \
    "round $round's sum does not hold all six inputs"
  expect_ledger "all(len(b['secure_aggregation']['survivors']) == 6 - ${#victims[@]} for b in R if b['round'] > $round)" \
    "a later round with other than the sites left"
  expect_ledger "not F" "a round attempt failed"
}

test_a_site_killed_after_masking_is_unmasked_from_the_others()
{
  trap net_cleanup EXIT
  kill_after_masking site-5
}

test_two_sites_killed_after_masking_are_unmasked_from_the_others()
{
  trap net_cleanup EXIT
  kill_after_masking site-5 site-6
}

test_below_the_threshold_the_round_is_retried_with_fresh_keys()
{
  trap net_cleanup EXIT
  # 4 sites, quorum 3: a sum needs 3 signatures of the survivor list; with two of them gone after
  # masking only two can sign, and the attempt fails.
  net_init 4 30 --secure-aggregation || return
  serve_bg --min-clients 3 --heartbeat 1
  local k
  for k in 1 2 3 4; do join_bg "site-$k"; done
  wait_for 60 eval "[[ \$(ledger 'len(R)') -ge 1 ]]" || { fail "no round completed"; tail serve.log; return; }
  local held=() t
  for k in 1 2; do
    t=$(trainer_of "${JOIN[site-$k]}")
    kill -STOP "$t"
    held+=("$t")
  done
  local round
  wait_for 30 eval "round=\$((\$(ledger 'len(R)') + 1)); grep -q \"round \$round: masked input sent\" site-3.log && grep -q \"round \$round: masked input sent\" site-4.log" ||
    { fail "site-3 and site-4 sent no masked input"; return; }
  round=$(($(ledger 'len(R)') + 1))
  kill -9 "${JOIN[site-3]}" "${JOIN[site-4]}"
  kill -CONT "${held[@]}"
  wait_for 60 eval "[[ \$(ledger 'len(F)') -ge 1 ]]" || { fail "no failed attempt recorded"; tail serve.log; return; }
  expect_ledger "F[0]['round'] == $round and 'secure aggregation' in F[0]['reason']" "the failed attempt does not say why"
  expect_ledger "'secure_aggregation' in F[0]" "the failed attempt has no secure_aggregation record"
  # The sites come back; the round runs again, with fresh keys, and the federation completes.
  join_bg site-3
  join_bg site-4
  expect_exit "$SERVE" 90 0 "fedl serve"
  for k in 1 2 3 4; do expect_exit "${JOIN[site-$k]}" 30 0 "fedl join site-$k"; done
  expect_rounds 30
  expect_ledger "[b['attempt'] for b in R if b['round'] == $round] != [1]" "round $round was not retried"
  expect_in serve.log "is not counted: secure aggregation"
}

test_a_site_sending_garbage_is_dropped_and_the_round_completes()
{
  trap net_cleanup EXIT
  net_init 4 6 --secure-aggregation || return
  serve_bg --min-clients 3 --heartbeat 1
  local k
  for k in 1 2 4; do join_bg "site-$k"; done
  wait_log serve.log "round 1/6 done" 60 || return
  # The peer, as site-3, waits for a task of a round that asks it; once with keys that its key did
  # not sign (it leaves that attempt), once with shares too short (its connection is dropped).
  peer secagg-garbage --bundle ws/clients/site-3 --case bad-keys --hold 1
  report_has "j.get('setup')" "the peer's task had no secure_aggregation setup"
  local round
  round=$(json_get "$REPORT" "j['round']")
  wait_log serve.log "site-3 leaves the secure aggregation: its keys are not signed with its certificate's key" 10
  peer secagg-garbage --bundle ws/clients/site-3 --case bad-shares --hold 5
  report_has "j.get('setup')" "the peer's second task had no secure_aggregation setup"
  wait_log serve.log "site site-3 disconnected: protocol error: bad secagg_shares frame header" 10
  expect_exit "$SERVE" 90 0 "fedl serve"
  for k in 1 2 4; do expect_exit "${JOIN[site-$k]}" 30 0 "fedl join site-$k"; done
  expect_rounds 6
  expect_ledger "all('site-3' not in sites(b) for b in R)" "site-3 took part"
  expect_ledger "any(d['site'] == 'site-3' for b in R if b['round'] == $round for d in b['dropped'])" \
    "round $round does not record site-3 as dropped"
}

test_client_level_dp_with_the_noise_at_the_coordinator_or_at_the_sites()
{
  trap net_cleanup EXIT
  local dp=(--client-dp-clip-norm 1 --client-dp-noise-multiplier 0.3)
  # The coordinator adds the noise after unmasking: each site clipped its own update.
  net_init 5 4 --secure-aggregation "${dp[@]}" || return
  run_federation 5 4 || return
  expect_ledger "all(b['privacy']['client']['noise_multiplier'] == 0.3 and b['privacy']['client']['epsilon'] > 0 for b in R)" \
    "a round without its client-level DP record"
  expect_ledger "all('distributed_dp' not in b['secure_aggregation'] for b in R)" "distributed DP without asking for it"
  expect_ledger "all(b['secure_aggregation']['total_weight'] == 5 for b in R)" "under client-level DP each site weighs 1"
  expect_ledger "all(m['clip_norm'] == 1 for b in R for m in b['secure_aggregation']['masked_inputs'])" \
    "a site's signed report does not say it clipped its update to the DP clip norm"
  mv ws ws-central
  # Distributed DP: each site adds its share of discrete Gaussian noise; nobody sees the sum without it.
  net_init 5 4 --secure-aggregation --distributed-dp "${dp[@]}" || return
  run_federation 5 4 || return
  expect_ledger "all(b['privacy']['client']['noise_multiplier'] == 0.3 for b in R)" "a round without its client-level DP record"
  expect_ledger "all(b['secure_aggregation']['distributed_dp']['noise_multiplier'] >= 0.3 for b in R)" \
    "the sites' noise is below the multiplier asked"
  expect_ledger "all(b['secure_aggregation']['distributed_dp']['noise'] > 0.3 / 5 ** 0.5 for b in R)" \
    "each site's share is not sized for the fewest sites a sum may hold"
  expect_in serve.log "distributed DP"
}

test_a_threshold_the_round_cannot_meet_fails_the_attempt_and_says_why()
{
  trap net_cleanup EXIT
  # 3 sites give each 2 neighbours: a threshold of 3 shares cannot be met. No plain task goes out;
  # the attempt is recorded as failed, with why, and tried again.
  net_init 3 2 --secure-aggregation --secagg-threshold 3 || return
  serve_bg --min-clients 3 --heartbeat 1
  local k
  for k in 1 2 3; do join_bg "site-$k"; done
  wait_for 60 eval "[[ \$(ledger 'len(F)') -ge 1 ]]" || { fail "no failed attempt recorded"; tail serve.log; return; }
  expect_ledger "'no secure aggregation could be set up' in F[0]['reason']" "the failed attempt does not say why"
  expect_in serve.log "secure aggregation cannot run this attempt: a secure-aggregation threshold of 3 needs at least 3 neighbours"
  # Once per attempt (not once per site asked); the next attempt's line may precede its entry.
  local logged failed
  logged=$(grep -c "secure aggregation cannot run this attempt" serve.log)
  failed=$(ledger 'len(F)')
  ((logged <= failed + 1)) || fail "the reason is logged $logged times for $failed failed attempts"
  expect_ledger "not R" "a round was made"
  expect_not_in site-1.log "update sent"
}

test_a_site_that_requires_secure_aggregation_sends_nothing_in_clear()
{
  trap net_cleanup EXIT
  net_init 3 2 || return
  serve_bg --min-clients 2 --heartbeat 1
  join_bg site-1 --require-secure-aggregation
  join_bg site-2
  join_bg site-3
  expect_exit "$SERVE" 60 0 "fedl serve"
  local k
  for k in 1 2 3; do expect_exit "${JOIN[site-$k]}" 30 0 "fedl join site-$k"; done
  expect_rounds 2
  expect_ledger "all(sites(b) == ['site-2', 'site-3'] for b in R)" "a round with site-1's update"
  expect_ledger "all(any(d['site'] == 'site-1' and 'require-secure-aggregation' in d['reason'] for d in b['dropped']) for b in R)" \
    "a round does not record why site-1 sent nothing"
  expect_not_in site-1.log "update sent"
}

test_what_secure_aggregation_cannot_go_with_is_refused()
{
  net_init 4 2 --secure-aggregation || return
  fedl_expect 2 serve ws --strategy median && expect_in err "median needs every update on its own"
  fedl_expect 2 serve ws --clip-norm 1 && expect_in err "--clip-norm clips each update at the coordinator"
  fedl_expect 2 serve ws --min-clients 2 && expect_in err "at least 3 sites in a round"
  fedl_expect 2 serve ws --secagg-threshold 1.5 && expect_in err "--secagg-threshold must be a fraction"
  fedl_expect 2 serve ws --secagg-range -1 && expect_in err "--secagg-range must be a positive number"
  fedl_expect 2 serve ws --distributed-dp && expect_in err "distributed DP has each site add its share"
  fedl_expect 2 init ws3 --clients 4 --arch mlp:32 --input-dim 4 --classes 3 --secure-aggregation --distributed-dp &&
    expect_in err "distributed DP has each site add its share of client-level DP's noise: it needs --client-dp-clip-norm"
  fedl_expect 2 init ws2 --clients 4 --arch mlp:32 --input-dim 4 --classes 3 --secure-aggregation --strategy krum:1 &&
    expect_in err "krum:1 needs every update on its own"
  fedl_expect 2 init ws2 --clients 4 --arch mlp:32 --input-dim 4 --classes 3 --secagg-threshold 3 &&
    expect_in err "turn it on with --secure-aggregation"
  mv ws ws-plain
  net_init 4 2 || return
  fedl_expect 2 serve ws --secagg-neighbours 4 && expect_in err "turn it on with --secure-aggregation"
}
