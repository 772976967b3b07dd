// SPDX-License-Identifier: Apache-2.0
// RDP accountant for the Poisson-subsampled Gaussian mechanism; see accountant.hpp for the
// papers. Everything is computed in log space, because the moments A_α below range from
// 1 + 1e-12 (tiny q, large σ) to e^(10^7) (σ = 0.1, α = 512) within one default order list.
#include "core/math/accountant.hpp"

#include "core/util/bounded_cache.hpp"
#include "core/util/error.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <math.h> // lgamma_r (POSIX, not in <cmath>)
#include <memory>
#include <tuple>
#include <vector>

namespace fedl::core {

namespace {

constexpr double inf = std::numeric_limits<double>::infinity();

// log(e^a + e^b) without overflow.
double
log_add(double a, double b)
{
  if (a == -inf) {
    return b;
  }
  if (b == -inf) {
    return a;
  }
  const auto hi = std::max(a, b);
  return hi + std::log1p(std::exp(std::min(a, b) - hi));
}

// log Γ(x) for x > 0. lgamma_r, not std::lgamma: lgamma stores the sign in the global signgam,
// a data race when round validation checks several sites' DP-SGD reports in parallel
// (ThreadSanitizer, make tsan).
double
log_gamma(double x)
{
  int sign = 0;
  return ::lgamma_r(x, &sign);
}

// log of the binomial coefficient C(n, k), by log Γ so that n = 512 does not overflow.
double
log_binomial(double n, double k)
{
  return log_gamma(n + 1) - log_gamma(k + 1) - log_gamma(n - k + 1);
}

// 10-point Gauss–Legendre on [-1, 1]: the positive nodes and their weights.
constexpr std::array<double, 5> gl_nodes = {0.1488743389816312108848, 0.4333953941292471907993,
                                            0.6794095682990244062343, 0.8650633666889845107321,
                                            0.9739065285171717200779};
constexpr std::array<double, 5> gl_weights = {0.2955242247147528701739, 0.2692667193099963550912,
                                              0.2190863625159820439955, 0.1494513491505805931458,
                                              0.0666713443086881375936};

// log h(z) for h = (1 + y)^α − 1 − αy, y = q·(e^((2z−1)/(2σ²)) − 1); h ≥ 0 for α ≥ 1 by
// convexity. Three regimes, so that neither cancellation nor overflow loses digits.
double
log_h(double q, double sigma, double alpha, double z)
{
  const double s2 = sigma * sigma;
  const double e = (2 * z - 1) / (2 * s2);
  const double y = e > 700 ? inf : q * std::expm1(e);
  if (y != inf && std::abs(alpha * y) < 1e-3) {
    // Generalised binomial series from k = 2: expm1(α log1p y) − αy would cancel here.
    double term = alpha * (alpha - 1) / 2 * y * y;
    double sum = 0;
    for (int k = 2; k < 40 && std::abs(term) > 1e-18 * std::abs(sum); ++k) {
      sum += term;
      term *= (alpha - k) / (k + 1) * y;
    }
    return sum > 0 ? std::log(sum) : -inf;
  }
  // α·log(1 + y); for huge e, log1p(y) = log q + e + log1p(−e^−e) ≈ log q + e.
  const double l = y == inf || y > 1e300 ? alpha * (std::log(q) + e) : alpha * std::log1p(y);
  if (l <= 1) {
    return std::log(std::expm1(l) - alpha * y);
  }
  // (1+y)^α dominates 1 + αy: log h = l + log(1 − (1 + αy)·e^−l). For y < 0, l < 0 so
  // this branch only sees y > 0.
  const double lin = y == inf || y > 1e300 ? std::log(alpha) + std::log(q) + e : std::log1p(alpha * y);
  return l + std::log1p(-std::exp(lin - l));
}

} // namespace

namespace detail {

// Integer orders (Mironov et al. 2019, Section 3.3, eq. for integer α): with μ0 = N(0, σ²),
// μ1 = N(1, σ²), A_α = E_μ0[((1−q) + q·μ1/μ0)^α]
//   = Σ_{k=0}^{α} C(α, k) (1−q)^(α−k) q^k exp((k² − k) / (2σ²)),
// summed in log space (log-sum-exp), so large α and tiny q neither overflow nor underflow.
double
log_a_integer(double q, double sigma, std::uint64_t alpha)
{
  const double a = static_cast<double>(alpha);
  const double log_q = std::log(q);
  const double log_1mq = std::log1p(-q);
  double log_a = -inf;
  for (std::uint64_t k = 0; k <= alpha; ++k) {
    const double kd = static_cast<double>(k);
    const double t = log_binomial(a, kd) + kd * log_q + (a - kd) * log_1mq + (kd * kd - kd) / (2 * sigma * sigma);
    log_a = log_add(log_a, t);
  }
  return log_a;
}

// Any order α > 1 (used for fractional ones): the paper's integral
//   A_α = ∫ μ0(z) ((1−q) + q·exp((2z−1)/(2σ²)))^α dz.
// Written as A_α = 1 + ∫ μ0(z)·h(z) dz with h = (1+y)^α − 1 − αy ≥ 0 (y as in log_h): the
// subtracted αy integrates to exactly 0 under μ0, and h ≥ 0 means the sum has no cancellation,
// so log A_α stays accurate to ~1e-13 relative even when A_α − 1 is 1e-12.
//
// Method: composite 10-point Gauss–Legendre in log space over [−40σ, α + 40σ]. The integrand
// is analytic; h·μ0 is bounded by 2^(α−1)·((1−q)^α N(0, σ²) + q^α e^((α²−α)/(2σ²)) N(α, σ²)),
// so outside that range it carries less than e^−800 of the mass, and its features have widths
// no smaller than σ (the Gaussians) and about σ²/√α (the transition of the mixture ratio), so
// panels of a quarter of the smaller give Gauss–Legendre's spectral accuracy (checked against
// the exact sum at integer orders in the unit tests, and against mpmath in
// tests/tools/rdp_reference.py). This is the exact RDP to rounding, not a bound from a series
// that TF Privacy's fractional-order expansion can be looser than.
double
log_a_integral(double q, double sigma, double alpha)
{
  const double lo = -40 * sigma;
  const double hi = alpha + 40 * sigma;
  double width = std::min(sigma, sigma * sigma / std::sqrt(alpha)) / 4;
  // Cap the work (σ below ~0.01 only; ε is then astronomically large anyway).
  constexpr double max_panels = 400000;
  const double panels = std::min(std::ceil((hi - lo) / width), max_panels);
  width = (hi - lo) / panels;
  const auto n = static_cast<std::uint64_t>(panels);
  const double log_norm = -std::log(sigma) - 0.5 * std::log(2 * M_PI);
  const double half = width / 2;
  const double log_half = std::log(half);

  // Two passes: the largest log term, then Σ exp(term − max), so nothing overflows.
  auto log_term = [&](double z, double w) {
    return std::log(w) + log_half + log_norm - z * z / (2 * sigma * sigma) + log_h(q, sigma, alpha, z);
  };
  double top = -inf;
  for (std::uint64_t p = 0; p < n; ++p) {
    const double mid = lo + (static_cast<double>(p) + 0.5) * width;
    for (std::size_t i = 0; i < gl_nodes.size(); ++i) {
      top = std::max(
        {top, log_term(mid - half * gl_nodes[i], gl_weights[i]), log_term(mid + half * gl_nodes[i], gl_weights[i])});
    }
  }
  if (top == -inf) {
    return 0; // h underflowed everywhere: A_α − 1 is below 1e-300
  }
  double sum = 0;
  for (std::uint64_t p = 0; p < n; ++p) {
    const double mid = lo + (static_cast<double>(p) + 0.5) * width;
    for (std::size_t i = 0; i < gl_nodes.size(); ++i) {
      sum += std::exp(log_term(mid - half * gl_nodes[i], gl_weights[i]) - top);
      sum += std::exp(log_term(mid + half * gl_nodes[i], gl_weights[i]) - top);
    }
  }
  const double log_i = top + std::log(sum); // log(A_α − 1)
  return log_i < 0 ? std::log1p(std::exp(log_i)) : log_i + std::log1p(std::exp(-log_i));
}

} // namespace detail

namespace {

void
check_rate_and_noise(double q, double sigma)
{
  if (!(q > 0 && q <= 1)) {
    throw UsageError("--sample-rate {}: must be in (0, 1] (the batch size over the number of samples)", q);
  }
  if (!(sigma > 0) || !std::isfinite(sigma)) {
    throw UsageError("--noise-multiplier {}: must be > 0 (the noise standard deviation over the clipping norm)", sigma);
  }
}

void
check_delta(double delta)
{
  if (!(delta > 0 && delta < 1)) {
    throw UsageError("--delta {}: must be in (0, 1) (typically below 1 / the number of samples)", delta);
  }
}

void
check_order(double alpha)
{
  if (!(alpha > 1) || !std::isfinite(alpha)) {
    throw UsageError("RDP order {}: must be a finite number > 1", alpha);
  }
}

} // namespace

double
rdp_sampled_gaussian(double q, double sigma, double alpha)
{
  check_rate_and_noise(q, sigma);
  check_order(alpha);
  if (q == 1) {
    return alpha / (2 * sigma * sigma); // the Gaussian mechanism itself
  }
  // Integer orders up to 10^6 by the exact sum; beyond that the sum's α terms cost more than
  // the quadrature.
  const bool integer = std::floor(alpha) == alpha && alpha <= 1e6;
  const double log_a = integer ? detail::log_a_integer(q, sigma, static_cast<std::uint64_t>(alpha))
                               : detail::log_a_integral(q, sigma, alpha);
  return std::max(0.0, log_a) / (alpha - 1);
}

PrivacySpent
epsilon_from_rdp(std::span<const double> orders, std::span<const double> rdp, double delta)
{
  check_delta(delta);
  if (orders.empty() || orders.size() != rdp.size()) {
    throw UsageError("RDP accounting needs one RDP value per order ({} orders, {} values)", orders.size(), rdp.size());
  }
  PrivacySpent best{inf, 0};
  for (std::size_t i = 0; i < orders.size(); ++i) {
    const double a = orders[i];
    check_order(a);
    // Balle et al. 2020, Theorem 21.
    const double eps = rdp[i] - (std::log(delta) + std::log(a)) / (a - 1) + std::log((a - 1) / a);
    if (eps < best.epsilon) {
      best = {eps, a};
    }
  }
  if (best.order == 0) { // every order gave inf or NaN
    best.order = orders.front();
  }
  best.epsilon = std::max(0.0, best.epsilon);
  return best;
}

double
delta_from_rdp(std::span<const double> orders, std::span<const double> rdp, double epsilon)
{
  if (!(epsilon >= 0) || !std::isfinite(epsilon)) {
    throw UsageError("--epsilon {}: must be a finite number >= 0", epsilon);
  }
  if (orders.empty() || orders.size() != rdp.size()) {
    throw UsageError("RDP accounting needs one RDP value per order ({} orders, {} values)", orders.size(), rdp.size());
  }
  // Balle et al. 2020, Theorem 21, solved for δ:
  // log δ = (α − 1)(R − ε + log((α − 1)/α)) − log α.
  double best = 0; // log δ; δ ≤ 1 always
  for (std::size_t i = 0; i < orders.size(); ++i) {
    const double a = orders[i];
    check_order(a);
    const double log_delta = (a - 1) * (rdp[i] - epsilon + std::log((a - 1) / a)) - std::log(a);
    best = std::min(best, log_delta);
  }
  return std::exp(best);
}

std::span<const double>
default_orders()
{
  static const std::vector<double> orders = [] {
    std::vector<double> o;
    for (int tenth = 11; tenth <= 109; ++tenth) {
      o.push_back(tenth / 10.0);
    }
    o.insert(o.end(), {1.25, 1.75, 2.25});
    for (int a = 11; a <= 64; ++a) {
      o.push_back(a);
    }
    o.insert(o.end(), {128, 256, 512, 1024});
    std::sort(o.begin(), o.end());
    return o;
  }();
  return orders;
}

double
compute_delta(double q, double sigma, std::uint64_t steps, double epsilon)
{
  check_rate_and_noise(q, sigma);
  if (steps == 0) {
    throw UsageError("--steps 0: must be at least 1 (the number of noisy gradient steps)");
  }
  const auto orders = default_orders();
  std::vector<double> rdp;
  rdp.reserve(orders.size());
  for (const double a : orders) {
    rdp.push_back(static_cast<double>(steps) * rdp_sampled_gaussian(q, sigma, a));
  }
  return delta_from_rdp(orders, rdp, epsilon);
}

std::span<const double>
legacy_orders()
{
  static const std::vector<double> orders = [] {
    std::vector<double> o = {1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5};
    for (int a = 5; a <= 63; ++a) {
      o.push_back(a);
    }
    o.insert(o.end(), {128, 256, 512});
    return o;
  }();
  return orders;
}

PrivacySpent
compute_epsilon(double q, double sigma, std::uint64_t steps, double delta, std::span<const double> orders)
{
  check_rate_and_noise(q, sigma);
  check_delta(delta);
  if (steps == 0) {
    throw UsageError("--steps 0: must be at least 1 (the number of noisy gradient steps)");
  }
  std::vector<double> rdp;
  rdp.reserve(orders.size());
  for (const double a : orders) {
    rdp.push_back(static_cast<double>(steps) * rdp_sampled_gaussian(q, sigma, a)); // RDP composes by addition
  }
  return epsilon_from_rdp(orders, rdp, delta);
}

namespace {

// One step's RDP at every order of `orders` for (q, σ): the fractional orders take a quadrature
// each, and a ledger's replay asks for the same (q, σ) round after round.
std::shared_ptr<const std::vector<double>>
step_curve(double q, double sigma, std::span<const double> orders)
{
  using Key = std::tuple<double, double, const double*>;
  static BoundedCache<Key, std::shared_ptr<const std::vector<double>>> cache(4096);
  return cache.get({q, sigma, orders.data()}, [&] {
    auto curve = std::make_shared<std::vector<double>>();
    for (const double a : orders) {
      curve->push_back(rdp_sampled_gaussian(q, sigma, a));
    }
    return std::shared_ptr<const std::vector<double>>(std::move(curve));
  });
}

} // namespace

std::string_view
accountant_name(Accountant a)
{
  switch (a) {
  case Accountant::rdp_v1:
    return "rdp-v1";
  case Accountant::rdp_v2:
    return "rdp-v2";
  case Accountant::pld_v1:
    return "pld-v1";
  }
  return "?";
}

std::optional<Accountant>
accountant_from_name(std::string_view name)
{
  for (const auto a : {Accountant::rdp_v1, Accountant::rdp_v2, Accountant::pld_v1}) {
    if (name == accountant_name(a)) {
      return a;
    }
  }
  return std::nullopt;
}

Accountant
accountant_from_flag(std::string_view value, std::string_view flag)
{
  if (value == "pld") {
    return Accountant::pld_v1;
  }
  if (value == "rdp") {
    return Accountant::rdp_v2;
  }
  throw UsageError("{} {}: must be pld (privacy loss distributions, the tightest) or rdp (Renyi DP, what most "
                   "papers quote)",
                   flag, value);
}

std::string_view
accountant_flag(Accountant a)
{
  return a == Accountant::pld_v1 ? "pld" : "rdp";
}

PrivacySpent
account_epsilon(Accountant a, std::span<const GaussianSteps> parts, double delta)
{
  check_delta(delta);
  if (std::all_of(parts.begin(), parts.end(), [](const GaussianSteps& p) { return p.steps == 0; })) {
    return {}; // nothing spent
  }
  if (a == Accountant::pld_v1) {
    // Milliseconds each, and a ledger's replay asks again for the sites whose runs are alike.
    using Key = std::pair<std::vector<std::tuple<double, double, std::uint64_t>>, double>;
    static BoundedCache<Key, double> cache(4096);
    Key key{{}, delta};
    for (const auto& p : parts) {
      key.first.emplace_back(p.q, p.sigma, p.steps);
    }
    const double e = cache.get(key, [&] {
      // Where the PLD accountant cannot discretize (noise so small that one step's loss spans
      // more than 2^24 of its grid cells, or tails it cannot bound within delta), RDP's bound,
      // also sound and as deterministic, so that the audit recomputes the same.
      try {
        return pld_epsilon(parts, delta).epsilon;
      } catch (const UsageError&) {
        throw;
      } catch (const Error&) {
        return account_epsilon(Accountant::rdp_v2, parts, delta).epsilon;
      }
    });
    return {e, 0};
  }
  const auto orders = a == Accountant::rdp_v1 ? legacy_orders() : default_orders();
  std::vector<double> rdp(orders.size(), 0.0);
  for (const auto& part : parts) {
    if (part.steps == 0) {
      continue;
    }
    const auto curve = step_curve(part.q, part.sigma, orders);
    for (std::size_t i = 0; i < rdp.size(); ++i) {
      rdp[i] += static_cast<double>(part.steps) * (*curve)[i]; // RDP composes by addition
    }
  }
  return epsilon_from_rdp(orders, rdp, delta);
}

} // namespace fedl::core
