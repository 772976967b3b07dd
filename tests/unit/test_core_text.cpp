// SPDX-License-Identifier: Apache-2.0
// Peer text made safe: UTF-8 repair and cutting (the well-formed sequences of RFC 3629 §4 and
// the classic malformed cases), control characters in logs, JSON nesting counted unparsed.
#include "core/util/text.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

using namespace fedl::core;

TEST_SUITE_BEGIN("text");

TEST_CASE("text: valid UTF-8 passes unchanged")
{
  for (const std::string& s :
       std::vector<std::string>{"", "plain", "caf\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80", "\xEF\xBF\xBF",
                                "\xF4\x8F\xBF\xBF", std::string("nul\0inside", 10)}) {
    CHECK(valid_utf8(s) == s);
  }
}

TEST_CASE("text: each ill-formed sequence becomes U+FFFD")
{
  const std::string r = "\xEF\xBF\xBD";
  CHECK(valid_utf8("a\xC3") == "a" + r);                  // cut short
  CHECK(valid_utf8("\xE2\x82") == r + r);                 // cut short: each byte on its own
  CHECK(valid_utf8("\xC0\xAF") == r + r);                 // overlong '/'
  CHECK(valid_utf8("\xE0\x80\xAF") == r + r + r);         // overlong, three bytes
  CHECK(valid_utf8("\xED\xA0\x80") == r + r + r);         // a surrogate
  CHECK(valid_utf8("\xF4\x90\x80\x80") == r + r + r + r); // past U+10FFFF
  CHECK(valid_utf8("\xFF\xFE") == r + r);
  CHECK(valid_utf8("\x80x") == r + "x"); // a lone continuation byte
}

TEST_CASE("text: cutting keeps whole characters and says so")
{
  CHECK(valid_utf8("abcdef", 6) == "abcdef");
  CHECK(valid_utf8("abcdefg", 6) == "abc\xE2\x80\xA6");
  // "é" is two bytes: a cut at 6 bytes with the ellipsis leaves room for 3, so one "é" goes.
  CHECK(valid_utf8("\xC3\xA9\xC3\xA9\xC3\xA9\xC3\xA9", 6) == "\xC3\xA9\xE2\x80\xA6");
  CHECK(valid_utf8("abcdefg", 2).empty());
  const std::string big(1 << 20, 'x');
  CHECK(valid_utf8(big, 500).size() == 500);
  CHECK(quote_text("x") == "'x'");
  CHECK(quote_text(big).size() == 66);
}

TEST_CASE("text: control characters cannot start a log line or drive a terminal")
{
  CHECK(escape_controls("a\nb") == "a\\nb");
  CHECK(escape_controls("\r\t\x1b[2J") == "\\r\\t\\x1b[2J");
  CHECK(escape_controls("\xC2\x9B"
                        "31m") == "\\u009b31m"); // CSI as a C1 control
  CHECK(escape_controls("back\\slash") == "back\\\\slash");
  CHECK(escape_controls("caf\xC3\xA9 \x7f") == "caf\xC3\xA9 \\x7f");
}

TEST_CASE("text: JSON nesting is counted without parsing")
{
  CHECK(json_nesting("") == 0);
  CHECK(json_nesting("1") == 0);
  CHECK(json_nesting("{}") == 1);
  CHECK(json_nesting(R"({"a":[1,{"b":[]}]})") == 4);
  CHECK(json_nesting(R"({"a":"[[[[{{{{\"[["})") == 1); // brackets in strings, an escaped quote
  CHECK(json_nesting(std::string(1000000, '[')) == 1000000);
  CHECK(json_nesting("]]]]{") == 1);
}

TEST_CASE("split_text: pieces between any separator, empty ones left out")
{
  using V = std::vector<std::string>;
  CHECK(split_text("/a:/b::/c:", ":") == V{"/a", "/b", "/c"});
  CHECK(split_text("memory pids\n", " \n") == V{"memory", "pids"});
  CHECK(split_text("", ":").empty());
  CHECK(split_text(":::", ":").empty());
  CHECK(split_text("one", ",") == V{"one"});
}
