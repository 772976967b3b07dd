// SPDX-License-Identifier: Apache-2.0
// The RDP accountant against published reference values (/work/shared/data/dp-reference.md's
// sources, copied here so the test stands alone).
#include "core/math/accountant.hpp"
#include "core/util/error.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

using namespace fedl::core;

namespace {

std::string
error_of(double q, double sigma, std::uint64_t steps, double delta)
{
  try {
    (void)compute_epsilon(q, sigma, steps, delta);
  } catch (const UsageError& e) {
    return e.what();
  }
  return "(accepted)";
}

} // namespace

TEST_SUITE_BEGIN("accountant");

TEST_CASE("core::rdp_sampled_gaussian matches the published per-step values at integer orders")
{
  // Per-step RDP of the sampled Gaussian mechanism; these agree across independent
  // implementations (TF Privacy / dp_accounting, Opacus) and numerical integration to >= 8 digits.
  struct Row
  {
    double q, sigma, alpha, rdp;
  };
  const std::vector<Row> rows = {
    {0.01, 1.1, 2, 1.2851008161e-04},  {0.01, 1.1, 8, 5.840703355e-04}, {0.01, 1.1, 16, 1.6998267278},
    {0.004, 1.1, 4, 4.1736222431e-05}, {0.1, 0.8, 2, 0.0370137911},     {0.1, 0.8, 4, 0.3371327067},
    {0.1, 0.8, 8, 3.6186574224},       {0.02, 2.0, 8, 4.718204433e-04}, {0.02, 2.0, 16, 9.967573471e-04},
  };
  for (const auto& r : rows) {
    CAPTURE(r.q);
    CAPTURE(r.sigma);
    CAPTURE(r.alpha);
    const double got = rdp_sampled_gaussian(r.q, r.sigma, r.alpha);
    MESSAGE("q ", r.q, " sigma ", r.sigma, " alpha ", r.alpha, ": expected ", r.rdp, ", got ", got);
    CHECK(std::abs(got - r.rdp) <= 1e-6 * r.rdp);
  }
}

TEST_CASE("core::rdp_sampled_gaussian at q = 1 is the Gaussian mechanism's alpha / (2 sigma^2)")
{
  for (const double sigma : {0.1, 0.8, 1.3, 10.0}) {
    for (const double alpha : {1.25, 1.5, 2.0, 7.0, 63.0, 512.0}) {
      CHECK(rdp_sampled_gaussian(1.0, sigma, alpha) == alpha / (2 * sigma * sigma));
    }
  }
}

TEST_CASE("core::detail::log_a_integral (fractional orders) agrees with the exact sum at integer orders")
{
  // The quadrature is what fractional orders use; integer orders have an exact answer to check it by.
  for (const double q : {1e-5, 0.0025, 0.01, 0.1, 0.5}) {
    for (const double sigma : {0.1, 0.5, 1.0, 1.3, 4.0, 20.0}) {
      for (const std::uint64_t alpha : {2u, 3u, 5u, 16u}) {
        CAPTURE(q);
        CAPTURE(sigma);
        CAPTURE(alpha);
        const double exact = detail::log_a_integer(q, sigma, alpha);
        const double quad = detail::log_a_integral(q, sigma, static_cast<double>(alpha));
        // Absolute 1e-18: where log A_α is ~1e-13 (q 1e-5, large σ) the finite sum itself loses
        // digits (α·log(1−q) cancels ~αq), the quadrature of A_α − 1 does not.
        CHECK(std::abs(quad - exact) <= 1e-9 * exact + 1e-18);
      }
    }
  }
  // RDP is non-decreasing in the order (Mironov 2017, Prop. 9): fractional orders sit between
  // their integer neighbours.
  for (const double a : {1.25, 1.5, 2.5, 3.5, 4.5}) {
    const double r = rdp_sampled_gaussian(0.01, 1.1, a);
    if (std::floor(a) > 1) {
      CHECK(r >= rdp_sampled_gaussian(0.01, 1.1, std::floor(a)));
    }
    CHECK(r <= rdp_sampled_gaussian(0.01, 1.1, std::ceil(a)));
  }
}

TEST_CASE("core::compute_epsilon matches TF Privacy 0.9.0's end-to-end vectors")
{
  // tensorflow_privacy 0.9.0, tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_test.py
  // (default orders, Poisson sampling): steps = ceil(epochs * n / batch), q = batch / n.
  struct Vector
  {
    double q, sigma;
    std::uint64_t steps;
    double delta, epsilon, order;
  };
  const std::vector<Vector> vectors = {
    {150.0 / 60000, 1.3, 6000, 1e-5, 0.7242234026109595, 19},       // n 60000, batch 150, 15 epochs
    {100.0 / 100000, 1.0, 30000, 1e-7, 1.4154988495444842, 13},     // n 1e5, batch 100, 30 epochs
    {1024.0 / 100000000, 0.1, 976563, 1e-7, 5907982.3113984, 1.25}, // n 1e8, batch 1024, 10 epochs
  };
  for (const auto& v : vectors) {
    const auto got = compute_epsilon(v.q, v.sigma, v.steps, v.delta, legacy_orders());
    MESSAGE("q ", v.q, " sigma ", v.sigma, " steps ", v.steps, " delta ", v.delta, ": expected epsilon ", v.epsilon,
            " at order ", v.order, ", got ", got.epsilon, " at order ", got.order);
    CHECK(std::abs(got.epsilon - v.epsilon) <= 1e-3 * v.epsilon);
    CHECK(got.order == v.order);
  }
}

TEST_CASE("core::default_orders: a grid at least as fine as Opacus's and TF Privacy's, so never looser")
{
  const auto fine = default_orders();
  CHECK(std::is_sorted(fine.begin(), fine.end()));
  const auto has = [&](double a) {
    return std::any_of(fine.begin(), fine.end(), [&](double o) { return std::abs(o - a) < 1e-12; });
  };
  // Opacus's RDPAccountant.DEFAULT_ALPHAS: 1 + x / 10 for x in 1..99, then 12..63.
  for (int x = 1; x < 100; ++x) {
    CHECK(has(1 + x / 10.0));
  }
  for (int a = 12; a < 64; ++a) {
    CHECK(has(a));
  }
  for (const double a : legacy_orders()) {
    CHECK(has(a));
  }
  CHECK(has(1024));
  // So on the same inputs the fine grid's epsilon is never above either list's.
  for (const auto& [q, sigma, steps] : {std::tuple{0.01, 1.1, 1000}, std::tuple{0.004, 1.1, 15000},
                                        std::tuple{1.0, 5.0, 50}, std::tuple{0.1, 0.8, 100}}) {
    const auto fine_eps = compute_epsilon(q, sigma, steps, 1e-5).epsilon;
    CHECK(fine_eps <= compute_epsilon(q, sigma, steps, 1e-5, legacy_orders()).epsilon);
  }
  // The table: Opacus's RDP accountant gives 1.7118 (q 0.01, sigma 1.1, 1000 steps) and
  // 2.5029 (q 0.004, 15000 steps) at delta 1e-5; fedl's fine grid is at or below them.
  CHECK(compute_epsilon(0.01, 1.1, 1000, 1e-5).epsilon <= 1.7118 + 1e-4);
  CHECK(compute_epsilon(0.004, 1.1, 15000, 1e-5).epsilon <= 2.5029 + 1e-4);
  CHECK(compute_epsilon(1.0, 5.0, 50, 1e-5).epsilon <= 7.0774 + 1e-4);
}

TEST_CASE("core::epsilon_from_rdp is Balle et al.'s Theorem 21, minimised and never negative")
{
  const std::vector<double> orders = {2, 10};
  const std::vector<double> rdp = {0.5, 0.1};
  // order 2: 0.5 - (ln 1e-5 + ln 2) + ln(1/2); order 10: 0.1 - (ln 1e-5 + ln 10)/9 + ln(0.9)
  const double e10 = 0.1 - (std::log(1e-5) + std::log(10.0)) / 9 + std::log(0.9);
  const auto got = epsilon_from_rdp(orders, rdp, 1e-5);
  CHECK(got.order == 10);
  CHECK(got.epsilon == doctest::Approx(e10).epsilon(1e-12));
  const std::vector<double> zero = {0, 0};
  CHECK(epsilon_from_rdp(orders, zero, 0.9).epsilon == 0);
}

TEST_CASE("core::compute_epsilon names the flag and the rule for bad input")
{
  CHECK(error_of(0.01, 0, 100, 1e-5) == "--noise-multiplier 0: must be > 0 (the noise standard deviation over "
                                        "the clipping norm)");
  CHECK(error_of(0.01, -1, 100, 1e-5).rfind("--noise-multiplier -1: must be > 0", 0) == 0);
  CHECK(error_of(0, 1, 100, 1e-5).rfind("--sample-rate 0: must be in (0, 1]", 0) == 0);
  CHECK(error_of(1.5, 1, 100, 1e-5).rfind("--sample-rate 1.5: must be in (0, 1]", 0) == 0);
  CHECK(error_of(0.01, 1, 0, 1e-5).rfind("--steps 0: must be at least 1", 0) == 0);
  CHECK(error_of(0.01, 1, 100, 0).rfind("--delta 0: must be in (0, 1)", 0) == 0);
  CHECK(error_of(0.01, 1, 100, 1).rfind("--delta 1: must be in (0, 1)", 0) == 0);
  CHECK(error_of(0.01, std::nan(""), 100, 1e-5).rfind("--noise-multiplier nan", 0) == 0);
  CHECK_THROWS_AS((void)rdp_sampled_gaussian(0.01, 1, 1.0), UsageError);
  CHECK(error_of(1.0, 1, 1, 0.5) == "(accepted)");
}

TEST_SUITE_END();
