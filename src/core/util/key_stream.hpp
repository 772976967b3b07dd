// SPDX-License-Identifier: Apache-2.0
// An AES-256-CTR key stream (NIST SP 800-38A, section 6.5): the bytes that AES-256 in counter
// mode turns zeros into, from a 256-bit key and a 128-bit initial counter block. Nobody without
// the key can tell it from uniform bytes or predict any of it from the rest. DP noise
// (math/noise.hpp) and the secure-aggregation masks (secagg/) are drawn from it.
#pragma once

#include <array>
#include <cstddef>
#include <span>

namespace fedl::core {

class KeyStream
{
public:
  using Key = std::array<std::byte, 32>;
  using Counter = std::array<std::byte, 16>;

  explicit KeyStream(const Key& key, const Counter& counter = {});
  ~KeyStream();
  KeyStream(const KeyStream&) = delete;
  KeyStream& operator=(const KeyStream&) = delete;
  KeyStream(KeyStream&& other) noexcept;
  KeyStream& operator=(KeyStream&& other) noexcept;

  // The next out.size() bytes of the stream.
  void fill(std::span<std::byte> out);

private:
  void* m_ctx = nullptr;
};

// 32 bytes from the operating system's generator (getrandom(2)); `what` names their use in the
// error if there is none to be had.
KeyStream::Key random_key(const char* what);

} // namespace fedl::core
