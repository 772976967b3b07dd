// SPDX-License-Identifier: Apache-2.0
// Gaussian noise for differential privacy, from a cryptographic key stream: AES-256-CTR keyed
// from getrandom(2) (or, for tests, from SHA-256 of a fixed seed), turned into normals by the
// Box-Muller transform (Box and Muller 1958). Nobody who sees some of the noise, or who chose
// the training seed, can predict the rest. Like every floating-point sampler it is not hardened
// against the attacks on floating-point noise (Mironov 2012, "On Significance of the Least
// Significant Bits for Differential Privacy").
#pragma once

#include "core/util/key_stream.hpp"

#include <array>
#include <cmath>
#include <cstdint>
#include <span>

namespace fedl::core {

class GaussianNoise
{
public:
  // seed 0: a fresh key from the operating system; otherwise a fixed key derived from `seed`.
  explicit GaussianNoise(std::uint64_t seed = 0);

  // Fills `out` with independent draws of N(0, stddev²).
  void fill(std::span<double> out, double stddev);
  // The raw key stream (uniform bytes), for a caller that vectorizes Box-Muller itself, as the
  // torch backend does: per normal pair, 64 bits for the radius and 32 for the angle.
  void key_stream(std::span<std::byte> out) { m_stream.fill(out); }

private:
  KeyStream m_stream;
};

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
