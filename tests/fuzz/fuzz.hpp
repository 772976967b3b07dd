// SPDX-License-Identifier: Apache-2.0
// What the fuzz targets share: a scratch folder for parsers that read a path, splitting one
// input into two files, an invariant check that aborts (so that libFuzzer and the corpus replay
// both report it), and quiet logging.
//
// Each target is one LLVMFuzzerTestOneInput. It catches exactly the exceptions that the code
// under test documents for bad input (core::Error and its subclasses, ProtocolError, and where
// the callers catch them, nlohmann::json::exception); anything else escapes, terminates the
// process and counts as a crash.
#pragma once

#include "core/util/log.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <unistd.h>

namespace fedl::fuzz {

using Bytes = std::span<const std::uint8_t>;

// Aborts with a message if `cond` is false: a parser accepted something it must not, or the
// result contradicts itself.
#define FEDL_FUZZ_CHECK(cond)                                                                                          \
  do {                                                                                                                 \
    if (!(cond)) {                                                                                                     \
      std::fprintf(stderr, "%s:%d: fuzz invariant failed: %s\n", __FILE__, __LINE__, #cond);                           \
      std::abort();                                                                                                    \
    }                                                                                                                  \
  } while (0)

// One folder per process, removed when the process exits normally: in /dev/shm where there is
// one (writing a file to a disk-backed /tmp for each input costs ~3 ms, 10x the parsing), else
// under $TMPDIR.
class Scratch
{
public:
  Scratch()
  {
    std::error_code ec;
    const auto base = std::filesystem::is_directory("/dev/shm", ec) && ::access("/dev/shm", W_OK) == 0
                        ? std::filesystem::path("/dev/shm")
                        : std::filesystem::temp_directory_path();
    std::string tmpl = (base / "fedl-fuzz-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) {
      std::perror("fedl fuzz: mkdtemp");
      std::abort();
    }
    m_path = tmpl;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch()
  {
    std::error_code ec;
    std::filesystem::remove_all(m_path, ec);
  }

  // Writes `bytes` to NAME in the folder (replacing it) and returns its path.
  std::filesystem::path write(const char* name, Bytes bytes) const
  {
    auto path = m_path / name;
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (f == nullptr || (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) ||
        std::fclose(f) != 0) {
      std::perror("fedl fuzz: writing a scratch file");
      std::abort();
    }
    return path;
  }

private:
  std::filesystem::path m_path;
};

inline const Scratch&
scratch()
{
  static const Scratch s;
  return s;
}

// Warnings (a dropped line, ...) would cost a write to stderr per input.
inline void
quiet()
{
  static const bool done = [] {
    core::log::configure(core::log::Level::error, core::log::Format::text);
    return true;
  }();
  (void)done;
}

// With FEDL_FUZZ_VERBOSE set, says why an input was refused (for writing seeds that get far).
inline void
refused(const std::exception& e)
{
  static const bool verbose = std::getenv("FEDL_FUZZ_VERBOSE") != nullptr;
  if (verbose) {
    std::fprintf(stderr, "refused: %s\n", e.what());
  }
}

// Open bugs: crashes the fuzzer found in code that this harness's author could not fix at the
// time (tests/fuzz/README.md lists them, tests/fuzz/open/TARGET keeps their reproducers). A
// target steps around each at one marked place, so that fuzzing goes on past it; with
// FEDL_FUZZ_OPEN=1 in the environment it does not, and the reproducers crash.
inline bool
open_bugs_crash()
{
  static const bool crash = std::getenv("FEDL_FUZZ_OPEN") != nullptr;
  return crash;
}

// True if `v` is a JSON float that does not convert to the integer type T: nlohmann's get<T>()
// and value<T>() convert it with a static_cast, which is undefined behaviour then.
template<typename T>
bool
float_past(const nlohmann::json& v)
{
  if (!v.is_number_float()) {
    return false;
  }
  const double d = v.get<double>();
  // The open interval of doubles that convert to T: (min - 1, max + 1).
  const double lo = static_cast<double>(std::numeric_limits<T>::min()) - 1;
  const double hi = std::ldexp(1.0, std::numeric_limits<T>::digits);
  return !(d > lo && d < hi);
}

// True if `s` is well-formed UTF-8 (RFC 3629: no overlong forms, surrogates or code points
// past U+10FFFF), checked independently of core/util/text.cpp.
inline bool
is_utf8(std::string_view s)
{
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    std::size_t n = 0;
    std::uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    }
    if (c >= 0xc2 && c <= 0xdf) {
      n = 1;
      cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
      n = 2;
      cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) {
      return false;
    }
    for (std::size_t k = 1; k <= n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xc0) != 0x80) {
        return false;
      }
      cp = (cp << 6) | (d & 0x3f);
    }
    if ((n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
      return false;
    }
    i += n + 1;
  }
  return true;
}

// Two files from one input: the first two bytes (little-endian) give the size of the second,
// which is taken from the end; the first is what lies between. Mutations that change the sizes
// keep both parts non-trivial more often than a separator would.
struct TwoParts
{
  Bytes first;
  Bytes second;
};

inline TwoParts
split_two(Bytes in)
{
  if (in.size() < 2) {
    return {in, {}};
  }
  const std::size_t n = std::min<std::size_t>(in[0] | (in[1] << 8), in.size() - 2);
  const auto rest = in.subspan(2);
  return {rest.first(rest.size() - n), rest.last(n)};
}

inline std::string_view
as_text(Bytes in)
{
  return {reinterpret_cast<const char*>(in.data()), in.size()};
}

} // namespace fedl::fuzz
