// SPDX-License-Identifier: Apache-2.0
// fedl status: the federation as its coordinator sees it now, from the status file `fedl serve`
// keeps (core/federation/status.hpp; man fedl-status).
#include "core/federation/status.hpp"
#include "cmd/commands.hpp"
#include "cmd/common.hpp"
#include "core/util/error.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <thread>
#include <unistd.h>

namespace fs = std::filesystem;

namespace fedl::cmd {

namespace {

struct StatusOptions
{
  fs::path workspace;
  bool watch = false;
  double interval = 2;
};

int
run_status(const StatusOptions& opt)
{
  const core::Workspace ws(opt.workspace);
  ws.require_exists();
  if (!opt.watch) {
    const auto status = core::read_status(ws);
    if (!status) {
      throw core::Error("no coordinator has run on {} yet (no {}): start one with `fedl serve {}`", ws.root().string(),
                        ws.status_file().string(), ws.root().string());
    }
    print_result(status->doc, status->text);
    return 0;
  }
  // Until the coordinator is not running (finished, failed, or gone): waits for one to start.
  const bool clear = !globals().json && ::isatty(STDOUT_FILENO) != 0;
  bool waited = false;
  for (;;) {
    const auto status = core::read_status(ws);
    if (!status) {
      if (!waited && !globals().quiet) {
        fmt::print(stderr, "waiting for a coordinator on {} (fedl serve {})\n", ws.root().string(), ws.root().string());
        waited = true;
      }
    } else if (globals().json) {
      auto doc = status->doc;
      doc["schema"] = json_schema_version;
      fmt::print("{}\n", doc.dump()); // one document per line
    } else {
      fmt::print("{}{}{}", clear ? "\033[H\033[2J" : "", status->text, clear ? "" : "\n");
    }
    std::fflush(stdout);
    if (status && !status->running) {
      return 0;
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(opt.interval));
  }
}

} // namespace

Command
add_status(CLI::App& parent)
{
  auto opt = std::make_shared<StatusOptions>();
  auto* app = parent.add_subcommand("status", "Show a running federation: round, deadline, who has reported, sites");
  app->add_option("workspace", opt->workspace, "The workspace folder of the coordinator")
    ->required()
    ->type_name("WS")
    ->check(CLI::ExistingDirectory);
  app->add_flag("--watch", opt->watch,
                "Show the status again every --interval seconds until the coordinator stops (waits for one to start)");
  app->add_option("--interval", opt->interval, "With --watch: seconds between two looks")
    ->capture_default_str()
    ->type_name("SECONDS")
    ->check(CLI::Range(0.1, 3600.0));
  return {app, [opt] { return run_status(*opt); }};
}

} // namespace fedl::cmd
