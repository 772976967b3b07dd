// SPDX-License-Identifier: Apache-2.0
// A map of computed values that threads share (the accountants' per-mechanism curves, spectra
// and results), emptied when it reaches its capacity: bounded memory without eviction
// bookkeeping, for values that are cheap to compute again.
#pragma once

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>

namespace fedl::core {

template<typename Key, typename Value>
class BoundedCache
{
public:
  explicit BoundedCache(std::size_t capacity) : m_capacity(capacity) {}

  // The value kept for `key`, or `make()`'s, computed outside the lock (two threads may both
  // compute it; either result is the same) and kept. If make() throws, nothing is kept.
  template<typename Make>
  Value get(const Key& key, Make&& make)
  {
    {
      const std::lock_guard lock(m_mutex);
      if (const auto it = m_map.find(key); it != m_map.end()) {
        return it->second;
      }
    }
    Value value = std::forward<Make>(make)();
    const std::lock_guard lock(m_mutex);
    if (m_map.size() >= m_capacity) {
      m_map.clear();
    }
    m_map.emplace(key, value);
    return value;
  }

private:
  std::size_t m_capacity;
  std::mutex m_mutex;
  std::map<Key, Value> m_map;
};

} // namespace fedl::core
