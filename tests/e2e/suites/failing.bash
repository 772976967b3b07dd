# SPDX-License-Identifier: Apache-2.0
# Sites that fail fast and coordinators that move on: a site whose trainer fails every task the
# same way (here: a device the machine does not have) stops after fedl join --max-failures tasks
# instead of retrying for ever, and fedl serve --max-site-failures takes a site that keeps failing
# out of the sampling for the rest of the run (recorded in the ledger), or stops when too few
# sites are left for a round, instead of retrying with backoff until a CI job times out.

# shellcheck source=../net_lib.bash
source "$FEDL_SOURCE_DIR/tests/e2e/net_lib.bash"

# attempts_json: every round or attempt entry of the ledger, as a JSON list of their bodies.
attempts_json()
{
  "$PY" - ws/ledger.jsonl <<'PY'
import json, sys
out = []
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e.get("kind") in ("round", "round-failed"):
        out.append(e["body"])
print(json.dumps(out))
PY
}

test_a_site_whose_trainer_always_fails_the_same_way_stops()
{
  trap net_cleanup EXIT
  net_init 3 3 || return
  serve_bg --min-clients 2
  join_bg site-1
  join_bg site-2
  join_bg site-3 --device cuda --max-failures 2
  # Two tasks failed alike, then the site stops with exit 1 (until now it retried for ever).
  expect_exit "${JOIN[site-3]}" 60 1 "fedl join site-3 on a device it does not have"
  expect_in site-3.log "the trainer failed 2 tasks in a row the same way, so the site stops (--max-failures 2)"
  expect_in site-3.log "device 'cuda' is not available"
  # The coordinator learns that it stopped and why, by class, and goes on without it.
  expect_exit "$SERVE" 120 0 "fedl serve"
  expect_in serve.log "site site-3 reports"
  expect_in serve.log "stops: its trainer failed 2 tasks in a row the same way"
  expect_not_in serve.log "$PWD"
  expect_rounds 3
}

test_serve_benches_a_site_that_keeps_failing_and_records_it()
{
  trap net_cleanup EXIT
  net_init 3 4 || return
  # JSON logs on both sides: the events carry their figures as fields.
  serve_bg --min-clients 2 --max-site-failures 2 --log-format json
  join_bg site-1 --log-format json
  join_bg site-2
  join_bg site-3 --device cuda --max-failures 0
  expect_exit "$SERVE" 120 0 "fedl serve"
  expect_in serve.log "site site-3 failed 2 tasks in a row"
  expect_in serve.log "it sits out the rest of this run"
  "$PY" - serve.log site-1.log <<'PY' || fail "structured log fields"
import json, sys
serve = [json.loads(l) for l in open(sys.argv[1])]
site = [json.loads(l) for l in open(sys.argv[2])]
ev = lambda lines, name: [l for l in lines if l.get("event") == name]
assert [(b["site"], b["failures"]) for b in ev(serve, "site-benched")] == [("site-3", 2)], ev(serve, "site-benched")
done = ev(serve, "round-done")
assert [d["round"] for d in done] == [1, 2, 3, 4], done
assert all(0 < d["accuracy"] <= 1 and d["loss"] > 0 and d["updates"] == 2 for d in done), done
assert all(s["asked"] in (2, 3) and "site-1" in s["sites"] for s in ev(serve, "round-start")), ev(serve, "round-start")
assert any(e["site"] == "site-3" and e["class"] for e in ev(serve, "site-error")), ev(serve, "site-error")
sent = ev(site, "update-sent")
assert [s["round"] for s in sent] == [1, 2, 3, 4] and all(s["num_samples"] > 0 and s["site"] == "site-1" for s in sent), sent
PY
  expect_rounds 4
  attempts_json >attempts.json
  # Benched once, in the entry of the attempt where its second failure came; after it, every
  # round asks the two others only.
  check_py "$(json_get attempts.json "sum(len(a.get('benched', [])) for a in j)") == 1" \
    "benched not recorded once: $(cat attempts.json)"
  check_py "$(json_get attempts.json "[b['site'] for a in j for b in a.get('benched', [])] == ['site-3']")" \
    "the wrong site benched"
  local after
  after=$(json_get attempts.json \
    "[a['asked'] for a in j[next(i for i, a in enumerate(j) if a.get('benched')) + 1:]]")
  check_py "all(x == 2 for x in $after) and len($after) >= 1" "rounds after the benching asked $after sites"
  expect_in ws/ledger.jsonl '"max_site_failures":2'
  # site-3 never gave up by itself (--max-failures 0); it ends with the federation.
  expect_exit "${JOIN[site-3]}" 30 0 "fedl join site-3"
}

test_serve_stops_when_too_few_sites_are_left_to_train()
{
  trap net_cleanup EXIT
  net_init 2 3 || return
  serve_bg --min-clients 2 --max-site-failures 2
  join_bg site-1 --device cuda --max-failures 0
  join_bg site-2
  # With site-1 out, no round can reach --min-clients 2: serve says so and exits 1 at once,
  # rather than backing off and retrying until its caller's timeout.
  expect_exit "$SERVE" 90 1 "fedl serve with one of its two sites failing every task"
  expect_in serve.log "1 of the 2 sites failed 2 tasks in a row each (site-1), which leaves 1 for rounds that need --min-clients 2"
}
