# SPDX-License-Identifier: Apache-2.0
# A TorchScript module exported by Python (Debian's python3-torch) trains and evaluates in
# fedl, and its weights travel as safetensors that Python loads back.

suite_probe()
{
  "$PY" -c 'import torch' 2>/dev/null || { echo "python3-torch is not installed"; return 1; }
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
