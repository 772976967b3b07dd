// SPDX-License-Identifier: Apache-2.0
// Private to round.cpp (plan, validate) and round_commit.cpp (commit): what both use.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace fedl::core::round_detail {

// A rejection reason as the ledger and the log keep it: it may quote what a site chose.
inline constexpr std::size_t max_reason_bytes = 1000;

// The server state file of a round, in the workspace's state/.
inline std::string
state_name(std::uint64_t round)
{
  return fmt::format("server-{:06}.safetensors", round);
}

// Runs check(i) for i in [0, n) on up to 4 threads (this one among them).
inline void
check_in_parallel(std::size_t n, const std::function<void(std::size_t)>& check)
{
  const std::size_t threads =
    std::min<std::size_t>(n, std::clamp<std::size_t>(std::thread::hardware_concurrency(), 1, 4));
  std::atomic<std::size_t> next{0};
  const auto work = [&] {
    for (std::size_t i = next++; i < n; i = next++) {
      check(i);
    }
  };
  std::vector<std::thread> pool;
  for (std::size_t t = 1; t < threads; ++t) {
    pool.emplace_back(work);
  }
  work();
  for (auto& t : pool) {
    t.join();
  }
}

} // namespace fedl::core::round_detail
