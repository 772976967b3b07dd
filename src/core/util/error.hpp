// SPDX-License-Identifier: Apache-2.0
// Exit codes (DESIGN §2, §9) and the exceptions that carry a failure up to main().
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace fedl::core {

enum class ExitCode : int
{
  ok = 0,
  failure = 1, // the work failed at run time (I/O, bad data content, network)
  usage = 2,   // the command line or configuration is wrong
  verify = 3,  // a file is not what it claims (corrupt, truncated, bad hash or signature)
  budget = 4,  // privacy budget exhausted
  interrupted = 130,
};

// A failure with the exit code that main() returns for it. The message is complete
// (what, where, what to do); main() prefixes "fedl: error: ".
class Error : public std::runtime_error
{
public:
  Error(ExitCode code, const std::string& message) : std::runtime_error(message), m_code(code) {}
  explicit Error(const std::string& message) : Error(ExitCode::failure, message) {}

  template<typename... Args>
  Error(ExitCode code, fmt::format_string<Args...> f, Args&&... args)
    : Error(code, fmt::format(f, std::forward<Args>(args)...))
  {
  }

  // Exit 1 with a formatted message.
  template<typename A0, typename... Args>
  Error(fmt::format_string<A0, Args...> f, A0&& a0, Args&&... args)
    : Error(ExitCode::failure, fmt::format(f, std::forward<A0>(a0), std::forward<Args>(args)...))
  {
  }

  ExitCode code() const noexcept { return m_code; }

private:
  ExitCode m_code;
};

// Exit 2: the command line or configuration is wrong.
class UsageError : public Error
{
public:
  template<typename... Args>
  explicit UsageError(fmt::format_string<Args...> f, Args&&... args)
    : Error(ExitCode::usage, fmt::format(f, std::forward<Args>(args)...))
  {
  }
};

// Exit 3: a file or message is not what it claims to be.
class VerifyError : public Error
{
public:
  template<typename... Args>
  explicit VerifyError(fmt::format_string<Args...> f, Args&&... args)
    : Error(ExitCode::verify, fmt::format(f, std::forward<Args>(args)...))
  {
  }
};

} // namespace fedl::core
