// SPDX-License-Identifier: Apache-2.0
#pragma once

#include <chrono>
#include <optional>
#include <string>

namespace fedl::core {

// The current UTC time as ISO 8601 with milliseconds, e.g. 2026-11-27T19:20:00.123Z (logs,
// ledger entries).
std::string utc_now();

// The time utc_now() wrote, or nullopt if `text` is not in that form.
std::optional<std::chrono::system_clock::time_point> parse_utc(const std::string& text);

// Seconds on the steady clock (an arbitrary origin): for timeouts and durations.
double steady_seconds() noexcept;

} // namespace fedl::core
