// SPDX-License-Identifier: Apache-2.0
// Command-line parsing of every command, without running it: each parses a valid invocation and
// selects itself, and refuses a value out of its range or a missing required argument with an
// error that names the option (what `fedl` prints before exit 2).
#include "cmd/commands.hpp"
#include "cmd/common.hpp"

#include <CLI/CLI.hpp>
#include <doctest/doctest.h>

#include <string>
#include <vector>

namespace {

// "ok COMMAND" when `args` parse (COMMAND: the one selected), else "error: " and CLI11's message.
std::string
parse(std::vector<std::string> args)
{
  CLI::App app{"fedl", "fedl"};
  app.fallthrough();
  app.require_subcommand(0, 1);
  fedl::cmd::GlobalOptions globals;
  fedl::cmd::add_global_options(app, globals);
  const auto commands = fedl::cmd::add_all(app);
  args.insert(args.begin(), "fedl");
  std::vector<char*> argv;
  for (auto& a : args) {
    argv.push_back(a.data());
  }
  try {
    app.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const CLI::ParseError& e) {
    return std::string("error: ") + e.what();
  }
  for (const auto& c : commands) {
    if (c.app->parsed()) {
      return "ok " + c.app->get_name();
    }
  }
  return "ok";
}

} // namespace

TEST_SUITE_BEGIN("cmd");

TEST_CASE("cmd: a valid invocation of each command parses and selects it")
{
  CHECK(parse({"init", "ws", "--clients", "3", "--rounds", "5"}) == "ok init");
  CHECK(parse({"serve", "ws", "--heartbeat", "1", "--fraction", "0.5"}) == "ok serve");
  CHECK(parse({"join", "clients/site-1", "--data", "train.csv", "--max-epochs", "5", "--min-noise-multiplier", "1"}) ==
        "ok join");
  CHECK(parse({"train", "--data", "d.csv", "--epochs", "0", "--out", "u.st"}) == "ok train");
  CHECK(parse({"eval", "--data", "d.csv", "--model", "m.st"}) == "ok eval");
  CHECK(parse({"aggregate", "u1.st", "u2.st", "--base", "m.st", "--out", "n.st"}) == "ok aggregate");
  CHECK(parse({"audit", "--privacy-calc", "--sample-rate", "0.01", "--noise-multiplier", "1.1", "--steps", "100"}) ==
        "ok audit");
  CHECK(parse({"completion", "bash"}) == "ok completion");
  CHECK(parse({"--json", "join", "b", "--data", "d.csv"}) == "ok join");
  CHECK(parse({"join", "b", "--data", "d.csv", "--quiet"}) == "ok join"); // global options after the command
}

TEST_CASE("cmd: a value out of range or a missing argument names the option")
{
  const auto refused = [](std::vector<std::string> args, const char* option) {
    const auto got = parse(std::move(args));
    CHECK_MESSAGE(got.rfind("error: ", 0) == 0, got);
    CHECK_MESSAGE(got.find(option) != std::string::npos, got);
  };
  refused({"init", "ws", "--rounds", "0"}, "--rounds");
  refused({"init"}, "workspace");
  refused({"serve", "ws", "--heartbeat", "0.01"}, "--heartbeat");
  refused({"serve", "ws", "--fraction", "1.5"}, "--fraction");
  refused({"join", "b", "--data", "d.csv", "--max-epochs", "0"}, "--max-epochs");
  refused({"join", "b", "--data", "d.csv", "--max-epochs", "100001"}, "--max-epochs");
  refused({"join", "b", "--data", "d.csv", "--retry-max", "0.01"}, "--retry-max");
  refused({"join", "b"}, "--data");
  refused({"train", "--data", "d.csv", "--epochs", "100001"}, "--epochs");
  refused({"eval", "--data", "d.csv", "--model", "m.st", "--batch-size", "0"}, "--batch-size");
  refused({"aggregate", "u.st", "--base", "m.st", "--out", "n.st", "--clip-norm", "0"}, "--clip-norm");
  refused({"completion", "tcsh"}, "shell");
  refused({"join", "b", "--data", "d.csv", "--no-such-flag"}, "--no-such-flag");
}
