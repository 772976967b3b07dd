# SPDX-License-Identifier: Apache-2.0
# A TorchScript module exported by Python (Debian's python3-torch) trains and evaluates in
# fedl, and its weights travel as safetensors that Python loads back.

# shellcheck source=../net_lib.bash
source "$FEDL_SOURCE_DIR/tests/e2e/net_lib.bash"
suite_probe()
{
  "$PY" -c 'import torch' 2>/dev/null || { echo "python3-torch is not installed"; return 1; }
  command -v pgrep >/dev/null || { echo "pgrep (procps) is not installed"; return 1; }
}

export_module()
{
  "$PY" "$FEDL_SOURCE_DIR/tests/e2e/export_torchscript.py" net.pt
}

test_torchscript_trains_and_evaluates()
{
  export_module || { fail "cannot export the module"; return; }
  digits_split
  fedl_expect 0 -q train --data digits-train.csv --no-header --torchscript net.pt --epochs 20 --lr 0.1 \
    --save-model w.st || return
  fedl_expect 0 --json eval --data digits-test.csv --no-header --torchscript net.pt --model w.st || return
  local acc
  acc=$(json_get out "j['accuracy']")
  echo "TorchScript net on digits: $acc"
  check_py "$acc >= 0.9" "TorchScript accuracy $acc < 0.9"
  # Python loads fedl's weights into the same module and gets the same accuracy.
  "$PY" - "$acc" <<'PY' || fail "Python disagrees with fedl about the trained TorchScript model"
import sys, os
sys.path.insert(0, os.environ["FEDL_SOURCE_DIR"] + "/tests/e2e")
import numpy as np, torch, st_read
tensors, meta = st_read.read("w.st")
assert meta["fedl.arch"] == "torchscript", meta
m = torch.jit.load("net.pt")
m.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()})
d = np.loadtxt("digits-test.csv", delimiter=",", dtype=np.float32)
with torch.no_grad():
    acc = (m(torch.from_numpy(d[:, :-1])).argmax(1).numpy() == d[:, -1]).mean()
assert abs(acc - float(sys.argv[1])) < 1e-9, (acc, sys.argv[1])
PY
}

test_torchscript_update_from_model_file()
{
  export_module || { fail "cannot export the module"; return; }
  fedl_expect 0 -q train --data "$DATA/digits.csv.gz" --no-header --torchscript net.pt --epochs 0 --save-model w0.st || return
  fedl_expect 0 -q train --data "$DATA/digits.csv.gz" --no-header --torchscript net.pt --model w0.st --epochs 1 \
    --out u.st || return
  [[ $("$PY" "$FEDL_SOURCE_DIR/tests/e2e/st_read.py" u.st) == *'"fedl.kind": "update"'* ]] || fail "no update written"
  fedl_expect 2 eval --data "$DATA/digits.csv.gz" --no-header --model w0.st || return
  expect_in err "--torchscript"
}

test_corrupt_torchscript_is_exit_3()
{
  head -c 3000 /dev/urandom > bad.pt
  fedl_expect 3 train --data "$DATA/digits.csv.gz" --no-header --torchscript bad.pt --save-model x.st || return
  expect_in err "bad.pt"
  expect_no_file x.st
}

test_torchscript_federation_offline_round()
{
  export_module || { fail "cannot export the module"; return; }
  fedl_expect 0 -q init ws --clients 2 --torchscript net.pt --partition "$DATA/digits.csv.gz" --no-header \
    --split iid --seed 2 || return
  cmp -s net.pt ws/model.pt || fail "the workspace's model.pt is not the given module"
  cmp -s net.pt ws/clients/site-1/model.pt || fail "the site bundle lacks the module"
  [[ $(json_get ws/clients/site-1/join.json "j['model']['torchscript']") == model.pt ]] || fail "join.json model"
  local s
  for s in site-1 site-2; do
    "$FEDL" -q train --identity "ws/clients/$s" --torchscript "ws/clients/$s/model.pt" \
      --model ws/models/global-000000.safetensors --data "ws/clients/$s/data/train.csv" --no-header \
      --lr 0.1 --epochs 5 --out "$s.st" >/dev/null || { fail "training at $s failed"; return; }
  done
  fedl_expect 0 -q aggregate --workspace ws site-1.st site-2.st || return
  fedl_expect 0 --json eval --torchscript ws/model.pt --model ws/models/global-000001.safetensors \
    --data "$DATA/digits.csv.gz" --no-header || return
  check_py "$(json_get out "j['accuracy']") > 0.8" "one round of the TorchScript federation: $(cat out)"
  fedl_expect 0 audit ws
}

# make_modules DIR: the benign and hostile modules of tests/e2e/make_modules.py in DIR.
make_modules()
{
  "$PY" "$FEDL_SOURCE_DIR/tests/e2e/make_modules.py" "$1" 2>modules.err || { fail "make_modules.py failed"; cat modules.err; return 1; }
  [[ ! -s modules.err ]] || { fail "make_modules.py could not script every module"; cat modules.err; return 1; }
}

# Modules of the kinds users write pass the inspection and train; BatchNorm's running statistics
# are fine without DP-SGD and refused with it.
test_benign_modules_pass_the_inspection_and_train()
{
  make_modules m || return
  digits_split
  local name
  for name in residual conv embed; do
    fedl_expect 0 --json inspect "m/$name.pt" || return
    [[ $(json_get out "j['verdict'], j['refused']") == "('allowed', [])" ]] || fail "$name: $(cat out)"
    if [[ $name != conv ]]; then
      [[ $(json_get out "j['needs_dp_off']") == "[]" ]] || fail "$name needs DP-SGD off: $(cat out)"
    fi
    fedl_expect 0 -q train --data digits-train.csv --no-header --torchscript "m/$name.pt" --epochs 10 --lr 0.05 \
      --save-model "$name.st" || return
    fedl_expect 0 --json eval --data digits-test.csv --no-header --torchscript "m/$name.pt" --model "$name.st" || return
    echo "$name: accuracy $(json_get out "j['accuracy']") on the held-out digits"
    check_py "$(json_get out "j['accuracy']") >= 0.8" "$name trained to $(json_get out "j['accuracy']") < 0.8"
  done
  fedl_expect 0 --json inspect m/conv.pt || return
  json_get out "[f['reason'] for f in j['needs_dp_off']]" | grep -q "running statistics" ||
    fail "conv's BatchNorm is not listed as needing DP-SGD off: $(cat out)"
  fedl_expect 3 train --data "$DATA/digits.csv.gz" --no-header --torchscript m/conv.pt --epochs 1 \
    --dp-noise-multiplier 1 --dp-max-grad-norm 1 --save-model dp.st || return
  expect_in err "cannot train under DP-SGD: aten::batch_norm in"
  expect_in err "updates the running statistics"
  expect_no_file dp.st
}

# The two modules of the issue (a file's bytes into the bias; a training record into a weight
# row) and the ways of hiding them are refused before they run, with and without DP-SGD, naming
# the operator, the method and the line of the module's source.
test_hostile_modules_are_refused_before_they_run()
{
  make_modules m || return
  local name want
  for name in file-read row-copy other-method hidden-submodule uninitialised prints sets-buffer setstate saves \
    foreign-op; do
    case $name in
      file-read) want="aten::from_file in __torch__.FileRead.forward (" ;;
      row-copy) want="aten::copy_ in __torch__.RowCopy.forward (" ;;
      other-method) want="aten::mul_ in __torch__.OtherMethod.keep (" ;;
      hidden-submodule) want="aten::index_put_ in __torch__.Thief.forward (" ;;
      uninitialised) want="aten::empty in __torch__.Uninitialised.forward (" ;;
      prints) want="prim::Print in __torch__.Prints.forward (" ;;
      sets-buffer) want="prim::SetAttr in __torch__.SetsBuffer.forward" ;;
      setstate) want="__setstate__ in the module's loading" ;;
      saves) want="aten::from_file in __torch__.Saves.forward (" ;;
      foreign-op) want="fedltest:: in the module's code (code/__torch__.py): an operator of the fedltest namespace" ;;
    esac
    fedl_expect 3 train --data "$DATA/digits.csv.gz" --no-header --torchscript "m/$name.pt" --epochs 1 \
      --save-model "$name.st" || return
    expect_in err "is refused by fedl's TorchScript allow-list (version 1): $want"
    fedl_expect 3 train --data "$DATA/digits.csv.gz" --no-header --torchscript "m/$name.pt" --epochs 1 \
      --dp-noise-multiplier 1 --dp-max-grad-norm 1 --save-model "$name.st" || return
    expect_in err "$want"
    expect_no_file "$name.st"
  done
  # eval, too, inspects before it loads (the model file's weights never reach the module).
  fedl_expect 0 -q train --data "$DATA/digits.csv.gz" --no-header --arch mlp:8 --epochs 0 --save-model base.st || return
  fedl_expect 3 eval --data "$DATA/digits.csv.gz" --no-header --torchscript m/row-copy.pt --model base.st
  expect_in err "writes the parameter fc.weight in place"
  # Where the module kept its source, the line is the author's file, not the archive's.
  fedl_expect 3 train --data "$DATA/digits.csv.gz" --no-header --torchscript m/row-copy.pt --save-model x.st
  expect_in err "make_modules.py:"
  expect_in err "writes the parameter fc.weight in place"
  fedl_expect 3 train --data "$DATA/digits.csv.gz" --no-header --torchscript m/hidden-submodule.pt --save-model x.st
  expect_in err "writes the parameter lin.weight in place"
  fedl_expect 3 train --data "$DATA/digits.csv.gz" --no-header --torchscript m/file-read.pt --save-model x.st
  expect_in err "maps a file into a tensor"
  expect_in err "and 1 more (fedl inspect m/file-read.pt lists them)"
  # The operator is told at init, before any site is.
  fedl_expect 3 init ws --clients 2 --torchscript m/row-copy.pt --partition "$DATA/digits.csv.gz" --no-header \
    --split iid --rounds 1
  expect_in err "writes the parameter fc.weight in place"
}

# fedl inspect: what a module holds (as Python sees it), its SHA-256 and its operators; a fedl
# model file is data; exit 3 for a refused module, with every refusal listed.
test_inspect_lists_what_a_module_holds()
{
  export_module || { fail "cannot export the module"; return; }
  fedl_expect 0 --json inspect net.pt || return
  [[ $(json_get out "j['sha256']") == "$(sha256sum net.pt | cut -d' ' -f1)" ]] || fail "inspect's SHA-256 is not the file's"
  "$PY" - <<'PY' || fail "fedl inspect and Python disagree about net.pt"
import json, torch
j = json.load(open("out"))
m = torch.jit.load("net.pt")
want = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in m.named_parameters()]
assert j["parameters"] == want, (j["parameters"], want)
assert j["buffers"] == [], j["buffers"]
assert j["operators"]["aten::linear"] >= 2 and j["operators"]["aten::tanh"] >= 1, j["operators"]
assert "__torch__.Net.forward" in j["methods"], j["methods"]
assert j["verdict"] == "allowed" and j["allow_list_version"] == 1, j
PY
  fedl_expect 0 inspect net.pt || return
  expect_in out "verdict: allowed by fedl's allow-list (version 1)"
  expect_in out "body.0.weight [48, 64] float32"
  # A model file: tensors and metadata, nothing that runs.
  fedl_expect 0 -q train --data "$DATA/digits.csv.gz" --no-header --torchscript net.pt --epochs 0 --save-model w.st || return
  fedl_expect 0 --json inspect w.st || return
  [[ $(json_get out "j['format'], j['verdict'], j['metadata']['fedl.arch']") == "('safetensors', 'data', 'torchscript')" ]] ||
    fail "inspect of a model file: $(cat out)"
  # A refused module: exit 3, each refusal with its operator, method and line.
  make_modules m || return
  fedl_expect 3 --json inspect m/file-read.pt || return
  [[ $(json_get out "[r['operator'] for r in j['refused']]") == "['aten::from_file', 'aten::copy_']" ]] ||
    fail "inspect's refusals: $(cat out)"
  fedl_expect 3 inspect m/file-read.pt || return
  expect_in out "refused: aten::from_file in __torch__.FileRead.forward"
  fedl_expect 2 inspect missing.pt
  head -c 3000 /dev/urandom > junk.pt
  fedl_expect 3 inspect junk.pt
}

# In a real federation: a site whose bundle carries a hostile module (as an operator could ship
# it: a bundle without the signed contract that pins the module, as older fedl made them) refuses
# it at every task and says why, and none of its bytes reaches a global model; the policies
# strict and pinned are checked before a site connects; the ledger records each site's policy.
test_sites_refuse_a_hostile_module_and_keep_their_pin()
{
  trap net_cleanup EXIT
  export_module || { fail "cannot export the module"; return; }
  make_modules m || return
  PORT=$(free_port) || return
  fedl_expect 0 -q init ws --clients 2 --torchscript net.pt --partition "$DATA/digits.csv.gz" --no-header \
    --split iid --holdout 0.2 --rounds 3 --seed 1 --lr 0.03 --epochs 1 --listen "127.0.0.1:$PORT" || return
  "$PY" -c "import json; p = 'ws/clients/site-2/join.json'; j = json.load(open(p)); del j['contract'], j['signature']; json.dump(j, open(p, 'w'))"
  cp m/row-copy.pt ws/clients/site-2/model.pt
  local sha bad data=(--data ws/clients/site-1/data/train.csv --no-header --server 127.0.0.1:1 --retry-for 1)
  sha=$(sha256sum ws/clients/site-1/model.pt | cut -d' ' -f1)
  bad=$(sha256sum m/row-copy.pt | cut -d' ' -f1)
  fedl_expect 3 join ws/clients/site-1 "${data[@]}" --model-policy strict || return
  expect_in err "--model-policy strict trains fedl's own architectures only"
  fedl_expect 3 join ws/clients/site-1 "${data[@]}" --pin-model "$bad" || return
  expect_in err "is not the module pinned with --pin-model (its SHA-256 is $sha, the pin $bad)"
  fedl_expect 2 join ws/clients/site-1 "${data[@]}" --model-policy pinned || return
  expect_in err "--model-policy pinned needs --pin-model SHA256"
  fedl_expect 2 join ws/clients/site-1 "${data[@]}" --model-policy strict --pin-model "$sha" || return
  fedl_expect 2 join ws/clients/site-1 "${data[@]}" --pin-model "${sha:0:10}" || return

  serve_bg --min-clients 1 --heartbeat 1
  join_bg site-1 --pin-model "$sha"
  join_bg site-2
  expect_exit "$SERVE" 120 0 "fedl serve"
  expect_exit "${JOIN[site-1]}" 30 0 "fedl join site-1"
  [[ $FAILED == 0 ]] || { tail -20 serve.log site-2.log; return; }
  expect_in site-2.log "is refused by fedl's TorchScript allow-list (version 1): aten::copy_ in __torch__.RowCopy.forward"
  expect_rounds 3
  expect_ledger "all(sites(b) == ['site-1'] for b in R)" "a round took an update of site-2"
  expect_ledger "all(b['site_metrics']['site-1']['model_policy'] == 'pinned' for b in R)" "site-1's policy is not recorded"
  # The site's refusal reaches the coordinator as a class, not as the site's words.
  expect_not_in serve.log "RowCopy"
}
