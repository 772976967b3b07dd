// SPDX-License-Identifier: Apache-2.0
// Logging to stderr: human text or JSON lines (--log-format), levels set by -q / -v.
// Messages are formatted only when their level is enabled.
#pragma once

#include <fmt/format.h>
#include <nlohmann/json_fwd.hpp>

#include <string_view>

namespace fedl::core::log {

enum class Level
{
  error = 0,
  warning = 1,
  info = 2,
  debug = 3
};
enum class Format
{
  text,
  json
};

void configure(Level level, Format format) noexcept;
Level level() noexcept;
bool enabled(Level level) noexcept;
void write(Level level, std::string_view message);
// The same with structured fields (an object): in JSON lines they are keys beside "msg" (one named
// "time", "level" or "msg" is left out), so that a script reads the round, the site or the
// accuracy without parsing the message; text lines show the message alone.
void write(Level level, std::string_view message, const nlohmann::json& fields);
// The line write() would print, without the time that JSON lines carry: for messages made ahead
// of time and written where nothing may be allocated (a signal handler).
std::string line_without_time(Level level, std::string_view message);

template<typename... Args>
void
emit(Level lvl, fmt::format_string<Args...> f, Args&&... args)
{
  if (enabled(lvl)) {
    write(lvl, fmt::format(f, std::forward<Args>(args)...));
  }
}

template<typename... Args>
void
emit_fields(Level lvl, const nlohmann::json& fields, fmt::format_string<Args...> f, Args&&... args)
{
  if (enabled(lvl)) {
    write(lvl, fmt::format(f, std::forward<Args>(args)...), fields);
  }
}

} // namespace fedl::core::log

#define FEDL_LOG_ERROR(...) ::fedl::core::log::emit(::fedl::core::log::Level::error, __VA_ARGS__)
#define FEDL_LOG_WARN(...) ::fedl::core::log::emit(::fedl::core::log::Level::warning, __VA_ARGS__)
#define FEDL_LOG_INFO(...) ::fedl::core::log::emit(::fedl::core::log::Level::info, __VA_ARGS__)
#define FEDL_LOG_DEBUG(...) ::fedl::core::log::emit(::fedl::core::log::Level::debug, __VA_ARGS__)
// With structured fields first: FEDL_LOG_INFO_FIELDS(json{{"round", r}}, "round {} done", r).
#define FEDL_LOG_INFO_FIELDS(fields, ...)                                                                              \
  ::fedl::core::log::emit_fields(::fedl::core::log::Level::info, fields, __VA_ARGS__)
#define FEDL_LOG_WARN_FIELDS(fields, ...)                                                                              \
  ::fedl::core::log::emit_fields(::fedl::core::log::Level::warning, fields, __VA_ARGS__)
