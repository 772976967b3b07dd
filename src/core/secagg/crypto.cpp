// SPDX-License-Identifier: Apache-2.0
#include "core/secagg/crypto.hpp"

#include "core/util/error.hpp"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <memory>

// The key stream's bytes are read as native words: the masks are defined on little-endian ones.
static_assert(std::endian::native == std::endian::little, "secure aggregation needs a little-endian machine");

namespace fedl::core::secagg {

namespace {

struct PkeyFree
{
  void operator()(EVP_PKEY* p) const noexcept { EVP_PKEY_free(p); }
};
struct PkeyCtxFree
{
  void operator()(EVP_PKEY_CTX* p) const noexcept { EVP_PKEY_CTX_free(p); }
};
struct CipherCtxFree
{
  void operator()(EVP_CIPHER_CTX* p) const noexcept { EVP_CIPHER_CTX_free(p); }
};
struct KdfFree
{
  void operator()(EVP_KDF* p) const noexcept { EVP_KDF_free(p); }
};
struct KdfCtxFree
{
  void operator()(EVP_KDF_CTX* p) const noexcept { EVP_KDF_CTX_free(p); }
};
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;

const unsigned char*
uc(const std::byte* p)
{
  return reinterpret_cast<const unsigned char*>(p);
}

unsigned char*
uc(std::byte* p)
{
  return reinterpret_cast<unsigned char*>(p);
}

Pkey
x25519_private(const Bytes32& secret)
{
  Pkey key(EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, nullptr, uc(secret.data()), secret.size()));
  if (!key) {
    throw Error("OpenSSL: cannot make an X25519 key");
  }
  return key;
}

} // namespace

KeyPair
KeyPair::generate()
{
  auto secret = random_key("a secure-aggregation key");
  auto pair = from_secret(secret);
  OPENSSL_cleanse(secret.data(), secret.size());
  return pair;
}

KeyPair
KeyPair::from_secret(const Bytes32& secret)
{
  KeyPair pair;
  pair.m_secret = secret;
  const auto key = x25519_private(secret);
  std::size_t len = pair.m_public.size();
  if (EVP_PKEY_get_raw_public_key(key.get(), uc(pair.m_public.data()), &len) != 1 || len != pair.m_public.size()) {
    throw Error("OpenSSL: cannot compute an X25519 public key");
  }
  return pair;
}

KeyPair::~KeyPair()
{
  OPENSSL_cleanse(m_secret.data(), m_secret.size());
}

Bytes32
KeyPair::agree(const Bytes32& peer_public) const
{
  const auto mine = x25519_private(m_secret);
  const Pkey peer(EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, nullptr, uc(peer_public.data()), peer_public.size()));
  const std::unique_ptr<EVP_PKEY_CTX, PkeyCtxFree> ctx(EVP_PKEY_CTX_new(mine.get(), nullptr));
  Bytes32 shared{};
  std::size_t len = shared.size();
  // OpenSSL refuses a small-order peer key (an all-zero result) in derive itself.
  const bool ok = peer && ctx && EVP_PKEY_derive_init(ctx.get()) == 1 &&
                  EVP_PKEY_derive_set_peer(ctx.get(), peer.get()) == 1 &&
                  EVP_PKEY_derive(ctx.get(), uc(shared.data()), &len) == 1 && len == shared.size();
  if (!ok || std::all_of(shared.begin(), shared.end(), [](std::byte b) { return b == std::byte{0}; })) {
    OPENSSL_cleanse(shared.data(), shared.size());
    throw Error("the peer's X25519 key is not usable (a key of small order)");
  }
  return shared;
}

std::vector<std::byte>
hkdf_sha256(std::span<const std::byte> ikm, std::span<const std::byte> salt, std::span<const std::byte> info,
            std::size_t length)
{
  const std::unique_ptr<EVP_KDF, KdfFree> kdf(EVP_KDF_fetch(nullptr, "HKDF", nullptr));
  const std::unique_ptr<EVP_KDF_CTX, KdfCtxFree> ctx(kdf ? EVP_KDF_CTX_new(kdf.get()) : nullptr);
  if (!ctx) {
    throw Error("OpenSSL: HKDF is not available");
  }
  char digest[] = "SHA256";
  // OSSL_PARAM wants non-const pointers; OpenSSL only reads these.
  auto octets = [](const char* name, std::span<const std::byte> s) {
    return OSSL_PARAM_construct_octet_string(name, const_cast<std::byte*>(s.data()), s.size());
  };
  std::vector<OSSL_PARAM> params{OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0),
                                 octets(OSSL_KDF_PARAM_KEY, ikm)};
  // RFC 5869: an absent salt is HashLen zeros, which is what OpenSSL takes when none is given.
  if (!salt.empty()) {
    params.push_back(octets(OSSL_KDF_PARAM_SALT, salt));
  }
  if (!info.empty()) {
    params.push_back(octets(OSSL_KDF_PARAM_INFO, info));
  }
  params.push_back(OSSL_PARAM_construct_end());
  std::vector<std::byte> out(length);
  if (EVP_KDF_derive(ctx.get(), uc(out.data()), out.size(), params.data()) != 1) {
    throw Error("OpenSSL: HKDF-SHA256 failed (at most 8160 bytes can be derived)");
  }
  return out;
}

namespace {

constexpr std::size_t tag_bytes = 16;

std::unique_ptr<EVP_CIPHER_CTX, CipherCtxFree>
gcm(const Bytes32& key, std::span<const std::byte, 12> nonce, bool encrypt)
{
  std::unique_ptr<EVP_CIPHER_CTX, CipherCtxFree> ctx(EVP_CIPHER_CTX_new());
  if (!ctx || EVP_CipherInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, uc(key.data()), uc(nonce.data()),
                                encrypt ? 1 : 0) != 1) {
    throw Error("OpenSSL: cannot set up AES-256-GCM");
  }
  return ctx;
}

// Feeds `aad` and then `in` (to `out`) through `ctx`; false on failure.
bool
gcm_update(EVP_CIPHER_CTX* ctx, std::span<const std::byte> aad, std::span<const std::byte> in, std::byte* out)
{
  int len = 0;
  if (!aad.empty() && EVP_CipherUpdate(ctx, nullptr, &len, uc(aad.data()), static_cast<int>(aad.size())) != 1) {
    return false;
  }
  return in.empty() || (EVP_CipherUpdate(ctx, uc(out), &len, uc(in.data()), static_cast<int>(in.size())) == 1 &&
                        static_cast<std::size_t>(len) == in.size());
}

void
check_size(std::size_t n)
{
  if (n > std::size_t{1} << 30) {
    throw Error("a sealed secure-aggregation message of {} bytes is over 1 GiB", n);
  }
}

} // namespace

std::vector<std::byte>
seal(const Bytes32& key, std::span<const std::byte, 12> nonce, std::span<const std::byte> aad,
     std::span<const std::byte> plaintext)
{
  check_size(plaintext.size() + aad.size());
  auto ctx = gcm(key, nonce, true);
  std::vector<std::byte> out(plaintext.size() + tag_bytes);
  int len = 0;
  if (!gcm_update(ctx.get(), aad, plaintext, out.data()) || EVP_EncryptFinal_ex(ctx.get(), nullptr, &len) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, static_cast<int>(tag_bytes),
                          out.data() + plaintext.size()) != 1) {
    throw Error("OpenSSL: AES-256-GCM encryption failed");
  }
  return out;
}

std::optional<std::vector<std::byte>>
open(const Bytes32& key, std::span<const std::byte, 12> nonce, std::span<const std::byte> aad,
     std::span<const std::byte> sealed)
{
  if (sealed.size() < tag_bytes) {
    return std::nullopt;
  }
  check_size(sealed.size() + aad.size());
  const auto body = sealed.first(sealed.size() - tag_bytes);
  std::array<std::byte, tag_bytes> tag{};
  std::memcpy(tag.data(), sealed.data() + body.size(), tag_bytes);
  auto ctx = gcm(key, nonce, false);
  std::vector<std::byte> out(body.size());
  int len = 0;
  if (!gcm_update(ctx.get(), aad, body, out.data()) ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, static_cast<int>(tag_bytes), tag.data()) != 1 ||
      EVP_DecryptFinal_ex(ctx.get(), nullptr, &len) != 1) {
    OPENSSL_cleanse(out.data(), out.size());
    return std::nullopt;
  }
  return out;
}

void
add_words(std::uint32_t* __restrict v, const std::uint32_t* __restrict w, std::size_t n, int sign) noexcept
{
  constexpr std::size_t lanes = 16;
  std::size_t j = 0;
  if (sign >= 0) {
    for (; j + lanes <= n; j += lanes) {
      for (std::size_t k = 0; k < lanes; ++k) {
        v[j + k] += w[j + k];
      }
    }
    for (; j < n; ++j) {
      v[j] += w[j];
    }
  } else {
    for (; j + lanes <= n; j += lanes) {
      for (std::size_t k = 0; k < lanes; ++k) {
        v[j + k] -= w[j + k];
      }
    }
    for (; j < n; ++j) {
      v[j] -= w[j];
    }
  }
}

void
apply_mask(std::span<std::uint32_t> values, const Bytes32& key, int sign)
{
  const MaskTerm term{key, sign};
  apply_masks(values, std::span(&term, 1));
}

void
apply_masks(std::span<std::uint32_t> values, std::span<const MaskTerm> terms)
{
  std::vector<KeyStream> streams;
  streams.reserve(terms.size());
  for (const auto& t : terms) {
    streams.emplace_back(t.key);
  }
  constexpr std::size_t block = 2048; // words per key-stream request: 8 KiB, with the values' 8 KiB in L1
  std::array<std::uint32_t, block> words{};
  for (std::size_t begin = 0; begin < values.size(); begin += block) {
    const std::size_t n = std::min(block, values.size() - begin);
    auto* v = values.data() + begin;
    for (std::size_t k = 0; k < terms.size(); ++k) {
      streams[k].fill(std::as_writable_bytes(std::span(words.data(), n)));
      add_words(v, words.data(), n, terms[k].sign);
    }
  }
  OPENSSL_cleanse(words.data(), sizeof words);
}

} // namespace fedl::core::secagg
