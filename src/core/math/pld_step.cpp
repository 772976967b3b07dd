// SPDX-License-Identifier: Apache-2.0
// One step of the PLD accountant; see pld_step.hpp and pld.hpp.
#include "core/math/pld_step.hpp"

#include "core/math/pld.hpp"
#include "core/util/error.hpp"

#include <algorithm>
#include <array>

namespace fedl::core {

namespace pld_detail {

namespace {

constexpr double inv_sqrt2 = 0.70710678118654752440;

double
normal_cdf(double z)
{
  return 0.5 * std::erfc(-z * inv_sqrt2);
}

double
normal_sf(double z)
{
  return 0.5 * std::erfc(z * inv_sqrt2);
}

// log Φ(z), also where Φ(z) underflows (the asymptotic series of Mills' ratio below z = −30).
double
log_normal_cdf(double z)
{
  if (z > -30) {
    return std::log(normal_cdf(z));
  }
  const double z2 = z * z;
  return -z2 / 2 - std::log(-z) - 0.5 * std::log(2 * M_PI) + std::log1p(-1 / z2 + 3 / (z2 * z2) - 15 / (z2 * z2 * z2));
}

// The loss l where `above(l)` (decreasing in l) crosses `target`, by bisection between losses
// at x = −1−60σ and 2+60σ (beyond which a Gaussian has no mass a double can hold).
template<typename F>
double
loss_where(const Step& s, F&& mass, double target, bool upper)
{
  double a = std::max(s.loss_min(), std::min(s.loss(-1 - 60 * s.sigma), s.loss(2 + 60 * s.sigma)));
  double b = std::min(s.loss_max(), std::max(s.loss(-1 - 60 * s.sigma), s.loss(2 + 60 * s.sigma)));
  // upper: the smallest l with P(L > l) ≤ target; else the largest with P(L ≤ l) ≤ target.
  for (int i = 0; i < 200 && b - a > 1e-12 * (1 + std::abs(a)); ++i) {
    const double m = (a + b) / 2;
    const bool within = mass(m) <= target;
    ((within == upper) ? b : a) = m;
  }
  return upper ? b : a;
}

} // namespace

double
normal_mass(double a, double b)
{
  if (!(b > a)) {
    return 0;
  }
  if (a >= 0) {
    return normal_sf(a) - normal_sf(b);
  }
  if (b <= 0) {
    return normal_cdf(b) - normal_cdf(a);
  }
  return 1 - normal_cdf(a) - normal_sf(b);
}

std::pair<double, double>
Step::cuts(double tail) const
{
  const double lo = std::isfinite(loss_min()) ? loss_min()
                                              : loss_where(
                                                  *this, [&](double l) { return p_below(l); }, tail, false);
  const double hi = std::isfinite(loss_max()) ? loss_max()
                                              : loss_where(
                                                  *this, [&](double l) { return p_above(l); }, tail, true);
  return {lo, hi};
}

namespace {

// 4-point Gauss–Legendre on [−1, 1].
constexpr std::array<double, 2> gl4_nodes = {0.3399810435848562648, 0.8611363115940525752};
constexpr std::array<double, 2> gl4_weights = {0.6521451548625461426, 0.3478548451374538574};

} // namespace

Pmf
discretize(const Step& s, double h, double tail, Mode mode)
{
  // The grid cells (l_k, l_{k+1}] from `lo` to `hi` hold all but `tail` of the mass at each end.
  const double l_min = s.loss_min();
  const double l_max = s.loss_max();
  const auto [cut_lo, cut_hi] = s.cuts(tail);
  const auto lo = static_cast<std::int64_t>(std::floor(cut_lo / h));
  const auto hi = std::max(lo + 1, static_cast<std::int64_t>(std::ceil(cut_hi / h)));
  if (hi - lo > (std::int64_t{1} << 24)) {
    throw Error("the PLD accountant would need {} grid points for one step (q {}, sigma {}): too many", hi - lo, s.q,
                s.sigma);
  }
  Pmf pmf;
  pmf.first = lo;
  pmf.mass.assign(static_cast<std::size_t>(hi - lo + 1), 0.0);
  const auto grid = [&](std::int64_t k) { return static_cast<double>(k) * h; };
  for (std::int64_t k = lo; k < hi; ++k) {
    const double l0 = grid(k);
    const double l1 = grid(k + 1);
    double p = 0;
    double qm = 0;
    s.cell_mass(l0, l1, p, qm);
    if (!(p > 0)) {
      continue;
    }
    double up = 0; // the part that goes to l1
    if (mode == Mode::upper) {
      // Preserve P- and Q-mass: a + b = p, a·e^−l0 + b·e^−l1 = qm.
      const double e0 = std::exp(-l0);
      const double e1 = std::exp(-l1);
      up = (p * e0 - qm) / (e0 - e1);
      if (!std::isfinite(up) || std::abs(l0) > 700) {
        up = p; // e^−l under- or overflows: all to the top end (rounding up bounds δ too)
      }
    } else {
      // Preserve the mean: b·h = ∫_cell (L − l0) dP = ∫_{l0}^{l1} P(t < L ≤ l1) dt.
      double g = 0;
      for (std::size_t i = 0; i < gl4_nodes.size(); ++i) {
        for (const double sign : {-1.0, 1.0}) {
          const double t = l0 + h / 2 * (1 + sign * gl4_nodes[i]);
          double pt = 0;
          double qt = 0;
          s.cell_mass(t, l1, pt, qt);
          g += gl4_weights[i] * pt;
        }
      }
      up = g / 2; // (h/2)·Σ wᵢ f(tᵢ), over h
    }
    up = std::clamp(up, 0.0, p);
    pmf.mass[static_cast<std::size_t>(k - lo)] += p - up;
    pmf.mass[static_cast<std::size_t>(k - lo + 1)] += up;
  }
  // The tails beyond the cuts: upper mode counts the top as infinite loss and moves the bottom up
  // to the first grid point (both only raise δ); lower mode drops them (both only lower δ).
  const double below = std::isfinite(l_min) ? 0.0 : s.p_below(grid(lo));
  const double above = std::isfinite(l_max) ? 0.0 : s.p_above(grid(hi));
  if (mode == Mode::upper) {
    pmf.mass.front() += below;
    pmf.infinite = above;
  }
  return pmf;
}

void
check_delta(double delta)
{
  if (!(delta > 0 && delta < 1)) {
    throw UsageError("--delta {}: must be in (0, 1) (typically below 1 / the number of samples)", delta);
  }
}

} // namespace pld_detail

using pld_detail::check_delta;
using pld_detail::inf;
using pld_detail::log_normal_cdf;
using pld_detail::normal_cdf;

double
analytic_gaussian_delta(double mu, double epsilon)
{
  // δ(ε) = Φ(μ/2 − ε/μ) − e^ε·Φ(−μ/2 − ε/μ)
  const double a = normal_cdf(mu / 2 - epsilon / mu);
  const double b = std::exp(epsilon + log_normal_cdf(-mu / 2 - epsilon / mu));
  return std::max(0.0, a - b);
}

double
analytic_gaussian_epsilon(double mu, double delta)
{
  check_delta(delta);
  if (!(mu > 0) || !std::isfinite(mu)) {
    throw UsageError("the analytic Gaussian needs a sensitivity over noise in (0, inf), not {}", mu);
  }
  if (analytic_gaussian_delta(mu, 0) <= delta) {
    return 0;
  }
  double lo = 0;
  double hi = 1;
  while (analytic_gaussian_delta(mu, hi) > delta) {
    lo = hi;
    hi *= 2;
  }
  for (int i = 0; i < 200 && hi - lo > 1e-13 * hi; ++i) {
    const double m = (lo + hi) / 2;
    (analytic_gaussian_delta(mu, m) > delta ? lo : hi) = m;
  }
  return hi;
}

} // namespace fedl::core
