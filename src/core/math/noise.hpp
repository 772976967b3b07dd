// SPDX-License-Identifier: Apache-2.0
// Gaussian noise for differential privacy, from a cryptographic key stream: AES-256-CTR keyed
// from getrandom(2) (or, for tests, from SHA-256 of a fixed seed), turned into normals by the
// ziggurat method (Marsaglia and Tsang, "The Ziggurat Method for Generating Random Variables",
// Journal of Statistical Software 5(8), 2000) with 256 layers, one 64-bit word of key stream per
// candidate: 8 bits choose the layer, 1 the sign and 53 the position in the layer (disjoint bits,
// as Doornik 2005 showed the original's shared ones must be). About 98.5% of candidates are
// accepted by one comparison; the rest take the exact wedge test or Marsaglia's exact tail
// (1964), from fresh words (128 bits for each tail uniform, so the tail keeps 53 significant bits
// out to 17 standard deviations). Nobody who sees some of the noise, or who chose the training
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
// is far below the grid: within a layer the sample is uniform on 2^53 equally spaced points
// (≤ 3.92·stddev·2^-53 apart, so a grid cell holds at least 2^46 of them), the tables are exact
// to ~2e-13 and the wedge's density to a few ulps, and the double sum rounds by 2^-53 of
// |x| + |noise| (|x| bounded by the clipped contributions): together they move the probability of
// a grid cell by ~2^-40 of itself, against the attack's use of every last bit. The exact
// alternative, a discrete Gaussian sampled by rejection (DiscreteGaussianNoise below), costs ~10
// times as much per value: secure aggregation's distributed DP uses it on integers.
#pragma once

#include "core/util/key_stream.hpp"

#include <array>
#include <cmath>
#include <cstdint>
#include <span>

namespace fedl::core {

// 64-bit words of a key stream, drawn N at a time (the samplers' occasional draws).
template<std::size_t N>
struct WordBuffer
{
  std::array<std::uint64_t, N> words{};
  std::size_t used = N;

  std::uint64_t next(KeyStream& stream)
  {
    if (used == N) {
      stream.fill(std::as_writable_bytes(std::span(words)));
      used = 0;
    }
    return words[used++];
  }
};

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
  // The same for values kept in float, then scaled: out[i] ← float(round((in[i] + N(0, stddev²)) /
  // Λ)·Λ·scale), the sum, the snapping and the scaling in double. `in` and `out` have the same
  // size and may be the same.
  void add_snapped(std::span<const float> in, std::span<float> out, double stddev, double scale = 1);
  // Raw bytes of the key stream (uniform), for other secrets drawn beside the noise.
  void key_stream(std::span<std::byte> out) { m_stream.fill(out); }
  // An independent generator keyed by the next 32 bytes of this one's key stream (a tree of
  // AES-CTR streams, each key a secret of its parent's), for drawing in parallel: one child per
  // fixed piece of the work keeps a fixed seed's noise the same whatever the number of threads.
  GaussianNoise child();

private:
  explicit GaussianNoise(const KeyStream::Key& key);
  // Calls put(i, draw) for i in [0, n), each draw from N(0, stddev²).
  template<class Put>
  void draw(std::size_t n, double stddev, Put put);
  // A candidate's magnitude when the one comparison did not accept it (layer `layer`, position
  // `x`): the wedge test, the tail, or fresh candidates until one is accepted.
  double magnitude_after_reject(unsigned layer, double x);
  std::uint64_t spare_word();
  double spare_uniform();      // in (0, 1), 53 bits
  double spare_uniform_fine(); // in (0, 1], 128 bits

  KeyStream m_stream;
  WordBuffer<64> m_spare; // words for the rejected candidates
};

// The ziggurat tables' closure, for the tests: the top layer's area over the common area v,
// minus 1 (zero up to rounding when r and the tables are right).
double ziggurat_closure();

// The grid a noisy value of noise standard deviation `stddev` (> 0) is snapped to: the largest
// power of two ≤ stddev / 16.
double noise_grid(double stddev);

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
  WordBuffer<512> m_buffer;
};

} // namespace fedl::core
