// SPDX-License-Identifier: Apache-2.0
// Gaussian noise for differential privacy, from a cryptographic key stream: AES-256-CTR keyed
// from getrandom(2) (or, for tests, from SHA-256 of a fixed seed), turned into normals by the
// Box-Muller transform (Box and Muller 1958). Nobody who sees some of the noise, or who chose
// the training seed, can predict the rest. Like every floating-point sampler it is not hardened
// against the attacks on floating-point noise (Mironov 2012, "On Significance of the Least
// Significant Bits for Differential Privacy").
#pragma once

#include "core/util/key_stream.hpp"

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

} // namespace fedl::core
