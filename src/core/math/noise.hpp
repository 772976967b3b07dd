// SPDX-License-Identifier: Apache-2.0
// Gaussian noise for differential privacy, from a cryptographic key stream: AES-256-CTR keyed
// from getrandom(2) (or, for tests, from SHA-256 of a fixed seed), turned into normals by the
// Box-Muller transform (Box and Muller 1958) in double precision: 128 bits of key stream for
// the radius, 64 for the angle. Nobody who sees some of the noise, or who chose the training
// seed, can predict the rest.
//
// Against the attack on floating-point noise (Mironov 2012, "On Significance of the Least
// Significant Bits for Differential Privacy", CCS: the set of floating-point values x + noise can
// take depends on x, so the low-order bits of a released value can reveal x), a noisy value is
// released snapped to a grid, as Mironov's snapping mechanism does for Laplace noise: x + noise is
// computed in double and rounded to the nearest multiple of Λ = noise_grid(stddev), the largest
// power of two ≤ stddev / 16, before anything else (a division by a batch size, a cast to float)
// touches it. Rounding after the noise is post-processing of the Gaussian mechanism, so the
// accounting is unchanged (no sensitivity is added, unlike rounding the input), and it costs
// Λ²/12 ≤ stddev²/3072 of extra variance (0.03%). What the floating-point arithmetic still leaves
// is far below the grid: the sample's own granularity (53 bits of its value) and the rounding of
// the double sum (2^-53 of |x| + |noise|, with |x| bounded by the clipped contributions) move the
// probability of a grid cell by ~2^-40 of itself, against the attack's use of every last bit.
// The exact alternative, a discrete Gaussian sampled by rejection (DiscreteGaussianNoise below),
// costs ~10 times as much per value: secure aggregation's distributed DP uses it on integers.
#pragma once

#include "core/util/key_stream.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace fedl::core {

class GaussianNoise
{
public:
  // seed 0: a fresh key from the operating system; otherwise a fixed key derived from `seed`.
  explicit GaussianNoise(std::uint64_t seed = 0);

  // Fills `out` with independent draws of N(0, stddev²).
  void fill(std::span<double> out, double stddev);
  // values[i] ← round((values[i] + N(0, stddev²)) / Λ)·Λ with Λ = noise_grid(stddev): the noisy
  // values, snapped (see above).
  void add_snapped(std::span<double> values, double stddev);
  // The raw key stream (uniform bytes), for a caller that vectorizes Box-Muller itself, as the
  // torch backend does: per normal pair, 128 bits for the radius and 64 for the angle.
  void key_stream(std::span<std::byte> out) { m_stream.fill(out); }

private:
  KeyStream m_stream;
  std::vector<double> m_draws;
};

// The grid a noisy value of noise standard deviation `stddev` (> 0) is snapped to: the largest
// power of two ≤ stddev / 16.
double noise_grid(double stddev);

// `v` rounded to the nearest multiple of `grid` (a power of two), ties to even. By adding and
// taking off 1.5·2^52 (in double, the default rounding mode), which compilers vectorize where
// std::nearbyint is a call; exact for |v / grid| < 2^51, and beyond, where no noisy value of
// fedl's comes near, still a multiple of the grid.
inline double
snap_to_grid(double v, double grid)
{
  constexpr double magic = 0x1.8p52;
  const double cells = v / grid; // exact: grid is a power of two
  return ((cells + magic) - magic) * grid;
}

// Box-Muller's inputs from 32-bit words of key stream: u in (0, 1] from four (128 bits, so that
// u keeps 53 significant bits down to 2^-75, and the radius √(−2 ln u) its precision out to 9.6
// standard deviations), the angle in [0, 2π) from two. In doubles from 32-bit halves, which
// compilers vectorize (a 64-bit unsigned conversion they do not). Shared with the torch backend.
inline double
word_to_double(std::uint32_t w)
{
  // Through int32, whose conversion baseline x86-64 vectorizes (unsigned needs AVX-512): exact.
  return static_cast<double>(static_cast<std::int32_t>(w ^ 0x80000000U)) + 0x1p31;
}
inline double
box_muller_u(std::uint32_t w0, std::uint32_t w1, std::uint32_t w2, std::uint32_t w3)
{
  const double hi = word_to_double(w0) * 0x1p32 + word_to_double(w1);
  const double lo = word_to_double(w2) * 0x1p32 + word_to_double(w3);
  // hi rounds up to 2^64 for its last 2^10 values: keep u ≤ 1.
  return std::min(1.0, (hi + (lo + 0.5) * 0x1p-64) * 0x1p-64);
}
inline double
box_muller_angle(std::uint32_t w4, std::uint32_t w5)
{
  return (word_to_double(w4) * 0x1p32 + word_to_double(w5)) * (2.0 * 3.14159265358979323846 * 0x1p-64);
}

// The discrete Gaussian N_Z(0, σ²) (P(x) ∝ exp(−x²/(2σ²)) over the integers), sampled as Canonne,
// Kamath and Steinke give it ("The Discrete Gaussian for Differential Privacy", NeurIPS 2020,
// Algorithms 1-3): discrete Laplace proposals of scale ⌊σ⌋ + 1, accepted with probability
// exp(−(|y| − σ²/t)²/(2σ²)). Its outputs are integers, so no low-order floating-point bits of a
// sample reveal the value it is added to (Mironov 2012); the Bernoulli trials compare a uniform
// double with exp(−γ), which shifts the distribution by at most a few ulps of each probability
// (the paper's exact rational arithmetic is not used). Randomness from AES-256-CTR as above.
class DiscreteGaussianNoise
{
public:
  explicit DiscreteGaussianNoise(std::uint64_t seed = 0);

  // One draw of N_Z(0, sigma²); sigma positive and finite, at most 2^40.
  std::int64_t sample(double sigma);
  // Adds an independent draw to each word (modulo 2^32).
  void add_to(std::span<std::uint32_t> words, double sigma);

private:
  std::uint64_t next();
  double uniform(); // in [0, 1)
  bool bernoulli_exp(double gamma) { return uniform() < std::exp(-gamma); }
  std::uint64_t below(std::uint64_t n); // uniform in [0, n)
  std::int64_t discrete_laplace(std::uint64_t t);

  KeyStream m_stream;
  std::array<std::uint64_t, 512> m_buffer{};
  std::size_t m_used = 512;
};

} // namespace fedl::core
