// SPDX-License-Identifier: Apache-2.0
// Small helpers the benchmark programs share.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <sstream>
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

// Prints "PROGRAM: WHY" and the usage lines on stderr and exits 2.
[[noreturn]] inline void
usage_error(const std::string& program, const std::string& usage, const std::string& why)
{
  std::fprintf(stderr, "%s: %s\n%s", program.c_str(), why.c_str(), usage.c_str());
  std::exit(2);
}

// The "--flag value" command line of a benchmark program. A mistake is usage_error; -h and
// --help print the usage on stdout and exit 0.
class CommandLine
{
public:
  CommandLine(int argc, char** argv, std::string program, std::string usage)
    : m_argc(argc), m_argv(argv), m_program(std::move(program)), m_usage(std::move(usage))
  {
  }

  // Moves to the next flag; false when none is left.
  bool next()
  {
    if (++m_i >= m_argc) {
      return false;
    }
    m_flag = m_argv[m_i];
    if (m_flag == "-h" || m_flag == "--help") {
      std::fputs(m_usage.c_str(), stdout);
      std::exit(0);
    }
    return true;
  }
  const std::string& flag() const { return m_flag; }

  // The flag's value.
  std::string value()
  {
    if (m_i + 1 >= m_argc) {
      fail(m_flag + " needs a value");
    }
    return m_argv[++m_i];
  }
  // `text` (by default the flag's value) as a count, positive unless `zero_ok`.
  std::size_t count_of(const std::string& text, bool zero_ok = false) const
  {
    if (const auto v = parse_count(text, zero_ok)) {
      return *v;
    }
    fail(m_flag + " needs a " + (zero_ok ? "non-negative" : "positive") + " integer, not '" + text + "'");
  }
  std::size_t count(bool zero_ok = false) { return count_of(value(), zero_ok); }
  // Comma-separated counts.
  std::vector<std::size_t> counts_of(const std::string& text) const
  {
    std::vector<std::size_t> out;
    std::stringstream ss(text);
    std::string item;
    while (std::getline(ss, item, ',')) {
      out.push_back(count_of(item));
    }
    return out;
  }
  // The flag's value as a positive number.
  double positive()
  {
    const auto text = value();
    try {
      std::size_t pos = 0;
      const double v = std::stod(text, &pos);
      if (pos == text.size() && v > 0) {
        return v;
      }
    } catch (const std::exception&) {
    }
    fail(m_flag + " needs a positive number, not '" + text + "'");
  }

  [[noreturn]] void fail(const std::string& why) const { usage_error(m_program, m_usage, why); }

private:
  int m_argc;
  char** m_argv;
  std::string m_program;
  std::string m_usage;
  int m_i = 0;
  std::string m_flag;
};

} // namespace fedl::bench
