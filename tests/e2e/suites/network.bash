# SPDX-License-Identifier: Apache-2.0
# The networked federation: fedl serve and fedl join over mutual TLS 1.3 on 127.0.0.1, with
# tests/e2e/fedl_peer.py as a raw (and hostile) peer. Every wait has a deadline, and each test
# kills what it started when it ends.

# shellcheck source=../net_lib.bash
source "$FEDL_SOURCE_DIR/tests/e2e/net_lib.bash"

test_federation_of_four_sites_reaches_93_percent_and_audits()
{
  trap net_cleanup EXIT
  PORT=$(free_port)
  "$FEDL" -q init ws --clients 4 --arch mlp:128 --partition "$DATA/digits.csv.gz" --no-header --split dirichlet:0.5 \
    --holdout 0.2 --rounds 15 --seed 1 --lr 0.03 --epochs 2 --listen "127.0.0.1:$PORT" >init.log 2>&1 ||
    { fail "fedl init failed"; cat init.log; return; }
  "$FEDL" serve ws --threads 1 --min-clients 4 --json >serve.json 2>serve.log &
  SERVE=$!
  BG+=("$SERVE")
  local k
  for k in 1 2 3 4; do join_bg "site-$k"; done
  expect_exit "$SERVE" 120 0 "fedl serve"
  for k in 1 2 3 4; do expect_exit "${JOIN[site-$k]}" 30 0 "fedl join site-$k"; done
  [[ $FAILED == 0 ]] || { tail -20 serve.log; return; }
  local acc
  acc=$(json_get serve.json "j['accuracy']")
  echo "accuracy after 15 rounds: $acc"
  check_py "$acc >= 0.93" "accuracy after 15 rounds $acc < 0.93"
  [[ $(json_get serve.json "j['rounds_completed'], j['reason']") == "(15, 'rounds')" ]] ||
    fail "serve summary: $(cat serve.json)"
  expect_rounds 15
  expect_ledger "all(sites(b) == ['site-1', 'site-2', 'site-3', 'site-4'] for b in R)" "a round without all four sites"
  # The sites sign with update-signature-v2, which the coordinator hashes as the bytes arrive.
  expect_ledger "all(p.get('signature_version') == 2 and len(p['update_digest']) == 64 for b in R for p in b['participants'])" \
    "a participant without a v2 signature and its digest"
  expect_ledger "[e['body']['round'] for e in L if e['kind'] == 'finished'] == [15]" "no finished entry for round 15"
  expect_in site-1.out "federation finished after round 15, trained 15 rounds"
  # Served again, the finished workspace has nothing to do, and says so: no round run, none
  # started at (it said first_round 16).
  fedl_expect 0 --json serve ws --threads 1 || return
  [[ $(json_get out "j['reason'], j['rounds_run'], j['first_round'], j['rounds_completed']") == \
    "('already-complete', 0, None, 15)" ]] || fail "serve on a finished workspace: $(cat out)"
}

test_handshake_refusals_leave_the_federation_running()
{
  trap net_cleanup EXIT
  net_init 3 6 || return
  # Another federation's CA, a revoked site and an expired certificate of this CA.
  "$FEDL" -q init other --clients 1 --arch mlp:32 --input-dim 64 --classes 10 >other.log 2>&1 ||
    { fail "init other failed"; cat other.log; return; }
  fedl_expect 0 init ws --revoke site-3 || return
  openssl genpkey -algorithm ed25519 -out expired.key 2>/dev/null &&
    openssl req -new -key expired.key -subj /CN=site-2 -out expired.csr 2>/dev/null || { fail "openssl req"; return; }
  mkdir -p ca && touch ca/index.txt && echo 1000 >ca/serial
  cat >ca/ca.cnf <<'EOF'
[ca]
default_ca = past
[past]
database = ca/index.txt
new_certs_dir = ca
serial = ca/serial
policy = any
x509_extensions = client
[any]
commonName = supplied
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
  openssl ca -batch -config ca/ca.cnf -cert ws/pki/ca.crt -keyfile ws/pki/ca.key -in expired.csr -out expired.crt \
    -startdate 20200101000000Z -enddate 20200201000000Z -md default >ca.log 2>&1 ||
    { fail "openssl ca failed"; cat ca.log; return; }
  openssl verify -CAfile ws/pki/ca.crt expired.crt >verify.out 2>&1
  expect_in verify.out "certificate has expired"

  serve_bg --min-clients 2 --heartbeat 1
  join_bg site-1
  wait_log serve.log "site site-1 connected" || return
  # While site-1 is connected (the round waits for a second site), each of these is refused at
  # the handshake with the reason in the coordinator's log, and the peer sees the TLS alert.
  local ca=ws/clients/site-1/ca.crt
  refused()
  {
    report_has "j['alert']" "no TLS alert or handshake failure for $1"
    report_has "'$2' in j.get('closed', '')" "the peer did not see '$2' for $1"
    report_has "'welcome' not in j and not j['frames']" "the peer got frames for $1"
    wait_log serve.log "refused a connection from 127.0.0.1:$(json_get "$REPORT" "j['local_port']"): $3" 10
  }
  peer handshake --ca "$ca" --no-cert --site site-1
  refused "no certificate" "certificate required" "TLS handshake failed: peer did not return a certificate"
  peer handshake --ca "$ca" --cert other/clients/site-1/client.crt --key other/clients/site-1/client.key --site site-1
  refused "another CA's certificate" "unknown ca" "certificate refused: not issued by this federation's CA"
  peer handshake --bundle ws/clients/site-3
  refused "a revoked certificate" "certificate revoked" "certificate refused: certificate has been revoked"
  peer handshake --ca "$ca" --cert expired.crt --key expired.key --site site-2
  refused "an expired certificate" "certificate expired" "certificate refused: certificate has expired"
  peer handshake --bundle ws/clients/site-2 --tls12
  refused "TLS 1.2" "protocol version" "TLS handshake failed: unsupported protocol"
  report_has "j['handshake'] == 'failed'" "the TLS 1.2 handshake did not fail"
  # fedl join with the revoked certificate gives up at once: retrying cannot help.
  timeout 30 "$FEDL" join ws/clients/site-3 --data ws/clients/site-3/data/train.csv --no-header --retry-max 1 \
    >revoked.out 2>revoked.err
  local rc=$?
  [[ $rc == 3 ]] || { fail "fedl join of the revoked site-3 exited $rc, expected 3"; cat revoked.err; }
  expect_in revoked.err "refused this site's certificate"
  expect_in revoked.err "certificate revoked"
  kill -0 "$SERVE" 2>/dev/null || fail "the coordinator died"
  [[ $(grep -c "refused a connection" serve.log) == 6 ]] || fail "expected 6 refusals in the log"
  # Then the legitimate sites finish the federation; site-1 was never disturbed.
  join_bg site-2
  expect_exit "$SERVE" 60 0 "fedl serve"
  expect_exit "${JOIN[site-1]}" 30 0 "fedl join site-1"
  expect_exit "${JOIN[site-2]}" 30 0 "fedl join site-2"
  expect_not_in serve.log "site site-1 disconnected"
  expect_in site-1.out "trained 6 rounds"
  expect_rounds 6
  expect_ledger "all(sites(b) == ['site-1', 'site-2'] for b in R)" "a round with other sites than site-1 and site-2"
}


test_bad_frames_drop_the_peer_and_the_federation_goes_on()
{
  trap net_cleanup EXIT
  # Four clients of which two run: every round waits the coordinator's one-second settle for the
  # others, so the federation lasts while the peer (as site-3) misbehaves.
  net_init 4 15 || return
  serve_bg --min-clients 2 --heartbeat 1
  join_bg site-1
  join_bg site-2
  wait_log serve.log "round 1/15 done" 60 || return
  local bundle=(--bundle ws/clients/site-3)

  peer garbage "${bundle[@]}"
  report_has "j.get('welcome')" "no welcome for the garbage peer"
  report_has "any(f['type'] == 'error' and 'bad magic' in f['header']['message'] for f in j['frames'])" \
    "no error frame about the bad magic"
  wait_log serve.log "site site-3 disconnected: protocol error: not a fedl frame (bad magic bytes)" 10

  local before after
  before=$(peak_kib "$SERVE")
  peer huge "${bundle[@]}" --pause 1
  after=$(peak_kib "$SERVE")
  echo "coordinator VmHWM: $before KiB before the 2^40-byte frame, $after KiB after"
  report_has "any(f['type'] == 'error' and 'update frame body of 1099511627776 bytes is over the limit' in f['header']['message'] for f in j['frames'])" \
    "no error frame about the 2^40-byte body"
  wait_log serve.log "site site-3 disconnected: protocol error: update frame body of 1099511627776 bytes is over the limit" 10
  check_py "$after < 300 * 1024" "the coordinator's peak memory is $after KiB after the 2^40-byte frame"
  check_py "$after - $before < 64 * 1024" "the coordinator's peak memory grew from $before to $after KiB"

  peer truncated "${bundle[@]}"
  wait_log serve.log "site site-3 disconnected: the peer closed the connection inside a frame" 10

  peer unknown-type "${bundle[@]}"
  report_has "any(f['type'] == 'error' and 'unknown frame type 42' in f['header']['message'] for f in j['frames'])" \
    "no error frame about frame type 42"
  wait_log serve.log "site site-3 disconnected: protocol error: unknown frame type 42" 10

  # Header fields of the wrong type, before and after hello.
  peer bad-hello "${bundle[@]}"
  report_has "any(f['type'] == 'error' and 'bad hello frame header' in f['header']['message'] for f in j['frames'])" \
    "no error frame about the hello's header"
  wait_log serve.log "(site-3) closed before it was admitted: protocol error: bad hello frame header" 10
  peer bad-header "${bundle[@]}"
  report_has "any(f['type'] == 'error' and 'bad update frame header' in f['header']['message'] for f in j['frames'])" \
    "no error frame about the update's header"
  wait_log serve.log "site site-3 disconnected: protocol error: bad update frame header" 10

  peer wrong-round "${bundle[@]}" --hold 1
  local wrong
  wrong=$(json_get "$REPORT" "j['wrong_round']")
  wait_log serve.log "update from site-3 dropped: it is for round $wrong, not " 10

  peer wrong-shape "${bundle[@]}" --hold 30
  local round tensor
  round=$(json_get "$REPORT" "j['round']")
  tensor=$(json_get "$REPORT" "j['rejected']['tensor']")
  report_has "j['rejected']['shape'] != j['rejected']['base_shape']" "the update's shape was not changed"
  echo "wrong-shape update for round $round, tensor $tensor"
  wait_log serve.log "round $round/15 done" 30
  expect_ledger "any(r['site'] == 'site-3' and 'tensor $tensor has shape' in r['reason'] for b in R if b['round'] == $round for r in b['rejected'])" \
    "round $round does not list site-3's update as rejected for its shape"
  expect_in serve.log "tensor $tensor has shape"

  kill -0 "$SERVE" 2>/dev/null || fail "the coordinator died"
  expect_exit "$SERVE" 60 0 "fedl serve"
  expect_exit "${JOIN[site-1]}" 30 0 "fedl join site-1"
  expect_exit "${JOIN[site-2]}" 30 0 "fedl join site-2"
  expect_rounds 15
  expect_ledger "all('site-3' not in sites(b) for b in R)" "an update of the peer was accepted"
  expect_ledger "all(sites(b) == ['site-1', 'site-2'] for b in R)" "a round without site-1 and site-2"
  expect_not_in serve.log "site site-1 disconnected"
  expect_not_in serve.log "site site-2 disconnected"
  [[ -z $(ls -A ws/state/incoming) ]] || fail "files left in ws/state/incoming: $(ls ws/state/incoming)"
}

# pending_round LOG: the round of the last task a site was given, if it has sent no update since.
pending_round()
{
  "$PY" - "$1" <<'PY'
import re, sys
pending = None
for line in open(sys.argv[1]):
    m = re.search(r"round (\d+): (training|update sent)", line)
    if m:
        pending = m.group(1) if m.group(2) == "training" else None
if pending:
    print(pending)
PY
}

# stall_site SITE AFTER: once SITE (a running fedl join) has sent its update for round AFTER,
# stops its trainer and waits until the site holds a round's task it cannot answer: sets
# STALLED_ROUND and STALLED_TRAINER.
stall_site()
{
  local join=${JOIN[$1]}
  wait_log "$1.log" "round $2: update sent" 60 || return 1
  STALLED_TRAINER=$(trainer_of "$join")
  [[ -n $STALLED_TRAINER ]] || { fail "$1 has no trainer"; return 1; }
  kill -STOP "$STALLED_TRAINER"
  wait_for 30 eval "[[ -n \$(pending_round $1.log) ]]" || { fail "$1 got no task to stall on"; return 1; }
  sleep 0.5 # an update the trainer finished just before it stopped would be sent by now
  STALLED_ROUND=$(pending_round "$1.log")
  [[ -n $STALLED_ROUND ]] || { fail "$1 sent its update after all"; return 1; }
  echo "$1 holds round $STALLED_ROUND (its trainer, $STALLED_TRAINER, is stopped)"
}

# Sites on one host share one fork server (join --fork-server): it forks their trainers (each
# sandboxed, so each loads LibTorch inside its sandbox), a trainer killed with -9 is forked
# again, and the federation completes.
test_sites_on_one_host_fork_their_trainers_from_one_server()
{
  # A Unix socket path has at most 107 bytes: this folder's may be longer.
  local sock
  sock=$(mktemp -u "${TMPDIR:-/tmp}/fedl-fork.XXXXXX")
  trap "pkill -KILL -f -- '__fork-server --detach $sock' 2>/dev/null; rm -f '$sock' '$sock.lock'; net_cleanup" EXIT
  local rounds=40 # many: the trainers are looked at and one is killed while rounds are still to come
  net_init 3 $rounds || return
  fedl_expect 2 join ws/clients/site-1 --data ws/clients/site-1/data/train.csv --no-header \
    --fork-server "/tmp/$(printf 'x%.0s' {1..120})" && expect_in err "is 125 bytes; a Unix socket path has 1 to 107"
  serve_bg --min-clients 3 --heartbeat 1
  local k
  for k in 1 2 3; do join_bg "site-$k" --fork-server "$sock"; done
  wait_for 60 eval "[[ \$(ledger 'len(R)') -ge 1 ]]" || { fail "no round completed"; tail serve.log; return; }
  local server p trainers
  # One server: every other process with its command line is a fork of it (a trainer, named
  # fedl-worker) or the sandboxed child of one, and no trainer was started as a program of its own.
  server=$(pgrep -o -f -- "__fork-server --detach $sock")
  for p in $(pgrep -f -- "__fork-server --detach $sock"); do
    local parent
    parent=$(ps -o ppid= -p "$p" | tr -d ' ')
    [[ $p == "$server" || $parent == "$server" || $(ps -o ppid= -p "$parent" | tr -d ' ') == "$server" ]] ||
      fail "a second fork server, pid $p"
  done
  trainers=$(pgrep -P "$server" | wc -l)
  [[ $trainers == 3 ]] || fail "the fork server has $trainers children, not the 3 sites' trainers"
  [[ $(ps -o comm= -p "$(pgrep -P "$server" | head -1)") == fedl-worker ]] || fail "a forked trainer is not named fedl-worker"
  pgrep -f -- "__worker.*$PWD" >/dev/null && fail "a trainer was started as a program, not forked"
  kill -9 "$(pgrep -P "$server" | head -1)"
  expect_exit "$SERVE" 120 0 "fedl serve"
  for k in 1 2 3; do expect_exit "${JOIN[site-$k]}" 30 0 "fedl join site-$k"; done
  expect_rounds $rounds
  grep -q "was killed by signal 9" site-*.log || fail "no site saw its forked trainer killed"
  kill -0 "$server" 2>/dev/null || fail "the fork server did not outlive its sites (it waits until idle)"
}

test_a_site_killed_mid_round_is_dropped_and_the_round_completes()
{
  trap net_cleanup EXIT
  local rounds=30 # many: the trainer must be stopped while some rounds are still to come
  net_init 3 $rounds || return
  serve_bg --min-clients 2 --heartbeat 1
  local k
  for k in 1 2 3; do join_bg "site-$k"; done
  stall_site site-3 1 || return
  local round=$STALLED_ROUND
  sleep 1
  # The round waits for site-3 (its deadline is far away).
  expect_ledger "all(b['round'] < $round for b in R)" "round $round was completed without waiting for site-3"
  kill -9 "${JOIN[site-3]}" "$STALLED_TRAINER"
  expect_exit "${JOIN[site-3]}" 10 137 "the killed fedl join site-3"
  expect_exit "$SERVE" 60 0 "fedl serve"
  expect_exit "${JOIN[site-1]}" 30 0 "fedl join site-1"
  expect_exit "${JOIN[site-2]}" 30 0 "fedl join site-2"
  expect_in serve.log "site site-3 disconnected"
  expect_rounds $rounds
  expect_ledger "[sites(b) for b in R if b['round'] == $round] == [['site-1', 'site-2']]" \
    "round $round's participants are not site-1 and site-2"
  expect_ledger "[[d['site'] for d in b['dropped']] for b in R if b['round'] == $round] == [['site-3']]" \
    "round $round does not record site-3 as dropped"
  expect_ledger "all('disconnected' in d['reason'] for b in R for d in b['dropped'])" "a drop without its reason"
  expect_ledger "all(sites(b) == ['site-1', 'site-2'] for b in R if b['round'] > $round)" \
    "a round after $round with other sites than site-1 and site-2"
  expect_ledger "not F" "a round attempt failed"
}

test_a_coordinator_killed_mid_round_resumes_where_it_was()
{
  trap net_cleanup EXIT
  # Many rounds: rounds of this small model take a fraction of a second, and the trainer must be
  # stopped while some are still to come.
  local rounds=40
  net_init 3 $rounds || return
  serve_bg --min-clients 2 --heartbeat 1
  local k
  for k in 1 2 3; do join_bg "site-$k"; done
  # Hold a round open (site-3's trainer is stopped), then kill the coordinator in the middle of it.
  stall_site site-3 2 || return
  local round=$STALLED_ROUND
  local done_before
  done_before=$(ledger "len(R)")
  [[ $done_before == $((round - 1)) ]] || fail "the ledger has $done_before rounds while round $round runs"
  kill_tree KILL "$SERVE"
  expect_exit "$SERVE" 10 137 "the killed fedl serve"
  kill -CONT "$STALLED_TRAINER"
  # Started again, it continues with the round that was cut short; the sites come back by themselves.
  "$FEDL" serve ws --threads 1 --min-clients 2 --heartbeat 1 --json >serve2.json 2>serve2.log &
  SERVE=$!
  BG+=("$SERVE")
  expect_exit "$SERVE" 90 0 "the restarted fedl serve"
  for k in 1 2 3; do expect_exit "${JOIN[site-$k]}" 30 0 "fedl join site-$k"; done
  [[ $FAILED == 0 ]] || { tail -20 serve2.log; return; }
  [[ $(json_get serve2.json "j['first_round'], j['rounds_completed']") == "($round, $rounds)" ]] ||
    fail "the restarted coordinator: $(cat serve2.json)"
  expect_rounds $rounds
  expect_ledger "[e['body']['resume_round'] for e in L if e['kind'] == 'serve'] == [1, $round]" \
    "the serve entries do not resume at round $round"
  expect_ledger "[e['body']['round'] for e in L if e['kind'] == 'finished'] == [$rounds]" "no finished entry for round $rounds"
  expect_in site-1.log "lost the coordinator"
  [[ -z $(ls -A ws/state/incoming) ]] || fail "files left in ws/state/incoming: $(ls ws/state/incoming)"
}

test_a_site_connecting_twice_replaces_its_older_connection()
{
  trap net_cleanup EXIT
  net_init 3 8 || return
  serve_bg --min-clients 2 --heartbeat 1
  join_bg site-1
  join_bg site-2
  wait_log serve.log "round 1/8 done" 60 || return
  # A second connection as site-1 replaces the running fedl join, which is told so and stops
  # (only another process with the site's key can take its place; two joins for one site must not
  # replace each other for ever). A fedl join started again then replaces the peer in turn, which
  # gets an error frame saying why.
  REPORT=peer-hello-replaced.json
  timeout 60 "${PEER[@]}" hello --server "127.0.0.1:$PORT" --timeout 10 --bundle ws/clients/site-1 --hold 30 \
    >"$REPORT" 2>>peer.err &
  local peer_pid=$!
  BG+=("$peer_pid")
  expect_exit "${JOIN[site-1]}" 30 1 "the replaced fedl join site-1"
  expect_in site-1.log "another fedl join for site site-1 connected to the coordinator; this one stops"
  mv site-1.log site-1.first.log
  join_bg site-1
  expect_exit "$peer_pid" 40 0 "fedl_peer.py hello"
  report_has "j.get('welcome')" "the second site-1 was not welcomed"
  report_has "any(f['type'] == 'error' and 'replaced by a newer connection' in f['header']['message'] and f['header'].get('replaced') for f in j['frames'])" \
    "the peer, replaced in turn, got no error frame saying so"
  report_has "j['closed'] == 'eof'" "the coordinator did not close the replaced connection"
  [[ $(grep -c "site site-1 connected again" serve.log) -ge 2 ]] || fail "the coordinator did not log both replacements"
  expect_exit "$SERVE" 60 0 "fedl serve"
  expect_exit "${JOIN[site-1]}" 30 0 "fedl join site-1"
  expect_exit "${JOIN[site-2]}" 30 0 "fedl join site-2"
  expect_rounds 8
  expect_ledger "all(sites(b).count('site-1') <= 1 for b in R)" "site-1 counted twice in a round"
  expect_ledger "all(b['asked'] <= 2 for b in R)" "a round asked more than the two sites"
}

test_an_update_after_the_deadline_is_recorded_as_late()
{
  trap net_cleanup EXIT
  # Four clients of which three run: the coordinator waits its one-second settle before each round.
  net_init 4 5 || return
  serve_bg --min-clients 2 --heartbeat 1 --round-timeout 6
  local k
  for k in 1 2 3; do join_bg "site-$k"; done
  stall_site site-3 1 || return
  local round=$STALLED_ROUND
  wait_log serve.log "round $round: deadline of 6 s reached" 20 || return
  wait_log serve.log "round $round/5 done" 20 || return
  # The next round starts a second later at the earliest: site-3's update goes out in between.
  kill -CONT "$STALLED_TRAINER"
  wait_log serve.log "update from site-3 dropped: it came after the deadline of round $round" 10
  expect_exit "$SERVE" 60 0 "fedl serve"
  for k in 1 2 3; do expect_exit "${JOIN[site-$k]}" 30 0 "fedl join site-$k"; done
  expect_rounds 5
  expect_ledger "[sites(b) for b in R if b['round'] == $round] == [['site-1', 'site-2']]" \
    "round $round's participants are not site-1 and site-2"
  expect_ledger "[[(x['site'], x['reason']) for x in b['late']] for b in R if b['round'] == $round] == [[('site-3', 'no update by the deadline')]]" \
    "round $round does not record that site-3 missed the deadline"
  expect_ledger "[[(x['site'], x['round']) for x in b['late']] for b in R if b['round'] == $round + 1] == [[('site-3', $round)]]" \
    "round $((round + 1)) does not record site-3's late update for round $round"
  expect_ledger "all(sites(b) == ['site-1', 'site-2', 'site-3'] for b in R if b['round'] > $round)" \
    "site-3 is not back after round $round"
}

# metrics PORT: the coordinator's Prometheus text, fetched with urllib.
metrics()
{
  "$PY" -c 'import sys, urllib.request; print(urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[1], timeout=5).read().decode())' "$1"
}

# metric FILE NAME: the value of a metric sample (NAME may carry labels).
metric()
{
  awk -v n="$2" '$1 == n {print $2}' "$1"
}

test_metrics_sigterm_and_giving_up()
{
  trap net_cleanup EXIT
  net_init 3 20 || return
  local mport
  mport=$(free_port)
  serve_bg --min-clients 2 --heartbeat 1 --metrics "127.0.0.1:$mport"
  join_bg site-1
  join_bg site-2
  wait_log serve.log "round 2/20 done" 60 || return
  metrics "$mport" >metrics.txt 2>metrics.err || { fail "cannot fetch the metrics"; cat metrics.err; }
  cat metrics.txt
  expect_in metrics.txt "# TYPE fedl_rounds_completed_total counter"
  local completed received
  completed=$(metric metrics.txt fedl_rounds_completed_total)
  received=$(metric metrics.txt fedl_received_bytes_total)
  check_py "${completed:-0} >= 2" "fedl_rounds_completed_total is '$completed', not at least 2"
  [[ $(metric metrics.txt fedl_connected_sites) == 2 ]] || fail "fedl_connected_sites is not 2"
  check_py "${received:-0} > 10000" "fedl_received_bytes_total is '$received'"
  [[ $(metric metrics.txt 'fedl_updates_rejected_total{reason="invalid"}') == 0 ]] ||
    fail "fedl_updates_rejected_total{reason=\"invalid\"} is not 0"
  "$PY" -c 'import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen("http://127.0.0.1:%s/nothing" % sys.argv[1], timeout=5)
except urllib.error.HTTPError as e:
    sys.exit(0 if e.code == 404 else 1)
sys.exit(1)' "$mport" || fail "/nothing is not a 404"

  # SIGTERM: exit 130, a ledger that audits, no round counted twice or half-written.
  kill -TERM "$SERVE"
  expect_exit "$SERVE" 30 130 "fedl serve after SIGTERM"
  expect_in serve.log "terminated: stopping"
  expect_in serve.out "stopped after round"
  local n
  n=$(ledger "len(R)")
  expect_rounds "$n"
  expect_ledger "not any(e['kind'] == 'finished' for e in L)" "a finished entry after SIGTERM"
  kill -TERM "${JOIN[site-1]}" "${JOIN[site-2]}"
  expect_exit "${JOIN[site-1]}" 30 130 "fedl join site-1 after SIGTERM"
  expect_exit "${JOIN[site-2]}" 30 130 "fedl join site-2 after SIGTERM"

  # No coordinator: fedl join gives up after --retry-for, naming the address.
  local nobody
  nobody=$(free_port)
  timeout 30 "$FEDL" join ws/clients/site-1 --data ws/clients/site-1/data/train.csv --no-header \
    --server "127.0.0.1:$nobody" --retry-for 2 >giveup.out 2>giveup.err
  local rc=$?
  [[ $rc == 1 ]] || fail "fedl join --retry-for 2 without a coordinator exited $rc, expected 1"
  expect_in giveup.err "fedl: error: gave up after"
  expect_in giveup.err "without the coordinator at 127.0.0.1:$nobody (--retry-for)"

  # No sites: fedl serve gives up after --wait-timeout.
  timeout 30 "$FEDL" serve ws --threads 1 --listen "127.0.0.1:$(free_port)" --wait-timeout 2 >wait.out 2>wait.err
  rc=$?
  [[ $rc == 1 ]] || fail "fedl serve --wait-timeout 2 without sites exited $rc, expected 1"
  expect_in wait.err "fedl: error: only 0 of the 2 sites that round $((n + 1)) needs connected within --wait-timeout 2 s"
  expect_rounds "$n"
}
