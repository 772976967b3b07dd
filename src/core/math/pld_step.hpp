// SPDX-License-Identifier: Apache-2.0
// The PLD accountant's room for one step (pld.cpp composes them): the exact privacy loss of one
// Poisson-subsampled Gaussian step in one neighbouring direction, its discretization on a grid
// ("connect the dots" or mean-preserving), and the analytic Gaussian. Internal to core/math.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace fedl::core::pld_detail {

constexpr double inf = std::numeric_limits<double>::infinity();

// P(a < Z ≤ b) for a standard normal Z, without cancellation in either tail.
double normal_mass(double a, double b);

// One step of the Poisson-subsampled Gaussian in one neighbouring direction. With the mixture
// ratio r(x) = (1−q) + q·e^((2x−1)/(2σ²)) (the density of (1−q)N(0,σ²) + qN(1,σ²) over N(0,σ²)):
//   remove: X ~ P = the mixture, Q = N(0,σ²), L(x) =  log r(x), increasing in x;
//   add:    X ~ P = N(0,σ²),     Q = the mixture, L(x) = −log r(x), decreasing in x.
struct Step
{
  double q;
  double sigma;
  bool remove;

  double loss(double x) const
  {
    const double e = (2 * x - 1) / (2 * sigma * sigma);
    // log((1−q) + q·e^e) in log space: e can be in the hundreds.
    const double a = std::log1p(-q); // −inf at q = 1
    const double b = std::log(q) + e;
    const double hi = std::max(a, b);
    const double l = hi + std::log1p(std::exp(std::min(a, b) - hi));
    return remove ? l : -l;
  }

  // The x where L(x) = l: −inf below L's range and +inf above it (or the reverse for add, so
  // that the cell masses below come out 0 there).
  double x_of(double l) const
  {
    const double lr = remove ? l : -l; // log r
    // log(r − (1−q)) = log(e^lr − 1 + q)
    double log_t = 0;
    if (lr > 1) {
      log_t = lr + std::log1p(-(1 - q) * std::exp(-lr));
    } else {
      const double t = std::expm1(lr) + q;
      if (!(t > 0)) {
        return -inf;
      }
      log_t = std::log(t);
    }
    return sigma * sigma * (log_t - std::log(q)) + 0.5;
  }

  // P- and Q-mass of the x-interval (lo, hi].
  void interval_mass(double lo, double hi, double& p, double& qm) const
  {
    const double plain = normal_mass(lo / sigma, hi / sigma);
    const double mixture = (1 - q) * plain + q * normal_mass((lo - 1) / sigma, (hi - 1) / sigma);
    p = remove ? mixture : plain;
    qm = remove ? plain : mixture;
  }

  // P- and Q-mass of L in (l0, l1].
  void cell_mass(double l0, double l1, double& p, double& qm) const
  {
    const double x0 = x_of(l0);
    const double x1 = x_of(l1);
    if (remove) {
      interval_mass(x0, x1, p, qm);
    } else {
      interval_mass(x1, x0, p, qm);
    }
  }

  // P(L > l) and P(L ≤ l).
  double p_above(double l) const
  {
    double p = 0;
    double qm = 0;
    const double x = x_of(l);
    if (remove) {
      interval_mass(x, inf, p, qm);
    } else {
      interval_mass(-inf, x, p, qm);
    }
    return p;
  }
  double p_below(double l) const
  {
    double p = 0;
    double qm = 0;
    const double x = x_of(l);
    if (remove) {
      interval_mass(-inf, x, p, qm);
    } else {
      interval_mass(x, inf, p, qm);
    }
    return p;
  }

  // Where its loss is cut, below and above, leaving out at most `tail` of its P-mass at each end:
  // the ends of its range where they are finite.
  std::pair<double, double> cuts(double tail) const;

  // The smallest and largest loss it can have (±inf where unbounded).
  double loss_min() const { return remove ? (q < 1 ? std::log1p(-q) : -inf) : -inf; }
  double loss_max() const { return remove ? inf : (q < 1 ? -std::log1p(-q) : inf); }
};

enum class Mode
{
  upper, // connect the dots: dominates
  lower  // mean-preserving: the Hoeffding coupling
};

// One step's PMF on the grid k·h, k from `first`; `infinite` is the P-mass of loss +∞.
struct Pmf
{
  std::int64_t first = 0;
  std::vector<double> mass;
  double infinite = 0;
};

// One step's PMF on the grid: the cells (l_k, l_{k+1}] between s.cuts(tail), each cell's mass
// split between its two ends as `mode` says; the tails beyond the cuts count as infinite loss and
// move up to the first point (upper) or are dropped (lower).
Pmf discretize(const Step& s, double h, double tail, Mode mode);

// UsageError naming --delta unless delta is in (0, 1).
void check_delta(double delta);

} // namespace fedl::core::pld_detail
