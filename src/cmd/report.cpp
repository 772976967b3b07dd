// SPDX-License-Identifier: Apache-2.0
// fedl report: one self-contained HTML page of a federation's verified history
// (core/federation/report.hpp; man fedl-report).
#include "core/federation/report.hpp"
#include "cmd/commands.hpp"
#include "cmd/common.hpp"
#include "core/federation/audit.hpp"
#include "core/util/clock.hpp"
#include "core/util/error.hpp"
#include "core/util/file_io.hpp"
#include "core/util/version.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace fs = std::filesystem;

namespace fedl::cmd {

namespace {

struct ReportOptions
{
  fs::path workspace;
  std::optional<fs::path> output;
};

int
run_report(const ReportOptions& opt)
{
  const core::Workspace ws(opt.workspace);
  ws.require_exists();
  const auto output = opt.output.value_or(ws.root() / "report.html");
  core::ReportInput in{ws.root().string(), nullptr, {}, core::utc_now(), core::version_string()};
  try {
    in.audit = core::audit_workspace(ws, {}).result;
  } catch (const core::VerifyError& e) {
    in.failure = e.what(); // the page says so, and shows nothing of the ledger
  }
  core::atomic_write(output, core::report_html(in));
  const bool verified = !in.audit.is_null();
  const auto rounds = verified ? in.audit.at("rounds").size() : 0;
  const nlohmann::json result = {{"report", output.string()},
                                 {"verified", verified},
                                 {"rounds", rounds},
                                 {"error", verified ? nlohmann::json(nullptr) : nlohmann::json(in.failure)}};
  print_result(result, verified
                         ? fmt::format("wrote {}: {} rounds, ledger verified\n", output.string(), rounds)
                         : fmt::format("wrote {}: the ledger does not verify ({})\n", output.string(), in.failure));
  return verified ? 0 : static_cast<int>(core::ExitCode::verify);
}

} // namespace

Command
add_report(CLI::App& parent)
{
  auto opt = std::make_shared<ReportOptions>();
  auto* app = parent.add_subcommand(
    "report", "Write one self-contained HTML page of a federation's verified history: charts of every round");
  app->add_option("workspace", opt->workspace, "The workspace folder")
    ->required()
    ->type_name("WS")
    ->check(CLI::ExistingDirectory);
  app->add_option("-o,--output", opt->output, "The page to write (default: WS/report.html)")->type_name("FILE");
  return {app, [opt] { return run_report(*opt); }};
}

} // namespace fedl::cmd
