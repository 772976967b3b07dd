// SPDX-License-Identifier: Apache-2.0
#include "core/util/key_stream.hpp"

#include "core/util/error.hpp"

#include <openssl/evp.h>
#include <sys/random.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <utility>

namespace fedl::core {

KeyStream::KeyStream(const Key& key, const Counter& counter)
{
  auto* ctx = EVP_CIPHER_CTX_new();
  if (ctx == nullptr ||
      EVP_EncryptInit_ex(ctx, EVP_aes_256_ctr(), nullptr, reinterpret_cast<const unsigned char*>(key.data()),
                         reinterpret_cast<const unsigned char*>(counter.data())) != 1) {
    EVP_CIPHER_CTX_free(ctx);
    throw Error("OpenSSL: cannot set up AES-256-CTR");
  }
  m_ctx = ctx;
}

KeyStream::~KeyStream()
{
  EVP_CIPHER_CTX_free(static_cast<EVP_CIPHER_CTX*>(m_ctx));
}

KeyStream::KeyStream(KeyStream&& other) noexcept : m_ctx(std::exchange(other.m_ctx, nullptr)) {}

KeyStream&
KeyStream::operator=(KeyStream&& other) noexcept
{
  if (this != &other) {
    EVP_CIPHER_CTX_free(static_cast<EVP_CIPHER_CTX*>(m_ctx));
    m_ctx = std::exchange(other.m_ctx, nullptr);
  }
  return *this;
}

void
KeyStream::fill(std::span<std::byte> out)
{
  // Counter mode: encrypting zeros leaves the key stream. Zeros from a constant block rather than
  // written into `out` first: one pass over the output instead of two.
  static const std::array<unsigned char, 16384> zeros{};
  auto* bytes = reinterpret_cast<unsigned char*>(out.data());
  const std::size_t n = out.size();
  auto* ctx = static_cast<EVP_CIPHER_CTX*>(m_ctx);
  for (std::size_t done = 0; done < n;) {
    const int chunk = static_cast<int>(std::min(n - done, zeros.size()));
    int written = 0;
    if (ctx == nullptr || EVP_EncryptUpdate(ctx, bytes + done, &written, zeros.data(), chunk) != 1 ||
        written != chunk) {
      throw Error("OpenSSL: AES-256-CTR failed");
    }
    done += static_cast<std::size_t>(written);
  }
}

KeyStream::Key
random_key(const char* what)
{
  KeyStream::Key key{};
  std::size_t got = 0;
  while (got < key.size()) {
    const auto n = ::getrandom(key.data() + got, key.size() - got, 0);
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      throw Error("cannot draw a key for {}: getrandom: {}", what, std::strerror(errno));
    }
    got += static_cast<std::size_t>(n);
  }
  return key;
}

} // namespace fedl::core
