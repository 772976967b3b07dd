// SPDX-License-Identifier: Apache-2.0
// Small helpers the benchmark programs share.
#pragma once

#include <algorithm>
#include <cstddef>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace fedl::bench {

// The median; the mean of the two middle values for an even count, 0 for none.
inline double
median(std::vector<double> v)
{
  if (v.empty()) {
    return 0;
  }
  std::sort(v.begin(), v.end());
  const auto m = v.size() / 2;
  return v.size() % 2 == 1 ? v[m] : (v[m - 1] + v[m]) / 2;
}

// `text` as a count (digits only; positive unless `zero_ok`), or nullopt.
inline std::optional<std::size_t>
parse_count(const std::string& text, bool zero_ok = false)
{
  try {
    std::size_t pos = 0;
    const auto v = std::stoull(text, &pos);
    if (pos != text.size() || text.find_first_not_of("0123456789") != std::string::npos || (v == 0 && !zero_ok)) {
      return std::nullopt;
    }
    return static_cast<std::size_t>(v);
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

} // namespace fedl::bench
