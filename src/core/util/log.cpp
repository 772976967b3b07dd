// SPDX-License-Identifier: Apache-2.0
#include "core/util/log.hpp"

#include "core/util/clock.hpp"
#include "core/util/text.hpp"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <mutex>

namespace fedl::core::log {

namespace {

Level g_level = Level::info;
Format g_format = Format::text;
std::mutex g_mutex;

const char*
level_name(Level level)
{
  switch (level) {
  case Level::error:
    return "error";
  case Level::warning:
    return "warning";
  case Level::info:
    return "info";
  case Level::debug:
    return "debug";
  }
  return "info";
}

} // namespace

void
configure(Level level, Format format) noexcept
{
  g_level = level;
  g_format = format;
}

Level
level() noexcept
{
  return g_level;
}

bool
enabled(Level lvl) noexcept
{
  return static_cast<int>(lvl) <= static_cast<int>(g_level);
}

void
write(Level lvl, std::string_view message)
{
  std::string line;
  if (g_format == Format::json) {
    nlohmann::json j = {{"time", utc_now()}, {"level", level_name(lvl)}, {"msg", message}};
    line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  } else {
    // One entry, one line: text from peers is quoted in messages, and must not forge lines or
    // send escape sequences to the operator's terminal.
    const auto text = escape_controls(valid_utf8(message));
    line = lvl == Level::error || lvl == Level::warning ? fmt::format("fedl: {}: {}\n", level_name(lvl), text)
                                                        : fmt::format("fedl: {}\n", text);
  }
  const std::lock_guard lock(g_mutex);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

} // namespace fedl::core::log
