# SPDX-License-Identifier: Apache-2.0
# Metrics beyond accuracy and loss (--metrics-set classification: per-class precision, recall
# and F1, macro and weighted F1, and for two classes sensitivity, specificity and ROC AUC), in
# fedl eval and in the coordinator's evaluation, checked against an independent computation;
# and the best model (serve --best-metric): recorded in every round entry, models/best.safetensors
# linked to it, checked by fedl audit, put back by a coordinator that resumes.

# shellcheck source=../net_lib.bash
source "$FEDL_SOURCE_DIR/tests/e2e/net_lib.bash"

test_eval_classification_metrics_match_an_independent_computation()
{
  # The digits as a binary task (is it a 3?): 183 positives of 1797.
  zcat "$DATA/digits.csv.gz" | awk -F, 'BEGIN {OFS = ","} {$NF = ($NF == 3) ? 1 : 0; print}' >three.csv
  "$FEDL" -q train --data three.csv --no-header --arch logreg --epochs 2 --seed 3 --save-model m.st >train.log 2>&1 ||
    { fail "fedl train"; cat train.log; return; }
  fedl_expect 0 --json eval --data three.csv --no-header --model m.st --metrics-set classification || return
  cp out eval.json
  # The same figures from the model's weights, with NumPy: probabilities, the confusion matrix,
  # the F1s and the AUC by counting pairs.
  PYTHONPATH="$FEDL_SOURCE_DIR/tests/e2e" "$PY" - m.st three.csv eval.json <<'PY' || fail "the metrics differ from NumPy's"
import json, sys
import numpy as np
import st_read
t, _ = st_read.read(sys.argv[1])
d = np.loadtxt(sys.argv[2], delimiter=",", dtype=np.float32)
x, y = d[:, :-1], d[:, -1].astype(int)
z = x @ t["fc.weight"].T + t["fc.bias"]
p = np.exp(z - z.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
pred = p.argmax(1)
j = json.load(open(sys.argv[3]))
close = lambda a, b: abs(a - b) < 1e-9
assert j["samples"] == 1797 and close(j["accuracy"], (pred == y).mean()), j
f1 = []
for k in (0, 1):
    tp = int(((pred == k) & (y == k)).sum()); fp = int(((pred == k) & (y != k)).sum()); fn = int(((pred != k) & (y == k)).sum())
    c = j["per_class"][k]
    assert c["support"] == tp + fn and close(c["precision"], tp / (tp + fp)) and close(c["recall"], tp / (tp + fn)), c
    f1.append(2 * tp / (2 * tp + fp + fn))
    assert close(c["f1"], f1[-1]), (c, f1)
assert close(j["macro_f1"], sum(f1) / 2), j["macro_f1"]
assert close(j["sensitivity"], j["per_class"][1]["recall"]) and close(j["specificity"], j["per_class"][0]["recall"])
s = p[:, 1]; pos, neg = s[y == 1], s[y == 0]
auc = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
assert abs(j["roc_auc"] - auc) < 1e-6, (j["roc_auc"], auc)
assert 0.5 < auc <= 1
print("accuracy %.4f macro F1 %.4f AUC %.4f" % (j["accuracy"], j["macro_f1"], auc))
PY
  # For a person: the means and a line per class.
  fedl_expect 0 eval --data three.csv --no-header --model m.st --metrics-set classification || return
  expect_in out "ROC AUC"
  grep -qE '^ +1 +[0-9.]+ +[0-9.]+ +[0-9.]+ +183$' out || { fail "class 1's line"; cat out; }
  # basic stays as it was; an unknown set is a usage error.
  fedl_expect 0 --json eval --data three.csv --no-header --model m.st || return
  check_py "$(json_get out "sorted(j) == ['accuracy', 'loss', 'samples', 'schema']")" "basic: $(cat out)"
  fedl_expect 2 eval --data three.csv --no-header --model m.st --metrics-set everything || return
}

test_serve_records_the_metrics_and_the_best_model_and_audit_checks_them()
{
  trap net_cleanup EXIT
  net_init 2 4 || return
  # Usage errors first: a metric the set does not measure; metrics without evaluation data.
  fedl_expect 2 serve ws --best-metric macro_f1 || return
  expect_in err "--metrics-set classification"
  serve_bg --min-clients 2 --metrics-set classification --best-metric macro_f1
  join_bg site-1
  join_bg site-2
  expect_exit "$SERVE" 120 0 "fedl serve"
  expect_rounds 4
  # Every round's evaluation has the classification metrics; each "best" is the round with the
  # highest macro F1 so far, and models/best.safetensors is that round's model (a hard link).
  "$PY" - ws/ledger.jsonl <<'PY' || fail "the ledger's metrics or best"
import json, sys
R = [json.loads(l)["body"] for l in open(sys.argv[1]) if json.loads(l)["kind"] == "round"]
best = None
for r in R:
    e = r["evaluation"]
    assert len(e["per_class"]) == 10 and 0 < e["macro_f1"] <= 1 and 0 < e["weighted_f1"] <= 1, e
    assert sum(c["support"] for c in e["per_class"]) == e["samples"] == 359, e
    if best is None or e["macro_f1"] > best[1]:
        best = (r["round"], e["macro_f1"])
    assert r["best"] == {"round": best[0], "metric": "macro_f1", "value": best[1]}, (r["best"], best)
print("best: round %d, macro F1 %.4f" % best)
open("best-round", "w").write(str(best[0]))
PY
  local best
  best=$(printf 'models/global-%06d.safetensors' "$(cat best-round)")
  [[ ws/models/best.safetensors -ef ws/$best ]] || fail "models/best.safetensors is not $best"
  fedl_expect 0 --json audit ws || return
  check_py "$(json_get out "j['best']['round'] == $(cat best-round) and j['best']['file'] == 'models/best.safetensors'")" \
    "audit --json best: $(json_get out "j.get('best')")"
  check_py "$(json_get out "all(r['best']['metric'] == 'macro_f1' for r in j['rounds'])")" "audit rounds' best"
  fedl_expect 0 audit ws || return
  expect_in out "best model: round $(cat best-round) by macro_f1"

  # Lost between a round's entry and its link (a crash): a coordinator that resumes puts it back.
  rm ws/models/best.safetensors
  fedl_expect 0 serve ws --metrics-set classification --best-metric macro_f1 || return
  [[ ws/models/best.safetensors -ef ws/$best ]] || fail "serve did not put models/best.safetensors back"

  # Another model in its place, or a ledger whose best is not the best: the audit fails.
  cp ws/models/global-000000.safetensors best.bak
  rm ws/models/best.safetensors
  cp best.bak ws/models/best.safetensors
  fedl_expect 3 audit ws || return
  expect_in err "is not the best model the ledger records"
  rm ws/models/best.safetensors
  ln "ws/$best" ws/models/best.safetensors
  "$PY" "$FEDL_SOURCE_DIR/tests/e2e/resign_ledger.py" ws \
    "[e['body'].update(best=dict(e['body']['best'], value=0.99)) for e in L if e['kind'] == 'round' and e['body']['round'] == 4]" ||
    { fail "re-signing failed"; return; }
  fedl_expect 3 audit ws || return
  expect_in err "round 4 records round"
  expect_in err "but the evaluations say"
}

test_sites_evaluate_the_global_model_on_their_own_data_and_the_coordinator_pools_it()
{
  trap net_cleanup EXIT
  net_init 2 3 || return
  # Validation data that does not fit the contract is refused before the site connects.
  fedl_expect 2 join ws/clients/site-1 --data ws/clients/site-1/data/train.csv --eval-data "$DATA/iris.csv" \
    --no-header --retry-max 1 || return
  expect_in err "iris.csv"
  fedl_expect 2 join ws/clients/site-1 --data ws/clients/site-1/data/train.csv --metrics-set classification || return
  expect_in err "give --eval-data"
  # site-1 validates on the coordinator's own held-out set, so its figure for a model must be
  # the coordinator's for the same model; site-2 on 50 rows of its own.
  tail -50 ws/clients/site-2/data/train.csv >site-2-val.csv
  serve_bg --min-clients 2 --metrics-set classification
  join_bg site-1 --eval-data ws/data/test.csv --metrics-set classification
  join_bg site-2 --eval-data site-2-val.csv --metrics-set classification
  expect_exit "$SERVE" 120 0 "fedl serve"
  expect_rounds 3
  expect_in site-1.log "the global model on 359 validation samples"
  "$PY" - ws/ledger.jsonl <<'PY' || fail "the federated evaluation"
import json, sys
R = [json.loads(l)["body"] for l in open(sys.argv[1]) if json.loads(l)["kind"] == "round"]
for r in R:
    f, m = r["federated_evaluation"], r["site_metrics"]
    assert f["model_round"] == r["round"] - 1 and f["sites"] == 2 and f["samples"] == 359 + 50, f
    assert m["site-1"]["eval_samples"] == 359 and m["site-2"]["eval_samples"] == 50, m
    acc = sum(m[s]["eval_accuracy"] * m[s]["eval_samples"] for s in m) / f["samples"]
    loss = sum(m[s]["eval_loss"] * m[s]["eval_samples"] for s in m) / f["samples"]
    assert abs(f["accuracy"] - acc) < 1e-12 and abs(f["loss"] - loss) < 1e-12, (f, acc, loss)
    # The confusion matrices summed give the pooled per-class figures.
    conf = [sum(m[s]["eval_confusion"][k] for s in m) for k in range(100)]
    for c in range(10):
        tp, row, col = conf[c * 11], sum(conf[c * 10:c * 10 + 10]), sum(conf[c::10])
        assert f["per_class"][c]["support"] == row, (c, f["per_class"][c])
        assert abs(f["per_class"][c]["f1"] - (2 * tp / (row + col) if row + col else 0)) < 1e-12, f["per_class"][c]
    assert f["classification_sites"] == 2 and "roc_auc" not in f and 0 < f["macro_f1"] <= 1, f
# The same model on the same data at the site and at the coordinator: the same figures.
for before, r in zip(R, R[1:]):
    ev, site = before["evaluation"], r["site_metrics"]["site-1"]
    assert ev["accuracy"] == site["eval_accuracy"], (ev, site)
    assert abs(ev["loss"] - site["eval_loss"]) < 1e-6, (ev, site)
    conf = site["eval_confusion"]
    assert [c["support"] for c in ev["per_class"]] == [sum(conf[k * 10:k * 10 + 10]) for k in range(10)], ev
    assert [c["recall"] for c in ev["per_class"]] == [conf[k * 11] / sum(conf[k * 10:k * 10 + 10]) for k in range(10)]
print("federated accuracy by round:", [round(r["federated_evaluation"]["accuracy"], 4) for r in R])
PY
  fedl_expect 0 --json audit ws || return
  check_py "$(json_get out "[r['federated_evaluation']['model_round'] for r in j['rounds']] == [0, 1, 2]")" \
    "audit --json: $(json_get out "[r.get('federated_evaluation') for r in j['rounds']]")"
  # The report draws them beside the coordinator's: rounds 1 and 2 (the initial model is not
  # on the rounds' axis).
  fedl_expect 0 report ws -o report.html || return
  [[ $(grep -c 'class="point" data-series="at the sites"' report.html) == 4 ]] ||
    fail "report: $(grep -c 'data-series="at the sites"' report.html) points at the sites"
}
