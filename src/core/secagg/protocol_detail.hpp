// SPDX-License-Identifier: Apache-2.0
// Private to the SecAgg+ sources (protocol.cpp, client.cpp, server.cpp): the byte layouts and key
// derivations that the site and the coordinator must compute alike.
#pragma once

#include "core/secagg/crypto.hpp"
#include "core/secagg/protocol.hpp"

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace fedl::core::secagg::detail {

inline constexpr std::string_view protocol_label = "fedl-secagg-v1";
inline constexpr std::size_t secret_bytes = 32;
inline constexpr std::size_t limbs = secret_limbs;
inline constexpr std::size_t sealed_bytes = sealed_share_bytes;

// Little-endian fields appended to, or read from, a message.
void put_u32(std::vector<std::byte>& out, std::uint32_t v);
void put_u64(std::vector<std::byte>& out, std::uint64_t v);
std::uint64_t get_u64(std::span<const std::byte> in, std::size_t at);
std::uint32_t get_u32(std::span<const std::byte> in, std::size_t at);
// Its length (4 bytes), then its bytes.
void put_text(std::vector<std::byte>& out, std::string_view s);

// What binds a derived key or a sealed message to one purpose, round, attempt and pair of sites.
std::vector<std::byte> context(const Params& p, std::string_view purpose, std::uint32_t a, std::uint32_t b);
// HKDF-SHA256 of `ikm` to 32 bytes, salted with the protocol's label.
Bytes32 derive(std::span<const std::byte> ikm, const std::vector<std::byte>& info);
// The key of the pair (a, b) for `purpose`, from their X25519 agreement.
Bytes32 pair_key(const KeyPair& mine, const Bytes32& theirs, const Params& p, std::string_view purpose, std::uint32_t a,
                 std::uint32_t b);
Bytes32 self_mask_key(const Bytes32& seed, const Params& p, std::uint32_t index);
// What a site's key advert commits it to: its seed, labelled with the attempt and the site.
Bytes32 commitment(const Bytes32& seed, const Params& p, std::uint32_t index);
// The AES-GCM nonce of the shares `from` seals for `to`.
std::array<std::byte, 12> nonce(std::uint32_t from, std::uint32_t to);
// +1 if `a` adds the mask it shares with `b` (the smaller index does), −1 if it subtracts it.
int pair_sign(std::uint32_t a, std::uint32_t b);

} // namespace fedl::core::secagg::detail
