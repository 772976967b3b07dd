#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""Independent reference bracket for the (epsilon, delta) guarantee of the
Poisson-subsampled Gaussian mechanism under T-fold composition.

What it computes
----------------
Add/remove-one neighbours, sampling rate q, noise multiplier sigma (the
sensitivity is 1, so the noise standard deviation is s = sigma), T
compositions, target delta.  Two privacy-loss directions are evaluated and the
larger epsilon is reported:

  remove:  x ~ (1-q) N(0, s^2) + q N(1, s^2),
           L(x) =  log((1-q) + q exp((2x-1) / (2 s^2)))
  add:     x ~ N(0, s^2),
           L(x) = -log((1-q) + q exp((2x-1) / (2 s^2)))

For the sum L_T of T independent copies,
  delta(eps) = E[(1 - exp(eps - L_T))_+] + P(L_T = +inf),
and eps(delta) is the smallest eps >= 0 with delta(eps) <= delta.

How
---
The privacy-loss random variable is discretised on the grid {k h}, in the
spirit of the FFT accountant of Koskela, Jalko and Honkela, "Computing Tight
Differential Privacy Guarantees Using FFT" (AISTATS 2020), and bracketed with
pessimistic / optimistic rounding as in Meiser and Mohammadi, "Tight on
Budget? Tight Bounds for r-Fold Approximate Differential Privacy" (CCS 2018).

* L is monotone in x, so the probability of every grid cell [k h, (k+1) h) is
  an exact difference of Gaussian tail probabilities at the closed-form
  crossing points x(k h).  Upper tails are taken from erfc directly (not as
  1 - CDF), and the lower half of the distribution is differenced through the
  CDF, so small masses keep their relative accuracy.
* Pessimistic PMF: a cell's mass sits at the cell's upper end; mass above the
  top cut is placed at +infinity; mass below the bottom cut is moved up to the
  bottom cut.  Every loss value only goes up, and delta(eps) is monotone in
  the loss, so this yields an upper bound on delta and hence on eps.
* Optimistic PMF: a cell's mass sits at the cell's lower end, and tail mass
  beyond the cuts is discarded.  Every loss value only goes down and mass is
  only removed, so this yields a lower bound.
* T-fold composition is done by binary exponentiation with linear
  convolutions through numpy's real FFT.  After each convolution the small
  negative FFT round-off is clamped to zero and negligible tails are cut with
  the same pessimistic (move up / send to +inf) or optimistic (drop) rule.
  Cut sizes are scaled so that the total effect of all cuts on the final
  delta stays below `budget * delta` (default budget 1e-4).
* eps is then solved exactly on the composed PMF: between consecutive grid
  points delta(eps) is affine in exp(eps).

The two bounds differ essentially by a shift of T*h in the loss, so the
bracket width is about T*h.

For q = 1 the exact analytic Gaussian curve (Balle and Wang, ICML 2018,
Theorem 8) is also evaluated as a cross-check:
  delta(eps) = Phi(mu/2 - eps/mu) - exp(eps) Phi(-mu/2 - eps/mu),
  mu = sqrt(T) / sigma.

Usage:  pld_reference.py q sigma T delta [h] [--budget B] [--jobs N]
Only numpy is required (mpmath is used for the analytic check if present).
"""

import argparse
import math
import sys
import time

import numpy as np

try:
    import mpmath  # optional: high-precision analytic check for q = 1
except ImportError:  # pragma: no cover
    mpmath = None

_SQRT2 = math.sqrt(2.0)
_erfc_u = np.frompyfunc(math.erfc, 1, 1)


def _erfc(z):
    return _erfc_u(np.asarray(z, dtype=np.float64)).astype(np.float64)


def gauss_sf(z):
    """P(N(0,1) >= z), accurate for large z."""
    return 0.5 * _erfc(np.asarray(z) / _SQRT2)


def gauss_cdf(z):
    """P(N(0,1) <= z), accurate for very negative z."""
    return 0.5 * _erfc(-np.asarray(z) / _SQRT2)


# ---------------------------------------------------------------------------
# Exact tail probabilities of the single-step privacy loss.
# ---------------------------------------------------------------------------

def _crossing(l, q, s2, sign):
    """x* with  sign*log((1-q) + q exp((2x-1)/(2 s2))) >= l  <=>  x >= x* (remove,
    sign=+1) or x <= x* (add, sign=-1).  Returns -inf where no finite x* exists
    (the loss is then >= l everywhere for remove, nowhere for add)."""
    l = np.asarray(l, dtype=np.float64)
    if q == 1.0:
        return sign * s2 * l + 0.5
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        u = np.expm1(sign * l) / q      # (exp(+-l) - (1-q)) / q - 1
        y = np.log1p(u)
    y = np.where(u > -1.0, y, -np.inf)
    return s2 * y + 0.5


def loss_tails(l, q, sigma, direction):
    """Return (S, F) with S = P(L >= l), F = P(L < l) = 1 - S, each computed
    directly from Gaussian tails so both are accurate when small."""
    s = float(sigma)
    s2 = s * s
    if direction == "remove":
        x = _crossing(l, q, s2, +1.0)
        S = q * gauss_sf((x - 1.0) / s)
        F = q * gauss_cdf((x - 1.0) / s)
        if q < 1.0:
            S = S + (1.0 - q) * gauss_sf(x / s)
            F = F + (1.0 - q) * gauss_cdf(x / s)
    else:
        x = _crossing(l, q, s2, -1.0)
        S = gauss_cdf(x / s)
        F = gauss_sf(x / s)
    return S, F


def _find_cut(fun, tau, start):
    """fun is monotone with fun(l) <= tau far out in the direction of `start`
    (+1.0: upward, -1.0: downward) and fun(l) > tau far out the other way.
    Returns an l with fun(l) <= tau, within rounding of the crossing."""
    bad = -start * 1e3
    if fun(bad) <= tau:
        return bad
    good = start
    while fun(good) > tau:
        bad = good
        good = good * 2.0
        if abs(good) > 1e6:
            raise RuntimeError("cannot find tail cut")
    for _ in range(200):
        mid = 0.5 * (good + bad)
        if mid == good or mid == bad:
            break
        if fun(mid) <= tau:
            good = mid
        else:
            bad = mid
    return good


class Dist:
    """PMF on the grid: arr[i] is the mass at loss (off + i) * h; `inf` is the
    mass at +infinity.  `steps` is the number of composed mechanisms."""

    __slots__ = ("off", "arr", "inf", "steps")

    def __init__(self, off, arr, inf, steps):
        self.off, self.arr, self.inf, self.steps = int(off), arr, float(inf), steps


def single_step(q, sigma, h, direction, tau0):
    """Discretise one step; returns (pessimistic Dist, optimistic Dist, info)."""
    def S(l):
        return float(loss_tails(np.array([l]), q, sigma, direction)[0][0])

    def F(l):
        return float(loss_tails(np.array([l]), q, sigma, direction)[1][0])

    l_hi = _find_cut(S, tau0, 1.0)
    l_lo = _find_cut(F, tau0, -1.0)
    k_lo = math.floor(l_lo / h)
    k_hi = math.ceil(l_hi / h)
    if k_hi <= k_lo:
        k_hi = k_lo + 1
    grid = np.arange(k_lo, k_hi + 1, dtype=np.float64) * h
    Sg, Fg = loss_tails(grid, q, sigma, direction)
    # cell c = [grid[c], grid[c+1]); difference S in the upper half, F in the
    # lower half (telescoping keeps partial sums accurate either way)
    m_upper = Sg[:-1] - Sg[1:]
    m_lower = Fg[1:] - Fg[:-1]
    mass = np.where(Sg[:-1] <= 0.5, m_upper, m_lower)
    np.maximum(mass, 0.0, out=mass)
    below = float(Fg[0])   # P(L < k_lo h)
    above = float(Sg[-1])  # P(L >= k_hi h)

    # pessimistic: cells at upper ends (indices k_lo+1..k_hi), the mass below
    # the bottom cut moved up to k_lo, the mass above the top cut at +inf
    pess = np.empty(len(mass) + 1)
    pess[0] = below
    pess[1:] = mass
    P = Dist(k_lo, pess, above, 1)
    # optimistic: cells at lower ends (indices k_lo..k_hi-1), tails dropped
    O = Dist(k_lo, mass.copy(), 0.0, 1)
    info = dict(l_lo=k_lo * h, l_hi=k_hi * h, bins=len(mass), below=below,
                above=above, total=below + float(np.sum(mass)) + above)
    return P, O, info


def _good_fft_len(n):
    """Smallest 2^a 3^b 5^c >= n."""
    best = 1 << (max(n - 1, 1)).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            v = p35
            while v < n:
                v *= 2
            if v < best:
                best = v
            p35 *= 3
        p5 *= 5
    return best


def _convolve(a, b):
    n = len(a) + len(b) - 1
    if min(len(a), len(b)) <= 64:
        out = np.convolve(a, b)
    else:
        nf = _good_fft_len(n)
        fa = np.fft.rfft(a, nf)
        if a is b:
            fa *= fa
        else:
            fa *= np.fft.rfft(b, nf)
        out = np.fft.irfft(fa, nf)[:n]
        del fa
    np.maximum(out, 0.0, out=out)   # clamp FFT round-off
    return out


def _truncate(D, tau, pessimistic, stats, T):
    """Cut tails of total mass <= tau each.  Pessimistic: bottom tail moved up
    to the new bottom point, top tail sent to +inf.  Optimistic: dropped."""
    a = D.arr
    n = len(a)
    c = np.cumsum(a)
    i_lo = int(np.searchsorted(c, tau, side="right"))   # a[:i_lo] sums <= tau
    lo_mass = float(c[i_lo - 1]) if i_lo > 0 else 0.0
    del c
    r = np.cumsum(a[::-1])
    j_hi = int(np.searchsorted(r, tau, side="right"))   # a[n-j_hi:] sums <= tau
    hi_mass = float(r[j_hi - 1]) if j_hi > 0 else 0.0
    del r
    if i_lo + j_hi >= n:  # never cut everything
        return D
    new = a[i_lo:n - j_hi].copy()
    inf = D.inf
    if pessimistic:
        new[0] += lo_mass
        inf += hi_mass
    # multiplicity of this partial result in the final composition <= T/steps
    stats["cut_effect"] += (T / D.steps) * (lo_mass + hi_mass)
    return Dist(D.off + i_lo, new, inf, D.steps)


def _compose_pair(A, B, tau_of, pessimistic, stats, T):
    finA = float(np.sum(A.arr))
    finB = float(np.sum(B.arr))
    arr = _convolve(A.arr, B.arr if B is not A else A.arr)
    inf = A.inf * finB + B.inf * finA + A.inf * B.inf
    D = Dist(A.off + B.off, arr, inf, A.steps + B.steps)
    stats["max_len"] = max(stats["max_len"], len(arr))
    stats["convs"] += 1
    return _truncate(D, tau_of(D.steps), pessimistic, stats, T)


def compose(D1, T, tau_of, pessimistic):
    """T-fold self-convolution by binary exponentiation."""
    stats = dict(cut_effect=0.0, max_len=len(D1.arr), convs=0)
    result = None
    base = D1
    t = T
    while t:
        if t & 1:
            result = base if result is None else _compose_pair(
                result, base, tau_of, pessimistic, stats, T)
        t >>= 1
        if t:
            base = _compose_pair(base, base, tau_of, pessimistic, stats, T)
    return result, stats


def delta_of_eps(D, h, eps):
    """delta(eps) = sum_i p_i (1 - exp(eps - l_i))_+ + inf."""
    k = math.floor(eps / h) - D.off + 1   # first index that may have l_i > eps
    k = max(k, 0)
    while k > 0 and (D.off + k - 1) * h > eps:
        k -= 1
    while k < len(D.arr) and (D.off + k) * h <= eps:
        k += 1
    if k >= len(D.arr):
        return D.inf
    l = (D.off + np.arange(k, len(D.arr))) * h
    return D.inf + float(np.sum(D.arr[k:] * -np.expm1(eps - l)))


def eps_of_delta(D, h, delta):
    """Smallest eps >= 0 with delta(eps) <= delta, exact for the PMF D."""
    if D.inf > delta:
        return math.inf
    if delta_of_eps(D, h, 0.0) <= delta:
        return 0.0
    n = len(D.arr)
    # breakpoints: b_0 = 0, then the grid points l_k > 0 in increasing order
    kpos = max(0, 1 - D.off)            # first index with l > 0
    nb = 1 + max(0, n - kpos)

    def bp(j):
        return 0.0 if j == 0 else (D.off + kpos + j - 1) * h

    lo, hi = 0, nb - 1        # delta(bp(lo)) > delta >= delta(bp(hi))
    if delta_of_eps(D, h, bp(hi)) > delta:
        return math.inf
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if delta_of_eps(D, h, bp(mid)) > delta:
            lo = mid
        else:
            hi = mid
    b = bp(lo)
    # on [b, bp(lo+1)] the active set is {l_i > b} = {i >= kpos + lo} and
    # delta(eps) = inf + S1 - exp(eps - b) * S2 is affine in exp(eps)
    k = kpos + lo
    l = (D.off + np.arange(k, n)) * h
    p = D.arr[k:]
    S1 = float(np.sum(p))
    S2 = float(np.sum(p * np.exp(b - l)))
    t = (D.inf + S1 - delta) / S2
    return b + math.log(t)


def _run_chain(args):
    q, sigma, T, delta, h, direction, kind, budget = args
    t0 = time.time()
    nbits = T.bit_length()
    # number of tail cuts: 2 per convolution (<= 2*nbits of them) + 2 initial
    K = 2 * (2 * nbits + 1)
    tau_of = (lambda m: budget * delta * m / (T * K))
    P, O, info = single_step(q, sigma, h, direction, tau_of(1))
    D1 = P if kind == "pess" else O
    init_effect = T * (info["below"] + info["above"])
    del P, O
    DT, stats = compose(D1, T, tau_of, kind == "pess")
    eps = eps_of_delta(DT, h, delta)
    stats["cut_effect"] += init_effect
    stats["final_mass"] = float(np.sum(DT.arr)) + DT.inf
    stats["final_inf"] = DT.inf
    stats["final_range"] = (DT.off * h, (DT.off + len(DT.arr) - 1) * h)
    stats["single"] = info
    stats["seconds"] = time.time() - t0
    return direction, kind, eps, stats


def analytic_gaussian_eps(sigma, T, delta):
    """Exact eps for the (non-subsampled) Gaussian mechanism, q = 1."""
    mu = math.sqrt(T) / sigma
    if mpmath is not None:
        mpmath.mp.dps = 40
        mu_m = mpmath.sqrt(T) / mpmath.mpf(sigma)

        def d(e):
            e = mpmath.mpf(e)
            return (mpmath.ncdf(mu_m / 2 - e / mu_m)
                    - mpmath.exp(e) * mpmath.ncdf(-mu_m / 2 - e / mu_m))
        lo, hi = mpmath.mpf(0), mpmath.mpf(1)
        if d(lo) <= delta:
            return 0.0
        while d(hi) > delta:
            hi *= 2
        for _ in range(200):
            mid = (lo + hi) / 2
            if d(mid) > delta:
                lo = mid
            else:
                hi = mid
        return float(hi)

    def d(e):
        return (0.5 * math.erfc(-(mu / 2 - e / mu) / _SQRT2)
                - math.exp(e) * 0.5 * math.erfc((mu / 2 + e / mu) / _SQRT2))
    lo, hi = 0.0, 1.0
    while d(hi) > delta:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if d(mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("q", type=float)
    ap.add_argument("sigma", type=float)
    ap.add_argument("T", type=int)
    ap.add_argument("delta", type=float)
    ap.add_argument("h", type=float, nargs="?", default=None,
                    help="grid interval (default 5e-3/T, bracket width ~T*h)")
    ap.add_argument("--budget", type=float, default=1e-4,
                    help="total tail-cut effect allowed, as a fraction of delta")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run the four chains in this many processes")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if not (0.0 < a.q <= 1.0 and a.sigma > 0 and a.T >= 1 and 0 < a.delta < 1):
        ap.error("need 0 < q <= 1, sigma > 0, T >= 1, 0 < delta < 1")
    h = a.h if a.h is not None else 5e-3 / a.T
    t0 = time.time()
    tasks = [(a.q, a.sigma, a.T, a.delta, h, d, k, a.budget)
             for d in ("remove", "add") for k in ("pess", "opt")]
    if a.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(a.jobs) as pool:
            results = pool.map(_run_chain, tasks, chunksize=1)
    else:
        results = [_run_chain(t) for t in tasks]
    res = {}
    for direction, kind, eps, st in results:
        res[(direction, kind)] = eps
        if not a.quiet:
            si = st["single"]
            print("# %-6s %-4s eps=%.6f  [1-step bins=%d range=(%.4g,%.4g) "
                  "mass err=%.2e]  convs=%d max_len=%d  T-fold range=(%.3f,%.3f) "
                  "mass=%.12f inf=%.3e cut_effect<=%.2e  %.1fs" % (
                      direction, kind, eps, si["bins"], si["l_lo"], si["l_hi"],
                      si["total"] - 1.0, st["convs"], st["max_len"],
                      st["final_range"][0], st["final_range"][1],
                      st["final_mass"], st["final_inf"], st["cut_effect"],
                      st["seconds"]))
    lower = max(res[("remove", "opt")], res[("add", "opt")])
    upper = max(res[("remove", "pess")], res[("add", "pess")])
    print("q=%g sigma=%g T=%d delta=%g h=%g" % (a.q, a.sigma, a.T, a.delta, h))
    if a.q == 1.0:
        print("analytic Gaussian (Balle-Wang Thm 8): eps=%.6f" %
              analytic_gaussian_eps(a.sigma, a.T, a.delta))
    print("lower=%.6f upper=%.6f width=%.6f  (%.1fs)" %
          (lower, upper, upper - lower, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
