// SPDX-License-Identifier: Apache-2.0
// fedl's command line: parse, dispatch, the one top-level catch, exit codes (run_fedl; main.cpp
// calls it, and so does a fork server's child, core/net/fork_server.hpp).
#include "backends/loader.hpp"
#include "cmd/commands.hpp"
#include "cmd/common.hpp"
#include "core/util/error.hpp"
#include "core/util/log.hpp"
#include "core/util/version.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <string>
#include <vector>

namespace {

std::size_t
edit_distance(const std::string& a, const std::string& b)
{
  std::vector<std::size_t> prev(b.size() + 1);
  std::vector<std::size_t> cur(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) {
    prev[j] = j;
  }
  for (std::size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// The first word that is not an option (nor the value of --log-format), i.e. the command.
std::string
command_word(int argc, char** argv)
{
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--log-format") {
      ++i;
      continue;
    }
    if (a.empty() || a[0] == '-') {
      continue;
    }
    return a;
  }
  return {};
}

// Exit 2 with a "did you mean" for a word that is no command.
void
check_command_word(const CLI::App& app, const std::string& word)
{
  if (word.empty()) {
    return;
  }
  std::vector<std::string> names;
  for (const auto* sub : app.get_subcommands([](const CLI::App*) { return true; })) {
    if (sub->get_name() == word) {
      return;
    }
    if (!sub->get_group().empty()) {
      names.push_back(sub->get_name());
    }
  }
  std::string best;
  std::size_t best_d = 3;
  for (const auto& n : names) {
    const auto d = edit_distance(word, n);
    if (d < best_d || (n.rfind(word, 0) == 0 && !word.empty())) {
      best_d = std::min(d, best_d);
      best = n;
    }
  }
  throw fedl::core::UsageError("'{}' is not a fedl command{} (commands: {}; see fedl --help)", word,
                               best.empty() ? "" : fmt::format("; did you mean '{}'?", best), fmt::join(names, ", "));
}

int
print_version()
{
  using fedl::backends::all_backends;
  std::vector<fedl::backends::LoadFailure> failures;
  const auto& backends = all_backends(&failures);
  nlohmann::json j = {{"version", fedl::core::version_string()}, {"backends", nlohmann::json::array()}};
  std::string text = fmt::format("fedl {}\n", fedl::core::version_string());
  for (const auto& b : backends) {
    j["backends"].push_back(
      {{"name", b.api->name}, {"runtime", b.api->runtime}, {"path", b.path.string()}, {"devices", b.devices}});
    text += fmt::format("backend {}: {} ({}); devices: {}\n", b.api->name, b.api->runtime, b.path.string(),
                        fmt::join(b.devices, ", "));
  }
  for (const auto& f : failures) {
    text += fmt::format("backend file {} not loaded: {}\n", f.path.string(), f.reason);
  }
  if (backends.empty()) {
    text += fmt::format("no compute backend found (searched {})\n", fedl::backends::search_path_text());
  }
  fedl::cmd::print_result(j, text);
  return 0;
}

} // namespace

int
fedl::cmd::run_fedl(int argc, char** argv)
{
  fedl::cmd::mark_process_start();
  using fedl::core::ExitCode;
  CLI::App app{"fedl: federated learning on LibTorch: train together, keep data where it is", "fedl"};
  app.fallthrough(); // global options are accepted after the command name too
  app.require_subcommand(0, 1);
  auto& globals = fedl::cmd::globals();
  fedl::cmd::add_global_options(app, globals);
  app.footer("Run 'fedl COMMAND --help' for a command's options; man fedl for exit codes and files.\n");
  const auto commands = fedl::cmd::add_all(app);
  try {
    check_command_word(app, command_word(argc, argv));
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      if (e.get_exit_code() == 0) {
        return app.exit(e); // --help
      }
      if (globals.version) {
        return print_version(); // `fedl train --version`: the version, not train's missing options
      }
      // CLI11 checks required options before unknown ones: `--dat x` would be "--data is
      // required". The unknown words come first, since they are the mistake.
      const auto unknown = app.remaining(true);
      if (dynamic_cast<const CLI::RequiredError*>(&e) != nullptr && !unknown.empty()) {
        fmt::print(stderr, "fedl: error: unknown option or argument: {}\n", fmt::join(unknown, " "));
      } else {
        fmt::print(stderr, "fedl: error: {}\n", e.what());
      }
      const auto* sub = app.get_subcommands().empty() ? &app : app.get_subcommands().front();
      fmt::print(stderr, "Run 'fedl {}--help' for usage.\n", sub == &app ? "" : sub->get_name() + " ");
      return static_cast<int>(ExitCode::usage);
    }
    fedl::core::log::configure(globals.quiet     ? fedl::core::log::Level::error
                               : globals.verbose ? fedl::core::log::Level::debug
                                                 : fedl::core::log::Level::info,
                               globals.log_format == "json" ? fedl::core::log::Format::json
                                                            : fedl::core::log::Format::text);
    if (globals.version) {
      return print_version();
    }
    for (const auto& c : commands) {
      if (c.app->parsed()) {
        return c.run();
      }
    }
    fmt::print(stderr, "{}", app.help());
    return static_cast<int>(ExitCode::usage);
  } catch (const fedl::core::Error& e) {
    FEDL_LOG_ERROR("{}", e.what());
    return static_cast<int>(e.code());
  } catch (const std::bad_alloc&) {
    FEDL_LOG_ERROR("out of memory");
    return static_cast<int>(ExitCode::failure);
  } catch (const std::exception& e) {
    FEDL_LOG_ERROR("{}", e.what());
    return static_cast<int>(ExitCode::failure);
  }
}
