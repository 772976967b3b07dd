// SPDX-License-Identifier: Apache-2.0
// The cryptography of secure aggregation (SecAgg+: Bell, Bonawitz, Gascón, Lepoint, Raykova,
// CCS 2020), all through OpenSSL 3:
//   X25519 key agreement (RFC 7748) between two sites' round keys;
//   HKDF-SHA256 (RFC 5869) from an agreed secret to the keys of one purpose and one round;
//   AES-256-GCM for the shares that one site sends another through the coordinator;
//   masks in Z_2^32: the AES-256-CTR key stream of a key (util/key_stream.hpp), read as
//   little-endian 32-bit words.
#pragma once

#include "core/util/key_stream.hpp"

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

namespace fedl::core::secagg {

using Bytes32 = std::array<std::byte, 32>;

// An X25519 key pair. The secret is wiped when the pair goes.
class KeyPair
{
public:
  // A fresh pair from the operating system's generator.
  static KeyPair generate();
  // The pair of a given secret (RFC 7748 clamps it), for known-answer tests.
  static KeyPair from_secret(const Bytes32& secret);

  KeyPair(const KeyPair&) = default;
  KeyPair& operator=(const KeyPair&) = default;
  KeyPair(KeyPair&&) = default;
  KeyPair& operator=(KeyPair&&) = default;
  ~KeyPair();

  const Bytes32& public_key() const noexcept { return m_public; }
  const Bytes32& secret() const noexcept { return m_secret; }

  // X25519(secret, peer): the secret both sides agree on. Throws Error if the peer's key is of
  // small order (the result would be all zeros, RFC 7748 section 6.1), which only a hostile peer
  // sends.
  Bytes32 agree(const Bytes32& peer_public) const;

private:
  KeyPair() = default;
  Bytes32 m_secret{};
  Bytes32 m_public{};
};

// HKDF-SHA256 (RFC 5869): `length` bytes of output keying material from `ikm`, `salt` and `info`.
std::vector<std::byte> hkdf_sha256(std::span<const std::byte> ikm, std::span<const std::byte> salt,
                                   std::span<const std::byte> info, std::size_t length);

// AES-256-GCM with a 96-bit nonce: ciphertext followed by the 16-byte tag.
std::vector<std::byte> seal(const Bytes32& key, std::span<const std::byte, 12> nonce, std::span<const std::byte> aad,
                            std::span<const std::byte> plaintext);
// The plaintext, or nothing if the tag does not verify (a wrong key, or altered bytes).
std::optional<std::vector<std::byte>> open(const Bytes32& key, std::span<const std::byte, 12> nonce,
                                           std::span<const std::byte> aad, std::span<const std::byte> sealed);

// Adds (sign +1) or subtracts (sign −1) the mask of `key` to `values`, modulo 2^32: word j of the
// mask is bytes 4j..4j+3 of key's AES-256-CTR key stream (counter block 0), little-endian.
void apply_mask(std::span<std::uint32_t> values, const Bytes32& key, int sign);

// v[j] += sign · w[j] (sign +1 or −1) for j < n, modulo 2^32, vectorized (the inner loops have a
// constant trip count, which GCC vectorizes at -O2).
void add_words(std::uint32_t* __restrict v, const std::uint32_t* __restrict w, std::size_t n, int sign) noexcept;

struct MaskTerm
{
  Bytes32 key{};
  int sign = 1;
};
// apply_mask for each term, block by block: every mask is added to a block of `values` while it
// is in L1, so that k masks cost one pass over `values` rather than k.
void apply_masks(std::span<std::uint32_t> values, std::span<const MaskTerm> terms);

} // namespace fedl::core::secagg
