# SPDX-License-Identifier: Apache-2.0
# fedl train and fedl eval on real data: accuracy, update files, formats, and every bad input.

test_mlp_on_digits_scores_at_least_95_percent()
{
  digits_split
  fedl_expect 0 train --data digits-train.csv --no-header --arch mlp:128 --epochs 30 --lr 0.01 --seed 1 \
    --save-model mlp.st || return
  fedl_expect 0 --json eval --model mlp.st --data digits-test.csv --no-header || return
  local acc
  acc=$(json_get out "j['accuracy']")
  echo "digits mlp:128 test accuracy: $acc"
  check_py "$acc >= 0.95" "digits accuracy $acc < 0.95"
  [[ $(json_get out "j['samples']") == 359 ]] || fail "expected 359 test samples"
}

test_update_is_trained_minus_base_with_metadata()
{
  digits_split
  fedl_expect 0 -q train --data digits-train.csv --no-header --arch mlp:32,16 --epochs 0 --seed 7 --save-model base.st || return
  fedl_expect 0 --json train --data digits-train.csv --no-header --model base.st --epochs 2 --lr 0.01 \
    --out update.st --save-model trained.st || return
  mv out train.json
  local sha
  sha=$(sha256sum base.st | cut -d' ' -f1)
  "$PY" - "$sha" <<'PY' || fail "update/model content check failed"
import json, sys
sys.path.insert(0, __import__("os").environ["FEDL_SOURCE_DIR"] + "/tests/e2e")
import numpy as np
import st_read
base, bm = st_read.read("base.st")
trained, tm = st_read.read("trained.st")
upd, um = st_read.read("update.st")
assert sorted(base) == ["layers.0.bias", "layers.0.weight", "layers.2.bias", "layers.2.weight",
                        "layers.4.bias", "layers.4.weight"], sorted(base)
assert base["layers.0.weight"].shape == (32, 64) and base["layers.4.weight"].shape == (10, 16)
for k in base:
    assert np.allclose(trained[k] - base[k], upd[k], atol=1e-6), k
assert any(np.abs(upd[k]).max() > 0 for k in upd), "the update is all zeros"
assert bm == {"fedl.kind": "model", "fedl.arch": "mlp:32,16", "fedl.input_shape": "64", "fedl.classes": "10"}, bm
assert um["fedl.kind"] == "update" and um["fedl.base_sha256"] == sys.argv[1], um
assert um["fedl.num_samples"] == "1438" and um["fedl.epochs"] == "2" and um["fedl.arch"] == "mlp:32,16", um
j = json.load(open("train.json"))
assert abs(float(um["fedl.loss"]) - j["loss"]) < 1e-9, (um, j)
assert j["base_sha256"] == sys.argv[1]
PY
}

test_arch_with_out_uses_the_fresh_model_hash()
{
  fedl_expect 0 -q train --data "$DATA/iris.csv" --no-header --arch logreg --seed 3 --epochs 0 --save-model fresh.st || return
  # The same seed makes the same bytes, so the fresh model can be recreated as the base.
  fedl_expect 0 -q train --data "$DATA/iris.csv" --no-header --arch logreg --seed 3 --epochs 0 --save-model again.st || return
  cmp -s fresh.st again.st || fail "the same seed gave different model files"
  # An update from --arch is against the fresh model as --epochs 0 --save-model writes it.
  fedl_expect 0 --json train --data "$DATA/iris.csv" --no-header --arch logreg --seed 3 --out u.st || return
  [[ $(json_get out "j['base_sha256']") == $(sha256sum fresh.st | cut -d' ' -f1) ]] ||
    fail "the update's base hash is not the fresh model's"
  fedl_expect 0 --json train --data "$DATA/iris.csv" --no-header --arch logreg --seed 4 --out u4.st || return
  [[ $(json_get out "j['base_sha256']") != $(sha256sum fresh.st | cut -d' ' -f1) ]] ||
    fail "another seed gave the same base hash"
}

test_label_column_by_name_and_index_with_header()
{
  { echo "label,a,b,c,d"; awk -F, '{print $5","$1","$2","$3","$4}' "$DATA/iris.csv"; } > iris-h.csv
  fedl_expect 0 -q train --data iris-h.csv --label-column label --arch mlp:16 --epochs 100 --optimizer adam --lr 0.01 --save-model m.st || return
  fedl_expect 0 --json eval --model m.st --data iris-h.csv --label-column 0 || return
  check_py "$(json_get out "j['accuracy']") > 0.9" "iris accuracy too low: $(cat out)"
  fedl_expect 2 train --data iris-h.csv --label-column species --arch logreg --save-model x.st
  expect_in err "no such column"
  expect_in err "label, a, b, c, d"
}

test_npy_and_idx_inputs()
{
  "$PY" - <<'PY'
import gzip, numpy as np
rng = np.random.default_rng(0)
x = rng.normal(size=(200, 5)).astype(np.float32)
y = (x[:, 0] > 0).astype(np.int64)
np.save("features.npy", x); np.save("labels.npy", y)
imgs = (rng.random((50, 28, 28)) * 255).astype(np.uint8)
lab = (imgs.reshape(50, -1).mean(1) > 127).astype(np.uint8)
with gzip.open("t-images-idx3-ubyte.gz", "wb") as f:
    f.write(bytes([0, 0, 8, 3]) + (50).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + imgs.tobytes())
with open("other-labels", "wb") as f:
    f.write(bytes([0, 0, 8, 1]) + (50).to_bytes(4, "big") + lab.tobytes())
PY
  fedl_expect 0 -q train --data features.npy --arch logreg --epochs 30 --lr 0.1 --save-model npy.st || return
  fedl_expect 0 --json eval --model npy.st --data features.npy --labels labels.npy || return
  check_py "$(json_get out "j['accuracy']") > 0.9" "npy accuracy too low: $(cat out)"
  fedl_expect 1 train --data t-images-idx3-ubyte.gz --arch logreg --save-model x.st || return
  expect_in err "t-labels-idx1-ubyte.gz"
  fedl_expect 0 --json train --data t-images-idx3-ubyte.gz --labels other-labels --arch cnn --classes 2 --epochs 1 \
    --save-model idx.st || return
  [[ $(json_get out "j['samples']") == 50 ]] || fail "IDX: expected 50 samples"
  [[ $("$PY" "$FEDL_SOURCE_DIR/tests/e2e/st_read.py" idx.st) == *'"fedl.input_shape": "1,28,28"'* ]] ||
    fail "IDX model lacks input shape 1,28,28"
}

test_limit_samples_and_threads()
{
  fedl_expect 0 --json train --data "$DATA/digits.csv.gz" --no-header --arch logreg --limit-samples 100 --threads 1 \
    --save-model m.st || return
  [[ $(json_get out "j['samples']") == 100 ]] || fail "--limit-samples 100 trained on $(json_get out "j['samples']")"
  check_py "$(json_get out "j['first_batch_seconds']") > 0" "no first_batch_seconds"
}

# --- bad input: each must fail with the documented exit code and a message that names the culprit

test_missing_file_names_it()
{
  fedl_expect 1 train --data no-such.csv --arch logreg --save-model x.st || return
  expect_in err "no-such.csv"
  fedl_expect 1 eval --model no-such.st --data "$DATA/iris.csv" --no-header || return
  expect_in err "no-such.st"
  expect_no_file x.st
}

test_unknown_architecture_is_exit_2()
{
  fedl_expect 2 train --data "$DATA/iris.csv" --no-header --arch resnet50 --save-model x.st || return
  expect_in err "unknown architecture 'resnet50'"
  expect_in err "mlp:H1"
  fedl_expect 2 train --data "$DATA/iris.csv" --no-header --arch cnn --save-model x.st || return
  expect_in err "28x28"
  expect_no_file x.st
}

test_feature_count_mismatch()
{
  fedl_expect 0 -q train --data "$DATA/digits.csv.gz" --no-header --arch logreg --epochs 0 --save-model d.st || return
  fedl_expect 1 train --data "$DATA/iris.csv" --no-header --model d.st --out u.st || return
  expect_in err "samples of 4 features"
  expect_in err "takes 64"
  fedl_expect 1 eval --data "$DATA/iris.csv" --no-header --model d.st
  expect_no_file u.st
}

test_label_outside_classes_names_the_line()
{
  fedl_expect 0 -q train --data "$DATA/iris.csv" --no-header --arch logreg --epochs 0 --save-model m.st || return
  { head -5 "$DATA/iris.csv"; echo "5.0,3.0,1.0,0.2,7"; } > bad.csv
  fedl_expect 1 train --data bad.csv --no-header --model m.st --out u.st || return
  expect_in err "bad.csv: line 6: label 7 is outside the model's 3 classes"
  fedl_expect 1 eval --data bad.csv --no-header --model m.st
  expect_no_file u.st
}

test_bad_cells_name_line_and_column()
{
  { head -3 "$DATA/iris.csv"; echo "5.0,NaN,1.0,0.2,1"; } > nan.csv
  fedl_expect 1 train --data nan.csv --no-header --arch logreg --save-model x.st || return
  expect_in err "nan.csv: line 4, column 2: NaN is not a finite number"
  { head -3 "$DATA/iris.csv"; echo "5.0,3.1,abc,0.2,1"; } > word.csv
  fedl_expect 1 train --data word.csv --no-header --arch logreg --save-model x.st || return
  expect_in err "word.csv: line 4, column 3: 'abc' is not a number"
  expect_no_file x.st
}

test_corrupt_or_truncated_safetensors_is_exit_3()
{
  fedl_expect 0 -q train --data "$DATA/iris.csv" --no-header --arch logreg --epochs 0 --save-model m.st || return
  head -c 100 m.st > cut.st
  fedl_expect 3 train --data "$DATA/iris.csv" --no-header --model cut.st --out u.st || return
  expect_in err "cut.st"
  fedl_expect 3 eval --data "$DATA/iris.csv" --no-header --model cut.st
  head -c 4096 /dev/urandom > garbage.st
  fedl_expect 3 eval --data "$DATA/iris.csv" --no-header --model garbage.st || return
  expect_in err "garbage.st"
  # A well-formed file whose fedl metadata lies is not what it claims either.
  "$PY" - <<'PY'
import os, sys
sys.path.insert(0, os.environ["FEDL_SOURCE_DIR"] + "/tests/e2e")
import st_read
t, m = st_read.read("m.st")
st_read.write("arch.st", t, dict(m, **{"fedl.arch": "resnet"}))
st_read.write("shape.st", t, dict(m, **{"fedl.input_shape": "four"}))
PY
  fedl_expect 3 eval --data "$DATA/iris.csv" --no-header --model arch.st || return
  expect_in err "arch.st: fedl.arch is not a valid architecture"
  fedl_expect 3 eval --data "$DATA/iris.csv" --no-header --model shape.st
  expect_no_file u.st
}

test_corrupt_or_truncated_gzip_is_exit_3()
{
  head -c 20000 "$DATA/digits.csv.gz" > cut.csv.gz
  fedl_expect 3 train --data cut.csv.gz --no-header --arch logreg --save-model x.st || return
  expect_in err "cut.csv.gz: gzip data is truncated"
  { head -c 5000 "$DATA/digits.csv.gz"; head -c 5000 /dev/zero; tail -c +10001 "$DATA/digits.csv.gz"; } > bad.csv.gz
  fedl_expect 3 train --data bad.csv.gz --no-header --arch logreg --save-model x.st || return
  expect_in err "bad.csv.gz: corrupt gzip data"
  expect_no_file x.st
}

test_an_update_is_not_a_model()
{
  fedl_expect 0 -q train --data "$DATA/iris.csv" --no-header --arch logreg --epochs 0 --save-model m.st || return
  fedl_expect 0 -q train --data "$DATA/iris.csv" --no-header --model m.st --out u.st || return
  fedl_expect 2 eval --data "$DATA/iris.csv" --no-header --model u.st || return
  expect_in err "is a fedl update, not a model"
}

test_interrupt_and_kill_leave_no_output()
{
  # Long enough to be stopped mid-training: SIGINT exits 130, kill -9 leaves nothing either.
  "$FEDL" train --data "$DATA/digits.csv.gz" --no-header --arch mlp:512,512 --epochs 2000 --save-model int.st \
    >out 2>err &
  local pid=$! i
  # Wait until training runs (the first epoch is logged), so that SIGINT meets fedl's handler.
  for ((i = 0; i < 300; i++)); do grep -q "epoch 1/" err 2>/dev/null && break; sleep 0.1; done
  kill -INT $pid
  wait $pid
  local rc=$?
  [[ $rc == 130 ]] || fail "SIGINT: exit $rc, expected 130"
  expect_in err "interrupted"
  "$FEDL" train --data "$DATA/digits.csv.gz" --no-header --arch mlp:512,512 --epochs 2000 --save-model kill.st \
    >/dev/null 2>&1 &
  pid=$!
  sleep 1
  kill -9 $pid
  wait $pid 2>/dev/null
  expect_no_file int.st kill.st
}

test_prox_mu_keeps_the_update_near_the_start()
{
  # FedProx adds mu/2 * ||w - w_start||^2 to the loss: a large mu must shrink the update.
  fedl_expect 0 -q train --data "$DATA/digits.csv.gz" --no-header --arch logreg --epochs 0 --save-model base.st || return
  fedl_expect 0 -q train --data "$DATA/digits.csv.gz" --no-header --model base.st --epochs 3 --out free.st || return
  fedl_expect 0 -q train --data "$DATA/digits.csv.gz" --no-header --model base.st --epochs 3 --prox-mu 10 \
    --out prox.st || return
  "$PY" - <<'PY' || fail "--prox-mu did not shrink the update"
import os, sys
sys.path.insert(0, os.environ["FEDL_SOURCE_DIR"] + "/tests/e2e")
import numpy as np, st_read
norm = lambda f: np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in st_read.read(f)[0].values()))
free, prox = norm("free.st"), norm("prox.st")
print(f"update norm without prox: {free:.4f}, with mu=10: {prox:.4f}")
assert prox < 0.5 * free, (free, prox)
PY
}
