// SPDX-License-Identifier: Apache-2.0
#include "core/math/noise.hpp"

#include "core/util/error.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <sys/random.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <numbers>
#include <string>
#include <vector>

namespace fedl::core {

GaussianNoise::GaussianNoise(std::uint64_t seed) : m_ctx(nullptr)
{
  std::array<unsigned char, 32> key{};
  if (seed == 0) {
    std::size_t got = 0;
    while (got < key.size()) {
      const auto n = ::getrandom(key.data() + got, key.size() - got, 0);
      if (n < 0) {
        if (errno == EINTR) {
          continue;
        }
        throw Error("cannot draw a key for DP noise: getrandom: {}", std::strerror(errno));
      }
      got += static_cast<std::size_t>(n);
    }
  } else {
    std::string material = "fedl DP noise seed ";
    for (int i = 0; i < 8; ++i) {
      material.push_back(static_cast<char>((seed >> (8 * i)) & 0xff));
    }
    unsigned int len = 0;
    if (EVP_Digest(material.data(), material.size(), key.data(), &len, EVP_sha256(), nullptr) != 1) {
      throw Error("SHA-256 failed while deriving a DP noise key");
    }
  }
  const std::array<unsigned char, 16> iv{};
  auto* ctx = EVP_CIPHER_CTX_new();
  const bool ok = ctx != nullptr && EVP_EncryptInit_ex(ctx, EVP_aes_256_ctr(), nullptr, key.data(), iv.data()) == 1;
  OPENSSL_cleanse(key.data(), key.size());
  if (!ok) {
    EVP_CIPHER_CTX_free(ctx);
    throw Error("cannot set up AES-256-CTR for DP noise");
  }
  m_ctx = ctx;
}

GaussianNoise::~GaussianNoise()
{
  EVP_CIPHER_CTX_free(static_cast<EVP_CIPHER_CTX*>(m_ctx));
}

void
GaussianNoise::key_stream(std::span<std::byte> out)
{
  auto* bytes = reinterpret_cast<unsigned char*>(out.data());
  const std::size_t n = out.size();
  std::memset(bytes, 0, n);
  auto* ctx = static_cast<EVP_CIPHER_CTX*>(m_ctx);
  for (std::size_t done = 0; done < n;) {
    const int chunk = static_cast<int>(std::min<std::size_t>(n - done, std::size_t{1} << 30));
    int written = 0;
    // CTR mode: encrypting zeros leaves the key stream.
    if (EVP_EncryptUpdate(ctx, bytes + done, &written, bytes + done, chunk) != 1 || written != chunk) {
      throw Error("AES-256-CTR failed while drawing DP noise");
    }
    done += static_cast<std::size_t>(written);
  }
}

void
GaussianNoise::fill(std::span<double> out, double stddev)
{
  // Box-Muller: for u in (0, 1] and an angle t uniform in [0, 2π), √(−2 ln u)·(cos t, sin t) are
  // two independent standard normals. Per pair: 64 bits of key stream for u, 32 for t; u as
  // (k + 1/2) / 2^64 keeps the tail exact out to √(2·64·ln 2) ≈ 9.4 standard deviations.
  constexpr std::size_t block = 4096; // pairs per key-stream request
  std::vector<std::uint32_t> words(3 * block);
  for (std::size_t begin = 0; begin < out.size(); begin += 2 * block) {
    const std::size_t pairs = std::min(block, (out.size() - begin + 1) / 2);
    key_stream(std::as_writable_bytes(std::span(words.data(), 3 * pairs)));
    for (std::size_t i = 0; i < pairs; ++i) {
      const double u =
        (static_cast<double>(words[3 * i]) + (static_cast<double>(words[3 * i + 1]) + 0.5) * 0x1p-32) * 0x1p-32;
      const double t = static_cast<double>(words[3 * i + 2]) * (2.0 * std::numbers::pi * 0x1p-32);
      const double r = stddev * std::sqrt(-2.0 * std::log(u));
      out[begin + 2 * i] = r * std::cos(t);
      if (begin + 2 * i + 1 < out.size()) {
        out[begin + 2 * i + 1] = r * std::sin(t);
      }
    }
  }
}

} // namespace fedl::core
