// SPDX-License-Identifier: Apache-2.0
// Fixed-point encoding of weighted updates into Z_2^32, so that the masked sum of the sites'
// words decodes to their weighted sum and nothing else.
//
// With range R, sample cap n_max and at most N sites (the sites asked): a site with n samples has
// the weight w = min(n, n_max) / n_max (in (0, 1]); each value x of its update is clipped to
// [−R, R] and becomes round(w · x · S) as a two's complement 32-bit word, S = 2^f the largest power
// of two with N · R · S ≤ 2^31 − 1, so that no sum of N words overflows. One word more carries
// round(w · Sw), Sw = 2^g the largest power of two with N · Sw ≤ 2^32 − 1: the sum of the weights,
// which the coordinator learns instead of each site's count. The weighted mean is then
// (Σ words / S) / (Σ weight words / Sw), to within N / (2 S) per value over the total weight.
#pragma once

#include "core/format/tensor.hpp"

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace fedl::core::secagg {

struct Encoding
{
  double range = 1.0;            // R: values are clipped to [−R, R]
  std::uint64_t max_samples = 1; // n_max: a site's weight is min(n, n_max) / n_max
  std::size_t sites = 1;         // N: the most words that are summed
  // Distributed DP: the standard deviation (in values) of the discrete Gaussian noise each site
  // adds to each of its words, as noise · S in words; 0: none. S then leaves room for it:
  // (N · R + 10 · √N · noise) · S ≤ 2^31 − 1.
  double noise = 0;

  // Throws UsageError unless R is positive and finite, n_max ≥ 1 and 1 ≤ N ≤ 2^20, the noise is
  // 0 or positive and finite, and the scales leave at least 8 bits of precision (what S must
  // cover, N · R + 10 · √N · noise, at most 2^23).
  void check() const;
  double scale() const; // S
  double span() const;  // what S must cover: N · R + 10 · √N · noise
  // The L2 sensitivity in words of one site's `values` values clipped to norm `clip_norm`:
  // clip_norm · S, plus the rounding's half a word on each value.
  double sensitivity(double clip_norm, std::size_t values) const;
  double weight_scale() const; // Sw
};

struct Encoded
{
  std::vector<std::uint32_t> words; // one per value, in the tensors' order, then the weight
  std::size_t clipped = 0;          // values that were outside [−R, R]
};

// `update`'s F32 and F64 values (other dtypes are refused with UsageError), for a site with
// `samples` samples (≥ 1); with `clip_norm`, first scaled by min(1, clip_norm / ‖update‖₂) (the
// norm over all its tensors); with the encoding's noise, each value word then gets its draw of
// N_Z(0, (noise · S)²) (math/noise.hpp), keyed by the operating system. Values go in the order of the tensors' names,
// whatever the order of `update`.
Encoded encode(std::span<const TensorView> update, std::uint64_t samples, const Encoding& e,
               std::optional<double> clip_norm = std::nullopt);

struct Decoded
{
  std::vector<OwnedTensor> mean; // named, shaped and typed as the template
  double total_weight = 0;       // Σ w over the sites summed
};

// The weighted mean from the sum (mod 2^32) of encoded words, with `like` giving the tensors'
// names, dtypes and shapes (the result in its order; tensor names distinct). Throws Error if
// `sum` has another length or the total weight is 0.
// With a `divisor`, `Decoded::mean` holds the weighted sum over it instead (1: the sum).
Decoded decode(std::span<const std::uint32_t> sum, std::span<const TensorView> like, const Encoding& e,
               std::optional<double> divisor = std::nullopt);

} // namespace fedl::core::secagg
