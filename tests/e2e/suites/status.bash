# SPDX-License-Identifier: Apache-2.0
# fedl status: the federation as the coordinator sees it, from the status file fedl serve keeps
# (WS/state/status.json): mid-round, who was asked and who has reported, the deadline, the sites
# with their addresses; afterwards how it ended; and a coordinator killed with -9 shown as not
# running rather than as a live round.

# shellcheck source=../net_lib.bash
source "$FEDL_SOURCE_DIR/tests/e2e/net_lib.bash"

# status_json OUT: fedl status ws --json into OUT; its exit status.
status_json()
{
  "$FEDL" status ws --json >"$1" 2>status.err
}

# reported_two: the status shows a round in which two sites have reported.
reported_two()
{
  "$FEDL" status ws --json >mid.json 2>/dev/null &&
    [[ $(json_get mid.json "sum(p['state'] == 'reported' for p in j['participants'])") == 2 ]]
}

test_mid_round_status_lists_who_has_and_has_not_reported()
{
  trap net_cleanup EXIT
  net_init 3 1 || return
  serve_bg --min-clients 2 --round-timeout 20
  # site-3 is a peer that says hello and then never trains: the round waits for it until the
  # deadline, while the two real sites report.
  "${PEER[@]}" hello --server "127.0.0.1:$PORT" --bundle ws/clients/site-3 --hold 60 >peer.json 2>peer.err &
  BG+=("$!")
  wait_log serve.log "site site-3 connected" 30 || return
  "$FEDL" status ws --watch --interval 0.3 --json >watch.jsonl 2>watch.err &
  local watch=$!
  BG+=("$watch")
  join_bg site-1
  join_bg site-2
  wait_for 60 reported_two || { fail "the status never showed two sites reported"; cat mid.json; return; }
  check_py "$(json_get mid.json "j['state'] == 'running' and j['running'] and j['round'] == 1 and j['rounds'] == 1")" \
    "state: $(cat mid.json)"
  check_py "$(json_get mid.json "sorted((p['site'], p['state']) for p in j['participants']) == \
    [('site-1', 'reported'), ('site-2', 'reported'), ('site-3', 'training')]")" "participants: $(cat mid.json)"
  check_py "$(json_get mid.json "0 < j['deadline_seconds'] <= 20")" "deadline: $(cat mid.json)"
  check_py "$(json_get mid.json "[(s['site'], s['connected'], s['address']) for s in j['sites']] == \
    [('site-1', True, '127.0.0.1'), ('site-2', True, '127.0.0.1'), ('site-3', True, '127.0.0.1')]")" \
    "sites: $(cat mid.json)"
  check_py "$(json_get mid.json "all(s['heard_seconds'] <= 6 for s in j['sites']) and j['age_seconds'] < 5")" \
    "heard: $(cat mid.json)"
  check_py "$(json_get mid.json "j['schema'] == 1 and j['enrolled'] == 3 and j['quorum'] == 2")" \
    "schema, enrolled: $(cat mid.json)"
  # The same for a person.
  fedl_expect 0 status ws || return
  expect_in out "round 1 of 1: running"
  expect_in out "left before the deadline"
  expect_in out "asked 3, 2 reported"
  grep -qE '^  site-3 +training$' out || { fail "site-3 not shown training"; cat out; }
  grep -qE '^  site-1 +127\.0\.0\.1 +connected for [0-9]+ s, last heard [0-9]+ s ago$' out ||
    { fail "site-1's line"; cat out; }
  # At the deadline the round closes with two updates and the federation finishes.
  expect_exit "$SERVE" 60 0 "fedl serve"
  expect_rounds 1
  fedl_expect 0 status ws --json || return
  check_py "$(json_get out "j['state'] == 'finished' and not j['running'] and j['reason'] == 'rounds'")" \
    "after: $(cat out)"
  check_py "$(json_get out "[r['round'] for r in j['recent']] == [1] and 0 < j['recent'][0]['accuracy'] <= 1")" \
    "recent: $(cat out)"
  check_py "$(json_get out "j['recent'][0]['updates'] == 2 and j['accuracy'] == j['recent'][0]['accuracy']")" \
    "recent: $(cat out)"
  fedl_expect 0 status ws || return
  expect_in out "finished after round 1 of 1 (rounds)"
  expect_in out "round 1: accuracy"
  # --watch ended by itself once the coordinator had: one JSON document per line, the last one
  # the end.
  expect_exit "$watch" 10 0 "fedl status --watch"
  "$PY" - watch.jsonl <<'PY' || fail "fedl status --watch --json lines"
import json, sys
docs = [json.loads(l) for l in open(sys.argv[1])]
assert len(docs) >= 3, len(docs)
assert all(d["schema"] == 1 for d in docs)
assert any(d["state"] == "running" for d in docs), [d["state"] for d in docs]
assert docs[-1]["state"] == "finished" and not docs[-1]["running"], docs[-1]
PY
}

test_a_killed_coordinator_is_shown_as_not_running()
{
  trap net_cleanup EXIT
  net_init 2 3 || return
  # Before any coordinator ran: a clear error.
  fedl_expect 1 status ws || return
  expect_in err "no coordinator has run on ws yet"
  serve_bg --min-clients 2
  join_bg site-1
  wait_for 30 status_json waiting.json || { fail "no status while waiting"; return; }
  wait_for 30 eval "[[ \$(json_get waiting.json \"[s['connected'] for s in j['sites']]\" 2>/dev/null) == '[True, False]' ]] || { status_json waiting.json; false; }" ||
    { fail "site-1 never shown connected"; cat waiting.json; }
  check_py "$(json_get waiting.json "j['state'] == 'waiting' and j['running'] and j['participants'] == []")" \
    "waiting: $(cat waiting.json)"
  fedl_expect 0 status ws || return
  expect_in out "round 1 of 3: waiting for a quorum of 2 sites"
  expect_in out "sites: 1 of 2 connected"
  grep -qE '^  site-2 +not connected$' out || { fail "site-2 not shown as not connected"; cat out; }
  kill -KILL "$SERVE"
  wait "$SERVE" 2>/dev/null
  fedl_expect 0 status ws --json || return
  check_py "$(json_get out "j['state'] == 'waiting' and not j['running']")" "killed: $(cat out)"
  fedl_expect 0 status ws || return
  expect_in out "not running: it stopped without recording an end"
  # --watch does not wait on a dead coordinator.
  timeout 10 "$FEDL" status ws --watch >watch.out 2>&1 || fail "fedl status --watch on a dead coordinator: $?"
  # A status file that is not one is refused, naming it.
  echo '{"not": "a status"}' >ws/state/status.json
  fedl_expect 1 status ws || return
  expect_in err "ws/state/status.json is not a fedl status file"
  head -c 100 /dev/urandom >ws/state/status.json
  fedl_expect 1 status ws || return
  expect_in err "is not a fedl status file"
  fedl_expect 2 status ws --interval 0 || return
  fedl_expect 2 status nowhere || return
}
