#!/usr/bin/python3
# SPDX-License-Identifier: Apache-2.0
"""An independent (ε, δ) for the Poisson-subsampled Gaussian mechanism, to check fedl's accountant.

usage: rdp_reference.py Q SIGMA STEPS DELTA   -> prints JSON {"epsilon": ..., "order": ...}

Same definitions as src/core/math/accountant.cpp (Mironov, Talwar, Zhang 2019; Balle et al. 2020,
Theorem 21) but another way of computing them: 50-digit arithmetic with mpmath (no log-space
tricks needed), the finite binomial sum at integer orders and mpmath's tanh-sinh quadrature of
the paper's integral at fractional orders, split where the integrand changes shape.
"""

import json
import sys

import mpmath as mp

mp.mp.dps = 50
# fedl's "rdp-v2" list: 1.1 to 10.9 by 0.1, TF Privacy's 1.25, 1.75, 2.25, then 11..64, 128..1024.
ORDERS = sorted([t / 10 for t in range(11, 110)] + [1.25, 1.75, 2.25] + list(range(11, 65)) + [128, 256, 512, 1024])


def log_a(q, sigma, alpha):
    q, sigma = mp.mpf(q), mp.mpf(sigma)
    if alpha == int(alpha):
        n = int(alpha)
        a = mp.fsum(mp.binomial(n, k) * (1 - q) ** (n - k) * q ** k * mp.exp((k * k - k) / (2 * sigma ** 2))
                    for k in range(n + 1))
        return mp.log(a)
    alpha = mp.mpf(alpha)

    def f(z):
        mu0 = mp.npdf(z, 0, sigma)
        return mu0 * ((1 - q) + q * mp.exp((2 * z - 1) / (2 * sigma ** 2))) ** alpha

    # Where the integrand's two bumps and the mixture's transition lie.
    z0 = mp.mpf(0.5) + sigma ** 2 * mp.log((1 - q) / q)
    points = sorted({mp.mpf(0), mp.mpf(0.5), alpha, z0})
    points = [-mp.inf, points[0] - 10 * sigma] + points + [points[-1] + 10 * sigma, mp.inf]
    return mp.log(mp.quad(f, points))


def rdp(q, sigma, alpha):
    if q == 1:
        return mp.mpf(alpha) / (2 * mp.mpf(sigma) ** 2)
    return log_a(q, sigma, alpha) / (mp.mpf(alpha) - 1)


def main():
    q, sigma, steps, delta = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])

    def epsilon(a):
        am = mp.mpf(a)
        return steps * rdp(q, sigma, a) - (mp.log(delta) + mp.log(am)) / (am - 1) + mp.log((am - 1) / am)

    # The integer orders first (exact sums, fast); epsilon is unimodal in the order, so the
    # fractional orders (a quadrature each, slow) only where the best integer order's neighbours
    # are.
    best = min((epsilon(a), a) for a in ORDERS if a == int(a))
    near = [a for a in ORDERS if a != int(a) and abs(a - best[1]) < 1]
    best = min([best] + [(epsilon(a), a) for a in near])
    print(json.dumps({"epsilon": float(max(best[0], 0)), "order": best[1]}))


if __name__ == "__main__":
    main()
