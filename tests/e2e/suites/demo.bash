# SPDX-License-Identifier: Apache-2.0
# make demo: the networked example (examples/networked/run) runs to the end, reaches the accuracy
# the README promises and leaves a workspace that passes audit.

test_networked_demo_reaches_93_percent_in_15_rounds_and_audits()
{
  timeout 300 "$FEDL_SOURCE_DIR/examples/networked/run" -r 15 -k 4 -s dirichlet:0.5 -w "$PWD/ws" >run.log 2>&1 ||
    { fail "the example failed"; cat run.log; return; }
  cat run.log
  expect_in run.log "15 rounds, latest model models/global-000015.safetensors"
  local acc
  acc=$(sed -n 's/^final test accuracy: \([0-9.]*\) after 15 rounds$/\1/p' run.log)
  [[ -n $acc ]] || { fail "no final accuracy line"; return; }
  check_py "$acc >= 0.93" "final accuracy $acc is below 0.93"
  "$FEDL" audit ws >audit.log 2>&1 || fail "fedl audit failed on the demo's workspace"
  # Every round ran once, with all four sites, each evaluated by the coordinator.
  "$PY" - ws/ledger.jsonl <<'PY' || fail "the ledger does not record 15 rounds of 4 sites each"
import json, sys
rounds = [json.loads(l)["body"] for l in open(sys.argv[1]) if json.loads(l)["kind"] == "round"]
assert [r["round"] for r in rounds] == list(range(1, 16)), [r["round"] for r in rounds]
assert all(len(r["participants"]) == 4 for r in rounds)
assert all(0 < r["evaluation"]["accuracy"] <= 1 for r in rounds)
PY
}
