// SPDX-License-Identifier: Apache-2.0
// The PLD accountant against published values, an independent computation
// (tests/tools/pld_reference.py: pessimistic and optimistic rounding on a much finer grid, numpy
// FFT, minutes per setting) and the exact analytic Gaussian.
#include "core/math/accountant.hpp"
#include "core/math/pld.hpp"
#include "core/util/error.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <vector>

using namespace fedl::core;

namespace {

double
pld(double q, double sigma, std::uint64_t steps, double delta)
{
  const GaussianSteps part{q, sigma, steps};
  return pld_epsilon({&part, 1}, delta).epsilon;
}

} // namespace

TEST_CASE("core::pld_epsilon lies within an independent computation's bracket and at the published values")
{
  struct Row
  {
    double q, sigma;
    std::uint64_t steps;
    double delta;
    double lower, upper; // pld_reference.py's bracket (its command line: q sigma steps delta h)
    double published;    // the tightest published numeric value (PRV/PLD), 0 if none
  };
  const std::vector<Row> rows = {
    {0.01, 1.1, 1000, 1e-5, 1.514860, 1.515863, 1.515},   // h 1e-6
    {0.004, 1.1, 15000, 1e-5, 2.293870, 2.296873, 2.295}, // h 2e-7
    {1.0, 5.0, 50, 1e-5, 6.572718, 6.573226, 6.5730},     // h 1e-5; exact: analytic Gaussian
    {0.1, 0.8, 100, 1e-6, 12.525230, 12.525447, 0},       // h 2e-6
    {0.02, 2.0, 500, 1e-5, 0.920422, 0.921424, 0},        // h 2e-6
  };
  for (const auto& r : rows) {
    const GaussianSteps part{r.q, r.sigma, r.steps};
    const auto got = pld_epsilon({&part, 1}, r.delta, /*with_lower=*/true);
    MESSAGE("q ", r.q, " sigma ", r.sigma, " steps ", r.steps, " delta ", r.delta, ": epsilon ", got.epsilon,
            " (lower bound ", got.epsilon_lower, ", grid ", got.grid, "), reference [", r.lower, ", ", r.upper, "]");
    // Sound: never below what the reference proves the exact value is at least.
    CHECK(got.epsilon >= r.lower);
    // Tight: within 0.1% of the reference's upper bound (FFT length 2^15: at 15000 steps 0.04% above it).
    CHECK(got.epsilon <= r.upper * 1.001);
    // The lower bound is one: below the reference's upper bound, and not far below.
    CHECK(got.epsilon_lower <= r.upper);
    CHECK(got.epsilon_lower >= r.lower * 0.9);
    if (r.published > 0) {
      CHECK(got.epsilon == doctest::Approx(r.published).epsilon(2e-3));
    }
    // And tighter than RDP on the fine grid, which is tighter than Opacus's RDP.
    CHECK(got.epsilon < compute_epsilon(r.q, r.sigma, r.steps, r.delta).epsilon);
  }
}

TEST_CASE("core::pld_epsilon at q = 1 is the analytic Gaussian")
{
  // Balle and Wang 2018, Theorem 8; 50 steps at sigma 5 are one Gaussian with mu = sqrt(50) / 5.
  const double mu = std::sqrt(50.0) / 5;
  const double exact = analytic_gaussian_epsilon(mu, 1e-5);
  CHECK(exact == doctest::Approx(6.5730).epsilon(1e-4));
  CHECK(analytic_gaussian_delta(mu, exact) == doctest::Approx(1e-5).epsilon(1e-9));
  CHECK(std::abs(pld(1.0, 5.0, 50, 1e-5) - exact) <= 1e-6);
  // Parts at q = 1 with different sigma compose as one Gaussian: mu² adds.
  const std::vector<GaussianSteps> parts = {{1.0, 2.0, 3}, {1.0, 4.0, 10}};
  CHECK(std::abs(pld_epsilon(parts, 1e-6).epsilon - analytic_gaussian_epsilon(std::sqrt(3.0 / 4 + 10.0 / 16), 1e-6)) <=
        1e-6);
  // A small delta: the second term of delta(eps) underflows a double without log space.
  CHECK(std::isfinite(analytic_gaussian_epsilon(50.0, 1e-12)));
  // Mixed with a subsampled part, the q = 1 part is discretized like any other; the result sits
  // between either alone and their RDP bound.
  const std::vector<GaussianSteps> mixed = {{1.0, 5.0, 50}, {0.01, 1.1, 1000}};
  const double both = pld_epsilon(mixed, 1e-5).epsilon;
  CHECK(both > exact);
  CHECK(both > pld(0.01, 1.1, 1000, 1e-5));
  CHECK(both < 6.5730 + 1.7253);
}

TEST_CASE("core::pld_epsilon is monotone in steps, sigma and q, and composes parts as one")
{
  double last = 0;
  for (const std::uint64_t steps : {1, 10, 100, 1000, 10000}) {
    const double e = pld(0.01, 1.1, steps, 1e-5);
    CHECK(e >= last);
    last = e;
  }
  last = 1e300;
  for (const double sigma : {0.6, 0.8, 1.1, 2.0, 5.0}) {
    const double e = pld(0.05, sigma, 200, 1e-5);
    CHECK(e <= last);
    last = e;
  }
  last = 0;
  for (const double q : {0.001, 0.01, 0.1, 0.5, 0.99}) {
    const double e = pld(q, 1.0, 100, 1e-5);
    CHECK(e >= last);
    last = e;
  }
  // Two parts of 500 steps are one of 1000.
  const std::vector<GaussianSteps> halves = {{0.01, 1.1, 500}, {0.01, 1.1, 500}};
  CHECK(pld_epsilon(halves, 1e-5).epsilon == doctest::Approx(pld(0.01, 1.1, 1000, 1e-5)).epsilon(1e-9));
  // Nothing spent: 0.
  const std::vector<GaussianSteps> none = {{0.01, 1.1, 0}};
  CHECK(pld_epsilon(none, 1e-5).epsilon == 0);
}

TEST_CASE("core::pld_delta is the other conversion: delta at epsilon, consistent with pld_epsilon")
{
  // The analytic case round-trips exactly.
  const GaussianSteps full{1.0, 5.0, 50};
  const auto exact = pld_delta({&full, 1}, pld_epsilon({&full, 1}, 1e-5).epsilon);
  CHECK(exact.delta == doctest::Approx(1e-5).epsilon(1e-9));
  // Subsampled: delta at the epsilon computed for 1e-5 is 1e-5, within what the two grids (chosen
  // for a tail budget of 1e-8 and 1e-12) differ by; the lower bound is below it; delta falls as
  // epsilon grows.
  const GaussianSteps part{0.01, 1.1, 1000};
  const double eps = pld_epsilon({&part, 1}, 1e-5).epsilon;
  const auto d = pld_delta({&part, 1}, eps, /*with_lower=*/true);
  CHECK(d.delta == doctest::Approx(1e-5).epsilon(0.05));
  CHECK(d.delta_lower <= d.delta);
  CHECK(d.delta_lower > 0);
  double last = 1;
  for (const double e : {0.0, 0.5, 1.0, 1.5, 2.0, 3.0}) {
    const double x = pld_delta({&part, 1}, e).delta;
    CHECK(x <= last);
    last = x;
  }
  CHECK_THROWS_WITH_AS(pld_delta({&part, 1}, -1), doctest::Contains("--epsilon -1"), UsageError);
  // RDP's conversion solved for delta: at RDP's own epsilon it gives the delta back.
  const auto rdp = compute_epsilon(0.01, 1.1, 1000, 1e-5);
  CHECK(compute_delta(0.01, 1.1, 1000, rdp.epsilon) == doctest::Approx(1e-5).epsilon(1e-9));
}

TEST_CASE("core::pld_epsilon with noise too small to discretize: an error, and RDP's bound in a ledger")
{
  // sigma 0.01: one step's loss reaches ~5600 with half its mass near 5000; the PLD cannot bound
  // its tails within delta on 32768 points. --privacy-calc says so; a ledger's account, which
  // must never fail a round, takes RDP's bound, also sound (and the audit recomputes the same).
  CHECK_THROWS_WITH_AS(pld(0.5, 0.01, 1, 1e-5), doctest::Contains("the RDP accountant"), Error);
  const GaussianSteps part{0.5, 0.01, 1};
  const auto ledger = account_epsilon(Accountant::pld_v1, {&part, 1}, 1e-5);
  CHECK(std::isfinite(ledger.epsilon));
  CHECK(ledger.epsilon == account_epsilon(Accountant::rdp_v2, {&part, 1}, 1e-5).epsilon);
}

TEST_CASE("core::pld_epsilon names the flag for bad input")
{
  CHECK_THROWS_WITH_AS(pld(0, 1.0, 10, 1e-5), doctest::Contains("--sample-rate"), UsageError);
  CHECK_THROWS_WITH_AS(pld(1.5, 1.0, 10, 1e-5), doctest::Contains("--sample-rate"), UsageError);
  CHECK_THROWS_WITH_AS(pld(0.1, 0, 10, 1e-5), doctest::Contains("--noise-multiplier"), UsageError);
  CHECK_THROWS_WITH_AS(pld(0.1, std::nan(""), 10, 1e-5), doctest::Contains("--noise-multiplier"), UsageError);
  CHECK_THROWS_WITH_AS(pld(0.1, 1.0, 10, 0), doctest::Contains("--delta"), UsageError);
  CHECK_THROWS_WITH_AS(pld(0.1, 1.0, 10, 1), doctest::Contains("--delta"), UsageError);
  CHECK_THROWS_AS(pld_epsilon({}, 1e-5), UsageError);
}

TEST_CASE("core accountant names: what ledgers record and what the flags take")
{
  for (const auto a : {Accountant::rdp_v1, Accountant::rdp_v2, Accountant::pld_v1}) {
    CHECK(accountant_from_name(accountant_name(a)) == a);
  }
  CHECK_FALSE(accountant_from_name("pld-v2"));
  CHECK(accountant_from_flag("pld", "--accountant") == Accountant::pld_v1);
  CHECK(accountant_from_flag("rdp", "--accountant") == Accountant::rdp_v2);
  CHECK_THROWS_WITH_AS(accountant_from_flag("prv", "--accountant"), doctest::Contains("--accountant prv"), UsageError);
}
