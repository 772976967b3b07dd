// SPDX-License-Identifier: Apache-2.0
// Differential-privacy accounting for DP-SGD: the Rényi DP (RDP) of the Poisson-subsampled
// Gaussian mechanism, composed over steps and converted to (ε, δ).
//
// RDP of one step: Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the Sampled
// Gaussian Mechanism" (arXiv:1908.10530), add/remove-one neighbours, sampling rate q, noise
// multiplier σ (noise standard deviation over the clipping norm). RDP composes by addition
// over steps. Conversion: Balle, Barthe, Gaboardi, Hsu, Sato 2020, "Hypothesis Testing
// Interpretations and Rényi Differential Privacy" (AISTATS), Theorem 21.
#pragma once

#include "core/math/pld.hpp"

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

namespace fedl::core {

// The RDP of order `alpha` (> 1) of one step of the sampled Gaussian mechanism with sampling
// rate `q` in (0, 1] and noise multiplier `sigma` > 0. Integer orders: the exact finite sum;
// fractional orders: numerical integration (see accountant.cpp); q = 1: α / (2σ²).
// Throws UsageError for values outside those ranges.
double rdp_sampled_gaussian(double q, double sigma, double alpha);

struct PrivacySpent
{
  double epsilon = 0; // the smallest ε over the orders (never negative)
  double order = 0;   // the order that gives it
};

// (ε, δ) from the total RDP `rdp[i]` at `orders[i]` (Balle et al. 2020, Theorem 21), minimised
// over the orders. `delta` in (0, 1); the spans must have the same non-zero length, orders > 1.
PrivacySpent epsilon_from_rdp(std::span<const double> orders, std::span<const double> rdp, double delta);

// δ at `epsilon` (≥ 0) from the total RDP, the inverse of epsilon_from_rdp's conversion (the
// same theorem solved for δ), minimised over the orders and at most 1.
double delta_from_rdp(std::span<const double> orders, std::span<const double> rdp, double epsilon);

// The orders fedl evaluates RDP at (accountant "rdp-v2"): 1.1 to 10.9 in steps of 0.1 with TF
// Privacy's 1.25, 1.75 and 2.25, then 11 ... 64, 128, 256, 512, 1024: every order of Opacus's
// and TF Privacy's default lists, so fedl's RDP bound is never looser than theirs on the same
// inputs (fractional orders here are integrated exactly, not bounded by a series).
std::span<const double> default_orders();
// The orders of accountant "rdp-v1" (fedl's ledgers before December 2026), TF Privacy's list:
// 1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5, 5 ... 63, 128, 256, 512.
std::span<const double> legacy_orders();

// ε at `delta` after `steps` steps of DP-SGD with Poisson sampling rate `q` and noise
// multiplier `sigma`. Errors name the fedl audit flags (--sample-rate, --noise-multiplier,
// --steps, --delta).
PrivacySpent compute_epsilon(double q, double sigma, std::uint64_t steps, double delta,
                             std::span<const double> orders = default_orders());
// δ at `epsilon` for the same, at default_orders().
double compute_delta(double q, double sigma, std::uint64_t steps, double epsilon);

// How an (ε, δ) is computed from a composition of sampled Gaussian mechanisms; ledgers and a
// site's privacy.jsonl record it by name ("pld-v1"), so that an audit recomputes with the one
// that produced each recorded ε.
enum class Accountant
{
  rdp_v1, // RDP at legacy_orders(): every ledger written before December 2026
  rdp_v2, // RDP at default_orders()
  pld_v1, // pld.hpp's PLD accountant (its FFT length and tail shares are part of the version)
};

// "rdp-v1", "rdp-v2", "pld-v1".
std::string_view accountant_name(Accountant a);
// A recorded name back; nullopt for a name this fedl does not know.
std::optional<Accountant> accountant_from_name(std::string_view name);
// The option's values: "pld" (the default) and "rdp", the current version of each. UsageError
// naming `flag` otherwise.
Accountant accountant_from_flag(std::string_view value, std::string_view flag);
// "pld" or "rdp".
std::string_view accountant_flag(Accountant a);

// ε at `delta` of the composition of `parts` by accountant `a` (order: RDP's best order, 0 for
// PLD). RDP's per-step curves are cached per (q, σ, orders).
PrivacySpent account_epsilon(Accountant a, std::span<const GaussianSteps> parts, double delta);

namespace detail {
// log A_α for any order α > 1 (q < 1) by the quadrature that fractional orders use; exposed so
// tests can check it against the exact sum at integer orders.
double log_a_integral(double q, double sigma, double alpha);
// log A_α for an integer order α ≥ 2 by the finite sum.
double log_a_integer(double q, double sigma, std::uint64_t alpha);
} // namespace detail

} // namespace fedl::core
