#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""An independent NumPy implementation of fedl's aggregation strategies, written from the formulas
(fedl-aggregate(1), DESIGN §4), for end-to-end tests to compare `fedl aggregate` against.

Everything is computed in float64 from the stored values and the result is cast to each base
tensor's dtype; optimizer state (m, v) is returned cast to the parameters' dtypes, as fedl stores it.
Compare fedl's output with a relative tolerance of about 1e-6 for F32 models (fedl rounds clipped
values to F32 before the robust rules, and sums in another order).

As a module:
    from aggregate_reference import reference, read_state, write_state
    new_model, new_state = reference("fedadam", base, updates, weights, options, state)
      strategy: fedavg | fedavgm | fedadam | fedyogi | fedadagrad | median | trimmed-mean:BETA |
                krum:F | multi-krum:F,M
      base:     {name: ndarray}; updates: [{name: ndarray}] (Δ = trained − base)
      weights:  [float] (fedl.num_samples); options: {server_lr, momentum, beta1, beta2, tau,
                clip_norm} (missing keys take fedl's defaults); state: None before the first round,
                else {"strategy", "round", "m": {name: ndarray}, "v": {name: ndarray}}
      returns (new_model dict, new_state dict or None for the stateless strategies)

As a program:
    aggregate_reference.py                       self-check on random data (< 2 s), exit 0 if good
    aggregate_reference.py STRATEGY BASE OUT UPDATE... [--server-lr X] [--server-momentum X]
        [--beta1 X] [--beta2 X] [--tau X] [--clip-norm C] [--state-in F] [--state-out F]
        [--check MODEL [--rtol R] [--atol A]]
      writes the reference model to OUT (safetensors, "-" for none); with --check compares MODEL
      (fedl's output) with it and exits 1 if any value differs beyond the tolerance.
"""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_read  # noqa: E402  (tests/e2e/st_read.py: read(path) -> (tensors, metadata); write(...))

DEFAULTS = {"server_lr": 1.0, "momentum": 0.9, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3, "clip_norm": None}
STATEFUL = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")


def parse(strategy):
    """('trimmed-mean', {'beta': 0.1}) and the like; raises ValueError for an unknown spec."""
    name, _, arg = strategy.partition(":")
    if name in ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "median") and not arg:
        return name, {}
    if name == "trimmed-mean" and arg:
        beta = float(arg)
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"BETA out of range in {strategy}")
        return name, {"beta": beta}
    if name == "krum" and arg.isdigit():
        return name, {"f": int(arg), "m": 1}
    if name == "multi-krum":
        f, _, m = arg.partition(",")
        if f.isdigit() and m.isdigit() and int(m) >= 1:
            return name, {"f": int(f), "m": int(m)}
    raise ValueError(f"unknown strategy spec {strategy!r}")


def _clipped(updates, clip_norm):
    """Each update as float64, scaled to L2 norm at most clip_norm (norm over all its tensors)."""
    out = []
    for u in updates:
        u64 = {k: np.asarray(v, dtype=np.float64) for k, v in u.items()}
        if clip_norm is not None:
            norm = math.sqrt(sum(float(np.sum(np.square(v))) for v in u64.values()))
            if norm > clip_norm:
                u64 = {k: v * (clip_norm / norm) for k, v in u64.items()}
        out.append(u64)
    return out


def _weighted_mean(updates, weights, names):
    total = float(sum(weights))
    return {k: sum(float(w) * u[k] for u, w in zip(updates, weights)) / total for k in names}


def _krum_scores(updates, f):
    """Blanchard et al. 2017: each update's summed squared distance to its n - f - 2 nearest."""
    n = len(updates)
    flat = np.stack([np.concatenate([u[k].ravel() for k in sorted(u)]) for u in updates])
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                d = flat[i] - flat[j]
                dist[i, j] = float(np.dot(d, d))
    closest = n - f - 2
    if closest < 1:
        raise ValueError(f"krum needs at least f + 3 = {f + 3} updates, got {n}")
    scores = []
    for i in range(n):
        others = np.sort(np.delete(dist[i], i))
        scores.append(float(np.sum(others[:closest])))
    return np.array(scores)


def reference(strategy, base, updates, weights, options=None, state=None):
    opts = dict(DEFAULTS)
    opts.update(options or {})
    name, params = parse(strategy)
    n = len(updates)
    if n == 0:
        raise ValueError("no updates")
    names = list(base)
    upd = _clipped(updates, opts["clip_norm"])
    lr = float(opts["server_lr"])
    base64 = {k: np.asarray(base[k], dtype=np.float64) for k in names}
    new_state = None

    if name in ("fedavg",) + STATEFUL:
        delta = _weighted_mean(upd, weights, names)
    elif name == "median":
        delta = {k: np.median(np.stack([u[k] for u in upd]), axis=0) for k in names}
    elif name == "trimmed-mean":
        drop = int(math.floor(params["beta"] * n + 1e-9))
        drop = min(drop, (n - 1) // 2)
        delta = {k: np.mean(np.sort(np.stack([u[k] for u in upd]), axis=0)[drop:n - drop], axis=0) for k in names}
    else:  # krum, multi-krum
        f, m = params["f"], params["m"]
        if name == "multi-krum" and m > n - f:
            raise ValueError(f"multi-krum: M = {m} > N - F = {n - f}")
        scores = _krum_scores(upd, f)
        chosen = list(np.argsort(scores, kind="stable")[:m])
        if name == "krum":
            delta = dict(upd[chosen[0]])
        else:
            delta = _weighted_mean([upd[i] for i in chosen], [weights[i] for i in chosen], names)

    if name in STATEFUL:
        dtypes = {k: np.asarray(base[k]).dtype for k in names}
        if state is None:
            tau2 = opts["tau"] ** 2
            m_old = {k: np.zeros(base64[k].shape) for k in names}
            v_old = {k: np.full(base64[k].shape, tau2, dtype=dtypes[k]).astype(np.float64) for k in names}
            rnd = 0
        else:
            if state["strategy"] != name:
                raise ValueError(f"state of {state['strategy']}, not {name}")
            m_old = {k: np.asarray(state["m"][k], dtype=np.float64) for k in names}
            v_old = {k: np.asarray(state["v"][k], dtype=np.float64) for k in names} if name != "fedavgm" else {}
            rnd = int(state["round"])
        m_new, v_new, new = {}, {}, {}
        for k in names:
            d = delta[k]
            if name == "fedavgm":  # Hsu et al. 2019
                m_new[k] = opts["momentum"] * m_old[k] + d
                new[k] = base64[k] + lr * m_new[k]
                continue
            # Reddi et al. 2021, Algorithm 2.
            m_new[k] = opts["beta1"] * m_old[k] + (1 - opts["beta1"]) * d
            if name == "fedadam":
                v_new[k] = opts["beta2"] * v_old[k] + (1 - opts["beta2"]) * d * d
            elif name == "fedyogi":
                v_new[k] = v_old[k] - (1 - opts["beta2"]) * d * d * np.sign(v_old[k] - d * d)
            else:
                v_new[k] = v_old[k] + d * d
            new[k] = base64[k] + lr * m_new[k] / (np.sqrt(v_new[k]) + opts["tau"])
        new_state = {"strategy": name, "round": rnd + 1,
                     "m": {k: m_new[k].astype(dtypes[k]) for k in names},
                     "v": {k: v_new[k].astype(dtypes[k]) for k in v_new}}
    else:
        new = {k: base64[k] + lr * delta[k] for k in names}
    return {k: new[k].astype(np.asarray(base[k]).dtype) for k in names}, new_state


def read_state(path):
    """A fedl server state file (tensors m.<param>, v.<param>) as reference() takes it."""
    tensors, meta = st_read.read(path)
    state = {"strategy": meta["fedl.strategy"], "round": int(meta["fedl.round"]), "m": {}, "v": {}}
    for k, v in tensors.items():
        which, _, param = k.partition(".")
        state[which][param] = v
    return state


def write_state(path, state):
    tensors = {f"m.{k}": v for k, v in state["m"].items()}
    tensors.update({f"v.{k}": v for k, v in state["v"].items()})
    st_read.write(path, tensors, {"fedl.kind": "server-state", "fedl.strategy": state["strategy"],
                                  "fedl.round": str(state["round"])})


def compare(got, want, rtol=1e-6, atol=1e-7):
    """A list of sentences for each tensor of `got` that differs from `want` beyond tolerance."""
    problems = []
    for k in want:
        if k not in got:
            problems.append(f"{k}: missing")
            continue
        a = np.asarray(got[k], dtype=np.float64)
        b = np.asarray(want[k], dtype=np.float64)
        if a.shape != b.shape:
            problems.append(f"{k}: shape {a.shape}, expected {b.shape}")
            continue
        bad = ~np.isclose(a, b, rtol=rtol, atol=atol)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            problems.append(f"{k}: {int(bad.sum())} values differ, first at {i}: {a.ravel()[i]!r} vs {b.ravel()[i]!r}")
    return problems


# ------------------------------------------------------------------------------------------------
# Self-check.

def _check(cond, what):
    if not cond:
        raise AssertionError(what)


def self_check():
    rng = np.random.default_rng(1)
    shapes = {"fc.weight": (3, 5), "fc.bias": (3,)}
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    ups = [{k: (0.1 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()} for _ in range(7)]
    w = [float(x) for x in rng.integers(1, 100, size=7)]

    # fedavg: one update gives base + delta; weights are num_samples.
    one, _ = reference("fedavg", base, ups[:1], [5.0])
    _check(all(np.allclose(one[k], base[k] + ups[0][k], rtol=0, atol=1e-7) for k in shapes), "fedavg identity")
    avg, st = reference("fedavg", base, ups, w)
    _check(st is None, "fedavg has no state")
    for k in shapes:
        want = base[k].astype(np.float64) + sum(wi * u[k].astype(np.float64) for wi, u in zip(w, ups)) / sum(w)
        _check(np.allclose(avg[k], want, rtol=1e-6), "fedavg weighting")
    half, _ = reference("fedavg", base, ups, w, {"server_lr": 0.5})
    _check(all(np.allclose(half[k] - base[k], 0.5 * (avg[k] - base[k]), atol=1e-6) for k in shapes), "server_lr")

    # fedavgm with momentum 0 is fedavg; with momentum, the buffer carries over.
    m0, s0 = reference("fedavgm", base, ups, w, {"momentum": 0.0})
    _check(all(np.allclose(m0[k], avg[k]) for k in shapes), "fedavgm momentum 0")
    _check(s0["round"] == 1 and s0["v"] == {}, "fedavgm state")
    x1, s1 = reference("fedavgm", base, ups, w)
    x2, s2 = reference("fedavgm", x1, ups, w, state=s1)
    d = {k: avg[k].astype(np.float64) - base[k] for k in shapes}
    _check(all(np.allclose(x2[k], x1[k] + 1.9 * d[k], atol=1e-6) for k in shapes), "fedavgm second round")
    _check(s2["round"] == 2, "fedavgm round count")

    # Adaptive optimizers: one coordinate by hand (Reddi et al. 2021): delta 1.75, lr 0.1.
    b1 = {"p": np.zeros(1, np.float32)}
    u1 = [{"p": np.full(1, 1.0, np.float32)}, {"p": np.full(1, 2.0, np.float32)}]
    out, st = reference("fedadam", b1, u1, [1.0, 3.0], {"server_lr": 0.1})
    _check(abs(float(out["p"][0]) - 0.0994302) < 1e-6, "fedadam first step")
    tau2 = float(np.float32(1e-6))
    _check(abs(float(st["v"]["p"][0]) - (0.99 * tau2 + 0.01 * 1.75 ** 2)) < 1e-8, "fedadam v")
    for name in ("fedyogi", "fedadagrad"):
        o1, st1 = reference(name, b1, u1, [1.0, 3.0], {"server_lr": 0.1})
        o2, st2 = reference(name, o1, [{"p": np.full(1, -0.05, np.float32)}], [1.0], {"server_lr": 0.1}, st1)
        _check(st2["round"] == 2 and np.isfinite(o2["p"]).all(), f"{name} two rounds")
    # Yogi: v shrinks only by (1 - beta2) d^2 when v > d^2; Adagrad's v only grows.
    _check(float(st2["v"]["p"][0]) > float(st1["v"]["p"][0]), "fedadagrad v grows")

    # Median and trimmed mean, unweighted.
    col = [{"p": np.array([v], np.float32)} for v in (1.0, 9.0, 3.0, 7.0, 100.0)]
    zero = {"p": np.zeros(1, np.float32)}
    _check(float(reference("median", zero, col, [1] * 5)[0]["p"][0]) == 7.0, "median odd")
    _check(float(reference("median", zero, col[:4], [1, 99, 1, 1])[0]["p"][0]) == 5.0, "median even")
    _check(reference("trimmed-mean:0.2", zero, col, [1] * 5)[0]["p"][0] == np.float32(19.0 / 3.0), "trimmed mean")
    vals = [float(i) if i < 71 else 1000.0 + i for i in range(100)]
    many = [{"p": np.array([v], np.float32)} for v in rng.permutation(vals)]
    _check(float(reference("trimmed-mean:0.29", zero, many, [1] * 100)[0]["p"][0]) == 49.5,
           "trimmed-mean:0.29 of 100 drops 29 at each end")
    t0, _ = reference("trimmed-mean:0", base, ups, w)
    _check(all(np.allclose(t0[k], base[k] + np.mean([u[k] for u in ups], axis=0), atol=1e-6) for k in shapes),
           "trimmed-mean:0 is the plain mean")

    # Krum: honest 10..13 and an attacker at 100; 11 and 12 tie, the first wins.
    honest = [{"p": np.full(8, v, np.float32)} for v in (10.0, 11.0, 12.0, 13.0, 100.0)]
    z8 = {"p": np.zeros(8, np.float32)}
    _check(np.all(reference("krum:1", z8, honest, [1, 2, 1, 1, 1000])[0]["p"] == 11.0), "krum")
    _check(np.all(reference("multi-krum:1,3", z8, honest, [1, 2, 1, 1, 1000])[0]["p"] == 11.0), "multi-krum")
    try:
        reference("krum:3", z8, honest, [1] * 5)
        _check(False, "krum:3 with 5 updates must fail")
    except ValueError:
        pass
    big = [dict(u) for u in ups] + [{k: np.full(s, 50.0, np.float32) for k, s in shapes.items()}]
    kr, _ = reference("multi-krum:1,6", base, big, w + [1.0])
    _check(all(np.abs(kr[k] - base[k]).max() < 1.0 for k in shapes), "multi-krum drops the outlier")

    # Clipping: a lone update of norm 5 clipped to 1 moves the model by exactly 1.
    c_up = [{"p": np.array([3.0, 4.0], np.float32)}]
    c_out, _ = reference("fedavg", {"p": np.zeros(2, np.float32)}, c_up, [1.0], {"clip_norm": 1.0})
    _check(np.allclose(c_out["p"], [0.6, 0.8]), "clip-norm")

    # State files round-trip.
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.safetensors")
        _, st = reference("fedadam", base, ups, w)
        write_state(path, st)
        back = read_state(path)
        _check(back["strategy"] == "fedadam" and back["round"] == 1, "state metadata")
        _check(all(np.array_equal(back["m"][k], st["m"][k]) and np.array_equal(back["v"][k], st["v"][k])
                   for k in shapes), "state tensors")
    for bad in ("fedsgd", "trimmed-mean:0.5", "krum", "multi-krum:1", "median:1"):
        try:
            parse(bad)
            _check(False, f"{bad} must be refused")
        except ValueError:
            pass
    print("aggregate_reference: self-check passed")


# ------------------------------------------------------------------------------------------------
# Command line.

def main(argv):
    if not argv:
        self_check()
        return 0
    import argparse
    ap = argparse.ArgumentParser(description="reference aggregation of fedl update files")
    ap.add_argument("strategy")
    ap.add_argument("base")
    ap.add_argument("out", help="where to write the reference model ('-': nowhere)")
    ap.add_argument("updates", nargs="+")
    ap.add_argument("--server-lr", type=float, default=DEFAULTS["server_lr"])
    ap.add_argument("--server-momentum", type=float, default=DEFAULTS["momentum"])
    ap.add_argument("--beta1", type=float, default=DEFAULTS["beta1"])
    ap.add_argument("--beta2", type=float, default=DEFAULTS["beta2"])
    ap.add_argument("--tau", type=float, default=DEFAULTS["tau"])
    ap.add_argument("--clip-norm", type=float, default=None)
    ap.add_argument("--state-in")
    ap.add_argument("--state-out")
    ap.add_argument("--check", help="a model file (fedl's output) to compare with the reference")
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--atol", type=float, default=1e-7)
    a = ap.parse_args(argv)
    base, meta = st_read.read(a.base)
    updates, weights = [], []
    for p in a.updates:
        t, m = st_read.read(p)
        updates.append(t)
        weights.append(float(m["fedl.num_samples"]))
    options = {"server_lr": a.server_lr, "momentum": a.server_momentum, "beta1": a.beta1, "beta2": a.beta2,
               "tau": a.tau, "clip_norm": a.clip_norm}
    state = read_state(a.state_in) if a.state_in else None
    model, new_state = reference(a.strategy, base, updates, weights, options, state)
    if a.out != "-":
        st_read.write(a.out, model, {"fedl.kind": "model"})
    if a.state_out and new_state is not None:
        write_state(a.state_out, new_state)
    if a.check:
        got, _ = st_read.read(a.check)
        problems = compare(got, model, a.rtol, a.atol)
        for p in problems:
            print(f"aggregate_reference: {a.check}: {p}", file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
