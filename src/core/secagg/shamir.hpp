// SPDX-License-Identifier: Apache-2.0
// Shamir's secret sharing (A. Shamir, "How to Share a Secret", CACM 22(11), 1979) over the prime
// field GF(p), p = 2^61 − 1, a Mersenne prime, so that reduction is a shift and an add. A secret of
// up to 64 bytes is cut into limbs of 7 bytes (56 bits, below p), each shared with its own random
// polynomial of degree threshold − 1; share x holds each polynomial's value at x. Any `threshold`
// shares give the secret back by Lagrange interpolation at 0; fewer say nothing about it.
#pragma once

#include "core/util/key_stream.hpp"

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace fedl::core::secagg {

inline constexpr std::uint64_t field_prime = (std::uint64_t{1} << 61) - 1;
inline constexpr std::size_t limb_bytes = 7;
inline constexpr std::size_t max_secret_bytes = 64;

struct Share
{
  std::uint32_t x = 0;          // where the polynomials were evaluated: never 0
  std::vector<std::uint64_t> y; // one value per limb of the secret, each below field_prime
};

// The limbs a secret of `size` bytes is cut into.
constexpr std::size_t
limbs_of(std::size_t size)
{
  return (size + limb_bytes - 1) / limb_bytes;
}

// One share of `secret` (1 to max_secret_bytes bytes) for each x in `xs` (distinct, nonzero),
// of which any `threshold` (1 ≤ threshold ≤ xs.size()) recover it. The polynomials' coefficients
// come from `coefficients` (tests pass a fixed key stream) or, if null, from a fresh random key.
// Throws UsageError for arguments out of range.
std::vector<Share> split(std::span<const std::byte> secret, std::size_t threshold, std::span<const std::uint32_t> xs,
                         KeyStream* coefficients = nullptr);

// The secret of `size` bytes from the first `threshold` of `shares`. Throws Error if there are
// fewer, if two share an x or one has x = 0, if a share has another limb count or a value outside
// the field, or if what they give is not a secret (a limb past 56 bits: the shares are not of one
// split).
std::vector<std::byte> combine(std::span<const Share> shares, std::size_t threshold, std::size_t size);

// Whether every share lies on the polynomials that the first `threshold` define: false if any
// share (past the first threshold) was altered. Throws as combine() for malformed shares.
bool consistent(std::span<const Share> shares, std::size_t threshold);

} // namespace fedl::core::secagg
