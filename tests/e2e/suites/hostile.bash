# SPDX-License-Identifier: Apache-2.0
# Hostile sites and strangers against fedl serve (THREAT-MODEL: availability and integrity): an
# enrolled site (tests/e2e/fedl_peer.py with a real bundle, signing its own updates) sends each
# of the updates and reports that once crashed, hung or bloated the coordinator, or got into the
# ledger unchecked; strangers hold bare TCP connections open; and sites' receipts catch a ledger
# that was rolled back or rewritten. Every case runs against a live federation of two honest
# sites, which must go on to the last round.

# shellcheck source=../net_lib.bash
source "$FEDL_SOURCE_DIR/tests/e2e/net_lib.bash"

# hostile CASE: site-3 (the peer) answers the next task the way CASE says; sets ROUND to its round.
hostile()
{
  peer hostile --bundle ws/clients/site-3 --case "$1" --hold 30 "${@:2}"
  ROUND=$(json_get "$REPORT" "j.get('round', 0)")
  [[ $ROUND != 0 ]] || { fail "$1: the peer got no task"; cat "$REPORT"; }
  kill -0 "$SERVE" 2>/dev/null || fail "$1: the coordinator died"
}

# rejected_for ROUND TEXT: the ledger's round ROUND rejects site-3's update with TEXT in its reason.
rejected_for()
{
  wait_log serve.log "round $1/" 30 >/dev/null
  wait_for 30 eval "[[ \$(ledger \"any(b['round'] == $1 for b in R)\") == True ]]" ||
    { fail "round $1 is not in the ledger"; return; }
  expect_ledger "any(r['site'] == 'site-3' and '''$2''' in r['reason'] for b in R if b['round'] == $1 for r in b['rejected'])" \
    "round $1 does not reject site-3's update for '$2'"
}

test_hostile_updates_and_reports_are_rejected_and_the_federation_goes_on()
{
  trap net_cleanup EXIT
  net_init 3 30 || return
  serve_bg --min-clients 2 --heartbeat 1
  join_bg site-1
  join_bg site-2
  wait_log serve.log "round 1/30 done" 60 || return

  # A certificate with notBefore month 13 (OpenSSL parses it; reading its times throws): this
  # took the coordinator down with std::terminate from a validation thread.
  hostile bad-cert-time
  rejected_for "$ROUND" "certificate is unreadable"
  report_has "j.get('next', {}).get('type') in ('task', 'done')" "the coordinator sent nothing after the bad certificate"

  # Finite but huge values (3e38) made an infinite global model two rounds later.
  hostile huge-values
  rejected_for "$ROUND" "L2 norm"
  # One NaN among finite values: found in the pass that aggregates the round, which is then made
  # again without it.
  hostile nan-value
  rejected_for "$ROUND" "non-finite value (the first, at flat index"
  expect_ledger "all(p['site'] != 'site-3' for b in R if b['round'] == $ROUND for p in b['participants'])" \
    "round $ROUND took site-3's NaN update"
  # 2^53 samples let one site outweigh every other in fedavg.
  hostile many-samples
  rejected_for "$ROUND" "fedl.num_samples 9007199254740992 is over the federation's limit"

  # Federated evaluation figures out of range, and a confusion matrix for another class count:
  # the update counts, its figures do not (no pooled evaluation from them, no matrix kept).
  hostile eval-metrics
  wait_log serve.log "site site-3's confusion matrix is left out" 30
  wait_for 30 eval "[[ \$(ledger \"any(b['round'] == $ROUND for b in R)\") == True ]]" ||
    fail "round $ROUND is not in the ledger"
  expect_ledger "[b for b in R if b['round'] == $ROUND][0]['site_metrics']['site-3']['eval_accuracy'] == 5.0" \
    "round $ROUND did not keep site-3's reported figures as sent"
  expect_ledger "all('eval_confusion' not in b['site_metrics'].get('site-3', {}) for b in R)" \
    "a ledger entry kept site-3's bad confusion matrix"
  expect_ledger "all('federated_evaluation' not in b for b in R)" "site-3's figures were pooled"

  # A 4 MiB fedl.kind was quoted whole into the ledger and the log.
  hostile big-kind
  rejected_for "$ROUND" "fedl.kind is 'xxxx"
  expect_ledger "all(len(r['reason']) <= 1000 for b in R for r in b['rejected'])" "a rejection reason over 1000 bytes"
  check_py "$(stat -c %s serve.log) < 200000" "serve.log grew to $(stat -c %s serve.log) bytes"
  # A quoted value cut inside a UTF-8 character made the ledger append throw after the model was
  # written: the coordinator hung and audit failed.
  hostile utf8-kind
  rejected_for "$ROUND" "fedl.kind is 'kkkk"

  # A safetensors header nested 1.9 million levels deep: 43x the coordinator's memory.
  local before after
  before=$(peak_kib "$SERVE")
  hostile deep-header
  rejected_for "$ROUND" "nests"
  after=$(peak_kib "$SERVE")
  echo "coordinator VmHWM: $before KiB before the deep header, $after KiB after"
  check_py "$after - $before < 32 * 1024" "the coordinator's peak memory grew from $before to $after KiB"

  # Metrics nested 30000 deep went into the signed ledger (and broke Python's json and jq).
  hostile deep-metrics
  wait_log serve.log "site site-3 disconnected: protocol error: frame header nests deeper than 8 levels" 30

  # An error report cut inside a UTF-8 character by the 500-byte bound, with a forged log line.
  hostile error-text
  wait_for 30 eval "[[ \$(ledger \"any(d['site'] == 'site-3' for b in R if b['round'] == $ROUND for d in b['dropped'])\") == True ]]" ||
    fail "round $ROUND does not list site-3 as dropped with its report"
  expect_ledger "all(len(d['reason'].encode()) <= 500 for b in R for d in b['dropped'] if d['site'] == 'site-3')" \
    "a site's report over 500 bytes in the ledger"
  grep -q '^fedl: info: round 99/99 done' serve.log && fail "a site forged a line of the coordinator's log"
  expect_in serve.log 'xxxxxxx\nfedl: info: round 99/99 done'

  # The same update twice: the second, arriving while the first is aggregated, was recorded as
  # late in the next round although the site was accepted.
  hostile twice --pause 0.05
  wait_log serve.log "update from site-3 dropped: the site already sent one for this task" 30
  expect_ledger "any('site-3' in sites(b) for b in R if b['round'] == $ROUND)" "site-3's first update of round $ROUND was not accepted"

  expect_exit "$SERVE" 120 0 "fedl serve"
  expect_exit "${JOIN[site-1]}" 30 0 "fedl join site-1"
  expect_exit "${JOIN[site-2]}" 30 0 "fedl join site-2"
  expect_rounds 30
  expect_ledger "all(l['site'] != 'site-3' for b in R for l in b['late'])" "site-3 recorded as late"
  # Every line of the ledger is strict UTF-8 (Python's reader would have refused it above).
  expect_not_in serve.log "could not be completed"
}

test_strangers_cannot_keep_sites_out()
{
  trap net_cleanup EXIT
  net_init 2 3 || return
  serve_bg --min-clients 2 --heartbeat 1
  wait_log serve.log "serving" 30 || return
  # 256 bare connections from one address, re-opened as they are closed: they held every slot
  # for connections before hello, and no site could join while they ran.
  "${PEER[@]}" strangers --server "127.0.0.1:$PORT" --ca ws/pki/ca.crt --count 256 --hold 60 >strangers-1.json &
  local one=$!
  BG+=("$one")
  # And 320 more from 40 other addresses (8 each): the global bound is full, so the oldest give way.
  "${PEER[@]}" strangers --server "127.0.0.1:$PORT" --ca ws/pki/ca.crt --count 320 --sources 40 --hold 60 \
    >strangers-2.json &
  local many=$!
  BG+=("$many")
  sleep 3
  join_bg site-1
  join_bg site-2
  # The whole federation, while the strangers keep at it (they hold on for 60 s).
  wait_log serve.log "round 3/3 done" 30
  kill -0 "$one" 2>/dev/null && kill -0 "$many" 2>/dev/null || fail "the strangers stopped before the federation ended"
  expect_exit "$SERVE" 30 0 "fedl serve"
  expect_rounds 3
  wait "$one" "$many"
  json_get strangers-1.json "j"
  json_get strangers-2.json "j"
  check_py "$(json_get strangers-1.json "j['opened']") >= 256" "the strangers could not open their connections"
  # Tens of thousands of refusals, but not a log line each.
  expect_in serve.log "more connections in the last"
  check_py "$(grep -c 'refused a connection' serve.log) < 1000" "a log line for each refused connection"
}

test_site_receipts_catch_a_rolled_back_or_rewritten_ledger()
{
  trap net_cleanup EXIT
  net_init 2 4 || return
  serve_bg --min-clients 2 --heartbeat 1
  join_bg site-1
  join_bg site-2
  expect_exit "$SERVE" 120 0 "fedl serve"
  expect_exit "${JOIN[site-1]}" 30 0 "fedl join site-1"
  expect_exit "${JOIN[site-2]}" 30 0 "fedl join site-2"
  local witness=(--witness ws/clients/site-1 ws/clients/site-2)
  [[ -s ws/clients/site-1/receipts.jsonl ]] || { fail "site-1 kept no receipts"; return; }
  echo "site-1 holds $(wc -l <ws/clients/site-1/receipts.jsonl) receipts"
  fedl_expect 0 audit ws "${witness[@]}" --json
  expect_in out '"witnesses"'

  # Rolled back: the last round, its model and the end of the ledger removed (and the best
  # model's link, which may name it). The hash chain of what is left is intact, so audit alone
  # passes; the receipts do not.
  cp -a ws ws.orig
  head -n -2 ws.orig/ledger.jsonl >ws/ledger.jsonl
  rm ws/models/global-000004.safetensors ws/models/best.safetensors
  fedl_expect 0 audit ws
  fedl_expect 3 audit ws "${witness[@]}"
  expect_in err "entries were removed from the end of the ledger"

  # Rewritten with the coordinator's own key (the operator holds it): one round's body changed
  # and every line after it signed and chained again.
  rm -rf ws && cp -a ws.orig ws
  "$PY" "$FEDL_SOURCE_DIR/tests/e2e/resign_ledger.py" ws \
    "[e for e in L if e['kind'] == 'round'][1]['body']['seconds'] = 0.0" || fail "resign_ledger.py failed"
  fedl_expect 0 audit ws
  fedl_expect 3 audit ws "${witness[@]}"
  expect_in err "the ledger was rewritten from there on"

  # A ledger line in another JSON form than the one that was signed (keys reordered).
  rm -rf ws && cp -a ws.orig ws
  "$PY" - <<'PY'
import json
lines = open("ws/ledger.jsonl").read().splitlines()
e = json.loads(lines[2])
lines[2] = json.dumps(dict(reversed(list(e.items()))), separators=(",", ":"), ensure_ascii=False)
open("ws/ledger.jsonl", "w").write("\n".join(lines) + "\n")
PY
  fedl_expect 3 audit ws
  expect_in err "not in canonical form"
}

test_aggregate_workspace_survives_a_malformed_certificate()
{
  net_init 2 3 || return
  # Updates of the initial model made as fedl_peer.py makes them: one with a certificate whose
  # notBefore month is 13 (fedl aggregate aborted with exit 134), one that is fine.
  "$PY" - <<'PY' || { fail "could not make the updates"; return; }
import hashlib, sys
sys.path.insert(0, __import__("os").environ["FEDL_SOURCE_DIR"] + "/tests/e2e")
import fedl_peer
model = open("ws/models/global-000000.safetensors", "rb").read()
base = hashlib.sha256(model).hexdigest()
for site, case, out in (("site-1", "bad-cert-time", "bad.st"), ("site-2", "fine", "good.st")):
    b = f"ws/clients/{site}"
    open(out, "wb").write(fedl_peer.crafted_update(model, base, site, f"{b}/client.crt", f"{b}/client.key", case))
PY
  fedl_expect 3 aggregate --workspace ws bad.st good.st && expect_in err "certificate is unreadable"
  fedl_expect 0 --json aggregate --workspace ws --on-bad-update skip bad.st good.st || return
  [[ $(json_get out "[p['site'] for p in j['participants']]") == "['site-2']" ]] || fail "site-2's update was not aggregated"
  [[ $(json_get out "j['rejected'][0]['site']") == "" ]] || fail "a rejected update is recorded under a site it only claims"
  fedl_expect 0 audit ws
}

test_a_round_that_cannot_be_written_stops_the_coordinator_with_the_reason()
{
  trap net_cleanup EXIT
  net_init 2 30 || return
  serve_bg --min-clients 2 --heartbeat 1
  join_bg site-1
  join_bg site-2
  wait_log serve.log "round 2/30 done" 60 || return
  # The ledger's last line cut short under the running coordinator: the next round cannot be
  # recorded. It used to leave the coordinator alive, silent, and never starting another round.
  printf '{"seq":' >>ws/ledger.jsonl
  expect_exit "$SERVE" 60 1 "fedl serve"
  expect_in serve.log "could not be completed"
  # Rounds here take ~10 ms: the cut may land while the coordinator appends an entry, which then
  # follows it on the same line. Either way the reason names the broken line.
  grep -qE "incomplete|line [0-9]+: not valid JSON" serve.log ||
    fail "serve.log names neither an incomplete nor a garbled last line"
}

# The coordinator writes each update over the file of an earlier one (a slot, whose page-cache
# pages are reused). A longer body left there must not follow the next, shorter update: the next
# update would then be "corrupt" and its honest site rejected for another site's bytes.
test_an_update_written_over_a_longer_one_is_cut_to_its_own_length()
{
  trap net_cleanup EXIT
  net_init 3 2 || return
  serve_bg --min-clients 1 --heartbeat 1
  # site-3 alone: 64 KiB after its last tensor, rejected, and the attempt fails below quorum.
  hostile padded
  local round=$ROUND
  wait_log serve.log "round $round attempt 1 is not counted" 30 || return
  expect_in serve.log "bytes after the last tensor"
  local slots
  slots=(ws/state/incoming/slot-*)
  [[ ${#slots[@]} == 1 && -f ${slots[0]} ]] || { fail "the failed attempt left no single slot: $(ls ws/state/incoming)"; return; }
  local inode size
  inode=$(stat -c %i "${slots[0]}")
  size=$(stat -c %s "${slots[0]}")
  # The retry: a well-formed update, shorter, written into that slot.
  hostile plain
  [[ $ROUND == "$round" ]] || fail "the retry is round $ROUND, not $round"
  wait_log serve.log "round $round/2 done" 30 || return
  expect_ledger "[p['site'] for b in R if b['round'] == $round for p in b['participants']] == ['site-3']" \
    "round $round did not take site-3's well-formed update"
  expect_ledger "all(b['rejected'] == [] for b in R)" "a committed round rejected an update"
  slots=(ws/state/incoming/slot-*)
  [[ $(stat -c %i "${slots[0]}") == "$inode" ]] || fail "the retry's update was not written into the slot"
  check_py "$(stat -c %s "${slots[0]}") == $size - 65536" "the slot is $(stat -c %s "${slots[0]}") bytes, not $size - 65536"
}
