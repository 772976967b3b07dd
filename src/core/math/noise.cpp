// SPDX-License-Identifier: Apache-2.0
#include "core/math/noise.hpp"

#include "core/util/error.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace fedl::core {

namespace {

// A fresh key from the operating system, or one derived from `seed` by SHA-256.
KeyStream::Key
noise_key(std::uint64_t seed)
{
  if (seed == 0) {
    return random_key("DP noise");
  }
  std::string material = "fedl DP noise seed ";
  for (int i = 0; i < 8; ++i) {
    material.push_back(static_cast<char>((seed >> (8 * i)) & 0xff));
  }
  KeyStream::Key key{};
  unsigned int len = 0;
  if (EVP_Digest(material.data(), material.size(), reinterpret_cast<unsigned char*>(key.data()), &len, EVP_sha256(),
                 nullptr) != 1) {
    throw Error("SHA-256 failed while deriving a DP noise key");
  }
  return key;
}

// The key stream for `seed`, its key wiped from this stack once AES has it.
KeyStream
noise_stream(std::uint64_t seed)
{
  auto key = noise_key(seed);
  KeyStream stream(key);
  OPENSSL_cleanse(key.data(), key.size());
  return stream;
}

} // namespace

GaussianNoise::GaussianNoise(std::uint64_t seed) : m_stream(noise_stream(seed)) {}

void
GaussianNoise::fill(std::span<double> out, double stddev)
{
  // Box-Muller: for u in (0, 1] and an angle t uniform in [0, 2π), √(−2 ln u)·(cos t, sin t) are
  // two independent standard normals. Per pair: six words of key stream (box_muller_u/angle).
  constexpr std::size_t block = 4096; // pairs per key-stream request
  std::vector<std::uint32_t> words(6 * block);
  for (std::size_t begin = 0; begin < out.size(); begin += 2 * block) {
    const std::size_t pairs = std::min(block, (out.size() - begin + 1) / 2);
    key_stream(std::as_writable_bytes(std::span(words.data(), 6 * pairs)));
    for (std::size_t i = 0; i < pairs; ++i) {
      const auto* w = &words[6 * i];
      const double u = box_muller_u(w[0], w[1], w[2], w[3]);
      const double t = box_muller_angle(w[4], w[5]);
      const double r = stddev * std::sqrt(-2.0 * std::log(u));
      out[begin + 2 * i] = r * std::cos(t);
      if (begin + 2 * i + 1 < out.size()) {
        out[begin + 2 * i + 1] = r * std::sin(t);
      }
    }
  }
}

double
noise_grid(double stddev)
{
  if (!(stddev > 0) || !std::isfinite(stddev)) {
    throw UsageError("noise needs a positive standard deviation, not {}", stddev);
  }
  return std::exp2(std::floor(std::log2(stddev / 16)));
}

void
GaussianNoise::add_snapped(std::span<double> values, double stddev)
{
  const double grid = noise_grid(stddev);
  m_draws.resize(values.size());
  fill(std::span(m_draws), stddev);
  for (std::size_t i = 0; i < values.size(); ++i) {
    values[i] = snap_to_grid(values[i] + m_draws[i], grid);
  }
}

DiscreteGaussianNoise::DiscreteGaussianNoise(std::uint64_t seed) : m_stream(noise_stream(seed)) {}

std::uint64_t
DiscreteGaussianNoise::next()
{
  if (m_used == m_buffer.size()) {
    m_stream.fill(std::as_writable_bytes(std::span(m_buffer)));
    m_used = 0;
  }
  return m_buffer[m_used++];
}

double
DiscreteGaussianNoise::uniform()
{
  return static_cast<double>(next() >> 11) * 0x1p-53;
}

std::uint64_t
DiscreteGaussianNoise::below(std::uint64_t n)
{
  // Rejection of the top partial block keeps it exactly uniform.
  const std::uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  for (;;) {
    if (const auto x = next(); x < limit) {
      return x % n;
    }
  }
}

// Algorithm 2 of Canonne, Kamath, Steinke: P(y) ∝ exp(−|y|/t) over the integers.
std::int64_t
DiscreteGaussianNoise::discrete_laplace(std::uint64_t t)
{
  for (;;) {
    const auto u = below(t);
    if (!bernoulli_exp(static_cast<double>(u) / static_cast<double>(t))) {
      continue;
    }
    std::uint64_t v = 0;
    while (bernoulli_exp(1.0)) {
      ++v;
    }
    const auto x = static_cast<std::int64_t>(u + t * v);
    const bool negative = (next() & 1U) != 0;
    if (negative && x == 0) {
      continue;
    }
    return negative ? -x : x;
  }
}

std::int64_t
DiscreteGaussianNoise::sample(double sigma)
{
  if (!(sigma > 0) || sigma > 0x1p40) {
    throw UsageError("a discrete Gaussian needs a standard deviation in (0, 2^40], not {}", sigma);
  }
  // Algorithm 3.
  const auto t = static_cast<std::uint64_t>(std::floor(sigma)) + 1;
  const double s2 = sigma * sigma;
  for (;;) {
    const auto y = discrete_laplace(t);
    const double d = std::abs(static_cast<double>(y)) - s2 / static_cast<double>(t);
    if (bernoulli_exp(d * d / (2 * s2))) {
      return y;
    }
  }
}

void
DiscreteGaussianNoise::add_to(std::span<std::uint32_t> words, double sigma)
{
  for (auto& w : words) {
    w += static_cast<std::uint32_t>(sample(sigma));
  }
}

} // namespace fedl::core
