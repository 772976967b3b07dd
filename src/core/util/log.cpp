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

namespace {

std::string
format_line(Level lvl, std::string_view message, bool with_time, const nlohmann::json* fields = nullptr)
{
  if (g_format == Format::json) {
    nlohmann::json j = {{"level", level_name(lvl)}, {"msg", message}};
    if (fields != nullptr && fields->is_object()) {
      for (const auto& [k, v] : fields->items()) {
        if (k != "level" && k != "msg" && k != "time") {
          j[k] = v;
        }
      }
    }
    if (with_time) {
      j["time"] = utc_now();
    }
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  }
  // One entry, one line: text from peers is quoted in messages, and must not forge lines or
  // send escape sequences to the operator's terminal.
  const auto text = escape_controls(valid_utf8(message));
  return lvl == Level::error || lvl == Level::warning ? fmt::format("fedl: {}: {}\n", level_name(lvl), text)
                                                      : fmt::format("fedl: {}\n", text);
}

} // namespace

std::string
line_without_time(Level lvl, std::string_view message)
{
  return format_line(lvl, message, false);
}

namespace {

void
put(const std::string& line)
{
  const std::lock_guard lock(g_mutex);
  std::fwrite(line.data(), 1, line.size(), stderr);
}

} // namespace

void
write(Level lvl, std::string_view message)
{
  put(format_line(lvl, message, true));
}

void
write(Level lvl, std::string_view message, const nlohmann::json& fields)
{
  put(format_line(lvl, message, true, &fields));
}

} // namespace fedl::core::log
