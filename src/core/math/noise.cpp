// SPDX-License-Identifier: Apache-2.0
#include "core/math/noise.hpp"

#include "core/util/error.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <numbers>
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

// The ziggurat's tables (Marsaglia and Tsang 2000, section 2, for f(x) = exp(−x²/2) and n = 256
// layers of equal area v): x[1] = r, x[i+1] = f⁻¹(v / x[i] + f(x[i])), x[256] = 0, and for the
// base layer (the rectangle under f(r) plus the tail beyond r) the width x[0] = v / f(r). r is
// their published value for 256 layers; the tables close (the top layer's area x[255]·(1 −
// f(x[255])) equals v to 2e-13, which the unit tests check through ziggurat_closure()).
struct Ziggurat
{
  static constexpr double r = 3.6541528853610088;
  std::array<double, 257> x{};
  std::array<double, 257> f{};
};

double
gauss_density(double x)
{
  return std::exp(-0.5 * x * x);
}

// v = r·f(r) + ∫_r^∞ f.
double
layer_area()
{
  const double r = Ziggurat::r;
  return r * gauss_density(r) + std::sqrt(std::numbers::pi / 2) * std::erfc(r / std::numbers::sqrt2);
}

const Ziggurat&
ziggurat()
{
  static const Ziggurat z = [] {
    Ziggurat t;
    const double v = layer_area();
    t.x[0] = v / gauss_density(Ziggurat::r);
    t.x[1] = Ziggurat::r;
    for (std::size_t i = 1; i + 1 < 256; ++i) {
      t.x[i + 1] = std::sqrt(-2 * std::log(v / t.x[i] + gauss_density(t.x[i])));
    }
    t.x[256] = 0;
    for (std::size_t i = 0; i < t.x.size(); ++i) {
      t.f[i] = gauss_density(t.x[i]);
    }
    return t;
  }();
  return z;
}

// round(v·inverse)·cell: `v` rounded to the nearest multiple of the grid 1/inverse (a power of
// two), ties to even, as a number of cells, then times `cell` (the grid, or the grid times a
// scale; either way one rounding at most, since the grid is a power of two). By a product (the
// inverse of a power of two is exact; a division would cost several times as much in the sampling
// loop) and by adding and taking off 1.5·2^52 (in double, the default rounding mode), which
// compilers inline where std::nearbyint is a call. Exact for |v·inverse| < 2^51, and beyond, where
// no noisy value of fedl's comes near, still a whole number of cells.
double
snap_to_grid(double v, double inverse, double cell)
{
  constexpr double magic = 0x1.8p52;
  return ((v * inverse + magic) - magic) * cell;
}

// The 53 bits above a word's layer (bits 0-7) and sign (bit 8), as a position in [0, 1).
double
position(std::uint64_t w)
{
  return static_cast<double>(static_cast<std::int64_t>(w >> 11)) * 0x1p-53;
}

} // namespace

double
ziggurat_closure()
{
  const auto& z = ziggurat();
  return z.x[255] * (1 - z.f[255]) / layer_area() - 1;
}

GaussianNoise::GaussianNoise(std::uint64_t seed) : m_stream(noise_stream(seed)) {}

GaussianNoise::GaussianNoise(const KeyStream::Key& key) : m_stream(key) {}

GaussianNoise
GaussianNoise::child()
{
  KeyStream::Key key{};
  m_stream.fill(key);
  GaussianNoise out(key);
  OPENSSL_cleanse(key.data(), key.size());
  return out;
}

std::uint64_t
GaussianNoise::spare_word()
{
  return m_spare.next(m_stream);
}

double
GaussianNoise::spare_uniform()
{
  return position(spare_word()) + 0x1p-54; // the middle of its cell: never 0
}

double
GaussianNoise::spare_uniform_fine()
{
  // hi·2^-64 + (lo + ½)·2^-128: 53 significant bits down to 2^-75. hi rounds up to 2^64 for its
  // last 2^10 values: keep u ≤ 1.
  const auto hi = static_cast<double>(spare_word());
  const auto lo = static_cast<double>(spare_word());
  return std::min(1.0, (hi + (lo + 0.5) * 0x1p-64) * 0x1p-64);
}

double
GaussianNoise::magnitude_after_reject(unsigned layer, double x)
{
  const auto& z = ziggurat();
  for (;;) {
    if (layer == 0) {
      // Beyond r (Marsaglia 1964): a = −ln(u1)/r and b = −ln(u2) until 2b > a², then r + a.
      for (;;) {
        const double a = -std::log(spare_uniform_fine()) / Ziggurat::r;
        const double b = -std::log(spare_uniform_fine());
        if (2 * b > a * a) {
          return Ziggurat::r + a;
        }
      }
    }
    // The wedge between x[layer + 1] and x[layer]: is a uniform height in the layer under f(x)?
    if (z.f[layer] + spare_uniform() * (z.f[layer + 1] - z.f[layer]) < gauss_density(x)) {
      return x;
    }
    // Rejected: a fresh candidate with its own layer and position. The sign stays the first
    // word's, on which nothing here depended.
    const auto w = spare_word();
    layer = static_cast<unsigned>(w & 0xff);
    x = position(w) * z.x[layer];
    if (x < z.x[layer + 1]) {
      return x;
    }
  }
}

template<class Put>
void
GaussianNoise::draw(std::size_t n, double stddev, Put put)
{
  const auto& z = ziggurat();
  std::array<std::uint64_t, 2048> words; // one candidate each; written before it is read
  for (std::size_t begin = 0; begin < n; begin += words.size()) {
    const std::size_t count = std::min(words.size(), n - begin);
    m_stream.fill(std::as_writable_bytes(std::span(words.data(), count)));
    for (std::size_t k = 0; k < count; ++k) {
      const std::uint64_t w = words[k];
      const auto layer = static_cast<unsigned>(w & 0xff);
      double x = position(w) * z.x[layer];
      if (!(x < z.x[layer + 1])) [[unlikely]] {
        x = magnitude_after_reject(layer, x);
      }
      // Bit 8 is the sign, applied without a branch (one would be mispredicted half the time).
      const std::uint64_t sign = (w & 0x100U) << 55;
      put(begin + k, std::bit_cast<double>(std::bit_cast<std::uint64_t>(x * stddev) ^ sign));
    }
  }
}

void
GaussianNoise::fill(std::span<double> out, double stddev)
{
  draw(out.size(), stddev, [&](std::size_t i, double z) { out[i] = z; });
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
  const double inverse = 1 / grid;
  draw(values.size(), stddev, [&](std::size_t i, double z) { values[i] = snap_to_grid(values[i] + z, inverse, grid); });
}

void
GaussianNoise::add_snapped(std::span<const float> in, std::span<float> out, double stddev, double scale)
{
  if (in.size() != out.size()) {
    throw Error("add_snapped: {} values in, {} out", in.size(), out.size());
  }
  const double grid = noise_grid(stddev);
  const double inverse = 1 / grid;
  const double cell = grid * scale;
  draw(in.size(), stddev, [&](std::size_t i, double z) {
    out[i] = static_cast<float>(snap_to_grid(static_cast<double>(in[i]) + z, inverse, cell));
  });
}

DiscreteGaussianNoise::DiscreteGaussianNoise(std::uint64_t seed) : m_stream(noise_stream(seed)) {}

std::uint64_t
DiscreteGaussianNoise::next()
{
  return m_buffer.next(m_stream);
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
