// SPDX-License-Identifier: Apache-2.0
// fedl audit WS [--witness DIR...]: verify a workspace's history (core/federation/audit.hpp); any
// mismatch is exit 3 naming the first broken entry or file; otherwise it prints the rounds,
// their participants, rejected updates, strategy and privacy.
// fedl audit --privacy-calc: no workspace; the (ε, δ) that DP-SGD with the given sampling rate,
// noise multiplier and steps spends, by the PLD accountant (core/math/pld.hpp) or RDP
// (core/math/accountant.hpp).
#include "cmd/commands.hpp"

#include "cmd/common.hpp"
#include "core/federation/audit.hpp"
#include "core/math/accountant.hpp"
#include "core/util/error.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <optional>

namespace fs = std::filesystem;

namespace fedl::cmd {

namespace {

// A CSV cell (RFC 4180): quoted when it holds a comma, a quote or a line break; null is empty.
std::string
csv_cell(const nlohmann::json& v)
{
  if (v.is_null()) {
    return {};
  }
  auto text = v.is_string() ? v.get<std::string>() : v.dump();
  if (text.find_first_of(",\"\r\n") == std::string::npos) {
    return text;
  }
  std::string quoted = "\"";
  for (const char c : text) {
    quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
  }
  return quoted + "\"";
}

// One row per round, for a spreadsheet: the figures of audit --json's rounds.
std::string
rounds_csv(const nlohmann::json& rounds)
{
  std::string out = "round,time,strategy,participants,sites,asked,rejected,accuracy,loss,epsilon,seconds,model\n";
  for (const auto& r : rounds) {
    std::string sites;
    for (const auto& s : r.at("participants")) {
      sites += (sites.empty() ? "" : ";") + s.get<std::string>();
    }
    const std::vector<nlohmann::json> row{
      r.at("round"), r.at("time"),    r.at("strategy"),        r.at("participants").size(),
      sites,         r.at("asked"),   r.at("rejected").size(), r.at("accuracy"),
      r.at("loss"),  r.at("epsilon"), r.at("seconds"),         r.at("model")};
    for (std::size_t i = 0; i < row.size(); ++i) {
      out += (i > 0 ? "," : "") + csv_cell(row[i]);
    }
    out += "\n";
  }
  return out;
}

int
run_audit(const fs::path& root, const std::vector<fs::path>& witnesses, bool csv)
{
  if (csv && globals().json) {
    throw core::UsageError("--csv and --json are two forms of the same rounds: give one");
  }
  const auto audit = core::audit_workspace(core::Workspace(root), witnesses);
  if (csv) {
    fmt::print("{}", rounds_csv(audit.result.at("rounds")));
    return 0;
  }
  print_result(audit.result, audit.text);
  return 0;
}

struct PrivacyCalc
{
  bool enabled = false;
  std::optional<double> sample_rate;
  std::optional<double> noise_multiplier;
  std::optional<std::uint64_t> steps;
  std::optional<double> delta;
  std::optional<double> epsilon;
  std::optional<std::string> accountant;
};

// ε at --delta, or with --epsilon the other conversion, δ at it.
int
run_privacy_calc(const PrivacyCalc& p)
{
  const auto accountant = resolve_accountant(p.accountant).value_or(core::Accountant::pld_v1);
  if (*p.steps == 0) {
    throw core::UsageError("--steps 0: must be at least 1 (the number of noisy gradient steps)");
  }
  nlohmann::json j = {{"accountant", core::accountant_name(accountant)},
                      {"steps", *p.steps},
                      {"sample_rate", *p.sample_rate},
                      {"noise_multiplier", *p.noise_multiplier}};
  const auto what =
    fmt::format("for {} steps at sample rate {}, noise multiplier {}", *p.steps, *p.sample_rate, *p.noise_multiplier);
  const core::GaussianSteps part{*p.sample_rate, *p.noise_multiplier, *p.steps};
  const bool pld = accountant == core::Accountant::pld_v1;
  std::string text;
  if (p.epsilon) {
    j["epsilon"] = *p.epsilon;
    if (pld) {
      const auto spent = core::pld_delta({&part, 1}, *p.epsilon, /*with_lower=*/true);
      j["delta"] = spent.delta;
      j["delta_lower"] = spent.delta_lower;
      j["grid"] = spent.grid;
      text = fmt::format("delta {:.4g} (epsilon {}, PLD; the exact value is at least {:.4g}) {}\n", spent.delta,
                         *p.epsilon, spent.delta_lower, what);
    } else {
      j["delta"] = core::compute_delta(*p.sample_rate, *p.noise_multiplier, *p.steps, *p.epsilon);
      text = fmt::format("delta {:.4g} (epsilon {}, RDP) {}\n", j["delta"].get<double>(), *p.epsilon, what);
    }
  } else {
    j["delta"] = *p.delta;
    if (pld) {
      const auto spent = core::pld_epsilon({&part, 1}, *p.delta, /*with_lower=*/true);
      j["epsilon"] = spent.epsilon;
      j["epsilon_lower"] = spent.epsilon_lower;
      j["grid"] = spent.grid;
      text = fmt::format("epsilon {:.4f} (delta {}, PLD; the exact value is at least {:.4f}) {}\n", spent.epsilon,
                         *p.delta, spent.epsilon_lower, what);
    } else {
      const auto spent = core::compute_epsilon(*p.sample_rate, *p.noise_multiplier, *p.steps, *p.delta);
      j["epsilon"] = spent.epsilon;
      j["order"] = spent.order;
      text =
        fmt::format("epsilon {:.4f} (delta {}, RDP, best order {}) {}\n", spent.epsilon, *p.delta, spent.order, what);
    }
  }
  print_result(j, text);
  return 0;
}

// The workspace is optional to CLI11 because --privacy-calc needs none; the two modes' flags
// are checked here so that each mistake gets a message saying what to add or drop.
int
dispatch(const std::optional<fs::path>& ws, const std::vector<fs::path>& witnesses, const PrivacyCalc& p, bool host,
         bool csv)
{
  if (csv && (host || p.enabled)) {
    throw core::UsageError("--csv lists a workspace's rounds: give WS, without --host or --privacy-calc");
  }
  if (host) {
    if (ws || !witnesses.empty() || p.enabled) {
      throw core::UsageError(
        "--host audits this host's sandbox: give no workspace, --witness or --privacy-calc with it");
    }
    return audit_host();
  }
  const std::vector<std::pair<const char*, bool>> calc_flags = {{"--sample-rate", p.sample_rate.has_value()},
                                                                {"--noise-multiplier", p.noise_multiplier.has_value()},
                                                                {"--steps", p.steps.has_value()},
                                                                {"--delta", p.delta.has_value()},
                                                                {"--epsilon", p.epsilon.has_value()},
                                                                {"--accountant", p.accountant.has_value()}};
  if (!p.enabled) {
    for (const auto& [flag, given] : calc_flags) {
      if (given) {
        throw core::UsageError("{} is only for --privacy-calc (fedl audit --privacy-calc --sample-rate Q "
                               "--noise-multiplier S --steps T --delta D)",
                               flag);
      }
    }
    if (!ws) {
      throw core::UsageError("fedl audit needs a workspace folder WS (or --privacy-calc to compute epsilon)");
    }
    return run_audit(*ws, witnesses, csv);
  }
  if (!witnesses.empty()) {
    throw core::UsageError("--witness is for auditing a workspace, not for --privacy-calc");
  }
  if (ws) {
    throw core::UsageError("--privacy-calc takes no workspace (got {}): drop it, or drop --privacy-calc to audit it",
                           ws->string());
  }
  if (p.delta && p.epsilon) {
    throw core::UsageError("--delta and --epsilon are the two ways to ask: give --delta D for epsilon, or --epsilon E "
                           "for delta, not both");
  }
  std::vector<std::string> missing;
  for (const auto& [flag, given] : calc_flags) {
    const std::string_view f = flag;
    const bool optional = f == "--accountant" || f == "--epsilon" || (f == "--delta" && p.epsilon);
    if (!given && !optional) {
      missing.emplace_back(flag);
    }
  }
  if (!missing.empty()) {
    throw core::UsageError("--privacy-calc needs {} (fedl audit --privacy-calc --sample-rate Q --noise-multiplier S "
                           "--steps T --delta D)",
                           fmt::join(missing, ", "));
  }
  return run_privacy_calc(p);
}

} // namespace

Command
add_audit(CLI::App& parent)
{
  auto ws = std::make_shared<std::optional<fs::path>>();
  auto calc = std::make_shared<PrivacyCalc>();
  auto witnesses = std::make_shared<std::vector<fs::path>>();
  auto host = std::make_shared<bool>(false);
  auto* app = parent.add_subcommand("audit", "Verify a workspace's ledger, signatures, certificates and model files");
  app->add_option("workspace", *ws, "The workspace folder (required unless --privacy-calc)")->type_name("WS");
  app
    ->add_option("--witness", *witnesses,
                 "Check the ledger against the signed heads a site kept (its bundle folder); repeatable")
    ->type_name("DIR")
    ->expected(1, -1)
    ->check(CLI::ExistingDirectory);
  app->add_flag("--privacy-calc", calc->enabled,
                "Compute the (epsilon, delta) that DP-SGD spends instead of auditing a workspace");
  app->add_option("--sample-rate", calc->sample_rate, "With --privacy-calc: Poisson sampling rate, batch / samples")
    ->type_name("Q");
  app
    ->add_option("--noise-multiplier", calc->noise_multiplier,
                 "With --privacy-calc: noise standard deviation over the clipping norm")
    ->type_name("S");
  app->add_option("--steps", calc->steps, "With --privacy-calc: number of noisy gradient steps")->type_name("T");
  app->add_option("--delta", calc->delta, "With --privacy-calc: the delta of (epsilon, delta)")->type_name("D");
  app->add_option("--epsilon", calc->epsilon, "With --privacy-calc, instead of --delta: compute delta at this epsilon")
    ->type_name("E");
  add_accountant_option(*app, calc->accountant, "With --privacy-calc: the accountant");
  app->add_flag("--host", *host,
                "Report the sandbox layers this host offers and test them: a sandboxed child attempts each forbidden "
                "action (exit 3 if any is allowed)");
  auto csv = std::make_shared<bool>(false);
  app->add_flag("--csv", *csv, "Print the rounds' figures (accuracy, loss, epsilon, ...) as CSV, one row per round");
  return {app, [ws, witnesses, calc, host, csv] { return dispatch(*ws, *witnesses, *calc, *host, *csv); }};
}

} // namespace fedl::cmd
