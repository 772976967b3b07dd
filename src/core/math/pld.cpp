// SPDX-License-Identifier: Apache-2.0
// PLD accountant; see pld.hpp for the method and the papers.
#include "core/math/pld.hpp"

#include "core/math/pld_step.hpp"

#include "core/util/bounded_cache.hpp"
#include "core/util/error.hpp"

#include <kissfft.hh>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <complex>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

namespace fedl::core {

namespace {

using namespace pld_detail;
// log Σ mass·e^(λ·l): the discrete PMF's log moment generating function (−inf if it is empty),
// from `log_mass` (log of each mass, −inf for none).
double
log_mgf(const Pmf& pmf, const std::vector<double>& log_mass, double h, double lambda)
{
  const auto loss = [&](std::size_t i) { return static_cast<double>(pmf.first + static_cast<std::int64_t>(i)) * h; };
  double top = -inf;
  for (std::size_t i = 0; i < log_mass.size(); ++i) {
    top = std::max(top, log_mass[i] + lambda * loss(i));
  }
  if (top == -inf) {
    return -inf;
  }
  double sum = 0;
  for (std::size_t i = 0; i < log_mass.size(); ++i) {
    // Terms below e^−745 of the largest underflow to 0 and change nothing.
    if (const double t = log_mass[i] + lambda * loss(i) - top; t > -745) {
      sum += std::exp(t);
    }
  }
  return top + std::log(sum);
}

constexpr std::array<double, 10> chernoff_lambdas = {1.0 / 64, 1.0 / 16, 0.25, 0.5, 1, 2, 4, 8, 16, 64};

constexpr std::size_t fft_points = std::size_t{1} << 15;
constexpr double tail_share = 1e-3; // of δ, for the wrap-around bounds and the coupling

// PMFs are real, so their DFTs are Hermitian (X[N − k] = conj X[k]): bins 0 .. N/2 hold all of
// one, and each transform is a complex FFT of half the length. The two FFTs of length N/2 are
// made once (their twiddle factors are complex exponentials) and shared by threads: transform()
// is const, and its one mutable member, a scratch buffer, serves only radices above 5, which a
// power of two never has.
constexpr std::size_t half_points = fft_points / 2;
static_assert(std::has_single_bit(half_points), "KISS FFT's radix-2 and -4 butterflies only: no shared scratch");

const kissfft<double>&
half_fft(bool inverse)
{
  static const kissfft<double> forward(half_points, false);
  static const kissfft<double> backward(half_points, true);
  return inverse ? backward : forward;
}

// Bins 0 .. N/2 of the DFT of the N reals `x`.
std::vector<std::complex<double>>
real_dft(const std::vector<double>& x)
{
  std::vector<std::complex<double>> packed(half_points);
  half_fft(false).transform_real(x.data(), packed.data()); // bin 0 packs (X[0], X[N/2])
  std::vector<std::complex<double>> out(half_points + 1);
  std::copy(packed.begin() + 1, packed.end(), out.begin() + 1);
  out[0] = packed[0].real();
  out[half_points] = packed[0].imag();
  return out;
}

// The N reals whose DFT has bins 0 .. N/2 `bins`, times N: with M = N/2 and W = e^(−2πi/N), the
// even and odd samples' M-point DFTs are E[k] = (X[k] + conj X[M − k]) / 2 and
// O[k] = (X[k] − conj X[M − k]) / (2·W^k); one inverse FFT of length M of E + i·O gives the even
// samples in its real parts and the odd in its imaginary parts.
std::vector<double>
real_inverse_dft(const std::vector<std::complex<double>>& bins)
{
  const double pi = std::acos(-1.0);
  std::vector<std::complex<double>> z(half_points);
  for (std::size_t k = 0; k < half_points; ++k) {
    const auto a = bins[k];
    const auto b = std::conj(bins[half_points - k]);
    const auto w = std::polar(1.0, 2 * pi * static_cast<double>(k) / static_cast<double>(fft_points));
    z[k] = (a + b) + std::complex<double>(0, 1) * w * (a - b); // 2·(E + i·O)
  }
  std::vector<std::complex<double>> v(half_points);
  half_fft(true).transform(z.data(), v.data());
  std::vector<double> out(fft_points);
  for (std::size_t m = 0; m < half_points; ++m) {
    out[2 * m] = v[m].real();
    out[2 * m + 1] = v[m].imag();
  }
  return out;
}

// What composition needs of one step's discrete PMF: the log of its DFT (length fft_points), its
// moment generating function at the Chernoff λs, and its infinite mass. Kept per (q, σ,
// direction, mode, h): a ledger's accounts ask for the same mechanisms round after round.
struct StepSpectrum
{
  std::vector<std::complex<double>> log_dft; // bins 0 .. N/2
  std::array<double, chernoff_lambdas.size()> up{};
  std::array<double, chernoff_lambdas.size()> down{};
  double log_finite = 0; // log(1 − infinite mass)
};

std::shared_ptr<const StepSpectrum>
step_spectrum(const Step& s, double h, double tail, Mode mode, bool with_dft)
{
  using Key = std::tuple<double, double, bool, bool, double, double, bool>;
  static BoundedCache<Key, std::shared_ptr<const StepSpectrum>> cache(32); // ~0.25 MiB each
  return cache.get({s.q, s.sigma, s.remove, mode == Mode::upper, h, tail, with_dft}, [&] {
    const auto pmf = discretize(s, h, tail, mode);
    auto out = std::make_shared<StepSpectrum>();
    std::vector<double> log_mass(pmf.mass.size());
    std::transform(pmf.mass.begin(), pmf.mass.end(), log_mass.begin(),
                   [](double m) { return m > 0 ? std::log(m) : -inf; });
    for (std::size_t i = 0; i < chernoff_lambdas.size(); ++i) {
      out->up[i] = log_mgf(pmf, log_mass, h, chernoff_lambdas[i]);
      out->down[i] = log_mgf(pmf, log_mass, h, -chernoff_lambdas[i]);
    }
    out->log_finite = std::log1p(-pmf.infinite);
    if (with_dft) {
      const auto n = static_cast<std::int64_t>(fft_points);
      std::vector<double> buffer(fft_points);
      for (std::size_t i = 0; i < pmf.mass.size(); ++i) {
        const auto k = pmf.first + static_cast<std::int64_t>(i);
        buffer[static_cast<std::size_t>(((k % n) + n) % n)] += pmf.mass[i];
      }
      out->log_dft = real_dft(buffer);
      for (auto& z : out->log_dft) {
        z = std::abs(z) > 0 ? std::log(z) : std::complex<double>(-inf, 0);
      }
    }
    return std::shared_ptr<const StepSpectrum>(std::move(out));
  });
}

// The composition's Chernoff bounds: log P(L ≥ t) ≤ K(λ) − λt for λ > 0, log P(L ≤ t) ≤ K(−λ) + λt,
// K being the sum over the parts of steps × each step's log MGF.
struct Mgfs
{
  std::array<double, chernoff_lambdas.size()> up{};
  std::array<double, chernoff_lambdas.size()> down{};

  void add(const StepSpectrum& s, double steps)
  {
    for (std::size_t i = 0; i < up.size(); ++i) {
      up[i] += steps * s.up[i];
      down[i] += steps * s.down[i];
    }
  }
  double log_above(double t) const
  {
    double best = 0;
    for (std::size_t i = 0; i < up.size(); ++i) {
      best = std::min(best, up[i] - chernoff_lambdas[i] * t);
    }
    return best;
  }
  double log_below(double t) const
  {
    double best = 0;
    for (std::size_t i = 0; i < down.size(); ++i) {
      best = std::min(best, down[i] + chernoff_lambdas[i] * t);
    }
    return best;
  }
  // The smallest t with P(L ≥ t) ≤ e^log_tail, and the largest with P(L ≤ t) ≤ e^log_tail.
  double top(double log_tail) const
  {
    double t = inf;
    for (std::size_t i = 0; i < up.size(); ++i) {
      t = std::min(t, (up[i] - log_tail) / chernoff_lambdas[i]);
    }
    return t;
  }
  double bottom(double log_tail) const
  {
    double t = -inf;
    for (std::size_t i = 0; i < down.size(); ++i) {
      t = std::max(t, (log_tail - down[i]) / chernoff_lambdas[i]);
    }
    return t;
  }
};

// The composed PMF on grid points first .. first + N − 1, the mass of loss +∞, and bounds on the
// mass outside the window (which wrapped around into it).
struct Composed
{
  std::int64_t first = 0;
  std::vector<double> mass;
  double infinite = 0;
  double wrapped_from_above = 0; // ≥ P(L ≥ first + N): lost from the top
  double wrapped_from_below = 0; // ≥ P(L < first): added at the top
};

Composed
compose(std::span<const Step> steps, std::span<const GaussianSteps> parts, double h, double tail, Mode mode,
        double log_tail)
{
  const auto n = static_cast<std::int64_t>(fft_points);
  std::vector<std::complex<double>> log_product(half_points + 1);
  Mgfs mgfs;
  double log_finite = 0;
  for (std::size_t p = 0; p < parts.size(); ++p) {
    if (parts[p].steps == 0) {
      continue;
    }
    const auto s = step_spectrum(steps[p], h, tail, mode, true);
    const auto t = static_cast<double>(parts[p].steps);
    for (std::size_t j = 0; j <= half_points; ++j) {
      log_product[j] += t * s->log_dft[j];
    }
    mgfs.add(*s, t);
    log_finite += t * s->log_finite;
  }
  Composed c;
  // The window: N points centred between the Chernoff bounds' ends.
  const double centre = (mgfs.top(log_tail) + mgfs.bottom(log_tail)) / 2;
  c.first = static_cast<std::int64_t>(std::floor(centre / h)) - n / 2;
  c.wrapped_from_above = std::exp(mgfs.log_above(static_cast<double>(c.first + n) * h));
  c.wrapped_from_below = std::exp(mgfs.log_below((static_cast<double>(c.first) - 0.5) * h));
  c.infinite = -std::expm1(log_finite);

  std::vector<std::complex<double>> product(half_points + 1);
  for (std::size_t j = 0; j <= half_points; ++j) {
    product[j] = std::exp(log_product[j]);
  }
  const auto values = real_inverse_dft(product);
  // The composed loss K·h sits at index K mod N; read it back as K in [first, first + N).
  c.mass.assign(fft_points, 0.0);
  const auto shift = ((c.first % n) + n) % n;
  for (std::size_t i = 0; i < fft_points; ++i) {
    const auto j = static_cast<std::size_t>((shift + static_cast<std::int64_t>(i)) % n);
    c.mass[i] = std::max(0.0, values[j] / static_cast<double>(n));
  }
  return c;
}

double
discrete_epsilon(const Composed& c, double h, double extra, double delta)
{
  const double target = delta - extra;
  if (!(target > 0)) {
    return inf;
  }
  double above = 0;     // Σ m over the grid points above the current one
  double above_exp = 0; // Σ m·e^−l over them
  for (std::size_t i = c.mass.size(); i-- > 0;) {
    const double l = static_cast<double>(c.first + static_cast<std::int64_t>(i)) * h;
    // δ at ε = l counts only the points above l.
    if (above - std::exp(l) * above_exp >= target) {
      // The crossing lies in [l, next point): solve above − e^ε·above_exp = target.
      return std::max(0.0, std::log((above - target) / above_exp));
    }
    above += c.mass[i];
    above_exp += c.mass[i] * std::exp(-l);
  }
  return above_exp > 0 && above > target ? std::max(0.0, std::log((above - target) / above_exp)) : 0.0;
}

void
check_part(const GaussianSteps& part)
{
  if (!(part.q > 0 && part.q <= 1)) {
    throw UsageError("--sample-rate {}: must be in (0, 1] (the batch size over the number of samples)", part.q);
  }
  if (!(part.sigma > 0) || !std::isfinite(part.sigma)) {
    throw UsageError("--noise-multiplier {}: must be > 0 (the noise standard deviation over the clipping norm)",
                     part.sigma);
  }
}

} // namespace

namespace {

// What a composition needs before it can be evaluated: its checks, the analytic case, the grid.
struct Plan
{
  double total_steps = 0;
  double mu2 = 0;       // Σ steps / σ², for the analytic Gaussian
  bool all_full = true; // every step at q = 1: analytic
  double budget = 0;    // the δ the tails, the wrap-around and the coupling may use together
  double log_tail = 0;  // log of the mass each end of the window may leave out
  double tail = 0;      // each step's mass cut at either end
  double h = 0;         // the grid

  // The coupling's shift: the composed discrete loss is within η of the true one except with
  // probability budget / 2 (Hoeffding, T steps of at most h each).
  double eta() const { return h * std::sqrt(total_steps * std::log(2 / budget) / 2); }
};

Plan
plan(std::span<const GaussianSteps> parts, double budget)
{
  if (parts.empty()) {
    throw UsageError("the PLD accountant needs at least one mechanism");
  }
  Plan p;
  for (const auto& part : parts) {
    check_part(part);
    p.total_steps += static_cast<double>(part.steps);
    p.mu2 += static_cast<double>(part.steps) / (part.sigma * part.sigma);
    p.all_full = p.all_full && (part.q == 1 || part.steps == 0);
  }
  if (p.total_steps == 0 || p.all_full) {
    return p;
  }
  p.budget = budget;
  p.log_tail = std::log(budget / 2);
  // Each step's tails beyond the mass `tail` are cut (counted as infinite loss, or moved up): a
  // power of ten, so that a ledger's rounds share it, with all steps' together ≤ budget / 4.
  p.tail = std::pow(10.0, std::floor(std::log10(budget / 4 / p.total_steps)));
  // A coarse grid for one step: 1/64, or coarser where the step's loss spans more than 4096 of
  // those (small noise: its loss reaches thousands), so that no step costs more than ~2^16 cells.
  const auto coarse_grid = [tail = p.tail](const Step& s) {
    const auto [lo, hi] = s.cuts(tail);
    return std::exp2(std::max(-6.0, std::ceil(std::log2((hi - lo) / 65536))));
  };
  // The grid: the composed loss's width from the Chernoff bounds of a coarse discretization, then
  // the power of two h that spreads the FFT's points over 1.25 times that width (a power of two,
  // so that a ledger's rounds reuse the same steps' spectra).
  double width = 0;
  for (const bool remove : {true, false}) {
    Mgfs mgfs;
    for (const auto& part : parts) {
      const Step step{part.q, part.sigma, remove};
      mgfs.add(*step_spectrum(step, coarse_grid(step), p.tail, Mode::upper, false), static_cast<double>(part.steps));
    }
    width = std::max(width, mgfs.top(p.log_tail) - mgfs.bottom(p.log_tail));
  }
  p.h = std::exp2(std::ceil(std::log2(std::max(width * 1.25 / static_cast<double>(fft_points), 0x1p-30))));
  return p;
}

// Composes `parts` in each neighbouring direction (remove, then add) and hands `use` the upper
// composition and, with `with_lower`, the lower one (else null).
template<typename Use>
void
each_direction(std::span<const GaussianSteps> parts, const Plan& p, bool with_lower, Use&& use)
{
  for (const bool remove : {true, false}) {
    std::vector<Step> steps;
    for (const auto& part : parts) {
      steps.push_back({part.q, part.sigma, remove});
    }
    const auto upper = compose(steps, parts, p.h, p.tail, Mode::upper, p.log_tail);
    if (with_lower) {
      const auto lower = compose(steps, parts, p.h, p.tail, Mode::lower, p.log_tail);
      use(upper, &lower);
    } else {
      use(upper, nullptr);
    }
  }
}

// δ at ε of a discrete composed PMF: Σ_{l > ε} m_l (1 − e^(ε − l)).
double
discrete_delta(const Composed& c, double h, double epsilon)
{
  double delta = 0;
  for (std::size_t i = 0; i < c.mass.size(); ++i) {
    const double l = static_cast<double>(c.first + static_cast<std::int64_t>(i)) * h;
    if (l > epsilon) {
      delta += c.mass[i] * -std::expm1(epsilon - l);
    }
  }
  return delta;
}

} // namespace

PldEpsilon
pld_epsilon(std::span<const GaussianSteps> parts, double delta, bool with_lower)
{
  check_delta(delta);
  const auto p = plan(parts, tail_share * delta);
  if (p.total_steps == 0) {
    return {};
  }
  if (p.all_full) {
    const double eps = analytic_gaussian_epsilon(std::sqrt(p.mu2), delta);
    return {eps, eps, 0};
  }
  PldEpsilon out{0, 0, p.h};
  each_direction(parts, p, with_lower, [&](const Composed& upper, const Composed* lower) {
    out.epsilon = std::max(out.epsilon, discrete_epsilon(upper, p.h, upper.infinite + upper.wrapped_from_above, delta));
    if (lower) {
      // ε_true(δ) ≥ ε_discrete(δ + δ' + wrapped) − η, with δ' = budget / 2 the coupling's failure.
      const double e = discrete_epsilon(*lower, p.h, -(p.budget / 2 + lower->wrapped_from_below), delta);
      out.epsilon_lower = std::max(out.epsilon_lower, e - p.eta());
    }
  });
  if (!std::isfinite(out.epsilon)) {
    throw Error("the PLD accountant's truncated tails exceed delta {}: use a larger --delta or the RDP accountant",
                delta);
  }
  out.epsilon_lower = with_lower ? std::clamp(out.epsilon_lower, 0.0, out.epsilon) : 0.0;
  return out;
}

PldDelta
pld_delta(std::span<const GaussianSteps> parts, double epsilon, bool with_lower)
{
  if (!(epsilon >= 0) || !std::isfinite(epsilon)) {
    throw UsageError("--epsilon {}: must be a finite number >= 0", epsilon);
  }
  // The tails and the wrap-around may add this much to δ: below any δ worth asking about.
  constexpr double budget = 1e-12;
  const auto p = plan(parts, budget);
  if (p.total_steps == 0) {
    return {};
  }
  if (p.all_full) {
    const double d = analytic_gaussian_delta(std::sqrt(p.mu2), epsilon);
    return {d, d, 0};
  }
  PldDelta out{0, 0, p.h};
  each_direction(parts, p, with_lower, [&](const Composed& upper, const Composed* lower) {
    out.delta = std::max(out.delta, discrete_delta(upper, p.h, epsilon) + upper.infinite + upper.wrapped_from_above);
    if (lower) {
      // δ_true(ε) ≥ δ_discrete(ε + η) − δ' − wrapped (the coupling, as in pld_epsilon).
      out.delta_lower = std::max(out.delta_lower, discrete_delta(*lower, p.h, epsilon + p.eta()) - p.budget / 2 -
                                                    lower->wrapped_from_below);
    }
  });
  out.delta = std::min(out.delta, 1.0);
  out.delta_lower = with_lower ? std::clamp(out.delta_lower, 0.0, out.delta) : 0.0;
  return out;
}

} // namespace fedl::core
