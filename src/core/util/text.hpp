// SPDX-License-Identifier: Apache-2.0
// Text that came from a peer (a site's error report, metadata in its update, its metrics, a
// certificate field), made safe to store in the ledger and to show in a log: valid UTF-8, of a
// bounded length, and JSON bounded in nesting before it is parsed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace fedl::core {

// `s` as valid UTF-8 (RFC 3629: each ill-formed sequence, overlong form, surrogate or code point
// past U+10FFFF becomes U+FFFD) of at most `max_bytes` bytes: cut at a character boundary and
// ended with "…" when it is longer. Never throws for any bytes.
std::string valid_utf8(std::string_view s, std::size_t max_bytes = std::string::npos);

// Whether `s` is a SHA-256 as fedl writes one: 64 lowercase hex digits.
bool is_sha256_hex(std::string_view s) noexcept;

// valid_utf8(s, max_bytes) in single quotes: how messages quote a value a peer chose.
std::string quote_text(std::string_view s, std::size_t max_bytes = 64);

// "1 task", "3 tasks": a count and a noun that takes an s in the plural.
std::string count_of(std::uint64_t n, std::string_view noun);

// For one-line text logs: C0 controls, DEL and the C1 controls U+0080..U+009F written as \n, \r,
// \t or \xHH, and a backslash doubled, so that peer text cannot start a line of its own or
// drive the terminal. Expects valid UTF-8 (valid_utf8 first).
std::string escape_controls(std::string_view s);

// Text someone else chose (a module's author, a status file), for one line of a terminal:
// escape_controls(valid_utf8(s, max_bytes)).
std::string terminal_text(std::string_view s, std::size_t max_bytes = 300);

// The deepest nesting of arrays and objects in JSON text (strings and their escapes skipped),
// counted without parsing or allocating: callers refuse text deeper than they need before a
// JSON parser builds a tree for it. Malformed text gets some count; the parser rejects it.
std::size_t json_nesting(std::string_view text) noexcept;

// The pieces of `text` between any of the `separators`, empty ones left out: a PATH-like list
// (":"), a kernel file's words (" \n").
std::vector<std::string> split_text(std::string_view text, std::string_view separators);

// Bytes as lowercase hex, and back: nothing unless `text` is an even number of hex digits (either
// case).
std::string hex_encode(std::span<const std::byte> bytes);
std::optional<std::vector<std::byte>> hex_decode(std::string_view text);

} // namespace fedl::core
