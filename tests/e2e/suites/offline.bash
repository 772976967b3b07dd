# SPDX-License-Identifier: Apache-2.0
# The offline federation: fedl init, fedl train --identity, fedl aggregate --workspace,
# fedl audit; tampering and bad updates.

# A small federation on the bundled digits: ws/ with 3 sites and their shards.
make_ws()
{
  "$FEDL" -q init ws --clients 3 --arch logreg --partition "$DATA/digits.csv.gz" --no-header --split iid \
    --holdout 0.2 --seed 5 "$@" >/dev/null
}

# site_update SITE OUT [MODEL]: a signed update of SITE against MODEL (default: the initial model).
site_update()
{
  "$FEDL" -q train --identity "ws/clients/$1" --model "${3:-ws/models/global-000000.safetensors}" \
    --data "ws/clients/$1/data/train.csv" --no-header --epochs 1 --lr 0.01 --out "$2" >/dev/null
}

# py CODE...: runs Python with st_read importable and numpy as np.
py()
{
  "$PY" -c "import os, sys; sys.path.insert(0, os.environ['FEDL_SOURCE_DIR'] + '/tests/e2e'); import numpy as np, st_read
$1"
}

test_offline_rounds_example_reaches_92_percent_and_audits()
{
  "$FEDL_SOURCE_DIR/examples/offline-rounds/run" -r 10 -k 4 -s dirichlet:0.5 -w "$PWD/ws" >run.log 2>&1 ||
    { fail "the example failed"; cat run.log; return; }
  cat run.log
  local acc
  acc=$(awk '/^final test accuracy/ {print $4}' run.log)
  check_py "$acc >= 0.92" "accuracy after 10 rounds $acc < 0.92"
  fedl_expect 0 --json audit ws || return
  [[ $(json_get out "len(j['rounds'])") == 10 ]] || fail "audit does not report 10 rounds"
  [[ $(json_get out "j['rounds'][9]['participants']") == "['site-1', 'site-2', 'site-3', 'site-4']" ]] ||
    fail "round 10 participants: $(json_get out "j['rounds'][9]['participants']")"
}

test_init_layout_modes_and_certificates()
{
  make_ws --server-name fl.example.org --server-name 10.1.2.3 || { fail "init failed"; return; }
  for f in fedl.json ledger.jsonl pki/ca.crt pki/ca.key pki/server.crt pki/server.key pki/crl.pem \
    models/global-000000.safetensors data/test.csv clients/site-1/client.crt clients/site-1/client.key \
    clients/site-1/ca.crt clients/site-1/join.json clients/site-3/data/train.csv; do
    [[ -f ws/$f ]] || fail "init did not write $f"
  done
  [[ $(stat -c %a ws/pki) == 700 ]] || fail "pki/ is not 0700"
  [[ $(stat -c %a ws/clients/site-2) == 700 ]] || fail "clients/site-2 is not 0700"
  for k in ws/pki/ca.key ws/pki/server.key ws/clients/site-1/client.key; do
    [[ $(stat -c %a "$k") == 600 ]] || fail "$k is not 0600"
  done
  openssl verify -CAfile ws/pki/ca.crt ws/pki/server.crt ws/clients/site-1/client.crt >out 2>&1 ||
    fail "openssl verify rejects fedl's certificates: $(cat out)"
  openssl x509 -in ws/pki/server.crt -noout -ext subjectAltName >out 2>&1
  expect_in out "DNS:fl.example.org"
  expect_in out "IP Address:10.1.2.3"
  openssl x509 -in ws/clients/site-2/client.crt -noout -subject >out
  expect_in out "CN = site-2"
  [[ $(json_get ws/clients/site-1/join.json "j['server']") == "fl.example.org:7443" ]] || fail "join.json server"
  [[ $(json_get ws/fedl.json "j['clients']") == "['site-1', 'site-2', 'site-3']" ]] || fail "fedl.json clients"
  local n
  n=$(cat ws/clients/site-*/data/train.csv ws/data/test.csv | wc -l)
  [[ $n == 1797 ]] || fail "the shards and the holdout hold $n rows, not 1797"
  fedl_expect 0 audit ws
}

test_aggregate_and_audit_need_no_compute_backend()
{
  # The coordinator's commands never load LibTorch: they run with no backend installed at all.
  make_ws || { fail "init failed"; return; }
  site_update site-1 a.st || { fail "training failed"; return; }
  mkdir -p alone && cp "$FEDL" alone/fedl
  FEDL_BACKEND_PATH= alone/fedl -q aggregate --workspace ws a.st >/dev/null || fail "aggregate needs a backend"
  FEDL_BACKEND_PATH= alone/fedl audit ws >/dev/null || fail "audit needs a backend"
}

test_init_refuses_an_existing_workspace_and_force_replaces_it()
{
  make_ws || { fail "init failed"; return; }
  local ca
  ca=$(sha256sum ws/pki/ca.crt)
  fedl_expect 2 init ws --clients 2 --arch logreg --input-dim 64 --classes 10 || return
  expect_in err "already exists"
  [[ $(sha256sum ws/pki/ca.crt) == "$ca" ]] || fail "a refused init changed the workspace"
  fedl_expect 0 -q init ws/ --clients 2 --arch logreg --input-dim 64 --classes 10 --force || return
  [[ $(sha256sum ws/pki/ca.crt) != "$ca" ]] || fail "--force did not replace the workspace"
  [[ ! -d ws/clients/site-3 ]] || fail "--force left the old workspace's files"
  ls -a | grep -q '^\.ws\.' && fail "init left a temporary folder"
  return 0
}

test_init_bad_input()
{
  fedl_expect 2 init w1 --clients 2 --arch resnet --input-dim 4 --classes 3 && expect_in err "unknown architecture"
  fedl_expect 2 init w2 --clients 2 --arch logreg && expect_in err "--input-dim"
  fedl_expect 2 init w3 --arch logreg --input-dim 4 --classes 3 && expect_in err "needs sites"
  fedl_expect 2 init w4 --client a --client a --arch logreg --input-dim 4 --classes 3 && expect_in err "named twice"
  fedl_expect 2 init w5 --client ../evil --arch logreg --input-dim 4 --classes 3 && expect_in err "not valid"
  fedl_expect 2 init w6 --clients 2 --arch logreg --input-dim 4 --classes 3 --strategy fedmagic
  fedl_expect 2 init w7 --clients 2 --arch logreg --partition "$DATA/iris.csv" --no-header --split dirichlet:-1
  touch afile
  fedl_expect 1 init afile/ws --clients 2 --arch logreg --input-dim 4 --classes 3 && expect_in err "afile"
  for w in w1 w2 w3 w4 w5 w6 w7; do [[ -e $w ]] && fail "a failed init left $w"; done
  return 0
}

test_add_client_and_revoke()
{
  make_ws || { fail "init failed"; return; }
  fedl_expect 0 init ws --add-client hospital-b || return
  [[ -f ws/clients/hospital-b/client.key ]] || fail "no bundle for the added site"
  fedl_expect 2 init ws --add-client hospital-b && expect_in err "already exists"
  fedl_expect 0 init ws --revoke site-2 || return
  fedl_expect 2 init ws --revoke site-2 && expect_in err "already revoked"
  fedl_expect 2 init ws --revoke nobody && expect_in err "no site named nobody"
  openssl verify -crl_check -CAfile ws/pki/ca.crt -CRLfile ws/pki/crl.pem ws/clients/site-1/client.crt >/dev/null 2>&1 ||
    fail "openssl rejects a site that was not revoked"
  if openssl verify -crl_check -CAfile ws/pki/ca.crt -CRLfile ws/pki/crl.pem ws/clients/site-2/client.crt >out 2>&1; then
    fail "openssl accepts the revoked site"
  fi
  expect_in out "certificate revoked"
  # The revoked site's update is refused; the others aggregate.
  mkdir -p ws/clients/hospital-b/data && cp ws/clients/site-3/data/train.csv ws/clients/hospital-b/data/
  site_update site-1 u1.st && site_update site-2 u2.st && site_update hospital-b ub.st || { fail "training failed"; return; }
  fedl_expect 3 aggregate --workspace ws u1.st u2.st ub.st && expect_in err "revoked"
  fedl_expect 0 --json aggregate --workspace ws --on-bad-update skip u1.st u2.st ub.st || return
  [[ $(json_get out "[p['site'] for p in j['participants']]") == "['site-1', 'hospital-b']" ]] || fail "participants"
  [[ $(json_get out "j['rejected'][0]['site']") == site-2 ]] || fail "site-2 not rejected"
  fedl_expect 0 audit ws || return
  expect_in out "site added: hospital-b"
  expect_in out "site revoked: site-2"
  expect_in out "1 rejected"
}

test_aggregate_rounds_chain_in_the_workspace()
{
  make_ws || { fail "init failed"; return; }
  site_update site-1 a.st && site_update site-2 b.st || { fail "training failed"; return; }
  fedl_expect 0 --json aggregate --workspace ws a.st b.st || return
  [[ $(json_get out "j['round']") == 1 ]] || fail "first aggregate is not round 1"
  # Updates against the old base are now for another base model.
  fedl_expect 3 aggregate --workspace ws a.st b.st && expect_in err "base"
  site_update site-1 c.st ws/models/global-000001.safetensors || { fail "training failed"; return; }
  fedl_expect 0 --json aggregate --workspace ws --strategy fedadam c.st || return
  # The model relative to the workspace and its hash as model_sha256, as serve and audit name them.
  [[ $(json_get out "j['workspace'], j['model']") == "('ws', 'models/global-000002.safetensors')" ]] ||
    fail "round 2 model path: $(cat out)"
  [[ $(json_get out "j['model_sha256']") == "$(sha256sum ws/models/global-000002.safetensors | cut -d' ' -f1)" ]] ||
    fail "round 2 model_sha256: $(cat out)"
  ls ws/state/server-000002.safetensors >/dev/null || fail "no server optimizer state for fedadam"
  fedl_expect 0 audit ws && expect_in out "2 rounds"
}

# Round entries written before December 2026 named the server optimizer's settings server_lr and
# server_momentum; such a ledger still audits clean and reports them in today's names.
test_audit_reads_the_older_names_of_the_server_options()
{
  make_ws || { fail "init failed"; return; }
  site_update site-1 a.st || { fail "training failed"; return; }
  fedl_expect 0 aggregate --workspace ws --server-lr 0.5 --server-momentum 0.8 --clip-norm 3 a.st || return
  "$PY" "$FEDL_SOURCE_DIR/tests/e2e/resign_ledger.py" ws "
o = [e for e in L if e['kind'] == 'round'][0]['body']['options']
assert o.pop('lr') == 0.5 and o.pop('momentum') == 0.8, o
o['server_lr'] = 0.5
o['server_momentum'] = 0.8" || { fail "re-signing failed"; return; }
  grep -q '"server_lr":0.5' ws/ledger.jsonl || { fail "the ledger was not rewritten"; return; }
  fedl_expect 0 --json audit ws || return
  [[ $(json_get out "j['rounds'][0]['options'] == dict(lr=0.5, momentum=0.8, beta1=0.9, beta2=0.99, tau=0.001, clip_norm=3)") == True ]] ||
    fail "options as audited: $(json_get out "j['rounds'][0]['options']")"
  # Both names of one setting is no ledger fedl wrote.
  "$PY" "$FEDL_SOURCE_DIR/tests/e2e/resign_ledger.py" ws \
    "[e for e in L if e['kind'] == 'round'][0]['body']['options']['lr'] = 0.5" || { fail "re-signing failed"; return; }
  fedl_expect 3 audit ws && expect_in err "options.lr and options.server_lr are the same setting"
}

test_bad_updates_fail_or_are_skipped_and_recorded()
{
  make_ws || { fail "init failed"; return; }
  site_update site-1 good.st && site_update site-2 s2.st && site_update site-3 s3.st || { fail "training failed"; return; }
  # Another update of site-1 (another seed): the same site twice.
  "$FEDL" -q train --identity ws/clients/site-1 --model ws/models/global-000000.safetensors \
    --data ws/clients/site-1/data/train.csv --no-header --seed 7 --out twice.st >/dev/null
  head -c 3000 s2.st > truncated.st
  py '
t, m = st_read.read("s3.st")
def w(name, tensors, meta): st_read.write(name, tensors, meta)
m0 = {k: v for k, v in m.items() if k not in ("fedl.signature", "fedl.certificate", "fedl.site", "fedl.cert_sha256")}
w("nan.st", {k: (v.copy() * np.nan if k == "fc.bias" else v) for k, v in t.items()}, m0)
w("inf.st", {k: (v + np.inf if k == "fc.bias" else v) for k, v in t.items()}, m0)
w("zero.st", t, dict(m0, **{"fedl.num_samples": "0"}))
w("neg.st", t, dict(m0, **{"fedl.num_samples": "-5"}))
w("otherbase.st", t, dict(m0, **{"fedl.base_sha256": "0" * 64}))
w("renamed.st", {("fc.w" if k == "fc.weight" else k): v for k, v in t.items()}, m0)
w("reshaped.st", {k: (v.reshape(-1) if k == "fc.weight" else v) for k, v in t.items()}, m0)
w("tampered.st", {k: (v + 1 if k == "fc.bias" else v) for k, v in t.items()}, m)
'
  local f
  for f in truncated.st nan.st inf.st zero.st neg.st otherbase.st renamed.st reshaped.st; do
    fedl_expect 3 aggregate --base ws/models/global-000000.safetensors --out x.st good.st "$f" || continue
    expect_in err "$f"
  done
  expect_no_file x.st
  fedl_expect 3 aggregate --base ws/models/global-000000.safetensors --out x.st nan.st && expect_in err "NaN"
  fedl_expect 3 aggregate --base ws/models/global-000000.safetensors --out x.st otherbase.st && expect_in err "base"
  fedl_expect 3 aggregate --base ws/models/global-000000.safetensors --out x.st zero.st && expect_in err "num_samples"
  fedl_expect 3 aggregate --base ws/models/global-000000.safetensors --out x.st good.st twice.st &&
    expect_in err "more than one update"
  # In a workspace, unsigned and tampered updates are refused too; the ledger is unchanged.
  local before
  before=$(sha256sum ws/ledger.jsonl)
  fedl_expect 3 aggregate --workspace ws good.st nan.st && expect_in err "nan.st"
  fedl_expect 3 aggregate --workspace ws good.st tampered.st && expect_in err "signature"
  [[ $(sha256sum ws/ledger.jsonl) == "$before" ]] || fail "a failed aggregate changed the ledger"
  expect_no_file ws/models/global-000001.safetensors
  fedl_expect 0 --json aggregate --workspace ws --on-bad-update skip good.st s2.st twice.st truncated.st nan.st \
    tampered.st zero.st || return
  [[ $(json_get out "len(j['participants'])") == 2 ]] || fail "expected 2 participants: $(cat out)"
  [[ $(json_get out "len(j['rejected'])") == 5 ]] || fail "expected 5 rejected: $(cat out)"
  fedl_expect 0 --json audit ws || return
  [[ $(json_get out "j['rejected_updates']") == 5 ]] || fail "audit does not report the 5 rejected updates"
}

test_update_from_another_federation_is_refused()
{
  make_ws || { fail "init failed"; return; }
  "$FEDL" -q init other --clients 3 --arch logreg --input-dim 64 --classes 10 --seed 5 >/dev/null ||
    { fail "second init failed"; return; }
  # Same name (site-1), same base model, but a certificate of the other federation's CA.
  "$FEDL" -q train --identity other/clients/site-1 --model ws/models/global-000000.safetensors \
    --data ws/clients/site-1/data/train.csv --no-header --out foreign.st >/dev/null || { fail "training failed"; return; }
  fedl_expect 3 aggregate --workspace ws foreign.st || return
  expect_in err "not issued by this federation's CA"
}

test_unwritable_workspace_leaves_it_unchanged()
{
  make_ws || { fail "init failed"; return; }
  site_update site-1 a.st || { fail "training failed"; return; }
  local before
  before=$(sha256sum ws/ledger.jsonl)
  # A folder where the new model must go: it cannot be written (root ignores permission bits).
  mkdir ws/models/global-000001.safetensors
  fedl_expect 1 aggregate --workspace ws a.st && expect_in err "global-000001.safetensors"
  rmdir ws/models/global-000001.safetensors
  [[ $(sha256sum ws/ledger.jsonl) == "$before" ]] || fail "a failed aggregate changed the ledger"
  [[ -z $(ls -A ws/models | grep -v '^global-000000.safetensors$') ]] || fail "files left in models/: $(ls -A ws/models)"
  fedl_expect 0 audit ws
}

# tamper_case NAME COMMAND: copies the finished workspace, tampers with it, expects audit exit 3.
tamper_case()
{
  local name=$1
  shift
  rm -rf "t-$name" && cp -a ws "t-$name"
  (cd "t-$name" && eval "$*")
  "$FEDL" audit "t-$name" >"$name.out" 2>"$name.err"
  local rc=$?
  if [[ $rc != 3 ]]; then
    fail "audit after '$name' exited $rc, expected 3"
    cat "$name.out" "$name.err"
  else
    echo "$name: $(cat "$name.err")"
  fi
}

test_audit_detects_every_tampering()
{
  make_ws || { fail "init failed"; return; }
  local r
  for r in 1 2 3; do
    site_update site-1 a.st "ws/models/global-00000$((r - 1)).safetensors" &&
      site_update site-2 b.st "ws/models/global-00000$((r - 1)).safetensors" || { fail "training failed"; return; }
    "$FEDL" -q aggregate --workspace ws a.st b.st >/dev/null || { fail "aggregate failed"; return; }
  done
  fedl_expect 0 audit ws || return
  "$FEDL" -q init other --clients 1 --arch logreg --input-dim 64 --classes 10 >/dev/null
  tamper_case changed-byte "sed -i '3s/site-1/site-9/' ledger.jsonl"
  tamper_case changed-number "sed -i '2s/\"num_samples\":\([0-9]\)/\"num_samples\":9\1/' ledger.jsonl"
  tamper_case deleted-line "sed -i '3d' ledger.jsonl"
  tamper_case deleted-last-line "sed -i '\$d' ledger.jsonl"
  tamper_case swapped-lines "awk 'NR == 2 {held = \$0; next} NR == 3 {print; print held; next} {print}' ledger.jsonl > l && mv l ledger.jsonl"
  tamper_case model-replaced "cp models/global-000001.safetensors models/global-000002.safetensors"
  tamper_case model-deleted "rm models/global-000001.safetensors"
  tamper_case server-cert-from-another-ca "cp ../other/pki/server.crt pki/server.crt"
  tamper_case ca-replaced "cp ../other/pki/ca.crt pki/ca.crt"
  tamper_case config-edited "sed -i 's/\"rounds\": 10/\"rounds\": 11/' fedl.json"
  tamper_case crl-replaced "cp ../other/pki/crl.pem pki/crl.pem"
  expect_in changed-byte.err "line 3"
  expect_in deleted-line.err "line 3"
  expect_in swapped-lines.err "line 2"
  expect_in model-replaced.err "global-000002.safetensors"
  expect_in server-cert-from-another-ca.err "server.crt"
}

test_config_errors_name_the_field()
{
  make_ws || { fail "init failed"; return; }
  py '
import json
j = json.load(open("ws/fedl.json"))
j["training"]["learnig_rate"] = 0.1
json.dump(j, open("ws/fedl.json", "w"))
'
  site_update site-1 a.st || { fail "training failed"; return; }
  fedl_expect 2 aggregate --workspace ws a.st && expect_in err "unknown key training.learnig_rate"
}

test_review_findings_stay_fixed()
{
  make_ws || { fail "init failed"; return; }
  site_update site-1 a.st || { fail "training failed"; return; }
  local before
  before=$(sha256sum ws/ledger.jsonl)
  # A replaced latest model is refused before anything is written.
  cp ws/models/global-000000.safetensors saved.st
  "$FEDL" -q train --data "$DATA/digits.csv.gz" --no-header --arch logreg --epochs 0 --seed 99 \
    --save-model ws/models/global-000000.safetensors >/dev/null
  fedl_expect 3 aggregate --workspace ws a.st && expect_in err "does not match the ledger"
  cp saved.st ws/models/global-000000.safetensors
  # Another fedl command holding the workspace lock: refused at once, nothing written.
  flock ws/.lock sleep 3 &
  sleep 0.5
  fedl_expect 1 aggregate --workspace ws a.st && expect_in err "being changed by another fedl command"
  fedl_expect 1 init ws --add-client late && expect_in err "being changed"
  wait
  [[ $(sha256sum ws/ledger.jsonl) == "$before" ]] || fail "a refused command changed the ledger"
  # The same unsigned update twice is not double weight.
  "$FEDL" -q train --data "$DATA/digits.csv.gz" --no-header --model ws/models/global-000000.safetensors \
    --out plain.st >/dev/null
  fedl_expect 3 aggregate --base ws/models/global-000000.safetensors --out x.st plain.st plain.st &&
    expect_in err "the same update file is given twice"
  # --force never wipes a folder that is not a workspace.
  mkdir keep && echo x > keep/file
  fedl_expect 2 init keep --clients 2 --arch logreg --input-dim 4 --classes 3 --force && expect_in err "not a fedl workspace"
  [[ -f keep/file ]] || fail "--force deleted a folder that is not a workspace"
  # The model must fit the partitioned data.
  fedl_expect 1 init w1 --clients 2 --arch logreg --partition "$DATA/iris.csv" --no-header --classes 2 &&
    expect_in err "label 2 is outside the model's 2 classes"
  fedl_expect 2 init w2 --clients 2 --arch logreg --partition "$DATA/iris.csv" --no-header --input-dim 7 &&
    expect_in err "does not fit"
  # fedl.json cannot point outside the workspace.
  py '
import json
j = json.load(open("ws/fedl.json"))
j["model"]["torchscript"] = "../../escape.txt"
json.dump(j, open("ws/fedl.json", "w"))
'
  fedl_expect 2 init ws --add-client evil && expect_in err "model.torchscript must be a file name"
  [[ -e escape.txt || -e ../escape.txt ]] && fail "a file was written outside the workspace"
  return 0
}
