// SPDX-License-Identifier: Apache-2.0
#include "core/util/text.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cstdint>

namespace fedl::core {

namespace {

constexpr std::string_view k_replacement = "\xEF\xBF\xBD"; // U+FFFD
constexpr std::string_view k_ellipsis = "\xE2\x80\xA6";    // U+2026

// The length of the well-formed UTF-8 sequence at the start of `s` (RFC 3629 §4, the table of
// well-formed byte sequences), or 0 if it is ill-formed or cut short.
std::size_t
sequence_length(std::string_view s) noexcept
{
  const auto b = [&](std::size_t i) { return static_cast<std::uint8_t>(s[i]); };
  const auto cont = [&](std::size_t i, std::uint8_t lo = 0x80, std::uint8_t hi = 0xBF) {
    return i < s.size() && b(i) >= lo && b(i) <= hi;
  };
  const std::uint8_t c = b(0);
  if (c < 0x80) {
    return 1;
  }
  if (c >= 0xC2 && c <= 0xDF) {
    return cont(1) ? 2 : 0;
  }
  if (c >= 0xE0 && c <= 0xEF) {
    const std::uint8_t lo = c == 0xE0 ? 0xA0 : 0x80; // no overlong forms
    const std::uint8_t hi = c == 0xED ? 0x9F : 0xBF; // no surrogates
    return cont(1, lo, hi) && cont(2) ? 3 : 0;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    const std::uint8_t lo = c == 0xF0 ? 0x90 : 0x80; // no overlong forms
    const std::uint8_t hi = c == 0xF4 ? 0x8F : 0xBF; // nothing past U+10FFFF
    return cont(1, lo, hi) && cont(2) && cont(3) ? 4 : 0;
  }
  return 0;
}

} // namespace

std::string
valid_utf8(std::string_view s, std::size_t max_bytes)
{
  std::string out;
  bool cut = false;
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = sequence_length(s.substr(i));
    const std::string_view piece = n == 0 ? k_replacement : s.substr(i, n);
    if (max_bytes != std::string::npos && out.size() + piece.size() > max_bytes) {
      cut = true;
      break;
    }
    out += piece;
    i += n == 0 ? 1 : n;
  }
  if (!cut) {
    return out;
  }
  // Whole characters off the end until the ellipsis fits (out is valid UTF-8: a character is its
  // continuation bytes and the byte before them).
  while (!out.empty() && out.size() + k_ellipsis.size() > max_bytes) {
    while (!out.empty() && (static_cast<unsigned char>(out.back()) & 0xC0) == 0x80) {
      out.pop_back();
    }
    if (!out.empty()) {
      out.pop_back();
    }
  }
  if (max_bytes >= k_ellipsis.size()) {
    out += k_ellipsis;
  }
  return out;
}

bool
is_sha256_hex(std::string_view s) noexcept
{
  return s.size() == 64 && s.find_first_not_of("0123456789abcdef") == std::string_view::npos;
}

std::string
quote_text(std::string_view s, std::size_t max_bytes)
{
  return "'" + valid_utf8(s, max_bytes) + "'";
}

std::string
terminal_text(std::string_view s, std::size_t max_bytes)
{
  return escape_controls(valid_utf8(s, max_bytes));
}

std::string
escape_controls(std::string_view s)
{
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7F) {
      out += fmt::format("\\x{:02x}", c);
    } else if (c == 0xC2 && i + 1 < s.size() && static_cast<unsigned char>(s[i + 1]) >= 0x80 &&
               static_cast<unsigned char>(s[i + 1]) <= 0x9F) {
      // U+0080..U+009F (C1 controls, CSI among them) as UTF-8.
      out += fmt::format("\\u{:04x}", static_cast<unsigned char>(s[i + 1]));
      ++i;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

std::size_t
json_nesting(std::string_view text) noexcept
{
  std::size_t depth = 0;
  std::size_t deepest = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i; // the escaped character, whatever it is
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

std::string
hex_encode(std::span<const std::byte> bytes)
{
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (const auto b : bytes) {
    const auto v = static_cast<unsigned>(b);
    out.push_back(digits[v >> 4]);
    out.push_back(digits[v & 15]);
  }
  return out;
}

std::optional<std::vector<std::byte>>
hex_decode(std::string_view text)
{
  const auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') {
      return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
      return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
      return c - 'A' + 10;
    }
    return -1;
  };
  if (text.size() % 2 != 0) {
    return std::nullopt;
  }
  std::vector<std::byte> out(text.size() / 2);
  for (std::size_t i = 0; i < out.size(); ++i) {
    const int hi = digit(text[2 * i]);
    const int lo = digit(text[2 * i + 1]);
    if (hi < 0 || lo < 0) {
      return std::nullopt;
    }
    out[i] = static_cast<std::byte>(hi * 16 + lo);
  }
  return out;
}

std::vector<std::string>
split_text(std::string_view text, std::string_view separators)
{
  std::vector<std::string> out;
  while (!text.empty()) {
    const auto end = text.find_first_of(separators);
    if (end != 0) {
      out.emplace_back(text.substr(0, end));
    }
    text = end == std::string_view::npos ? std::string_view{} : text.substr(end + 1);
  }
  return out;
}

std::string
count_of(std::uint64_t n, std::string_view noun)
{
  return fmt::format("{} {}{}", n, noun, n == 1 ? "" : "s");
}

} // namespace fedl::core
