// SPDX-License-Identifier: Apache-2.0
#include "core/secagg/shamir.hpp"

#include "core/util/error.hpp"
#include "core/util/file_io.hpp"

#include <openssl/crypto.h>

#include <algorithm>
#include <array>
#include <optional>
#include <set>

namespace fedl::core::secagg {

namespace {

// GCC and clang have 128-bit integers on 64-bit targets; __extension__ says it is meant.
__extension__ using u128 = unsigned __int128;

std::uint64_t
reduce(u128 v) noexcept
{
  // 2^61 ≡ 1 (mod p): fold the high bits onto the low ones, twice, then one subtraction.
  std::uint64_t r = static_cast<std::uint64_t>(v & field_prime) + static_cast<std::uint64_t>(v >> 61);
  r = (r & field_prime) + (r >> 61);
  return r >= field_prime ? r - field_prime : r;
}

std::uint64_t
add(std::uint64_t a, std::uint64_t b) noexcept
{
  const std::uint64_t r = a + b; // both below 2^61: no overflow
  return r >= field_prime ? r - field_prime : r;
}

std::uint64_t
sub(std::uint64_t a, std::uint64_t b) noexcept
{
  return a >= b ? a - b : a + field_prime - b;
}

std::uint64_t
mul(std::uint64_t a, std::uint64_t b) noexcept
{
  return reduce(static_cast<u128>(a) * b);
}

// a^(p−2) = a^−1 for a ≠ 0 (Fermat).
std::uint64_t
inverse(std::uint64_t a) noexcept
{
  std::uint64_t result = 1;
  std::uint64_t base = a;
  for (std::uint64_t e = field_prime - 2; e != 0; e >>= 1) {
    if ((e & 1) != 0) {
      result = mul(result, base);
    }
    base = mul(base, base);
  }
  return result;
}

// A field element uniform in [0, p): 61 bits of the stream, drawn again on the one value past p − 1.
std::uint64_t
uniform(KeyStream& stream)
{
  for (;;) {
    std::array<std::byte, 8> b{};
    stream.fill(b);
    const std::uint64_t v = get_le(b.data(), 8) & field_prime;
    if (v < field_prime) {
      return v;
    }
  }
}

// Polynomial with coefficients c (c[0] the constant) at x, by Horner's rule.
std::uint64_t
evaluate(std::span<const std::uint64_t> c, std::uint64_t x) noexcept
{
  std::uint64_t r = 0;
  for (std::size_t k = c.size(); k-- > 0;) {
    r = add(mul(r, x), c[k]);
  }
  return r;
}

void
check_shares(std::span<const Share> shares, std::size_t threshold)
{
  if (threshold == 0 || shares.size() < threshold) {
    throw Error("{} shares, but {} are needed to recover the secret", shares.size(), threshold);
  }
  std::set<std::uint32_t> seen;
  const auto limbs = shares[0].y.size();
  if (limbs == 0 || limbs > limbs_of(max_secret_bytes)) {
    throw Error("a share holds {} values, not 1 to {}", limbs, limbs_of(max_secret_bytes));
  }
  for (const auto& s : shares) {
    if (s.x == 0 || !seen.insert(s.x).second) {
      throw Error("share x = {} is zero or given twice", s.x);
    }
    if (s.y.size() != limbs) {
      throw Error("share x = {} holds {} values where the others hold {}", s.x, s.y.size(), limbs);
    }
    for (const auto v : s.y) {
      if (v >= field_prime) {
        throw Error("share x = {} holds a value outside the field", s.x);
      }
    }
  }
}

// The Lagrange weights at `at` of the first `threshold` shares' x.
std::vector<std::uint64_t>
lagrange(std::span<const Share> shares, std::size_t threshold, std::uint64_t at)
{
  std::vector<std::uint64_t> w(threshold);
  for (std::size_t i = 0; i < threshold; ++i) {
    std::uint64_t num = 1;
    std::uint64_t den = 1;
    for (std::size_t j = 0; j < threshold; ++j) {
      if (j != i) {
        num = mul(num, sub(at, shares[j].x));
        den = mul(den, sub(shares[i].x, shares[j].x));
      }
    }
    w[i] = mul(num, inverse(den));
  }
  return w;
}

// Limb l of the polynomials through the first `threshold` shares, at `at`.
std::uint64_t
interpolate(std::span<const Share> shares, std::span<const std::uint64_t> w, std::size_t l)
{
  std::uint64_t r = 0;
  for (std::size_t i = 0; i < w.size(); ++i) {
    r = add(r, mul(w[i], shares[i].y[l]));
  }
  return r;
}

} // namespace

std::vector<Share>
split(std::span<const std::byte> secret, std::size_t threshold, std::span<const std::uint32_t> xs,
      KeyStream* coefficients)
{
  if (secret.empty() || secret.size() > max_secret_bytes) {
    throw UsageError("a secret to share has {} bytes, not 1 to {}", secret.size(), max_secret_bytes);
  }
  if (threshold == 0 || threshold > xs.size()) {
    throw UsageError("a threshold of {} for {} shares", threshold, xs.size());
  }
  std::set<std::uint32_t> seen;
  for (const auto x : xs) {
    if (x == 0 || !seen.insert(x).second) {
      throw UsageError("share x = {} is zero or given twice", x);
    }
  }
  std::optional<KeyStream> own;
  if (coefficients == nullptr) {
    auto key = random_key("secret sharing");
    own.emplace(key);
    OPENSSL_cleanse(key.data(), key.size());
    coefficients = &*own;
  }
  const std::size_t limbs = limbs_of(secret.size());
  std::vector<Share> shares(xs.size());
  for (std::size_t i = 0; i < xs.size(); ++i) {
    shares[i].x = xs[i];
    shares[i].y.resize(limbs);
  }
  std::vector<std::uint64_t> c(threshold);
  for (std::size_t l = 0; l < limbs; ++l) {
    // Limb l: bytes 7l.. of the secret, little-endian.
    c[0] = get_le(secret.data() + l * limb_bytes, std::min(limb_bytes, secret.size() - l * limb_bytes));
    for (std::size_t k = 1; k < threshold; ++k) {
      c[k] = uniform(*coefficients);
    }
    for (auto& s : shares) {
      s.y[l] = evaluate(c, s.x);
    }
  }
  OPENSSL_cleanse(c.data(), c.size() * sizeof(std::uint64_t));
  return shares;
}

std::vector<std::byte>
combine(std::span<const Share> shares, std::size_t threshold, std::size_t size)
{
  check_shares(shares, threshold);
  if (size == 0 || size > max_secret_bytes || limbs_of(size) != shares[0].y.size()) {
    throw Error("shares of {} values cannot hold a secret of {} bytes", shares[0].y.size(), size);
  }
  const auto w = lagrange(shares, threshold, 0);
  std::vector<std::byte> secret(size);
  for (std::size_t l = 0; l < shares[0].y.size(); ++l) {
    const std::uint64_t limb = interpolate(shares, w, l);
    const std::size_t bytes = std::min(limb_bytes, size - l * limb_bytes);
    if ((limb >> (8 * bytes)) != 0) {
      OPENSSL_cleanse(secret.data(), secret.size());
      throw Error("the shares do not recover a secret: they are not all of one split");
    }
    put_le(secret.data() + l * limb_bytes, limb, bytes);
  }
  return secret;
}

bool
consistent(std::span<const Share> shares, std::size_t threshold)
{
  check_shares(shares, threshold);
  for (std::size_t i = threshold; i < shares.size(); ++i) {
    const auto w = lagrange(shares, threshold, shares[i].x);
    for (std::size_t l = 0; l < shares[i].y.size(); ++l) {
      if (interpolate(shares, w, l) != shares[i].y[l]) {
        return false;
      }
    }
  }
  return true;
}

} // namespace fedl::core::secagg
