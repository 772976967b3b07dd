// SPDX-License-Identifier: Apache-2.0
// Privacy-loss-distribution (PLD) accounting for compositions of Poisson-subsampled Gaussian
// mechanisms, add/remove-one neighbouring: the tightest (ε, δ) that a numerical accountant gives,
// 10-13% below RDP's bound in fedl's typical settings.
//
// Method (accountant.hpp has RDP):
//  - The privacy loss L of one step, under each of the two neighbouring directions
//    (remove: P = (1−q)N(0,σ²) + qN(1,σ²) against Q = N(0,σ²); add: the reverse), is
//    discretized on a grid of interval h from the exact Gaussian CDFs.
//  - Upper bound: "connect the dots" (Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022,
//    "Connect the Dots: Tighter Discrete Approximations of Privacy Loss Distributions", PETS):
//    each grid cell's P- and Q-mass is split between its two ends so that both are preserved;
//    the discrete pair then dominates the true one at every ε, so its composition bounds the
//    true composition's δ(ε) from above. Tail mass cut off is counted as infinite loss.
//  - Lower bound: each cell's mass split between its ends so that its mean loss is preserved
//    (randomized rounding); by Hoeffding the composed loss is within η = h·√(T·ln(1/δ')/2) of
//    the true one except with probability δ' (the coupling argument of Gopi, Lee, Wutschitz
//    2021, "Numerical Composition of Differential Privacy", NeurIPS), so
//    ε_true(δ) ≥ ε_discrete(δ + δ') − η.
//  - Composition by FFT (Koskela, Jälkö, Honkela 2020, "Computing Tight Differential Privacy
//    Guarantees Using FFT", AISTATS): each mechanism's PMF transformed once, raised to its
//    number of steps, multiplied, transformed back. The window is chosen, and the mass that
//    wraps around it bounded, by Chernoff bounds from the discrete PMFs' own moment generating
//    functions; that mass is added to δ for the upper bound (and for the lower, taken off).
//    The FFT is KISS FFT's header-only C++ template (BSD-3-Clause, Debian's libkissfft-dev) in
//    double precision; FFTW (GPL) was not used because fedl is Apache-2.0.
//  - δ(ε) and ε(δ) are computed exactly from the discrete PMF (piecewise in e^ε).
//  - Every step at q = 1: the exact analytic Gaussian (Balle, Wang 2018, "Improving the Gaussian
//    Mechanism for Differential Privacy", ICML, Theorem 8), composed as one Gaussian with
//    μ = √(Σ steps/σ²).
// Not rigorous to the last digit: the FFT's own rounding (absolute ~1e-16·√N per entry; negative
// entries are clamped to 0) and the Gaussian CDFs' (erfc, ~1e-16 relative).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace fedl::core {

// `steps` compositions of the Poisson-subsampled Gaussian mechanism with sampling rate `q` in
// (0, 1] and noise multiplier `sigma` > 0.
struct GaussianSteps
{
  double q = 1;
  double sigma = 1;
  std::uint64_t steps = 1;
};

struct PldEpsilon
{
  double epsilon = 0;       // a sound upper bound on ε(δ) of the composition
  double epsilon_lower = 0; // a lower bound on the same exact ε(δ): epsilon − this bounds the error
  double grid = 0;          // the discretization interval h (0: analytic)
};

// ε at `delta` in (0, 1) of the composition of every part (at least one; parts with 0 steps add
// nothing); `with_lower` also computes epsilon_lower (twice the work). UsageError naming the flag
// for values out of range. Thread-safe; one step's spectrum is cached per (q, σ, grid).
PldEpsilon pld_epsilon(std::span<const GaussianSteps> parts, double delta, bool with_lower = false);

struct PldDelta
{
  double delta = 0;       // a sound upper bound on δ(ε) of the composition
  double delta_lower = 0; // a lower bound on the same exact δ(ε)
  double grid = 0;
};

// δ at `epsilon` (≥ 0) of the composition of every part, the other conversion; the tails and the
// FFT's wrap-around may add up to 1e-12 to it. UsageError naming the flag for values out of
// range.
PldDelta pld_delta(std::span<const GaussianSteps> parts, double epsilon, bool with_lower = false);

// The analytic Gaussian mechanism of sensitivity over noise `mu` (> 0): δ at ε, and the ε at δ
// (bisection to 1e-12 relative).
double analytic_gaussian_delta(double mu, double epsilon);
double analytic_gaussian_epsilon(double mu, double delta);

} // namespace fedl::core
