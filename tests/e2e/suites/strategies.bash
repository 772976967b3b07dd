# SPDX-License-Identifier: Apache-2.0
# Every aggregation strategy of fedl aggregate against an independent NumPy implementation
# (tests/e2e/aggregate_reference.py), over two rounds so that server optimizer state carries.

suite_probe()
{
  "$PY" -c 'import numpy' 2>/dev/null || { echo "python3-numpy is not installed"; return 1; }
}

REF=$FEDL_SOURCE_DIR/tests/e2e/aggregate_reference.py

# make_updates BASE PREFIX SEED: 6 updates of BASE (one an outlier), with sample counts 10..60.
make_updates()
{
  "$PY" - "$1" "$2" "$3" <<'PY'
import hashlib, os, sys
sys.path.insert(0, os.environ["FEDL_SOURCE_DIR"] + "/tests/e2e")
import numpy as np, st_read
base_path, prefix, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
base, _ = st_read.read(base_path)
sha = hashlib.sha256(open(base_path, "rb").read()).hexdigest()
rng = np.random.default_rng(seed)
for i in range(6):
    scale = 50.0 if i == 5 else 0.1
    t = {k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in base.items()}
    meta = {"fedl.kind": "update", "fedl.base_sha256": sha, "fedl.num_samples": str(10 * (i + 1)),
            "fedl.site": f"s{i}"}
    st_read.write(f"{prefix}{i}.st", t, meta)
PY
}

make_base()
{
  "$PY" - <<'PY'
import os, sys
sys.path.insert(0, os.environ["FEDL_SOURCE_DIR"] + "/tests/e2e")
import numpy as np, st_read
rng = np.random.default_rng(1)
st_read.write("base.st", {"fc.weight": rng.normal(size=(7, 33)).astype(np.float32),
                          "fc.bias": rng.normal(size=(7,)).astype(np.float32),
                          "other.w": rng.normal(size=(2, 3, 4)).astype(np.float32)},
              {"fedl.kind": "model", "fedl.arch": "logreg", "fedl.input_shape": "33", "fedl.classes": "7"})
PY
}

# check_strategy STRATEGY [OPTIONS...]: two rounds through fedl and the reference, compared.
check_strategy()
{
  local s=$1 tag
  shift
  tag=$(echo "$s $*" | tr -c 'a-zA-Z0-9\n' '_')
  make_base && make_updates base.st "r1-$tag-" 1 || { fail "cannot make test data"; return; }
  rm -f "state-$tag.st" "ref-$tag.st"
  "$FEDL" -q aggregate --base base.st --out "m1-$tag.st" --strategy "$s" --state "state-$tag.st" "$@" r1-"$tag"-*.st ||
    { fail "$s: fedl aggregate failed (round 1)"; return; }
  "$PY" "$REF" "$s" base.st - r1-"$tag"-*.st "$@" --state-out "ref-$tag.st" --check "m1-$tag.st" ||
    { fail "$s $*: round 1 differs from the NumPy reference"; return; }
  make_updates "m1-$tag.st" "r2-$tag-" 2 || { fail "cannot make round 2 data"; return; }
  "$FEDL" -q aggregate --base "m1-$tag.st" --out "m2-$tag.st" --strategy "$s" --state "state-$tag.st" "$@" \
    r2-"$tag"-*.st || { fail "$s: fedl aggregate failed (round 2)"; return; }
  local state_in=()
  [[ -f ref-$tag.st ]] && state_in=(--state-in "ref-$tag.st")
  "$PY" "$REF" "$s" "m1-$tag.st" - r2-"$tag"-*.st "$@" "${state_in[@]}" --check "m2-$tag.st" ||
    fail "$s $*: round 2 differs from the NumPy reference"
  echo "ok: $s $*"
}

test_reference_self_check()
{
  "$PY" "$REF" || fail "the NumPy reference fails its own self-check"
}

test_fedavg_is_exactly_the_weighted_mean()
{
  check_strategy fedavg
  check_strategy fedavg --server-lr 0.5
  check_strategy fedavg --clip-norm 1.0
}

test_server_optimizers()
{
  check_strategy fedavgm
  check_strategy fedavgm --server-momentum 0.5 --server-lr 0.7
  check_strategy fedadam
  check_strategy fedadam --beta1 0.8 --beta2 0.95 --tau 0.01 --server-lr 0.1
  check_strategy fedyogi
  check_strategy fedadagrad --tau 0.05
}

test_robust_strategies()
{
  check_strategy median
  check_strategy trimmed-mean:0.2
  check_strategy krum:1
  check_strategy multi-krum:1,3
  check_strategy median --clip-norm 2.0
}

test_robust_strategies_resist_the_outlier()
{
  make_base && make_updates base.st u 3 || { fail "cannot make test data"; return; }
  "$FEDL" -q aggregate --base base.st --out krum.st --strategy krum:1 u*.st >/dev/null || { fail "krum failed"; return; }
  "$FEDL" -q aggregate --base base.st --out avg.st --strategy fedavg u*.st >/dev/null || { fail "fedavg failed"; return; }
  "$PY" - <<'PY' || fail "krum did not leave the outlier out"
import os, sys
sys.path.insert(0, os.environ["FEDL_SOURCE_DIR"] + "/tests/e2e")
import numpy as np, st_read
b, _ = st_read.read("base.st"); k, _ = st_read.read("krum.st"); a, _ = st_read.read("avg.st")
dk = max(float(np.abs(k[n] - b[n]).max()) for n in b)
da = max(float(np.abs(a[n] - b[n]).max()) for n in b)
print(f"largest change: krum {dk:.3f}, fedavg {da:.3f}")
assert dk < 1.0 < da
PY
}

test_stateful_strategy_state_mismatch_is_refused()
{
  make_base && make_updates base.st u 4 || { fail "cannot make test data"; return; }
  fedl_expect 0 aggregate --base base.st --out m.st --strategy fedadam --state s.st u*.st || return
  fedl_expect 3 aggregate --base base.st --out m2.st --strategy fedyogi --state s.st u*.st
  expect_no_file m2.st
  fedl_expect 2 aggregate --base base.st --out m3.st --strategy krum u*.st
  fedl_expect 2 aggregate --base base.st --out m3.st --strategy trimmed-mean:0.7 u*.st
  fedl_expect 2 aggregate --base base.st --out m3.st --server-lr -1 u*.st
  expect_no_file m3.st
}
