# SPDX-License-Identifier: Apache-2.0
# fedl __worker, the trainer/evaluator child of join and serve: frames in on stdin, frames out on
# stdout, driven by tests/e2e/worker_client.py. Its updates must be the very ones `fedl train`
# writes, its results those of `fedl eval`; a failed task must not end it, a broken pipe must.

suite_probe()
{
  "$PY" -c 'import numpy' 2>/dev/null || { echo "python3-numpy is not installed"; return 1; }
}

# Threads fixed on both sides: the same arithmetic in the same order gives the same bytes.
WORKER_FLAGS=(--data digits-train.csv --no-header --threads 1)

# The digits train split, a fresh mlp:32 base model M.st, and reference updates and results
# from the commands the worker must match.
worker_fixture()
{
  digits_split
  "$FEDL" -q train "${WORKER_FLAGS[@]}" --arch mlp:32 --epochs 0 --seed 5 --save-model M.st || return
  "$FEDL" -q train "${WORKER_FLAGS[@]}" --model M.st --out U1.st --seed 11 -e 2 -b 16 --lr 0.05 --momentum 0.5 ||
    return
  "$FEDL" -q train "${WORKER_FLAGS[@]}" --model M.st --out U2.st --seed 12 -e 1 -b 64 --lr 0.01 --optimizer adam \
    --prox-mu 0.1 || return
  "$FEDL" --json eval "${WORKER_FLAGS[@]}" --model M.st > eval.json || return
}

test_worker_matches_train_and_eval_and_survives_a_bad_task()
{
  worker_fixture || { fail "the reference runs failed"; return; }
  "$PY" - "$FEDL" "${WORKER_FLAGS[@]}" <<'PY' 2>worker.err || { fail "worker check failed"; cat worker.err; }
import json, os, sys
sys.path.insert(0, os.environ["FEDL_SOURCE_DIR"] + "/tests/e2e")
import numpy as np
import st_read
from worker_client import Worker, TASK, UPDATE, EVAL, RESULT, ERROR

fedl, flags = sys.argv[1], sys.argv[2:]
model = open("M.st", "rb").read()
w = Worker([fedl, "__worker", *flags], stderr=open("worker.log", "wb"))
first = {"epochs": 2, "batch_size": 16, "lr": 0.05, "optimizer": "sgd", "momentum": 0.5, "prox_mu": 0.0}
second = {"epochs": 1, "batch_size": 64, "lr": 0.01, "optimizer": "adam", "momentum": 0.0, "prox_mu": 0.1}

def check_update(round_, header, body, reference):
    with open(f"got{round_}.st", "wb") as f:
        f.write(body)
    got, gm = st_read.read(f"got{round_}.st")
    want, wm = st_read.read(reference)
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), f"tensor {k} differs"
    assert gm.pop("fedl.round") == str(round_), gm
    assert gm == wm, (gm, wm)
    assert "fedl.signature" not in gm
    # Byte for byte, once the round is taken out: the same layout as write_safetensors.
    st_read.write(f"norm{round_}.st", got, gm)
    st_read.write(f"ref{round_}.st", want, wm)
    assert open(f"norm{round_}.st", "rb").read() == open(f"ref{round_}.st", "rb").read()
    assert header["round"] == round_ and header["num_samples"] == int(wm["fedl.num_samples"]) == 1438, header
    assert header["loss"] == float(wm["fedl.loss"]), (header, wm)
    assert header["steps"] > 0 and header["seconds"] >= 0, header

w.send(TASK, {"round": 1, "seed": 11, "training": first}, model)
check_update(1, *w.expect(UPDATE), "U1.st")
# The same process serves the next round (backend and model kept), with other settings.
w.send(TASK, {"round": 2, "seed": 12, "training": second}, model)
check_update(2, *w.expect(UPDATE), "U2.st")

w.send(EVAL, {}, model)
header, body = w.expect(RESULT)
want = json.load(open("eval.json"))
assert body == b"", body
assert header["accuracy"] == want["accuracy"] and header["samples"] == want["samples"] == 1438, (header, want)
assert abs(header["loss"] - want["loss"]) < 1e-12, (header, want)

# A corrupt model is a failed task (exit code 3, a file that is not what it claims), not the end.
w.send(TASK, {"round": 3, "seed": 11, "training": first}, b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + b"x" * 100)
header, body = w.expect(ERROR)
assert header["code"] == 3 and "round 3 model" in header["message"], header

# An update sent as a model, and an unknown training setting: refused, with usage code 2.
w.send(TASK, {"round": 3, "seed": 11, "training": first}, open("U1.st", "rb").read())
header, _ = w.expect(ERROR)
assert header["code"] == 2 and "is a fedl update, not a model" in header["message"], header
assert header["class"] == "data-mismatch", header  # fedl join held the model to its contract before
w.send(TASK, {"round": 3, "seed": 11, "training": dict(first, epoch=3)}, model)
header, _ = w.expect(ERROR)
assert header["code"] == 2 and "unknown key training.epoch" in header["message"], header
assert header["class"] == "bad-settings", header
w.send(TASK, {"round": 3, "seed": 11, "training": dict(first, lr=-1)}, model)
header, _ = w.expect(ERROR)
assert header["code"] == 2 and "lr" in header["message"], header
# DP-SGD at a delta of 1/n or more: its epsilon would mean nothing (a report once said 0.0).
dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 0.9}
w.send(TASK, {"round": 3, "seed": 11, "training": dict(first, dp=dp)}, model)
header, _ = w.expect(ERROR)
assert header["code"] == 2 and "delta 0.9 is not below 1/1438" in header["message"], header
assert header["class"] == "bad-settings", header

w.send(TASK, {"round": 4, "seed": 11, "training": first}, model)
check_update(4, *w.expect(UPDATE), "U1.st")
w.send(EVAL, {}, model)
assert w.expect(RESULT)[0]["accuracy"] == want["accuracy"]
assert w.close() == 0, "the worker did not exit 0 at the end of its input"
PY
  expect_in worker.log "round 4: trained mlp:32"
}

test_model_that_does_not_fit_the_data_is_an_error_frame()
{
  digits_split
  "$FEDL" -q train --data "$DATA/iris.csv" --no-header --arch logreg --epochs 0 --save-model iris.st || return
  "$FEDL" -q train "${WORKER_FLAGS[@]}" --arch logreg --epochs 0 --save-model digits.st || return
  "$PY" - "$FEDL" "${WORKER_FLAGS[@]}" <<'PY' 2>worker.err || { fail "worker check failed"; cat worker.err; }
import os, sys
sys.path.insert(0, os.environ["FEDL_SOURCE_DIR"] + "/tests/e2e")
from worker_client import Worker, TASK, UPDATE, EVAL, ERROR

w = Worker([sys.argv[1], "__worker", *sys.argv[2:]], stderr=open("worker.log", "wb"))
w.send(EVAL, {}, open("iris.st", "rb").read())
header, _ = w.expect(ERROR)
assert header["code"] == 1 and "64 features" in header["message"], header
# Epochs 0 and the defaults for missing settings: the update is all zeros.
w.send(TASK, {"round": 7, "seed": 1, "training": {"epochs": 0}}, open("digits.st", "rb").read())
header, body = w.expect(UPDATE)
assert header["steps"] == 0 and header["loss"] == 0, header
assert w.close() == 0
PY
}

test_protocol_violations_end_the_worker_with_exit_1()
{
  digits_split
  "$PY" - "$FEDL" "${WORKER_FLAGS[@]}" <<'PY' 2>worker.err || { fail "worker check failed"; cat worker.err; }
import os, sys
sys.path.insert(0, os.environ["FEDL_SOURCE_DIR"] + "/tests/e2e")
from worker_client import Worker, TASK, HEARTBEAT, encode

def run(data, log, extra=(), close_input=False):
    w = Worker([sys.argv[1], "__worker", *sys.argv[2:], *extra], stderr=open(log, "wb"))
    w.send_raw(data)
    if close_input:
        w.proc.stdin.close()
    try:
        w.receive()
        raise AssertionError("the worker answered a bad frame")
    except EOFError:
        pass
    rc = w.close()
    assert rc == 1, f"{log}: exit {rc}"
    return open(log).read()

assert "bad magic" in run(b"JUNK" + b"\0" * 40, "magic.log")
assert "unexpected heartbeat frame" in run(encode(HEARTBEAT, {}), "heartbeat.log")
assert "task frame body of 200 bytes is over the limit of 100" in run(
    encode(TASK, {"round": 1, "seed": 1}, b"x" * 200), "big.log", ["--max-model-bytes", "100"])
assert "no unsigned integer \"round\"" in run(encode(TASK, {"seed": 1}, b"x"), "round.log")
# A frame cut short by the end of the input.
assert "inside a frame body" in run(encode(TASK, {"round": 1, "seed": 1}, b"x" * 100)[:-10], "cut.log",
                                    close_input=True)
PY
}

test_parent_that_stops_reading_ends_the_worker_with_exit_1()
{
  digits_split
  "$FEDL" -q train "${WORKER_FLAGS[@]}" --arch mlp:32 --epochs 0 --save-model M.st || return
  "$PY" - "$FEDL" "${WORKER_FLAGS[@]}" <<'PY' 2>worker.err || { fail "worker check failed"; cat worker.err; }
import os, sys
sys.path.insert(0, os.environ["FEDL_SOURCE_DIR"] + "/tests/e2e")
from worker_client import Worker, EVAL

w = Worker([sys.argv[1], "__worker", *sys.argv[2:]], stderr=open("worker.log", "wb"))
w.proc.stdout.close()
w.send(EVAL, {}, open("M.st", "rb").read())
w.proc.stdin.close()
rc = w.proc.wait(timeout=60)
assert rc == 1, f"exit {rc} (a SIGPIPE death is -13)"
assert "cannot answer the parent process" in open("worker.log").read()
PY
}

test_worker_is_hidden_from_help()
{
  fedl_expect 0 --help || return
  expect_not_in out "__worker"
  fedl_expect 2 __worker || return
  expect_in err "--data is required"
}

test_torchscript_worker_matches_train()
{
  if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "python3-torch is not installed: nothing to check"
    return 0
  fi
  digits_split
  "$PY" "$FEDL_SOURCE_DIR/tests/e2e/export_torchscript.py" net.pt || { fail "cannot export the module"; return; }
  "$FEDL" -q train "${WORKER_FLAGS[@]}" --torchscript net.pt --epochs 0 --save-model W.st || return
  "$FEDL" -q train "${WORKER_FLAGS[@]}" --torchscript net.pt --model W.st --out U.st --seed 3 -e 1 --lr 0.1 || return
  "$PY" - "$FEDL" "${WORKER_FLAGS[@]}" --torchscript net.pt <<'PY' 2>worker.err || { fail "worker check failed"; cat worker.err; }
import os, sys
sys.path.insert(0, os.environ["FEDL_SOURCE_DIR"] + "/tests/e2e")
import numpy as np
import st_read
from worker_client import Worker, TASK, UPDATE

w = Worker([sys.argv[1], "__worker", *sys.argv[2:]], stderr=open("worker.log", "wb"))
want, wm = st_read.read("U.st")
for round_ in (1, 2):  # the second reuses the loaded module
    w.send(TASK, {"round": round_, "seed": 3, "training": {"epochs": 1, "lr": 0.1}}, open("W.st", "rb").read())
    header, body = w.expect(UPDATE)
    open("got.st", "wb").write(body)
    got, gm = st_read.read("got.st")
    assert gm.pop("fedl.round") == str(round_) and gm == wm, (gm, wm)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
assert w.close() == 0
PY
}

# The worker keeps the backend model from task to task (only the weights are loaded): a cnn
# trained three times, with evaluations between, must give fedl train's update every time.
test_kept_cnn_gives_the_same_update_every_round()
{
  "$PY" - <<'PY' || { fail "cannot write the images"; return; }
import numpy as np
rng = np.random.default_rng(0)
np.save("x.npy", rng.random((300, 28, 28)).astype(np.float32))
np.save("y.npy", rng.integers(0, 10, 300).astype(np.int64))
PY
  local flags=(--data x.npy --labels y.npy --threads 1)
  "$FEDL" -q train "${flags[@]}" --arch cnn --epochs 0 --save-model M.st || return
  "$FEDL" -q train "${flags[@]}" --model M.st --out U.st --seed 4 -e 1 --lr 0.05 --momentum 0.9 || return
  "$PY" - "$FEDL" "${flags[@]}" <<'PY' 2>worker.err || { fail "worker check failed"; cat worker.err; }
import os, sys
sys.path.insert(0, os.environ["FEDL_SOURCE_DIR"] + "/tests/e2e")
import numpy as np
import st_read
from worker_client import Worker, TASK, UPDATE, EVAL, RESULT

w = Worker([sys.argv[1], "__worker", *sys.argv[2:]], stderr=open("worker.log", "wb"))
model = open("M.st", "rb").read()
want, wm = st_read.read("U.st")
results = []
for round_ in (1, 2, 3):
    w.send(TASK, {"round": round_, "seed": 4, "training": {"epochs": 1, "lr": 0.05, "momentum": 0.9}}, model)
    open("got.st", "wb").write(w.expect(UPDATE)[1])
    got, gm = st_read.read("got.st")
    assert gm.pop("fedl.round") == str(round_) and gm == wm, (round_, gm, wm)
    assert all(np.array_equal(got[k], want[k]) for k in want), f"round {round_}: the tensors differ"
    w.send(EVAL, {}, model)
    header, _ = w.expect(RESULT)
    results.append((header["accuracy"], header["loss"]))
assert len(set(results)) == 1, results
assert w.close() == 0
PY
}
